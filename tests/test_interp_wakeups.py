"""The interpreter's per-step work: the model's guards run once per (state, variables),
and a thread waiting on its p2p ops is woken only when another thread's step gave it an
enabled row none of its ops is (no backend needed)."""
from lockstep.model.config import Config
from lockstep.model.runopts import RunOptions
from lockstep.model.semantics import Model
from lockstep.model.tables import shipped_tables
from lockstep.runtime.interp import RankInterpreter


class _Comm:
    def __init__(self):
        self.nudges = 0

    def nudge(self):
        self.nudges += 1


class _NoTrace:
    def keeps(self, row):
        return False


def _rank0():
    r0 = RankInterpreter(Model(Config(mesh=2, chunks=4), shipped_tables()), 0, None, None,
                         None, abort_poll=lambda: None, opts=RunOptions(), parity={})
    r0.comm, r0.trace = _Comm(), _NoTrace()
    r0.pcs = ["run", "idle/idle"]          # after the handshake
    return r0


def _row(interp, t, label):
    return next(r for rows in interp.table[t].values() for r in rows if r.label == label)


def test_guards_run_once_per_state_and_variables():
    r0 = _rank0()
    calls = []
    state = r0.table[0]["run"]
    counted = [r._replace(guard=(lambda g: lambda v, c: calls.append(1) or g(v, c))(r.guard))
               if r.guard is not None else r for r in state]
    r0.table = ({**r0.table[0], "run": counted},) + tuple(r0.table[1:])
    first = r0._guarded(0)
    assert r0._guarded(0) is first and len(calls) == sum(r.guard is not None for r in state)
    r0.v = r0.v._replace(inflight=r0.v.inflight)      # an equal but new tuple: asked again
    r0._guarded(0)
    assert len(calls) == 2 * sum(r.guard is not None for r in state)
    r0.v = r0.v._replace(next_chunk=r0.cfg.chunks)     # nothing left to build
    assert "build_envelope" not in [r.label for r in r0._guarded(0)]


def test_the_comms_thread_is_woken_only_for_new_work():
    r0 = _rank0()
    r0._comms_jobs[1][1] = object()     # comms: a receive in flight, nothing else to do
    with r0.cv:
        r0._apply(0, _row(r0, 0, "queue_noop")._replace(update=None, dst="run"))
    assert r0.comm.nudges == 0           # the variables did not change: no wake-up
    with r0.cv:
        r0._apply(0, _row(r0, 0, "build_envelope"))
    assert [r.label for r in r0._guarded(1)] == ["take_envelope"]
    assert r0.comm.nudges == 1           # an envelope to take: woken once
    r0._comms_jobs[1][1] = None
    with r0.cv:
        r0._apply(0, _row(r0, 0, "build_envelope"))
    assert r0.comm.nudges == 1           # no op in flight: it is not waiting on one


class _Posted:
    done = False


def test_a_thread_does_not_end_while_its_posted_receive_can_still_land():
    """The leader's comms thread at idle/idle with its header receive posted in the
    backend: comms_done (to FINAL) waits while rank0 may still send (no exit mark), since
    a gloo receive cannot be withdrawn and rank0's send would land in it; once rank0 is
    leaving, or the receive has completed (applied first), the row may fire."""
    left = set()
    lead = RankInterpreter(Model(Config(mesh=2, chunks=4), shipped_tables()), 1, None, None,
                           None, abort_poll=lambda: None, opts=RunOptions(), parity={},
                           peer_left=lambda r: r in left)
    t = lead.threads.index("comms")
    done_row = _row(lead, t, "comms_done")
    recv = [r for r in lead.table[t]["idle/idle"] if type(r.op).__name__ == "Recv"]
    assert recv and done_row.src == "idle/idle"
    lead._comms_jobs[t][1], lead._comms_jobs[t][3] = _Posted(), recv
    assert lead._recv_may_still_land(t, done_row)
    left.add(0)
    assert not lead._recv_may_still_land(t, done_row)
    left.clear()
    lead._comms_jobs[t][1].done = True
    assert not lead._recv_may_still_land(t, done_row)
    lead._comms_jobs[t][1] = None                   # nothing posted: nothing to land
    assert not lead._recv_may_still_land(t, done_row)
    assert not lead._recv_may_still_land(t, recv[0])  # only rows that end the thread
