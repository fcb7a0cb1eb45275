"""Child functions for tests/test_runtime_infra.py (run under ``runtime.worker_main``).

They live in ``runtime/`` rather than ``tests/`` so a child process can import them with
no test-package plumbing. Each is ``f(rank, world_size, args)``; results go to stdout as
one JSON line (``RESULT {...}``); markers ``<run_dir>/ready.rank<R>`` tell the parent a
rank is about to block, so a fault can be injected mid-op.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from lockstep.runtime.launch import dist_env
from lockstep.runtime.worker_main import set_role


def _role(rank: int) -> str:
    return "rank0" if rank == 0 else ("leader" if rank == 1 else "worker")


def _device(rank, args):
    """args["backend"]: "gloo" (CPU), "nccl" (one GPU per rank) or "cpu:gloo,cuda:nccl"
    (FACTS.md 2-GPU variant: rank r on GPU r % ngpu, mesh on its own NCCL group)."""
    import torch
    if "nccl" not in args.get("backend", "gloo"):
        return torch.device("cpu")
    return torch.device("cuda", rank % torch.cuda.device_count())


def _boot(rank, world, args, check=None):
    import torch  # noqa: F401
    from lockstep.runtime.groups import init_world, make_groups
    from lockstep.runtime.transport import Transport
    from lockstep.runtime.sidechannel import SideChannel, Watchdog

    set_role(_role(rank))
    env = dist_env()
    sc = SideChannel.from_env(env, timeout=args.get("store_timeout_s", 20.0),
                              lost_after_s=args.get("lost_after_s", 1.0))
    wd = Watchdog(sc, heartbeat_s=args.get("heartbeat_s", 0.05),
                  lost_after_s=args.get("lost_after_s", 1.0))
    wd.start()
    timeout = args.get("pg_timeout_s", 30.0)
    backend = args.get("backend", "gloo")
    dev = _device(rank, args)
    init_world(backend, rank, world, env.master_addr, env.master_port, timeout,
               device=dev if dev.type == "cuda" else None)
    groups = make_groups(world, backend, timeout,
                         mesh_backend="nccl" if backend.startswith("cpu:") else None)
    comm = Transport(groups, rank, check=check, abort_poll=wd.poll,
                     op_deadline_s=args.get("op_deadline_s", 10.0))
    return env, sc, wd, groups, comm


def _finish(rank, sc, wd):
    wd.stop()
    sc.mark_clean_exit()
    # Rank 0 hosts the process groups' c10d store (init_method tcp://): a peer's first
    # collective on a group may still read it (stress run 8: rank0 left after its part,
    # a worker's first mesh broadcast failed with DistNetworkError, reset by peer), so it
    # stays until every peer is done, as the runtime's ranks do (runtime/node.py).
    if sc.hosts_store or rank == 0:
        missing = sc.wait_all_clean(10.0)
        if missing:
            raise RuntimeError(f"ranks {missing} never marked a clean exit")


def _ready(env, rank):
    Path(env.run_dir, f"ready.rank{rank}").write_text(str(time.monotonic()))


def _result(**kw):
    print("RESULT " + json.dumps(kw, sort_keys=True), flush=True)


def basic(rank, world, args):
    """Mesh broadcast (root = mesh group rank 0 = global 1), rank0 <-> leader ping-pong,
    mesh all_reduce / all_gather, and rank 0 calling a mesh collective (non-member)."""
    import torch
    from lockstep.runtime.groups import MESH, WORLD, GroupMembershipError

    env, sc, wd, groups, comm = _boot(rank, world, args)
    dev = _device(rank, args)
    out = {"rank": rank}
    if rank == 0:
        try:
            comm.all_reduce(torch.ones(2, device=dev), MESH)
            out["non_member"] = "no error"
        except GroupMembershipError as e:
            out["non_member"] = f"GroupMembershipError: {e}"
        t = torch.arange(8, dtype=torch.int64, device=dev)
        n, t0 = args.get("pingpong", 50), time.perf_counter()
        for _ in range(n):
            comm.send(t, 1, WORLD)
            comm.recv(t, 1, WORLD)
        out["pingpong_us"] = (time.perf_counter() - t0) / n * 1e6
        out["pong"] = t.tolist()
    else:
        if rank == 1:
            t = torch.zeros(8, dtype=torch.int64, device=dev)
            for _ in range(args.get("pingpong", 50)):
                comm.recv(t, 0, WORLD)
                t += 1
                comm.send(t, 0, WORLD)
        b = torch.full((4,), 7.0, device=dev) if rank == 1 else torch.zeros(4, device=dev)
        comm.broadcast(b, MESH, 0)   # group rank 0 = global rank 1 = leader
        out["bcast"] = b.tolist()
        r = torch.full((2,), float(rank), device=dev)
        comm.all_reduce(r, MESH)
        out["allreduce"] = r.tolist()
        g = [torch.zeros(1, device=dev) for _ in range(world - 1)]
        comm.all_gather(g, torch.full((1,), float(rank), device=dev), MESH)
        out["allgather"] = [x.item() for x in g]
        o = torch.zeros(world - 1, device=dev)
        comm.all_gather(o, torch.full((1,), float(rank * 10), device=dev), MESH)
        out["allgather_into"] = o.tolist()
        out["mesh_group_rank"] = groups.group_rank(MESH)
    out["seq"] = comm.seq
    out["wd_ticks"] = wd.ticks
    _finish(rank, sc, wd)
    _result(**out)


def check_reject(rank, world, args):
    """The leader's table forbids a world_pg all_reduce (the wrong-group bug): check()
    raises before the backend is touched. Rank 0 is blocked in recv from the leader and
    the worker in a mesh all_reduce; both must be released by the abort flag."""
    import torch
    from lockstep.runtime.groups import MESH, WORLD

    class TableRefused(RuntimeError):
        pass

    def check(op, group, peer, row):
        if rank == 1 and group == WORLD and op == "all_reduce":
            raise TableRefused(f"state=PHASE_B allows all_reduce on {MESH} only, "
                               f"asked for {op} on {group}")

    env, sc, wd, groups, comm = _boot(rank, world, args, check=check)
    calls = []

    class Counting:   # the process groups as the transport sees them, counting all_reduces
        def __init__(self, pg):
            self._pg = pg

        def allreduce(self, *a, **k):
            calls.append(1)
            return self._pg.allreduce(*a, **k)

        def __getattr__(self, name):
            return getattr(self._pg, name)

    groups.pgs = {name: Counting(pg) for name, pg in groups.pgs.items()}
    _ready(env, rank)
    dev = _device(rank, args)
    if rank == 0:
        comm.recv(torch.zeros(8, dtype=torch.int64, device=dev), 1, WORLD)
    elif rank == 1:
        time.sleep(args.get("pause_s", 0.3))
        try:
            comm.all_reduce(torch.ones(2, device=dev), WORLD)
        finally:
            print(f"backend all_reduce calls={len(calls)}", flush=True)
    else:
        comm.all_reduce(torch.ones(2, device=dev), MESH)
    raise AssertionError("unreachable: blocked op returned")


def block_for_kill(rank, world, args):
    """Every rank blocks on a live peer: rank 0 recv<-leader, leader recv<-rank 0, worker(s)
    in a mesh broadcast rooted at the leader. The parent then kill -9s one rank."""
    import torch
    from lockstep.runtime.groups import MESH, WORLD

    env, sc, wd, groups, comm = _boot(rank, world, args)
    t = torch.zeros(8, dtype=torch.int64, device=_device(rank, args))
    _ready(env, rank)
    if rank in (0, 1):
        comm.recv(t, 1 - rank, WORLD)
    else:
        comm.broadcast(t, MESH, 0)
    raise AssertionError("unreachable: blocked op returned")


def describe(rank, world, args):
    """What a started rank is, as one RESULT line: its process, session and parent, its
    working directory, argv and import path, the launcher's variables and the caller's
    ``echo_env`` ones; then it sleeps ``sleep_s``."""
    import json
    import os
    import sys
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "LOCKSTEP_RUN_DIR",
            *args.get("echo_env", ()))
    print("RESULT " + json.dumps({
        "pid": os.getpid(), "pgid": os.getpgid(0), "sid": os.getsid(0),
        "ppid": os.getppid(), "cwd": os.getcwd(), "argv": sys.argv, "path0": sys.path[0],
        "env": {k: os.environ.get(k) for k in keys},
        "main": sys.modules["__main__"].__spec__.name}), flush=True)
    time.sleep(args.get("sleep_s", 0.0))
    return 0


def sleep_forever(rank, world, args):
    if rank == 0:
        return 0
    while True:
        time.sleep(3600)


def op_deadline(rank, world, args):
    """Rank 1 waits for a recv nobody sends: OpDeadline fires at the per-op deadline."""
    import torch
    from lockstep.runtime.groups import WORLD

    env, sc, wd, groups, comm = _boot(rank, world, args)
    if rank == 1:
        comm.recv(torch.zeros(1), 0, WORLD, deadline_s=args.get("deadline_s", 0.5))
    else:
        time.sleep(30)


def two_in_flight(rank, world, args):
    """rank0 keeps a receive posted while it sends (the comms thread's pattern); the
    leader answers only `delay_s` after it has received. rank0's send must complete
    first, without waiting behind the posted receive, and the completer's threads must be
    reused round after round (never a thread per op)."""
    import torch
    from lockstep.runtime.groups import WORLD

    env, sc, wd, groups, comm = _boot(rank, world, args)
    delay, rounds = args.get("delay_s", 0.3), args.get("rounds", 3)
    out = {"rank": rank, "first": [], "send_s": []}
    t = torch.arange(1 << 16, dtype=torch.int64)
    for _ in range(rounds):
        if rank == 0:
            back = torch.zeros_like(t)
            ops = [comm.irecv(back, 1, WORLD), None]
            t0 = time.monotonic()
            ops[1] = comm.isend(t, 1, WORLD)
            i, _ = comm.wait_any(ops)
            out["first"].append(["recv", "send"][i])
            out["send_s"].append(round(time.monotonic() - t0, 3))
            ops[i] = None
            comm.wait_any(ops)
            out["echoed"] = bool(torch.equal(back, t))
        elif rank == 1:
            got = torch.zeros_like(t)
            comm.recv(got, 0, WORLD)
            time.sleep(delay)
            comm.send(got, 0, WORLD)
    out["completer_threads"] = comm.completer.threads
    _finish(rank, sc, wd)
    _result(**out)


def bench(rank, world, args):
    """Raw vs guarded latency, side by side in one run: 8 x int64 ping-pong rank0<->leader
    and an 8 x int64 mesh broadcast. Raw ops are followed by a device sync so both sides
    measure completion, as the guarded (polling) path does."""
    import torch
    import torch.distributed as dist
    from lockstep.runtime.groups import MESH, WORLD

    env, sc, wd, groups, comm = _boot(rank, world, args)
    dev = _device(rank, args)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    n = args.get("iters", 300)
    t = torch.zeros(8, dtype=torch.int64, device=dev)
    mesh_pg = groups.mesh_pg

    def timed(fn):
        dist.barrier(device_ids=[dev.index]) if dev.type == "cuda" else dist.barrier()
        for _ in range(20):
            fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        return (time.perf_counter() - t0) / n * 1e6

    def pp_raw():
        if rank == 0:
            dist.send(t, 1); sync(); dist.recv(t, 1); sync()
        elif rank == 1:
            dist.recv(t, 0); sync(); dist.send(t, 0); sync()

    def pp_guarded():
        if rank == 0:
            comm.send(t, 1, WORLD); comm.recv(t, 1, WORLD)
        elif rank == 1:
            comm.recv(t, 0, WORLD); comm.send(t, 0, WORLD)

    def bc_raw():
        if rank != 0:
            dist.broadcast(t, group=mesh_pg, group_src=0); sync()

    def bc_guarded():
        if rank != 0:
            comm.broadcast(t, MESH, 0)

    out = {"rank": rank, "backend": args.get("backend", "gloo")}
    for rep in range(2):
        out[f"pingpong_raw_us_{rep}"] = timed(pp_raw)
        out[f"pingpong_guarded_us_{rep}"] = timed(pp_guarded)
        out[f"mesh_bcast_raw_us_{rep}"] = timed(bc_raw)
        out[f"mesh_bcast_guarded_us_{rep}"] = timed(bc_guarded)
    _finish(rank, sc, wd)
    _result(**{k: (round(v, 1) if isinstance(v, float) else v) for k, v in out.items()})


# --------------------------------------------------------------------------- driver

def main(argv=None) -> int:
    """``python -m lockstep.runtime._selftest [--backend nccl] [--world 3]``: run the infra scenarios
    (basic, bench, check-reject, kill -9 of each role) and print one report; for backends
    the CPU test suite cannot reach (NCCL on a GPU box)."""
    import argparse
    import signal
    import tempfile

    from lockstep.runtime.launch import spawn_local, start_local

    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="gloo")
    ap.add_argument("--world", type=int, default=3)
    ap.add_argument("--deadline", type=float, default=120.0)
    ns = ap.parse_args(argv)
    base = {"backend": ns.backend}
    root = Path(tempfile.mkdtemp(prefix="lockstep-selftest-"))
    ok = True

    def show(name, res):
        print(f"== {name}: rc={res.returncodes} deadline_hit={res.deadline_hit}")
        for r in res.ranks:
            for ln in Path(r.stdout_path).read_text().splitlines():
                if ln.startswith("RESULT"):
                    print(f"   rank {r.rank} {ln}")
            if r.reason_line():
                print(f"   rank {r.rank} {r.reason_line()}")

    for name, target, extra in (("basic", "basic", {}), ("bench", "bench", {"iters": 300})):
        res = spawn_local(ns.world, f"runtime._selftest:{target}", {**base, **extra},
                          deadline_s=ns.deadline, run_dir=root / name)
        show(name, res)
        ok &= res.ok
    res = spawn_local(ns.world, "lockstep.runtime._selftest:check_reject", base, deadline_s=ns.deadline,
                      run_dir=root / "check_reject")
    show("check_reject", res)
    dt = res.all_exited_after(res.ranks[1].exit_time)
    print(f"   all exited {dt * 1e3 if dt is not None else float('nan'):.0f} ms after the leader")
    ok &= dt is not None
    for victim in range(ns.world):
        d = root / f"kill{victim}"
        with start_local(ns.world, "lockstep.runtime._selftest:block_for_kill", base, run_dir=d) as run:
            end = time.monotonic() + ns.deadline
            while not all((d / f"ready.rank{r}").exists() for r in range(ns.world)):
                if time.monotonic() > end or len(run.alive()) < ns.world:
                    break
                time.sleep(0.02)
            time.sleep(0.3)
            tf = run.kill_rank(victim, signal.SIGKILL)
            res = run.wait(ns.deadline)
        show(f"kill -9 rank {victim}", res)
        dt = res.all_exited_after(tf, [r for r in range(ns.world) if r != victim])
        print(f"   survivors all exited {dt * 1e3 if dt is not None else float('nan'):.0f} ms "
              f"after the kill")
        ok &= dt is not None
    print("SELFTEST", "OK" if ok else "FAILED", root)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
