"""Model-checking benchmark: `python -m lockstep.model.bench`.

Prints, for the full PP1 configuration of TARGETS.md (leader + 3 workers, D_in = D_out
= 2, 3 chunks with a hard cut, any single crash fault), the verdict, distinct states,
states/s, wall time and peak memory, with symmetry reduction on and off, measured in
one run. Record the output in docs/model-check.md with the machine it ran on.
"""
from __future__ import annotations

import os

from .check import check
from .config import Config

FULL_PP1 = Config(mesh=4, d_in=2, d_out=2, chunks=3, hard_cut=True, faults=1)


def main() -> int:
    print(f"machine: {os.cpu_count()} cores; configuration: {FULL_PP1.describe()}")
    print(f"{'symmetry':9} {'verdict':8} {'states':>9} {'transitions':>12} {'time':>8} "
          f"{'states/s':>10} {'peak MB':>8}")
    ok = True
    for sym in (True, False):
        r = check(FULL_PP1, symmetry=sym)
        ok &= r.verdict == "clean"
        print(f"{'on' if sym else 'off':9} {r.verdict:8} {r.states:>9,} {r.transitions:>12,} "
              f"{r.seconds:>7.2f}s {r.states_per_s:>10,.0f} {r.peak_mb:>8.0f}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
