"""Run the multi-process tests N times in a row and print every failure.

    python -m lockstep.stress --runs 20 [--load 2] [--timeout 900] [-- PYTEST ARGS...]

Default tests: the multi-process files (tests/test_runtime_infra.py, test_runtime_run.py,
test_breakit.py, test_torchrun.py, test_interrupts.py, test_plugin.py, test_forkserver.py,
test_collective_mismatch.py).
``--load K`` starts K CPU-bound burner processes
beside them for the whole stress run (the 2-core CI box's reality), killed at the end.
Each run is one ``pytest -q -rf`` subprocess with a hard timeout (crash > hang here too);
a run's failures are the ``FAILED``/``ERROR`` lines pytest prints (``-rfE``: a fixture
that fails is an ERROR, which ``-rf`` alone does not list), and a failing run's whole
output is kept in ``stress-run<N>.log``. A flaky test is a defect to fix
at its cause: nothing here retries.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

DEFAULT = ["tests/test_runtime_infra.py", "tests/test_runtime_run.py",
           "tests/test_breakit.py", "tests/test_torchrun.py", "tests/test_interrupts.py",
           "tests/test_plugin.py", "tests/test_forkserver.py",
           "tests/test_collective_mismatch.py"]
BURN = "import os\nwhile True:\n    os.urandom(64)\n"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(prog="python -m lockstep.stress", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20,
                    help="pytest runs in a row, count (default: %(default)s)")
    ap.add_argument("--load", type=int, default=0, help="CPU-bound burners beside the tests, count (default: %(default)s)")
    ap.add_argument("--timeout", type=float, default=900.0, help="hard limit per run, s (default: %(default)s)")
    a = ap.parse_args(argv)
    tests = extra or DEFAULT
    burners = [subprocess.Popen([sys.executable, "-c", BURN], start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for _ in range(a.load)]
    failures, passed_in_a_row, t0 = [], 0, time.monotonic()
    try:
        for run in range(1, a.runs + 1):
            t = time.monotonic()
            p = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-rfE", "-p",
                                  "no:cacheprovider", *tests], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, start_new_session=True)
            try:
                out, _ = p.communicate(timeout=a.timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                out, _ = p.communicate()
                out += f"\nFAILED <run {run}> hard timeout {a.timeout:g}s"
            finally:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
            bad = [ln for ln in out.splitlines() if ln.startswith(("FAILED", "ERROR"))]
            if p.returncode != 0 and not bad:
                bad = [f"FAILED <run {run}> pytest exit {p.returncode}: "
                       f"{out.strip().splitlines()[-1] if out.strip() else ''}"]
            last = out.strip().splitlines()[-1] if out.strip() else ""
            print(f"run {run:3d}/{a.runs}: {'ok  ' if not bad else 'FAIL'} "
                  f"{time.monotonic() - t:6.1f} s  {last}", flush=True)
            for ln in bad:
                print(f"    {ln}", flush=True)
            if bad:   # the whole output of a failing run is the evidence: keep it
                log = os.path.abspath(f"stress-run{run}.log")
                with open(log, "w") as f:
                    f.write(out)
                print(f"    (full output: {log})", flush=True)
            failures += [(run, ln) for ln in bad]
            passed_in_a_row = 0 if bad else passed_in_a_row + 1
    finally:
        for b in burners:
            try:
                os.killpg(b.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            b.wait()
    print(f"stress: {a.runs} runs of {' '.join(tests)} with {a.load} CPU burner(s), "
          f"{time.monotonic() - t0:.0f} s: {a.runs - len({r for r, _ in failures})} passed, "
          f"{len(failures)} failure(s); last {passed_in_a_row} in a row passed")
    for run, ln in failures:
        print(f"  run {run}: {ln}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
