"""Benchmarks of the runtime, measured side by side in one run (ratios on CPU; absolute
times only count on a GPU machine).

  control-plane cost   a chunk round trip through lockstep (framing, validation, guards,
                       tracing, the comms thread) against the raw torch.distributed floor
                       of the same bytes: header + latent to the leader, the envelope
                       broadcast in the mesh, `steps` all_reduces, header + latent back.
  overlap              depth 1 against depth 2 with balanced synthetic stages: period
                       against max(stage0, stage1) and their sum, and OverlapScore.

`python -m lockstep.bench [--chunks N] [--mesh M]` prints both tables.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from lockstep.model.config import Config

from lockstep.runtime.launch import dist_env, spawn_local
from lockstep.runtime.run import run_local

LATENT = (4, 64)   # the demo workload's latent: frames x hidden, bf16


def raw_rank(rank: int, world_size: int, args: dict) -> int:
    """The floor: the same bytes with bare blocking torch.distributed calls."""
    torch.set_num_threads(1)   # same as runtime/node.py: a fair floor
    env = dist_env()
    to = timedelta(seconds=30)
    dist.init_process_group(args.get("backend", "gloo"),
                            init_method=f"tcp://{env.master_addr}:{env.master_port}",
                            rank=rank, world_size=world_size, timeout=to)
    mesh = dist.new_group(list(range(1, world_size)), timeout=to)
    hdr = torch.zeros(11, dtype=torch.int64)
    lat = torch.zeros(*LATENT, dtype=torch.bfloat16)
    acc = torch.zeros(LATENT[0], LATENT[1], dtype=torch.float32)
    times = []
    for _ in range(args["chunks"]):
        t0 = time.perf_counter()
        if rank == 0:
            dist.send(hdr, 1)
            dist.send(lat, 1)
            dist.recv(hdr, 1)
            dist.recv(lat, 1)
            times.append(time.perf_counter() - t0)
            continue
        if rank == 1:
            dist.recv(hdr, 0)
            dist.recv(lat, 0)
        dist.broadcast(hdr, 1, group=mesh)
        dist.broadcast(lat, 1, group=mesh)
        for _ in range(args["steps"]):
            dist.all_reduce(acc, group=mesh)
        if rank == 1:
            dist.send(hdr, 0)
            dist.send(lat, 0)
    if rank == 0:
        Path(args["out"]).write_text(json.dumps(times))
    return 0


def control_plane(chunks: int, mesh: int, steps: int = 2) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        raw_out = tmp / "raw.json"
        res = spawn_local(mesh + 1, "lockstep.bench:raw_rank",
                          {"chunks": chunks, "steps": steps, "out": str(raw_out)},
                          deadline_s=300, run_dir=tmp / "raw")
        if not res.ok:
            raise RuntimeError("raw floor run failed:\n" + res.summary())
        raw = json.loads(raw_out.read_text())[5:]
        cfg = Config(mesh=mesh, d_in=1, d_out=1, chunks=chunks, steps=steps)
        res = run_local(cfg, {}, tmp / "lockstep", deadline_s=300)
        if not res.ok:
            raise RuntimeError("lockstep run failed:\n" + res.summary())
        from lockstep.conformance.overlap import analyse   # the same period the overlap report uses
        o = analyse(tmp / "lockstep").period_ms / 1e3
    r = statistics.median(raw)
    return {"raw_ms": r * 1e3, "lockstep_ms": o * 1e3, "ratio": o / r, "chunks": chunks,
            "mesh": mesh, "steps": steps}


def overlap(chunks: int, mesh: int, stage_ms: float) -> list:
    """Balanced stages: stage0 = A + C = stage_ms, stage1 = B = stage_ms."""
    from lockstep.conformance.overlap import analyse
    rows = []
    for depth in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = Config(mesh=mesh, d_in=depth, d_out=depth, chunks=chunks, steps=1)
            opts = {"costs": {"phase_a_ms": stage_ms / 2, "phase_c_ms": stage_ms / 2,
                              "phase_b_ms": stage_ms}}
            res = run_local(cfg, opts, Path(tmp), deadline_s=300)
            if not res.ok:
                raise RuntimeError(res.summary())
            rows.append((depth, analyse(Path(tmp))))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lockstep.bench")
    ap.add_argument("--chunks", type=int, default=200)
    ap.add_argument("--mesh", type=int, default=3)
    ap.add_argument("--stage-ms", type=float, default=50.0)
    ap.add_argument("--skip-overlap", action="store_true")
    a = ap.parse_args(argv)
    cp = control_plane(a.chunks, a.mesh)
    print(f"control-plane cost per chunk (gloo, CPU, mesh={a.mesh}, steps={cp['steps']}, "
          f"median of {a.chunks - 6} chunks, measured in this run):")
    print(f"  raw torch.distributed floor  {cp['raw_ms']:8.3f} ms")
    print(f"  lockstep round trip          {cp['lockstep_ms']:8.3f} ms")
    print(f"  ratio                        {cp['ratio']:8.2f} x   (GPU target <= 1.2 x)")
    if a.skip_overlap:
        return 0
    print(f"\noverlap, balanced stages ({a.stage_ms:g} ms each), {a.chunks} chunks:")
    print(f"  {'depth':>5} {'period':>9} {'max(s0,s1)':>11} {'s0+s1':>9} {'OverlapScore':>13}"
          f"  verdict")
    for depth, ov in overlap(min(a.chunks, 40), a.mesh, a.stage_ms):
        print(f"  {depth:>5} {ov.period_ms:8.2f}ms {ov.max_stage_ms:10.2f}ms "
              f"{ov.sum_stage_ms:8.2f}ms {ov.overlap_score:13.2f}  {ov.verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
