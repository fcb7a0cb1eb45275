"""Run options: what travels to every rank besides the model `Config`, as one typed value.

`Config` (model/config.py) binds the protocol's constants and is what the checker
explores; `RunOptions` binds how one real run executes them: backend, timeouts, stage
costs, where a hard cut falls, which fault-injection switch fires. Both are written to
`run.json` and `args.json` as plain JSON (never pickle) and parsed back here, so every rank,
the replayer and a user reading the run directory see the same validated values.

Parsing is strict: an unknown key, a wrong type or an out-of-range value raises
`ValueError` naming the field (`opts.costs.phase_b_ms: must be >= 0, got -1`), because a
typo in an option that silently falls back to a default is a run that measures something
other than what its author asked for.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Optional

from .config import INJECTABLE

BACKENDS = ("gloo", "nccl", "cpu:gloo,cuda:nccl")
WORKLOADS = ("mlp", "dit")   # runtime/workload.py's demo MLP, runtime/dit.py's causal DiT
# ... or a workload of the user's own, by import path `package.module:Class`
# (runtime/workload.py:load_workload_class imports and checks it, before any rank starts)
# What the runtime traces: every event ("full", what conformance needs), or only rank0's
# emitting steps that carry the overlap measurements ("emits": the bench's tracing-off
# figure; rows and messages are the same, only the lines are not written).
TRACES = ("full", "emits")
# State-drift switches of the DiT workload (runtime/dit.py): the control plane stays
# clean while one rank's state goes wrong; only the equivalence check can see them.
DRIFTS = ("skip_kv_reset", "stale_start_frame", "wrong_anchor")


@dataclass(frozen=True)
class StageCosts:
    """Synthetic stage costs in milliseconds (spent sleeping unless `sleep` is false, in
    which case they are spent computing: on shared cores sleeping keeps stages honest)."""
    phase_a_ms: float = 0.0
    phase_b_ms: float = 0.0      # per generator call
    phase_c_ms: float = 0.0
    sleep: bool = True


@dataclass(frozen=True)
class FaultSwitch:
    """A runtime fault-injection switch: `name` fires once, at chunk `at_chunk`, on `rank`
    (None: wherever the name applies)."""
    name: str
    at_chunk: int = 0
    rank: Optional[int] = None

    def label(self) -> str:
        return f"{self.name}@{self.at_chunk}"

    def check_bound(self, chunks: int, world: int) -> None:
        """A switch aimed past the stream or at no rank would never fire: the run would
        pass as if the fault had been injected (model/policy.py `fires`)."""
        if self.at_chunk >= chunks:
            raise ValueError(f"fault.at_chunk: {self.at_chunk} is beyond the stream's "
                             f"{chunks} chunks (0..{chunks - 1}): it would never fire")
        if self.rank is not None and not 0 <= self.rank < world:
            raise ValueError(f"fault.rank: {self.rank} is not a rank of this run "
                             f"(0..{world - 1}): it would never fire")


@dataclass(frozen=True)
class DriftSwitch:
    """A DiT state-drift switch: `name` on `rank` (global), at chunk `at_chunk` (None:
    every chunk)."""
    name: str
    rank: int = 2
    at_chunk: Optional[int] = None


CUT_REASONS = ("prompt_change", "reset", "schedule")


@dataclass(frozen=True)
class CutSchedule:
    """Where rank0 takes hard cuts, besides the ones asked for through its control
    interface (runtime/control.py). Three forms, any combination:

    * `at`: chunk indices, repeats allowed (`(3, 7, 7)`: one cut before chunk 3, two
      back to back before chunk 7; `chunks` itself is a cut while SHUTDOWN drains);
    * `every`: a cut before every multiple of N (N, 2N, ... up to `chunks`);
    * `random`: before each chunk boundary 1..chunks, cuts while a coin of probability
      `random` comes up (so back-to-back cuts happen), from `random.Random(seed)`.

    A chunk index k means "once k chunks are built"; the policy (model/policy.py) turns
    the list into the decision. `control` is how many cuts the control interface may
    add (the model's Config.hard_cut must cover the schedule plus these)."""
    at: tuple = ()
    every: Optional[int] = None
    random: Optional[float] = None
    seed: int = 0
    control: int = 0
    reason: str = "schedule"

    def __post_init__(self):
        object.__setattr__(self, "at", tuple(sorted(int(k) for k in self.at)))
        _check(all(k >= 0 for k in self.at), "cuts.at", "chunk indices >= 0", self.at)
        _check(self.every is None or self.every >= 1, "cuts.every", ">= 1", self.every)
        _check(self.random is None or 0.0 <= self.random < 1.0, "cuts.random",
               "a probability in [0, 1)", self.random)
        _check(self.control >= 0, "cuts.control", ">= 0", self.control)
        _check(self.reason in CUT_REASONS, "cuts.reason", f"one of {CUT_REASONS}",
               self.reason)

    def chunks_at(self, chunks: int) -> tuple:
        """Every scheduled cut as a sorted tuple of chunk indices, for a stream of
        `chunks` chunks (indices beyond it are refused by `check_bound`)."""
        out = list(self.at)
        if self.every:
            out += range(self.every, chunks + 1, self.every)
        if self.random:
            import random as _random
            rng = _random.Random(self.seed)
            for k in range(1, chunks + 1):
                while rng.random() < self.random:
                    out.append(k)
        return tuple(sorted(out))

    def bound(self, chunks: int) -> int:
        """The cuts this run may take: the schedule's plus the control budget."""
        return len(self.chunks_at(chunks)) + self.control

    def check_bound(self, chunks: int, hard_cut: int) -> None:
        late = [k for k in self.at if k > chunks]
        if late:
            raise ValueError(f"cuts.at: {late} beyond the stream's {chunks} chunks")
        need = self.bound(chunks)
        if need > hard_cut:
            raise ValueError(f"the run may take {need} hard cuts (schedule "
                             f"{need - self.control} + control {self.control}) but the "
                             f"model's Config.hard_cut allows {hard_cut}: raise "
                             f"Config.hard_cut (the checked bound) or cut less")

    def __bool__(self) -> bool:
        return bool(self.at or self.every or self.random or self.control)


@dataclass(frozen=True)
class RunOptions:
    backend: str = "gloo"               # gloo | nccl | cpu:gloo,cuda:nccl
    cuts: CutSchedule = field(default_factory=CutSchedule)   # hard cuts rank0 takes
    fault: Optional[FaultSwitch] = None
    op_deadline_s: float = 30.0         # per-op deadline: no progress -> crash, not hang
    pg_timeout_s: float = 60.0          # backend timeout given to every process group
    # A silent heartbeat for this long = peer lost. Only a backstop: the launcher records
    # a killed rank at once and gloo reports a closed pair in ms; 0.5 s saw false losses
    # of a live leader with 5 ranks on 2 loaded cores (the beat thread was not scheduled).
    lost_after_s: float = 1.0
    store_timeout_s: float = 30.0       # side-channel store connect timeout
    drain_s: float = 10.0               # rank0 waits this long for every clean-exit mark
    torch_threads: int = 1              # intra-op threads per rank
    hidden: int = 64                    # demo workload width
    frames: int = 4                     # demo workload latent frames
    costs: StageCosts = field(default_factory=StageCosts)
    heartbeat_ms: Optional[float] = None  # rank0 sends a NOOP after this idle time (off)
    workload: str = "mlp"               # mlp | dit | package.module:Class
    workload_args: dict = field(default_factory=dict)   # a plugin's own JSON object
    dit: dict = field(default_factory=dict)   # DiTSpec overrides (runtime/dit.py)
    device: str = "cpu"                 # where the workload's tensors live
    # rank0's, where it differs ("": device): in the field rank0 has a GPU of its own; on
    # one shared GPU, "cpu" keeps rank0's Phase A/C off the mesh's GPU (a second CUDA
    # context on a GPU time-slices with the first)
    rank0_device: str = ""
    # the workload's CUDA collectives the host may leave in flight before it completes
    # the oldest (0: each completed before the workload goes on); the end of every
    # generator call completes them all (runtime/transport.py stream_all_reduce)
    cuda_window: int = 16
    drift: Optional[DriftSwitch] = None
    parity_skew: Optional[dict] = None  # test switch: {"rank", "key", "value"}
    trace: str = "full"                 # full | emits (TRACES)
    # trace segments (runtime/trace.py): roll over at this size or age (0: never), and
    # keep only the newest K per rank (0: all; a flight recorder)
    trace_segment_mb: float = 0.0
    trace_segment_s: float = 0.0
    trace_keep: int = 0

    def __post_init__(self):
        _check(self.backend in BACKENDS, "backend", f"one of {BACKENDS}", self.backend)
        for name in ("op_deadline_s", "pg_timeout_s", "lost_after_s", "store_timeout_s"):
            _check(getattr(self, name) > 0, name, "> 0", getattr(self, name))
        # The backend's timeout must outlast the per-op deadline: shorter, a live op that
        # waits on a slow peer (a long Phase A) fails in the backend first and the run
        # reads as a rank's error, not as the op deadline it was given.
        _check(self.pg_timeout_s > self.op_deadline_s, "pg_timeout_s",
               f"> op_deadline_s ({self.op_deadline_s:g})", self.pg_timeout_s)
        _check(self.drain_s >= 0, "drain_s", ">= 0", self.drain_s)
        _check(self.heartbeat_ms is None or self.heartbeat_ms > 0, "heartbeat_ms",
               "> 0 (or unset: no heartbeats)", self.heartbeat_ms)
        for name in ("device", "rank0_device"):
            val = getattr(self, name)
            _check(re.fullmatch(r"cpu|cuda(:\d+)?", val) is not None or
                   (name == "rank0_device" and val == ""), name,
                   "cpu, cuda or cuda:N" + (' ("": device)' if name != "device" else ""), val)
        _check(self.cuda_window >= 0, "cuda_window", ">= 0 (0: no run-ahead)",
               self.cuda_window)
        for name in ("torch_threads", "hidden", "frames"):
            _check(getattr(self, name) >= 1, name, ">= 1", getattr(self, name))
        for f in fields(StageCosts):
            if f.name != "sleep":
                val = getattr(self.costs, f.name)
                _check(val >= 0, f"costs.{f.name}", ">= 0", val)
        _check(self.workload in WORKLOADS or _import_path(self.workload), "workload",
               f"one of {WORKLOADS} or an import path 'package.module:Class'",
               self.workload)
        _check(self.trace in TRACES, "trace", f"one of {TRACES}", self.trace)
        for name in ("trace_segment_mb", "trace_segment_s", "trace_keep"):
            _check(getattr(self, name) >= 0, name, ">= 0 (0: off)", getattr(self, name))
        _check(not self.trace_keep or self.trace_segment_mb or self.trace_segment_s,
               "trace_keep", "0 unless the trace rolls over (trace_segment_mb or _s)",
               self.trace_keep)
        if self.drift is not None:
            _check(self.drift.name in DRIFTS, "drift.name", f"one of {DRIFTS}",
                   self.drift.name)
        if self.fault is not None:
            _check(self.fault.name in INJECTABLE, "fault.name", f"one of {INJECTABLE}",
                   self.fault.name)
            _check(self.fault.at_chunk >= 0, "fault.at_chunk", ">= 0", self.fault.at_chunk)

    def device_of(self, rank: int) -> str:
        """Where rank `rank`'s workload tensors live."""
        return (self.rank0_device or self.device) if rank == 0 else self.device

    def with_(self, **kw) -> "RunOptions":
        return replace(self, **kw)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "RunOptions":
        """Parse the JSON form; every error names the field (`opts.<name>`)."""
        d = dict(d or {})
        legacy = d.pop("hard_cut_at", None)   # the one-cut form of committed run.json files
        kw = _typed(cls, d, "opts", skip=("costs", "fault", "parity_skew", "dit", "drift",
                                          "cuts", "workload_args"))
        if d.get("cuts") is not None:
            c = _typed(CutSchedule, _obj(d["cuts"], "opts.cuts"), "opts.cuts",
                       skip=("at",))
            at = d["cuts"].get("at", ())
            if not isinstance(at, (list, tuple)) or not all(
                    isinstance(k, int) and not isinstance(k, bool) for k in at):
                raise ValueError(f"opts.cuts.at: must be a list of chunk indices, got {at!r}")
            try:
                kw["cuts"] = CutSchedule(at=tuple(at), **c)
            except ValueError as e:
                raise ValueError(f"opts.{e}") from None
        if legacy is not None:
            if not isinstance(legacy, int) or isinstance(legacy, bool) or legacy < 0:
                raise ValueError(f"opts.hard_cut_at: must be a chunk index >= 0, got "
                                 f"{legacy!r}")
            base = kw.get("cuts", CutSchedule())
            kw["cuts"] = replace(base, at=base.at + (legacy,))
        if "costs" in d:
            kw["costs"] = StageCosts(**_typed(StageCosts, _obj(d["costs"], "opts.costs"),
                                               "opts.costs"))
        if d.get("fault") is not None:
            kw["fault"] = FaultSwitch(**_typed(FaultSwitch, _obj(d["fault"], "opts.fault"),
                                               "opts.fault"))
        if d.get("drift") is not None:
            kw["drift"] = DriftSwitch(**_typed(DriftSwitch, _obj(d["drift"], "opts.drift"),
                                               "opts.drift"))
        if "dit" in d:
            kw["dit"] = _obj(d["dit"], "opts.dit")
        if "workload_args" in d:
            kw["workload_args"] = _obj(d["workload_args"], "opts.workload_args")
        if d.get("parity_skew") is not None:
            kw["parity_skew"] = _obj(d["parity_skew"], "opts.parity_skew")
        try:
            return cls(**kw)
        except ValueError as e:
            raise ValueError(f"opts.{e}") from None


def legacy_cut_at(opts: dict) -> Optional[int]:
    """A run.json's single scheduled cut as the old `hard_cut_at` (None when the run
    has none or more than one form): for readers comparing against one-cut streams."""
    if opts.get("hard_cut_at") is not None:
        return opts["hard_cut_at"]
    c = opts.get("cuts") or {}
    at = list(c.get("at") or ())
    if len(at) == 1 and not c.get("every") and not c.get("random") and not c.get("control"):
        return at[0]
    return None


def parse_cut_at(text: str) -> tuple:
    """`3,7,7` (the CLI form of `cuts.at`)."""
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--cut-at {text!r}: a comma-separated list of chunk indices"
                         ) from None


def parse_fault(text: str) -> Optional[FaultSwitch]:
    """`NAME@CHUNK` (the CLI form), e.g. `leader_reject@3`; empty -> None."""
    if not text:
        return None
    name, _, at = text.partition("@")
    try:
        at_chunk = int(at) if at else 0
    except ValueError:
        raise ValueError(f"--fault {text!r}: CHUNK must be an integer (NAME@CHUNK)") from None
    if name not in INJECTABLE:
        raise ValueError(f"--fault {text!r}: unknown switch {name!r}; known: "
                         f"{', '.join(INJECTABLE)}")
    return FaultSwitch(name, at_chunk)


# ------------------------------------------------------------------ strict parsing

def _check(ok: bool, name: str, want: str, got) -> None:
    if not ok:
        raise ValueError(f"{name}: must be {want}, got {got!r}")


def _import_path(text: str) -> bool:
    """`package.module:Class` in form (whether it imports is the runtime's check)."""
    mod, sep, attr = text.partition(":")
    return bool(sep) and all(p.isidentifier() for part in (mod, attr)
                             for p in part.split("."))


def _obj(val, where: str) -> dict:
    if not isinstance(val, dict):
        raise ValueError(f"{where}: must be a JSON object, got {type(val).__name__}")
    return val


def _typed(cls, d: dict, where: str, skip=()) -> dict:
    """The fields of `cls` present in `d`, each checked against its annotated type."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {unknown}; known: {sorted(known)}")
    out = {}
    for name, val in d.items():
        if name in skip:
            continue
        ann = str(known[name].type)
        optional = "Optional" in ann
        if val is None and optional:
            out[name] = None
            continue
        base = ann.replace("Optional[", "").rstrip("]")
        ok = {"str": isinstance(val, str),
              "bool": isinstance(val, bool),
              "int": isinstance(val, int) and not isinstance(val, bool),
              "float": isinstance(val, (int, float)) and not isinstance(val, bool),
              }.get(base, True)
        if not ok:
            raise ValueError(f"{where}.{name}: must be {base}, got {val!r}")
        out[name] = float(val) if base == "float" else val
    return out
