"""Run a lockstep job on the embedded default: rank0 + mesh as local processes on
127.0.0.1 with gloo (no torchrun needed), under a hard deadline."""
from __future__ import annotations

import json
import time
from pathlib import Path

from lockstep.model.config import config_to_dict
from lockstep.model.runopts import RunOptions

from .launch import Interrupted, claim_run_dir, record_stopped_start, spawn_local


def run_local(cfg, opts: RunOptions | dict | None, run_dir, *, deadline_s: float = 120.0,
              on_start=None):
    """Start 1 + cfg.mesh ranks, wait (hard deadline), return the LaunchResult. The run
    directory gets run.json (config + options), rank*.jsonl traces, rank*.err lines.
    `opts` is validated here, before any rank starts (a dict is parsed strictly)."""
    if not isinstance(opts, RunOptions):
        opts = RunOptions.from_dict(opts)
    if not deadline_s > 0:     # else every rank is killed at once, read as a hang
        raise ValueError(f"deadline_s: must be > 0, got {deadline_s!r}")
    opts.cuts.check_bound(cfg.chunks, cfg.hard_cut)   # refused before any rank starts
    if opts.fault is not None:
        opts.fault.check_bound(cfg.chunks, cfg.world)
    _check_local_devices(opts.backend, cfg.world)
    env = _plugin_env(opts.workload)
    opts = opts.to_dict()
    run_dir = Path(run_dir).resolve()
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"run directory {run_dir} is a file, not a directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    with claim_run_dir(run_dir):      # a second run here is refused, not interleaved
        # An earlier run's files: a rank0 killed mid-run writes no outputs.json, and an
        # old one left here was read as this run's (conform: "outputs.json has N outputs")
        for pattern in ("rank*", "fr_rank*.json", "outputs.json", "outputs.json.partial"):
            for old in run_dir.glob(pattern):
                old.unlink()
        control = run_dir / "control"     # runtime/control.py: requests of an earlier run
        if control.is_dir():
            for old in control.iterdir():
                old.unlink()
        meta = {"config": config_to_dict(cfg), "opts": opts, "created": time.time()}
        try:
            # whole or absent (renamed into place): a run.json seen is a run started
            part = run_dir / "run.json.partial"
            part.write_text(json.dumps(meta, indent=1, sort_keys=True))
            part.replace(run_dir / "run.json")
            return spawn_local(cfg.mesh + 1, "lockstep.runtime.node:run_rank",
                               {"config": config_to_dict(cfg), "opts": opts},
                               deadline_s=deadline_s, run_dir=run_dir, on_start=on_start,
                               env=env)
        except Interrupted as e:
            # stopped between run.json and the launcher's own record (a window of a few
            # bytecodes: CI hit it): the run is recorded as stopped before it started
            if e.run_dir is None and (run_dir / "run.json").exists():
                record_stopped_start(run_dir, e, cfg.mesh + 1)
            raise


def _plugin_env(workload: str) -> dict | None:
    """A workload of the user's own (`package.module:Class`): imported and checked here,
    before any rank starts (a string that does not import, a missing name, a class that
    is not a Workload: WorkloadSpecError, a usage error), from the caller's working
    directory and PYTHONPATH, which the ranks get too: they run in the run directory."""
    from lockstep.model.runopts import WORKLOADS
    if workload in WORKLOADS:
        return None
    import os
    import sys

    from .workload import load_workload_class, plugin_search_path
    path = plugin_search_path()
    added = [p for p in path.split(os.pathsep) if p not in sys.path]
    sys.path[:0] = added          # what the ranks' sys.path will start with
    try:
        load_workload_class(workload)
    finally:
        for p in added:
            sys.path.remove(p)
    return {"PYTHONPATH": path}


def _check_local_devices(backend: str, world: int) -> None:
    """All ranks of a local run share this host's GPUs: refused before any rank starts
    when NCCL cannot run (FACTS.md: no CUDA, or two ranks of one communicator on one GPU,
    which NCCL refuses; the mixed "cpu:gloo,cuda:nccl" variant may share a GPU)."""
    if "nccl" not in backend:
        return
    import torch
    seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
    need = world if backend == "nccl" else 1
    if seen < need:
        raise ValueError(f"backend {backend!r} on one host needs {need} GPU(s) "
                         f"({world} ranks, one GPU each for NCCL), {seen} visible to torch "
                         f"{torch.__version__}; on CPU use gloo")
