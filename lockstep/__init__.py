"""lockstep: hang-free pipeline-parallel control planes from one set of transition tables.

One import package: `lockstep.model` (the spec and the checker, folder `model/`),
`lockstep.runtime` (torch.distributed interpreter, `runtime/`), `lockstep.conformance`
(trace replay, `conformance/`) and the command line (`lockstep.cli`).
"""
try:
    from importlib.metadata import PackageNotFoundError, version as _version
    __version__ = _version("lockstep")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0.0.0+checkout"
