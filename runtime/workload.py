"""The workload plug-in interface, and a demo workload doing real tensor-parallel work.

A real pipeline implements `Workload`: Phase A (build the envelope fields and tensors
for a chunk), Phase B (one generator call on a mesh rank, given the mesh group's
collective functions) and Phase C (decode a result). The interpreter decides *when*
each runs (the tables); the workload decides *what* it computes. A workload never
touches torch.distributed itself: it gets `all_reduce(tensor)` already bound to
mesh_pg, so it cannot issue a collective on the wrong group.
"""
from __future__ import annotations

import hashlib
import importlib
import time
from dataclasses import asdict, dataclass

import torch

from lockstep.model import contract as C
from lockstep.model import messages as M
from lockstep.model.runopts import RunOptions, StageCosts


def spend(ms: float, sleep: bool) -> None:
    if ms <= 0:
        return
    if sleep:
        time.sleep(ms / 1000.0)
        return
    end = time.perf_counter() + ms / 1000.0
    x = torch.ones(64, 64)
    while time.perf_counter() < end:
        x = x @ x.clamp(-1, 1)


class Workload:
    """Implement these three to plug a pipeline in."""

    def build(self, chunk_index: int, cache_epoch: int, init_cache: bool,
              regime: str, steps: int) -> tuple[dict, dict]:
        """Phase A on rank0: (meta fields beyond the ids, tensors) for one envelope."""
        raise NotImplementedError

    def generator_call(self, call_index: int, envelope: dict, tensors: dict,
                       all_reduce) -> None:
        """Phase B on every mesh rank: one generator call; its TP collectives go through
        `all_reduce(tensor)`, which is bound to mesh_pg."""
        raise NotImplementedError

    def result(self, envelope: dict, tensors: dict) -> dict:
        """Phase B output on the leader: the result tensors."""
        raise NotImplementedError

    def result_meta(self, envelope: dict, out: dict) -> dict:
        """Result fields the workload measured on the leader (merged into the result's
        metadata): by default the exact digest of `latents_out`."""
        if "latents_out" not in out:
            return {}
        return {"output_digest_i64": tensor_digest_i64(out["latents_out"])}

    def decode(self, result_meta: dict, tensors: dict) -> object:
        """Phase C on rank0: decode and emit one output (JSON-serialisable: rank0 writes
        every emitted output to outputs.json as [chunk, epoch, output])."""
        raise NotImplementedError


def tensor_digest_i64(t: torch.Tensor) -> int:
    """Exact digest of a tensor's dtype, shape and bits, as a signed int64 (the
    contract's `output_digest_i64`)."""
    t = t.detach().contiguous().cpu()
    h = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}:".encode())
    h.update(t.view(torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "little", signed=True)


@dataclass(frozen=True)
class WorkloadContext:
    """What a plugged-in workload class is constructed with (`MyWorkload(ctx)`), on every
    rank: enough to shard itself. `rank` is the global rank (0 = rank0, which runs
    `build` and `decode`); `mesh_rank` is its place in mesh_pg (0 = the leader, None on
    rank0) and `mesh_size` the number of mesh ranks, the tensor-parallel degree; `args`
    is `opts.workload_args` (the plugin's own JSON object, the same on every rank);
    `opts` the whole run options (costs, device, ...); `run_dir` where the run's files
    go (None outside a run)."""
    rank: int
    role: str
    mesh_rank: "int | None"
    mesh_size: int
    args: dict
    opts: RunOptions
    device: str = "cpu"
    run_dir: "object | None" = None


class WorkloadSpecError(ValueError):
    """`opts.workload` names no usable workload class: one line naming the string."""


def load_workload_class(spec: str) -> type:
    """The class an import path `package.module:Class` (`Class` may be dotted) names,
    checked to be a `Workload` subclass. Every failure is one WorkloadSpecError naming
    the string and what is wrong."""
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise WorkloadSpecError(f"workload {spec!r}: not 'mlp', 'dit' or an import path "
                                f"'package.module:Class'")
    try:
        obj = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name is not None and mod_name.startswith(e.name):   # the module itself
            raise WorkloadSpecError(
                f"workload {spec!r}: no module named {e.name!r} (looked in the "
                f"working directory and sys.path: {_path_hint()})") from None
        raise WorkloadSpecError(f"workload {spec!r}: importing {mod_name!r} failed: "
                                f"{error_text(e)}") from None
    except BaseException as e:  # noqa: BLE001 - the user's module ran and raised
        raise WorkloadSpecError(f"workload {spec!r}: importing {mod_name!r} raised "
                                f"{error_text(e)}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise WorkloadSpecError(f"workload {spec!r}: module {mod_name!r} has no "
                                    f"{attr!r}")
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, Workload)):
        raise WorkloadSpecError(f"workload {spec!r}: {attr} is {_kind(obj)}, not a "
                                f"subclass of lockstep.runtime.workload.Workload")
    return obj


def error_text(e: BaseException) -> str:
    """`Type: message` on one line: how a workload's own exception is quoted."""
    return " ".join(f"{type(e).__name__}: {e}".split())


def _kind(obj) -> str:
    return f"the class {obj.__qualname__}" if isinstance(obj, type) \
        else f"a {type(obj).__name__}"


def _path_hint() -> str:
    import sys
    shown = [p or "." for p in sys.path[:4]]
    return ", ".join(shown) + (", ..." if len(sys.path) > 4 else "")


def plugin_search_path(cwd: str | None = None, pythonpath: str | None = None) -> str:
    """PYTHONPATH for the ranks of a local run: the caller's working directory first
    (ranks run in the run directory, where `python -m` puts the run directory on
    sys.path instead), then the caller's PYTHONPATH with every entry made absolute."""
    import os
    cwd = cwd or os.getcwd()
    entries = [cwd] + [os.path.join(cwd, p) for p in
                       (pythonpath if pythonpath is not None
                        else os.environ.get("PYTHONPATH", "")).split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys(os.path.normpath(p) for p in entries))


def workload_identity(opts: RunOptions) -> dict:
    """What the parity handshake compares of the workload: its name or import path, its
    arguments and, for a plugin, the digest of its module's source (the same string on
    two hosts with different checkouts is two workloads)."""
    ident = {"workload": opts.workload, "workload_args": opts.workload_args}
    if opts.workload == "dit":
        ident["dit"] = opts.dit
    elif opts.workload == "mlp":
        ident.update(hidden=opts.hidden, frames=opts.frames)
    else:
        import inspect
        src = inspect.getsourcefile(load_workload_class(opts.workload))
        ident["source_sha256"] = hashlib.sha256(open(src, "rb").read()).hexdigest() \
            if src else None
    return ident


def make_workload(opts: RunOptions, *, rank: int, mesh_size: int,
                  record_dir=None) -> Workload:
    """The workload a run's options choose: `opts.workload` is "mlp" (the default,
    DemoWorkload), "dit" (runtime/dit.py, sized by `opts.dit`, faulted by `opts.drift`)
    or an import path `package.module:Class`, constructed as `Class(WorkloadContext)`."""
    if opts.workload == "dit":
        from .dit import DiTWorkload, spec_from_opts
        return DiTWorkload(rank=rank, mesh_size=mesh_size, spec=spec_from_opts(opts),
                           costs=opts.costs, device=opts.device_of(rank),
                           drift=asdict(opts.drift) if opts.drift else None,
                           record=record_dir)
    if opts.workload == "mlp":
        return DemoWorkload(mesh_rank=max(rank - 1, 0), mesh_size=mesh_size,
                            costs=opts.costs, hidden=opts.hidden, frames=opts.frames)
    cls = load_workload_class(opts.workload)
    from lockstep.model.release import role_of
    ctx = WorkloadContext(rank=rank, role=role_of(rank),
                          mesh_rank=None if rank == 0 else rank - 1, mesh_size=mesh_size,
                          args=dict(opts.workload_args), opts=opts, device=opts.device_of(rank),
                          run_dir=record_dir)
    try:
        return cls(ctx)
    except Exception as e:  # noqa: BLE001 - the user's constructor: one line naming it
        raise WorkloadSpecError(f"workload {opts.workload!r}: {cls.__qualname__}(ctx) "
                                f"raised {error_text(e)}") from e


class DemoWorkload(Workload):
    """A small TP-sharded MLP: latents (frames x hidden) go through `steps` denoising
    calls; each call multiplies by this rank's column shard and all_reduces the partial
    sums on mesh_pg, the standard row-parallel linear. Deterministic per seed."""

    def __init__(self, mesh_rank: int = 0, mesh_size: int = 1, hidden: int = 64,
                 frames: int = 4, costs: StageCosts = StageCosts(), seed: int = 0):
        self.mesh_rank, self.mesh_size = mesh_rank, mesh_size
        self.hidden, self.frames, self.costs = hidden, frames, costs
        g = torch.Generator().manual_seed(seed)
        full = torch.randn(hidden, hidden, generator=g) / hidden ** 0.5
        shard = hidden // max(mesh_size, 1)
        lo = mesh_rank * shard
        hi = hidden if mesh_rank == mesh_size - 1 else lo + shard
        self.rows = slice(lo, hi)
        self.weight = full[lo:hi, :].contiguous()
        self.state = None

    def build(self, chunk_index, cache_epoch, init_cache, regime, steps):
        spend(self.costs.phase_a_ms, self.costs.sleep)
        g = torch.Generator().manual_seed(1000 * cache_epoch + chunk_index)
        latents = torch.randn(self.frames, self.hidden, generator=g).to(torch.bfloat16)
        cond = torch.randn(1, self.hidden, generator=g).to(torch.bfloat16)
        tensors = {"conditioning_embeds": cond, "latents_in": latents,
                   "current_denoising_step_list": torch.arange(steps, dtype=torch.int64)}
        if C.ON_R0A_RECOMPUTE.holds({"action": C.Action.INFER, **C.plan_bits(regime)}):
            tensors["context_frames"] = latents[:1].clone()
        return {"height": self.frames, "width": self.hidden}, tensors

    def generator_call(self, call_index, envelope, tensors, all_reduce):
        spend(self.costs.phase_b_ms, self.costs.sleep)
        if self.state is None or call_index == 0:
            self.state = tensors["latents_in"].float()
        partial = self.state[:, self.rows] @ self.weight
        all_reduce(partial)
        self.state = torch.tanh(partial)

    def result(self, envelope, tensors):
        return {"latents_out": self.state.to(torch.bfloat16).contiguous()}

    def decode(self, result_meta, tensors):
        spend(self.costs.phase_c_ms, self.costs.sleep)
        out = tensors["latents_out"]
        raw = out.contiguous().view(torch.uint8).flatten().numpy().tobytes()
        return hashlib.sha1(raw).hexdigest()[:12]


def envelope_fields(chunk_meta: dict, *, regime, steps) -> dict:
    """An INFER envelope's metadata beyond its identity (model.messages.wire_ids): the
    contract's defaults, the plan bits rank0 decides for the regime (contract.plan_bits;
    the mesh never infers them), then the workload's own fields."""
    ids = {"action", "call_id", "chunk_index", "cache_epoch", "init_cache",
           "expected_generator_calls", "pp_envelope_version"}
    meta = {k: v for k, v in C.make_envelope_meta(**C.plan_bits(regime),
                                                  num_denoise_steps=steps).items()
            if k not in ids}
    meta.update(chunk_meta)
    return meta


def infer_meta(chunk_meta: dict, *, call_id, chunk_index, cache_epoch, init_cache,
               regime, steps) -> dict:
    """An INFER envelope's whole metadata as rank0 frames it, for drivers outside the
    runtime (a one-process reference stream, tests): the identity from model.messages
    (the count from the contract's formula), the rest from `envelope_fields`."""
    msg = M.message(C.Action.INFER, call_id, chunk_index, cache_epoch,
                    C.expected_generator_calls(regime, steps), init_cache)
    return M.full_meta("envelope", msg, envelope_fields(chunk_meta, regime=regime,
                                                        steps=steps))
