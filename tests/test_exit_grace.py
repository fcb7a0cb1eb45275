"""A thread whose exception ends the rank first lets the sends other threads have in
flight land and be traced by their own thread (runtime/interp.py `let_sends_land`).

Without it the leader's trace lost a result payload rank0 had received (its main failed
on a broadcast to a killed worker while its comms thread's send was in flight) and the
run did not conform. No backend: the comms thread's send job is a placeholder that a
second thread "completes" the way `_p2p_step` does (applied, then the job cleared, under
the lock)."""
import threading

from lockstep.model.config import Config
from lockstep.model.runopts import RunOptions
from lockstep.model.semantics import Model
from lockstep.model.tables import shipped_tables
from lockstep.runtime.interp import RankInterpreter

MAIN, COMMS = 0, 1
SEND, RECV = 0, 1      # the slots of a thread's `_comms_jobs` entry


def _leader(grace_s: float) -> RankInterpreter:
    it = RankInterpreter(Model(Config(mesh=2, chunks=4), shipped_tables()), 1, None, None,
                         None, abort_poll=lambda: None, opts=RunOptions(), parity={})
    it.EXIT_GRACE_S = grace_s
    return it


def _complete_send_once_waited_for(it: RankInterpreter, applied: list) -> threading.Thread:
    """The comms thread: once main waits in `let_sends_land` (`_exiting` is set), the
    send completes and is applied under the lock."""
    def comms():
        with it.cv:
            while it._exiting is None:
                it.cv.wait(0.005)
            applied.append("send_result_payload")
            it._comms_jobs[COMMS][SEND] = None
            it.cv.notify_all()
    th = threading.Thread(target=comms, daemon=True)
    th.start()
    return th


def _let_land_from_main(it: RankInterpreter) -> threading.Thread:
    def main():
        with it.cv:
            it.let_sends_land(MAIN)
    th = threading.Thread(target=main, daemon=True)
    th.start()
    return th


def test_the_failing_thread_waits_for_a_send_in_flight_to_be_applied():
    it = _leader(grace_s=60.0)     # only the send's completion can end the wait in time
    it._comms_jobs[COMMS][SEND] = object()
    applied = []
    comms = _complete_send_once_waited_for(it, applied)
    main = _let_land_from_main(it)
    main.join(20)
    comms.join(20)
    assert not main.is_alive(), "let_sends_land did not return once the send was applied"
    assert applied == ["send_result_payload"], \
        "the failing thread went on to the exit before the send in flight was applied"
    assert it._exiting is None    # the other threads may step again (and then see exit)


def test_a_send_that_never_completes_holds_the_exit_only_for_the_grace():
    it = _leader(grace_s=0.05)
    it._comms_jobs[COMMS][SEND] = object()
    main = _let_land_from_main(it)
    main.join(20)
    assert not main.is_alive(), "a send that never completes held the rank's exit"
    assert it._comms_jobs[COMMS][SEND] is not None and it._exiting is None


def test_a_posted_receive_is_not_waited_for():
    it = _leader(grace_s=60.0)     # waiting on the receive would hold main for a minute
    it._comms_jobs[COMMS][RECV] = object()
    main = _let_land_from_main(it)
    main.join(20)
    assert not main.is_alive(), "the exit waited for a receive nothing may complete"


def test_nothing_is_waited_for_once_the_rank_has_left():
    it = _leader(grace_s=60.0)
    it._comms_jobs[COMMS][SEND] = object()
    it.exit = ("abort", "released")   # the exit path owns the ending already
    main = _let_land_from_main(it)
    main.join(20)
    assert not main.is_alive()
