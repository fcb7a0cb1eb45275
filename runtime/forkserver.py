"""One torch import per run, not one per rank: a run's ranks are forked from a server
process that imported torch once.

Why: ``import torch`` is about 1.4 CPU s (most of it Python modules registering ops). A
local run of rank0 and a mesh of 3 paid it four times over before the first message; on
a 2-core machine those imports were most of a short run and most of the test suite's
CPU. The server (``python -m lockstep.runtime.forkserver``, started by the launcher with
the ranks' common environment and working directory, in a session of its own) imports
``torch.distributed`` and waits. For each rank the launcher sends one JSON line (no
pickle: the rank's environment, argv, working directory and output files); the server
forks, and the child becomes what ``python -m lockstep.runtime.worker_main`` would have
been: its own session (pgid == pid, so the launcher's ``killpg`` is a kill -9 of its
tree, as before), ``PR_SET_PDEATHSIG`` on the server (the server has it on the launcher:
a dead launcher still takes every rank down), stdin from /dev/null, stdout and stderr
on the rank's files, every other descriptor closed, the rank's environment and argv,
then ``runpy`` of worker_main as ``__main__``. Nothing of lockstep beyond its package
``__init__`` is imported before the fork, so the rank imports its own code fresh.

The server is the ranks' parent, so it reaps them, with the launcher's rule: woken by
SIGCHLD, it finds the exited rank with ``waitid(WNOWAIT)``, stamps ``time.monotonic()`` (one clock for every process on the
host), SIGKILLs the rank's process group while the zombie still holds the pid, reaps,
and reports ``{"exit": pid, "rc": rc, "t": t}``. The launcher's waiter threads wait on
those reports (``ForkedRank.wait_exit``) instead of ``waitid``.

Fork safety: after its imports the server holds no thread that can own a lock the child
needs (``import torch`` starts none; numpy's OpenBLAS pool re-initialises after fork,
as it does under torch's DataLoader workers) and has no process group, store or device
open: CUDA and NCCL are first touched in the child. ``LOCKSTEP_FORKSERVER=0`` starts
every rank with its own interpreter instead (runtime/launch.py).
"""
from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

PRELOAD = "torch.distributed"   # what every rank imports first, and what costs
ERR_NAME = "forkserver.err"     # the server's own stderr, in the run directory
MAX_LINE = 1 << 20              # a request line: environment and paths, never more
# How long the first spawn waits for the server's import (seconds, about 1.5 on an idle
# machine): an import that hangs (a stalled file system) is an error, not a hang.
START_TIMEOUT_S = float(os.environ.get("LOCKSTEP_FORKSERVER_START_S", "120"))

try:  # resolved before any fork: no dlopen in a child
    import ctypes
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _PRCTL = None


def enabled(environ) -> bool:
    return environ.get("LOCKSTEP_FORKSERVER", "1") != "0"


# --------------------------------------------------------------------------- launcher side

class ForkServerDied(RuntimeError):
    pass


class ForkedRank:
    """A rank forked by the server: what the launcher uses of ``subprocess.Popen``
    (``pid``, ``returncode``) and ``wait_exit()``, the exit the server stamped."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None
        self.exit_time: float | None = None
        self.lost_with: str | None = None   # the server died first: how (_why_dead)
        self._done = threading.Event()

    def _exited(self, rc: int, t: float) -> None:
        self.returncode, self.exit_time = rc, t
        self._done.set()

    def wait_exit(self) -> tuple[int, float]:
        """(returncode, monotonic exit time); the process group was killed and the pid
        reaped by the server before it said so."""
        self._done.wait()
        return self.returncode, self.exit_time


class ForkServer:
    """The launcher's handle on a run's server. Create it from the thread that will live
    as long as the ranks (PR_SET_PDEATHSIG fires when the creating thread exits)."""

    def __init__(self, env: dict, cwd: Path, preexec_fn=None):
        self._err_path = Path(cwd) / ERR_NAME
        with open(self._err_path, "wb") as fe:
            self._proc = subprocess.Popen(
                # the run's args.json in the command line, as a rank's own has it: the
                # forked ranks share it, so what looks for a run's processes by it
                # (pgrep -f, the chaos trials' leftovers) finds them
                [sys.executable, "-m", "lockstep.runtime.forkserver", "--for",
                 str(Path(cwd) / "args.json")], env=env,
                cwd=str(cwd), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=fe,
                start_new_session=True, preexec_fn=preexec_fn)
        self._lock = threading.Lock()
        self._spawned = threading.Condition(self._lock)
        self._pids: dict[int, int] = {}          # request number -> pid
        self._ranks: dict[int, ForkedRank] = {}  # pid -> handle
        self._early: dict[int, tuple[int, float]] = {}   # exits reported before the handle
        self._errors: dict[int, str] = {}
        self._dead = False
        self._next = 0
        self._reader = threading.Thread(target=self._read, daemon=True,
                                        name="lockstep-forkserver-reader")
        self._reader.start()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _read(self) -> None:
        for raw in self._proc.stdout:
            try:
                msg = json.loads(raw)
            except ValueError:
                continue
            with self._lock:
                if "spawned" in msg:
                    self._pids[msg["spawned"]] = msg["pid"]
                    self._spawned.notify_all()
                elif "failed" in msg:
                    self._errors[msg["failed"]] = str(msg.get("error"))
                    self._spawned.notify_all()
                elif "exit" in msg:
                    h = self._ranks.get(msg["exit"])
                    if h is None:
                        self._early[msg["exit"]] = (msg["rc"], msg["t"])
                    else:
                        h._exited(msg["rc"], msg["t"])
        # EOF: the server is gone. Its ranks died with it (PR_SET_PDEATHSIG) and nobody
        # will report them: they end as killed, now.
        t = time.monotonic()
        why = self._why_dead()
        with self._lock:
            self._dead = True
            self._spawned.notify_all()
            for h in self._ranks.values():
                if h.returncode is None:
                    h.lost_with = why
                    h._exited(-signal.SIGKILL, t)

    def _why_dead(self) -> str:
        try:
            tail = self._err_path.read_text(errors="replace").strip().splitlines()[-1:]
        except OSError:
            tail = []
        rc = self._proc.poll()
        return f"the fork server (pid {self._proc.pid}) exited" + \
            (f" with {rc}" if rc is not None else "") + (f": {tail[0]}" if tail else "")

    def spawn(self, env: dict, argv: list[str], cwd: str, stdout: str,
              stderr: str) -> ForkedRank:
        """Fork one rank; returns once its pid is known (after the server's import)."""
        with self._lock:
            n, self._next = self._next, self._next + 1
        line = json.dumps({"n": n, "env": env, "argv": argv, "cwd": cwd,
                           "stdout": stdout, "stderr": stderr}).encode() + b"\n"
        try:
            self._proc.stdin.write(line)
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise ForkServerDied(self._why_dead()) from None
        end = time.monotonic() + START_TIMEOUT_S
        with self._spawned:
            while n not in self._pids and n not in self._errors and not self._dead:
                left = end - time.monotonic()
                if left <= 0:
                    self._proc.kill()
                    raise ForkServerDied(
                        f"the fork server (pid {self._proc.pid}) did not fork within "
                        f"{START_TIMEOUT_S:g} s (LOCKSTEP_FORKSERVER_START_S): its "
                        f"import of {PRELOAD} hangs; LOCKSTEP_FORKSERVER=0 starts each "
                        "rank with its own interpreter")
                self._spawned.wait(left)
            if n in self._errors:
                raise ForkServerDied(f"the fork server could not fork: {self._errors[n]}")
            if n not in self._pids:
                raise ForkServerDied(self._why_dead())
            pid = self._pids[n]
            h = self._ranks[pid] = ForkedRank(pid)
            if pid in self._early:
                h._exited(*self._early.pop(pid))
        return h

    def done(self) -> None:
        """No more ranks: the server leaves once it has reported every one."""
        try:
            self._proc.stdin.close()
        except OSError:
            pass

    def close(self, kill: bool = False) -> None:
        """Wait for the server to leave (at once with ``kill``, which takes its ranks
        down by their PR_SET_PDEATHSIG)."""
        self.done()
        if kill:
            self._proc.kill()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._reader.join(5)
        try:
            if self._err_path.stat().st_size == 0:
                self._err_path.unlink()
        except OSError:
            pass


# --------------------------------------------------------------------------- server side

def _child(req: dict, server: int, ready: int) -> None:
    """In the forked child: become the rank. Never returns."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)                 # the server's, not the rank's
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setsid()
        if _PRCTL is not None:
            _PRCTL(1, int(signal.SIGKILL))   # PR_SET_PDEATHSIG: die with the server
        if os.getppid() != server:           # the server died before that
            os._exit(1)
        os.close(ready)     # a session of its own now: a killpg of its pid reaches it
        null = os.open(os.devnull, os.O_RDONLY)
        out = os.open(req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        err = os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        for fd, to in ((null, 0), (out, 1), (err, 2)):
            os.dup2(fd, to)
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))   # as Popen's close_fds
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        import runpy
        sys.argv = ["lockstep.runtime.worker_main"] + list(req["argv"])
        try:
            runpy.run_module("lockstep.runtime.worker_main", run_name="__main__",
                             alter_sys=True)
            code = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
        except BaseException:   # noqa: BLE001 - what the interpreter would print
            import traceback
            traceback.print_exc()
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except Exception:   # noqa: BLE001
                pass
    finally:
        os._exit(code)


def _serve() -> None:
    import importlib
    importlib.import_module(PRELOAD)
    report = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)   # nothing else may write the reports
    me = os.getpid()
    # Exits wake the loop through SIGCHLD's wakeup pipe, not pidfds: gVisor and kernels
    # before 5.3 have no pidfd_open.
    woke, wake = os.pipe()
    os.set_blocking(woke, False)
    os.set_blocking(wake, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake)
    sel = selectors.DefaultSelector()
    sel.register(0, selectors.EVENT_READ, "requests")
    sel.register(woke, selectors.EVENT_READ, "exits")
    children: set[int] = set()
    buf, reading, heard = b"", True, True

    def say(msg: dict) -> None:
        nonlocal heard
        if heard:
            try:
                report.write(json.dumps(msg).encode() + b"\n")
            except OSError:     # the launcher is gone: reap what is left, say nothing
                heard = False

    def fork(req: dict) -> None:
        r, w = os.pipe()
        try:
            pid = os.fork()
        except OSError as e:
            os.close(r)
            os.close(w)
            say({"failed": req["n"], "error": f"{type(e).__name__}: {e}"})
            return
        if pid == 0:
            os.close(r)
            _child(req, me, w)
        # Its pid is said once it leads its own session (the child closes the pipe
        # then, or dies): a launcher's killpg right after the spawn, as
        # Popen(start_new_session=True) guarantees, must reach it.
        os.close(w)
        os.read(r, 1)
        os.close(r)
        children.add(pid)
        say({"spawned": req["n"], "pid": pid})

    def reap() -> None:
        while children:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            if info is None:
                return
            pid = info.si_pid
            t = time.monotonic()
            try:   # leftover grandchildren in the rank's session; pid not reaped yet
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            _, status = os.waitpid(pid, 0)
            children.discard(pid)
            say({"exit": pid, "rc": os.waitstatus_to_exitcode(status), "t": t})

    while reading or children:
        for key, _ in sel.select():
            if key.data == "exits":
                try:
                    while os.read(woke, 4096):
                        pass
                except BlockingIOError:
                    pass
                reap()
                continue
            chunk = os.read(0, 65536)
            if not chunk:
                sel.unregister(0)
                reading = False
                continue
            buf += chunk
            if len(buf) > MAX_LINE and b"\n" not in buf:
                raise SystemExit(f"forkserver: a request line over {MAX_LINE} bytes")
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                fork(json.loads(line))
        reap()   # an exit whose wakeup byte came in the same select as a request


if __name__ == "__main__":
    _serve()
