"""The break-it suite: every failure mode as a real multi-process job.

Per case: a fault-injection switch (parity-checked like any other flag: the fault dict
is part of the parity digest), the model mutation or fault that predicts it, and an
expected signature: which ranks exit how, what each exit line must say, what must never
be emitted. The runner measures the time from the fault to the last rank's exit
(local processes share CLOCK_MONOTONIC), checks no child is left, and runs the same
fault on plain torch.distributed (runtime/baseline.py) side by side.
"""
from __future__ import annotations

import json
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from lockstep.model.config import Config

from lockstep.runtime.launch import kill_rank, spawn_local
from lockstep.runtime.run import run_local


@dataclass
class Case:
    name: str
    failure_mode: str
    model: str                     # the mutation / injected fault that predicts it
    cfg: Config
    opts: dict = field(default_factory=dict)
    kill: str = ""                 # "rank0" | "leader" | "worker": kill -9 mid-loop
    expect: dict = field(default_factory=dict)   # rank -> regex the exit line must match
    clean: bool = False            # the case must end with every rank exiting 0
    baseline: str = ""             # fault name for the stock baseline, "" = none


def cases() -> list:
    m3 = dict(mesh=3, chunks=8)
    # Every rank's line names the ONE root cause (model/release.py: root=RANK/ROLE/KIND),
    # whichever path released it (the abort flag, an echo of a closed pair, a terminal
    # ERROR message): no "either message" acceptance.
    def root(tag):
        return r" root=" + re.escape(tag) + r" "

    def every(n, tag, extra=None):
        out = {r: root(tag) for r in range(n)}
        out.update({r: root(tag) + ".*" + pat for r, pat in (extra or {}).items()})
        return out
    slow = {"costs": {"phase_b_ms": 2.0, "phase_c_ms": 1.0}}

    def injected(name, failure_mode, model, fault, at_chunk, expect):
        """A case whose fault switch, model fault and stock baseline are one name."""
        return Case(name, failure_mode, model, Config(**m3, inject=frozenset({fault})),
                    {"fault": {"name": fault, "at_chunk": at_chunk}}, expect=expect,
                    baseline=fault)

    return [
        injected("wrong_group", "PP-FM-WRONG-GROUP", "phase_b_on_world", "wrong_group", 2,
                 every(4, "3/worker/table_refused", {3: r"all_reduce requested on world_pg"})),
        injected("leader_throw", "PP-FM-LEADER-THROW", "leader_throw_no_terminal", "leader_reject", 2,
                 every(4, "1/leader/error", {1: r"envelope rejected"})),
        injected("rank0_preflight", "FM-04 / FM-07", "header_before_preflight", "rank0_preflight", 3,
                 every(4, "0/rank0/error", {0: r"rank0 failed"})),
        injected("call_count", "FM-02", "extra_generator_call", "count_mismatch", 0,
                 every(4, "3/worker/error", {1: r"call counts differ"})),
        Case("stale_epoch", "FM-10", "no_epoch_filter",
             Config(mesh=3, chunks=12, hard_cut=True), {"hard_cut_at": 5, **slow},
             clean=True),
        Case("cond_collective", "FM-03", "conditional_collective_no_parity",
             Config(**m3, inject=frozenset({"cond_flag"})),
             {"fault": {"name": "cond_flag", "at_chunk": 0}},
             expect=every(4, "3/worker/error", {r: r"parity mismatch \(key=cond_flag.*ranks \[3\]"
                                                 for r in range(4)}),
             baseline="cond_flag"),
        Case("kill_rank0", "orphan", "no_watchdog (faults=1)", Config(mesh=3, chunks=400),
             slow, kill="rank0", expect={r: root("0/rank0/killed") for r in (1, 2, 3)}),
        Case("kill_leader", "orphan", "no_watchdog (faults=1)", Config(mesh=3, chunks=400),
             slow, kill="leader", expect={r: root("1/leader/killed") for r in (0, 2, 3)}),
        Case("kill_worker", "orphan", "no_watchdog (faults=1)", Config(mesh=3, chunks=400),
             slow, kill="worker", expect={r: root("3/worker/killed") for r in (0, 1, 2)}),
        Case("shutdown_in_flight", "drain on SHUTDOWN", "drop_results_after_shutdown",
             Config(mesh=3, chunks=10, d_in=2, d_out=2), slow, clean=True),
    ]


def _victim(case, cfg) -> int:
    return {"rank0": 0, "leader": 1, "worker": cfg.mesh}[case.kill]


def _kill_later(case, cfg, run_dir):
    victim = _victim(case, cfg)
    wait_steps = random.Random(case.name).randint(20, 60)

    def on_start(run):
        path = Path(run_dir) / f"rank{victim}.jsonl"
        end = time.monotonic() + 60
        while time.monotonic() < end:
            try:
                if sum(1 for _ in open(path)) >= wait_steps:
                    break
            except OSError:
                pass
            time.sleep(0.01)
        kill_rank(run, victim)
    return on_start


def _fault_time(run_dir, res) -> float | None:
    if res.faults:
        return res.faults[0][2]
    from lockstep.conformance.load import TraceError, load_run
    try:
        run = load_run(run_dir)
    except TraceError:
        return None
    times = [d["t_ns"] for rt in run.ranks for d in rt.faults if "t_ns" in d] + \
        [ev.t_ns for rt in run.ranks for ev in rt.steps
         if ev.label in ("parity_mismatch", "counts_differ")]
    return min(times) / 1e9 if times else None


def run_case(case: Case, out: Path, baseline: bool = True, deadline_s: float = 60.0) -> dict:
    run_dir = out / case.name
    on_start = _kill_later(case, case.cfg, run_dir) if case.kill else None
    res = run_local(case.cfg, case.opts, run_dir, deadline_s=deadline_s, on_start=on_start)
    lines = {r.rank: (r.reason_line() or "") for r in res.ranks}
    problems = []
    if res.deadline_hit:
        problems.append(f"ranks {res.alive_at_deadline} still alive at the deadline")
    for rank, pattern in case.expect.items():
        if not re.search(pattern, lines.get(rank, "")):
            problems.append(f"rank {rank} line does not match /{pattern}/: {lines.get(rank)!r}")
    if case.clean and not res.ok:
        problems.append("expected every rank to exit 0: " + res.summary())
    if case.kill:
        victim = _victim(case, case.cfg)
        survivors = [r for r in range(case.cfg.world) if r != victim]
        for r in survivors:
            if not lines.get(r, "").startswith("lockstep: "):
                problems.append(f"survivor {r} left no one-line reason")
    outputs = _outputs(run_dir)
    stale = [o for o in outputs if case.cfg.hard_cut and o[0] >= case.opts.get(
        "hard_cut_at", 10**9) and o[1] == 0]
    if stale:
        problems.append(f"stale-epoch outputs emitted: {stale}")
    t_fault = _fault_time(run_dir, res)
    t_all = res.all_exited_after(t_fault) if t_fault is not None else None
    row = {"case": case.name, "failure_mode": case.failure_mode, "model": case.model,
           "model_verdict": model_verdict(case.model.split()[0]),
           "signature": not problems, "problems": problems,
           "fault_to_all_exited_s": None if t_all is None else round(t_all, 3),
           "children_left": res.alive_at_deadline, "run_dir": str(run_dir),
           **_conformance(run_dir)}
    if baseline and case.baseline:
        row["baseline_s"], row["baseline_note"] = run_baseline(case, out)
    return row


def model_verdict(mutation: str) -> str:
    """What the checker finds for the unmitigated variant of this failure mode."""
    from lockstep.model.check import check
    from lockstep.model.mutations import mutation_config
    return check(mutation_config(Config(mesh=2, chunks=2), mutation)).verdict


def _outputs(run_dir):
    try:
        return json.loads((Path(run_dir) / "outputs.json").read_text())
    except (OSError, ValueError):
        return []


def _conformance(run_dir) -> dict:
    """{"conforms": True / False / None (no checker) / "checker error: ...",
    "divergence": the first divergence's text when it does not conform}: a failed case
    says where its trace left the model, not only that it did."""
    try:
        from lockstep.conformance.report import conform
    except ImportError:
        return {"conforms": None, "divergence": None}
    try:
        rep = conform(run_dir)
    except Exception as e:  # noqa: BLE001 - a checker crash is reported, not hidden
        return {"conforms": f"checker error: {type(e).__name__}: {e}", "divergence": None}
    return {"conforms": bool(rep.ok), "divergence": None if rep.ok else rep.divergence}


def run_baseline(case: Case, out: Path, timeout_s: float = 5.0, deadline_s: float = 30.0):
    from lockstep.runtime.baseline import fault_time
    run_dir = out / f"{case.name}.baseline"
    args = {"fault": case.baseline, "at": 2, "chunks": 20, "timeout_s": timeout_s}
    res = spawn_local(case.cfg.world, "lockstep.runtime.baseline:stock_rank", args,
                      deadline_s=deadline_s, run_dir=run_dir)
    t0 = fault_time(res)
    if t0 is None:
        return None, "fault never fired"
    t = res.all_exited_after(t0)
    if t is None:
        return None, f"hung: ranks {res.alive_at_deadline} killed at the {deadline_s:.0f} s deadline"
    return round(t, 3), f"backend timeout {timeout_s:.0f} s"


def breakit(out: Path, baseline: bool = True, only=None) -> list:
    out.mkdir(parents=True, exist_ok=True)
    return [run_case(c, out, baseline) for c in cases() if not only or c.name in only]


ALL_EXITED_TARGET_S = 1.0   # fault -> every rank exited (docs/breakit.md)


def shortfalls(row) -> list:
    """Why a case's row fails the suite (`lockstep breakit` exits 3), one reason each."""
    out = []
    if not row["signature"]:
        out.append("signature MISMATCH")
    if row["conforms"] not in (True, None):
        out.append(f"conforms: {row['conforms']}")
    t = row["fault_to_all_exited_s"]
    if t is not None and t >= ALL_EXITED_TARGET_S:
        out.append(f"fault->all exited {t:.3f} s, target < {ALL_EXITED_TARGET_S:g} s")
    return out


def format_table(rows) -> str:
    head = (f"{'case':20} {'failure mode':18} {'model (mutation: verdict)':52} {'signature':9} "
            f"{'fault->all exited':>17} {'stock baseline':>22} {'conforms':>8}")
    out = [head, "-" * len(head)]
    for r in rows:
        t = "-" if r["fault_to_all_exited_s"] is None else f"{r['fault_to_all_exited_s']:.3f} s"
        b = r.get("baseline_s")
        bt = "-" if "baseline_note" not in r else (
            f"{b:.3f} s" if b is not None else "HUNG (killed)")
        conf = {True: "yes", False: "NO", None: "n/a"}.get(r["conforms"], str(r["conforms"]))
        model = f"{r['model'].split()[0]}: {r['model_verdict']}"
        out.append(f"{r['case']:20} {r['failure_mode']:18} {model:52} "
                   f"{'ok' if r['signature'] else 'MISMATCH':9} {t:>17} {bt:>22} {conf:>8}")
        for p in r["problems"]:
            out.append(f"    ! {p}")
        if r.get("divergence"):
            out.append(f"    ! trace diverges: {r['divergence']}")
    missed = [f"{r['case']} ({'; '.join(shortfalls(r))})" for r in rows if shortfalls(r)]
    if missed:
        out.append(f"\n{len(missed)} of {len(rows)} cases failed: " + ", ".join(missed))
    return "\n".join(out)
