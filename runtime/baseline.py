"""The same faults on plain torch.distributed, without lockstep's machinery.

A minimal stock control plane: rank0 sends an 8 x int64 header and a latent to the
leader, the leader broadcasts them on mesh_pg, the mesh runs `calls` all_reduces, the
leader sends the result back. No tables, no parity handshake, no count check, no
watchdog, no terminal messages; only a short backend timeout (`timeout_s`), which is
the stock release path. Used by the break-it table as the side-by-side baseline.
"""
from __future__ import annotations

import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from .launch import dist_env


def stock_rank(rank: int, world_size: int, args: dict) -> int:
    fault, at, chunks = args["fault"], int(args.get("at", 1)), int(args.get("chunks", 50))
    env = dist_env()
    to = timedelta(seconds=float(args.get("timeout_s", 5.0)))
    dist.init_process_group("gloo", init_method=f"tcp://{env.master_addr}:{env.master_port}",
                            rank=rank, world_size=world_size, timeout=to)
    mesh = dist.new_group(list(range(1, world_size)), timeout=to)
    hdr = torch.zeros(8, dtype=torch.int64)
    lat = torch.zeros(1024, dtype=torch.float32)
    last = world_size - 1
    for k in range(chunks):
        fire = k == at
        if fire:
            _mark_fault(rank, fault)
        if rank == 0:
            if fire and fault == "rank0_preflight":
                hdr[0] = k
                dist.send(hdr, 1)                       # the habit: header first ...
                raise ValueError("unsupported dtype float64 found after the header")
            hdr[0] = k
            dist.send(hdr, 1)
            dist.send(lat, 1)
            dist.recv(lat, 1)
            time.sleep(0.002)
            continue
        if rank == 1:
            dist.recv(hdr, 0)
            dist.recv(lat, 0)
            if fire and fault == "leader_reject":
                raise ValueError("envelope rejected by validation (no terminal action)")
        dist.broadcast(hdr, 1, group=mesh)
        dist.broadcast(lat, 1, group=mesh)
        calls = 2 + (1 if fire and fault == "count_mismatch" and rank == last else 0)
        for _ in range(calls):
            if fire and fault == "wrong_group" and rank == last:
                dist.all_reduce(lat)                    # world_pg instead of mesh_pg
            else:
                dist.all_reduce(lat, group=mesh)
        if fire and fault == "cond_flag" and rank == last:
            dist.all_reduce(lat, group=mesh)            # behind a per-rank flag
        if rank == 1:
            dist.send(lat, 0)
    return 0


def _mark_fault(rank, fault):
    print(f"FAULT {fault} rank={rank} t={time.monotonic():.6f}", file=sys.stderr, flush=True)


def fault_time(res) -> float | None:
    """Earliest FAULT mark any rank printed (same monotonic clock across processes)."""
    best = None
    for r in res.ranks:
        try:
            text = open(r.stderr_path).read()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("FAULT "):
                t = float(line.rsplit("t=", 1)[1])
                best = t if best is None else min(best, t)
    return best
