"""Where a rank's CPU goes: per-thread CPU counters and, on request, a cProfile.

Switched on by the environment (the launcher passes it to every rank), so a run's
options, parity and traces stay what they are:

  LOCKSTEP_PROFILE=cpu       each rank writes rank{r}.cpu.json: CPU seconds of each
                             interpreter thread (``time.thread_time``; its system part
                             from /proc, in clock ticks) and of the whole
                             process (every thread: gloo's, the completer's) from the
                             start of the interpreter threads to their end
  LOCKSTEP_PROFILE=cprofile  the same, and a cProfile (it roughly doubles the Python
                             cost: use it for where, not for how much). Before Python
                             3.12: rank{r}.{thread}.pstats per interpreter thread, timed
                             by the thread's CPU clock. From 3.12 cProfile is built on
                             sys.monitoring, one profiler per interpreter, which sees
                             every thread (a second one refuses to start): one
                             rank{r}.pstats for the whole rank, timed by the wall clock
                             (a per-thread CPU clock read from whichever thread an event
                             fires in would mix threads), written when the last
                             interpreter thread ends.

`python -m lockstep.runtime.cpuprofile RUN_DIR [--top N]` prints the counters per chunk
and, where pstats exist, each thread's top functions by own time. Wall time says little
on shared cores; CPU time is what a rank spends, whoever else is running.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

ENV = "LOCKSTEP_PROFILE"
MODES = ("cpu", "cprofile")
# cProfile on sys.monitoring: one profiler per interpreter, seeing every thread
PROCESS_WIDE_PROFILER = sys.version_info >= (3, 12)


def mode() -> str | None:
    m = os.environ.get(ENV) or None
    if m is not None and m not in MODES:
        raise ValueError(f"{ENV}={m!r}: one of {MODES}")
    return m


def _process_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01


def _thread_user_sys_s() -> tuple:
    """(user, system) CPU seconds of the calling thread (Linux /proc; clock ticks), or
    (0, 0) where there is none: how much of a thread's CPU is the kernel's (system calls,
    wake-ups) rather than Python's."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    return int(fields[11]) * _TICK_S, int(fields[12]) * _TICK_S


class RankProfile:
    """Wraps each interpreter thread's body; `dump()` writes what was measured."""

    def __init__(self, run_dir: Path, rank: int, how: str):
        self.run_dir, self.rank, self.how = Path(run_dir), rank, how
        self.threads: dict[str, float] = {}
        self.kernel: dict[str, float] = {}      # of which system time
        self.t0 = _process_cpu_s()
        self._lock = threading.Lock()
        self._shared = None        # the process-wide profiler (3.12+) while a body runs
        self._running = 0

    def run(self, name: str, body, *args) -> None:
        per_thread = self.how == "cprofile" and not PROCESS_WIDE_PROFILER
        if self.how == "cprofile" and PROCESS_WIDE_PROFILER:
            self._enter_shared()
        prof = None
        if per_thread:
            import cProfile
            prof = cProfile.Profile(time.thread_time)   # CPU, not wall: what this thread spends
        c0, (_, k0) = time.thread_time(), _thread_user_sys_s()
        try:
            if prof is None:
                body(*args)
            else:
                prof.runcall(body, *args)
        finally:
            self.threads[name] = time.thread_time() - c0
            self.kernel[name] = _thread_user_sys_s()[1] - k0
            if prof is not None:
                prof.dump_stats(self.run_dir / f"rank{self.rank}.{name}.pstats")
            if self.how == "cprofile" and PROCESS_WIDE_PROFILER:
                self._leave_shared()

    def _enter_shared(self) -> None:
        with self._lock:
            if self._running == 0:
                import cProfile
                self._shared = cProfile.Profile()
                self._shared.enable()
            self._running += 1

    def _leave_shared(self) -> None:
        with self._lock:
            self._running -= 1
            if self._running == 0:
                self._shared.disable()
                self._shared.dump_stats(self.run_dir / f"rank{self.rank}.pstats")
                self._shared = None

    def dump(self, chunks: int) -> None:
        out = {"rank": self.rank, "chunks": chunks, "process_s": _process_cpu_s() - self.t0,
               "threads_s": self.threads, "threads_sys_s": self.kernel, "mode": self.how}
        (self.run_dir / f"rank{self.rank}.cpu.json").write_text(json.dumps(out, indent=1))


def load(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(run_dir).glob("rank*.cpu.json"))]


def cpu_lines(rows: list[dict]) -> list[str]:
    """CPU ms per chunk of each rank (process, then each interpreter thread) and the sum."""
    out = [f"  {'rank':<6} {'process':>9}  interpreter threads (CPU ms per chunk)"]
    total = 0.0
    for r in rows:
        n = max(1, r["chunks"])
        total += r["process_s"] / n
        sys_s = r.get("threads_sys_s", {})
        th = "  ".join(f"{k} {v / n * 1e3:.3f} (sys {sys_s.get(k, 0.0) / n * 1e3:.3f})"
                       for k, v in r["threads_s"].items())
        out.append(f"  {r['rank']:<6} {r['process_s'] / n * 1e3:9.3f}  {th}")
    out.append(f"  {'all':<6} {total * 1e3:9.3f}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lockstep.runtime.cpuprofile")
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args(argv)
    rows = load(a.run_dir)
    if not rows:   # a usage error (2, as the CLI's): the run was not profiled
        print(f"{ap.prog}: {a.run_dir}: no rank*.cpu.json (run with {ENV}=cpu)",
              file=sys.stderr)
        return 2
    print("\n".join(cpu_lines(rows)))
    import pstats
    for p in sorted(a.run_dir.glob("rank*.pstats")):
        print(f"\n== {p.name} (own time, top {a.top})")
        pstats.Stats(str(p)).sort_stats("tottime").print_stats(a.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
