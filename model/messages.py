"""The identity of every message: one definition, shared by the model and the codec.

A message's identity is what a guard or the codec reads of it: action, call_id,
chunk_index, cache_epoch, the generator-call count (an envelope's
`expected_generator_calls`, a result's `observed_generator_calls`) and init_cache. The
model's makes and updates build it with `message`; the runtime's codec turns it into
the wire fields with `wire_ids` (and back with `summary`), so the message a row makes
is the message the codec frames, field for field (STYLE.md: what runs is what was
checked). Before this module the runtime re-derived the header-only envelope's ids from
the previous envelope while the model took rank0's current epoch: two definitions of
one message, and a run the model rejected.

Decided here, once (the contract states it, docs/schema.md shows it):

* NOOP and SHUTDOWN carry no chunk (`chunk_index = -1`) and rank0's *current*
  `cache_epoch`, the epoch in force when the message is queued: after a hard cut the
  terminal belongs to the new epoch even when no INFER of that epoch was ever sent.
* ERROR carries the ids of the call it ends (the leader's ERROR names the rejected
  envelope's call, chunk and epoch; rank0's ERROR takes its next call_id and current
  epoch, no chunk).
* Only INFER carries a call count and `init_cache`; a header-only message's count is 0.
* A receiver of a *header* knows only the header's ids: `header_view` is what it
  records (no count: -1, chunk only for INFER); the payload completes the summary. A
  payload the contract refused whose count is unreadable completes it with no count
  (`refused_summary`).
* `valid` is the contract validator's verdict on the message as its receiver decoded it
  (model.contract.validate_envelope / validate_result at the receiving place): never on
  the wire, set by the receiver's codec from the validator, and in the model by the
  sender's fault row that makes a message the validator refuses (`rank0_bad_envelope`,
  `leader_bad_result`). The guards that decide acceptance (`envelope_valid`,
  `head_rejected`) read it, so the validator's verdict *is* the row choice. A header
  alone is never judged (`header_view` says valid).

Rejected: repeating the previous envelope's chunk and epoch in header-only envelopes
(the codec's old rule): it needs the previous envelope, which rank0's comms thread and
the model do not keep together with the terminal, and it gives a post-cut SHUTDOWN a
stale epoch.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple

from .contract import INT64_MAX, INT64_MIN, PP_ENVELOPE_VERSION, PP_RESULT_VERSION, Action

INFER, NOOP, SHUTDOWN, ERROR = Action.INFER, Action.NOOP, Action.SHUTDOWN, Action.ERROR
_NEW = tuple.__new__


class Msg(NamedTuple):
    action: int
    call_id: int
    chunk: int          # chunk_index (-1 when the action carries no chunk)
    epoch: int          # cache_epoch
    calls: int          # envelope: expected_generator_calls; result: observed
    init_cache: bool = False
    valid: bool = True  # the receiver's contract verdict (module docstring)


def message(action, call_id: int, chunk: int, epoch: int, calls: int = 0,
            init_cache: bool = False, valid: bool = True) -> Msg:
    """The one constructor of a message identity (see the module docstring)."""
    if action != INFER:
        if action != ERROR:
            chunk = -1
        return _NEW(Msg, (action, call_id, chunk, epoch, calls, False, valid))
    return _NEW(Msg, (action, call_id, chunk, epoch, calls, init_cache, valid))


def wire_ids(kind: str, msg: Msg) -> dict:
    """The fields that identify `msg` on the wire, for kind "envelope" or "result": the
    header-borne fields and, for INFER, the count (and init_cache) in the metadata."""
    if kind == "envelope":
        out = {"pp_envelope_version": PP_ENVELOPE_VERSION}
    elif kind == "result":
        out = {"pp_result_version": PP_RESULT_VERSION}
    else:
        raise ValueError(f"kind must be envelope or result, not {kind!r}")
    out.update(action=int(msg.action), call_id=msg.call_id, chunk_index=msg.chunk,
               cache_epoch=msg.epoch)
    if msg.action == INFER:
        if kind == "envelope":
            out.update(expected_generator_calls=msg.calls, init_cache=bool(msg.init_cache))
        else:
            out["observed_generator_calls"] = msg.calls
    return out


def full_meta(kind: str, msg: Msg, fields: Mapping) -> dict:
    """A message's whole metadata: `fields` (what is not identity) under the identity
    `msg` carries (`wire_ids` wins). What the codec frames and a reference run builds."""
    return {**fields, **wire_ids(kind, msg)}


def summary(kind: str, meta: Mapping, valid: bool = True) -> Msg:
    """The inverse of `wire_ids`: the identity of a decoded message's metadata, with
    the receiver's contract verdict `valid`."""
    action = Action(meta["action"])
    if action != INFER:
        return message(action, meta["call_id"], meta["chunk_index"], meta["cache_epoch"],
                       valid=valid)
    if kind == "envelope":
        return message(action, meta["call_id"], meta["chunk_index"], meta["cache_epoch"],
                       meta["expected_generator_calls"], meta["init_cache"], valid)
    return message(action, meta["call_id"], meta["chunk_index"], meta["cache_epoch"],
                   meta["observed_generator_calls"], valid=valid)


def refused_summary(kind: str, meta: Mapping) -> Msg:
    """`summary` of a message the receiver's contract check refused (`valid=False`). Its
    ids are the header's (the codec checked the metadata against them); a count that is
    missing or not an int64 integer reads as a header's does, no count (-1), and an
    init_cache that is not a boolean as False. The guards refuse the message on `valid`
    whatever its count (`envelope_invalid`, `head_rejected`), so the receiver takes its
    table's refusal row instead of failing outside its table, and the message it records
    has the model's types (a list as the count would make its trace unreadable)."""
    fixed = dict(meta)
    count = "expected_generator_calls" if kind == "envelope" else "observed_generator_calls"
    c = fixed.get(count)
    if type(c) is not int or not INT64_MIN <= c <= INT64_MAX:
        fixed[count] = -1
    if type(fixed.get("init_cache")) is not bool:
        fixed["init_cache"] = False
    return summary(kind, fixed, valid=False)


def header_view(m) -> Msg:
    """What a receiver of a fixed header records: the header's ids only (no count: -1;
    the chunk only for INFER). Works on any (action, call_id, chunk, epoch, ...) tuple."""
    return _NEW(Msg, (m[0], m[1], m[2] if m[0] == INFER else -1, m[3], -1, False, True))


def from_header(action, call_id: int, chunk_index: int, cache_epoch: int) -> Msg:
    """`header_view` of a decoded header's words."""
    return header_view((int(action), call_id, chunk_index, cache_epoch))
