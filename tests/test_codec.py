"""Wire framing (runtime/codec.py): round trips, preflight, and hostile input."""
import json
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from lockstep.model import contract as C
from lockstep.model import tracefmt as F
from lockstep.model.contract import Action, ContractError, make_envelope_meta, make_result_meta
from lockstep.runtime import codec
from lockstep.runtime.codec import (HEADER_WORDS, MAGIC_ENVELOPE, MAGIC_RESULT, Caps, CodecError,
                           alloc_manifest, alloc_meta, alloc_tensors, decode_envelope,
                           decode_header, decode_manifest, decode_meta, encode_envelope,
                           encode_result, header_checksum, loopback_decode)

SMALL = Caps(max_meta_bytes=1024, max_tensors=4, max_ndim=6, max_numel_per_tensor=1 << 16,
             max_total_bytes=1 << 20)
I64 = st.integers(C.INT64_MIN, C.INT64_MAX)
FAST = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


def rand(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.int64:
        return torch.randint(0, 1000, shape, generator=g, dtype=torch.int64)
    return torch.randn(shape, generator=g).to(dtype)


def tensors_for(meta, latent=(1, 2, 4, 3, 3), embed=(1, 5, 8), seed=0):
    descs = C.example_tensor_descs(meta, latent_shape=latent, embed_shape=embed)
    return {n: rand(d.shape, getattr(torch, d.dtype), seed + i)
            for i, (n, d) in enumerate(descs.items())}


def header_tensor(body):
    """An int64 header with a correct checksum over ``body`` (10 words)."""
    return torch.tensor(list(body) + [header_checksum(body)], dtype=torch.int64)


def infer_header(**kw):
    words = dict(magic=MAGIC_ENVELOPE, version=2, action=1, call_id=0, chunk_index=0,
                 cache_epoch=0, meta_len=100, manifest_len=8, n_tensors=1,
                 payload_bytes_total=16)
    words.update(kw)
    return header_tensor([words[k] for k in codec.HEADER_LAYOUT[:-1]])


def assert_same(msg, meta, tensors):
    assert msg.meta == meta
    assert list(msg.tensors) == list(tensors)
    for name, t in tensors.items():
        assert msg.tensors[name].dtype == t.dtype and torch.equal(msg.tensors[name], t)


# ---- round trips ------------------------------------------------------------------------

SHAPES = st.lists(st.integers(1, 3), min_size=1, max_size=5).map(tuple)


@st.composite
def envelope_case(draw):
    regime = draw(st.sampled_from(C.REGIMES))
    meta = make_envelope_meta(
        regime=regime, do_kv_recompute=False if regime == "R1" else draw(st.booleans()),
        call_id=draw(st.integers(0, C.INT64_MAX)), chunk_index=draw(st.integers(0, 2**62)),
        cache_epoch=draw(st.integers(0, 2**62)), height=draw(st.integers(1, 16384)),
        width=draw(st.integers(1, 16384)), current_start_frame=draw(st.integers(0, 2**40)),
        num_denoise_steps=draw(st.integers(1, 12)), init_cache=draw(st.booleans()),
        reset_kv_cache=draw(st.booleans()), reset_crossattn_cache=draw(st.booleans()),
        base_seed=draw(st.integers(0, C.INT64_MAX)),
        kv_cache_attention_bias=draw(st.floats(allow_nan=False, allow_infinity=False)),
        noise_scale=draw(st.floats(0.0, 1e6)))
    return meta, tensors_for(meta, latent=draw(SHAPES), embed=draw(SHAPES),
                             seed=draw(st.integers(0, 99)))


@FAST
@given(envelope_case())
def test_envelope_round_trip(case):
    meta, tensors = case
    frames = encode_envelope(meta, tensors)
    assert all(t.is_contiguous() and t.device.type == "cpu" for t in frames.parts())
    assert frames.header.dtype == torch.int64 and frames.header.shape == (HEADER_WORDS,)
    for where in C.ENVELOPE_PLACES:
        msg = loopback_decode(frames, where=where)
        assert_same(msg, meta, tensors)
        assert msg.header == frames.info and msg.action == Action.INFER


@FAST
@given(envelope_case(), st.floats(0, 1e9), st.floats(0, 1e9), st.one_of(st.none(), I64))
def test_result_round_trip(case, t_b, t_idle, digest):
    env, env_t = case
    over = {} if digest is None else {"output_digest_i64": digest}
    res = make_result_meta(env, t_b_ms=t_b, t_mesh_idle_ms=t_idle, **over)
    out = {"latents_out": rand(tuple(env_t["latents_in"].shape), torch.bfloat16, 7)}
    frames = encode_result(res, out, envelope_meta=env, envelope_tensors=env_t)
    msg = loopback_decode(frames, where=C.RANK0_ON_RESULT, envelope_meta=env,
                          envelope_tensors=env_t)
    assert_same(msg, res, out)


@pytest.mark.parametrize("action", [Action.NOOP, Action.SHUTDOWN, Action.ERROR])
def test_header_only_envelope(action):
    meta = make_envelope_meta(action=int(action), call_id=3, chunk_index=-1, cache_epoch=1)
    frames = encode_envelope(meta, {})
    assert frames.parts() == [frames.header]
    assert frames.meta.numel() == 0 and frames.manifest.numel() == 0 and frames.tensors == ()
    assert frames.header.tolist()[codec.W_META_LEN:codec.W_CHECKSUM] == [0, 0, 0, 0]
    assert_same(loopback_decode(frames, where=C.MESH_BEFORE_PHASE_B), meta, {})


@pytest.mark.parametrize("action", [Action.SHUTDOWN, Action.ERROR])
def test_header_only_result(action):
    env = make_envelope_meta(action=int(action), call_id=3)
    res = make_result_meta(env)
    frames = encode_result(res, {}, envelope_meta=env if action != Action.ERROR else None)
    assert frames.parts() == [frames.header]
    assert_same(loopback_decode(frames, where=C.RANK0_ON_RESULT, envelope_meta=env), res, {})


def test_meta_bytes_are_canonical_and_deterministic():
    meta = make_envelope_meta(regime=C.Regime.R0.value)
    shuffled = dict(reversed(list(meta.items())))
    shuffled["action"] = Action.INFER  # enum members encode as their plain value
    a = encode_envelope(meta, tensors_for(meta))
    b = encode_envelope(shuffled, tensors_for(meta))
    assert torch.equal(a.meta, b.meta) and torch.equal(a.header, b.header)
    text = bytes(a.meta.tolist()).decode("ascii")
    assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))


def test_non_contiguous_input_is_materialised():
    meta = make_envelope_meta()
    tensors = tensors_for(meta, latent=(3, 4))
    tensors["latents_in"] = tensors["latents_in"].t()
    assert not tensors["latents_in"].is_contiguous()
    frames = encode_envelope(meta, tensors)
    assert all(t.is_contiguous() for t in frames.tensors)
    assert_same(loopback_decode(frames, where=C.LEADER_BEFORE_BROADCAST), meta, tensors)


# ---- preflight: every failure happens before a header exists --------------------------

@pytest.fixture
def no_header(monkeypatch):
    """Fail the test if encode gets as far as building a header."""
    def boom(*a, **k):
        raise AssertionError("a header was built")
    monkeypatch.setattr(codec.Header, "words", boom)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex64, torch.float32, torch.int8])
def test_unsupported_dtype_rejected_at_encode(no_header, dtype):
    meta = make_envelope_meta()
    tensors = tensors_for(meta)
    tensors["latents_in"] = torch.zeros(2, 3, dtype=dtype)
    with pytest.raises(ContractError) as info:
        encode_envelope(meta, tensors)
    assert info.value.field == "latents_in" and "dtype" in str(info.value)


def test_dtype_outside_wire_allowlist_is_a_codec_error(no_header):
    meta = make_envelope_meta()
    tensors = tensors_for(meta)
    tensors["latents_in"] = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(CodecError, match="allowlist"):
        codec._manifest_words(codec._KINDS["envelope"], ["latents_in"], tensors, SMALL)


@pytest.mark.parametrize("caps,field", [
    (Caps(max_total_bytes=100), "payload_bytes_total"),
    (Caps(max_meta_bytes=64), "meta_len"),
    (Caps(max_ndim=2), "conditioning_embeds"),
    (Caps(max_numel_per_tensor=50), "latents_in"),
    (Caps(max_tensors=2), "n_tensors"),
])
def test_caps_enforced_at_encode(no_header, caps, field):
    meta = make_envelope_meta()
    with pytest.raises(CodecError) as info:
        encode_envelope(meta, tensors_for(meta), caps=caps)
    assert info.value.field == field


def test_encode_rejects_non_tensors_and_bad_meta(no_header):
    meta = make_envelope_meta()
    tensors = tensors_for(meta)
    with pytest.raises(CodecError, match="latents_in"):
        encode_envelope(meta, {**tensors, "latents_in": [1.0, 2.0]})
    with pytest.raises(CodecError, match="tensors"):
        encode_envelope(meta, [tensors["latents_in"]])
    with pytest.raises(ContractError, match="context_frames_override"):
        encode_envelope(meta, {**tensors, "context_frames_override": tensors["latents_in"]})
    with pytest.raises(ContractError, match="call_id"):
        encode_envelope(meta, tensors, prev=make_envelope_meta(call_id=5))
    with pytest.raises(ContractError, match="latents_in"):
        encode_envelope(make_envelope_meta(action=0), {"latents_in": tensors["latents_in"]})


# ---- header --------------------------------------------------------------------------

@settings(max_examples=400, deadline=None)
@given(st.lists(I64, min_size=HEADER_WORDS, max_size=HEADER_WORDS))
def test_random_header_rejected(words):
    with pytest.raises(CodecError):
        decode_header(torch.tensor(words, dtype=torch.int64))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([MAGIC_ENVELOPE, MAGIC_RESULT]), st.integers(0, 4),
       st.lists(st.one_of(I64, st.integers(-2, 2**21)), min_size=8, max_size=8),
       st.booleans())
def test_checksummed_random_header_is_bounded(magic, action, rest, fix_checksum):
    body = [magic, 2, action] + rest[:7]
    t = header_tensor(body)
    if not fix_checksum:
        t[codec.W_CHECKSUM] ^= 1
    try:
        h = decode_header(t, caps=SMALL)
    except CodecError:
        return
    assert fix_checksum
    assert 0 <= h.meta_len <= SMALL.max_meta_bytes
    assert 0 <= h.manifest_len <= SMALL.max_manifest_words
    assert 0 <= h.n_tensors <= SMALL.max_tensors
    assert 0 <= h.payload_bytes_total <= SMALL.max_total_bytes


@settings(max_examples=100, deadline=None)
@given(st.integers(0, HEADER_WORDS - 1), I64.filter(lambda v: v != 0))
def test_any_flipped_header_word_rejected(index, delta):
    meta = make_envelope_meta()
    t = encode_envelope(meta, tensors_for(meta)).header.clone()
    t[index] = (t[index].item() ^ delta)
    with pytest.raises(CodecError) as info:
        decode_header(t)
    assert info.value.field in ("magic", "checksum")


@pytest.mark.parametrize("bad", [
    None, [0] * HEADER_WORDS, torch.zeros(HEADER_WORDS, dtype=torch.float64),
    torch.zeros(HEADER_WORDS - 1, dtype=torch.int64),
    torch.zeros(1, HEADER_WORDS, dtype=torch.int64)])
def test_header_container_rejected(bad):
    with pytest.raises(CodecError) as info:
        decode_header(bad)
    assert info.value.field == "header"


@pytest.mark.parametrize("over,field", [
    ({"version": 1}, "version"),
    ({"action": 4}, "action"),
    ({"action": -1}, "action"),
    ({"meta_len": 1025}, "meta_len"),
    ({"meta_len": 0}, "meta_len"),
    ({"meta_len": -5}, "meta_len"),
    ({"n_tensors": 5}, "n_tensors"),
    ({"n_tensors": 0}, "n_tensors"),
    ({"manifest_len": 2}, "manifest_len"),
    ({"manifest_len": 10}, "manifest_len"),
    ({"payload_bytes_total": (1 << 20) + 1}, "payload_bytes_total"),
    ({"payload_bytes_total": -1}, "payload_bytes_total"),
    ({"action": 0}, "meta_len"),
    ({"action": 2, "meta_len": 0, "manifest_len": 0, "n_tensors": 0}, "payload_bytes_total"),
    ({"magic": MAGIC_ENVELOPE + 1}, "magic"),
])
def test_header_fields_checked_before_allocation(over, field):
    with pytest.raises(CodecError) as info:
        decode_header(infer_header(**over), caps=SMALL)
    assert info.value.field == field, str(info.value)


def test_header_kind_checked():
    meta = make_envelope_meta()
    env = encode_envelope(meta, tensors_for(meta))
    res = encode_result(make_result_meta(meta, action=3), {}, envelope_meta=None)
    with pytest.raises(CodecError, match="magic"):
        decode_header(res.header, expect="envelope")
    h = decode_header(res.header)
    with pytest.raises(CodecError, match="magic"):
        decode_envelope(h, decode_meta(None, h), (), (), where=C.MESH_BEFORE_PHASE_B)
    with pytest.raises(CodecError, match="action"):  # NOOP is not a result action
        decode_header(header_tensor([MAGIC_RESULT, 2, 0] + [0] * 7))
    assert decode_header(env.header, expect="envelope") == env.info


# ---- meta ----------------------------------------------------------------------------

def meta_header(n, **kw):
    return decode_header(infer_header(meta_len=n, **kw))


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=2, max_size=300))
def test_random_meta_bytes_rejected(raw):
    with pytest.raises(CodecError):
        decode_meta(raw, meta_header(len(raw)))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_meta_only_raises_protocol_errors(data):
    meta = make_envelope_meta(call_id=5, chunk_index=2)
    tensors = tensors_for(meta)
    frames = encode_envelope(meta, tensors)
    raw = bytearray(frames.meta.tolist())
    for _ in range(data.draw(st.integers(1, 3))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    h = decode_header(frames.header)
    try:
        got = decode_meta(bytes(raw), h)
        descs = decode_manifest(frames.manifest, h)
        decode_envelope(h, got, descs, list(frames.tensors), where=C.LEADER_BEFORE_BROADCAST)
    except (CodecError, ContractError):
        pass


def _canon(d):
    return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()


GOOD = _canon(make_envelope_meta())


@pytest.mark.parametrize("raw,field", [
    (GOOD.replace(b",", b", "), "meta"),                      # not canonical
    (b'{"b":1,"a":2}', "meta"),                               # keys not sorted
    (b'{"a":NaN}', "meta"),
    (b'{"a":Infinity}', "meta"),
    (b'{"a":1e400}', "meta"),
    (b'{"a":1,"a":1}', "meta"),
    (b"[1,2]", "meta"),
    (b"[" * 1000 + b"]" * 1000, "meta"),
    (b'{"a":' + b"9" * 5000 + b"}", "meta"),                 # int digit limit
    (b'{"a":"\xff"}', "meta"),
    (b'{"\\u0061":1}', "meta"),                               # needless escape
    (_canon({**make_envelope_meta(), "call_id": 1}), "call_id"),
    (_canon({**make_envelope_meta(), "action": True}), "action"),
    (_canon({k: v for k, v in make_envelope_meta().items() if k != "cache_epoch"}),
     "cache_epoch"),
])
def test_bad_meta_rejected(raw, field):
    with pytest.raises(CodecError) as info:
        decode_meta(raw, meta_header(len(raw)))
    assert info.value.field == field, str(info.value)


def test_meta_deep_nesting_at_cap_is_a_codec_error():
    raw = b"[" * 32768 + b"]" * 32768
    with pytest.raises(CodecError, match="JSON"):
        decode_meta(raw, meta_header(len(raw)))


def test_meta_buffer_checked():
    h = meta_header(len(GOOD))
    assert decode_meta(torch.tensor(list(GOOD), dtype=torch.uint8), h) == json.loads(GOOD)
    for bad in (GOOD[:-1], torch.tensor(list(GOOD), dtype=torch.int64), "text", None,
                torch.tensor(5, dtype=torch.uint8), torch.zeros(1 << 20, dtype=torch.uint8)):
        with pytest.raises(CodecError):
            decode_meta(bad, h)
    assert alloc_meta(h).shape == (len(GOOD),) and alloc_meta(h).dtype == torch.uint8
    noop = decode_header(header_tensor([MAGIC_ENVELOPE, 2, 0] + [0] * 7))
    assert decode_meta(alloc_meta(noop), noop)["action"] == 0
    for bad in (b"{}", torch.tensor(5, dtype=torch.uint8), 3):
        with pytest.raises(CodecError):
            decode_meta(bad, noop)


# ---- manifest ------------------------------------------------------------------------

def manifest_header(words, n, total):
    return decode_header(infer_header(manifest_len=len(words), n_tensors=n,
                                      payload_bytes_total=total), caps=SMALL)


@pytest.fixture
def no_alloc(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("allocated")
    monkeypatch.setattr(codec.torch, "empty", boom)


@pytest.mark.parametrize("dims", [(2**40,), (2**62, 2**62), (1 << 9, 1 << 9),
                                  (2, 2, 2, 2, 2, 1 << 12), (C.INT64_MAX,)])
def test_huge_manifest_rejected_before_allocation(no_alloc, dims):
    words = [1, 1, len(dims), *dims]
    h = manifest_header(words, 1, 16)
    start = time.perf_counter()
    with pytest.raises(CodecError) as info:
        decode_manifest(torch.tensor(words, dtype=torch.int64), h, caps=SMALL)
    assert time.perf_counter() - start < 0.05
    assert info.value.field == "latents_in"


def test_total_bytes_capped_across_tensors(no_alloc):
    # 64 KiB + 64 KiB fit a 128 KiB cap; the third tensor (256 KiB) does not.
    words = [0, 1, 1, 1 << 15, 1, 1, 1, 1 << 15, 2, 2, 1, 1 << 15]
    h = manifest_header(words, 3, 1 << 17)
    caps = Caps(max_meta_bytes=1024, max_tensors=4, max_numel_per_tensor=1 << 16,
                max_total_bytes=1 << 17)
    with pytest.raises(CodecError) as info:
        decode_manifest(torch.tensor(words, dtype=torch.int64), h, caps=caps)
    assert info.value.field == "payload_bytes_total"


@pytest.mark.parametrize("words,n,total,field", [
    ([1, 9, 1, 4], 1, 8, "latents_in"),                      # unknown dtype code
    ([7, 1, 1, 4], 1, 8, "manifest"),                        # unknown name id
    ([1, 1, 1, 4, 1, 1, 1, 4], 2, 16, "manifest"),           # duplicate
    ([1, 1, 1, 4, 0, 1, 1, 4], 2, 16, "manifest"),           # out of order
    ([1, 1, 0, 4], 1, 8, "latents_in.ndim"),
    ([1, 1, 7, 1, 1, 1, 1, 1, 1, 1], 2, 4, "latents_in.ndim"),
    ([1, 1, 1, 0], 1, 2, "latents_in"),                      # zero dim
    ([1, 1, 1, -3], 1, 2, "latents_in"),                     # negative dim
    ([1, 1, 2, 4], 1, 8, "manifest_len"),                    # truncated dims
    ([1, 1, 1, 4, 0], 1, 8, "manifest_len"),                 # trailing word
    ([1, 1, 1, 4], 1, 10, "payload_bytes_total"),            # header total disagrees
])
def test_bad_manifest_rejected(no_alloc, words, n, total, field):
    h = manifest_header(words, n, total)
    with pytest.raises(CodecError) as info:
        decode_manifest(torch.tensor(words, dtype=torch.int64), h, caps=SMALL)
    assert info.value.field == field, str(info.value)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 4), st.data())
def test_random_manifest_is_bounded(n, data):
    length = data.draw(st.integers(3 * n, 9 * n))
    words = data.draw(st.lists(st.one_of(st.integers(-1, 8), I64), min_size=length,
                               max_size=length))
    total = data.draw(st.integers(n, SMALL.max_total_bytes))
    h = manifest_header(words, n, total)
    try:
        descs = decode_manifest(torch.tensor(words, dtype=torch.int64), h, caps=SMALL)
    except CodecError:
        return
    assert sum(d.nbytes for d in descs) == total <= SMALL.max_total_bytes


def test_manifest_and_tensor_buffers_checked():
    meta = make_envelope_meta()
    frames = encode_envelope(meta, tensors_for(meta))
    h = decode_header(frames.header)
    with pytest.raises(CodecError, match="manifest"):
        decode_manifest(frames.manifest[:-1], h)
    descs = decode_manifest(alloc_manifest(h).copy_(frames.manifest), h)
    bufs = alloc_tensors(descs)
    assert [tuple(b.shape) for b in bufs] == [tuple(t.shape) for t in frames.tensors]
    meta_d = decode_meta(frames.meta, h)
    kw = dict(where=C.LEADER_BEFORE_BROADCAST)
    with pytest.raises(CodecError, match="n_tensors"):
        decode_envelope(h, meta_d, descs, bufs[:-1], **kw)
    bad = list(bufs)
    bad[0] = bad[0].float()
    with pytest.raises(CodecError, match="conditioning_embeds"):
        decode_envelope(h, meta_d, descs, bad, **kw)
    with pytest.raises(CodecError, match="call_id"):
        decode_envelope(h, {**meta_d, "call_id": 9}, descs, bufs, **kw)
    with pytest.raises(ContractError, match="call_id"):
        decode_envelope(h, meta_d, descs, bufs, prev=make_envelope_meta(call_id=3), **kw)


def test_packed_payload_round_trip_and_rejects_bad_buffers():
    import torch
    from lockstep.model import contract as C
    from lockstep.runtime import codec
    meta = C.make_envelope_meta()
    tensors = {"conditioning_embeds": torch.randn(1, 8).to(torch.bfloat16),
               "latents_in": torch.randn(3, 5).to(torch.bfloat16),
               "current_denoising_step_list": torch.arange(meta["num_denoise_steps"])}
    frames = codec.encode_envelope(meta, tensors)
    buf = codec.pack_payload(frames)
    h = codec.decode_header(frames.header)
    assert buf.numel() == codec.packed_len(h)
    got_meta, manifest, got = codec.unpack_payload(buf.clone(), h)
    assert got_meta == meta
    for e, t in zip(manifest, got):
        assert torch.equal(t, tensors[e.name])
    with pytest.raises(codec.CodecError):
        codec.unpack_payload(buf[:-1], h)
    garbage = torch.randint(0, 255, (buf.numel(),), dtype=torch.uint8)
    with pytest.raises((codec.CodecError, C.ContractError)):
        codec.unpack_payload(garbage, h)


def _received(meta, tensors):
    """(decoded meta, tensors, Wire) as the leader's comms thread receives a frame."""
    sent = codec.wire(codec.encode_envelope(meta, tensors))
    h = codec.decode_header(sent.header.clone())
    buf = sent.payload.clone()
    got_meta, manifest, got = codec.unpack_payload(buf, h)
    m = decode_envelope(h, got_meta, manifest, got, where=C.LEADER_BEFORE_BROADCAST)
    return m, codec.Wire(h, sent.header.clone(), buf)


def test_relay_forwards_exactly_the_bytes_a_re_encode_makes():
    meta = C.make_envelope_meta()
    m, received = _received(meta, tensors_for(meta))
    out = codec.relay("envelope", m.msg, m.meta, received)
    again = codec.wire(codec.encode_envelope_msg(m.msg, m.meta, m.tensors,
                                                 where=C.LEADER_BEFORE_BROADCAST))
    assert out is received
    assert torch.equal(out.header, again.header) and torch.equal(out.payload, again.payload)


@pytest.mark.parametrize("field, wire_name", [
    ("call_id", "call_id"), ("chunk", "chunk_index"), ("epoch", "cache_epoch"),
    ("calls", "expected_generator_calls"), ("init_cache", "init_cache")])
def test_relay_refuses_a_message_that_is_not_the_received_one(field, wire_name):
    meta = C.make_envelope_meta()
    m, received = _received(meta, tensors_for(meta))
    other = m.msg._replace(**{field: (not m.msg.init_cache) if field == "init_cache"
                              else getattr(m.msg, field) + 1})
    with pytest.raises(CodecError, match=wire_name):
        codec.relay("envelope", other, m.meta, received)


def test_the_leader_checks_what_every_mesh_rank_checks():
    """The leader (mesh rank 0) checks an envelope once, at leader_before_broadcast, and
    relays it without the mesh_before_phase_b check (runtime/interp.py `_bcast_root`):
    sound only while the two places run the same checks."""
    def at(where):
        return [(s.name, type(s).__name__) for table in
                (C.ENVELOPE_FIELDS, C.ENVELOPE_TENSORS, C.ENVELOPE_RULES)
                for s in table if where in s.validated_at]
    assert at(C.LEADER_BEFORE_BROADCAST) == at(C.MESH_BEFORE_PHASE_B)
    assert at(C.LEADER_BEFORE_BROADCAST)


# ---- the receiver's verdict on a refused message ----------------------------------------

def _envelope_wire(**changes):
    """An INFER envelope as received, its metadata changed after the preflight (what a
    sender whose preflight missed a field would send: codec.encode_unchecked)."""
    meta = C.make_envelope_meta()
    descs = C.example_tensor_descs(meta, latent_shape=(1, 2, 4, 3, 3), embed_shape=(1, 5, 8))
    tensors = {n: torch.zeros(d.shape, dtype=getattr(torch, d.dtype))
               for n, d in descs.items()}
    meta.update(changes)
    for k in [k for k, v in changes.items() if v is None]:
        del meta[k]
    w = codec.wire(codec.encode_unchecked("envelope", meta, tensors))
    h = codec.decode_header(w.header)
    return h, codec.unpack_payload(w.payload, h)


@pytest.mark.parametrize("field, value", [
    ("expected_generator_calls", 1.5), ("expected_generator_calls", 2**70),
    ("expected_generator_calls", "4"), ("expected_generator_calls", None),
    ("init_cache", 1), ("init_cache", None),
])
def test_refused_count_is_recorded_as_no_count(field, value):
    """A refused envelope whose count is not an int64 (or is missing) was recorded by
    the leader with that value as the message's count: its trace line could not be read
    back (or, missing, the refusal escaped the table). Now it is the refusal the table
    takes, with no count, and its trace line reads back."""
    h, (meta, manifest, tensors) = _envelope_wire(**{field: value})
    m, msg, err = codec.decode_verdict(codec.decode_envelope, "envelope", h, meta, manifest,
                                       tensors, where=C.LEADER_BEFORE_BROADCAST)
    assert m is None and err is not None and err.field == field
    assert not msg.valid and type(msg.calls) is int and type(msg.init_cache) is bool
    assert C.INT64_MIN <= msg.calls <= C.INT64_MAX
    line = json.loads(json.dumps(F.msg_list(msg)))
    assert F.msg_of_list(line) == msg
