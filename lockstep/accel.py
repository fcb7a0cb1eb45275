"""An optional compiled build of the checker's and the replayer's driver modules.

The Python source is the only source: `build` compiles the very .py files of `COMPILED`
with Cython (pure-Python mode; no .pyx, no second copy), and everything runs unchanged,
slower, without Cython or a C compiler.

Never stale. A build writes each module as `<CACHE>/<module>.<key><ext suffix>`, the key
a SHA-256 over the module's .py source and `RECIPE`. `CompiledFinder`, installed on
`sys.meta_path` when `lockstep` is imported, answers for every plain module of the
package: the compiled file when one exists for the key of the source on disk now,
otherwise the .py itself. An edited .py therefore runs as Python until the next build,
and an extension module left beside a source (`cythonize -i`, which Python's own finder
would prefer to the .py) is never loaded.

`lockstep accel build` compiles (`bash dev.sh` runs it after the install);
`lockstep accel` says what runs. `LOCKSTEP_PURE=1` forces pure Python; `LOCKSTEP_ACCEL_DIR` moves the cache (default:
`lockstep-accel/` under `sys.prefix`, so a build belongs to one interpreter and its venv,
which git ignores). `describe()` is the line a figure quotes ("compiled: semantics, ...
(Cython 3.3.1)" or "pure Python (...)").

Which modules: the ones that measurement found hot (cProfile of `lockstep check` on the
105k-state configuration: semantics 33 %, explore 23 %, reduction 21 % of the time, then
guards 3 %, properties 2 %; of a replay: replay 49 %, semantics 32 %, guards 6 %) and
load (its first and second loads of the 100k-event bench trace: 0.60-0.67 and 0.13 CPU s
compiled against 0.80 and 0.18-0.20 pure). The spec modules whose functions are read as
source (guards, contract, policy, tables: model/footprint.py) stay Python; the tools that
fingerprint compiled code read the .py file (`source_file`), never the loaded object.

Considered and rejected: in-place extension modules (Python prefers them to an edited
.py: the stale build this design exists to prevent); a .pyx or .pxd copy (a second
source that drifts); keying on mtimes (a checkout can set any).
"""
from __future__ import annotations

import ast
import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

PACKAGE = "lockstep"
COMPILED = (
    "lockstep.model.semantics",
    "lockstep.model.explore",
    "lockstep.model.reduction",
    "lockstep.conformance.replay",
    "lockstep.conformance.load",
)
# Cython's options, part of every key: a change of them rebuilds. Annotations are not
# read as C types (`x: float` would become a C double): the compiled module behaves as
# the Python one does.
DIRECTIVES = {"language_level": 3, "annotation_typing": False}
RECIPE = f"lockstep-accel 1 {sorted(DIRECTIVES.items())}"
PURE_ENV, DIR_ENV = "LOCKSTEP_PURE", "LOCKSTEP_ACCEL_DIR"
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]

_loaded: dict = {}      # module name -> True (compiled) or why it runs as Python


def cache_dir() -> Path:
    return Path(os.environ.get(DIR_ENV) or Path(sys.prefix) / "lockstep-accel")


def forced_pure() -> bool:
    return os.environ.get(PURE_ENV, "") not in ("", "0")


def key(source: bytes) -> str:
    return hashlib.sha256(RECIPE.encode() + b"\0" + source).hexdigest()[:16]


def compiled_path(name: str, source: bytes) -> Path:
    return cache_dir() / f"{name}.{key(source)}{SUFFIX}"


def source_file(name: str) -> Path:
    """The .py file of module `name`, whatever was loaded for it (the truth to read)."""
    parent, _, leaf = name.rpartition(".")
    pkg = sys.modules.get(parent) or importlib.import_module(parent)
    for d in pkg.__path__:
        p = Path(d) / f"{leaf}.py"
        if p.exists():
            return p
    raise FileNotFoundError(f"no {leaf}.py for {name} in {list(pkg.__path__)}")


def definition_source(obj) -> str:
    """The source text (decorators included) of a function, class or method, read by
    its qualified name from its module's .py file: the same text whether the module runs
    compiled (where `inspect.getsource` fails) or as Python, and the file as it is now."""
    text = source_file(obj.__module__).read_text()
    node = _parsed(text)
    for part in obj.__qualname__.split("."):
        if part == "<locals>":
            continue
        node = next((n for n in ast.walk(node) if n is not node and getattr(n, "name", None)
                     == part and isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                ast.ClassDef))), None)
        if node is None:
            raise LookupError(f"no definition of {obj.__qualname__} in "
                              f"{source_file(obj.__module__)}")
    first = min([d.lineno for d in node.decorator_list] + [node.lineno])
    return "".join(text.splitlines(keepends=True)[first - 1:node.end_lineno])


@lru_cache(maxsize=8)
def _parsed(text: str) -> ast.Module:
    return ast.parse(text)


class CompiledFinder(importlib.abc.MetaPathFinder):
    """Loads lockstep's plain modules: a build for the current source, else the .py."""

    def find_spec(self, fullname, path, target=None):
        if not fullname.startswith(PACKAGE + ".") or path is None:
            return None
        leaf = fullname.rpartition(".")[2]
        py = next((Path(d) / f"{leaf}.py" for d in path
                   if (Path(d) / f"{leaf}.py").is_file()), None)
        if py is None:
            return None          # a package or something else: the normal finders
        if fullname in COMPILED:
            if forced_pure():
                _loaded[fullname] = f"{PURE_ENV}=1"
            else:
                so = compiled_path(fullname, py.read_bytes())
                if so.is_file():
                    _loaded[fullname] = True
                    return importlib.util.spec_from_file_location(
                        fullname, so,
                        loader=importlib.machinery.ExtensionFileLoader(fullname, str(so)))
                _loaded[fullname] = "no build of its current source"
        return importlib.util.spec_from_file_location(fullname, py)


def install() -> None:
    if not any(isinstance(f, CompiledFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, CompiledFinder())


def _leaf(name: str) -> str:
    return name.rpartition(".")[2]


def describe() -> str:
    """Which of the imported driver modules run compiled: the line a figure quotes."""
    done = [n for n in COMPILED if _loaded.get(n) is True]
    pure = [n for n in COMPILED if n in _loaded and _loaded[n] is not True]
    if not done:
        why = sorted({_loaded[n] for n in pure}) or ["no driver module imported"]
        return f"pure Python ({'; '.join(why)})"
    versions = sorted({_sidecar(n).get("cython", "?") for n in done})
    line = f"compiled: {', '.join(map(_leaf, done))} (Cython {', '.join(versions)})"
    if pure:
        line += "; pure: " + ", ".join(f"{_leaf(n)} ({_loaded[n]})" for n in pure)
    return line


def _sidecar(name: str) -> dict:
    so = Path(sys.modules[name].__file__)
    try:
        return json.loads(so.with_name(so.name[:-len(SUFFIX)] + ".json").read_text())
    except (OSError, ValueError):
        return {}


# ------------------------------------------------------------------ the build

def missing_tool() -> str:
    """Why no build can be made here, or "" when Cython and a C compiler are present."""
    try:
        import Cython  # noqa: F401
    except ImportError:
        return "Cython is not installed (pip install cython)"
    import sysconfig
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        return f"no C compiler ({cc} not found)"
    return ""


def build(jobs: int = 0, quiet: bool = False) -> list:
    """Compile every module of COMPILED whose current source has no build (one process
    per module, `jobs` at a time); drop builds of older sources. Prints one line, and one
    more per module that failed (it runs as Python). Returns the failures' names."""
    say = (lambda s: None) if quiet else (lambda s: print(f"lockstep accel: {s}"))
    why = missing_tool()
    if why:
        say(f"{why}: everything runs as pure Python")
        return []
    todo = [(name, str(source_file(name))) for name in COMPILED
            if not compiled_path(name, source_file(name).read_bytes()).is_file()]
    failed = []
    if todo:
        cache_dir().mkdir(parents=True, exist_ok=True)
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(max(1, min(jobs or os.cpu_count() or 1, len(todo)))) as ex:
            for (name, _), err in zip(todo, ex.map(_compile_one, todo)):
                if err:
                    failed.append(name)
                    say(f"{_leaf(name)} did not compile, it runs as Python: {err}")
    for name in COMPILED:
        keep = compiled_path(name, source_file(name).read_bytes()).name[:-len(SUFFIX)] + "."
        for old in cache_dir().glob(f"{name}.*"):
            if not old.name.startswith(keep) and not old.name.endswith(".part"):
                old.unlink()
    import Cython
    say(f"{len(todo) - len(failed)} compiled, {len(COMPILED) - len(todo)} up to date, "
        f"{len(failed)} failed of {len(COMPILED)} modules (Cython {Cython.__version__}) "
        f"in {cache_dir()}")
    return failed


def _compile_one(job: tuple) -> str:
    """Cython + the C compiler for one module, in a scratch directory (never beside the
    source). Returns "" or the error's last line."""
    name, src = job
    import contextlib
    import io
    import Cython
    from Cython.Build import cythonize
    from setuptools import Distribution, Extension
    from setuptools.command.build_ext import build_ext

    target = compiled_path(name, Path(src).read_bytes())
    log = io.StringIO()
    with tempfile.TemporaryDirectory(prefix="lockstep-accel-") as tmp:
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                (ext,) = cythonize([Extension(name, [src], extra_compile_args=["-g0"])],
                                   build_dir=tmp, compiler_directives=DIRECTIVES,
                                   quiet=True, force=True)
                cmd = build_ext(Distribution({"ext_modules": [ext]}))
                cmd.build_lib, cmd.build_temp = tmp + "/lib", tmp + "/tmp"
                cmd.ensure_finalized()
                cmd.run()
        except BaseException as e:    # Cython's and the compiler's errors: said, not raised
            lines = [ln for ln in log.getvalue().splitlines() if ln.strip()]
            return (lines[-1] if lines else "") + f" ({type(e).__name__})"
        side = json.dumps({"module": name, "source": src, "cython": Cython.__version__})
        _install(target.with_name(target.name[:-len(SUFFIX)] + ".json"), side.encode())
        _install(target, Path(cmd.get_ext_fullpath(ext.name)).read_bytes())
    return ""


def _install(target: Path, data: bytes) -> None:
    """Atomic and private to this writer: a reader (or a second build of the same
    module at the same time) never sees a half-written file."""
    fd, part = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".part")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(part, 0o644)
    os.replace(part, target)
