"""lockstep as a user installs it: a wheel into a fresh venv, run from outside the checkout.

The checkout's own venv is an editable install, where a missing package-data entry or a
top-level module left behind still works by accident; only a real wheel in a clean venv,
run from a directory that is not the repository, shows what a user gets.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TORCH = "torch==2.13.0"   # the CPU wheel; an unpinned torch pulls a multi-GB CUDA build


def _run(cmd, cwd, timeout=600):
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(map(str, cmd))} -> {p.returncode}\n" \
        f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # Build from a copy: setuptools reuses ./build/lib, where a module deleted from the
    # checkout would linger and ship in the wheel.
    src = tmp_path_factory.mktemp("src") / "lockstep"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "runs", "out", "__pycache__"))
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
          "-w", str(out), str(src)], cwd=out, timeout=120)
    (whl,) = out.glob("lockstep-*.whl")
    return whl


def test_wheel_holds_one_top_level_package_and_its_data(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if ".dist-info/" not in n}
    assert tops == {"lockstep"}, tops
    assert "lockstep/model/manifest.json" in names
    for pkg in ("model", "runtime", "conformance"):
        assert f"lockstep/{pkg}/__init__.py" in names


def test_installed_wheel_runs_from_outside_the_checkout(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path, timeout=120)
    py = venv / "bin" / "python"
    # --no-compile: byte-compiling all of torch up front is most of the install's time;
    # what the commands import is compiled on first use, as for any user
    _run([py, "-m", "pip", "install", "-q", "--no-compile", TORCH, str(wheel)], cwd=tmp_path,
         timeout=900)
    files = _run([py, "-m", "pip", "show", "-f", "lockstep"], cwd=tmp_path)
    listed = [ln.strip() for ln in files.split("Files:", 1)[1].splitlines() if ln.strip()]
    tops = {f.split("/")[0] for f in listed if not f.startswith("..")
            and ".dist-info" not in f.split("/")[0]}
    assert tops == {"lockstep"}, tops
    work = tmp_path / "elsewhere"
    work.mkdir()
    lockstep = venv / "bin" / "lockstep"
    assert "state-space manifest matches" in _run([lockstep, "manifest"], cwd=work)
    assert "all mutations caught" in _run([lockstep, "check", "--all-mutations"], cwd=work)
    assert _run([py, "-m", "lockstep", "--version"], cwd=work).startswith("lockstep ")
    out = _run([lockstep, "demo", "--out", "d", "--chunks", "8"], cwd=work)
    assert "conformance  trace conforms" in out, out
    assert (work / "d" / "run" / "rank0.jsonl").exists()   # a relative --out, resolved
