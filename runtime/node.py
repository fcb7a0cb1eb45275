"""One rank of a lockstep run: side channel + watchdog, process groups, the interpreter
threads of its role, and the exit that leaves a one-line reason.

Started by runtime.launch (embedded default: local processes on 127.0.0.1) or by
torchrun (env://): `run_rank(rank, world_size, args)`.
"""
from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from pathlib import Path

import torch

from lockstep.model import release as R
from lockstep.model import tracefmt
from lockstep.model.config import config_from_dict
from lockstep.model.runopts import RunOptions
from lockstep.model.semantics import Model
from lockstep.model.tables import THREADS, shipped_tables

from .groups import init_world, make_groups
from .interp import RankInterpreter
from .launch import dist_env
from .sidechannel import SideChannel, Watchdog
from .control import ControlWatcher, CutControl
from .cpuprofile import RankProfile, mode as profile_mode
from .trace import OutputLog, TraceWriter
from .worker_main import EXIT_RELEASED, cause_line, claim_exit, one_line, set_role
from .workload import make_workload, workload_identity


def run_rank(rank: int, world_size: int, args: dict) -> int:
    # One intra-op thread per rank: several ranks share few cores, and oversubscribed
    # OpenMP pools turn a tiny matmul into milliseconds of spinning.
    cfg = config_from_dict(args["config"])
    opts = RunOptions.from_dict(args.get("opts"))
    opts.cuts.check_bound(cfg.chunks, cfg.hard_cut)   # every rank alike, before any group
    if opts.fault is not None:
        opts.fault.check_bound(cfg.chunks, world_size)
    torch.set_num_threads(opts.torch_threads)
    model = Model(cfg, shipped_tables())
    if world_size != model.n:
        raise ValueError(f"world size {world_size} != 1 + mesh {cfg.mesh}")
    role = model.roles[rank]
    set_role(role)
    env = dist_env()
    _check_resolves(env)
    run_dir = Path(os.environ.get("LOCKSTEP_RUN_DIR", args.get("run_dir", ".")))
    if rank == 0 and not (run_dir / "run.json").exists():   # torchrun: no launcher wrote it
        (run_dir / "run.json").write_text(json.dumps(
            {"config": args["config"], "opts": opts.to_dict(), "launcher": "torchrun"}, indent=1,
            sort_keys=True))
    start = model.initial_state().procs[rank]
    tracer = TraceWriter(run_dir, rank, role=role, threads=THREADS[role],
                         initial=(start.pcs, start.v),
                         shared=tracefmt.shared_labels(model.tables[rank], THREADS[role]),
                         emits_only=opts.trace == "emits",
                         segment_bytes=int(opts.trace_segment_mb * 2 ** 20),
                         segment_s=opts.trace_segment_s, keep=opts.trace_keep)
    lost_after_s = opts.lost_after_s
    side = SideChannel.from_env(env, timeout=opts.store_timeout_s,
                                lost_after_s=lost_after_s)
    interp_box = []

    def ctx() -> str:
        return interp_box[0].ctx() if interp_box else f"rank={rank} role={role}"

    def on_release(cause: dict, via: str, own: str | None = None,
                   kind: str = "released") -> None:
        if own is None and interp_box:   # released from a wait: say which
            own = interp_box[0].comm.waiting_text()
        try:   # the one line below must be written whatever happened to the trace file
            tracer.write({"ev": "release", "rank": rank, "role": role,
                          "reason": one_line(R.text(cause)), "cause": cause, "via": via,
                          "t_ns": time.monotonic_ns()})
        except (OSError, ValueError):
            pass
        print(cause_line(kind, via, cause, own=own, ctx=ctx()), file=sys.stderr,
              flush=True)

    wd = Watchdog(side, on_release, lost_after_s=lost_after_s)
    wd.start()
    timeout_s = opts.pg_timeout_s
    if not side.wait_all_claimed(timeout_s):    # the flag: the watchdog ends the process
        wd.join(wd.release_grace_s + 5.0)
        raise RuntimeError("released before any process group, yet the watchdog did not "
                           "end the process")
    init_world(opts.backend, rank, world_size, env.master_addr, env.master_port, timeout_s)
    groups = make_groups(world_size, opts.backend, timeout_s)
    try:
        work = make_workload(opts, rank=rank, mesh_size=cfg.mesh, record_dir=run_dir)
    except Exception as e:  # noqa: BLE001 - a plugin's constructor: traced, like a step's
        _error_exit(e, f"rank={rank} role={role}", side, tracer, run_dir, rank, role)
    # Everything that can change which collectives a rank issues is parity-checked at
    # startup, the fault-injection switches included (a switch on one rank only would
    # itself be a per-rank conditional collective).
    od = opts.to_dict()
    # The workload too: ranks computing different workloads issue different collectives.
    parity = {"config": args["config"], "world": world_size,
              "workload": workload_identity(opts),
              **{k: od[k] for k in ("backend", "pg_timeout_s", "op_deadline_s",
                                    "lost_after_s", "fault", "cuts")}}
    skew = opts.parity_skew              # test switch: one rank believes something else
    if skew and skew.get("rank") == rank:
        parity[skew["key"]] = skew["value"]
    control = watcher = outputs = None
    if rank == 0:   # the control interface: cuts from another thread or process
        control = CutControl(opts.cuts.control)
        watcher = ControlWatcher(run_dir, control)
        watcher.start()
        outputs = OutputLog(run_dir / "outputs.json")
    interp = RankInterpreter(model, rank, groups, work, tracer, abort_poll=wd.poll,
                             peer_left=side.peer_left,
                             opts=opts, parity=parity, control=control, outputs=outputs)
    interp.on_commit = _record_commit(interp, side)
    interp_box.append(interp)
    wd.ids = lambda: R.ids_from_ctx(interp.ctx())
    wd.probe = interp.comm.stuck_collective     # collective mismatches: sidechannel.py
    wd.overdue = interp.comm.overdue            # a stream-ordered collective never done
    wd.group_sizes = {g: len(m) for g, m in groups.members.items()}
    tracer.snapshot = lambda: (tuple(interp.pcs), interp.v)   # called under interp.cv
    tracer.write({"ev": "start", "rank": rank, "role": role, "pid": os.getpid(),
                  "world": world_size, "backend": opts.backend,
                  "side_store": env.side_host,
                  "side_addr": f"{env.side_addr}:{env.side_port}",
                  "t_ns": time.monotonic_ns()})
    errors = []
    how_prof = profile_mode()
    prof = RankProfile(run_dir, rank, how_prof) if how_prof else None

    def body(t):
        try:
            if prof is None:
                interp.run_thread(t)
            else:
                prof.run(interp.threads[t], interp.run_thread, t)
        except BaseException as e:  # noqa: BLE001 - recorded, then the process exits
            with interp.cv:   # before the rank's exit path sees the error (errors)
                interp.let_sends_land(t)
                interp.exit = interp.exit or ("raise", f"{type(e).__name__}: {e}")
                interp.cv.notify_all()
            errors.append(e)

    threads = [threading.Thread(target=body, args=(t,), name=f"lockstep-{th}", daemon=True)
               for t, th in enumerate(interp.threads)]
    for th in threads:
        th.start()
    for th in threads:   # an error in one thread ends the rank even if another is blocked
        while th.is_alive() and not errors:
            th.join(0.02)
    how, reason = interp.exit or ("raise", "no exit recorded")
    if prof is not None:
        prof.dump(cfg.chunks)
    _dump_flight_recorder(run_dir, rank, opts)
    if rank == 0:
        watcher.stop()
        outputs.close()
    if errors:
        e = errors[0]
        from .transport import Released
        if isinstance(e, Released):
            if claim_exit():    # else the watchdog is writing the line and exiting
                _mark_exit(side)
                on_release(wd.cause or side.abort_cause() or
                           side.cause("error", str(e)), wd.via or "abort_flag")
                tracer.close()
                os._exit(EXIT_RELEASED)
            time.sleep(2.0)
            os._exit(EXIT_RELEASED)
        _error_exit(e, interp.ctx(e), side, tracer, run_dir, rank, role)
    detail = f" ({interp.detail})" if interp.detail else ""
    if how in ("ok", "vanish"):
        print(cause_line("ok", "ok", None, own=f"{interp.ctx()} {reason}{detail}",
                         ctx=f"rank={rank} role={role}"), file=sys.stderr, flush=True)
        wd.stop()
        side.mark_clean_exit()
        # Linger until every peer has exited cleanly (or the flag is set): a gloo send
        # completes before the peer has read it, and a process that exits closes its
        # pairs, so rank0 leaving right after SHUTDOWN resets the leader's receive of it.
        # (Under the env:// fallback this rank may also host the store the others use.)
        side.wait_all_clean(timeout=opts.drain_s)
        side.leave(timeout=opts.drain_s)
        tracer.close()
        return 0
    # Every error exit from a table row settles the root cause exactly like an uncaught
    # error (worker_main.error_exit): its own failure sets the flag; an exit on a peer's
    # terminal ERROR message is an echo and waits (bounded) for the peer's cause.
    if not claim_exit():        # the watchdog released us first: it exits the process
        time.sleep(2.0)
        os._exit(EXIT_RELEASED)
    wd._stop_ev.set()
    _mark_exit(side)            # this rank reads nothing more
    own = f"{interp.ctx()} {reason}{detail}"
    echo = _exit_label(model, rank, how, reason) in R.ECHO_EXIT_LABELS
    mine = _own_cause(interp, side, how, reason)
    from .sidechannel import abort_active
    # The cause is RECORDED now (an echo names it at once) but the flag is set only after
    # the linger below: the flag would release a peer that has not read our terminal
    # message yet (its watchdog fires before its receive), and exiting would reset it.
    # (It may be recorded already: on_commit, when this process's way out began.)
    cause, via = abort_active(mine, echo=echo, release=False)
    if via == "abort_flag" and cause and (cause["kind"], cause["rank"]) == \
            (mine["kind"], mine["rank"]):
        via = "own"     # our own failure, recorded earlier (on_commit) or, for a mismatch
                        # every member detects at once, by a peer first
    if echo and via == "echo":
        via = "terminal_message"
    print(cause_line("error", via, cause, own=own, ctx=f"rank={rank} role={role}"),
          file=sys.stderr, flush=True)
    tracer.close()
    # A gloo send completes before the peer has read it, and exiting closes our pairs:
    # keep the process until every peer is in its own exit path (or gone), bounded; then
    # set the flag, which releases only peers blocked elsewhere (none, when the tables'
    # terminal messages reach everyone, which the explorer checks).
    try:
        side.linger_then_release(side.host_wait_s)
    except Exception:  # noqa: BLE001 - the store is gone: nothing left to tell anyone
        pass
    return 1


def _own_cause(interp, side, how: str, reason: str) -> dict:
    """This process's own failure as a root cause: the exit's reason, its ids; for a
    mismatch every member detects at once (``differs on ranks [R]``), the odd rank."""
    kind = R.own_kind(how)
    detail = f"{reason} ({interp.detail})" if interp.detail else reason
    ids = R.ids_from_ctx(interp.ctx())
    odd = re.search(r"differs on ranks \[(\d+)\]", interp.detail or "")
    if odd:
        o = int(odd.group(1))
        return R.cause(kind, o, side.peer_role(o), detail, **ids)
    return side.cause(kind, detail, **ids)


def _record_commit(interp, side):
    """``on_commit`` for the interpreter: record (never release) this process's cause the
    moment one of its threads is committed to an own failure, from a thread of its own
    (a store call is never made under the interpreter's lock, and a dead store must not
    hold the process). A peer exiting on our terminal message then reads it at once."""
    def commit(how: str, reason: str) -> None:
        mine = _own_cause(interp, side, how, reason)

        def record():
            try:
                side.record_cause(mine)
            except Exception:  # noqa: BLE001 - the exit path records it again, bounded
                pass
        threading.Thread(target=record, daemon=True, name="lockstep-commit").start()
    return commit


def _error_exit(e, ctx: str, side, tracer, run_dir, rank, role) -> None:
    """A thread of this rank raised (not a table exit): settle the root cause like
    worker_main.error_exit (own failure -> the flag; an echo waits for the peer's cause),
    record it in the trace (the trace alone must tell a rank that died of an error from a
    kill -9, and whether it was the root cause) and leave with one line."""
    import traceback

    from .sidechannel import abort_active
    from .worker_main import EXIT_ERROR, classify
    if not claim_exit():
        time.sleep(2.0)
        os._exit(EXIT_RELEASED)
    own = f"{ctx}: {type(e).__name__}: {e}"
    try:
        with open(run_dir / f"rank{rank}.traceback", "w") as f:
            traceback.print_exception(e, file=f)
    except OSError:
        pass
    kind, echo = classify(e)
    cause, via = abort_active(side.cause(kind, own, **R.ids_from_ctx(ctx)),
                              echo=echo)
    # Only now, the cause settled: an exit mark says this rank reads nothing more, from
    # gloo or from the store. Marked before an echo's wait for the cause, it let the
    # store's host (env://) leave, and the wait found no store (via=store_lost).
    _mark_exit(side)
    try:
        tracer.write({"ev": "release", "rank": rank, "role": role,
                      "reason": one_line(f"error: {type(e).__name__}: {e}"), "cause": cause,
                      "via": via, "t_ns": time.monotonic_ns()})
        tracer.close()
    except (OSError, ValueError):
        pass
    # our error only echoed the root cause: we were released (unless it names our RANK
    # as started twice: this process is one of the two)
    released = via == "echo" and not R.started_twice(cause, rank)
    print(cause_line("released" if released else "error", via, cause, own=own, ctx=ctx),
          file=sys.stderr, flush=True)
    os._exit(EXIT_RELEASED if released else EXIT_ERROR)


def _check_resolves(env) -> None:
    """A MASTER_ADDR that names no host fails here, at once: the store clients retried
    it until their connect timeout (78 s for one rank, store and process group)."""
    import socket
    for name, addr in (("MASTER_ADDR", env.master_addr), ("side store", env.side_addr)):
        try:
            socket.getaddrinfo(addr, None)
        except socket.gaierror as e:
            raise RuntimeError(f"{name} {addr!r} does not resolve ({e.strerror}): no "
                               "rank can reach it") from None


def _mark_exit(side) -> None:
    try:
        side.mark_exit()
    except Exception:  # noqa: BLE001 - a courtesy to lingering peers, never a reason to hang
        pass


def _exit_label(model: Model, rank: int, how: str, reason: str) -> str | None:
    """The label of this rank's exit row with ``(how, reason)`` (the interpreter records
    only those two): tells an echo exit (a peer's terminal message) from a first-hand one."""
    from lockstep.model.ops import Exit
    for table in model.tables[rank]:
        for rows in table.values():
            for row in rows:
                if type(row.op) is Exit and (row.op.how, row.op.reason) == (how, reason):
                    return row.label
    return None


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
