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


def readme_modules() -> list:
    """The `python -m MODULE` tools the README's bash blocks run."""
    text = (ROOT / "README.md").read_text()
    return sorted({m for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)
                   for m in re.findall(r"python -m (lockstep\.[\w.]+)", block)})


@pytest.mark.parametrize("module", readme_modules())
def test_every_value_option_of_a_readme_tool_says_its_default(module):
    """`python -m lockstep.stress --help` showed `--runs RUNS` with no word of what or
    how many; chaos's and bench's options, and soak's and differential's, no default."""
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    body = p.stdout.split("options:", 1)[1]
    entries = [" ".join(e.split()) for e in re.split(r"\n  (?=-)", "\n" + body)]
    takes_value = [e for e in entries if re.match(r"-[-\w]+(, -[-\w]+)? [A-Z_]+", e)]
    assert takes_value, p.stdout
    for e in takes_value:
        assert "default" in e, (module, e)
