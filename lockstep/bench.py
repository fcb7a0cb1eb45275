"""Benchmarks of the runtime that say where the time goes, measured side by side in one
run (ratios on CPU; absolute times only count on a GPU machine).

  round trip        a chunk round trip through lockstep at depth 1 (framing, validation,
                    guards, tracing, the comms thread) against the raw torch.distributed
                    floor of the same bytes: header + latent to the leader, the envelope
                    broadcast in the mesh, `steps` all_reduces, header + latent back;
                    and the CPU both spend per chunk over every rank (on shared cores
                    steadier than wall time: what the ranks spent, whoever else ran);
                    --repeats times, the median repeat the figure, each one printed.
  overlap           depth 1 against depth 2 with balanced synthetic stages: period
                    against max(stage0, stage1) and their sum, and OverlapScore.
  control-plane     the default stage costs (no synthetic cost: Phase B is the demo
  bound             workload's real TP collectives), depth 2: period against stage1.
  tracing           the balanced depth-2 run and the control-plane-bound run again with
                    RunOptions.trace="emits" (only rank0's emitting steps written: the
                    rows are the same): the cost of tracing as a fraction of the period,
                    the median over --tracing-pairs alternated on/off pairs (one pair's
                    difference is within the spread between two runs of one side); the
                    traced runs' period ratios, their median and spread, follow.
  timeline          the round trip's chunk row by row: every rank's steps as offsets in
                    the leader's window between two Phase B ends (conformance/timeline.py).
  mesh idle         the control-plane-bound run's per-chunk breakdown of the leader's
                    gap between Phase B k-1 and k, by the steps of which rank it waits on
                    (conformance/idle.py).

`python -m lockstep.bench [--chunks N] [--mesh M]` prints every table. On a GPU,
`python -m lockstep.gpubench` measures what the workload's TP collectives cost there. Only the period
analysis of rank0's trace runs on the traces (no conformance replay), so large --chunks
stay cheap; it needs torch and the lockstep package, nothing else.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from lockstep.model.config import Config

from lockstep.runtime import cpuprofile
from lockstep.runtime.launch import dist_env, spawn_local
from lockstep.runtime.run import run_local

LATENT = (4, 64)   # the demo workload's latent: frames x hidden, bf16
TARGETS = {"round_trip": 1.5, "depth2": 1.03, "bound": 1.3, "tracing": 0.01}


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
    cpu0 = None
    for k in range(args["chunks"]):
        if k == 5:     # CPU after warm-up, like the median of the times
            cpu0 = _process_cpu_s()
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
    Path(f"{args['out']}.cpu{rank}").write_text(json.dumps(_process_cpu_s() - cpu0))
    if rank == 0:
        Path(args["out"]).write_text(json.dumps(times))
    return 0


def _process_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _run(cfg: Config, opts: dict, run_dir: Path, analyse_idle: bool = False,
         cpu: bool = False):
    """One lockstep run; (Overlap, IdleBreakdown or None) from its traces. With `cpu`,
    every rank also writes its CPU seconds (runtime/cpuprofile.py; the launcher passes
    the environment on)."""
    from lockstep.conformance.idle import idle_breakdown
    from lockstep.conformance.load import load_run
    from lockstep.conformance.overlap import analyse
    saved = os.environ.get(cpuprofile.ENV)
    if cpu:
        os.environ[cpuprofile.ENV] = "cpu"
    try:
        res = run_local(cfg, opts, run_dir, deadline_s=600)
    finally:
        if saved is None:
            os.environ.pop(cpuprofile.ENV, None)
        else:
            os.environ[cpuprofile.ENV] = saved
    if not res.ok:
        raise RuntimeError(f"lockstep run failed ({run_dir}):\n" + res.summary())
    run = load_run(run_dir)
    return analyse(run), (idle_breakdown(run) if analyse_idle else None)


def round_trip(tmp: Path, chunks: int, mesh: int, steps: int = 2) -> dict:
    raw_out = tmp / "raw.json"
    res = spawn_local(mesh + 1, "lockstep.bench:raw_rank",
                      {"chunks": chunks, "steps": steps, "out": str(raw_out)},
                      deadline_s=300, run_dir=tmp / "raw")
    if not res.ok:
        raise RuntimeError("raw floor run failed:\n" + res.summary())
    raw = statistics.median(json.loads(raw_out.read_text())[5:]) * 1e3
    raw_cpu = sum(json.loads(Path(f"{raw_out}.cpu{r}").read_text()) for r in range(mesh + 1))
    cfg = Config(mesh=mesh, d_in=1, d_out=1, chunks=chunks, steps=steps)
    ov, _ = _run(cfg, {}, tmp / "round_trip", cpu=True)
    # CPU per chunk without the start (handshake, first chunks): the difference between
    # this run and a short one, over the chunks between them
    short = max(6, chunks // 5)
    _run(Config(mesh=mesh, d_in=1, d_out=1, chunks=short, steps=steps), {},
         tmp / "round_trip_short", cpu=True)
    cpu, interp = _cpu_s(tmp / "round_trip"), _cpu_s(tmp / "round_trip_short")
    per = 1e3 / (chunks - short)
    from lockstep.conformance.load import load_run
    from lockstep.conformance.timeline import chunk_timeline
    return {"timeline": chunk_timeline(load_run(tmp / "round_trip")), "raw_ms": raw, "lockstep_ms": ov.period_ms, "ratio": ov.period_ms / raw,
            "steps": steps, "raw_cpu_ms": raw_cpu / (chunks - 5) * 1e3,
            "cpu_ms": (cpu[0] - interp[0]) * per, "interp_cpu_ms": (cpu[1] - interp[1]) * per}


def _cpu_s(run_dir: Path) -> tuple:
    """(process CPU s, interpreter threads' CPU s) summed over every rank of a run."""
    ranks = cpuprofile.load(run_dir)
    return (sum(r["process_s"] for r in ranks),
            sum(sum(r["threads_s"].values()) for r in ranks))


def balanced(stage_ms: float) -> dict:
    """stage0 = A + C = stage_ms on rank0, stage1 = B = stage_ms on the mesh."""
    return {"costs": {"phase_a_ms": stage_ms / 2, "phase_c_ms": stage_ms / 2,
                      "phase_b_ms": stage_ms}}


def _at_least(lo: int):
    def parse(text: str) -> int:
        n = int(text)
        if n < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {n}")
        return n
    return parse


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lockstep.bench")
    # The medians skip 5 warm-up chunks and the CPU figure subtracts a run of chunks/5:
    # fewer chunks leave nothing to measure.
    ap.add_argument("--chunks", type=_at_least(20), default=200,
                    help="chunks of the round-trip and control-plane-bound runs (>= 20) (default: %(default)s)")
    ap.add_argument("--mesh", type=_at_least(1), default=3,
                    help="mesh ranks incl. the leader (default: %(default)s)")
    ap.add_argument("--stage-ms", type=float, default=50.0,
                    help="each stage's cost in the balanced overlap runs, ms (default: %(default)s)")
    ap.add_argument("--balanced-chunks", type=_at_least(10), default=40,
                    help="chunks of each balanced overlap run (>= 10) (default: %(default)s)")
    ap.add_argument("--tracing-pairs", type=_at_least(1), default=3,
                    help="tracing on/off run pairs per configuration (one pair's "
                         "difference is within the spread between two runs) (default: %(default)s)")
    ap.add_argument("--repeats", type=_at_least(1), default=3,
                    help="round-trip repeats (raw floor and lockstep side by side each "
                         "time); the median is the figure, every repeat is printed (default: %(default)s)")
    ap.add_argument("--skip-overlap", action="store_true",
                    help="the round trip only")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # Each repeat is a raw floor run and a lockstep run side by side; the figure is
        # the median repeat's (by ratio), the spread the others' (runs of the same code
        # minutes apart differ by as much as the cuts measured: docs/runtime-bench.md).
        rts = sorted((round_trip(tmp / f"rt{i}", a.chunks, a.mesh) for i in range(a.repeats)),
                     key=lambda r: r["ratio"])
        rt = rts[len(rts) // 2]
        print(f"round trip per chunk (gloo, CPU, mesh={a.mesh}, steps={rt['steps']}, depth 1, "
              f"median of {a.chunks - 6} chunks, measured in this run; the median of "
              f"{a.repeats} repeat(s) by ratio):")
        print(f"  raw torch.distributed floor  {rt['raw_ms']:8.3f} ms")
        print(f"  lockstep round trip          {rt['lockstep_ms']:8.3f} ms")
        print(f"  ratio                        {rt['ratio']:8.2f} x   "
              f"(target <= {TARGETS['round_trip']} x on a quiet 16-core machine)")
        if len(rts) > 1:
            print("  every repeat: " + ", ".join(
                f"{r['lockstep_ms']:.3f} / {r['raw_ms']:.3f} ms = {r['ratio']:.2f}x" for r in rts))
        print(f"  CPU per chunk, every rank: raw floor {rt['raw_cpu_ms']:.3f} ms, lockstep "
              f"{rt['cpu_ms']:.3f} ms (its interpreter threads {rt['interp_cpu_ms']:.3f} ms; "
              f"the rest is gloo's and the completers' threads; after the start)")
        from lockstep.conformance.timeline import lines
        print("\nthe round trip's chunk row by row (after the leader's Phase B k-1 ends; "
              "one host, so one clock):")
        print("\n".join(lines(rt["timeline"])))
        if a.skip_overlap:
            return 0
        print(f"\noverlap, balanced stages ({a.stage_ms:g} ms each), {a.balanced_chunks} "
              f"chunks:")
        print(f"  {'depth':>5} {'period':>9} {'max(s0,s1)':>11} {'s0+s1':>9} {'/max':>6} "
              f"{'OverlapScore':>13}  verdict")
        runs = {}
        for depth in (1, 2):
            cfg = Config(mesh=a.mesh, d_in=depth, d_out=depth, chunks=a.balanced_chunks,
                         steps=1)
            ov, _ = _run(cfg, balanced(a.stage_ms), tmp / f"balanced{depth}")
            runs[depth] = ov
            print(f"  {depth:>5} {ov.period_ms:8.2f}ms {ov.max_stage_ms:10.2f}ms "
                  f"{ov.sum_stage_ms:8.2f}ms {ov.period_ms / ov.max_stage_ms:6.3f} "
                  f"{ov.overlap_score:13.2f}  {ov.verdict}")
        print(f"  (target: depth 2 period <= {TARGETS['depth2']} x max(stage0, stage1))")
        cfg = Config(mesh=a.mesh, chunks=a.chunks)
        bound, idle = _run(cfg, {}, tmp / "bound", analyse_idle=True)
        print(f"\ncontrol-plane bound (default stage costs, depth {cfg.d_in}, steps "
              f"{cfg.steps}, {a.chunks} chunks):")
        print(f"  period {bound.period_ms:.3f} ms, stage1 (Phase B) {bound.stage1_ms:.3f} ms, "
              f"rank0 work {bound.work0_ms:.3f} ms: period / stage1 "
              f"{bound.period_ms / bound.stage1_ms:.2f} x   (target <= {TARGETS['bound']} x)")
        print(f"  {bound.verdict}, OverlapScore {bound.overlap_score:.2f}, mesh idle "
              f"{bound.mesh_idle_ms:.3f} ms per chunk (the leader's own measure)")
        print(f"\ntracing on vs off (trace=\"emits\": only rank0's emitting steps written; "
              f"{a.tracing_pairs} on/off pair(s) each, alternated: the cost is the median "
              f"of the pairs' differences, each pair listed):")
        print(f"  {'run':<22} {'on':>9} {'off':>9} {'cost':>9} {'of period':>10}  pairs (ms)")
        ratios = []
        for name, cfg_, opts, first in (
                ("balanced depth 2", Config(mesh=a.mesh, d_in=2, d_out=2,
                                            chunks=a.balanced_chunks, steps=1),
                 balanced(a.stage_ms), runs[2]),
                ("control-plane bound", cfg, {}, bound)):
            on_ms, off_ms, on_ratio = [], [], []
            for i in range(a.tracing_pairs):
                on = first if i == 0 else _run(cfg_, opts, tmp / f"trace_{name[:3]}{i}")[0]
                on_ratio.append(on.period_ms / (on.max_stage_ms if "balanced" in name
                                                else on.stage1_ms))
                off, _ = _run(cfg_, {**opts, "trace": "emits"}, tmp / f"notrace_{name[:3]}{i}")
                on_ms.append(on.period_ms)
                off_ms.append(off.period_ms)
            diffs = [x - y for x, y in zip(on_ms, off_ms)]
            cost, period = statistics.median(diffs), statistics.median(on_ms)
            print(f"  {name:<22} {period:8.3f}ms {statistics.median(off_ms):8.3f}ms "
                  f"{cost:8.3f}ms {cost / period:9.1%}  "
                  + " ".join(f"{d:+.3f}" for d in diffs))
            ratios.append((name, on_ratio))
        for name, got in ratios:
            if len(got) > 1:
                print(f"  {name}, period / {'max stage' if 'balanced' in name else 'stage1'} "
                      f"of the {len(got)} traced runs: median {statistics.median(got):.3f}x "
                      f"({' '.join(f'{x:.3f}' for x in got)})")
        print(f"  (target: tracing <= {TARGETS['tracing']:.0%} of the balanced period)")
        print("\nwhere the mesh waits (control-plane-bound run; one host, so one clock):")
        print("\n".join(idle.lines()))
    return 0


if __name__ == "__main__":
    from lockstep.cli import stoppable
    raise SystemExit(stoppable("python -m lockstep.bench", main))
