"""The PPEnvelope / PPResult contract (model/contract.py): schema data and validators."""
import math
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st

from lockstep.model import contract as C
from lockstep.model.contract import (Action, ContractError, TensorDesc, example_tensor_descs,
                            make_envelope_meta, make_result_meta, validate_envelope,
                            validate_result)

PROTOCOL_ENVELOPE_FIELDS = {
    "pp_envelope_version", "action", "call_id", "chunk_index", "cache_epoch", "height",
    "width", "current_start_frame", "do_kv_recompute", "num_denoise_steps",
    "expected_generator_calls", "init_cache", "reset_kv_cache", "reset_crossattn_cache",
    "base_seed", "kv_cache_attention_bias", "noise_scale", "pp_disable_vace",
    "latent_anchor", "regime"}
PROTOCOL_RESULT_FIELDS = {
    "pp_result_version", "action", "call_id", "chunk_index", "cache_epoch",
    "observed_generator_calls", "mesh_current_start_frame", "output_digest_i64", "t_b_ms",
    "t_mesh_idle_ms"}
SEND = C.RANK0_BEFORE_SEND
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LATENT = TensorDesc("bfloat16", (1, 3, 16, 8, 8))


def env(**kw):
    meta = make_envelope_meta(**kw)
    return meta, example_tensor_descs(meta)


def raises_on(field, fn, *a, **kw):
    with pytest.raises(ContractError) as info:
        fn(*a, **kw)
    assert info.value.field == field, str(info.value)
    assert f"'{field}'" in str(info.value) and "\n" not in str(info.value)
    return info.value


# ---- schema as data ------------------------------------------------------------------

def test_module_is_torch_free():
    code = "import sys, model.contract; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_schema_covers_protocol():
    assert {f.name for f in C.ENVELOPE_FIELDS} == PROTOCOL_ENVELOPE_FIELDS
    assert {f.name for f in C.RESULT_FIELDS} == PROTOCOL_RESULT_FIELDS
    assert [t.name for t in C.ENVELOPE_TENSORS] == [
        "conditioning_embeds", "latents_in", "current_denoising_step_list", "context_frames"]
    assert [t.name for t in C.RESULT_TENSORS] == ["latents_out"]


@pytest.mark.parametrize("spec", C.ENVELOPE_FIELDS + C.RESULT_FIELDS + C.ENVELOPE_TENSORS
                         + C.RESULT_TENSORS + C.ENVELOPE_RULES + C.RESULT_RULES,
                         ids=lambda s: s.name)
def test_every_spec_is_documented(spec):
    assert spec.why and set(spec.validated_at) <= set(C.PLACES) and spec.validated_at
    if isinstance(spec, C.FieldSpec):
        assert spec.type in ("int", "bool", "float", "str")
        assert spec.required_when.render()
    if isinstance(spec, C.TensorSpec):
        assert spec.dtype in C.WIRE_DTYPES


def test_versions_and_actions():
    assert C.PP_ENVELOPE_VERSION == 2 and C.PP_RESULT_VERSION == 2
    assert [(a.name, int(a)) for a in Action] == [
        ("NOOP", 0), ("INFER", 1), ("SHUTDOWN", 2), ("ERROR", 3)]
    assert C.PIPELINE_ALIASES == {"context_frames_override": "context_frames"}


@pytest.mark.parametrize("regime,rec,steps,want", [
    ("R1", None, 4, 4), ("R0a", None, 4, 5), ("R0", None, 4, 5),
    ("R0a", False, 3, 3), ("R0", True, 1, 2), ("R1", False, 7, 7)])
def test_expected_generator_calls(regime, rec, steps, want):
    assert C.expected_generator_calls(regime, steps, do_kv_recompute=rec) == want


def test_rule_render():
    assert C.ALWAYS.render() == "always"
    assert C.ON_R0A_RECOMPUTE.render() == \
        "action in (INFER) and do_kv_recompute and regime == 'R0a'"


# ---- valid messages -----------------------------------------------------------------

@pytest.mark.parametrize("where", C.ENVELOPE_PLACES)
@pytest.mark.parametrize("regime,rec", [("R1", False), ("R0a", False), ("R0a", True),
                                        ("R0", False), ("R0", True)])
def test_valid_envelopes(where, regime, rec):
    meta, descs = env(regime=regime, do_kv_recompute=rec)
    assert ("context_frames" in descs) == (regime == "R0a" and rec)
    validate_envelope(meta, descs, where=where)


@pytest.mark.parametrize("action", [Action.NOOP, Action.SHUTDOWN, Action.ERROR])
def test_header_only_envelopes(action):
    meta = make_envelope_meta(action=int(action), chunk_index=-1)
    assert set(meta) == {"pp_envelope_version", "action", "call_id", "chunk_index",
                         "cache_epoch"}
    validate_envelope(meta, {}, where=SEND)


def test_valid_results():
    meta, descs = env(regime="R0a", do_kv_recompute=True)
    res = make_result_meta(meta, output_digest_i64=-5)
    validate_result(res, {"latents_out": LATENT}, envelope_meta=meta,
                    where=C.RANK0_ON_RESULT, envelope_tensors=descs)
    del res["output_digest_i64"]
    validate_result(res, {"latents_out": LATENT}, envelope_meta=meta, where="leader_before_reply")
    err = make_result_meta(meta, action=int(Action.ERROR))
    validate_result(err, {}, envelope_meta=None, where=C.RANK0_ON_RESULT)


# ---- each rule violated, with the field named ------------------------------------------

def _steps(meta, n):
    return {**example_tensor_descs(meta), "current_denoising_step_list": TensorDesc("int64", (n,))}


ENVELOPE_VIOLATIONS = [
    # (meta overrides, tensor edit(meta, descs) -> descs, field)
    ({"pp_envelope_version": 1}, None, "pp_envelope_version"),
    ({"action": 7}, None, "action"),
    ({"action": True}, None, "action"),
    ({"height": True}, None, "height"),
    ({"height": 0}, None, "height"),
    ({"width": 480.0}, None, "width"),
    ({"noise_scale": 1}, None, "noise_scale"),
    ({"kv_cache_attention_bias": math.nan}, None, "kv_cache_attention_bias"),
    ({"kv_cache_attention_bias": math.inf}, None, "kv_cache_attention_bias"),
    ({"base_seed": 2**63}, None, "base_seed"),
    ({"init_cache": 1}, None, "init_cache"),
    ({"pp_disable_vace": False}, None, "pp_disable_vace"),
    ({"regime": "R2"}, None, "regime"),
    ({"chunk_id": 3}, None, "chunk_id"),
    ({"context_frames_override": 1}, None, "context_frames_override"),
    ({"chunk_index": -1}, None, "chunk_index"),
    ({"regime": "R1", "do_kv_recompute": True}, None, "do_kv_recompute"),
    ({"regime": "R0", "latent_anchor": False}, None, "latent_anchor"),
    ({"regime": "R1", "latent_anchor": True}, None, "latent_anchor"),
    ({"regime": "R0a", "latent_anchor": True}, None, "latent_anchor"),
    ({"expected_generator_calls": 5}, None, "expected_generator_calls"),
    ({"expected_generator_calls": 3}, None, "expected_generator_calls"),
    ({"regime": "R0a", "do_kv_recompute": True, "expected_generator_calls": 4}, None,
     "expected_generator_calls"),
    ({}, lambda m, d: _steps(m, m["num_denoise_steps"] + 1), "current_denoising_step_list"),
    ({}, lambda m, d: {**d, "current_denoising_step_list": TensorDesc("int32", (4,))},
     "current_denoising_step_list"),
    ({}, lambda m, d: {**d, "current_denoising_step_list": TensorDesc("int64", (4, 1))},
     "current_denoising_step_list"),
    ({}, lambda m, d: {k: v for k, v in d.items() if k != "latents_in"}, "latents_in"),
    ({}, lambda m, d: {**d, "latents_in": TensorDesc("float32", LATENT.shape)}, "latents_in"),
    ({}, lambda m, d: {**d, "latents_in": TensorDesc("bfloat16", (1, 0, 3))}, "latents_in"),
    ({}, lambda m, d: {**d, "latents_in": TensorDesc("bfloat16", (1,) * 7)}, "latents_in"),
    ({}, lambda m, d: {**d, "latents_in": object()}, "latents_in"),
    ({}, lambda m, d: {**d, "bogus": LATENT}, "bogus"),
    ({}, lambda m, d: {**d, "context_frames_override": LATENT}, "context_frames_override"),
    ({"regime": "R0a", "do_kv_recompute": True},
     lambda m, d: {k: v for k, v in d.items() if k != "context_frames"}, "context_frames"),
    ({"regime": "R0a", "do_kv_recompute": False},
     lambda m, d: {**d, "context_frames": LATENT}, "context_frames"),
    ({"regime": "R0", "do_kv_recompute": True},
     lambda m, d: {**d, "context_frames": LATENT}, "context_frames"),
    ({"regime": "R0a", "do_kv_recompute": True},
     lambda m, d: {**d, "context_frames": TensorDesc("int64", (3,))}, "context_frames"),
    ({"action": 0}, lambda m, d: {"latents_in": LATENT}, "latents_in"),
    ({"action": 2, "height": 480}, None, "height"),
]


@pytest.mark.parametrize("over,edit,field", ENVELOPE_VIOLATIONS,
                         ids=[v[2] + str(i) for i, v in enumerate(ENVELOPE_VIOLATIONS)])
def test_envelope_violation_names_field(over, edit, field):
    meta = make_envelope_meta(**over)
    descs = example_tensor_descs(meta) if meta.get("action") == 1 else {}
    if edit:
        descs = edit(meta, descs)
    raises_on(field, validate_envelope, meta, descs, where=C.LEADER_BEFORE_BROADCAST)


def test_missing_field_named():
    meta, descs = env()
    del meta["num_denoise_steps"]
    err = raises_on("num_denoise_steps", validate_envelope, meta, descs, where=SEND)
    assert "missing" in err.reason and "INFER" in err.reason


def test_bad_where_and_containers():
    meta, descs = env()
    raises_on("where", validate_envelope, meta, descs, where="rank0_on_result")
    raises_on("meta", validate_envelope, [1], descs, where=SEND)
    raises_on("tensors", validate_envelope, meta, None, where=SEND)


PREV = make_envelope_meta(call_id=10, chunk_index=5, cache_epoch=2, init_cache=False)
PREV_VIOLATIONS = [
    ({"call_id": 10, "chunk_index": 6}, "call_id"),
    ({"call_id": 11, "chunk_index": 5}, "chunk_index"),
    ({"call_id": 11, "chunk_index": 4}, "chunk_index"),
    ({"call_id": 11, "chunk_index": 6, "cache_epoch": 1}, "cache_epoch"),
    ({"call_id": 11, "chunk_index": 6, "cache_epoch": 3, "init_cache": False}, "init_cache"),
    ({"action": 0, "call_id": 9, "chunk_index": 5, "cache_epoch": 2}, "call_id"),
    # header-only NOOP/SHUTDOWN carry no chunk and rank0's current epoch (model/messages.py)
    ({"action": 0, "call_id": 11, "chunk_index": 5, "cache_epoch": 2}, "chunk_index"),
    ({"action": 2, "call_id": 11, "chunk_index": -1, "cache_epoch": 1}, "cache_epoch"),
]


@pytest.mark.parametrize("over,field", PREV_VIOLATIONS)
def test_ordering_against_prev(over, field):
    infer = over.get("action", 1) == 1
    meta = make_envelope_meta(**{**({"init_cache": False} if infer else {}), **over})
    raises_on(field, validate_envelope, meta, example_tensor_descs(meta),
              where=C.MESH_BEFORE_PHASE_B, prev=PREV)


def test_ordering_valid_sequences():
    ok = [make_envelope_meta(call_id=11, chunk_index=6, cache_epoch=2, init_cache=False),
          make_envelope_meta(call_id=11, chunk_index=9, cache_epoch=3, init_cache=True),
          make_envelope_meta(action=0, call_id=11, chunk_index=-1, cache_epoch=2),
          make_envelope_meta(action=2, call_id=12, chunk_index=-1, cache_epoch=2),
          # a SHUTDOWN after a hard cut carries the new epoch
          make_envelope_meta(action=2, call_id=12, chunk_index=-1, cache_epoch=3),
          # ERROR is the release path: never refused for ordering
          make_envelope_meta(action=3, call_id=10, chunk_index=0, cache_epoch=0)]
    for meta in ok:
        validate_envelope(meta, example_tensor_descs(meta), where=SEND, prev=PREV)


ENV = make_envelope_meta(call_id=4, chunk_index=3, cache_epoch=1, regime="R0",
                         do_kv_recompute=True, current_start_frame=9)
RESULT_VIOLATIONS = [
    ({"pp_result_version": 1}, "pp_result_version"),
    ({"action": 0}, "action"),
    ({"call_id": 5}, "call_id"),
    ({"chunk_index": 2}, "chunk_index"),
    ({"cache_epoch": 0}, "cache_epoch"),
    ({"observed_generator_calls": ENV["expected_generator_calls"] + 1},
     "observed_generator_calls"),
    ({"observed_generator_calls": ENV["expected_generator_calls"] - 1},
     "observed_generator_calls"),
    ({"mesh_current_start_frame": 10}, "mesh_current_start_frame"),
    ({"t_b_ms": -1.0}, "t_b_ms"),
    ({"t_mesh_idle_ms": 3}, "t_mesh_idle_ms"),
    ({"output_digest_i64": 2**63}, "output_digest_i64"),
    ({"output_digest_i64": True}, "output_digest_i64"),
    ({"chunk_id": 3}, "chunk_id"),
]


@pytest.mark.parametrize("over,field", RESULT_VIOLATIONS)
def test_result_violation_names_field(over, field):
    res = make_result_meta(ENV, **over)
    raises_on(field, validate_result, res, {"latents_out": LATENT}, envelope_meta=ENV,
              where=C.RANK0_ON_RESULT)


def test_result_tensor_rules():
    res = make_result_meta(ENV)
    kw = dict(envelope_meta=ENV, where=C.RANK0_ON_RESULT)
    raises_on("latents_out", validate_result, res, {}, **kw)
    raises_on("latents_out", validate_result, res,
              {"latents_out": TensorDesc("float32", LATENT.shape)}, **kw)
    raises_on("latents_out", validate_result, res, {"latents_out": TensorDesc("bfloat16", (2,))},
              envelope_tensors={"latents_in": LATENT}, **kw)
    raises_on("envelope_meta", validate_result, res, {"latents_out": LATENT},
              envelope_meta=None, where=C.RANK0_ON_RESULT)
    shut = make_result_meta(make_envelope_meta(action=2))
    raises_on("latents_out", validate_result, shut, {"latents_out": LATENT},
              envelope_meta=make_envelope_meta(action=2), where=C.RANK0_ON_RESULT)
    raises_on("action", validate_result, shut, {}, envelope_meta=ENV, where=C.RANK0_ON_RESULT)


# ---- properties -----------------------------------------------------------------------

@st.composite
def valid_envelope(draw):
    regime = draw(st.sampled_from(C.REGIMES))
    rec = False if regime == "R1" else draw(st.booleans())
    action = draw(st.sampled_from(list(Action)))
    over = dict(
        action=int(action), regime=regime, do_kv_recompute=rec,
        call_id=draw(st.integers(0, C.INT64_MAX)),
        chunk_index=draw(st.integers(0 if action == Action.INFER else -1, 2**40)),
        cache_epoch=draw(st.integers(0, 2**40)),
        height=draw(st.integers(1, 16384)), width=draw(st.integers(1, 16384)),
        current_start_frame=draw(st.integers(0, 2**31)),
        num_denoise_steps=draw(st.integers(1, 1000)),
        init_cache=draw(st.booleans()), reset_kv_cache=draw(st.booleans()),
        reset_crossattn_cache=draw(st.booleans()), base_seed=draw(st.integers(0, C.INT64_MAX)),
        kv_cache_attention_bias=draw(st.floats(allow_nan=False, allow_infinity=False)),
        noise_scale=draw(st.floats(0.0, 1e6)))
    if action != Action.INFER:
        over = {k: over[k] for k in ("action", "call_id", "chunk_index", "cache_epoch")}
    return make_envelope_meta(**over)


@settings(max_examples=150, deadline=None)
@given(valid_envelope())
def test_generated_envelopes_validate(meta):
    for where in C.ENVELOPE_PLACES:
        validate_envelope(meta, example_tensor_descs(meta), where=where)


WRONG_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(),
                         st.text(max_size=5), st.lists(st.integers(), max_size=2))


@settings(max_examples=200, deadline=None)
@given(valid_envelope(), st.data())
def test_wrong_type_names_that_field(meta, data):
    name = data.draw(st.sampled_from(sorted(meta)))
    spec = C.field_spec("envelope", name)
    bad = data.draw(WRONG_VALUES.filter(lambda v: not C._TYPE_OK[spec.type](v)))
    descs = example_tensor_descs(meta)
    raises_on(name, validate_envelope, {**meta, name: bad}, descs, where=SEND)


ANY_KEY = st.one_of(st.sampled_from(sorted(PROTOCOL_ENVELOPE_FIELDS)), st.text(max_size=4))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(ANY_KEY, WRONG_VALUES, max_size=25),
       st.dictionaries(st.sampled_from(["latents_in", "context_frames", "x"]),
                       st.builds(TensorDesc, st.sampled_from(["bfloat16", "int64"]),
                                 st.lists(st.integers(-2, 3), max_size=7).map(tuple)),
                       max_size=3),
       st.one_of(st.none(), valid_envelope()))
def test_arbitrary_input_only_raises_contract_error(meta, descs, prev):
    try:
        validate_envelope(meta, descs, where=SEND, prev=prev)
    except ContractError:
        pass
