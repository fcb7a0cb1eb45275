"""The optional compiled build (lockstep/accel.py): never stale, optional, and the same
answers as the Python it is compiled from."""
from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lockstep import accel

ROOT = Path(__file__).resolve().parent.parent
HAS_CYTHON = accel.missing_tool() == ""
needs_build = pytest.mark.skipif(not HAS_CYTHON, reason=accel.missing_tool() or "")


@pytest.fixture(scope="module")
def built():
    """The build of the current sources (dev.sh made it; a no-op then)."""
    assert accel.build(quiet=True) == [], "a driver module did not compile"
    return {n: accel.compiled_path(n, accel.source_file(n).read_bytes()) for n in accel.COMPILED}


def _python(code: str, env: dict, cwd, timeout: int = 300) -> str:
    p = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, **env})
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


# ------------------------------------------------------------------ never stale

PROBE = """
import json, sys
import lockstep
from lockstep import accel
mods = [__import__(n, fromlist=["x"]) for n in accel.COMPILED]
print(json.dumps({"package": lockstep.__file__, "describe": accel.describe(),
                  "files": {m.__name__: m.__file__ for m in mods},
                  "answer": mods[0].Model.__module__}))
"""


@pytest.fixture
def copy(tmp_path, built):
    """The package laid out as installed (lockstep/, lockstep/model/, ...) in a temp dir,
    with a build cache holding the real build of the (identical) sources."""
    pkg = tmp_path / "lockstep"
    shutil.copytree(ROOT / "lockstep", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    for sub in ("model", "conformance"):
        shutil.copytree(ROOT / sub, pkg / sub, ignore=shutil.ignore_patterns(
            "__pycache__", "testdata"))
    (pkg / "runtime").mkdir()
    (pkg / "runtime" / "__init__.py").write_text("")
    cache = tmp_path / "cache"
    cache.mkdir()
    for so in built.values():
        shutil.copy(so, cache / so.name)
        side = so.name[:-len(accel.SUFFIX)] + ".json"
        shutil.copy(so.with_name(side), cache / side)
    return tmp_path, {"PYTHONPATH": str(tmp_path), accel.DIR_ENV: str(cache)}


def _probe(copy, **extra) -> dict:
    tmp, env = copy
    env = {**env, **extra}
    if accel.PURE_ENV not in extra:
        env[accel.PURE_ENV] = ""
    out = json.loads(_python(PROBE, env, cwd=tmp))
    assert out["package"] == str(tmp / "lockstep" / "__init__.py")   # the copy, not the checkout
    return out


@needs_build
def test_the_build_of_the_current_source_is_loaded(copy):
    out = _probe(copy)
    for name, f in out["files"].items():
        assert f == str(copy[0] / "cache" / Path(f).name) and f.endswith(accel.SUFFIX), name
    assert out["describe"].startswith("compiled: semantics, explore, reduction, replay, "
                                      "load (Cython "), out["describe"]
    assert out["answer"] == "lockstep.model.semantics"       # the full module name


@needs_build
def test_an_edited_source_runs_as_python_until_the_next_build(copy):
    src = copy[0] / "lockstep" / "model" / "explore.py"
    src.write_text(src.read_text() + "\n# an edit\n")
    # An extension module beside the source (what `cythonize -i` leaves), which Python's
    # own finder would prefer to the edited .py: never loaded either.
    so = next(p for p in (copy[0] / "cache").iterdir() if ".explore." in p.name
              and p.name.endswith(accel.SUFFIX))
    shutil.copy(so, src.with_name("explore" + accel.SUFFIX))
    out = _probe(copy)
    assert out["files"]["lockstep.model.explore"] == str(src)
    assert out["files"]["lockstep.model.semantics"].endswith(accel.SUFFIX)
    assert out["describe"].startswith("compiled: semantics, reduction, replay, load "
                                      "(Cython ")
    assert out["describe"].endswith("; pure: explore (no build of its current source)")


@needs_build
def test_lockstep_pure_forces_python(copy):
    out = _probe(copy, **{accel.PURE_ENV: "1"})
    for name, f in out["files"].items():
        assert f.endswith(".py"), name
    assert out["describe"] == f"pure Python ({accel.PURE_ENV}=1)"


def test_without_cython_the_build_says_so_in_one_line_and_nothing_is_built(
        monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(accel.DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "Cython", None)        # import Cython fails
    assert accel.build() == []
    out = capsys.readouterr().out.splitlines()
    assert out == ["lockstep accel: Cython is not installed (pip install cython): "
                   "everything runs as pure Python"]
    assert not (tmp_path / "cache").exists()


@needs_build
def test_without_a_c_compiler_the_build_says_so(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(accel.DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(accel.shutil, "which", lambda name: None)
    assert accel.build() == []
    (line,) = capsys.readouterr().out.splitlines()
    assert "no C compiler" in line and line.endswith("everything runs as pure Python")
    assert not (tmp_path / "cache").exists()


@needs_build
def test_the_suite_runs_on_the_compiled_modules(built):
    """`bash dev.sh test` builds before pytest: every driver module this process imported
    is the build of its current source (LOCKSTEP_PURE=1 runs the suite pure on purpose)."""
    if accel.forced_pure():
        pytest.skip(f"{accel.PURE_ENV}=1")
    for name in accel.COMPILED:
        mod = __import__(name, fromlist=["x"])
        assert mod.__file__ == str(built[name]), \
            f"{name} runs as Python: `lockstep accel build` was not run after an edit"


# ------------------------------------------------------------------ source readers

def test_definition_source_is_what_inspect_reads_of_a_python_function():
    from lockstep.model import guards, promela
    for key, obj in promela._watched().items():
        if key.startswith("guards."):
            assert accel.definition_source(obj) == inspect.getsource(obj), key


FINGERPRINTS = """
import inspect, json
from lockstep.model import promela, semantics
from lockstep import accel
print(json.dumps([inspect.isfunction(semantics.Model.step),
                  accel.definition_source(semantics.Model.step).lstrip().splitlines()[0],
                  promela.current_fingerprints()]))
"""


@needs_build
def test_promela_fingerprints_read_the_source_of_compiled_methods(built):
    """Both builds in their own process, whichever this one runs (LOCKSTEP_PURE=1 too)."""
    is_fn, first, fps = json.loads(_python(FINGERPRINTS, {accel.PURE_ENV: "0"}, ROOT))
    assert not is_fn                                          # a compiled method
    assert first == "def step(self, s: State, tr: Tr) -> State:"
    is_fn, first_pure, pure = json.loads(_python(FINGERPRINTS, {accel.PURE_ENV: "1"}, ROOT))
    assert is_fn and first_pure == first
    assert fps == pure


def test_no_introspected_module_is_compiled():
    """model/footprint.py analyses guards through inspect.getsource and fn.__globals__:
    the modules it reads must stay Python."""
    for mod in ("guards", "contract", "policy", "tables", "messages", "ops", "footprint"):
        assert f"lockstep.model.{mod}" not in accel.COMPILED


# ------------------------------------------------------------------ same answers

SEARCH = """
import json
from lockstep import accel
from lockstep.model.check import check, manifest_entries
names = {names!r}
out = {{}}
for name, cfg in manifest_entries():
    if name in names:
        for por in (True, False):
            d = check(cfg, por=por).as_dict()
            for k in ("seconds", "states_per_s", "peak_mb"):
                d.pop(k)
            out[f"{{name}} por={{por}}"] = d
print(json.dumps({{"describe": accel.describe(), "results": out}}))
"""
CONFIGS = ["pp1_full", "pp1_mesh2_buffered", "pp1_mesh3_R0a_two_cuts_fault",
           "inject_wrong_group", "mutation_no_epoch_filter",
           "mutation_blocking_send_then_recv", "mutation_error_result_first"]


@needs_build
def test_compiled_and_pure_searches_agree(built):
    code = SEARCH.format(names=CONFIGS)
    fast = json.loads(_python(code, {accel.PURE_ENV: ""}, ROOT))
    slow = json.loads(_python(code, {accel.PURE_ENV: "1"}, ROOT))
    assert fast["describe"].startswith("compiled: semantics, explore, reduction ")
    assert slow["describe"] == f"pure Python ({accel.PURE_ENV}=1)"
    assert len(fast["results"]) == 2 * len(CONFIGS)
    assert {r["verdict"] for r in fast["results"].values()} > {"clean"}   # violations too
    assert fast["results"] == slow["results"]


REPLAY = """
import json, sys
from lockstep import accel
from lockstep.conformance.report import conform
out = {}
for d in sys.argv[1:]:
    r = conform(d).as_dict()
    for k in ("load_s", "replay_s", "events_per_s", "cache", "build"):
        r.pop(k)
    out[d] = r
print(json.dumps({"describe": accel.describe(), "results": out}))
"""


@needs_build
def test_compiled_and_pure_replays_agree(built, tmp_path):
    good = ROOT / "traces" / "cpu_gloo_cut_last"
    bad = tmp_path / "corrupt"
    shutil.copytree(good, bad)
    lines = (bad / "rank1.jsonl").read_text().splitlines(keepends=True)
    del lines[len(lines) // 2]                     # a rank that skips a step
    (bad / "rank1.jsonl").write_text("".join(lines))
    runs = [str(good), str(ROOT / "traces" / "cpu_gloo_fault_bad_result"), str(bad)]

    def replay(pure: str) -> dict:
        p = subprocess.run([sys.executable, "-c", REPLAY, *runs], capture_output=True,
                           text=True, timeout=300, cwd=ROOT,
                           env={**os.environ, accel.PURE_ENV: pure,
                                "LOCKSTEP_TRACE_CACHE": "off"})
        assert p.returncode == 0, p.stderr[-3000:]
        return json.loads(p.stdout)

    fast, slow = replay(""), replay("1")
    assert "replay" in fast["describe"].split(";")[0]
    assert slow["describe"] == f"pure Python ({accel.PURE_ENV}=1)"
    assert [r["ok"] for r in fast["results"].values()] == [True, True, False]
    assert fast["results"] == slow["results"]
