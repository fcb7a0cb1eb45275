#!/usr/bin/env python3
"""Re-record the whole trace corpus from each directory's COMMAND, then check it.

    .venv/bin/python traces/record.py [NAME ...]     # default: every traces/*/COMMAND

A COMMAND file holds one `lockstep ...` command line (a `#` starts the note on where it
ran). `lockstep run ... --out traces/NAME` records into its directory; `lockstep breakit
--case CASE` records into a scratch directory whose CASE run is then copied in. After
recording, every run must conform and `lockstep coverage traces/*/` is printed, so a
branch that changes the runtime can re-record the corpus in one command.
"""
from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LOCKSTEP = [sys.executable, "-m", "lockstep"]


def command(run_dir: Path) -> list:
    line = (run_dir / "COMMAND").read_text().split("#", 1)[0].strip()
    argv = shlex.split(line)
    if not argv or argv[0] != "lockstep":
        raise SystemExit(f"{run_dir}/COMMAND: not a lockstep command: {line!r}")
    return argv[1:]


def record(run_dir: Path) -> int:
    argv = command(run_dir)
    keep = run_dir / "COMMAND"
    note = keep.read_text()
    if argv[0] == "breakit":
        case = argv[argv.index("--case") + 1]
        with tempfile.TemporaryDirectory() as tmp:
            rc = subprocess.call(LOCKSTEP + argv + ["--no-baseline", "--out", tmp], cwd=ROOT)
            shutil.rmtree(run_dir)
            shutil.copytree(Path(tmp) / case, run_dir)
    else:
        shutil.rmtree(run_dir)
        rc = subprocess.call(LOCKSTEP + argv, cwd=ROOT)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "COMMAND").write_text(note)
    return rc


def main(names) -> int:
    dirs = [HERE / n for n in names] if names else sorted(
        p.parent for p in HERE.glob("*/COMMAND"))
    for d in dirs:
        rc = record(d)
        print(f"recorded {d.name} (exit {rc}: runs with an injected fault exit non-zero)")
    bad = [d.name for d in dirs
           if subprocess.call(LOCKSTEP + ["conform", str(d)], cwd=ROOT,
                              stdout=subprocess.DEVNULL) != 0]
    subprocess.call(LOCKSTEP + ["coverage"] + [str(p.parent) for p in
                                              sorted(HERE.glob("*/run.json"))], cwd=ROOT)
    if bad:
        print(f"DO NOT CONFORM: {', '.join(bad)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
