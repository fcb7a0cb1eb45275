"""Chaos: real gloo jobs, kill -9 of a random rank at a random moment mid-run.

    python -m lockstep.chaos --trials 50 [--seed 11] [--mesh 3] [--out runs/chaos]
                             [--md docs/chaos.md]

It lives in ``lockstep/`` (where the parts are tied together), not in ``runtime/``:
it judges the runtime's traces with the conformance checker, and ``runtime/`` must not
import ``conformance/``.

Per trial (seeded: trial i uses ``random.Random(f"{seed}:{i}")``): pick a victim rank and a
moment (the victim's trace has written K events, then a jitter of up to 20 ms), run
``lockstep run`` on the embedded launcher (runtime/run.py, hard deadline), ``kill -9`` the
victim's process group from the parent, and report:

  * kill -> all survivors exited: the parent's monotonic clock, from the kill to the last
    survivor's reaped exit;
  * children left: ranks still alive at the deadline plus any process whose command line
    still names the trial's run directory after the launcher returned;
  * named: every survivor's one exit line names the killed rank AND its role as the root
    cause (``root=R/ROLE/killed``, model/release.py);
  * conforms: ``lockstep conform`` on the run directory (conformance/report.py).
"""
from __future__ import annotations

import argparse
import os
import random
import re
import sys
import time
from pathlib import Path

from lockstep.model.config import Config
from lockstep.model.release import role_of
from lockstep.runtime.launch import kill_rank
from lockstep.runtime.run import run_local

SLOW = {"costs": {"phase_b_ms": 2.0, "phase_c_ms": 1.0}}


def _leftovers(run_dir: Path) -> list[int]:
    """Pids of live processes whose command line names the run directory."""
    key = str(run_dir.resolve()).encode()
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                if key in f.read():
                    out.append(int(d))
        except OSError:
            pass
    return out


def trial(i: int, seed: int, out: Path, mesh: int = 3, chunks: int = 400,
          deadline_s: float = 60.0) -> dict:
    rng = random.Random(f"{seed}:{i}")
    world = mesh + 1
    victim = rng.randrange(world)
    steps = rng.randint(1, 150)
    jitter = rng.uniform(0.0, 0.02)
    run_dir = out / f"trial{i:03d}"
    cfg = Config(mesh=mesh, chunks=chunks)

    def on_start(run):
        path = run_dir / f"rank{victim}.jsonl"
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            try:
                with open(path, "rb") as f:
                    if sum(1 for _ in f) >= steps:
                        break
            except OSError:
                pass
            time.sleep(0.005)
        time.sleep(jitter)
        kill_rank(run, victim)

    res = run_local(cfg, SLOW, run_dir, deadline_s=deadline_s, on_start=on_start)
    survivors = [r for r in range(world) if r != victim]
    t_kill = res.faults[0][2] if res.faults else None
    dt = res.all_exited_after(t_kill, survivors) if t_kill is not None else None
    role = role_of(victim)
    want = f" root={victim}/{role}/killed "
    lines = {r: (res.ranks[r].reason_line() or "") for r in survivors}
    unnamed = [r for r in survivors if want not in lines[r]]
    left = list(res.alive_at_deadline) + _leftovers(run_dir)
    victim_killed = res.ranks[victim].returncode == -9
    try:
        from lockstep.conformance.report import conform
        rep = conform(run_dir)
        conforms, why = bool(rep.ok), "" if rep.ok else _first_problem(rep)
    except Exception as e:  # noqa: BLE001 - a checker crash is reported, not hidden
        conforms, why = False, f"checker error: {type(e).__name__}: {e}"
    return {"trial": i, "victim": victim, "role": role, "at_events": steps,
            "victim_killed": victim_killed,
            "kill_to_all_exited_s": None if dt is None else round(dt, 3),
            "children_left": left, "named": not unnamed,
            "unnamed": {r: lines[r] for r in unnamed}, "conforms": conforms, "why": why,
            "run_dir": str(run_dir)}


def _first_problem(rep) -> str:
    from lockstep.conformance.report import format_report
    text = format_report(rep)
    bad = [ln.strip() for ln in text.splitlines()
           if re.search(r"FAIL|diverge|violation|NO\b", ln, re.I)]
    return (bad[0] if bad else text.strip().splitlines()[-1])[:200]


def table(rows: list[dict]) -> str:
    head = ("| trial | killed | at event | kill -> all exited | children left | "
            "every survivor names it | conforms |")
    out = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        t = "-" if r["kill_to_all_exited_s"] is None else f"{r['kill_to_all_exited_s']:.3f} s"
        out.append(f"| {r['trial']} | rank {r['victim']} ({r['role']})"
                   f"{'' if r['victim_killed'] else ' (already gone)'} | {r['at_events']} | "
                   f"{t} | {len(r['children_left'])} | {'yes' if r['named'] else 'NO'} | "
                   f"{'yes' if r['conforms'] else 'NO: ' + r['why']} |")
    return "\n".join(out)


def summary(rows: list[dict], budget_s: float = 1.0) -> str:
    n = len(rows)
    times = [r["kill_to_all_exited_s"] for r in rows if r["kill_to_all_exited_s"] is not None]
    fast = sum(1 for t in times if t <= budget_s)
    return (f"{n} trials: survivors all exited within {budget_s:g} s of the kill in "
            f"{fast}/{n} (max {max(times) if times else float('nan'):.3f} s, median "
            f"{sorted(times)[len(times) // 2] if times else float('nan'):.3f} s); children "
            f"left in {sum(1 for r in rows if r['children_left'])}/{n}; every survivor "
            f"named the killed rank and role in {sum(r['named'] for r in rows)}/{n}; "
            f"traces conform in {sum(bool(r['conforms']) for r in rows)}/{n}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lockstep.chaos", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20, help="runs, one kill -9 each, count (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=11, help="seed of the victims and moments (default: %(default)s)")
    ap.add_argument("--mesh", type=int, default=3, help="mesh ranks incl. the leader (default: %(default)s)")
    ap.add_argument("--chunks", type=int, default=400, help="INFER chunks per run (default: %(default)s)")
    ap.add_argument("--out", default="runs/chaos", help="directory for the runs (default: %(default)s)")
    ap.add_argument("--md", help="also write the table as markdown to this file (default: none)")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(a.trials):
        r = trial(i, a.seed, out, mesh=a.mesh, chunks=a.chunks)
        rows.append(r)
        t = r["kill_to_all_exited_s"]
        print(f"trial {i:3d}: kill -9 rank {r['victim']} ({r['role']}) at event "
              f"{r['at_events']:3d}: all survivors exited "
              f"{'-' if t is None else f'{t:.3f} s'} after, children left "
              f"{len(r['children_left'])}, named {'yes' if r['named'] else 'NO'}, conforms "
              f"{'yes' if r['conforms'] else 'NO (' + r['why'] + ')'}", flush=True)
        for rank, line in r["unnamed"].items():
            print(f"    rank {rank}: {line}", flush=True)
    s = summary(rows)
    print(s)
    if a.md:
        cmd = (f"python -m lockstep.chaos --trials {a.trials} --seed {a.seed} "
               f"--mesh {a.mesh} --chunks {a.chunks}")
        Path(a.md).write_text(
            "# Chaos: kill -9 of a random rank at a random moment\n\n"
            f"Command: `{cmd} --md docs/chaos.md` (CPU/gloo, the 2-core machine, "
            f"{time.strftime('%Y-%m-%d')}). The driver is `lockstep/chaos.py`; what each "
            "column means is in its docstring.\n\n"
            f"**Summary.** {s}.\n\n" + table(rows) + "\n")
    ok = all(r["named"] and not r["children_left"] and r["conforms"] and
             r["kill_to_all_exited_s"] is not None and r["kill_to_all_exited_s"] <= 1.0
             for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    from lockstep.cli import stoppable
    sys.exit(stoppable("python -m lockstep.chaos", main))
