"""Wire framing for PPEnvelope / PPResult: header, meta, manifest, tensors.

A message is sent as up to four kinds of tensors, in this order:

1. **header**: ``HEADER_WORDS`` int64 words (layout in ``HEADER_LAYOUT``). Fixed size, so a
   receiver can always post its receive; it carries every length the receiver must allocate
   for, plus a checksum of the other words. Header-only actions (NOOP, SHUTDOWN, ERROR) stop
   here: their lengths are all zero.
2. **meta**: ``meta_len`` bytes (uint8) of canonical JSON: sorted keys, ``(",", ":")``
   separators, ASCII only, no NaN/inf, flat scalars only. One dict has exactly one encoding,
   so bytes are deterministic across ranks and runs, and the receiver rejects any other
   encoding of the same dict. Never pickle: unpickling wire bytes executes code chosen by the
   sender, and a pickled dict is neither canonical nor bounded in what it allocates.
3. **manifest**: ``manifest_len`` int64 words; per tensor ``name_id, dtype_code, ndim,
   dim_0 .. dim_{ndim-1}``. ``name_id`` indexes the contract's tensor list
   (``model.contract.tensor_specs(kind)``) and ids strictly increase, so there is one order.
4. **tensors**, in manifest order, each contiguous.

All validation, serialisation, dtype mapping and materialisation happens in ``encode_*`` (the
preflight): once it returns, sending cannot fail for content reasons, so a sender never
strands a peer after its header (FM-04, FM-07). The receiver decodes step by step, checking
every length against ``Caps`` *before* allocating for it, so no input can cause an unbounded
allocation; every rejection is a ``CodecError`` (framing) or ``ContractError`` (content)
naming the field.

Receiver, step by step::

    h = decode_header(hdr)                       # hdr: int64[HEADER_WORDS], received
    m = alloc_meta(h);     recv(m)  (skip if h.meta_len == 0)
    meta = decode_meta(m, h)
    man = alloc_manifest(h); recv(man) (skip if empty)
    descs = decode_manifest(man, h)
    ts = alloc_tensors(descs); recv each
    msg = decode_envelope(h, meta, descs, ts, where=..., prev=...)
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Mapping, NamedTuple, Optional

import torch

from lockstep.model import contract as C
from lockstep.model import messages as M
from lockstep.model.contract import Action, ContractError  # noqa: F401  (decode_* raise it; re-exported)

HEADER_LAYOUT = ("magic", "version", "action", "call_id", "chunk_index", "cache_epoch",
                 "meta_len", "manifest_len", "n_tensors", "payload_bytes_total", "checksum")
HEADER_WORDS = len(HEADER_LAYOUT)
(W_MAGIC, W_VERSION, W_ACTION, W_CALL_ID, W_CHUNK_INDEX, W_CACHE_EPOCH, W_META_LEN,
 W_MANIFEST_LEN, W_N_TENSORS, W_PAYLOAD_BYTES, W_CHECKSUM) = range(HEADER_WORDS)
MANIFEST_FIXED_WORDS = 3  # name_id, dtype_code, ndim


def _magic(tag: bytes) -> int:
    return int.from_bytes(tag, "little", signed=True)


MAGIC_ENVELOPE = _magic(b"LKSTPPEV")
MAGIC_RESULT = _magic(b"LKSTPPRS")

_TORCH_DTYPES = {"bfloat16": torch.bfloat16, "int64": torch.int64, "float32": torch.float32,
                 "float16": torch.float16, "uint8": torch.uint8}
_CODE_TO_NAME = {code: name for name, (code, _) in C.WIRE_DTYPES.items()}


class CodecError(ValueError):
    """A frame is malformed or exceeds caps. ``str`` is one line naming the field."""

    def __init__(self, field: str, reason: str):
        self.field, self.reason = field, reason
        super().__init__(f"codec: field {field!r}: {reason}")


@dataclass(frozen=True)
class Caps:
    """Receiver-side bounds, checked before any allocation (encode checks them too)."""
    max_meta_bytes: int = 64 * 1024
    max_tensors: int = 16
    max_ndim: int = 6
    max_numel_per_tensor: int = 2**31 - 1
    max_total_bytes: int = 2 * 1024**3

    @property
    def max_manifest_words(self) -> int:
        return self.max_tensors * (MANIFEST_FIXED_WORDS + self.max_ndim)


DEFAULT_CAPS = Caps()


@dataclass(frozen=True)
class _Kind:
    name: str
    magic: int
    version: int
    version_field: str
    actions: tuple


_KINDS = {
    "envelope": _Kind("envelope", MAGIC_ENVELOPE, C.PP_ENVELOPE_VERSION, "pp_envelope_version",
                      C.ENVELOPE_ACTIONS),
    "result": _Kind("result", MAGIC_RESULT, C.PP_RESULT_VERSION, "pp_result_version",
                    C.RESULT_ACTIONS),
}
_BY_MAGIC = {k.magic: k for k in _KINDS.values()}
_ACTION_CODES = {k.name: frozenset(int(a) for a in k.actions) for k in _KINDS.values()}


@dataclass(frozen=True)
class Header:
    kind: str
    version: int
    action: Action
    call_id: int
    chunk_index: int
    cache_epoch: int
    meta_len: int
    manifest_len: int
    n_tensors: int
    payload_bytes_total: int

    @property
    def has_payload(self) -> bool:
        return self.meta_len > 0

    def words(self) -> list:
        body = [_KINDS[self.kind].magic, self.version, int(self.action), self.call_id,
                self.chunk_index, self.cache_epoch, self.meta_len, self.manifest_len,
                self.n_tensors, self.payload_bytes_total]
        return body + [header_checksum(body)]


@dataclass(frozen=True)
class ManifestEntry:
    """A tensor descriptor (``.dtype`` name, ``.shape``) as the contract expects."""
    name: str
    dtype: str
    shape: tuple
    nbytes: int


@dataclass(frozen=True)
class Frames:
    """An encoded message: contiguous tensors, ready to send in ``parts()`` order."""
    info: Header
    header: torch.Tensor
    meta: torch.Tensor
    manifest: torch.Tensor
    tensors: tuple = field(default_factory=tuple)

    def parts(self) -> list:
        if not self.info.has_payload:
            return [self.header]
        return [self.header, self.meta, self.manifest, *self.tensors]


@dataclass(frozen=True)
class Message:
    header: Header
    meta: dict
    tensors: dict

    @property
    def action(self) -> Action:
        return self.header.action

    @property
    def msg(self) -> M.Msg:
        """The model's identity of this message (model.messages.summary)."""
        return M.summary(self.header.kind, self.meta)


def header_checksum(body) -> int:
    """FNV-1a 64 over the little-endian two's-complement bytes of the header words.
    (The bytes are packed at once: one bytes object, one loop; it runs for every header
    sent and received.)"""
    mask = 0xFFFFFFFFFFFFFFFF
    h = 0xCBF29CE484222325
    for byte in struct.pack(f"<{len(body)}Q", *[w & mask for w in body]):
        h = ((h ^ byte) * 0x100000001B3) & mask
    return h - (1 << 64) if h >= (1 << 63) else h


# ---------------------------------------------------------------------------------------
# Encode (the preflight)

def encode_envelope(meta: Mapping, tensors: Mapping, *, prev: Optional[Mapping] = None,
                    where: str = C.RANK0_BEFORE_SEND, caps: Caps = DEFAULT_CAPS,
                    device="cpu") -> Frames:
    """Validate and serialise an envelope; nothing can fail for content reasons after this."""
    descs = _describe(tensors)
    C.validate_envelope(meta, descs, where=where, prev=prev)
    return _encode(_KINDS["envelope"], meta, tensors, caps, device)


def encode_envelope_msg(msg: M.Msg, fields: Mapping, tensors: Mapping, **kw) -> Frames:
    """Encode the envelope the model's row made: its identifying fields come from `msg`
    through model.messages.wire_ids (the one definition), the rest from `fields`."""
    return encode_envelope(M.full_meta("envelope", msg, fields), tensors, **kw)


def encode_result_msg(msg: M.Msg, fields: Mapping, tensors: Mapping, **kw) -> Frames:
    """Encode the result the model's row made (ids and observed count from `msg`)."""
    return encode_result(M.full_meta("result", msg, fields), tensors, **kw)


def encode_unchecked(kind: str, meta: Mapping, tensors: Mapping) -> Frames:
    """Serialise without the contract check: only the injected faults that send a
    message the receiver's validator must refuse (rank0_bad_envelope, leader_bad_result)
    use it, standing for a sender whose preflight missed a bad field."""
    return _encode(_KINDS[kind], meta, tensors, DEFAULT_CAPS, "cpu")


def decode_verdict(decode, kind: str, header: Header, meta: Mapping, *args, **kw):
    """(Message or None, Msg, ContractError or None): run `decode` (decode_envelope /
    decode_result); a contract refusal is not raised but returned as the verdict, with
    the message's identity marked `valid=False` (model.messages.refused_summary: the
    guards read it; a count the contract refused reads as no count). Framing errors
    (CodecError: the metadata disagrees with the header) are raised."""
    try:
        m = decode(header, meta, *args, **kw)
    except ContractError as e:
        return None, M.refused_summary(kind, meta), e
    return m, m.msg, None


def header_msg(h: Header) -> M.Msg:
    """What a receiver of header `h` records (model.messages.header_view)."""
    return M.from_header(h.action, h.call_id, h.chunk_index, h.cache_epoch)


def encode_result(meta: Mapping, tensors: Mapping, *, envelope_meta: Optional[Mapping],
                  envelope_tensors: Optional[Mapping] = None,
                  where: str = C.LEADER_BEFORE_REPLY, caps: Caps = DEFAULT_CAPS,
                  device="cpu") -> Frames:
    """Validate and serialise a result answering ``envelope_meta`` (None only for ERROR)."""
    descs = _describe(tensors)
    C.validate_result(meta, descs, envelope_meta=envelope_meta, where=where,
                      envelope_tensors=_descs_or_none(envelope_tensors))
    return _encode(_KINDS["result"], meta, tensors, caps, device)


def _describe(tensors) -> dict:
    if not isinstance(tensors, Mapping):
        raise CodecError("tensors", f"must be a mapping name -> tensor, got "
                         f"{type(tensors).__name__}")
    out = {}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise CodecError(str(name), f"must be a torch.Tensor, got {type(t).__name__}")
        out[name] = C.TensorDesc(str(t.dtype).removeprefix("torch."), tuple(t.shape))
    return out


def _descs_or_none(tensors) -> Optional[dict]:
    """Envelope tensors for result checks: torch tensors or descriptors, or None."""
    if tensors is None:
        return None
    return {n: C.TensorDesc(str(t.dtype).removeprefix("torch."), tuple(t.shape))
            if isinstance(t, torch.Tensor) else t for n, t in tensors.items()}


def _encode(kind: _Kind, meta, tensors, caps: Caps, device) -> Frames:
    action = Action(meta["action"])
    payload = action in C.PAYLOAD_ACTIONS
    meta_bytes = canonical_meta_bytes(meta) if payload else b""
    if len(meta_bytes) > caps.max_meta_bytes:
        raise CodecError("meta_len", f"{len(meta_bytes)} bytes > cap {caps.max_meta_bytes}")
    order = [s.name for s in C.tensor_specs(kind.name) if s.name in tensors]
    words, total = _manifest_words(kind, order, tensors, caps)
    data = tuple(_materialise(name, tensors[name], device) for name in order)
    info = Header(kind.name, meta[kind.version_field], action, meta["call_id"],
                  meta["chunk_index"], meta["cache_epoch"], len(meta_bytes), len(words),
                  len(order), total)
    return Frames(info, _int64(info.words(), device), _uint8(meta_bytes, device),
                  _int64(words, device), data)


def canonical_meta_bytes(meta: Mapping) -> bytes:
    """The one encoding of a flat meta dict (see module docstring)."""
    plain = {str(k): _plain(v) for k, v in meta.items()}
    try:
        return _dumps(plain).encode("ascii")
    except (TypeError, ValueError) as e:
        raise CodecError("meta", f"not serialisable as canonical JSON: {e}") from None


def _plain(v):
    """Enum members and numeric subclasses become the plain value they stand for."""
    if isinstance(v, bool):
        return v
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        return float(v)
    if isinstance(v, str):
        return str.__str__(v)
    raise CodecError("meta", f"value {v!r:.40} of type {type(v).__name__} is not a scalar")


# One encoder and one decoder for the process (json.dumps / json.loads with options
# build a new one per call); the same options as before, so the same bytes.
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                            allow_nan=False)


def _dumps(obj) -> str:
    return _ENCODER.encode(obj)


def _manifest_words(kind: _Kind, order, tensors, caps: Caps) -> tuple:
    if len(order) > caps.max_tensors:
        raise CodecError("n_tensors", f"{len(order)} tensors > cap {caps.max_tensors}")
    ids = {s.name: i for i, s in enumerate(C.tensor_specs(kind.name))}
    words, total = [], 0
    for name in order:
        t = tensors[name]
        dname = str(t.dtype).removeprefix("torch.")
        if dname not in C.WIRE_DTYPES:
            raise CodecError(name, f"dtype {dname} not in wire allowlist {sorted(C.WIRE_DTYPES)}")
        code, item = C.WIRE_DTYPES[dname]
        _check_shape(name, tuple(t.shape), caps)
        total += t.numel() * item
        words += [ids[name], code, t.dim(), *t.shape]
    _check_total(total, caps)
    return words, total


def _check_shape(name, shape, caps: Caps) -> int:
    if not 1 <= len(shape) <= caps.max_ndim:
        raise CodecError(name, f"ndim {len(shape)} not in [1, {caps.max_ndim}]")
    numel = 1
    for d in shape:
        if not 1 <= d <= caps.max_numel_per_tensor:
            raise CodecError(name, f"dim {d} not in [1, {caps.max_numel_per_tensor}]")
        numel *= d
        if numel > caps.max_numel_per_tensor:
            raise CodecError(name, f"numel > cap {caps.max_numel_per_tensor}")
    return numel


def _check_total(total, caps: Caps) -> None:
    if total > caps.max_total_bytes:
        raise CodecError("payload_bytes_total", f"{total} bytes > cap {caps.max_total_bytes}")


def _materialise(name, t: torch.Tensor, device) -> torch.Tensor:
    try:
        return t.detach().to(device=device).contiguous()
    except (RuntimeError, TypeError, ValueError) as e:
        raise CodecError(name, f"cannot materialise on {device}: {e}") from None


def _int64(words, device) -> torch.Tensor:
    return torch.tensor(words, dtype=torch.int64, device=device).reshape(-1)


def _uint8(data: bytes, device) -> torch.Tensor:
    if not data:
        return torch.empty(0, dtype=torch.uint8, device=device)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)


# ---------------------------------------------------------------------------------------
# Decode, in receive order

def decode_header(t, *, caps: Caps = DEFAULT_CAPS, expect: Optional[str] = None) -> Header:
    """Check magic, checksum, version, action and every length against caps."""
    words = _words(t, HEADER_WORDS, "header")
    kind = _BY_MAGIC.get(words[W_MAGIC])
    if kind is None or (expect is not None and kind.name != expect):
        raise CodecError("magic", f"{words[W_MAGIC]:#x} is not a lockstep "
                         f"{expect or 'envelope/result'} header")
    if words[W_CHECKSUM] != header_checksum(words[:W_CHECKSUM]):
        raise CodecError("checksum", "header checksum mismatch (corrupt or misaligned frame)")
    if words[W_VERSION] != kind.version:
        raise CodecError("version", f"{kind.name} version {words[W_VERSION]}, this build "
                         f"speaks {kind.version}")
    if words[W_ACTION] not in _ACTION_CODES[kind.name]:
        raise CodecError("action", f"{words[W_ACTION]} is not a {kind.name} action "
                         f"{[a.name for a in kind.actions]}")
    action = Action(words[W_ACTION])
    _check_lengths(words, action, caps)
    return Header(kind.name, words[W_VERSION], action, *words[W_CALL_ID:W_CHECKSUM])


def _words(t, n: int, what: str) -> list:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or tuple(t.shape) != (n,):
        got = (f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor)
               else type(t).__name__)
        raise CodecError(what, f"must be an int64 tensor of shape ({n},), got {got}")
    return t.tolist()


def _check_lengths(words, action: Action, caps: Caps) -> None:
    meta_len, man_len, n, total = words[W_META_LEN:W_CHECKSUM]
    if action not in C.PAYLOAD_ACTIONS:
        for i in (W_META_LEN, W_MANIFEST_LEN, W_N_TENSORS, W_PAYLOAD_BYTES):
            if words[i] != 0:
                raise CodecError(HEADER_LAYOUT[i], f"must be 0 for {action.name} (no payload)")
        return
    _in_range("meta_len", meta_len, 2, caps.max_meta_bytes)
    _in_range("n_tensors", n, 1, caps.max_tensors)
    _in_range("manifest_len", man_len, MANIFEST_FIXED_WORDS * n,
              (MANIFEST_FIXED_WORDS + caps.max_ndim) * n)
    _in_range("payload_bytes_total", total, n, caps.max_total_bytes)


def _in_range(name, value, lo, hi) -> None:
    if not lo <= value <= hi:
        raise CodecError(name, f"{value} not in [{lo}, {hi}]")


def alloc_meta(header: Header, *, device="cpu") -> torch.Tensor:
    return torch.empty(header.meta_len, dtype=torch.uint8, device=device)


def decode_meta(buf, header: Header) -> dict:
    """Parse canonical JSON meta and check it agrees with the header."""
    if not header.has_payload:
        if buf is not None and len(_as_bytes(buf, 0)) != 0:
            raise CodecError("meta_len", f"{header.action.name} carries no meta bytes")
        return _header_meta(header)
    raw = _as_bytes(buf, header.meta_len)
    meta = _parse_canonical(raw)
    _check_meta_vs_header(meta, header)
    return meta


def _header_meta(header: Header) -> dict:
    return {_KINDS[header.kind].version_field: header.version, "action": int(header.action),
            "call_id": header.call_id, "chunk_index": header.chunk_index,
            "cache_epoch": header.cache_epoch}


def _as_bytes(buf, n: int) -> bytes:
    if isinstance(buf, torch.Tensor):
        if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() > n:
            raise CodecError("meta", f"must be a 1-D uint8 tensor, got {buf.dtype} "
                             f"{tuple(buf.shape)}")
        # numpy's view of the bytes, copied once (tolist() made a Python int per byte)
        buf = buf.cpu().numpy().tobytes()
    if not isinstance(buf, (bytes, bytearray, memoryview)):
        raise CodecError("meta", f"must be bytes or a uint8 tensor, got {type(buf).__name__}")
    if len(buf) != n:
        raise CodecError("meta_len", f"got {len(buf)} bytes, header says {n}")
    return bytes(buf)


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise CodecError("meta", "duplicate key in JSON object")
    return dict(pairs)


def _reject_constant(name):
    raise CodecError("meta", f"non-finite constant {name} is not allowed")


_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)


def _parse_canonical(raw: bytes) -> dict:
    try:
        obj = _DECODER.decode(raw.decode("ascii"))
        canonical = _dumps(obj).encode("ascii")
    except CodecError:
        raise
    except (ValueError, RecursionError, TypeError) as e:
        raise CodecError("meta", f"not canonical ASCII JSON: {str(e)[:80]}") from None
    if not isinstance(obj, dict):
        raise CodecError("meta", f"must be a JSON object, got {type(obj).__name__}")
    if canonical != raw:
        raise CodecError("meta", "bytes are not the canonical encoding (sorted keys, no "
                         "spaces, ASCII)")
    return obj


def _check_meta_vs_header(meta: Mapping, header: Header) -> None:
    for name, want in _header_meta(header).items():
        got = meta.get(name)
        if isinstance(got, bool) or got != want:
            raise CodecError(name, f"meta says {got!r:.40}, header says {want}")


def alloc_manifest(header: Header, *, device="cpu") -> torch.Tensor:
    return torch.empty(header.manifest_len, dtype=torch.int64, device=device)


def decode_manifest(t, header: Header, *, caps: Caps = DEFAULT_CAPS) -> tuple:
    """Turn manifest words into descriptors; every size is checked, nothing is allocated."""
    if not header.has_payload:
        return ()
    return _decode_manifest_words(_words(t, header.manifest_len, "manifest"), header, caps)


def _decode_manifest_words(words: list, header: Header, caps: Caps) -> tuple:
    specs = C.tensor_specs(header.kind)
    entries, pos, total, last_id = [], 0, 0, -1
    for _ in range(header.n_tensors):
        entry, pos, last_id = _manifest_entry(words, pos, specs, last_id, caps)
        total += entry.nbytes
        _check_total(total, caps)
        entries.append(entry)
    if pos != len(words):
        raise CodecError("manifest_len", f"{len(words) - pos} trailing words after "
                         f"{header.n_tensors} tensors")
    if total != header.payload_bytes_total:
        raise CodecError("payload_bytes_total", f"manifest adds to {total}, header says "
                         f"{header.payload_bytes_total}")
    return tuple(entries)


def _manifest_entry(words, pos, specs, last_id, caps: Caps) -> tuple:
    if pos + MANIFEST_FIXED_WORDS > len(words):
        raise CodecError("manifest_len", "manifest ends inside a tensor entry")
    name_id, code, ndim = words[pos:pos + MANIFEST_FIXED_WORDS]
    if not last_id < name_id < len(specs):
        raise CodecError("manifest", f"name id {name_id} not in ({last_id}, {len(specs)}): "
                         "unknown, duplicate or out of order")
    name = specs[name_id].name
    if code not in _CODE_TO_NAME:
        raise CodecError(name, f"dtype code {code} not in wire allowlist {_CODE_TO_NAME}")
    _in_range(f"{name}.ndim", ndim, 1, caps.max_ndim)
    end = pos + MANIFEST_FIXED_WORDS + ndim
    if end > len(words):
        raise CodecError("manifest_len", f"manifest ends inside {name}'s dims")
    shape = tuple(words[pos + MANIFEST_FIXED_WORDS:end])
    numel = _check_shape(name, shape, caps)
    dtype = _CODE_TO_NAME[code]
    return ManifestEntry(name, dtype, shape, numel * C.WIRE_DTYPES[dtype][1]), end, name_id


def alloc_tensors(manifest, *, device="cpu") -> list:
    return [torch.empty(e.shape, dtype=_TORCH_DTYPES[e.dtype], device=device)
            for e in manifest]


def decode_envelope(header: Header, meta: Mapping, manifest, tensors, *, where: str,
                    prev: Optional[Mapping] = None) -> Message:
    """Bind received tensors to names and run the contract for ``where``."""
    named = _bind(header, "envelope", meta, manifest, tensors)
    C.validate_envelope(meta, {e.name: e for e in manifest}, where=where, prev=prev)
    return Message(header, dict(meta), named)


def decode_result(header: Header, meta: Mapping, manifest, tensors, *,
                  envelope_meta: Optional[Mapping], where: str = C.RANK0_ON_RESULT,
                  envelope_tensors: Optional[Mapping] = None) -> Message:
    named = _bind(header, "result", meta, manifest, tensors)
    C.validate_result(meta, {e.name: e for e in manifest}, envelope_meta=envelope_meta,
                      where=where, envelope_tensors=_descs_or_none(envelope_tensors))
    return Message(header, dict(meta), named)


def _bind(header: Header, kind: str, meta, manifest, tensors) -> dict:
    if header.kind != kind:
        raise CodecError("magic", f"expected a {kind} frame, got a {header.kind} frame")
    if not isinstance(meta, Mapping):
        raise CodecError("meta", "must be the dict decode_meta returned")
    _check_meta_vs_header(meta, header)
    manifest, tensors = tuple(manifest), tuple(tensors)
    if len(tensors) != len(manifest) or len(manifest) != header.n_tensors:
        raise CodecError("n_tensors", f"header {header.n_tensors}, manifest {len(manifest)},"
                         f" tensors {len(tensors)}")
    for e, t in zip(manifest, tensors):
        ok = isinstance(t, torch.Tensor) and t.dtype == _TORCH_DTYPES[e.dtype] \
            and tuple(t.shape) == e.shape
        if not ok:
            raise CodecError(e.name, f"received tensor does not match manifest "
                             f"{e.dtype} {list(e.shape)}")
    return {e.name: t for e, t in zip(manifest, tensors)}


def loopback_decode(frames: Frames, *, where: str, prev: Optional[Mapping] = None,
                    envelope_meta: Optional[Mapping] = None,
                    envelope_tensors: Optional[Mapping] = None,
                    caps: Caps = DEFAULT_CAPS) -> Message:
    """Decode ``frames`` exactly as a receiver would (fresh buffers, copy = recv)."""
    h = decode_header(frames.header.clone(), caps=caps)
    meta_buf = alloc_meta(h)
    meta_buf.copy_(frames.meta.cpu())
    meta = decode_meta(meta_buf, h)
    man = alloc_manifest(h)
    man.copy_(frames.manifest.cpu())
    descs = decode_manifest(man, h, caps=caps)
    ts = alloc_tensors(descs)
    for dst, src in zip(ts, frames.tensors):
        dst.copy_(src)
    if h.kind == "envelope":
        return decode_envelope(h, meta, descs, ts, where=where, prev=prev)
    return decode_result(h, meta, descs, ts, envelope_meta=envelope_meta, where=where,
                         envelope_tensors=envelope_tensors)


# ---------------------------------------------------------------- packed payload
# The payload (meta, manifest, tensors) can also travel as ONE uint8 buffer: one send
# and one mesh broadcast per message instead of 2 + n_tensors, which is most of the
# control plane's per-chunk cost (every backend op costs tens of microseconds on NCCL
# and more on gloo). The layout is fixed by the header alone, so the receiver
# allocates exactly once, capped like everything else: meta padded to 8 bytes, the
# manifest words, then each tensor padded to 8 bytes, then zero fill up to the bound
# the header implies (padding depends on shapes the receiver has not seen yet).

def _pad8(n: int) -> int:
    return (n + 7) // 8 * 8


def packed_len(h: Header) -> int:
    """Bytes of the packed payload, from the header alone (0 for header-only actions)."""
    if not h.has_payload:
        return 0
    return _pad8(h.meta_len) + 8 * h.manifest_len + h.payload_bytes_total + 8 * h.n_tensors


def pack_payload(frames: Frames) -> torch.Tensor:
    h = frames.info
    n = packed_len(h)
    pieces = [frames.meta, frames.manifest, *frames.tensors]
    cpu = frames.header.device.type == "cpu"
    # On the host the bytes are laid out in a bytearray the tensor then shares (one
    # copy per piece, no tensor slicing); on a device, in a device buffer.
    buf = bytearray(n) if cpu else torch.zeros(n, dtype=torch.uint8,
                                               device=frames.header.device)
    off = 0
    for i, t in enumerate(pieces):
        raw = t.contiguous().view(-1).view(torch.uint8)
        size = raw.numel()
        if cpu:
            buf[off:off + size] = raw.numpy().data
        else:
            buf[off:off + size] = raw
        off += size if i == 1 else _pad8(size)
    if not cpu:
        return buf
    return torch.frombuffer(buf, dtype=torch.uint8) if n else torch.zeros(0, dtype=torch.uint8)


class Wire(NamedTuple):
    """A message as it travels: its header (``info`` decoded, ``header`` the words) and
    its packed payload (empty for header-only actions)."""
    info: Header
    header: torch.Tensor
    payload: torch.Tensor


def wire(frames: Frames) -> Wire:
    """An encoded message, packed for sending."""
    return Wire(frames.info, frames.header, pack_payload(frames))


def relay(kind: str, msg: M.Msg, meta: Mapping, received: Wire) -> Wire:
    """The bytes to forward for the model's message `msg`, whose frames were received
    (decoded to `meta`, validated) as `received`: those bytes are what re-encoding
    ``full_meta(kind, msg, meta)`` with the received tensors would make whenever `msg`'s
    wire ids are `meta`'s (one dict has one encoding; header and manifest follow from
    meta and tensors), so that is checked and nothing is re-encoded or re-validated. A
    message whose ids differ from what was received is not the received one: refused."""
    ids = M.wire_ids(kind, msg)
    for name, want in ids.items():
        got = meta.get(name)
        if isinstance(got, bool) != isinstance(want, bool) or got != want:
            raise CodecError(name, f"relayed {kind}: the model's message says {want!r}, "
                             f"the received bytes say {got!r:.40}")
    return received


def alloc_packed(h: Header, *, device="cpu") -> torch.Tensor:
    return torch.empty(packed_len(h), dtype=torch.uint8, device=device)


def unpack_payload(buf, h: Header, *, caps: Caps = DEFAULT_CAPS) -> tuple:
    """(meta dict, manifest entries, tensors as views into buf), every step checked."""
    if not isinstance(buf, torch.Tensor) or buf.dtype != torch.uint8 or \
            buf.numel() != packed_len(h):
        raise CodecError("payload", f"packed payload must be uint8[{packed_len(h)}]")
    # meta and manifest read from one host copy of their bytes (fewer tensor ops per
    # message: each costs microseconds of dispatch, on every receiver of every message)
    m0 = _pad8(h.meta_len)
    off, tensors = m0 + 8 * h.manifest_len, []
    head = buf[:off].cpu().numpy()
    meta = decode_meta(head[:h.meta_len].tobytes(), h)
    manifest = _decode_manifest_words(head[m0:off].view("<i8").tolist(), h, caps)
    for e in manifest:
        raw = buf[off:off + e.nbytes]
        tensors.append(raw.view(_TORCH_DTYPES[e.dtype]).reshape(e.shape))
        off += _pad8(e.nbytes)
    return meta, manifest, tensors
