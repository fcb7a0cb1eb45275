"""The PPEnvelope / PPResult stage-boundary contract: the single source of truth for the schema.

Everything here is *data* (``FieldSpec``, ``TensorSpec``, presence ``Rule`` s, ``CrossRule`` s)
plus pure validators over plain Python values. The docs' schema table and the z3 obligations
are generated from these declarations, and the runtime codec (runtime/codec.py) calls the very
same validators, so the schema cannot drift between what is documented, proved and enforced.

model/ is torch-free: tensors are seen only through descriptors with ``.dtype`` (a dtype name
such as ``"bfloat16"``) and ``.shape`` (a tuple of ints), e.g. ``TensorDesc``.

Conventions decided here (see PROTOCOL.md "Contract"):

* Presence is *iff*: a field or tensor must be present exactly when its ``required_when`` rule
  holds (``optional`` fields may also be omitted). Payload-free actions (NOOP, SHUTDOWN, ERROR)
  carry only the header-borne fields and no tensors; their tensor checks are skipped.
* Header-only envelopes (NOOP, SHUTDOWN) carry no chunk (``chunk_index = -1``) and rank0's
  *current* ``cache_epoch`` (the epoch in force when rank0 queues them, so a SHUTDOWN after a
  hard cut belongs to the new epoch even if no INFER of it was sent). ERROR carries the ids of
  the call it ends. One definition of every message's ids (``model/messages.py``) is shared by
  the model's tables and the runtime's codec.
* The plan bits of a regime (``plan_bits``) are decided here once: R0a and R0 both schedule the
  recompute pass (``do_kv_recompute=True``, one extra generator call); R0 marks it with the
  ``latent_anchor`` bit and carries no ``context_frames``.
* ERROR is the release path and is never refused for ordering reasons (no ``prev`` checks):
  refusing a terminal message would itself strand the peer.
* ``context_frames`` is the one wire name; ``context_frames_override`` is the pipeline-side
  alias (``PIPELINE_ALIASES``) and is rejected on the wire.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Callable, Mapping, NamedTuple, Optional

# Version 2, not 1: the earlier plan's contract (v1) had actions {NOOP, INFER, SHUTDOWN}.
# ERROR (a terminal the leader sends to the mesh and to rank0 when an envelope is bad) is a
# new action code a v1 peer would misread, and v2 also adds the explicit `regime` and the R0
# `latent_anchor` mode bit. Peers refuse any other version in the header, before any payload.
PP_ENVELOPE_VERSION = 2
PP_RESULT_VERSION = 2

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_NDIM = 6


class Action(IntEnum):
    NOOP = 0      # heartbeat, header only
    INFER = 1     # one chunk, payload follows the header
    SHUTDOWN = 2  # clean exit, header only
    ERROR = 3     # terminal: the peer must exit, header only (new in v2)


PAYLOAD_ACTIONS = frozenset({Action.INFER})
TERMINAL_ACTIONS = frozenset({Action.SHUTDOWN, Action.ERROR})
ENVELOPE_ACTIONS = tuple(Action)
# The leader answers INFER with a result, a rejected envelope with ERROR, and may
# acknowledge SHUTDOWN (drained); it never answers a heartbeat.
RESULT_ACTIONS = (Action.INFER, Action.SHUTDOWN, Action.ERROR)


class Regime(str, Enum):
    R1 = "R1"    # bring-up: no KV recompute
    R0A = "R0a"  # recompute from an anchor rank0 re-encodes from decoded output
    R0 = "R0"    # recompute from mesh-side latents (latent_anchor), no decode round trip


REGIMES = tuple(r.value for r in Regime)


def expected_generator_calls(regime, num_denoise_steps: int, *,
                             do_kv_recompute: Optional[bool] = None) -> int:
    """Generator calls per chunk: R1 -> steps; R0a and R0 -> steps + 1 (the recompute pass).

    ``do_kv_recompute=None`` means "recompute is scheduled whenever the regime has one" (the
    table in PROTOCOL.md). Pass the envelope's bit to get the count for one chunk: a chunk
    with no recompute (e.g. the first chunk after init_cache in R0a) runs ``steps`` calls.
    """
    regime = Regime(regime)
    recompute = plan_bits(regime)["do_kv_recompute"] if do_kv_recompute is None \
        else do_kv_recompute
    return num_denoise_steps + (1 if recompute and regime is not Regime.R1 else 0)


def plan_bits(regime) -> dict:
    """The recompute plan bits rank0 puts in every INFER envelope of `regime`: the one
    source for the envelope, the call-count formula and the model's `Config.calls`."""
    regime = Regime(regime)
    return {"regime": regime.value, "do_kv_recompute": regime is not Regime.R1,
            "latent_anchor": regime is Regime.R0}


# ---------------------------------------------------------------------------------------
# Where checks run. Envelope: rank0's preflight, the leader before the mesh broadcast, every
# mesh rank before Phase B. Result: the leader's preflight before replying, rank0 on receipt.
RANK0_BEFORE_SEND = "rank0_before_send"
LEADER_BEFORE_BROADCAST = "leader_before_broadcast"
MESH_BEFORE_PHASE_B = "mesh_before_phase_b"
LEADER_BEFORE_REPLY = "leader_before_reply"
RANK0_ON_RESULT = "rank0_on_result"
ENVELOPE_PLACES = (RANK0_BEFORE_SEND, LEADER_BEFORE_BROADCAST, MESH_BEFORE_PHASE_B)
RESULT_PLACES = (LEADER_BEFORE_REPLY, RANK0_ON_RESULT)
PLACES = ENVELOPE_PLACES + RESULT_PLACES

# Wire dtypes: name -> (manifest code, bytes per element). The codec's allowlist; each
# TensorSpec then narrows a tensor to exactly one of these.
WIRE_DTYPES = {"bfloat16": (1, 2), "int64": (2, 8), "float32": (3, 4),
               "float16": (4, 2), "uint8": (5, 1)}

# Pipeline-side names -> wire names. Only the wire name is accepted in a message.
PIPELINE_ALIASES = {"context_frames_override": "context_frames"}
# Names from older notes that the contract replaced; rejected with a pointer to the new ones.
RETIRED_NAMES = {"chunk_id": "(call_id, chunk_index)"}


class ContractError(ValueError):
    """A message violates the contract. ``str`` is one actionable line naming the field."""

    def __init__(self, field: str, reason: str, where: str):
        self.field, self.reason, self.where = field, reason, where
        super().__init__(f"contract violation at {where}: field {field!r}: {reason}")


class TensorDesc(NamedTuple):
    """What the contract sees of a tensor."""
    dtype: str
    shape: tuple


# ---------------------------------------------------------------------------------------
# Presence rules as data: a conjunction of atoms (field, op, value), op in {"==", "in"}.
# The empty conjunction is "always". Atoms compare strictly (a bool never equals an int).

@dataclass(frozen=True)
class Rule:
    atoms: tuple = ()

    def holds(self, meta: Mapping) -> bool:
        return all(_atom_holds(meta, a) for a in self.atoms)

    def render(self) -> str:
        return " and ".join(_render_atom(a) for a in self.atoms) or "always"


def _same(x, v) -> bool:
    return isinstance(x, bool) == isinstance(v, bool) and x == v


def _atom_holds(meta: Mapping, atom) -> bool:
    name, op, value = atom
    if name not in meta:
        return False
    x = meta[name]
    return _same(x, value) if op == "==" else any(_same(x, v) for v in value)


def _render_atom(atom) -> str:
    name, op, value = atom
    if op == "in":
        return f"{name} in ({', '.join(getattr(v, 'name', repr(v)) for v in value)})"
    if value is True:
        return name
    return f"{name} == {getattr(value, 'value', value)!r}"


ALWAYS = Rule()
ON_INFER = Rule((("action", "in", (Action.INFER,)),))
ON_R0A_RECOMPUTE = Rule(ON_INFER.atoms + (("do_kv_recompute", "==", True),
                                          ("regime", "==", Regime.R0A.value)))


@dataclass(frozen=True)
class FieldSpec:
    name: str
    type: str                   # 'int' | 'bool' | 'float' | 'str'
    required_when: Rule
    why: str
    validated_at: tuple
    bounds: Optional[tuple] = None   # inclusive (lo, hi) for int / float
    choices: Optional[tuple] = None  # the only accepted values
    optional: bool = False           # may be omitted even when required_when holds


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: Optional[tuple]      # per dim: int exact | str (= that meta field) | None (>= 1)
    required_when: Rule
    why: str
    validated_at: tuple
    ndim: tuple = (1, MAX_NDIM)  # used when shape is None

    def render_shape(self) -> str:
        if self.shape is None:
            return f"any, ndim {self.ndim[0]}..{self.ndim[1]}"
        return "[" + ", ".join("*" if d is None else str(d) for d in self.shape) + "]"


@dataclass(frozen=True)
class CrossRule:
    name: str
    fields: tuple               # the first is the one named in the error
    statement: str
    why: str
    validated_at: tuple
    needs_prev: bool = False


_E, _R = ENVELOPE_PLACES, RESULT_PLACES
_ID = (0, INT64_MAX)
_ACTIONS = tuple(int(a) for a in Action)

ENVELOPE_FIELDS = (
    FieldSpec("pp_envelope_version", "int", ALWAYS,
              "peers refuse a schema they do not speak, before any payload", _E,
              choices=(PP_ENVELOPE_VERSION,)),
    FieldSpec("action", "int", ALWAYS,
              "selects payload (INFER) or header-only heartbeat / terminal", _E,
              choices=_ACTIONS),
    FieldSpec("call_id", "int", ALWAYS,
              "monotonic across all actions: pairs every message with its reply and log line",
              _E, bounds=_ID),
    FieldSpec("chunk_index", "int", ALWAYS,
              "monotonic across INFER; -1 in NOOP/SHUTDOWN (no chunk); ERROR: the call it ends",
              _E, bounds=(-1, INT64_MAX)),
    FieldSpec("cache_epoch", "int", ALWAYS,
              "bumped by a hard cut; results of an older epoch are dropped, never decoded",
              _E, bounds=_ID),
    FieldSpec("height", "int", ON_INFER, "output pixel height the plan was built for", _E,
              bounds=(1, 16384)),
    FieldSpec("width", "int", ON_INFER, "output pixel width the plan was built for", _E,
              bounds=(1, 16384)),
    FieldSpec("current_start_frame", "int", ON_INFER,
              "KV-cache write position decided by rank0; the mesh never advances it itself",
              _E, bounds=(0, INT64_MAX)),
    FieldSpec("do_kv_recompute", "bool", ON_INFER,
              "rank0 schedules the recompute pass; the mesh never infers it locally", _E),
    FieldSpec("num_denoise_steps", "int", ON_INFER,
              "length of the denoise schedule carried in current_denoising_step_list", _E,
              bounds=(1, 1000)),
    FieldSpec("expected_generator_calls", "int", ON_INFER,
              "every mesh rank asserts this count before Phase B: a +-1 mismatch hangs (FM-02)",
              _E, bounds=(1, 1001)),
    FieldSpec("init_cache", "bool", ON_INFER,
              "first chunk of an epoch: the mesh (re)creates its caches", _E),
    FieldSpec("reset_kv_cache", "bool", ON_INFER,
              "rank0-decided KV reset; a plan bit the mesh obeys, never infers", _E),
    FieldSpec("reset_crossattn_cache", "bool", ON_INFER,
              "rank0-decided cross-attention cache reset (prompt change)", _E),
    FieldSpec("base_seed", "int", ON_INFER,
              "all mesh ranks draw identical noise; TP shards must agree", _E,
              bounds=(0, INT64_MAX)),
    FieldSpec("kv_cache_attention_bias", "float", ON_INFER,
              "attention bias on cached KV; identical on every TP rank", _E),
    FieldSpec("noise_scale", "float", ON_INFER,
              "noise level for this chunk's input latents", _E, bounds=(0.0, 1e6)),
    FieldSpec("pp_disable_vace", "bool", ON_INFER,
              "VACE conditioning has no stage contract yet: the gate must stay True", _E,
              choices=(True,)),
    FieldSpec("latent_anchor", "bool", ON_INFER,
              "explicit R0 mode bit: recompute from mesh-side latents, no context_frames", _E),
    FieldSpec("regime", "str", ON_INFER,
              "recompute regime that fixes the call-count formula and context_frames presence",
              _E, choices=REGIMES),
)

ENVELOPE_TENSORS = (
    TensorSpec("conditioning_embeds", "bfloat16", None, ON_INFER,
               "prompt conditioning computed by rank0 (Phase A)", _E),
    TensorSpec("latents_in", "bfloat16", None, ON_INFER,
               "input latents for this chunk; latents_out has the same shape", _E),
    TensorSpec("current_denoising_step_list", "int64", ("num_denoise_steps",), ON_INFER,
               "the denoise schedule; its length is the step count the mesh runs", _E),
    TensorSpec("context_frames", "bfloat16", None, ON_R0A_RECOMPUTE,
               "R0a anchor rank0 re-encoded from decoded output; the mesh never decodes pixels",
               _E),
)

RESULT_FIELDS = (
    FieldSpec("pp_result_version", "int", ALWAYS,
              "rank0 refuses a result schema it does not speak", _R,
              choices=(PP_RESULT_VERSION,)),
    FieldSpec("action", "int", ALWAYS,
              "INFER result (payload), or header-only SHUTDOWN ack / ERROR terminal", _R,
              choices=tuple(int(a) for a in RESULT_ACTIONS)),
    FieldSpec("call_id", "int", ALWAYS, "equals the envelope's call_id", _R, bounds=_ID),
    FieldSpec("chunk_index", "int", ALWAYS, "equals the envelope's chunk_index", _R,
              bounds=(-1, INT64_MAX)),
    FieldSpec("cache_epoch", "int", ALWAYS,
              "the envelope's epoch; rank0 drops the result if it is no longer current", _R,
              bounds=_ID),
    FieldSpec("observed_generator_calls", "int", ON_INFER,
              "calls the mesh actually ran; must equal expected_generator_calls", _R,
              bounds=(0, INT64_MAX)),
    FieldSpec("mesh_current_start_frame", "int", ON_INFER,
              "the current_start_frame the mesh used; catches cache-position drift", _R,
              bounds=(0, INT64_MAX)),
    FieldSpec("output_digest_i64", "int", ON_INFER,
              "optional debug digest of latents_out for cross-run comparison", _R,
              bounds=(INT64_MIN, INT64_MAX), optional=True),
    FieldSpec("t_b_ms", "float", ON_INFER,
              "Phase B duration measured on the mesh: stage1 in the overlap proof", _R,
              bounds=(0.0, 1e12)),
    FieldSpec("t_mesh_idle_ms", "float", ON_INFER,
              "gap between end of Phase B k-1 and start of k: the scheduling-bug signature",
              _R, bounds=(0.0, 1e12)),
)

RESULT_TENSORS = (
    TensorSpec("latents_out", "bfloat16", None, ON_INFER,
               "denoised latents for rank0's Phase C decode", _R),
)

ENVELOPE_RULES = (
    CrossRule("infer_chunk_index", ("chunk_index", "action"),
              "action == INFER implies chunk_index >= 0",
              "-1 means no chunk: header-only envelopes only", _E),
    CrossRule("r1_no_recompute", ("do_kv_recompute", "regime"),
              "regime == R1 implies not do_kv_recompute",
              "R1 is bring-up without recompute", _E),
    CrossRule("latent_anchor_iff_r0", ("latent_anchor", "regime"),
              "latent_anchor == (regime == R0)",
              "the R0 mode bit is explicit and cannot disagree with the regime", _E),
    CrossRule("call_count", ("expected_generator_calls", "regime", "num_denoise_steps",
                             "do_kv_recompute"),
              "expected_generator_calls == expected_generator_calls(regime, steps, recompute)",
              "rank0 derives the count from the plan; the mesh asserts it (FM-02)", _E),
    CrossRule("call_id_monotonic", ("call_id",), "call_id > prev.call_id",
              "a replayed or reordered message is refused, not executed twice", _E, True),
    CrossRule("chunk_index_monotonic", ("chunk_index", "action"),
              "INFER: chunk_index > prev.chunk_index; NOOP/SHUTDOWN: chunk_index == -1",
              "only INFER carries and advances the chunk", _E, True),
    CrossRule("epoch_monotonic", ("cache_epoch", "action"),
              "cache_epoch >= prev.cache_epoch (NOOP/SHUTDOWN carry rank0's current epoch)",
              "epochs never go back", _E, True),
    CrossRule("new_epoch_inits_cache", ("init_cache", "cache_epoch"),
              "INFER with cache_epoch > prev.cache_epoch implies init_cache",
              "after a hard cut the next envelope carries init_cache=True (FM-10)", _E, True),
)

RESULT_RULES = (
    CrossRule("result_action", ("action",), "result.action == envelope.action (unless ERROR)",
              "a reply answers the envelope it was computed for", _R),
    CrossRule("result_ids", ("call_id", "chunk_index", "cache_epoch"),
              "(call_id, chunk_index, cache_epoch) equal the envelope's (unless ERROR)",
              "pairs result k with envelope k; the epoch lets rank0 drop stale output", _R),
    CrossRule("observed_calls", ("observed_generator_calls",),
              "INFER: observed_generator_calls == envelope.expected_generator_calls",
              "the mesh ran exactly the planned calls", _R),
    CrossRule("mesh_start_frame", ("mesh_current_start_frame",),
              "INFER: mesh_current_start_frame == envelope.current_start_frame",
              "the mesh wrote the KV cache where rank0 planned", _R),
    CrossRule("latents_out_shape", ("latents_out",),
              "INFER: latents_out.shape == envelope latents_in.shape (when known)",
              "denoising preserves the latent shape", _R),
)

HEADER_FIELDS = ("action", "call_id", "chunk_index", "cache_epoch")  # + the version field


# ---------------------------------------------------------------------------------------
# Validators

def validate_envelope(meta: Mapping, tensors: Mapping, *, where: str,
                      prev: Optional[Mapping] = None) -> None:
    """Check one envelope; ``prev`` is the previous envelope's meta on this channel."""
    _check_place(where, ENVELOPE_PLACES)
    _check_message(meta, tensors, ENVELOPE_FIELDS, ENVELOPE_TENSORS, where)
    ctx = {"prev": prev}
    _run_rules(ENVELOPE_RULES, _ENVELOPE_CHECKS, meta, tensors, ctx, where)


def validate_result(meta: Mapping, tensors: Mapping, *, envelope_meta: Optional[Mapping],
                    where: str, envelope_tensors: Optional[Mapping] = None) -> None:
    """Check one result against the envelope it answers (may be None only for ERROR)."""
    _check_place(where, RESULT_PLACES)
    _check_message(meta, tensors, RESULT_FIELDS, RESULT_TENSORS, where)
    if meta["action"] != Action.ERROR and not isinstance(envelope_meta, Mapping):
        raise ContractError("envelope_meta", "a non-ERROR result needs the envelope it "
                            "answers (pass envelope_meta)", where)
    ctx = {"env": envelope_meta, "env_tensors": envelope_tensors}
    _run_rules(RESULT_RULES, _RESULT_CHECKS, meta, tensors, ctx, where)


def _check_place(where, places) -> None:
    if where not in places:
        raise ContractError("where", f"{where!r} is not one of {places}", str(where))


def _check_message(meta, tensors, fields, tspecs, where) -> None:
    if not isinstance(meta, Mapping):
        raise ContractError("meta", f"must be a mapping, got {type(meta).__name__}", where)
    if not isinstance(tensors, Mapping):
        raise ContractError("tensors", f"must be a mapping, got {type(tensors).__name__}",
                            where)
    _check_names(meta, fields, "field", where)
    need = {}     # id(rule) -> rule.holds(meta): most specs share a handful of rules
    for spec in _at(fields, where):
        _check_field(spec, meta, where, need)
    if meta.get("action") not in PAYLOAD_ACTIONS:
        if tensors:
            name = sorted(map(str, tensors))[0]
            raise ContractError(name, f"{Action(meta['action']).name} carries no payload; "
                                "send no tensors", where)
        return
    _check_names(tensors, tspecs, "tensor", where)
    for spec in _at(tspecs, where):
        _check_tensor(spec, meta, tensors, where, need)


_SPECS_AT: dict = {}
_NAMES: dict = {}


def _at(specs: tuple, where: str) -> tuple:
    """The specs validated at `where`, in their order (computed once per spec table)."""
    if not isinstance(specs, tuple):
        return tuple(s for s in specs if where in s.validated_at)
    key = (id(specs), where)
    got = _SPECS_AT.get(key)
    if got is None:
        got = _SPECS_AT[key] = (specs, tuple(s for s in specs if where in s.validated_at))
    return got[1]


def _known(specs: tuple) -> frozenset:
    got = _NAMES.get(id(specs))
    if got is None:
        got = _NAMES[id(specs)] = (specs, frozenset(s.name for s in specs))
    return got[1]


def _check_names(mapping, specs, what, where) -> None:
    known = _known(specs) if isinstance(specs, tuple) else {s.name for s in specs}
    for name in mapping:
        if name in PIPELINE_ALIASES:
            raise ContractError(name, f"pipeline-side alias; the wire name is "
                                f"{PIPELINE_ALIASES[name]!r}", where)
        if name in RETIRED_NAMES:
            raise ContractError(name, f"retired name; use {RETIRED_NAMES[name]}", where)
        if name not in known:
            raise ContractError(str(name)[:60], f"unknown {what}, not in the v2 schema "
                                f"(model.contract)", where)


def _check_presence(spec, present: bool, meta, where, cache=None) -> bool:
    rule = spec.required_when
    if cache is None:
        need = rule.holds(meta)
    else:
        need = cache.get(id(rule))
        if need is None:
            need = cache[id(rule)] = rule.holds(meta)
    if need and not present and not getattr(spec, "optional", False):
        raise ContractError(spec.name, f"missing; required when {spec.required_when.render()}",
                            where)
    if present and not need:
        raise ContractError(spec.name, f"must be absent unless "
                            f"{spec.required_when.render()}", where)
    return present


_TYPE_OK = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "float": lambda v: isinstance(v, float),
    "str": lambda v: isinstance(v, str),
}


def _check_field(spec: FieldSpec, meta, where, need=None) -> None:
    if not _check_presence(spec, spec.name in meta, meta, where, need):
        return
    value = meta[spec.name]
    if not _TYPE_OK[spec.type](value):
        raise ContractError(spec.name, f"must be {spec.type}, got "
                            f"{type(value).__name__} {value!r:.40}", where)
    if spec.type == "int" and not INT64_MIN <= value <= INT64_MAX:
        raise ContractError(spec.name, "does not fit in int64", where)
    if spec.type == "float" and not math.isfinite(value):
        raise ContractError(spec.name, f"must be finite, got {value!r}", where)
    if spec.choices is not None and not any(_same(value, c) for c in spec.choices):
        raise ContractError(spec.name, f"must be one of {spec.choices}, got {value!r:.40}",
                            where)
    if spec.bounds is not None and not spec.bounds[0] <= value <= spec.bounds[1]:
        raise ContractError(spec.name, f"must be in [{spec.bounds[0]}, {spec.bounds[1]}], "
                            f"got {value!r}", where)


def _check_tensor(spec: TensorSpec, meta, tensors, where, need=None) -> None:
    if not _check_presence(spec, spec.name in tensors, meta, where, need):
        return
    dtype, shape = _desc(spec.name, tensors[spec.name], where)
    if dtype != spec.dtype:
        raise ContractError(spec.name, f"dtype must be {spec.dtype}, got {dtype}", where)
    if spec.shape is not None:
        want = [meta[d] if isinstance(d, str) else d for d in spec.shape]
        if len(shape) != len(want) or any(w is not None and s != w
                                          for s, w in zip(shape, want)):
            raise ContractError(spec.name, f"shape must be {spec.render_shape()} = "
                                f"{want}, got {list(shape)}", where)
    lo, hi = spec.ndim if spec.shape is None else (len(spec.shape), len(spec.shape))
    if not lo <= len(shape) <= hi or any(d < 1 for d in shape):
        raise ContractError(spec.name, f"shape must be {spec.render_shape()} with every "
                            f"dim >= 1, got {list(shape)}", where)


def _desc(name, desc, where) -> tuple:
    dtype, shape = getattr(desc, "dtype", None), getattr(desc, "shape", None)
    ok = isinstance(dtype, str) and isinstance(shape, (tuple, list)) and all(
        isinstance(d, int) and not isinstance(d, bool) for d in shape)
    if not ok:
        raise ContractError(name, "descriptor needs .dtype (str) and .shape (tuple of int)",
                            where)
    return dtype, tuple(shape)


def _run_rules(rules, checks, meta, tensors, ctx, where) -> None:
    for rule in rules:
        if where not in rule.validated_at:
            continue
        if rule.needs_prev and ctx.get("prev") is None:
            continue
        problem = checks[rule.name](meta, tensors, ctx)
        if problem:
            field, reason = problem if isinstance(problem, tuple) else (rule.fields[0], problem)
            raise ContractError(field, f"{reason} (rule {rule.name}: {rule.statement})", where)


# ---- envelope cross-field checks: return a reason string, or None when the rule holds ----

def _infer(meta) -> bool:
    return meta["action"] == Action.INFER


def _chk_infer_chunk(meta, tensors, ctx):
    if _infer(meta) and meta["chunk_index"] < 0:
        return f"INFER needs chunk_index >= 0, got {meta['chunk_index']}"


def _chk_r1_recompute(meta, tensors, ctx):
    if _infer(meta) and meta["regime"] == Regime.R1 and meta["do_kv_recompute"]:
        return "do_kv_recompute=True in regime R1"


def _chk_anchor(meta, tensors, ctx):
    if _infer(meta) and meta["latent_anchor"] != (meta["regime"] == Regime.R0):
        return f"latent_anchor={meta['latent_anchor']} in regime {meta['regime']}"


def _chk_call_count(meta, tensors, ctx):
    if not _infer(meta):
        return None
    want = expected_generator_calls(meta["regime"], meta["num_denoise_steps"],
                                    do_kv_recompute=meta["do_kv_recompute"])
    if meta["expected_generator_calls"] != want:
        return f"got {meta['expected_generator_calls']}, the plan gives {want}"


def _ordered(ctx, meta) -> Optional[Mapping]:
    """The previous envelope, when ordering rules apply (never to ERROR)."""
    prev = ctx.get("prev")
    return None if meta["action"] == Action.ERROR else prev


def _chk_call_id(meta, tensors, ctx):
    prev = _ordered(ctx, meta)
    if prev is not None and meta["call_id"] <= prev["call_id"]:
        return f"call_id {meta['call_id']} not > previous {prev['call_id']}"


def _chk_chunk(meta, tensors, ctx):
    prev = _ordered(ctx, meta)
    if prev is None:
        return None
    got, last = meta["chunk_index"], prev["chunk_index"]
    if _infer(meta) and got <= last:
        return f"INFER chunk_index {got} not > previous {last}"
    if not _infer(meta) and got != -1:
        return f"header-only chunk_index {got} != -1 (no chunk)"


def _chk_epoch(meta, tensors, ctx):
    prev = _ordered(ctx, meta)
    if prev is None:
        return None
    got, last = meta["cache_epoch"], prev["cache_epoch"]
    if got < last:
        return f"cache_epoch {got} after {last}"


def _chk_new_epoch(meta, tensors, ctx):
    prev = _ordered(ctx, meta)
    if prev is not None and _infer(meta) and meta["cache_epoch"] > prev["cache_epoch"] \
            and not meta["init_cache"]:
        return f"epoch {prev['cache_epoch']} -> {meta['cache_epoch']} without init_cache"


_ENVELOPE_CHECKS: dict[str, Callable] = {
    "infer_chunk_index": _chk_infer_chunk, "r1_no_recompute": _chk_r1_recompute,
    "latent_anchor_iff_r0": _chk_anchor, "call_count": _chk_call_count,
    "call_id_monotonic": _chk_call_id, "chunk_index_monotonic": _chk_chunk,
    "epoch_monotonic": _chk_epoch, "new_epoch_inits_cache": _chk_new_epoch,
}


# ---- result cross-field checks --------------------------------------------------------

def _answers(meta, ctx) -> Optional[Mapping]:
    """The envelope a non-ERROR result must match."""
    return None if meta["action"] == Action.ERROR else ctx["env"]


def _chk_result_action(meta, tensors, ctx):
    env = _answers(meta, ctx)
    if env is not None and meta["action"] != env.get("action"):
        return f"result action {meta['action']} answers envelope action {env.get('action')}"


def _chk_result_ids(meta, tensors, ctx):
    env = _answers(meta, ctx)
    for name in ("call_id", "chunk_index", "cache_epoch") if env is not None else ():
        if meta[name] != env.get(name):
            return name, f"{meta[name]} != envelope's {env.get(name)}"


def _chk_observed(meta, tensors, ctx):
    env = ctx["env"]
    if _infer(meta) and meta["observed_generator_calls"] != env.get("expected_generator_calls"):
        return (f"observed {meta['observed_generator_calls']} generator calls, envelope "
                f"expected {env.get('expected_generator_calls')}")


def _chk_start_frame(meta, tensors, ctx):
    env = ctx["env"]
    if _infer(meta) and meta["mesh_current_start_frame"] != env.get("current_start_frame"):
        return (f"mesh used start frame {meta['mesh_current_start_frame']}, envelope says "
                f"{env.get('current_start_frame')}")


def _chk_latents_shape(meta, tensors, ctx):
    env_t = ctx.get("env_tensors")
    if not _infer(meta) or not env_t or "latents_in" not in env_t:
        return None
    want, got = tuple(env_t["latents_in"].shape), tuple(tensors["latents_out"].shape)
    if want != got:
        return f"latents_out shape {list(got)} != latents_in shape {list(want)}"


_RESULT_CHECKS: dict[str, Callable] = {
    "result_action": _chk_result_action, "result_ids": _chk_result_ids,
    "observed_calls": _chk_observed, "mesh_start_frame": _chk_start_frame,
    "latents_out_shape": _chk_latents_shape,
}


# ---------------------------------------------------------------------------------------
# Builders for tests and examples

_ENVELOPE_DEFAULTS = {
    "pp_envelope_version": PP_ENVELOPE_VERSION, "action": int(Action.INFER), "call_id": 0,
    "chunk_index": 0, "cache_epoch": 0, "height": 480, "width": 832,
    "current_start_frame": 0, "do_kv_recompute": False, "num_denoise_steps": 4,
    "init_cache": True, "reset_kv_cache": False, "reset_crossattn_cache": False,
    "base_seed": 42, "kv_cache_attention_bias": 1.0, "noise_scale": 1.0,
    "pp_disable_vace": True, "regime": Regime.R1.value,
}


def make_envelope_meta(**overrides) -> dict:
    """A valid envelope meta dict (INFER, R1 by default); overrides are applied verbatim.

    Derived defaults follow the overrides: ``latent_anchor`` = (regime == R0) and
    ``expected_generator_calls`` from the regime formula, unless overridden. For a
    header-only action the INFER-only defaults are dropped (overrides are kept).
    """
    meta = {**_ENVELOPE_DEFAULTS, **overrides}
    meta.setdefault("latent_anchor", meta["regime"] == Regime.R0.value)
    if "expected_generator_calls" not in meta:
        try:
            meta["expected_generator_calls"] = expected_generator_calls(
                meta["regime"], meta["num_denoise_steps"],
                do_kv_recompute=meta["do_kv_recompute"])
        except (ValueError, TypeError):
            meta["expected_generator_calls"] = 1
    if meta["action"] not in PAYLOAD_ACTIONS:
        keep = {s.name for s in ENVELOPE_FIELDS if s.required_when is ALWAYS}
        meta = {k: v for k, v in meta.items() if k in keep or k in overrides}
    return meta


def make_result_meta(envelope_meta: Mapping, **overrides) -> dict:
    """A valid result meta dict answering ``envelope_meta``."""
    action = overrides.get("action", envelope_meta["action"])
    meta = {"pp_result_version": PP_RESULT_VERSION, "action": int(action),
            **{k: envelope_meta[k] for k in HEADER_FIELDS if k != "action"}}
    if action == Action.INFER:
        meta.update(observed_generator_calls=envelope_meta["expected_generator_calls"],
                    mesh_current_start_frame=envelope_meta["current_start_frame"],
                    t_b_ms=12.5, t_mesh_idle_ms=0.0)
    meta.update(overrides)
    return meta


def example_tensor_descs(meta: Mapping, latent_shape=(1, 3, 16, 8, 8),
                         embed_shape=(1, 8, 32)) -> dict:
    """Descriptors that satisfy the contract for an envelope ``meta``."""
    if meta.get("action") not in PAYLOAD_ACTIONS:
        return {}
    descs = {"conditioning_embeds": TensorDesc("bfloat16", tuple(embed_shape)),
             "latents_in": TensorDesc("bfloat16", tuple(latent_shape)),
             "current_denoising_step_list": TensorDesc("int64",
                                                       (meta["num_denoise_steps"],))}
    if ON_R0A_RECOMPUTE.holds(meta):
        descs["context_frames"] = TensorDesc("bfloat16", tuple(latent_shape))
    return descs


def field_spec(kind: str, name: str) -> FieldSpec:
    specs = ENVELOPE_FIELDS if kind == "envelope" else RESULT_FIELDS
    return next(s for s in specs if s.name == name)


def tensor_specs(kind: str) -> tuple:
    """The manifest's name-id order: a tensor's id is its index here."""
    return ENVELOPE_TENSORS if kind == "envelope" else RESULT_TENSORS
