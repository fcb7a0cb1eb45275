"""lockstep: hang-free pipeline-parallel control planes from one set of transition tables.

One import package: `lockstep.model` (the spec and the checker, folder `model/`),
`lockstep.runtime` (torch.distributed interpreter, `runtime/`), `lockstep.conformance`
(trace replay, `conformance/`) and the command line (`lockstep.cli`).

Importing it installs `accel.CompiledFinder`: the driver modules run compiled when a
build of their current source exists, else as the .py (lockstep/accel.py).
"""
from . import accel as _accel

_accel.install()

try:
    from importlib.metadata import PackageNotFoundError, version as _version
    __version__ = _version("lockstep")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0.0.0+checkout"
