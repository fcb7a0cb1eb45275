"""Model-checking benchmark: `python -m lockstep.model.bench [--big] [--workers N]`.

Prints, in one run, the verdict, distinct states, transitions, wall and CPU time,
states/s and peak memory of each reduction switched on and off side by side:
  - the full PP1 configuration of TARGETS.md (leader + 3 workers, D_in = D_out = 2,
    3 chunks with a hard cut, any single crash fault): symmetry x partial-order
    reduction (which includes the abort-chain compression and, with the watchdog on,
    leaves every crash out), four rows, the reduction at process granularity (por
    "proc": a process's threads always together), and the reduction with every crash
    expanded (por "crash", the default before crashes were left out);
  - full PP1 at mesh 8: with and without the partial-order reduction (symmetry on);
  - with --big, the raised target of TARGETS.md (mesh 4, depth 3, 5 chunks, a hard cut,
    2 crashes, 1 NOOP, 2 steps), with the reduction by threads and by processes (and,
    with --unreduced, with every crash expanded and without the reduction);
  - with --workers N, the full PP1 configuration through the multiprocess search.
Record the output in docs/model-check.md with the machine it ran on. CPU time is
printed beside wall time because the benchmark machine is shared: CPU seconds are what
the search itself cost.
"""
from __future__ import annotations

import argparse
import gc
import os
import resource
import time

from lockstep import accel

from .check import check
from .config import Config
from .reduction import Ample

FULL_PP1 = Config(mesh=4, d_in=2, d_out=2, chunks=3, hard_cut=True, faults=1)
PP1_MESH8 = FULL_PP1.with_(mesh=8)
BIG = Config(mesh=4, d_in=3, d_out=3, chunks=5, hard_cut=True, faults=2, noops=1,
             steps=2)


def _row(label: str, cfg: Config, threads: bool = True, crashes: bool = False,
         **kw) -> bool:
    """One search; `threads=False`: the partial-order reduction at process granularity
    (a process's threads always together), printed as por "proc"; `crashes=True`:
    the reduction by threads with every crash expanded (the watchdog on), "crash"."""
    gc.collect()
    c0 = time.process_time() + _children_cpu()
    Ample.split_threads, Ample.leave_out_crashes = threads, not crashes
    try:
        r = check(cfg, **kw)
    finally:
        Ample.split_threads, Ample.leave_out_crashes = True, True
    cpu = time.process_time() + _children_cpu() - c0
    por = ("crash" if crashes else "on" if threads else "proc") if r.por else "off"
    print(f"{label:12} {'on' if r.symmetry else 'off':8} {por:5} "
          f"{r.workers:>3} {r.verdict:8} {r.states:>10,} {r.transitions:>12,} "
          f"{r.seconds:>8.2f}s {cpu:>7.2f}s {r.states / max(cpu, 1e-9):>10,.0f} "
          f"{r.peak_mb:>8.0f}", flush=True)
    return r.verdict == "clean"


def _children_cpu() -> float:
    """CPU seconds of finished child processes (the multiprocess search's workers)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lockstep.model.bench")
    ap.add_argument("--big", action="store_true",
                    help="also the mesh-4 depth-3 5-chunk 2-crash configuration "
                         "(minutes without the reduction)")
    ap.add_argument("--workers", type=int, default=0,
                    help="also the multiprocess search with this many processes "
                         "(count; default 0: not run)")
    ap.add_argument("--unreduced", action="store_true",
                    help="with --big, also the big configuration with every crash "
                         "expanded (4 CPU minutes, 700 MB) and without the "
                         "partial-order reduction (several GB and many minutes since "
                         "the leader's comms thread)")
    a = ap.parse_args(argv)
    print(f"machine: {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}; full PP1: {FULL_PP1.describe()}; "
          f"{accel.describe()}")
    print(f"{'config':12} {'symmetry':8} {'por':5} {'wk':>3} {'verdict':8} "
          f"{'states':>10} {'transitions':>12} {'wall':>9} {'cpu':>8} "
          f"{'states/cpu-s':>10} {'peak MB':>8}")
    ok = True
    for sym in (True, False):
        for por in (True, False):
            ok &= _row("pp1_full", FULL_PP1, symmetry=sym, por=por)
    ok &= _row("pp1_full", FULL_PP1, threads=False)
    ok &= _row("pp1_full", FULL_PP1, crashes=True)
    for por in (True, False):
        ok &= _row("pp1_mesh8", PP1_MESH8, por=por)
    if a.workers:
        ok &= _row("pp1_full", FULL_PP1, por=False, workers=a.workers)
    if a.big:
        ok &= _row("big", BIG)
        ok &= _row("big", BIG, threads=False)
        if a.unreduced:
            ok &= _row("big", BIG, crashes=True)
            ok &= _row("big", BIG, por=False)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
