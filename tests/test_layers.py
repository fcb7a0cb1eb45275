"""The dependency rules of ARCHITECTURE.md, read from the import statements (ast, no import
is executed): the spec imports no tooling; runtime/ and conformance/ import only the spec
(never each other, never the tooling); model/ and conformance/ import neither torch nor
runtime/; only the `lockstep` CLI package ties them together. Below every layer, the
package itself and `lockstep.accel` (the loader of the compiled build, which every module
runs under) may be imported by any module, and import nothing of the project. Imports inside functions
count: a deferred import is still a dependency."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"model": "lockstep.model", "runtime": "lockstep.runtime",
           "conformance": "lockstep.conformance", "lockstep": "lockstep"}
PACKAGES = frozenset(FOLDERS.values())
SPEC = frozenset(f"lockstep.model.{m}" for m in (
    "ops", "guards", "tables", "semantics", "properties", "config", "events", "contract",
    "messages", "policy", "release", "runopts", "tracefmt"))
BASE = frozenset({"lockstep", "lockstep.accel"})

RULES = {
    "spec": "a spec module imports only the spec (no explorer, mutations, checks, "
            "exports, proofs, docs or rendering)",
    "driver": "runtime/ and conformance/ import only the spec of model/, never each "
              "other, never the tooling or the CLI package",
    "no_torch": "model/ and conformance/ import neither torch nor runtime/",
    "base": "lockstep.accel imports nothing of the project (every module may import it)",
}


def _module_name(folder: str, path: Path) -> str:
    stem = path.stem
    pkg = FOLDERS[folder]
    return pkg if stem == "__init__" else f"{pkg}.{stem}"


def _imports(module: str, source: str, is_package: bool = False):
    """(line, imported module) for every import in `source`, relative ones resolved."""
    here = module if is_package else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = here.split(".")
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            yield node.lineno, base
            if base in PACKAGES:   # `from lockstep.model import explore`: a module
                for a in node.names:
                    yield node.lineno, f"{base}.{a.name}"


def _within(name: str, pkg: str) -> bool:
    return name == pkg or name.startswith(pkg + ".")


def layer_violations(modules: dict) -> list:
    """modules: module name -> source. One line per import that breaks a rule."""
    out = []
    for module, source in sorted(modules.items()):
        for line, name in _imports(module, source, module in PACKAGES):
            broken = []
            if module in SPEC and _within(name, "lockstep") and name not in SPEC \
                    and name != "lockstep.model":
                broken.append("spec")
            for pkg in ("lockstep.runtime", "lockstep.conformance"):
                if not _within(module, pkg) or not _within(name, "lockstep"):
                    continue
                if _within(name, pkg) or name in SPEC or name in BASE \
                        or name == "lockstep.model":
                    continue
                broken.append("driver")
            if (_within(module, "lockstep.model") or _within(module, "lockstep.conformance")) \
                    and (_within(name, "torch") or _within(name, "lockstep.runtime")):
                broken.append("no_torch")
            if module in BASE - {"lockstep"} and _within(name, "lockstep"):
                broken.append("base")
            out += [f"{module}:{line} imports {name}: {RULES[r]}" for r in broken]
    return out


def _tree() -> dict:
    out = {}
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).glob("*.py")):
            out[_module_name(folder, path)] = path.read_text()
    return out


def test_the_tree_keeps_the_layers():
    tree = _tree()
    assert SPEC <= set(tree), f"spec modules missing: {sorted(SPEC - set(tree))}"
    bad = layer_violations(tree)
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("module,source,rule", [
    ("lockstep.model.semantics", "def f():\n    from .mutations import build_tables\n",
     "spec"),
    ("lockstep.model.guards", "from lockstep.model import explore\n", "spec"),
    ("lockstep.runtime.node", "from lockstep.model.check import config_from_dict\n",
     "driver"),
    ("lockstep.runtime.bench", "from lockstep.conformance.report import conform\n",
     "driver"),
    ("lockstep.conformance.replay", "from lockstep.runtime import codec\n", "driver"),
    ("lockstep.conformance.replay", "import torch\n", "no_torch"),
    ("lockstep.model.render", "import torch.distributed as dist\n", "no_torch"),
    ("lockstep.runtime.interp", "from lockstep import cli\n", "driver"),
    ("lockstep.accel", "from lockstep.model.ops import MESH\n", "base"),
])
def test_a_violating_module_is_named_with_its_rule(module, source, rule):
    bad = layer_violations({module: source})
    assert any(b.startswith(module) and b.endswith(RULES[rule]) for b in bad), bad


@pytest.mark.parametrize("module,source", [
    ("lockstep.model.semantics", "from .tables import Tables\nfrom . import guards\n"),
    ("lockstep.runtime.node", "from lockstep.model.semantics import Model\n"
                              "from .interp import RankInterpreter\nimport torch\n"),
    ("lockstep.model.check", "from .mutations import model_for\n"),
    ("lockstep.conformance.cache", "from lockstep.accel import source_file\n"),
    ("lockstep.cli", "from lockstep.runtime import run\nfrom lockstep.conformance "
                     "import report\nfrom lockstep.model import explore\n"),
])
def test_allowed_imports_pass(module, source):
    assert layer_violations({module: source}) == []
