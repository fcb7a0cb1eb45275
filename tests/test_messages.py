"""One definition of every message: the model's makes and the codec frame the same ids."""
import pytest
import torch

from lockstep.model import guards as g
from lockstep.model import messages as M
from lockstep.model.config import Config
from lockstep.model.contract import Action, expected_generator_calls, plan_bits
from lockstep.runtime import codec

KINDS = ("envelope", "result")


# Every (kind, action) a message can have: the leader never answers a heartbeat, so
# there is no NOOP result.
@pytest.mark.parametrize("kind,action", [(k, a) for k in KINDS for a in Action
                                         if (k, a) != ("result", Action.NOOP)])
def test_wire_ids_and_summary_are_inverse(kind, action):
    infer = action == Action.INFER
    msg = M.message(action, 7, 3, 2, 5 if infer else 0, init_cache=kind == "envelope")
    assert M.summary(kind, M.wire_ids(kind, msg)) == msg


def test_header_only_messages_carry_no_chunk_and_the_current_epoch():
    cfg = Config(mesh=1, chunks=2, hard_cut=True)
    v = g.Rank0Vars(next_chunk=2, next_call=2)
    v = g.queue_shutdown(g.hard_cut(v, cfg), cfg)
    term = v.send_q[-1]
    assert (term.action, term.chunk, term.epoch) == (Action.SHUTDOWN, -1, 1)
    # the codec frames exactly the model's ids (the bug: it repeated the previous epoch)
    prev = {"call_id": 1, "chunk_index": 1, "cache_epoch": 0, "action": 1}
    frames = codec.encode_envelope_msg(term, {}, {}, prev=prev)
    h = codec.decode_header(frames.header)
    assert codec.header_msg(h) == M.header_view(term)
    assert (h.chunk_index, h.cache_epoch) == (-1, 1)


@pytest.mark.parametrize("regime", ["R1", "R0a", "R0"])
def test_plan_bits_agree_with_the_call_count_the_model_plans(regime):
    """R0 failed rank0's preflight: the workload set do_kv_recompute only for R0a while
    the model's count included R0's recompute pass."""
    from lockstep.runtime.workload import DemoWorkload, envelope_fields
    cfg = Config(regime=regime, steps=2)
    assert cfg.calls == expected_generator_calls(regime, 2,
                                                 do_kv_recompute=plan_bits(regime)[
                                                     "do_kv_recompute"])
    msg = g.new_envelope(g.Rank0Vars(), cfg)
    extra, tensors = DemoWorkload().build(0, 0, True, regime, 2)
    frames = codec.encode_envelope_msg(msg, envelope_fields(extra, regime=regime, steps=2),
                                       tensors)
    got = codec.loopback_decode(frames, where="leader_before_broadcast")
    assert got.msg == msg
    assert isinstance(got.tensors["latents_in"], torch.Tensor)
