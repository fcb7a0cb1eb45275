"""What the workload's TP collectives cost on a GPU: Phase B of the reference DiT
(runtime/dit.py, three all_reduces per block per generator call) measured three ways in
one run, on one GPU (a one-rank NCCL mesh: the collectives are real NCCL works on the
stream, TP 1):

  stock             the workload driven in one process with bare ``dist.all_reduce``:
                    stream-ordered, the host never waits for a collective (it writes
                    the DiT's state records, as a lockstep run's mesh does)
  lockstep          ``lockstep run`` (rank0 on the CPU, so that no second CUDA context
                    time-slices the GPU with the mesh's, + a mesh of 1, cpu:gloo,cuda:nccl): every
                    collective checked against the table, the host runs ahead of them
                    within ``--cuda-window`` ops, each generator call drained at its end
  lockstep, window 0
                    the same run with ``cuda_window=0``: every collective completed on the
                    host before the workload goes on (a host sync per op)

Phase B per chunk: stock, from the first generator call to a device synchronize after the
last; lockstep, stage1 of the run's overlap analysis (the leader's Phase B: the count
check and the generator calls, each drained). Every lockstep run is replayed through the
model (`lockstep conform`) before its figure is printed.

Then the host cost of one all_reduce, path by path (``--host-ops``, in one process, a
one-rank group): stock ``dist.all_reduce``; the transport's ``stream_all_reduce``; the
interpreter's ``all_reduce`` as a generator call gets it (the table check of each
collective and the call's count on top of the transport); window 0. Their differences say
what each layer adds per collective; ``--host-only`` prints only these, and runs on gloo
where there is no GPU.

`python -m lockstep.gpubench [--blocks 40 --dim 1024 ...]` needs a CUDA device; absolute
times are only meaningful from one (docs/runtime-bench.md records them).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

from lockstep.bench import _at_least
from lockstep.model.runopts import RunOptions
from lockstep.runtime.dit import DiTSpec

BACKEND = "cpu:gloo,cuda:nccl"
THREADS = RunOptions().torch_threads   # a rank's intra-op threads: the stock's too


def stock_rank(rank: int, world_size: int, args: dict) -> int:
    """The workload's Phase B with bare torch.distributed: one process, a one-rank NCCL
    group; writes the per-chunk times (ms) to args["out"]."""
    import torch
    import torch.distributed as dist

    from lockstep.runtime.dit import DiTWorkload
    from lockstep.runtime.launch import dist_env
    from lockstep.runtime.workload import infer_meta
    env = dist_env()
    torch.set_num_threads(THREADS)      # as every lockstep rank (runtime/node.py)
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://{env.master_addr}:{env.master_port}",
                            rank=0, world_size=1, timeout=timedelta(seconds=60),
                            device_id=torch.device("cuda", 0))
    spec = DiTSpec(**args["dit"])
    builder = DiTWorkload(rank=0, mesh_size=1, spec=spec)            # Phase A on the CPU
    # its state records too, as a lockstep run's mesh writes them: the same workload
    mesh = DiTWorkload(rank=1, mesh_size=1, spec=spec, device="cuda", record=args["record"])
    times = []
    for k in range(args["chunks"]):
        fields, tensors = builder.build(k, 0, k == 0, "R1", args["steps"])
        meta = infer_meta(fields, call_id=k, chunk_index=k, cache_epoch=0, init_cache=k == 0,
                          regime="R1", steps=args["steps"])
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for call in range(meta["expected_generator_calls"]):
            mesh.generator_call(call, meta, tensors, lambda x: dist.all_reduce(x))
        mesh.result(meta, tensors)["latents_out"].cpu()
        times.append((time.perf_counter() - t0) * 1e3)
    Path(args["out"]).write_text(json.dumps(times))
    dist.destroy_process_group()
    return 0


def host_rank(rank: int, world_size: int, args: dict) -> int:
    """What one all_reduce costs the host, path by path, in one process: a one-rank NCCL
    group on CUDA (gloo on the CPU, where every op is completed at once). The
    interpreter's path is a worker's ``RankInterpreter`` (the shipped tables, mesh 2)
    put at the state of its generator-call row, calling the ``all_reduce`` a generator
    call gets (the table check of each collective, the call's count, the transport);
    the one-rank group stands in for mesh_pg. Writes {path: [host CPU us, wall us]}."""
    import torch
    import torch.distributed as dist

    from lockstep.model.config import Config
    from lockstep.model.ops import GEN, Coll
    from lockstep.model.semantics import Model
    from lockstep.model.tables import shipped_tables
    from lockstep.runtime import transport as T
    from lockstep.runtime.groups import MESH, WORLD, Groups
    from lockstep.runtime.interp import RankInterpreter
    from lockstep.runtime.launch import dist_env
    env = dist_env()
    torch.set_num_threads(THREADS)
    cuda = torch.cuda.is_available()
    kw = {"device_id": torch.device("cuda", 0)} if cuda else {}
    if cuda:
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if cuda else "gloo",
                            init_method=f"tcp://{env.master_addr}:{env.master_port}",
                            rank=0, world_size=1, timeout=timedelta(seconds=60), **kw)
    pg = dist.group.WORLD
    x = torch.zeros(8, device="cuda" if cuda else "cpu")
    opts = RunOptions(cuda_window=args["window"])
    groups = Groups("nccl" if cuda else "gloo", 2, 3, {WORLD: pg, MESH: pg},
                    {WORLD: (0, 1, 2), MESH: (1, 2)})
    w = RankInterpreter(Model(Config(mesh=2), shipped_tables()), 2, groups, None,
                        tracer=None, abort_poll=lambda: None, opts=opts, parity={})
    # the worker's state whose row is the generator call, with a call planned
    w.pcs[0] = next(pc for pc, rows in w.table[0].items()
                    if any(isinstance(r.op, Coll) and r.op.kind == GEN for r in rows))
    w.v = w.v._replace(planned=2)
    w._tl.where = (0, GEN)            # as _coll sets it around the workload's call
    interp_all_reduce = w._counted_all_reduce(MESH, 0)
    polled = T.Transport(groups, 2, op_deadline_s=opts.op_deadline_s, cuda_window=0)
    paths = {
        "stock dist.all_reduce": lambda: dist.all_reduce(x),
        "Transport.stream_all_reduce": lambda: w.comm.stream_all_reduce(x, MESH),
        "the interpreter's all_reduce": lambda: interp_all_reduce(x),
        "window 0 (host sync per op)": lambda: polled.stream_all_reduce(x, MESH),
    }
    out = {}
    for name, fn in paths.items():
        for timed in (False, True):      # a warm-up pass, then the timed one
            n = args["ops"] if timed else max(50, args["ops"] // 10)
            w.comm.calls.begin(0)
            t0, c0 = time.perf_counter(), time.thread_time()
            for _ in range(n):
                fn()
            w.comm.drain()
            if cuda:
                torch.cuda.synchronize()
            c, t = time.thread_time() - c0, time.perf_counter() - t0
            w.comm.calls.end()
        out[name] = [c / n * 1e6, t / n * 1e6]
    Path(args["out"]).write_text(json.dumps(out))
    dist.destroy_process_group()
    return 0


def host_costs(tmp: Path, ops: int, window: int) -> dict:
    from lockstep.runtime.launch import spawn_local
    out = tmp / "host.json"
    res = spawn_local(1, "lockstep.gpubench:host_rank",
                      {"ops": ops, "window": window, "out": str(out)},
                      deadline_s=300, run_dir=tmp / "host")
    if not res.ok:
        raise RuntimeError("host cost run failed:\n" + res.summary())
    return json.loads(out.read_text())


def _print_host(costs: dict, ops: int, where: str) -> None:
    print(f"Host cost of one all_reduce, by path ({ops} ops of 8 floats, one-rank group, "
          f"{where}; CPU = the issuing thread's):")
    stock = costs["stock dist.all_reduce"][0]
    for name, (cpu, wall) in costs.items():
        print(f"  {name:<32} CPU {cpu:7.1f} us  ({cpu - stock:+6.1f} vs stock)  "
              f"wall {wall:7.1f} us")
    check = costs["the interpreter's all_reduce"][0] - costs["Transport.stream_all_reduce"][0]
    print(f"  the table check and the call's count: {check:+.1f} us of CPU per collective")


def _stock(tmp: Path, dit: dict, chunks: int, steps: int) -> float:
    """Phase B ms per chunk, the median after 3 warm-up chunks."""
    from lockstep.runtime.launch import spawn_local
    out = tmp / "stock.json"
    res = spawn_local(1, "lockstep.gpubench:stock_rank",
                      {"dit": dit, "chunks": chunks, "steps": steps, "out": str(out),
                       "record": str(tmp)},
                      deadline_s=600, run_dir=tmp / "stock")
    if not res.ok:
        raise RuntimeError("stock run failed:\n" + res.summary())
    got = json.loads(out.read_text())
    return statistics.median(got[3:])


def _lockstep(run_dir: Path, dit: dict, chunks: int, steps: int, window: int) -> float:
    """stage1 (the leader's Phase B) ms per chunk of a run that conforms to the model."""
    from lockstep.conformance.load import load_run
    from lockstep.conformance.overlap import analyse
    from lockstep.conformance.report import conform
    from lockstep.model.config import Config
    from lockstep.runtime.run import run_local
    cfg = Config(mesh=1, d_in=2, d_out=2, chunks=chunks, steps=steps)
    opts = {"backend": BACKEND, "device": "cuda", "rank0_device": "cpu", "workload": "dit",
            "dit": dit, "cuda_window": window}
    res = run_local(cfg, opts, run_dir, deadline_s=600)
    if not res.ok:
        raise RuntimeError(f"lockstep run failed ({run_dir}):\n" + res.summary())
    if not conform(run_dir).ok:
        raise RuntimeError(f"the run at {run_dir} does not conform to the model "
                           f"(lockstep conform {run_dir})")
    return analyse(load_run(run_dir)).stage1_ms


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lockstep.gpubench",
                                 description=__doc__.split("\n\n")[0])
    d = DiTSpec()
    ap.add_argument("--blocks", type=_at_least(1), default=40,
                    help="DiT blocks: 3 all_reduces each per generator call (default: %(default)s)")
    ap.add_argument("--dim", type=_at_least(12), default=1024, help="model width (default: %(default)s)")
    ap.add_argument("--heads", type=_at_least(1), default=16,
                    help="attention heads: DIM / HEADS must be even (default: %(default)s)")
    ap.add_argument("--ffn", type=_at_least(1), default=4096, help="FFN width (default: %(default)s)")
    ap.add_argument("--lat", type=_at_least(1), default=16,
                    help="latent height = width: tokens per frame LAT^2 (default: %(default)s)")
    ap.add_argument("--frames", type=_at_least(1), default=d.frames,
                    help="latent frames per chunk (default: %(default)s)")
    ap.add_argument("--steps", type=_at_least(1), default=2,
                    help="generator calls per chunk (default: %(default)s)")
    ap.add_argument("--chunks", type=_at_least(8), default=20, help="chunks per run (default: %(default)s)")
    ap.add_argument("--cuda-window", type=_at_least(1), default=16,
                    help="lockstep's in-flight window (default: %(default)s)")
    ap.add_argument("--repeats", type=_at_least(1), default=2,
                    help="alternated runs of each of the three (default: %(default)s)")
    ap.add_argument("--host-ops", type=_at_least(0), default=3000,
                    help="also time one all_reduce on the host, path by path, over this "
                         "many ops (0: not) (default: %(default)s)")
    ap.add_argument("--host-only", action="store_true",
                    help="only the host cost by path; without a GPU it runs on gloo")
    a = ap.parse_args(argv)
    spec = DiTSpec(dim=a.dim, heads=a.heads, blocks=a.blocks, ffn=a.ffn, frames=a.frames,
                   lat_h=a.lat, lat_w=a.lat)
    try:
        spec.check_mesh(1)
    except ValueError as e:
        ap.error(str(e))
    import torch
    if a.host_only:
        with tempfile.TemporaryDirectory() as tmp:
            costs = host_costs(Path(tmp), a.host_ops or 3000, a.cuda_window)
        _print_host(costs, a.host_ops or 3000, _where(torch))
        return 0
    if not torch.cuda.is_available():
        print("python -m lockstep.gpubench: needs a CUDA device (torch "
              f"{torch.__version__} sees none)", file=sys.stderr)
        return 2
    dit = asdict(spec)
    per_call = 3 * a.blocks
    runs = {"stock": [], "window": [], "window0": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for i in range(a.repeats):     # alternated: the machine drifts between runs
            runs["stock"].append(_stock(tmp / f"stock{i}", dit, a.chunks, a.steps))
            runs["window"].append(_lockstep(tmp / f"window{i}", dit, a.chunks, a.steps,
                                            a.cuda_window))
            runs["window0"].append(_lockstep(tmp / f"window0_{i}", dit, a.chunks, a.steps, 0))
        costs = host_costs(tmp, a.host_ops, a.cuda_window) if a.host_ops else None
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(f"Phase B per chunk, DiT dim {a.dim} ffn {a.ffn} blocks {a.blocks}, "
          f"{a.frames * a.lat ** 2} tokens, {a.steps} generator calls x {per_call} "
          f"all_reduces, TP 1 on {torch.cuda.get_device_name(0)}, {THREADS} intra-op "
          f"thread(s) everywhere (median of {a.chunks - 3} chunks per run, the median of "
          f"{a.repeats} alternated run(s); every lockstep run conforms):")
    for key, name in (("stock", "stock dist.all_reduce (stream-ordered)"),
                      ("window", f"lockstep, window {a.cuda_window} (stream-ordered)"),
                      ("window0", "lockstep, window 0 (host sync per op)")):
        print(f"  {name:<42} {med[key]:9.3f} ms  {med[key] / med['stock']:6.3f} x stock   "
              f"runs: {' '.join(f'{x:.1f}' for x in runs[key])}")

    def per_op(key, base):      # us per collective between two ways, from their medians
        return (med[key] - med[base]) / (per_call * a.steps) * 1e3
    print(f"  per collective, window 0 against window {a.cuda_window}: "
          f"{per_op('window0', 'window'):.1f} us")
    print(f"  per collective, window {a.cuda_window} against stock: "
          f"{per_op('window', 'stock'):.1f} us (what lockstep adds where Phase B is bound by "
          f"its host)")
    if costs is not None:
        _print_host(costs, a.host_ops, _where(torch))
    return 0


def _where(torch) -> str:
    if torch.cuda.is_available():
        return f"NCCL on {torch.cuda.get_device_name(0)}"
    return "gloo on the CPU: every op completed at once"


if __name__ == "__main__":
    from lockstep.cli import stoppable
    raise SystemExit(stoppable("python -m lockstep.gpubench", main))
