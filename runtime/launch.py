"""Local multi-process launcher with a hard deadline: crash > hang starts in the parent.

Why a launcher of our own and not ``torch.multiprocessing.spawn`` or torchrun:

* Fault injection must be real. Each rank is a separate OS process, what
  ``python -m lockstep.runtime.worker_main ...`` starts, in its own session (pgid == pid),
  so ``kill_rank(run, r, SIGKILL)`` is a real ``kill -9`` of that rank's whole process
  tree, exactly what an OOM killer or a node failure does. ``mp.spawn`` children share the
  parent's fate and pipe plumbing. The ranks are forked from the run's fork server
  (runtime/forkserver.py: one torch import per run, not one per rank), which reaps them
  by the rule below and reports each exit; ``LOCKSTEP_FORKSERVER=0`` starts each with its
  own interpreter (``subprocess.Popen``, ``start_new_session=True``).
* The parent never waits on a default torch timeout. ``wait()`` has a HARD deadline: when it
  passes, every rank still alive is SIGKILLed and named in ``alive_at_deadline``. Nothing
  about the children (their watchdogs, their guards) is trusted to end the run.
* Exit times are measured, not guessed. The rank's parent (the fork server, or a waiter
  thread here) blocks in ``os.waitid(..., WNOWAIT)`` and stamps ``time.monotonic()`` the
  moment the rank exits, so ``exit_time - fault_time`` is the time-from-fault-to-exit that
  TARGETS.md asks for (one clock: the host's monotonic one). ``WNOWAIT`` leaves the zombie
  unreaped until the rank's process group has also been SIGKILLed, so a pid can never be
  reused under our feet. One waiter thread per rank here waits for that exit.
* No child survives ``spawn_local`` returning or raising (try/finally, plus
  ``PR_SET_PDEATHSIG`` so even a SIGKILLed parent takes its ranks down on Linux: the fork
  server dies with the launcher and its ranks with it). Under
  ``stop_signals_raise`` (every CLI command) SIGINT / SIGTERM / SIGHUP of the parent
  kill the ranks and are recorded in launch.json (``Interrupted``).
* The side channel outlives every rank: the parent hosts the side-channel TCPStore server
  (abort flag, heartbeats, clean marks; runtime/sidechannel.py) before it starts the ranks,
  so no rank's death takes the abort flag down. The waiter that reaps a rank killed by a
  signal writes the root cause at once (first-cause-wins, kind ``killed``, naming the rank
  and its registered role), and one that exited with an error code without writing a cause
  gets kind ``error``. Ranks the launcher itself kills (deadline, cleanup) are not causes;
  the deadline is (kind ``deadline``, origin ``launcher``).

The child environment is what torchrun would give (MASTER_ADDR=127.0.0.1, MASTER_PORT, RANK,
WORLD_SIZE, LOCAL_RANK, and TORCHELASTIC_USE_AGENT_STORE=True: MASTER_PORT is the parent's
own store, which the ranks' rendezvous shares, so no port is picked free and bound later)
plus ``LOCKSTEP_SIDE_ADDR``/``LOCKSTEP_SIDE_PORT`` (the parent's side-channel store),
``LOCKSTEP_RUN_ID`` and ``LOCKSTEP_RUN_DIR``. ``dist_env()`` reads
either launcher's variables, so the same target runs under ``spawn_local`` and under
``torchrun -m lockstep.runtime.worker_main --target m:f --args-json '{...}'``; under
torchrun the side channel is the agent's own store (see ``dist_env``).

Rejected: polling ``Popen.poll()`` for exit times (resolution = poll interval, and CPU on a
2-core box); ``mp.spawn`` (no real kill -9 of one rank, pickled args); a store hosted by
rank 0 (measured: when rank 0 leaves first, every other rank loses the flag and its reason,
and "store unreachable" becomes a release path the model does not have).
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lockstep.model import tracefmt as F

# a rank's exit statuses (model/release.py EXIT_CODES): 1 an uncaught exception in the
# target, 3 released by the side-channel watchdog (abort flag, lost peer, lost store)
from .worker_main import EXIT_ERROR, EXIT_OK, EXIT_RELEASED, backend_text  # noqa: F401 (re-exported)


# --------------------------------------------------------------------------- interrupts

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(BaseException):
    """The launching process got SIGINT, SIGTERM or SIGHUP (``stop_signals_raise``).
    A BaseException, as KeyboardInterrupt is: no ``except Exception`` swallows it.
    ``spawn_local`` kills the ranks, records it in launch.json and fills in
    ``run_dir``/``killed`` before it passes on."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.name = signal.Signals(signum).name
        self.run_dir: str | None = None   # the run it stopped, if one was going
        self.killed: list[int] = []       # ranks still alive then, killed by the launcher

    @property
    def exit_code(self) -> int:
        return 128 + self.signum          # what a shell reports for a death by signum


@contextmanager
def stop_signals_raise():
    """While inside, SIGINT, SIGTERM and SIGHUP raise ``Interrupted`` in the main thread,
    so ``spawn_local``'s cleanup runs (kill the ranks, write launch.json) instead of the
    default death, which left no record and, for SIGINT, a traceback. Only the first
    signal raises: one arriving while that unwinds would cut the cleanup short, and the
    cleanup is bounded. Off the main thread (signals cannot be set there) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = []

    def on_signal(signum, _frame):
        if not fired:
            fired.append(signum)
            raise Interrupted(signum)

    old = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)



# --------------------------------------------------------------------------- environment

def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind to 0, read, close). Racy by nature;
    good enough on a loopback test box."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    side_port: int          # side-channel TCPStore port (see side_host)
    run_id: str
    run_dir: str | None
    launcher: str           # "lockstep" | "torchrun" | "slurm" | "mpi" | "env"
    side_addr: str = "127.0.0.1"
    side_host: str = "launcher"   # who hosts the side store: launcher | agent | rank0
    side_prefix: str = ""         # key namespace: lockstep/<side_prefix>/...


def dist_env(environ: dict | None = None) -> DistEnv:
    """rank / world size / rendezvous address from whichever launcher set them.

    torchrun and spawn_local both set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT
    (env://). SLURM and Open MPI variables are a fallback for rank and size only.

    The side channel (a store no rank hosts): spawn_local passes its own store in
    LOCKSTEP_SIDE_ADDR/LOCKSTEP_SIDE_PORT (``side_host="launcher"``). torchrun with
    TORCHELASTIC_USE_AGENT_STORE=True (its static and c10d rendezvous) already hosts a
    TCPStore in the agent at MASTER_ADDR:MASTER_PORT: every rank is a client of it, keys
    under ``lockstep/<TORCHELASTIC_RUN_ID>/attempt_<TORCHELASTIC_RESTART_COUNT>/``
    (``side_host="agent"``). Anything else: rank 0 hosts on LOCKSTEP_SIDE_PORT or
    MASTER_PORT+1 (``side_host="rank0"``, the fallback that dies with rank 0).
    """
    e = os.environ if environ is None else environ

    def first(*names, default=None):
        for n in names:
            if e.get(n) not in (None, ""):
                return e[n]
        return default

    rank = first("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
    world = first("WORLD_SIZE", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
    if rank is None or world is None:
        raise RuntimeError("dist_env: RANK/WORLD_SIZE not set by any known launcher")
    try:
        rank_n, world_n = int(rank), int(world)
    except ValueError:
        raise RuntimeError(f"dist_env: RANK={rank!r} / WORLD_SIZE={world!r}: not "
                           "integers") from None
    if world_n < 1 or not 0 <= rank_n < world_n:
        # a negative RANK indexed the roles from the end and waited 30 s for a store as
        # the last worker; one past the end was an IndexError
        raise RuntimeError(f"dist_env: RANK={rank_n} is outside 0..{world_n - 1} "
                           f"(WORLD_SIZE={world_n})")
    local = first("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", default="0")
    port = int(first("MASTER_PORT", default="29500"))
    if "LOCKSTEP_RUN_ID" in e:
        launcher = "lockstep"
    elif "TORCHELASTIC_RUN_ID" in e or "TORCHELASTIC_RESTART_COUNT" in e:
        launcher = "torchrun"
    elif "RANK" in e:
        launcher = "env"
    elif "SLURM_PROCID" in e:
        launcher = "slurm"
    else:
        launcher = "mpi"
    master_addr = first("MASTER_ADDR", default="127.0.0.1")
    run_id = first("LOCKSTEP_RUN_ID", "TORCHELASTIC_RUN_ID", default="local")
    if "LOCKSTEP_SIDE_PORT" in e and launcher == "lockstep":
        side = (first("LOCKSTEP_SIDE_ADDR", default="127.0.0.1"),
                int(e["LOCKSTEP_SIDE_PORT"]), "launcher", run_id)
    elif e.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        side = (master_addr, port, "agent",
                f"{run_id}/attempt_{first('TORCHELASTIC_RESTART_COUNT', default='0')}")
    else:
        side = (master_addr, int(first("LOCKSTEP_SIDE_PORT", default=str(port + 1))),
                "rank0", run_id)
    return DistEnv(
        rank=rank_n, world_size=world_n, local_rank=int(local),
        master_addr=master_addr, master_port=port, side_port=side[1], run_id=run_id,
        run_dir=first("LOCKSTEP_RUN_DIR"), launcher=launcher, side_addr=side[0],
        side_host=side[2], side_prefix=side[3],
    )


# --------------------------------------------------------------------------- results

@dataclass
class RankResult:
    rank: int
    pid: int
    returncode: int | None = None     # negative = killed by that signal (Popen convention)
    exit_time: float | None = None    # time.monotonic() in the parent when the exit was seen
    killed_at_deadline: bool = False
    stdout_path: str = ""
    stderr_path: str = ""

    def stderr_text(self) -> str:
        try:
            return Path(self.stderr_path).read_text(errors="replace")
        except OSError:
            return ""

    def reason_line(self) -> str | None:
        """The last ``lockstep: ...`` line the rank wrote to stderr, if any."""
        lines = [ln for ln in self.stderr_text().splitlines() if ln.startswith("lockstep: ")]
        return lines[-1] if lines else None


@dataclass
class LaunchResult:
    world_size: int
    run_dir: str
    run_id: str
    master_port: int
    side_port: int
    start_time: float
    end_time: float = 0.0
    ranks: list[RankResult] = field(default_factory=list)
    deadline_hit: bool = False
    alive_at_deadline: list[int] = field(default_factory=list)
    faults: list[tuple[int, int, float]] = field(default_factory=list)  # (rank, signal, t)
    on_start_error: str | None = None
    cause: dict | None = None   # the root cause in the abort flag when the run ended
    interrupted: dict | None = None   # {"signal", "t_s", "killed"}: the launcher was stopped
    # rank -> the last stderr line of a rank that died of a signal other than SIGKILL
    last_words: dict = field(default_factory=dict)

    @property
    def returncodes(self) -> list[int | None]:
        return [r.returncode for r in self.ranks]

    @property
    def ok(self) -> bool:
        return not self.deadline_hit and all(r.returncode == 0 for r in self.ranks)

    def all_exited_after(self, t0: float, ranks: list[int] | None = None) -> float | None:
        """Seconds from monotonic time ``t0`` (e.g. a fault) until the last of ``ranks``
        (default: all) exited; None if one never exited on its own."""
        sel = [self.ranks[i] for i in (ranks if ranks is not None else range(self.world_size))]
        if any(r.exit_time is None or r.killed_at_deadline for r in sel):
            return None
        return max(r.exit_time for r in sel) - t0

    def summary(self) -> str:
        out = []
        for r in self.ranks:
            dt = "" if r.exit_time is None else f" t=+{r.exit_time - self.start_time:.3f}s"
            line = r.reason_line()
            if line is None and r.killed_at_deadline:   # where was it, then
                trace = Path(self.run_dir) / f"rank{r.rank}.jsonl"
                step = _last_step(trace)
                ids = _last_ids(trace)
                line = (f"no exit line; last step {step}" + "".join(
                    f" {k}={v}" for k, v in ids.items()) if step else
                    "no exit line and no step traced (killed while starting up)")
            out.append(f"rank {r.rank}: rc={r.returncode}{dt}"
                       f"{' KILLED-AT-DEADLINE' if r.killed_at_deadline else ''}"
                       f" | {line or ''}")
        if self.deadline_hit:
            out.append(f"hard deadline hit after {self.end_time - self.start_time:.1f} s: "
                       "the ranks above were killed (a longer run needs a larger deadline; "
                       "a rank that waited there without crashing is a hang to report)")
        return "\n".join(out)


# --------------------------------------------------------------------------- running

try:  # resolved once in the parent: no dlopen between fork and exec
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _PRCTL = None


def _pdeathsig():  # runs in the child between fork and exec
    if _PRCTL is not None:
        _PRCTL(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG: die with the parent thread


def _reap(p: subprocess.Popen) -> tuple[int, float]:
    """(returncode, monotonic exit time) of a rank this process started."""
    try:
        while True:
            try:
                os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)
                break
            except InterruptedError:
                continue
    except ChildProcessError:
        pass
    t = time.monotonic()
    try:  # leftover grandchildren in the rank's session; pid not reaped yet, so safe
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return p.wait(), t


def _tail_events(trace: Path):
    """The events of the tail of a rank{R}.jsonl, newest first, format-2 steps in their
    long view (a cut or unreadable line is skipped)."""
    try:
        with open(trace, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 16384))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return
    for ln in reversed(lines):
        try:
            e = F.loads(ln)
        except ValueError:
            continue
        if isinstance(e, dict):  # a format-2 step (no "ev"): the row says the op
            yield e if "ev" in e else F.long_view(e)


def _last_step(trace: Path) -> str | None:
    """"thread.label" of the last step a rank traced, or None (none yet)."""
    for e in _tail_events(trace):
        if e.get("label") and e.get("ev", "step") == "step":
            return f"{e.get('thread')}.{e['label']}"
    return None


def _last_ids(trace: Path) -> dict:
    """Where a killed rank was: call_id / chunk_index / cache_epoch of the last message it
    traced and the group of its last op (read from the tail of its rank{R}.jsonl)."""
    out: dict = {}
    for e in _tail_events(trace):
        if "group" not in out and e.get("op") in ("send", "recv", "coll"):
            out["group"] = e.get("group") or "world_pg(p2p)"
        m = e.get("msg")
        if isinstance(m, dict) and "call_id" in m:
            out.update(call_id=m["call_id"], chunk_index=m["chunk"], cache_epoch=m["epoch"])
            break
    return out


def native_last_words(err: Path) -> str | None:
    """What a rank that died of a signal of its own (SIGABRT: a C++ exception nobody
    caught, e.g. gloo's size check when the ranks' collectives do not match) wrote last
    on stderr, without gloo's source path; None when it wrote nothing."""
    try:
        said = [ln.strip() for ln in err.read_text(errors="replace").splitlines()
                if ln.strip()]
    except OSError:
        return None
    if not said:
        return None
    return backend_text(said[-1].removeprefix("what():").strip())[:300]


LAUNCH_RECORD = "launch.json"
RUN_LOCK = ".lockstep.lock"

_claims: dict[Path, list] = {}   # run directory -> [open lock file, nesting count]
_claims_lock = threading.Lock()


class RunDirInUse(ValueError):
    """Another live process runs in this run directory (a usage error: choose --out)."""


@contextmanager
def claim_run_dir(run_dir: Path):
    """Hold RUN_DIR/.lockstep.lock (flock) while a run uses the directory. Two runs in one
    directory (two `lockstep run` with the default --out runs/latest) deleted each
    other's traces and interleaved rank files; the second is refused by name instead.
    flock, not a pid file: the kernel drops it when the holder dies, kill -9 included,
    and the file descriptor is not inherited by the ranks. Nested claims by one process
    (run_local around spawn_local) share the one lock."""
    run_dir = Path(run_dir).resolve()
    path = run_dir / RUN_LOCK
    with _claims_lock:
        held = _claims.get(run_dir)
        while held is None:
            f = open(path, "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                who = f.read().strip() or "unknown pid"
                f.close()
                raise RunDirInUse(f"run directory {run_dir} is in use by another run "
                                  f"({who}); give this run another --out") from None
            try:   # the holder before us unlinks the file on release: lock the one there
                same = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                f.close()
                continue
            f.truncate(0)
            f.write(f"pid {os.getpid()}\n")
            f.flush()
            held = _claims[run_dir] = [f, 0]
        held[1] += 1
    try:
        yield run_dir
    finally:
        with _claims_lock:
            held[1] -= 1
            if held[1] == 0:
                del _claims[run_dir]
                path.unlink(missing_ok=True)   # while still locked: no one else's file
                held[0].close()                # closing drops the flock


def record_stopped_start(run_dir: Path, e: Interrupted, world_size: int, started: int = 0):
    """A launch stopped by a signal before all its ranks ran: RUN_DIR/launch.json says so
    (ranks ``< started`` were killed, the rest never started), and ``e`` names the run.
    Without it a run directory holding only run.json read as a kill -9 of every rank."""
    rec = {"deadline_s": None, "deadline_hit": False, "killed_at_deadline": [],
           "signalled": [], "returncodes": [],
           "interrupted": {"signal": e.name, "t_s": 0.0, "killed": list(range(started)),
                           "not_started": list(range(started, world_size))}}
    try:
        (Path(run_dir) / LAUNCH_RECORD).write_text(json.dumps(rec, indent=1))
    except OSError:
        pass
    e.run_dir, e.killed = str(run_dir), list(range(started))


class LocalRun:
    """Handle on running ranks: ``wait()``, ``kill_rank()``, ``kill_all()``; a context
    manager whose exit SIGKILLs anything left. Create it from the thread that will live as
    long as the ranks (PR_SET_PDEATHSIG fires when the *creating thread* exits)."""

    def __init__(self, world_size: int, target: str, args: dict, *, run_dir,
                 env: dict | None = None, run_id: str | None = None):
        # Absolute: the ranks start in the run directory, whatever the caller's cwd.
        self.run_dir = Path(run_dir).resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._claim = claim_run_dir(self.run_dir)
        self._claim.__enter__()      # released in __exit__ (or below, if starting fails)
        try:
            self._start(world_size, target, args, env, run_id)
        except Interrupted as e:     # stopped while starting (torch's import is seconds)
            record_stopped_start(self.run_dir, e, world_size,
                                 started=len(getattr(self, "_procs", ())))  # _start killed those
            self._claim.__exit__(None, None, None)
            raise
        except BaseException:
            self._claim.__exit__(None, None, None)
            raise

    def _start(self, world_size, target, args, env, run_id) -> None:
        run_id = run_id or uuid.uuid4().hex[:12]
        self.run_id, self.world_size = run_id, world_size
        self._procs: list = []        # subprocess.Popen, or forkserver.ForkedRank
        self._waiters: list[threading.Thread] = []
        base = dict(os.environ)
        base.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one host: keep gloo on loopback
        base.update(env or {})
        # One torch import for the run, not one per rank (runtime/forkserver.py); started
        # first, its import overlaps this process's own.
        from .forkserver import ForkServer, enabled
        self._server = ForkServer(base, self.run_dir, preexec_fn=_pdeathsig
                                  if _PRCTL is not None else None) if enabled(base) else None
        self.server_pid = self._server.pid if self._server is not None else None
        try:
            self._start_ranks(world_size, target, args, run_id, base)
        except BaseException:
            self._own_kills = set(range(world_size))
            self.kill_all()
            self._close_server(kill=True)
            raise

    def _start_ranks(self, world_size, target, args, run_id, base) -> None:
        # The side channel's store lives HERE, in the parent, before any rank starts.
        from datetime import timedelta

        from torch.distributed import TCPStore

        from lockstep.runtime.sidechannel import init_keys
        self._store = TCPStore("127.0.0.1", 0, None, True, timeout=timedelta(seconds=5),
                               wait_for_workers=False)
        init_keys(self._store, run_id, world_size)
        self._store_lock = threading.Lock()
        self._own_kills: set[int] = set()      # ranks killed by the launcher itself
        side_port = self._store.port
        # The ranks' rendezvous goes through the same store, as under torchrun's agent
        # (TORCHELASTIC_USE_AGENT_STORE: every rank a client, none binds MASTER_PORT).
        # A port picked free here and bound by rank 0 seconds later (after its imports)
        # could be taken in between by another job on the host: rank 0 then failed
        # (EADDRINUSE) and the other ranks talked to that job's listener. This one is
        # bound already, for the run's whole life.
        master_port = side_port
        (self.run_dir / LAUNCH_RECORD).unlink(missing_ok=True)   # an earlier run's
        args_file = self.run_dir / "args.json"
        args_file.write_text(json.dumps(args, sort_keys=True))
        self.result = LaunchResult(world_size, str(self.run_dir), run_id, master_port,
                                   side_port, start_time=time.monotonic())
        self._lock = threading.Lock()
        self._exited = threading.Condition(self._lock)
        for rank in range(world_size):
            renv = dict(base)
            renv.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master_port),
                        TORCHELASTIC_USE_AGENT_STORE="True",
                        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                        LOCAL_WORLD_SIZE=str(world_size),
                        LOCKSTEP_SIDE_ADDR="127.0.0.1",
                        LOCKSTEP_SIDE_PORT=str(side_port), LOCKSTEP_RUN_ID=run_id,
                        LOCKSTEP_RUN_DIR=str(self.run_dir))
            out = self.run_dir / f"rank{rank}.out"
            err = self.run_dir / f"rank{rank}.err"
            argv = ["--target", target, "--args-file", str(args_file)]
            if self._server is not None:
                p = self._server.spawn(renv, argv, str(self.run_dir), str(out), str(err))
            else:
                with open(out, "wb") as fo, open(err, "wb") as fe:
                    p = subprocess.Popen(
                        [sys.executable, "-m", "lockstep.runtime.worker_main", *argv],
                        env=renv, cwd=str(self.run_dir), stdin=subprocess.DEVNULL,
                        stdout=fo, stderr=fe, start_new_session=True,
                        preexec_fn=_pdeathsig if _PRCTL is not None else None)
            self._procs.append(p)
            self.result.ranks.append(RankResult(rank, p.pid, stdout_path=str(out),
                                                stderr_path=str(err)))
            w = threading.Thread(target=self._wait_one, args=(rank,), daemon=True,
                                 name=f"lockstep-waiter-{rank}")
            w.start()
            self._waiters.append(w)
        if self._server is not None:
            self._server.done()     # it leaves once it has reaped the last rank
        # Started now: the first fork waited for the server's import, which is set-up
        # (as the store's was), not the run the deadline and the exit times measure.
        self.result.start_time = time.monotonic()

    def _close_server(self, kill: bool = False) -> None:
        server, self._server = getattr(self, "_server", None), None
        if server is not None:
            server.close(kill=kill)

    # One thread per rank: stamp the exit time, kill the rank's group, then reap.
    def _wait_one(self, rank: int) -> None:
        p = self._procs[rank]
        if isinstance(p, subprocess.Popen):
            rc, t = _reap(p)
        else:   # forked: the fork server reaped it by the same rule and stamped its exit
            rc, t = p.wait_exit()
        self._record_cause(rank, rc)
        try:   # the rank reads nothing more: a peer lingering after a terminal message
            with self._store_lock:   # may go (sidechannel.linger_then_release)
                self._store.set(f"lockstep/{self.run_id}/exit/{rank}", "1")
        except Exception:  # noqa: BLE001
            pass
        with self._exited:
            rr = self.result.ranks[rank]
            rr.returncode, rr.exit_time = rc, t
            self._exited.notify_all()

    def _record_cause(self, rank: int, rc: int) -> None:
        """First-cause-wins: a rank killed by a signal (not by us) is a root cause, and so
        is an error exit that left the flag clear (e.g. died before its side channel)."""
        if rc == 0 or rc == EXIT_RELEASED or rank in self._own_kills:
            return
        from lockstep.model import release as R
        from lockstep.runtime.sidechannel import peer_role, set_first_cause
        p = f"lockstep/{self.run_id}/"
        try:
            with self._store_lock:
                role = peer_role(self._store, f"{p}role/{rank}", rank)
                if rc < 0:
                    try:
                        name = signal.Signals(-rc).name
                    except ValueError:
                        name = f"signal {-rc}"
                    said = None if rc == -signal.SIGKILL else \
                        native_last_words(self.run_dir / f"rank{rank}.err")
                    if said:
                        self.result.last_words[rank] = said
                    lost = getattr(self._procs[rank], "lost_with", None)
                    c = R.cause("killed", rank, role,
                                f"killed by {name} (pid {self._procs[rank].pid}); "
                                + (f"its parent died first: {lost}" if lost else
                                   "reaped by the launcher")
                                + (f"; its stderr: {said}" if said else ""),
                                **_last_ids(self.run_dir / f"rank{rank}.jsonl"))
                    set_first_cause(self._store, p + "cause", p + "abort", c)
                    return
                # An error exit settled its own cause (recorded, and released when its
                # peers had read its terminal message): only a rank that died before its
                # side channel left none, and then the launcher's record releases them.
                c = R.cause("error", rank, role, f"exited with code {rc} without "
                            f"recording a cause; reaped by the launcher")
                if R.decode(self._store.compare_set(p + "cause", "", R.encode(c))) == c:
                    set_first_cause(self._store, p + "cause", p + "abort", c)
        except Exception:  # noqa: BLE001 - recording is best effort, reaping is not
            pass

    def abort_cause(self) -> dict | None:
        """The root cause in the run's abort flag (None: clear)."""
        from lockstep.model import release as R
        with self._store_lock:
            return R.decode(self._store.get(f"lockstep/{self.run_id}/abort"))

    def alive(self) -> list[int]:
        with self._lock:
            return [r.rank for r in self.result.ranks if r.exit_time is None]

    def kill_rank(self, rank: int, sig: int = signal.SIGKILL) -> float:
        """Send ``sig`` to rank's process group; returns (and records) the monotonic time."""
        t = time.monotonic()
        self.result.faults.append((rank, int(sig), t))
        with self._lock:
            done = self.result.ranks[rank].exit_time is not None
        if not done:
            try:
                os.killpg(self._procs[rank].pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        return t

    def kill_all(self, sig: int = signal.SIGKILL) -> None:
        for p in self._procs:
            if p.returncode is None:
                try:
                    os.killpg(p.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass

    def wait(self, deadline_s: float) -> LaunchResult:
        """Wait for every rank until ``deadline_s`` from now; SIGKILL the rest."""
        end = time.monotonic() + deadline_s
        with self._exited:
            while any(r.exit_time is None for r in self.result.ranks):
                left = end - time.monotonic()
                if left <= 0:
                    break
                self._exited.wait(left)
            late = [r.rank for r in self.result.ranks if r.exit_time is None]
        if late:
            self.result.deadline_hit = True
            self.result.alive_at_deadline = late
            for r in late:
                self.result.ranks[r].killed_at_deadline = True
            self._own_kills.update(late)
            try:
                from lockstep.model import release as R
                from lockstep.runtime.sidechannel import set_first_cause
                p = f"lockstep/{self.run_id}/"
                with self._store_lock:
                    set_first_cause(self._store, p + "cause", p + "abort", R.cause(
                        "deadline", -1, "launcher", f"hard deadline {deadline_s:g}s: "
                        f"ranks {late} still alive, killed"))
            except Exception:  # noqa: BLE001
                pass
            self.kill_all()
        for w in self._waiters:
            w.join(10.0)
        self.result.end_time = time.monotonic()
        try:
            self.result.cause = self.abort_cause()
        except Exception:  # noqa: BLE001
            pass
        self._write_record(deadline_s)
        return self.result

    def interrupt(self, e: Interrupted, deadline_s: float) -> None:
        """The launcher was stopped by a signal: kill every rank still alive (they are the
        launcher's own kills, not root causes) and record it in launch.json."""
        with self._lock:
            alive = [r.rank for r in self.result.ranks if r.exit_time is None]
        self._own_kills.update(range(len(self._procs)))
        self.kill_all()
        for w in self._waiters:
            w.join(10.0)
        self.result.end_time = time.monotonic()
        self.result.interrupted = {"signal": e.name,
                                   "t_s": round(self.result.end_time
                                                - self.result.start_time, 3),
                                   "killed": alive}
        self._write_record(deadline_s)
        e.run_dir, e.killed = str(self.run_dir), alive

    def _write_record(self, deadline_s: float) -> None:
        """RUN_DIR/launch.json: what the launcher did to the ranks, which their traces
        cannot say (a rank killed at the hard deadline or by fault injection writes no
        exit line); the conformance report names it (conformance/report.py)."""
        res = self.result
        rec = {"deadline_s": deadline_s, "deadline_hit": res.deadline_hit,
               "killed_at_deadline": res.alive_at_deadline,
               "signalled": [{"rank": r, "signal": sig, "t_s": round(t - res.start_time, 3)}
                             for r, sig, t in res.faults],
               "returncodes": res.returncodes,
               "wall_s": round(res.end_time - res.start_time, 3)}
        if res.interrupted is not None:
            rec["interrupted"] = res.interrupted
        if res.last_words:
            rec["last_words"] = {str(r): w for r, w in res.last_words.items()}
        try:
            (self.run_dir / LAUNCH_RECORD).write_text(json.dumps(rec, indent=1))
        except OSError:
            pass

    def __enter__(self) -> "LocalRun":
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._own_kills.update(range(len(self._procs)))
            self.kill_all()
            for w in self._waiters:
                w.join(10.0)
            self._close_server()
        finally:
            claim, self._claim = self._claim, None
            if claim is not None:
                claim.__exit__(None, None, None)


def start_local(world_size: int, target: str, args: dict, *, run_dir, env=None,
                run_id=None) -> LocalRun:
    """Start the ranks and return at once (use as a context manager)."""
    return LocalRun(world_size, target, args, run_dir=run_dir, env=env, run_id=run_id)


def spawn_local(world_size: int, target: str, args: dict, *, deadline_s: float, run_dir,
                env: dict | None = None, run_id: str | None = None,
                on_start: Callable[[LocalRun], None] | None = None) -> LaunchResult:
    """Run ``target`` ("module:function", called as f(rank, world_size, args)) on
    ``world_size`` local processes and wait with a HARD deadline.

    ``on_start(run)`` (optional) runs in a helper thread once every rank is started, e.g. to
    inject faults with ``kill_rank(run, r)``; the deadline holds even if it blocks. No child
    outlives this call.
    """
    run = LocalRun(world_size, target, args, run_dir=run_dir, env=env, run_id=run_id)
    try:
        if on_start is not None:
            def _cb():
                try:
                    on_start(run)
                except BaseException as e:  # reported, never raised in a helper thread
                    run.result.on_start_error = f"{type(e).__name__}: {e}"
            threading.Thread(target=_cb, daemon=True, name="lockstep-on-start").start()
        return run.wait(deadline_s)
    except Interrupted as e:
        run.interrupt(e, deadline_s)
        raise
    finally:
        run.__exit__(None, None, None)


def kill_rank(run: "LocalRun | LaunchResult", rank: int, sig: int = signal.SIGKILL) -> float:
    """Fault injection from the parent: signal one rank's process group. Returns the
    monotonic fault time (also recorded in ``result.faults``)."""
    if isinstance(run, LaunchResult):  # already finished: only record, nothing to kill
        t = time.monotonic()
        run.faults.append((rank, int(sig), t))
        return t
    return run.kill_rank(rank, sig)
