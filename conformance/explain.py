"""Reports for people: a false guard said in domain words, and a message diff.

`guard_words(model, p, row, v, cfg)` explains why `row.guard` is false for process p
with local variables v (for example "rank0 builds chunk 5 while 2 envelopes are in
flight (D_in = 2)"); the guard's name is printed beside it by the caller.
`msg_diff(recorded, model)` lists the fields in which two message summaries differ.
"""
from __future__ import annotations

FIELDS = ("action", "call_id", "chunk", "epoch", "calls", "init_cache", "valid")


def _rank0(name, row, v, cfg) -> str:
    g = getattr(row.guard, "__name__", "")
    bits = []
    if g.startswith("can_build"):
        if v.terminal_queued:
            bits.append("its terminal message is already queued")
        if v.next_chunk >= cfg.chunks:
            bits.append(f"all {cfg.chunks} chunks are built")
        if v.inflight >= cfg.d_in:
            bits.append(f"{v.inflight} envelope{'s' if v.inflight != 1 else ''} "
                        f"{'are' if v.inflight != 1 else 'is'} in flight (D_in = {cfg.d_in})")
        if len(v.decode_q) >= cfg.d_out:
            bits.append(f"{len(v.decode_q)} results wait to be decoded (D_out = {cfg.d_out})")
        if cfg.regime == "R0a" and getattr(v, "built", False) and \
                v.last_emitted != v.next_chunk - 1:
            bits.append(f"chunk {v.next_chunk - 1} is not decoded yet (regime R0a)")
        return f"{name} builds chunk {v.next_chunk} while " + " and ".join(bits or ["?"])
    if g == "decode_room":
        return (f"{name} queues a result while {len(v.decode_q)} results wait to be "
                f"decoded (D_out = {cfg.d_out})")
    if g == "can_take":
        return (f"{name} takes an envelope to send with "
                + ("an empty send queue" if not v.send_q else "its terminal already sent"))
    if g == "expecting_result":
        return f"{name} receives a result while it awaits none"
    if g in ("head_current", "head_stale", "head_bad_count", "has_result"):
        if not v.decode_q:
            return f"{name} decodes with an empty decode queue"
        h = v.decode_q[0]
        return (f"{name}'s decode queue head is call {h.call_id} chunk {h.chunk} epoch "
                f"{h.epoch} (current epoch {v.epoch}, calls {h.calls})")
    if g == "comms_finished":
        return (f"{name}'s comms thread ends with terminal_sent={v.terminal_sent}, "
                f"{v.awaiting} result(s) awaited")
    if g == "drained":
        return (f"{name} ends with {v.inflight} envelope(s) in flight and "
                f"{len(v.decode_q)} result(s) undecoded")
    if g in ("can_cut", "can_cut_in_drain"):
        return f"{name} cuts with {v.cuts} of {cfg.hard_cut} cut(s) spent"
    if g == "all_built":
        return f"{name} queues shutdown with chunk {v.next_chunk} of {cfg.chunks} next"
    if g == "can_heartbeat":
        return f"{name} queues a no-op with {v.noops_left} no-op(s) left"
    return f"{name}'s variables: {_short(v)}"


def _short(v) -> str:
    try:
        d = v._asdict()
    except AttributeError:
        return repr(v)
    return " ".join(f"{k}={x}" for k, x in d.items()
                    if not isinstance(x, (tuple, frozenset)) or len(x) < 4)


def guard_words(model, p, row, v, cfg) -> str:
    name = model.names[p]
    if model.roles[p] == "rank0":
        return _rank0(name, row, v, cfg)
    return f"{name}'s variables: {_short(v)}"


def msg_diff(recorded, model) -> str:
    """'' when equal or not comparable; else '\n      diff: field: recorded -> model'."""
    if recorded == model:
        return ""
    a, b = _fields(recorded), _fields(model)
    if a is None or b is None:
        return f"\n      diff: recorded {recorded!r}\n            model    {model!r}"
    lines = [f"{k}: {a.get(k)!r} (recorded) != {b.get(k)!r} (model)"
             for k in sorted(set(a) | set(b), key=_order) if a.get(k) != b.get(k)]
    return "".join(f"\n      diff: {x}" for x in lines)


def _order(k):
    return (FIELDS.index(k) if k in FIELDS else len(FIELDS), str(k))


def _fields(m):
    if isinstance(m, tuple) and len(m) == 7 and not isinstance(m[0], (tuple, bool)):
        return dict(zip(FIELDS, m))
    if isinstance(m, tuple):
        out = {}
        for j, x in enumerate(m):
            f = _fields(x)
            if f is None:
                out[f"[{j}]"] = x
            else:
                out.update({f"[{j}].{k}": y for k, y in f.items()})
        return out
    return None
