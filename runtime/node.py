"""One rank of a lockstep run: side channel + watchdog, process groups, the interpreter
threads of its role, and the exit that leaves a one-line reason.

Started by runtime.launch (embedded default: local processes on 127.0.0.1) or by
torchrun (env://): `run_rank(rank, world_size, args)`.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import torch

from lockstep.model.check import config_from_dict
from lockstep.model.runopts import RunOptions
from lockstep.model.semantics import Model

from .groups import init_world, make_groups
from .interp import RankInterpreter
from .launch import dist_env
from .sidechannel import SideChannel, Watchdog
from .trace import TraceWriter
from .worker_main import EXIT_RELEASED, exit_line, one_line, set_role
from .workload import make_workload


def run_rank(rank: int, world_size: int, args: dict) -> int:
    # One intra-op thread per rank: several ranks share few cores, and oversubscribed
    # OpenMP pools turn a tiny matmul into milliseconds of spinning.
    cfg = config_from_dict(args["config"])
    opts = RunOptions.from_dict(args.get("opts"))
    torch.set_num_threads(opts.torch_threads)
    model = Model(cfg)
    if world_size != model.n:
        raise ValueError(f"world size {world_size} != 1 + mesh {cfg.mesh}")
    role = model.roles[rank]
    set_role(role)
    env = dist_env()
    run_dir = Path(os.environ.get("LOCKSTEP_RUN_DIR", args.get("run_dir", ".")))
    if rank == 0 and not (run_dir / "run.json").exists():   # torchrun: no launcher wrote it
        (run_dir / "run.json").write_text(json.dumps(
            {"config": args["config"], "opts": opts.to_dict(), "launcher": "torchrun"}, indent=1,
            sort_keys=True))
    tracer = TraceWriter(run_dir, rank)
    side = SideChannel(env.master_addr, env.side_port, rank,
                       world_size, env.run_id,
                       is_master=rank == 0, timeout=opts.store_timeout_s)
    interp_box = []

    def on_release(reason: str) -> None:
        ctx = interp_box[0].ctx() if interp_box else f"rank={rank} role={role}"
        try:   # the one line below must be written whatever happened to the trace file
            tracer.write({"ev": "release", "rank": rank, "role": role, "reason": reason,
                          "t_ns": time.monotonic_ns()})
        except (OSError, ValueError):
            pass
        print(f"lockstep: {ctx} exit=released reason={one_line(reason)}", file=sys.stderr,
              flush=True)

    wd = Watchdog(side, on_release, lost_after_s=opts.lost_after_s)
    wd.start()
    timeout_s = opts.pg_timeout_s
    init_world(opts.backend, rank, world_size, env.master_addr, env.master_port, timeout_s)
    groups = make_groups(world_size, opts.backend, timeout_s)
    work = make_workload(opts, rank=rank, mesh_size=cfg.mesh, record_dir=run_dir)
    # Everything that can change which collectives a rank issues is parity-checked at
    # startup, the fault-injection switches included (a switch on one rank only would
    # itself be a per-rank conditional collective).
    od = opts.to_dict()
    parity = {"config": args["config"], "world": world_size,
              **{k: od[k] for k in ("backend", "pg_timeout_s", "op_deadline_s",
                                    "lost_after_s", "fault", "hard_cut_at")}}
    skew = opts.parity_skew              # test switch: one rank believes something else
    if skew and skew.get("rank") == rank:
        parity[skew["key"]] = skew["value"]
    interp = RankInterpreter(model, rank, groups, work, tracer, abort_poll=wd.poll,
                             opts=opts, parity=parity)
    interp_box.append(interp)
    tracer.write({"ev": "start", "rank": rank, "role": role, "pid": os.getpid(),
                  "world": world_size, "backend": opts.backend,
                  "t_ns": time.monotonic_ns()})
    errors = []

    def body(t):
        try:
            interp.run_thread(t)
        except BaseException as e:  # noqa: BLE001 - recorded, then the process exits
            errors.append(e)
            with interp.cv:
                interp.exit = interp.exit or ("raise", f"{type(e).__name__}: {e}")
                interp.cv.notify_all()

    threads = [threading.Thread(target=body, args=(t,), name=f"lockstep-{th}", daemon=True)
               for t, th in enumerate(interp.threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    how, reason = interp.exit or ("raise", "no exit recorded")
    _dump_flight_recorder(run_dir, rank, opts)
    if rank == 0:
        (run_dir / "outputs.json").write_text(json.dumps(interp.outputs))
    if errors:
        e = errors[0]
        from .groups import CommAborted
        from .wire import Released
        if isinstance(e, (Released, CommAborted)):
            on_release(str(e))
            tracer.close()
            os._exit(EXIT_RELEASED)
        # The trace alone must tell a rank that died of an error from a kill -9.
        tracer.write({"ev": "release", "rank": rank, "role": role,
                      "reason": one_line(f"error: {type(e).__name__}: {e}"),
                      "t_ns": time.monotonic_ns()})
        raise RuntimeError(f"{interp.ctx()}: {type(e).__name__}: {e}") from e
    detail = f" ({interp.detail})" if interp.detail else ""
    line = exit_line("ok" if how in ("ok", "vanish") else "error",
                     f"{interp.ctx()} {reason}{detail}", rank, role)
    print(line, file=sys.stderr, flush=True)
    if how in ("ok", "vanish"):
        wd.stop()
        side.mark_clean_exit()
        if rank == 0:
            side.wait_all_clean(timeout=opts.drain_s)
        tracer.close()
        return 0
    if how == "abort":
        side.set_abort(f"{interp.ctx()} {reason}")
        time.sleep(0.1 if rank == 0 else 0)   # the store host lingers so peers read it
    tracer.close()
    return 1


def _dump_flight_recorder(run_dir: Path, rank: int, opts: RunOptions) -> None:
    """On NCCL runs with TORCH_NCCL_TRACE_BUFFER_SIZE set, keep the backend's own record
    of every op for conformance/flight.py (`lockstep conform` checks it)."""
    if "nccl" not in opts.backend or not (
            os.environ.get("TORCH_FR_BUFFER_SIZE")
            or os.environ.get("TORCH_NCCL_TRACE_BUFFER_SIZE")):
        return
    try:
        raw = torch._C._distributed_c10d._dump_nccl_trace_json(  # noqa: SLF001
            includeCollectives=True, onlyActive=False)
        (run_dir / f"fr_rank{rank}.json").write_bytes(
            raw if isinstance(raw, bytes) else raw.encode())
    except Exception as e:  # noqa: BLE001 - a missing dump is reported by the checker
        print(f"lockstep: rank={rank} flight recorder dump failed: {e}", file=sys.stderr)
