"""The workload's CUDA collectives are stream-ordered (runtime/transport.py
stream_all_reduce): the host does not wait for each one, only beyond the in-flight window
and at the end of the call (drain), and a collective left outstanding past the op
deadline, with no wait bounding it, releases the rank through its watchdog. Stand-in
works whose completion the test decides; no GPU needed."""
import threading
import time
from types import SimpleNamespace

import pytest

from lockstep.runtime import sidechannel as S
from lockstep.runtime import transport as T
from lockstep.runtime.groups import MESH, WORLD, Groups

GEN = "all_reduce #{} of generator_call(call_index=0)"


class CudaWork:
    """An NCCL work stand-in: ``wait()`` orders the stream (returns at once);
    ``is_completed()`` turns true when the test completes it."""

    def __init__(self):
        self.completed = threading.Event()
        self.waits = 0

    def wait(self, timeout=None):
        self.waits += 1

    def is_completed(self):
        return self.completed.is_set()


class StreamPG:
    def __init__(self):
        self.works = []

    def allreduce(self, tensors, opts):
        self.works.append(CudaWork())
        return self.works[-1]


CUDA_TENSOR = SimpleNamespace(device=SimpleNamespace(type="cuda"))


def _transport(window, deadline_s=5.0):
    pg = StreamPG()
    groups = Groups("nccl", 1, 3, {WORLD: pg, MESH: pg}, {WORLD: (0, 1, 2), MESH: (1, 2)})
    return pg, T.Transport(groups, 1, op_deadline_s=deadline_s, cuda_window=window)


def _complete_after(work, s):
    threading.Timer(s, work.completed.set).start()


def test_the_host_runs_ahead_of_its_collectives_within_the_window():
    pg, tp = _transport(window=2)
    for k in (1, 2):
        t0 = time.monotonic()
        tp.stream_all_reduce(CUDA_TENSOR, MESH, name=GEN.format(k))
        assert time.monotonic() - t0 < 0.05            # not waited: the stream does
    assert [w.waits for w in pg.works] == [1, 1]       # each ordered on the stream at once
    assert not any(w.is_completed() for w in pg.works)
    _complete_after(pg.works[0], 0.15)
    t0 = time.monotonic()
    tp.stream_all_reduce(CUDA_TENSOR, MESH, name=GEN.format(3))   # a third: the oldest
    assert time.monotonic() - t0 >= 0.14               # ... is completed first
    assert pg.works[0].is_completed() and not pg.works[1].is_completed()
    for w in pg.works[1:]:
        _complete_after(w, 0.1)
    t0 = time.monotonic()
    tp.drain()                                         # the call's end: all of them
    assert time.monotonic() - t0 >= 0.09
    assert all(w.is_completed() for w in pg.works) and not tp._deferred


def test_a_completed_collective_leaves_the_window_without_a_wait():
    pg, tp = _transport(window=2)
    tp.stream_all_reduce(CUDA_TENSOR, MESH)
    pg.works[0].completed.set()
    tp.stream_all_reduce(CUDA_TENSOR, MESH)
    assert len(tp._deferred) == 1 and tp._deferred[0].work is pg.works[1]


def test_window_zero_completes_each_collective_before_the_workload_goes_on():
    pg, tp = _transport(window=0)
    real = pg.allreduce

    def completing_later(tensors, opts):
        w = real(tensors, opts)
        _complete_after(w, 0.1)
        return w
    pg.allreduce = completing_later
    t0 = time.monotonic()
    tp.stream_all_reduce(CUDA_TENSOR, MESH)
    assert time.monotonic() - t0 >= 0.09 and not tp._deferred


def test_a_drain_that_never_completes_is_a_deadline_naming_the_collective():
    pg, tp = _transport(window=4, deadline_s=0.2)
    tp.stream_all_reduce(CUDA_TENSOR, MESH, name=GEN.format(1))
    with pytest.raises(T.OpDeadline, match=r"rank 1: all_reduce #1 of generator_call"
                       r"\(call_index=0\) group=mesh_pg peer=- made no progress"):
        tp.drain()


def test_an_outstanding_collective_is_a_wait_and_overdue_once_past_the_deadline():
    """The host went on and blocked elsewhere (a workload's own .item() after a
    collective that never completes): no wait of its threads bounds the collective, so
    `overdue` names it once it is outstanding past the op deadline, and the mismatch
    probe and the release line see it as waited on since it was issued."""
    pg, tp = _transport(window=4, deadline_s=0.2)
    tp.stream_all_reduce(CUDA_TENSOR, MESH, name=GEN.format(1))
    assert tp.overdue() is None                        # not past the deadline yet
    time.sleep(0.25)
    late = tp.overdue()
    assert late is not None and late.startswith(f"rank 1: {GEN.format(1)} (outstanding "
                                                f"on the stream"), late
    assert "made no progress for 0.2" in late and "(deadline 0.2s)" in late, late
    assert tp.stuck_collective(0.1) == f"mesh_pg 1 {GEN.format(1)}"
    assert f"s in {GEN.format(1)} group=mesh_pg" in tp.waiting_text()
    pg.works[0].completed.set()                        # done after all: nothing overdue
    assert tp.overdue() is None and tp.stuck_collective(0.0) is None


def test_a_collective_some_thread_waits_on_is_that_waits_to_bound_not_overdue():
    pg, tp = _transport(window=4, deadline_s=0.3)
    tp.stream_all_reduce(CUDA_TENSOR, MESH)
    tp._deferred[0].issued -= 10.0                     # issued long ago
    t = threading.Thread(target=lambda: pytest.raises(T.OpDeadline, tp.drain))
    t.start()
    time.sleep(0.1)
    assert tp.overdue() is None                        # drain's own deadline bounds it
    t.join(5)


@pytest.fixture
def store():
    from torch.distributed import TCPStore
    server = TCPStore("127.0.0.1", 0, 2, True, wait_for_workers=False)
    yield server
    del server


def test_the_watchdog_releases_a_rank_whose_collective_is_overdue(store):
    released = []
    side = S.SideChannel("127.0.0.1", store.port, 1, 2, "overdue", timeout=5.0)
    wd = S.Watchdog(side, lambda cause, via, **kw: released.append((cause, via)),
                    heartbeat_s=0.02, lost_after_s=30.0, exit_code=None)
    wd.ids = lambda: {"call_id": 4, "chunk_index": 4, "cache_epoch": 0, "group": MESH}
    late = []
    wd.overdue = lambda: late[0] if late else None
    wd.start()
    try:
        time.sleep(0.1)
        assert released == []                          # nothing overdue: beats only
        late.append("rank 1: all_reduce #3 of generator_call(call_index=1) (outstanding "
                    "on the stream; ...) group=mesh_pg peer=- made no progress for 30.1s")
        wd.join(5)
        assert not wd.is_alive()
    finally:
        wd.stop()
    [(cause, via)] = released
    assert via == "own" and cause["kind"] == "deadline" and cause["rank"] == 1, cause
    assert cause["detail"].startswith("rank 1: all_reduce #3 of generator_call"), cause
    assert side.abort_cause() == cause                 # every peer reads the same cause


class _NoTrace:
    def keeps(self, row):
        return False


def test_a_generator_calls_row_is_applied_only_once_its_collectives_are_done():
    """The interpreter drains the call's stream-ordered collectives before it applies
    the generator_call row: the workload ran ahead of them, the row did not."""
    from lockstep.model.config import Config
    from lockstep.model.runopts import RunOptions
    from lockstep.model.semantics import Model
    from lockstep.model.tables import shipped_tables
    from lockstep.runtime.interp import RankInterpreter

    pg, tp = _transport(window=4)
    seen = {}

    class Workload:
        def generator_call(self, idx, meta, tensors, all_reduce):
            for _ in range(3):
                all_reduce(CUDA_TENSOR)
            seen["pending at return"] = sum(not w.is_completed() for w in pg.works)
            for w in pg.works:
                _complete_after(w, 0.1)

    w = RankInterpreter(Model(Config(mesh=2), shipped_tables()), 2, tp.groups, Workload(),
                        _NoTrace(), abort_poll=lambda: None, opts=RunOptions(), parity={})
    w.comm = tp
    tp.check = w._table_check
    w.pcs[0] = "gen"
    w.v = w.v._replace(planned=2)
    w.cur = ({}, {})
    rows = w._guarded(0)
    assert {r.op.kind for r in rows} == {"gen"}, rows
    w._coll(0, rows)
    assert seen["pending at return"] == 3          # the workload did not wait for them
    assert all(w_.is_completed() for w_ in pg.works) and not tp._deferred
    assert w.v.calls_done == 1                     # ... and the row was applied after
