"""Collectives that differ across a group's members (an extra or a missing all_reduce in
one rank's generator call) are caught by the watchdogs comparing the collective each
rank waits in, not at the op deadline: the numbering in the transport, the comparison,
and two watchdogs on a real store (127.0.0.1, in this process, no backend)."""
import threading
import time

import pytest
import torch

from lockstep.runtime import sidechannel as S
from lockstep.runtime import transport as T
from lockstep.runtime.groups import MESH, WORLD, Groups

GEN = "all_reduce #2 of generator_call(call_index=1)"


def test_only_waits_of_one_number_with_different_names_are_a_mismatch():
    assert S.collective_mismatch({}) is None
    assert S.collective_mismatch({1: "", 2: ""}) is None
    # one op, every member: a slow peer, however long
    assert S.collective_mismatch({1: "mesh_pg 7 broadcast", 2: "mesh_pg 7 broadcast",
                                  3: "mesh_pg 7 broadcast"}) is None
    # different numbers: the root of a broadcast goes on before its receivers complete
    assert S.collective_mismatch({1: "mesh_pg 8 broadcast", 2: "mesh_pg 7 broadcast"}) is None
    # the same number on different groups
    assert S.collective_mismatch({0: "world_pg 3 all_gather", 1: "mesh_pg 3 broadcast"}) is None
    # values that do not parse are no evidence
    assert S.collective_mismatch({1: "mesh_pg x broadcast", 2: "garbage",
                                  3: "mesh_pg 7"}) is None
    found = S.collective_mismatch({1: "mesh_pg 7 broadcast", 2: f"mesh_pg 7 {GEN}",
                                   3: "mesh_pg 7 broadcast"})
    assert found is not None
    group, words = found
    assert group == "mesh_pg"
    assert words.startswith("collective mismatch on mesh_pg at its collective #7: "), words
    assert f"rank 1 in broadcast, rank 2 in {GEN}, rank 3 in broadcast" in words, words


class _Work:
    def __init__(self, done: threading.Event):
        self.done = done

    def wait(self, timeout=None):
        if not self.done.wait(timeout.total_seconds() if timeout else 30):
            raise RuntimeError("timeout")


class _PG:
    """A process group stand-in: every op returns a work that completes on `release`."""

    def __init__(self):
        self.release = threading.Event()

    def _work(self, *a):
        return _Work(self.release)

    send = recv = broadcast = allreduce = allgather = _work


def test_collectives_are_numbered_per_group_and_a_long_wait_is_published():
    pg = _PG()
    groups = Groups("gloo", 1, 3, {WORLD: pg, MESH: pg}, {WORLD: (0, 1, 2), MESH: (1, 2)})
    tp = T.Transport(groups, 1, op_deadline_s=10.0)
    x = torch.zeros(2)
    pg.release.set()
    tp.wait(tp.isend(x, 0, WORLD))          # p2p ops are not numbered
    tp.wait(tp.ibroadcast(x, MESH, 0))
    tp.wait(tp.iall_reduce(x, MESH))
    tp.wait(tp.iall_reduce(x, WORLD))
    assert tp.colls == {MESH: 2, WORLD: 1}
    assert tp.stuck_collective(0.0) is None        # nothing waits
    pg.release.clear()
    op = tp.iall_reduce(x, MESH, name=GEN)
    t = threading.Thread(target=tp.wait, args=(op,))
    t.start()
    try:
        deadline = time.monotonic() + 5
        while tp.stuck_collective(0.05) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert tp.stuck_collective(0.05) == f"mesh_pg 3 {GEN}"
        assert tp.stuck_collective(60.0) is None   # not waited on that long yet
    finally:
        pg.release.set()
        t.join(5)
    assert tp.stuck_collective(0.0) is None


@pytest.fixture
def store():
    from torch.distributed import TCPStore
    server = TCPStore("127.0.0.1", 0, 2, True, wait_for_workers=False)
    yield server
    del server


def _pair(store, run_id, probes):
    """Two ranks' watchdogs on `store`, each publishing probes[r]; no process exits
    (exit_code=None): a release is recorded."""
    released = {}
    dogs = []
    for r in (0, 1):
        side = S.SideChannel("127.0.0.1", store.port, r, 2, run_id, timeout=5.0)
        wd = S.Watchdog(side, lambda cause, via, r=r, **kw: released.__setitem__(
            r, (cause, via)), heartbeat_s=0.02, lost_after_s=30.0, exit_code=None)
        wd.probe = lambda after_s, r=r: probes[r]
        wd.ids = lambda: {"call_id": 1, "chunk_index": 1, "cache_epoch": 0,
                          "group": "world_pg(p2p)"}
        dogs.append(wd)
    for wd in dogs:
        wd.start()
    return dogs, released


def test_two_watchdogs_waiting_in_different_collectives_release_both(store):
    dogs, released = _pair(store, "mismatch", {0: "mesh_pg 5 broadcast",
                                               1: f"mesh_pg 5 {GEN}"})
    for wd in dogs:
        wd.join(10)
    assert set(released) == {0, 1}, released
    (c0, via0), (c1, via1) = released[0], released[1]
    assert c0 == c1                                     # first cause wins, both read it
    assert c0["kind"] == "collective_mismatch" and c0["group"] == "mesh_pg", c0
    assert f"rank 0 in broadcast, rank 1 in {GEN}" in c0["detail"], c0
    assert sorted((via0, via1)) == ["abort_flag", "own"]   # one saw it first
    assert c0["detail"].endswith(f"seen by rank {c0['rank']}")


def test_watchdogs_waiting_in_one_collective_release_nobody(store):
    probes = {0: "mesh_pg 5 broadcast", 1: "mesh_pg 5 broadcast"}
    dogs, released = _pair(store, "same", probes)
    try:
        deadline = time.monotonic() + 10
        while min(wd.ticks for wd in dogs) < 15 and time.monotonic() < deadline:
            time.sleep(0.01)
        probes[0] = "mesh_pg 6 broadcast"     # one went on: different numbers
        start = min(wd.ticks for wd in dogs)
        while min(wd.ticks for wd in dogs) < start + 15 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert min(wd.ticks for wd in dogs) >= start + 15, "the watchdogs did not tick"
        assert released == {}
    finally:
        for wd in dogs:
            wd.stop()
