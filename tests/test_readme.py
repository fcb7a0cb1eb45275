"""The README's commands, as a user types them in the checkout: the ones cheap enough to
run here are run (through the CLI in this process, the shell's glob expanded from the
checkout as a shell would) and must exit 0."""
import contextlib
import glob
import io
import re
import shlex
from pathlib import Path

import pytest

from lockstep import cli

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list:
    """Every `bash dev.sh ...` line of the README's bash blocks, comment removed."""
    text = (ROOT / "README.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.split("  #", 1)[0].strip()
            if line.startswith("bash dev.sh "):
                out.append(line[len("bash dev.sh "):])
    return out


def test_the_readmes_coverage_command_runs_on_the_corpus(monkeypatch):
    """`coverage traces/*` took traces/README.md and traces/record.py for run
    directories and exited 2."""
    (line,) = [c for c in readme_commands() if c.startswith("coverage ")]
    monkeypatch.chdir(ROOT)
    argv = []
    for word in shlex.split(line):
        argv += sorted(glob.glob(word)) if any(ch in word for ch in "*?[") else [word]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    assert rc == 0, (line, rc, err.getvalue()[-2000:])
    assert "row coverage" in out.getvalue()
