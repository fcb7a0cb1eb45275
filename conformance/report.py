"""`conform(run_dir) -> Report`: load, replay, and judge a run; `format_report(r)`.

Invariants are named verdicts like model/properties.py. The model-side ones come from
the model's own checks applied to every replayed step (`check_transition`,
`check_progress_at_exit`, `check_state`, `check_terminal`), never re-implemented; a few
are also checked on the raw trace, where the trace says more than the model state does:

  trace_wellformed    every line parses, per-thread `i` from 0 with no gap (load.py)
  replay              the model allows every step (first divergence otherwise)
  id_monotonic        model (leader's received ids) + trace: rank0's sent envelope
                      headers have strictly increasing call_id, and strictly increasing
                      chunk_index across INFER
  stale_epoch_decode  model (every decode is of the current cache_epoch)
  call_count          model (Phase-B end and decode) + trace: each mesh rank's generator
                      collectives per envelope equal the envelope's plan
  queue_bound         model (D_in/D_out in every state) + rank0's recorded q_in/q_out
  output_order        model (no chunk emitted twice or out of order)
  exactly_once        every result accepted into the decode queue is decoded exactly
                      once, or ended (stale drop, hard-cut flush, rejection), or the run
                      ended by a terminal error with it pending
  progress            model (rank0's clean exit comes after every chunk of its epoch)
  no_hang             model (check_terminal: nothing left blocked at the end)
  end                 the run's end is a clean end (every rank exited ok) or a released
                      failure (every rank exited, crashed or was released)
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from lockstep import accel
from lockstep.model.ops import ENV_HDR, ENV_PAY, GEN, Coll, Send
from lockstep.model.release import committed_exits, own_kind
from lockstep.model.semantics import ABORTED, CRASHED, ERROR, LIVE, OK
from lockstep.model.tracefmt import loads

from .load import Run, TraceError, load_run, open_run_dir
from .replay import ReplayResult, Replayer

INVARIANTS = ("trace_wellformed", "replay", "id_monotonic", "stale_epoch_decode",
              "call_count", "queue_bound", "output_order", "exactly_once", "progress",
              "no_hang", "end")
MODEL_PROPS = {"id_monotonic": "id_monotonic", "stale_epoch_decode": "stale_epoch_decode",
               "call_count": "call_count", "queue_bound": "queue_bound",
               "output_order": "output_order", "progress": "progress"}
TERMINAL_PROPS = ("deadlock", "stranding", "collective_mismatch", "framing_error",
                  "crash_hang")


@dataclass
class Verdict:
    name: str
    status: str          # ok | violated | not checked
    detail: str = ""


@dataclass
class Report:
    run_dir: str
    ok: bool = False
    config: str = ""
    events: int = 0               # step events in the traces
    replayed: int = 0
    steps: int = 0                # model transitions
    load_s: float = 0.0
    cache_note: str = ""          # what the load cache did (conformance/cache.py)
    build: str = ""               # compiled or pure Python (lockstep/accel.py)
    replay_s: float = 0.0
    events_per_s: float = 0.0     # replay throughput
    divergence: Optional[str] = None
    verdicts: list = field(default_factory=list)
    failure_mode: Optional[str] = None
    ended: str = ""
    warnings: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    per_rank: list = field(default_factory=list)
    emitted: int = 0
    result: Optional[ReplayResult] = field(default=None, repr=False)
    run: Optional[Run] = field(default=None, repr=False)

    def verdict(self, name) -> Verdict:
        for v in self.verdicts:
            if v.name == name:
                return v
        raise KeyError(name)

    def as_dict(self) -> dict:
        return {"run_dir": self.run_dir, "ok": self.ok, "config": self.config,
                "events": self.events, "replayed": self.replayed, "steps": self.steps,
                "load_s": round(self.load_s, 4), "cache": self.cache_note,
                "replay_s": round(self.replay_s, 4), "build": self.build,
                "events_per_s": round(self.events_per_s), "divergence": self.divergence,
                "verdicts": {v.name: {"status": v.status, "detail": v.detail}
                             for v in self.verdicts},
                "failure_mode": self.failure_mode, "ended": self.ended,
                "warnings": self.warnings, "notes": self.notes,
                "per_rank": self.per_rank, "emitted": self.emitted}


def conform(run_dir, verify: bool = False, last: int = 0) -> Report:
    """Load, replay and judge one run directory (`last`: only each rank's newest
    `last` trace segments, a suffix: conformance/suffix.py)."""
    rep = Report(str(run_dir))
    t0 = time.perf_counter()
    try:
        run = load_run(run_dir, last=last)
    except TraceError as e:
        rep.load_s = time.perf_counter() - t0
        try:                   # a rejected trace: the run's configuration is still said
            rep.config = open_run_dir(run_dir)[0].describe()
        except TraceError:
            pass
        rep.divergence = f"TRACE ERROR {e}"
        rep.verdicts = [Verdict("trace_wellformed", "violated", str(e))] + \
            [Verdict(n, "not checked") for n in INVARIANTS[1:]]
        rep.ended = "unknown (trace rejected)"
        return rep
    rep.load_s = time.perf_counter() - t0
    rep.cache_note = run.cache_note
    rep.run = run
    rep.config = run.cfg.describe()
    rep.events = run.n_events
    rep.warnings = list(run.warnings)
    rep.per_rank = [len(rt.steps) for rt in run.ranks]
    res = Replayer(run, verify=verify).replay()
    rep.build = accel.describe()
    rep.result = res
    rep.replayed, rep.steps = res.replayed, res.steps
    rep.replay_s, rep.events_per_s = res.seconds, res.events_per_s
    rep.notes = list(res.notes)
    if run.start is not None:
        st = run.start
        rep.notes.insert(0, "suffix: the replay starts at the consistent cut after the "
                         "checkpoints of segments " + ", ".join(
                             f"rank{r} {n}" for r, n in enumerate(st.segments))
                         + "; lines applied to their own rank before the cut "
                         f"{list(st.skipped)} (conformance/suffix.py)")
    rep.emitted = len(res.emitted)
    if res.divergence is not None:
        rep.divergence = res.divergence.text()
    rep.verdicts = _verdicts(run, res)
    from .sources import check_sources, headline, launch_record
    bad_launch = launch_record(Path(run.path))[1]
    if bad_launch:
        rep.warnings.append(bad_launch + ": it names who killed a rank, and is not used")
    probs = check_sources(run, res)
    rep.verdicts.append(Verdict("sources_agree", "violated" if probs else "ok",
                                "; ".join(probs) if probs else
                                ".err exit lines, outputs.json and run.json agree with "
                                "the traces"))
    rep.headline = headline(run)
    rep.ended = _ended(run, res)
    rep.failure_mode = failure_mode(run, res)
    rep.ok = all(v.status != "violated" for v in rep.verdicts)
    return rep


# ---------------------------------------------------------------------- verdicts

def _verdicts(run: Run, res: ReplayResult) -> list:
    cfg = run.cfg
    m = res.model
    prefix = " (up to the divergence)" if res.divergence is not None else ""
    by_prop = {}
    for step, viol, ev in res.violations:
        by_prop.setdefault(viol.prop, []).append((step, viol, ev))

    def model_verdict(name, extra=()):
        hits = by_prop.get(MODEL_PROPS[name], [])
        problems = [f"step {st}: {vi.detail}" + (f" ({ev.where()})" if ev else "")
                    for st, vi, ev in hits] + list(extra)
        if problems:
            return Verdict(name, "violated", "; ".join(problems[:3]) +
                           (f"; ... {len(problems) - 3} more" if len(problems) > 3 else ""))
        return Verdict(name, "ok", "model checks on every replayed step" + prefix)

    out = [Verdict("trace_wellformed", "ok", f"{run.n_events:,} step events; " +
                   ("; ".join(run.warnings) if run.warnings else "no warnings"))]
    if res.divergence is None:
        out.append(Verdict("replay", "ok", f"{res.replayed:,} events in {res.steps:,} "
                           f"model steps"))
    else:
        d = res.divergence
        out.append(Verdict("replay", "violated", f"first divergence at step {d.step}: "
                           f"{d.who}: {d.reason}"))
    out.append(model_verdict("id_monotonic", _trace_ids(run, m)))
    out.append(model_verdict("stale_epoch_decode"))
    out.append(model_verdict("call_count", _trace_calls(run, m)))
    out.append(model_verdict("queue_bound", _trace_queues(run)))
    out.append(model_verdict("output_order"))
    out.append(_exactly_once(run, res))
    out.append(model_verdict("progress"))
    term = [(st, vi) for p in TERMINAL_PROPS for st, vi, _ in by_prop.get(p, [])]
    if term:
        out.append(Verdict("no_hang", "violated", "; ".join(f"{vi.prop}: {vi.detail}"
                                                            for _, vi in term)))
    elif res.divergence is not None:
        out.append(Verdict("no_hang", "not checked", "the replay did not reach the end"))
    else:
        out.append(Verdict("no_hang", "ok", "no rank left blocked at the end"))
    out.append(_end_verdict(run, res))
    return out


def _rows_with(m, pred) -> set:
    labels = set()
    for p in range(m.n):
        for table in m.tables[p]:
            for rows in table.values():
                labels.update(r.label for r in rows if pred(r))
    return labels


def _trace_ids(run: Run, m) -> list:
    hdr = _rows_with(m, lambda r: type(r.op) is Send and r.op.kind == ENV_HDR)
    problems, last_call, last_chunk = [], -1, -1
    for ev in run.ranks[0].steps:
        if ev.op != "send" or ev.label not in hdr or not ev.has_msg:
            continue
        msg = ev.msg
        if msg[1] <= last_call:
            problems.append(f"rank0 sends call_id={msg[1]} after call_id={last_call} "
                            f"({ev.where()})")
        if msg[0] == 1:
            if msg[2] <= last_chunk:
                problems.append(f"rank0 sends chunk_index={msg[2]} after {last_chunk} "
                                f"({ev.where()})")
            last_chunk = max(last_chunk, msg[2])
        last_call = max(last_call, msg[1])
    return problems


def _trace_calls(run: Run, m) -> list:
    gen = _rows_with(m, lambda r: type(r.op) is Coll and r.op.kind == GEN)
    pay = _rows_with(m, lambda r: type(r.op) is Coll and r.op.kind == ENV_PAY)
    done = _rows_with(m, lambda r: "phase_b_done" in r.tags)
    problems = []
    for rt in run.ranks[1:]:
        plan, count, env = None, 0, None
        for ev in rt.steps:
            if ev.op != "coll":   # the leader's comms thread has p2p rows of these labels
                continue
            if ev.label in pay and ev.has_msg and len(ev.msg) == 7:
                plan, count, env = ev.msg[4], 0, ev
            elif ev.label in gen and plan is not None:
                count += 1
                if ev.label in done:
                    if count != plan:
                        problems.append(f"{m.names[rt.rank]} ran {count} generator "
                                        f"collectives for call_id={env.msg[1]}, plan "
                                        f"{plan} ({ev.where()})")
                    plan = None
            elif ev.label in done and plan is not None:
                if count != plan:
                    problems.append(f"{m.names[rt.rank]} ran {count} generator "
                                    f"collectives for call_id={env.msg[1]}, plan {plan} "
                                    f"({ev.where()})")
                plan = None
    return problems


def _trace_queues(run: Run) -> list:
    cfg = run.cfg
    problems = []
    for ev in run.ranks[0].steps:
        meas = ev.meas
        if not meas:
            continue
        q_in, q_out = meas.get("q_in"), meas.get("q_out")
        if isinstance(q_in, int) and q_in > cfg.d_in:
            problems.append(f"q_in={q_in} > D_in={cfg.d_in} ({ev.where()})")
        if isinstance(q_out, int) and q_out > cfg.d_out:
            problems.append(f"q_out={q_out} > D_out={cfg.d_out} ({ev.where()})")
    return problems


def _exactly_once(run: Run, res: ReplayResult) -> Verdict:
    twice = {c: n for c, n in res.decoded.items() if n > 1}
    if twice:
        return Verdict("exactly_once", "violated", "decoded more than once: " +
                       ", ".join(f"call_id={c} x{n}" for c, n in sorted(twice.items())))
    pending = [c for c in res.accepted if c not in res.decoded and c not in res.ended]
    failed = any(pr.status != OK for pr in res.state.procs) if res.state else True
    dropped = len(res.ended)
    detail = (f"{len(res.accepted)} results accepted: {len(res.decoded)} decoded once, "
              f"{dropped} ended undecoded (stale drop / hard-cut flush / rejection)"
              + (" (up to the divergence)" if res.divergence is not None else ""))
    if pending:
        if res.divergence is not None:
            return Verdict("exactly_once", "not checked", detail + f"; {len(pending)} "
                           f"pending at the divergence")
        if not failed:
            return Verdict("exactly_once", "violated", detail + f"; never decoded in a "
                           f"clean run: call_id {sorted(pending)[:5]}")
        detail += f"; {len(pending)} pending when the run ended by a failure"
    return Verdict("exactly_once", "ok", detail)


def _end_verdict(run: Run, res: ReplayResult) -> Verdict:
    if res.divergence is not None:
        return Verdict("end", "not checked", "the replay did not reach the end")
    st = [pr.status for pr in res.state.procs]
    if LIVE in st:
        return Verdict("end", "violated", _ended(run, res))
    bad = _root_cause_problems(run, st, res.model)
    if bad:
        return Verdict("end", "violated", f"{_ended(run, res)}; {bad[0]}")
    return Verdict("end", "ok", _ended(run, res))


def _root_cause_problems(run: Run, st: list, model) -> list:
    """Rule (model/release.py): the root cause a release event names is an ending the
    model has. ``killed`` names a rank the model ends CRASHED; ``heartbeat_lost`` and the
    own-failure kinds (error, table_refused, deadline) a rank it ends ERROR or CRASHED
    (failed outside its table, or silent after an error exit), or ABORTED while one of its
    threads was committed to that own failure (``committed_exits``: a rank records its
    cause there, and the flag may release it before its exit row, runtime/node.py). A cause from outside the ranks (the launcher's deadline,
    a lost store) is never a normal ending. Releases without a structured cause (older
    traces) are not judged."""
    out = []
    for rt in run.ranks:
        for d in rt.releases:
            c = d.get("cause")
            if not isinstance(c, dict):
                continue
            o, kind = c.get("rank"), c.get("kind")
            if not isinstance(o, int) or not 0 <= o < len(st):
                out.append(f"rank {rt.rank}'s release names a cause outside the ranks "
                           f"({kind}: {c.get('detail', '')[:80]})")
                continue
            want = (CRASHED,) if kind == "killed" else (ERROR, CRASHED)
            if st[o] not in want and not (st[o] == ABORTED and kind == _committed_kind(
                    run.ranks[o], model)):
                out.append(f"rank {rt.rank}'s release names rank {o} ({kind}) as the root "
                           f"cause, but the model ends rank {o} {st[o]}")
    return out


def _committed_kind(rt, model) -> str | None:
    """The cause kind of the own failure one of this rank's threads was committed to when
    its trace ended (each thread's last recorded state; the replay has checked them)."""
    last = {}
    for e in rt.steps:
        last[e.t] = e.dst
    for t, pc in last.items():
        end = committed_exits(model.tables[rt.rank][t]).get(pc)
        if end is not None:
            return own_kind(end[0])
    return None


def _ended(run: Run, res: ReplayResult) -> str:
    if res.divergence is not None or res.state is None:
        return "diverged"
    m = res.model
    procs = res.state.procs
    if all(pr.status == OK for pr in procs):
        return "clean end (every rank exited ok)"
    if any(pr.status == LIVE for pr in procs):
        return "unfinished: " + ", ".join(f"{m.names[p]} {pr.status}"
                                          for p, pr in enumerate(procs))
    parts = []
    for p, pr in enumerate(procs):
        what = {OK: "exited ok", ERROR: "exited with an error", CRASHED: "crashed",
                ABORTED: "released by the abort flag"}.get(pr.status, pr.status)
        parts.append(f"{m.names[p]} {what}")
    return "released failure: " + ", ".join(parts)


FAILURES = (
    ("rank0_preflight", "preflight_fails", "FM-04 / FM-07: rank0 preflight failed before "
     "the header; ERROR terminal sent"),
    ("leader_reject", "validation_raises", "PP-FM-LEADER-THROW: the leader rejected an "
     "envelope; ERROR to the mesh and to rank0"),
    ("wrong_group", "wrong_group_caught", "PP-FM-WRONG-GROUP: a Phase-B collective "
     "requested on world_pg was refused; abort flag"),
    (None, "envelope_invalid", "envelope refused at the leader by the contract check; "
     "ERROR to the mesh and to rank0"),
    (None, "counts_differ", "FM-02: generator call counts differ across the mesh"),
    (None, "reject_result", "result rejected by rank0: the contract check failed or "
     "observed_generator_calls differs from the plan (FM-02)"),
    (None, "parity_mismatch", "FM-03: startup parity mismatch (a flag adds a collective)"),
)


def _launch_record(run: Run) -> dict:
    """The local launcher's RUN_DIR/launch.json (runtime/launch.py), {} if none (torchrun,
    an older run) or unreadable (sources.launch_record, which sources_agree names): it
    only names who killed a rank, it decides nothing."""
    from .sources import launch_record
    return launch_record(Path(run.path))[0]


def _signal_name(sig: int) -> str:
    import signal
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _native_reason(launch: dict, rank: int) -> str:
    """What the launcher kept of a rank that died of a signal of its own (launch.json
    `last_words`: its last stderr line, e.g. gloo's size check of a mismatched
    collective before its SIGABRT)."""
    words = launch.get("last_words")
    said = words.get(str(rank)) if isinstance(words, dict) else None
    return f" (rank{rank}.err: {said[:300]})" if isinstance(said, str) else ""


def failure_mode(run: Run, res: Optional[ReplayResult]) -> Optional[str]:
    """The failure-mode name (PROTOCOL.md taxonomy) if the run ended by a fault."""
    what = {f["what"] for rt in run.ranks for f in rt.faults}
    labels = {ev.label for rt in run.ranks for ev in rt.steps}
    names = []
    for fault, label, name in FAILURES:
        if (fault and fault in what) or label in labels:
            names.append(name)
    def who(r):
        return run.ranks[r].role + (f" (rank {r})" if run.ranks[r].role == "worker" else "")
    launch = _launch_record(run)
    at_deadline = set(launch.get("killed_at_deadline") or ())
    stop = launch.get("interrupted") if isinstance(launch.get("interrupted"), dict) else {}
    at_stop = set(stop.get("killed") or ())
    unstarted = set(stop.get("not_started") or ())
    orphans = [r for r in run.killed if r not in at_deadline | at_stop | unstarted]
    rcs = launch.get("returncodes") if isinstance(launch.get("returncodes"), list) else []
    died = {r: -rcs[r] for r in orphans if r < len(rcs) and type(rcs[r]) is int
            and rcs[r] < 0 and rcs[r] != -9}
    if set(orphans) - set(died):
        names.append("orphan: kill -9 of " + ", ".join(who(r) for r in orphans
                                                        if r not in died))
    for r, sig in died.items():   # not a kill -9: a signal of its own, e.g. an abort
        names.append(f"orphan: {who(r)} died of {_signal_name(sig)}"
                     + _native_reason(launch, r))
    if (at_stop | unstarted) & set(run.killed):
        what = []
        if at_stop:
            what.append("it killed " + ", ".join(who(r) for r in run.killed if r in at_stop))
        if unstarted:
            what.append("it never started " + ", ".join(who(r) for r in sorted(unstarted)))
        names.append(f"the launcher was stopped by {stop.get('signal', 'a signal')}: "
                     + "; ".join(what) + " (an interrupted run, not a fault of the ranks)")
    if at_deadline & set(run.killed):
        limit = launch.get("deadline_s")
        names.append("the launcher's hard deadline"
                     + (f" ({limit:g} s)" if type(limit) in (int, float) else "")
                     + " killed " + ", ".join(who(r) for r in run.killed if r in at_deadline)
                     + " (a run still going, or a hang: see each rank's last step)")
    for r in run.failed:
        c = run.ranks[r].releases[-1]["cause"]
        # the detail opens with the rank's ids; what was wrong comes after them
        names.append(f"failure outside the table of {who(r)} ({c.get('kind')}: "
                     f"{c.get('detail', '')[:400]})")
    errs = [r for r in range(len(run.ranks)) if run.ranks[r].ended == "error_exit"]
    if errs:
        names.append("untraced error exit of " + ", ".join(who(r) for r in errs) +
                     " (see rank*.err)")
    if not names and run.released:
        names.append("released by the watchdog")
    return "; ".join(names) if names else None


# ---------------------------------------------------------------------- text

def format_report(r: Report) -> str:
    verdict = "CONFORMS" if r.ok else ("DIVERGES" if r.divergence else "VIOLATES")
    lines = ([getattr(r, "headline", "")] if getattr(r, "headline", "") else []) + [
             f"conformance  {r.run_dir}",
             f"config       {r.config or '-'}",
             f"verdict      {verdict}",
             f"events       {r.events:,} step events (per rank {r.per_rank}), "
             f"{r.replayed:,} replayed in {r.steps:,} model steps",
             f"time         load {r.load_s:.3f} s, replay {r.replay_s:.3f} s "
             f"({r.events_per_s:,.0f} events/s); {r.cache_note or 'load cache: -'}",
             f"build        {r.build or '-'}",
             f"end          {r.ended}",
             f"failure mode {r.failure_mode or '-'}",
             f"outputs      {r.emitted} emitted",
             "invariants:"]
    for v in r.verdicts:
        lines.append(f"  {v.name:19} {v.status:12} {v.detail}")
    if r.warnings:
        lines.append("warnings:")
        lines += [f"  {w}" for w in r.warnings]
    if r.notes:
        lines.append("notes:")
        lines += [f"  {n}" for n in r.notes[:20]]
        if len(r.notes) > 20:
            lines.append(f"  ... {len(r.notes) - 20} more")
    if r.divergence:
        lines.append("")
        lines.append(r.divergence)
    return "\n".join(lines)


def report_json(r: Report) -> str:
    return json.dumps(r.as_dict(), indent=1)


def write_report(r: Report, out_dir) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "conformance.txt").write_text(format_report(r) + "\n")
    (out / "conformance.json").write_text(report_json(r) + "\n")
    return out
