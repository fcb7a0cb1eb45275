"""Replay throughput on a generated trace: `python -m lockstep.conformance.bench`.

Generates (or reuses, with --dir) a run of about --events step events with the
simulator (mesh 3, depth 2, one hard cut, steps 2, gloo-like completion order on rank0's
comms thread), then loads it and replays it through the model, timing each phase on one
core. Target (TARGETS.md): >= 200,000 events/s, a 1,000,000-event trace in < 5 s.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from lockstep.model.config import Config

from .load import load_run
from .replay import Replayer
from .simulate import simulate


def generate(events: int, out: Path, mesh: int = 3, seed: int = 0) -> tuple:
    base = Config(mesh=mesh, d_in=2, d_out=2, chunks=20, hard_cut=True, steps=2)
    with tempfile.TemporaryDirectory() as tmp:
        probe = simulate(base, tmp, seed=seed)
    per_chunk = probe.events / base.chunks
    cfg = base.with_(chunks=max(2, int(events / per_chunk)))
    t0 = time.perf_counter()
    res = simulate(cfg, out, seed=seed, gloo_like=True)
    return cfg, res, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lockstep.conformance.bench")
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--mesh", type=int, default=3)
    ap.add_argument("--dir", default="", help="reuse/keep the generated run here")
    ap.add_argument("--verify", action="store_true",
                    help="also check every step against Model.enabled (slow)")
    a = ap.parse_args(argv)
    keep = bool(a.dir)
    out = Path(a.dir) if keep else Path(tempfile.mkdtemp(prefix="lockstep-bench-"))
    try:
        if keep and (out / "run.json").exists():
            print(f"reusing {out}")
        else:
            cfg, res, gen_s = generate(a.events, out, a.mesh)
            print(f"generated {res.events:,} step events ({cfg.describe()}) in "
                  f"{gen_s:.1f} s -> {out}")
        t0 = time.perf_counter()
        run = load_run(out)
        t_load = time.perf_counter() - t0
        rep = Replayer(run, verify=a.verify)
        t1 = time.perf_counter()
        res = rep.replay()
        t_replay = time.perf_counter() - t1
        n = run.n_events
        print(f"events      {n:,} ({res.steps:,} model transitions)")
        print(f"load        {t_load:7.3f} s  {n / t_load:12,.0f} events/s  (json + checks)")
        print(f"replay      {t_replay:7.3f} s  {n / t_replay:12,.0f} events/s  "
              f"(target >= 200,000/s)")
        print(f"total       {t_load + t_replay:7.3f} s  {n / (t_load + t_replay):12,.0f} "
              f"events/s  (target: 1,000,000 events < 5 s)")
        print(f"verdict     {'conforms' if res.ok else 'DIVERGES'}")
        if res.divergence:
            print(res.divergence.text())
        return 0 if res.ok else 1
    finally:
        if not keep:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
