"""What a rank records about a transition, as opposed to what the model computes.

The model's message for a transition is the full summary (`model.guards.Msg`); a rank
records what *it* saw. The runtime (runtime/interp.py) records:

  * a sender: the full summary it sent (the row's `make`);
  * a receiver of a header (`env_hdr`, `res_hdr`, p2p or broadcast, root included): only
    the header's ids (`model.messages.header_view`); the payload that follows carries the rest;
  * a receiver of a payload: the full summary decoded from it;
  * an all_gather: the gathered vector (a list); an all_reduce: nothing.

`msg_ok` accepts exactly those two forms (the full summary, or the exact header view for
header kinds): strict on purpose, so a field altered in a trace never slips through.

Schema extension (optional, written by conformance/simulate.py, checked when present):
a rank0 *local* step that moves a message through one of rank0's queues records that
message as `msg` (`build_envelope`/`queue_noop`/`queue_shutdown`/`preflight_fails`: the
envelope or terminal queued; `take_envelope`: the one dequeued for sending;
`queue_result`: the result put in the decode queue; `decode_result`/
`drop_stale_result`/`reject_result`/`drop_after_failure`: the result taken from it).
`local_subject(v_before, v_after)` computes it from rank0's variables, so the runtime
can record it with the same pure function. With it a duplicated or swapped decode is
caught at the step itself, not only at the end of the run.
"""
from __future__ import annotations

from lockstep.model.events import local_subject  # noqa: F401 - shared with the runtime

from lockstep.model.messages import header_view  # noqa: F401 - one definition, shared
from lockstep.model.ops import ENV_HDR, RES_HDR

HEADER_KINDS = frozenset({ENV_HDR, RES_HDR})


def recorded_msg(kind: str, sender: bool, model_msg):
    """What a participant records for a p2p/broadcast message of `kind`."""
    if sender or kind not in HEADER_KINDS:
        return model_msg
    return header_view(model_msg)


def msg_ok(recorded, model_msg, kind: str) -> bool:
    """Recorded message of a send/recv/broadcast part against the model's message."""
    if recorded == model_msg:
        return True
    return kind in HEADER_KINDS and model_msg is not None and \
        recorded == header_view(model_msg)


