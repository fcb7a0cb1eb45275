"""Trace generator: drive the model's semantics with a seeded scheduler and write the
per-rank traces the runtime would write for that execution.

Used by the conformance tests (valid traces of many configurations, the raw material of
the corruption tests) and by the 1,000,000-event benchmark. It writes exactly the event
schema of model/events.py, with the runtime's recording rules (conformance/views.py):
per-thread `i`, per-channel `chan_i`, per-group `gseq`, header views on the receiving
side, `fault` events before a fault row, `release` events when the abort flag releases a
rank, `start` events, and rank0's overlap measurements on every `decode_result`
(conformance/overlap.py documents them).

Scheduling. `policy="des"` (default) is a small discrete-event simulation: every thread
has a clock, a transition completes at max(its threads' clocks, the time it became
enabled) + its cost (Phase A/B/C from `Costs`, jittered), and the transition that
completes first fires. Like runtime/interp.py, a thread with a local row enabled takes
it before starting a communication, chosen by the scheduling policy the runtime uses
(model/policy.py: a firing fault or environment row, then an exit, then table order). This gives plausible overlap: with depth 2 the mesh computes chunk
k while rank0 builds k+1 and decodes k-1. `policy="random"` picks uniformly among the
enabled transitions (every interleaving the model allows, for replay robustness).

Faults are fired like the runtime's fault-injection switches: a fault row only at
`fault_at` (a chunk index; random if not given), a hard cut only at `hard_cut_at`;
crashes only when asked (`crash=(rank, after_n_events)`), and the watchdog only once
nothing else can move. Clocks are per rank with unrelated offsets (conformance must never
compare them across ranks), monotonic per rank.

`gloo_like=True` reproduces what a gloo run records on rank0's comms thread: a send and a
receive in flight together complete in either order, so rank0 may record sending
envelope k+1 before receiving the rest of result k, while the leader recorded sending
result k before receiving envelope k+1 (a cycle for a strict rendezvous reading; the
replayer lets a send, and its side's later lines, come after the other side's later
lines: conformance/replay.py `_may_lag`).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from lockstep.model.config import Config, config_to_dict
from lockstep.model.events import msg_to_json
from lockstep.model import policy as P
from lockstep.model.ops import GEN, Coll, Exit, Local, Recv, Send
from lockstep.model.semantics import LIVE, Model
from lockstep.model.tables import THREADS, shipped_rows, shipped_tables

from .views import local_subject, recorded_msg

# the injectable faults a fault row realises (its effect), from the shipped tables
FAULT_EFFECTS = frozenset(r.effect for rows in shipped_rows().values() for r in rows
                          if r.choice == "fault")


@dataclass
class Costs:
    phase_a_ms: float = 4.0      # build + preflight of one envelope (rank0 main)
    phase_b_ms: float = 8.0      # all generator calls of one chunk (mesh)
    phase_c_ms: float = 4.0      # decode + emit (rank0 main)
    p2p_ms: float = 0.15
    coll_ms: float = 0.08
    local_ms: float = 0.01
    jitter: float = 0.05


@dataclass
class SimResult:
    path: Path
    cfg: Config
    steps: int = 0               # model transitions
    events: int = 0              # step events written
    per_rank: list = field(default_factory=list)
    end: str = ""                # statuses at the end, e.g. "ok ok ok"
    crashed: Optional[int] = None
    fault_chunk: Optional[int] = None
    hard_cut_at: Optional[int] = None


class _Rank:
    def __init__(self, f, rank, role, threads, base_ns, keep=0):
        self.f, self.rank, self.role = f, rank, role
        self.i = [0] * len(threads)
        self.send = self.recv = 0
        self.base = base_ns
        self.last_t = 0
        self.count = 0
        self.buf = []            # rank0 with gloo_like: a short window of event dicts
        self.keep = keep

    def stamp(self, ms: float) -> int:
        t = self.base + int(ms * 1e6)
        if t <= self.last_t:
            t = self.last_t + 1
        self.last_t = t
        return t

    def put(self, ev: dict) -> None:
        if self.keep:
            self.buf.append(ev)
            if len(self.buf) > self.keep:
                self.f.write(_dump(self.buf.pop(0)))
        else:
            self.f.write(_dump(ev))

    def flush(self) -> None:
        for ev in self.buf:
            self.f.write(_dump(ev))
        self.buf = []


def _dump(ev: dict) -> str:
    return json.dumps(ev, separators=(",", ":"), sort_keys=True) + "\n"


def simulate(cfg: Config, out_dir, *, seed: int = 0, policy: str = "des",
             costs: Optional[Costs] = None, crash: Optional[tuple] = None,
             hard_cut_at: Optional[int] = None, fault_at: Optional[int] = None,
             gloo_like: bool = False, subjects: bool = True, lose_last: bool = False,
             cut_last_line: bool = False, max_steps: Optional[int] = None,
             send_after_decode: bool = False) -> SimResult:
    """Generate one run into `out_dir` (run.json + rank*.jsonl). Returns a summary.

    crash=(rank, n): kill -9 `rank` once it has written n step events (its trace then
    just stops; `lose_last` drops its last event as if written after the kill,
    `cut_last_line` cuts that line in half instead). send_after_decode=True schedules
    rank0 like the bug PROTOCOL.md describes (envelope k+1 built only once result k is
    decoded): allowed by the model, it only loses the overlap."""
    if policy not in ("des", "random"):
        raise ValueError(f"policy must be des or random, not {policy!r}")
    costs = costs or Costs()
    rng = random.Random(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rank*.jsonl"):
        old.unlink()
    gen_cfg = cfg.with_(faults=max(cfg.faults, 1)) if crash else cfg
    m = Model(gen_cfg, shipped_tables())
    if cfg.hard_cut and hard_cut_at is None:
        hard_cut_at = rng.randrange(1, max(2, cfg.chunks))
    faultable = cfg.inject & FAULT_EFFECTS
    if faultable and fault_at is None:
        fault_at = rng.randrange(0, max(1, cfg.chunks))
    meta = {"config": config_to_dict(cfg), "created": 0.0,
            "opts": {"simulated": True, "seed": seed, "policy": policy,
                     "hard_cut_at": hard_cut_at, "gloo_like": gloo_like,
                     "fault": ({"name": sorted(faultable)[0], "at_chunk": fault_at}
                               if faultable else None),
                     "costs": {"phase_a_ms": costs.phase_a_ms,
                               "phase_b_ms": costs.phase_b_ms,
                               "phase_c_ms": costs.phase_c_ms}}}
    (out / "run.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    res = SimResult(out, cfg, crashed=crash[0] if crash else None, fault_chunk=fault_at,
                    hard_cut_at=hard_cut_at)
    ranks = []
    for r, role in enumerate(m.roles):
        f = open(out / f"rank{r}.jsonl", "w", buffering=1 << 16)
        rk = _Rank(f, r, role, THREADS[role], base_ns=rng.randrange(10**12, 10**14),
                   keep=6 if (gloo_like and r == 0) else 0)
        ranks.append(rk)
        rk.put({"ev": "start", "rank": r, "role": role, "pid": 40000 + r,
                "world": m.n, "backend": "sim", "t_ns": rk.stamp(0.0)})
    sim = _Sim(m, cfg, costs, rng, policy, ranks, hard_cut_at, fault_at, faultable,
               gloo_like, subjects)
    sim.send_after_decode = send_after_decode
    try:
        sim.run(crash, max_steps)
    finally:
        for rk in ranks:
            rk.flush()
            rk.f.close()
    if crash and (lose_last or cut_last_line):
        _damage_tail(out / f"rank{crash[0]}.jsonl", cut=cut_last_line)
    res.steps, res.events = sim.steps, sum(rk.count for rk in ranks)
    res.per_rank = [rk.count for rk in ranks]
    res.end = " ".join(pr.status for pr in sim.s.procs)
    return res


def _damage_tail(path: Path, cut: bool) -> None:
    lines = path.read_text().split("\n")[:-1]
    for k in range(len(lines) - 1, -1, -1):
        if '"ev":"step"' in lines[k]:
            break
    else:
        return
    if k != len(lines) - 1:
        return                    # only the very last line can be lost or cut
    if cut:
        lines[k] = lines[k][: len(lines[k]) // 2]
        path.write_text("\n".join(lines))
    else:
        path.write_text("\n".join(lines[:k]) + ("\n" if k else ""))


class _Sim:
    def __init__(self, m, cfg, costs, rng, policy, ranks, hard_cut_at, fault_at, faultable,
                 gloo_like, subjects):
        self.m, self.cfg, self.costs, self.rng, self.mode = m, cfg, costs, rng, policy
        self.ranks, self.hard_cut_at, self.fault_at = ranks, hard_cut_at, fault_at
        self.faultable, self.gloo_like, self.subjects = faultable, gloo_like, subjects
        self.s = m.initial_state()
        self.steps = 0
        self.now = 0.0
        self.ready = {}          # (p, t) -> ms when the thread is free
        self.since = {}          # transition key -> (ms first enabled, jitter factor)
        self.times = {}          # call_id -> rank0 times (tA0, tA1, tRecv) in ms
        self.bstats = {}         # call_id -> (t_b_ms, t_mesh_idle_ms)
        self.b_start = {}        # leader: call_id -> Phase B start (ms)
        self.last_b_end = None
        fault = ({"name": sorted(faultable)[0], "at_chunk": fault_at} if faultable
                 else None)
        # the runtime's scheduling policy (model/policy.py); `mode` is des or random
        self.sched = P.Policy(fault, () if hard_cut_at is None else (hard_cut_at,),
                               heartbeat_ms=0.0, chunks=cfg.chunks)
        self.send_after_decode = False

    # ------------------------------------------------------------------ policy
    def _allowed(self, tr) -> bool:
        k = tr.kind
        if k in ("violation", "crash"):
            return False
        if k in ("watchdog", "abort"):
            return True
        for p, t, row in tr.parts:
            if row.choice and not P.fires(row, self.s.procs[p].v, p, self.sched):
                return False
            if row.effect == "phase_a" and self.send_after_decode:
                v = self.s.procs[p].v
                if v.inflight or v.decode_q:
                    return False
        return True

    def _cost(self, tr) -> float:
        c = self.costs
        if tr.kind in ("watchdog", "abort"):
            return 0.5
        total = 0.0
        for p, t, row in tr.parts:
            op = row.op
            if row.effect in ("phase_a", "rank0_preflight"):    # Phase A (+ preflight)
                x = c.phase_a_ms
            elif row.effect == "phase_c":
                x = c.phase_c_ms
            elif type(op) is Coll and op.kind == GEN:
                x = c.phase_b_ms / max(1, self.cfg.calls)
            elif type(op) is Coll:
                x = c.coll_ms
            elif type(op) in (Send, Recv):
                x = c.p2p_ms
            else:
                x = c.local_ms
            total = max(total, x)
        return total

    def _key(self, tr):
        return (tr.kind, tuple((p, t, row.label, row.dst) for p, t, row in tr.parts),
                tr.msg if tr.kind != "coll" else None)

    def _choose(self, cands):
        if self.mode == "random":
            tr = self.rng.choice(cands)
            return tr, self._timing(tr)[0]
        # a thread with a local row enabled takes the best local first (runtime order)
        best_local = {}
        for tr in cands:
            if tr.kind in ("local", "exit"):
                p, t, row = tr.parts[0]
                pr = P.local_key(row, self.m.tables[p][t][row.src].index(row))
                cur = best_local.get((p, t))
                if cur is None or pr < cur[0]:
                    best_local[(p, t)] = (pr, tr)
        forced = [tr for (pr, tr) in best_local.values() if pr[0] == 0]
        if forced:
            tr = forced[0]
            return tr, self._timing(tr)[0]
        pick, best = None, None
        for tr in cands:
            if tr.kind in ("local", "exit"):
                p, t, _ = tr.parts[0]
                if best_local[(p, t)][1] is not tr:
                    continue
            elif tr.kind not in ("watchdog", "abort") and any(
                    (p, t) in best_local for p, t, _ in tr.parts):
                continue
            done, _ = self._timing(tr)
            key = (done, self.rng.random())
            if best is None or key < best:
                best, pick = key, tr
        return pick, best[0]

    def _timing(self, tr):
        key = self._key(tr)
        got = self.since.get(key)
        if got is None:
            got = (self.now, 1.0 + self.costs.jitter * (2 * self.rng.random() - 1))
            self.since[key] = got
        start = got[0]
        for p, t, _ in tr.parts:
            start = max(start, self.ready.get((p, t), 0.0))
        return max(start + self._cost(tr) * got[1], self.now), start

    # ------------------------------------------------------------------ run
    def run(self, crash, max_steps):
        m = self.m
        while max_steps is None or self.steps < max_steps:
            s = self.s
            if crash and s.procs[crash[0]].status == LIVE and \
                    self.ranks[crash[0]].count >= crash[1]:
                self._crash(crash[0])
                continue
            trs = m.enabled(s)
            cands = [tr for tr in trs if self._allowed(tr)]
            if any(tr.kind != "watchdog" for tr in cands):
                cands = [tr for tr in cands if tr.kind != "watchdog"]
            if not cands:
                bad = [tr for tr in trs if tr.kind == "violation"]
                if bad:
                    raise RuntimeError("the model reached a violation while simulating: "
                                       + m.describe(s, bad[0]))
                if any(pr.status == LIVE for pr in s.procs):
                    raise RuntimeError("simulation stuck with live processes: " +
                                       repr([(pr.status, pr.pcs) for pr in s.procs]))
                return
            keys = {self._key(tr) for tr in cands}
            self.since = {k: v for k, v in self.since.items() if k in keys}
            tr, done = self._choose(cands)
            self._fire(tr, done)

    def _crash(self, p):
        from lockstep.model.semantics import Tr
        self.s = self.m.step(self.s, Tr("crash", ((p, None, None),)))
        self.steps += 1

    def _fire(self, tr, done):
        m, s = self.m, self.s
        _, start = self._timing(tr)
        self.now = done
        self.since.pop(self._key(tr), None)
        s2 = m.step(s, tr)
        if tr.kind == "abort":
            for p, pr in enumerate(s.procs):
                if pr.status == LIVE:
                    rk = self.ranks[p]
                    rk.put({"ev": "release", "rank": p, "role": rk.role,
                            "reason": f"abort flag: {tr.info}", "t_ns": rk.stamp(done)})
        elif tr.kind != "watchdog":
            self._write(tr, s, s2, start, done)
        self.s = s2
        self.steps += 1

    def _write(self, tr, s, s2, start, done):
        m = self.m
        kind = tr.kind
        for p, t, row in tr.parts:
            rk = self.ranks[p]
            op = row.op
            ready = self.ready.get((p, t), 0.0)
            self.ready[(p, t)] = done
            if "fault" in row.tags:
                rk.put({"ev": "fault", "rank": p, "role": rk.role,
                        "what": row.effect,
                        "t_ns": rk.stamp(max(start, ready))})
            ev = {"ev": "step", "rank": p, "role": rk.role, "thread": THREADS[rk.role][t],
                  "i": rk.i[t], "src": row.src, "label": row.label, "dst": row.dst,
                  "op": _OPCLASS[type(op)]}
            rk.i[t] += 1
            msg = None
            if type(op) is Send:
                ev["peer"], ev["chan_i"] = op.peer, rk.send
                rk.send += 1
                msg = tr.msg
            elif type(op) is Recv:
                ev["peer"], ev["chan_i"] = op.peer, rk.recv
                rk.recv += 1
                msg = recorded_msg(_recv_kind(m, s, tr, p), False, tr.msg)
            elif type(op) is Coll:
                ev["group"], ev["gseq"] = op.group, s.seq[0 if op.group == "world_pg"
                                                          else 1]
                if op.op == "broadcast":
                    msg = recorded_msg(op.kind, False, tr.msg)
                elif op.op == "all_gather":
                    msg = tr.msg
                if op.kind == "parity":
                    ev["meas"] = {"digests": [0x2E0F1C3B5A7D9 + int(bool(x))
                                              for x in tr.msg]}
            elif p == 0 and self.subjects and kind == "local":
                msg = local_subject(s.procs[0].v, s2.procs[0].v)
            if msg is not None:
                ev["msg"] = msg_to_json(msg)
            self._measure(p, row, s, s2, ev, max(start, ready), done)
            ev["t_ns"] = rk.stamp(done)
            ev["dur_ns"] = max(0, int((done - max(ready, 0.0)) * 1e6)) if type(op) in (
                Send, Recv, Coll) else max(0, int((done - max(start, ready)) * 1e6))
            rk.count += 1
            self._emit(rk, ev)

    def _measure(self, p, row, s, s2, ev, t0, done):
        label = row.label
        if p == 0:
            v = s.procs[0].v
            if label == "build_envelope":
                self.times[v.next_call] = [t0, done, None]
            elif label == "recv_result_payload":
                tm = self.times.get(s2.procs[0].v.res_in.call_id)
                if tm is not None:
                    tm[2] = done
            elif label == "decode_result":
                head = v.decode_q[0]
                tm = self.times.pop(head.call_id, [t0, t0, t0])
                b = self.bstats.pop(head.call_id, (0.0, 0.0))
                rk = self.ranks[0]
                ev["meas"] = {"tA0_ns": rk.base + int(tm[0] * 1e6),
                              "tA1_ns": rk.base + int(tm[1] * 1e6),
                              "tRecv_ns": rk.base + int((tm[2] or t0) * 1e6),
                              "tEmit_ns": rk.base + int(done * 1e6),
                              "t_b_ms": round(b[0], 3), "t_mesh_idle_ms": round(b[1], 3),
                              "q_in": v.inflight, "q_out": len(v.decode_q)}
        elif p == 1:
            v = s.procs[1].v
            if row.label in ("counts_agree", "counts_differ"):
                self.b_start[v.env.call_id] = t0
            elif "phase_b_done" in row.tags:
                call = v.env.call_id
                b0 = self.b_start.pop(call, t0)
                idle = 0.0 if self.last_b_end is None else max(0.0, b0 - self.last_b_end)
                self.last_b_end = done
                self.bstats[call] = (done - b0, idle)

    def _emit(self, rk, ev):
        """rank0 under gloo_like: a send completing right after a receive of the comms
        thread (both in flight) may be recorded first: swap the two, renumber them and
        rewrite the pair states as the runtime would have recorded them."""
        if self.gloo_like and ev["thread"] == "comms" and ev["op"] == "send" and rk.buf:
            prev = rk.buf[-1]
            if (prev.get("ev") == "step" and prev["thread"] == "comms"
                    and prev["op"] == "recv" and prev["dst"] == ev["src"]
                    and "/" in prev["src"] and "/" in ev["src"] and "/" in ev["dst"]
                    and self.rng.random() < 0.7):
                a, b = prev["src"].split("/")
                a1, b2 = prev["dst"].split("/")
                a2, b3 = ev["dst"].split("/")
                if a1 == a and b3 == b2:
                    rk.buf.pop()
                    ev["src"], ev["dst"] = f"{a}/{b}", f"{a2}/{b}"
                    prev["src"], prev["dst"] = f"{a2}/{b}", f"{a2}/{b2}"
                    ev["i"], prev["i"] = prev["i"], ev["i"]
                    ev["t_ns"], prev["t_ns"] = prev["t_ns"], ev["t_ns"]
                    rk.put(ev)
                    rk.put(prev)
                    return
        rk.put(ev)


def _recv_kind(m, s, tr, p):
    for q, t, row in tr.parts:
        if type(row.op) is Send:
            return row.op.kind
    # buffered: the kind of the message at the head of the channel
    row = tr.parts[0][2]
    return s.chans[m.chan_index[(m.index[row.op.peer], p)]][0][0]


_OPCLASS = {Send: "send", Recv: "recv", Coll: "coll", Exit: "exit", Local: "local"}
