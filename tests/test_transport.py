"""runtime/transport.py without a backend: the refusals before any backend call, and the
completion paths (direct, completer, polled) on stand-in works."""
import threading
import time

import pytest

from lockstep.runtime import transport as T
from lockstep.runtime.groups import MESH, WORLD, GroupMembershipError, Groups


def _groups(rank=0):
    return Groups("gloo", rank, 3, {WORLD: object(), MESH: object()},
                  {WORLD: (0, 1, 2), MESH: (1, 2)})


class Work:
    """A stand-in backend work: completes after `after_s` (or never), or raises."""

    def __init__(self, after_s=0.0, error=None, cuda_done=None):
        self.after_s, self.error, self.cuda_done = after_s, error, cuda_done
        self.waits = 0

    def wait(self, timeout=None):
        self.waits += 1
        limit = None if timeout is None else timeout.total_seconds()
        if self.after_s is None or (limit is not None and self.after_s > limit):
            time.sleep(limit if limit is not None else 3600)
            raise RuntimeError("Application timeout caused pair closure")
        time.sleep(self.after_s)
        if self.error is not None:
            raise self.error

    def is_completed(self):
        return self.cuda_done is not None and time.monotonic() >= self.cuda_done


def _op(work, op="recv", group=WORLD, peer=1, cuda=False, then=None):
    return T.Op(work, op, group, T.Peer(peer, peer), cuda, then)


def test_refusals_come_before_the_backend():
    seen = []

    def check(op, group, peer, row):
        seen.append((op, group, peer, row))
        if group == WORLD and op == "all_reduce":
            raise RuntimeError("table: all_reduce on mesh_pg only")

    tp = T.Transport(_groups(0), 0, check=check)
    with pytest.raises(RuntimeError, match="mesh_pg only"):
        tp.iall_reduce(None, WORLD)                   # no tensor needed: never issued
    with pytest.raises(GroupMembershipError, match="rank 0 is not a member"):
        tp.iall_reduce(None, MESH)                    # rank 0 is not in mesh_pg
    assert seen == [("all_reduce", WORLD, None, None), ("all_reduce", MESH, None, None)]
    with pytest.raises(GroupMembershipError, match="out of range"):
        T.Transport(_groups(1), 1).ibroadcast(None, MESH, 2)   # mesh group ranks: 0, 1
    released = T.Transport(_groups(0), 0, abort_poll=lambda: "rank 2 killed")
    with pytest.raises(T.Released, match=r"rank 0: send group=world_pg peer=1 released: "
                       r"rank 2 killed"):
        released.isend(None, 1, WORLD)


def test_backend_errors_are_cleaned_into_comm_failed_naming_rank_op_group_peer():
    tp = T.Transport(_groups(2), 2)
    err = RuntimeError("[/src/gloo/transport/tcp/pair.cc:598] Connection closed by peer "
                       "[127.0.0.1]:1234. This is typically a ...")
    with pytest.raises(T.CommFailed) as e:
        tp.wait(_op(Work(error=err), peer=1))
    assert str(e.value) == ("rank 2: recv group=world_pg peer=1 backend error: "
                            "RuntimeError: Connection closed by peer [127.0.0.1]:1234")
    mesh = T.Op(Work(error=err), "broadcast", MESH, T.Peer(0, 1), False)
    with pytest.raises(T.CommFailed, match=r"broadcast group=mesh_pg peer=0\(global 1\)"):
        tp.wait(mesh)


def test_a_deadline_abandons_the_op_and_refuses_every_later_one():
    tp = T.Transport(_groups(0), 0, op_deadline_s=0.2)
    with pytest.raises(T.OpDeadline, match=r"rank 0: recv group=world_pg peer=1 made no "
                       r"progress for 0\.2\d\ds \(deadline 0\.2s\)"):
        tp.wait(_op(Work(after_s=None)))
    with pytest.raises(T.CommError, match="an earlier op was abandoned"):
        tp.isend(None, 1, WORLD)


def test_a_wait_in_progress_is_named_for_the_release_line():
    """A rank released by the abort flag prints the root cause's line, which says
    nothing of where this rank was: `waiting_text()` names what each of its threads is
    blocked in (a workload all_reduce by its place in the call), and nothing once the
    wait has ended."""
    tp = T.Transport(_groups(1), 1, op_deadline_s=0.5)
    assert tp.waiting_text() is None
    stuck = T.Op(Work(after_s=None), "all_reduce #2 of generator_call(call_index=1)", MESH,
                 None, False)
    t = threading.Thread(target=lambda: pytest.raises(T.OpDeadline, tp.wait, stuck))
    t.start()
    time.sleep(0.2)
    said = tp.waiting_text()
    t.join(5)
    assert said is not None and said.startswith("rank 1: waiting 0."), said
    assert said.endswith("s in all_reduce #2 of generator_call(call_index=1) "
                         "group=mesh_pg peer=-"), said
    assert tp.waiting_text() is None
    two = [_op(Work(after_s=0.3)), _op(Work(after_s=0.3), op="send", peer=2)]
    t = threading.Thread(target=tp.wait_any, args=(two,))
    t.start()
    time.sleep(0.1)
    said = tp.waiting_text()
    t.join(5)
    assert "in recv group=world_pg peer=1 or send group=world_pg peer=2" in said, said


def test_one_op_is_waited_in_the_calling_thread_two_through_the_completer():
    tp = T.Transport(_groups(0), 0)
    one = _op(Work(after_s=0.01), then=lambda: "value")
    assert tp.wait_any([None, one]) == (1, "value")
    assert tp.completer.threads == 0                  # direct: no hand-off at all
    for _ in range(3):                                # a slow receive, a quick send
        recv, send = _op(Work(after_s=0.3)), _op(Work(after_s=0.02), op="send")
        t0 = time.monotonic()
        assert tp.wait_any([recv, send])[0] == 1
        assert time.monotonic() - t0 < 0.25           # not held behind the receive
        assert tp.wait_any([recv, None])[0] == 0      # still in flight, completed later
    assert tp.completer.threads == 2                  # reused, never a thread per op
    assert threading.active_count() < 10


def test_a_release_while_two_ops_are_in_flight_raises_released():
    reason = []
    tp = T.Transport(_groups(0), 0, abort_poll=lambda: reason[0] if reason else None,
                     slice_s=0.01)
    threading.Timer(0.1, reason.append, args=("abort flag: rank 1 killed",)).start()
    with pytest.raises(T.Released, match="abort flag: rank 1 killed"):
        tp.wait_any([_op(Work(after_s=None)), _op(Work(after_s=None), op="send")])


def test_cuda_ops_are_polled_and_can_be_released():
    tp = T.Transport(_groups(0), 0, op_deadline_s=5.0)
    work = Work(cuda_done=time.monotonic() + 0.05)
    assert tp.wait_any([_op(work, cuda=True, then=lambda: 7)]) == (0, 7)
    assert work.waits == 1                             # wait() only once it completed
    reason = []
    tp = T.Transport(_groups(0), 0, abort_poll=lambda: reason[0] if reason else None)
    threading.Timer(0.05, reason.append, args=("released",)).start()
    with pytest.raises(T.Released):
        tp.wait(_op(Work(cuda_done=None), cuda=True))


def test_trace_lines_are_compact_sorted_json_one_write_each(tmp_path):
    import json

    from lockstep.model.guards import MeshVars
    from lockstep.runtime.trace import TraceWriter, encode_line
    ev = {"t_ns": 5, "ev": "fault", "msg": {"b": 1, "a": [1, 2]}, "big": 1 << 70}
    assert encode_line(ev) == (json.dumps(ev, separators=(",", ":"), sort_keys=True)
                               + "\n").encode()
    w = TraceWriter(tmp_path, 3, role="worker", threads=("main",),
                    initial=(("handshake",), MeshVars()))
    w.write(ev)
    w.close()
    w.write(ev)                                   # after close: dropped, never raises
    first, line = (tmp_path / "rank3.jsonl").read_bytes().splitlines(True)
    assert json.loads(first)["ev"] == "checkpoint" and line == encode_line(ev)


def test_the_trace_switch_is_validated():
    from lockstep.model.runopts import RunOptions
    assert RunOptions.from_dict({"trace": "emits"}).trace == "emits"
    with pytest.raises(ValueError, match="opts.trace"):
        RunOptions.from_dict({"trace": "off"})


# ------------------------------------------------------------------ interruptible waits
# A comms thread waits on its posted ops while its process's main thread may queue work
# for it (the leader's result k, while the receive of envelope k+1 is posted).

def test_a_nudge_returns_for_new_work_with_the_op_still_in_flight():
    """Without the wake the leader's comms thread stayed blocked in its receive with
    result k in its outbox, and rank0 waited for that result: a deadlock. (A slice
    longer than the op: only the nudge can end the wait early.)"""
    tp = T.Transport(_groups(0), 0, slice_s=5.0)
    recv = _op(Work(after_s=0.6), then=lambda: "recv")
    asked = []

    def interrupt():
        asked.append(1)
        return len(asked) > 1        # queued work shows only after the nudge
    threading.Timer(0.1, tp.nudge).start()
    t0 = time.monotonic()
    assert tp.wait_any([None, recv], interrupt=interrupt) == (None, None)
    assert time.monotonic() - t0 < 0.4 and not recv.done and recv.submitted
    assert tp.wait_any([None, recv], interrupt=lambda: False) == (1, "recv")


def test_a_one_op_wait_with_an_interrupt_goes_through_the_completer():
    """A direct wait cannot be woken by another thread."""
    tp = T.Transport(_groups(0), 0)
    one = _op(Work(after_s=0.0), then=lambda: 1)
    assert tp.wait_any([one], interrupt=lambda: False) == (0, 1)
    assert one.submitted and tp.completer.threads == 1


def test_a_completed_op_is_returned_before_new_work_interrupts():
    """Interrupting first starved a finished op: the thread took its new work, came
    back, was interrupted again (a livelock seen in break-it kill_worker)."""
    tp = T.Transport(_groups(0), 0)
    recv = _op(Work(after_s=0.05), then=lambda: "recv")
    assert tp.wait_any([recv], interrupt=lambda: True) == (None, None)   # posted
    deadline = time.monotonic() + 2.0
    while not recv.done and time.monotonic() < deadline:
        time.sleep(0.01)
    assert tp.wait_any([recv], interrupt=lambda: True) == (0, "recv")


def test_settle_waits_on_a_send_that_wait_any_left_unsubmitted():
    """gloo p2p: a work completes only once someone waits on it. wait_any returns a
    receive already done without submitting the send beside it (rank0 at hdr/idle: the
    ERROR result came in before the envelope header's send was waited on), so polling
    the send's `done` never sees it land; settle submits it and sees it."""
    tp = T.Transport(_groups(0), 0)
    recv = _op(Work(), op="recv")
    recv.done = True                          # completed during an earlier, interrupted wait
    send = _op(Work(after_s=0.05), op="send")
    assert tp.wait_any([send, recv])[0] == 1
    time.sleep(0.1)
    assert not send.done and send.work.waits == 0     # nobody waits on it: never lands
    assert tp.settle(send, 2.0) and send.work.waits == 1


def test_settle_gives_up_without_raising_and_reports_a_failed_op():
    tp = T.Transport(_groups(0), 0)
    t0 = time.monotonic()
    assert not tp.settle(_op(Work(after_s=None), op="send"), 0.1)    # never completes
    assert 0.1 <= time.monotonic() - t0 < 1.0
    assert not tp.settle(_op(Work(error=RuntimeError("Connection closed by peer")),
                             op="send"), 2.0)
    cuda = _op(Work(cuda_done=time.monotonic() + 0.05), op="send", cuda=True)
    assert tp.settle(cuda, 2.0) and cuda.done
