"""Collectives that differ across a group's members (an extra or a missing all_reduce in
one rank's generator call) are caught by the watchdogs comparing the collective each
rank waits in, not at the op deadline: the numbering in the transport, the comparison,
and the watchdogs on a real store (127.0.0.1, in this process, no backend)."""
import contextlib
import threading
import time
from datetime import timedelta

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
    assert found.group == "mesh_pg"
    words = found.words
    assert words.startswith("collective mismatch on mesh_pg at its collective #7: "), words
    assert f"rank 1 in broadcast, rank 2 in {GEN}, rank 3 in broadcast" in words, words
    assert found.odd is None and not found.complete     # no group sizes: nobody is named


def test_the_odd_one_out_is_named_once_every_member_has_published():
    sizes = {"mesh_pg": 3, "world_pg": 4}
    three = {1: "mesh_pg 7 broadcast", 2: f"mesh_pg 7 {GEN}", 3: "mesh_pg 7 broadcast"}
    found = S.collective_mismatch(three, sizes)
    assert found.odd == 2 and found.complete, found
    assert "(rank 2 issued an extra collective or skipped one: every other member " \
           "issued the same one)" in found.words, found.words
    # the leader alone
    found = S.collective_mismatch({1: f"mesh_pg 7 {GEN}", 2: "mesh_pg 7 broadcast",
                                   3: "mesh_pg 7 broadcast"}, sizes)
    assert found.odd == 1, found
    # a member has not published yet: it may side with either, nobody is named yet
    found = S.collective_mismatch({1: "mesh_pg 7 broadcast", 2: f"mesh_pg 7 {GEN}"}, sizes)
    assert found.odd is None and not found.complete, found
    assert "(a rank issued an extra collective or skipped one)" in found.words
    # two members: either may be the one that is wrong
    found = S.collective_mismatch({1: "mesh_pg 7 broadcast", 2: f"mesh_pg 7 {GEN}"},
                                  {"mesh_pg": 2})
    assert found.odd is None and found.complete, found
    # a tie, and three names: no odd one out
    four = {1: "mesh_pg 7 broadcast", 2: f"mesh_pg 7 {GEN}", 3: f"mesh_pg 7 {GEN}",
            4: "mesh_pg 7 broadcast"}
    assert S.collective_mismatch(four, {"mesh_pg": 4}).odd is None
    three[3] = "mesh_pg 7 all_gather"
    assert S.collective_mismatch(three, sizes).odd is None


def test_a_member_that_went_on_says_what_it_issued_at_the_number_the_others_are_at():
    """A broadcast's receiver completes once the root has sent: the leader (root) waits
    at #11 for rank 3, stuck in an extra all_reduce there, while rank 2 has received and
    waits at #12. Rank 2's earlier lines say it issued a broadcast at #11: rank 3 is the
    odd one out."""
    sizes = {"mesh_pg": 3}
    waits = {1: "mesh_pg 11 broadcast\n10 all_reduce #1 of generator_call(call_index=1)",
             2: "mesh_pg 12 broadcast\n11 broadcast\n10 all_reduce #1 of "
                "generator_call(call_index=1)",
             3: f"mesh_pg 11 {GEN}\n10 all_reduce #1 of generator_call(call_index=1)"}
    found = S.collective_mismatch(waits, sizes)
    assert found.odd == 3 and found.complete, found
    assert f"rank 1 in broadcast, rank 2 issued broadcast, rank 3 in {GEN}" in found.words
    # what a member issued before agrees with the others: no mismatch, however long
    same = {1: "mesh_pg 11 broadcast\n10 all_reduce", 2: "mesh_pg 12 broadcast\n11 broadcast"}
    assert S.collective_mismatch(same, sizes) is None
    # only the numbers someone waits at are compared: where a member is stuck
    assert S.collective_mismatch({1: "mesh_pg 11 broadcast\n10 x",
                                  2: "mesh_pg 12 broadcast\n10 y"}, sizes) is None


def test_a_rank_whose_generator_call_deviates_from_its_own_earlier_calls_is_its_evidence():
    """CallCounts: a call that goes past what every earlier call with its index issued
    (extra), or ended short of it (short); nothing before there is history, nothing for
    an index whose calls issued different counts."""
    c = T.CallCounts()
    c.issue()                                     # outside a call: not counted
    assert c.evidence() is None and c.current is None
    for call, n in ((0, 2), (1, 1)):             # chunk 0: two calls, the first has two
        c.begin(call)
        for _ in range(n):
            c.issue()
        assert c.current == (call, n)
        assert c.evidence() is None               # no earlier call with this index
        c.end()
    assert c.evidence() is None
    c.begin(0)
    c.issue(), c.issue()
    assert c.evidence() is None                   # as far as chunk 0's call 0 went
    c.issue()
    assert c.evidence() == "extra 0 3 2"          # one more than every earlier call 0
    c2 = T.CallCounts()
    for n in (1, 1, 0):                           # call 1 of three chunks, the last short
        c2.begin(1)
        for _ in range(n):
            c2.issue()
        c2.end()
    assert c2.evidence() == "short 1 0 1"
    c2.begin(0)
    assert c2.evidence() is None                  # a new call: no history for index 0
    c3 = T.CallCounts()
    for n in (1, 2, 1):                           # call 0 issues different counts
        c3.begin(0)
        for _ in range(n):
            c3.issue()
        c3.end()
    c3.begin(0)
    for _ in range(3):
        c3.issue()
    assert c3.evidence() is None                  # no steady count: no evidence


def test_with_two_members_the_one_whose_own_calls_deviate_is_the_odd_one_out():
    sizes = {"mesh_pg": 2}
    extra = {1: "mesh_pg 7 broadcast\n6 all_reduce #1 of generator_call(call_index=1)",
             2: f"mesh_pg 7 {GEN}\n6 all_reduce #1 of generator_call(call_index=1)"
                "\nextra 1 2 1"}
    found = S.collective_mismatch(extra, sizes)
    assert found.odd == 2 and found.complete, found
    assert "(rank 2 issued an extra collective: its generator_call(call_index=1) is at " \
           "collective #2, where each of its earlier calls with that index issued 1)" \
           in found.words, found.words
    assert "extra" not in found.words.split("(")[0]      # the sides are names only
    short = {1: "mesh_pg 7 all_reduce #1 of generator_call(call_index=1)",
             2: "mesh_pg 7 broadcast\n6 all_reduce #1 of generator_call(call_index=0)"
                "\nshort 1 0 1"}
    found = S.collective_mismatch(short, sizes)
    assert found.odd == 2, found
    assert "(rank 2 skipped a collective: its last generator_call(call_index=1) issued 0, " \
           "where each of its earlier calls with that index issued 1)" in found.words
    # both deviate, or neither: no odd one out (the rank that saw it is named)
    both = dict(extra)
    both[1] += "\nshort 1 0 1"
    assert S.collective_mismatch(both, sizes).odd is None
    assert S.collective_mismatch({1: "mesh_pg 7 broadcast", 2: f"mesh_pg 7 {GEN}"},
                                 sizes).odd is None
    # evidence that does not parse is none
    torn = {1: "mesh_pg 7 broadcast", 2: f"mesh_pg 7 {GEN}\nextra 1 x 1"}
    assert S.collective_mismatch(torn, sizes).odd is None
    # three members: the vote decides, whatever a member's own counts say
    three = {1: "mesh_pg 7 broadcast", 2: f"mesh_pg 7 {GEN}",
             3: "mesh_pg 7 broadcast\nshort 0 1 2"}
    assert S.collective_mismatch(three, {"mesh_pg": 3}).odd == 2


@contextlib.contextmanager
def _waiting(tp, pg, op):
    """A thread waits on `op` until the block ends (then `pg` completes it); the block
    starts once the wait has lasted 0.05 s (stuck_collective says so)."""
    t = threading.Thread(target=tp.wait, args=(op,))
    t.start()
    try:
        deadline = time.monotonic() + 5
        while tp.stuck_collective(0.05) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        yield
    finally:
        pg.release.set()
        t.join(5)


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
    pg, tp, x = _mesh_rank_transport()
    tp.wait(tp.isend(x, 0, WORLD))          # p2p ops are not numbered
    tp.wait(tp.ibroadcast(x, MESH, 0))
    tp.wait(tp.iall_reduce(x, MESH))
    tp.wait(tp.iall_reduce(x, WORLD))
    assert tp.colls == {MESH: 2, WORLD: 1}
    assert tp.stuck_collective(0.0) is None        # nothing waits
    pg.release.clear()
    with _waiting(tp, pg, tp.iall_reduce(x, MESH, name=GEN)):
        # the collectives issued on the group before it, newest first
        assert tp.stuck_collective(0.05) == f"mesh_pg 3 {GEN}\n2 all_reduce\n1 broadcast"
        assert tp.stuck_collective(60.0) is None   # not waited on that long yet
    assert tp.stuck_collective(0.0) is None


def test_a_long_wait_carries_the_ranks_own_evidence_last():
    pg, tp, x = _mesh_rank_transport()
    tp.calls.begin(1)
    tp.calls.issue()
    tp.wait(tp.iall_reduce(x, MESH, name="all_reduce #1 of generator_call(call_index=1)"))
    tp.calls.end()
    pg.release.clear()
    tp.calls.begin(1)
    tp.calls.issue()
    tp.calls.issue()
    with _waiting(tp, pg, tp.iall_reduce(x, MESH, name=GEN)):
        assert tp.stuck_collective(0.05) == (
            f"mesh_pg 2 {GEN}\n1 all_reduce #1 of generator_call(call_index=1)"
            "\nextra 1 2 1")


def _mesh_rank_transport():
    """Rank 1's transport over stand-in groups whose ops complete until `release` is
    cleared: (the stand-in, the transport, a tensor)."""
    pg = _PG()
    groups = Groups("gloo", 1, 3, {WORLD: pg, MESH: pg}, {WORLD: (0, 1, 2), MESH: (1, 2)})
    pg.release.set()
    return pg, T.Transport(groups, 1, op_deadline_s=10.0), torch.zeros(2)


@pytest.fixture
def store():
    from torch.distributed import TCPStore
    server = TCPStore("127.0.0.1", 0, 2, True, wait_for_workers=False)
    yield server
    del server


def _pair(store, run_id, probes, world=2, sizes=None):
    """The watchdogs of the ranks of `probes` (of `world` ranks) on `store`, each
    publishing probes[r]; no process exits (exit_code=None): a release is recorded."""
    released = {}
    dogs = []
    for r in sorted(probes):
        side = S.SideChannel("127.0.0.1", store.port, r, world, run_id, timeout=5.0)
        wd = S.Watchdog(side, lambda cause, via, r=r, **kw: released.__setitem__(
            r, (cause, via)), heartbeat_s=0.02, lost_after_s=30.0, exit_code=None)
        wd.probe = lambda after_s, r=r: probes[r]
        wd.ids = lambda r=r: {"call_id": r, "chunk_index": 1, "cache_epoch": 0,
                              "group": "world_pg(p2p)"}
        wd.group_sizes = sizes or {}
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


def test_the_odd_one_out_names_itself_and_the_others_wait_for_it(store):
    """Three members: the one alone in its collective sets the flag to its own cause
    (its ids, via=own); the two that agree never set it, they read it."""
    probes = {0: "mesh_pg 5 broadcast", 1: f"mesh_pg 5 {GEN}", 2: "mesh_pg 5 broadcast"}
    dogs, released = _pair(store, "odd", probes, world=3, sizes={"mesh_pg": 3})
    for wd in dogs:
        wd.join(10)
    assert set(released) == {0, 1, 2}, released
    cause = released[1][0]
    assert all(c == cause for c, _ in released.values()), released
    assert cause["rank"] == 1 and cause["call_id"] == 1, cause     # its own ids
    assert cause["detail"].endswith("seen by rank 1"), cause
    assert "rank 1 issued an extra collective or skipped one" in cause["detail"], cause
    assert {r: via for r, (_, via) in released.items()} == \
        {0: "abort_flag", 1: "own", 2: "abort_flag"}


def test_without_the_odd_ones_watchdog_the_others_name_it_after_the_wait(store):
    """The odd one's watchdog is gone (its wait key stays, as a stuck rank's would): a
    member that agrees sets the flag once ODD_ONE_OUT_S has passed, naming the odd one
    out, and is released by the flag it set (via=abort_flag: not its own failure)."""
    from torch.distributed import TCPStore
    peer = TCPStore("127.0.0.1", store.port, None, False, timeout=timedelta(seconds=5))
    S.init_keys(peer, "late", 3)
    peer.set("lockstep/late/wait/1", f"mesh_pg 5 {GEN}")
    peer.set("lockstep/late/role/1", "leader")
    probes = {0: "mesh_pg 5 broadcast", 2: "mesh_pg 5 broadcast"}
    t0 = time.monotonic()
    dogs, released = _pair(store, "late", probes, world=3, sizes={"mesh_pg": 3})
    try:
        for wd in dogs:
            wd.join(10)
        took = time.monotonic() - t0
        assert set(released) == {0, 2}, released
        cause = released[0][0]
        assert released[2][0] == cause and cause["rank"] == 1, released
        assert cause["role"] == "leader", cause
        assert {via for _, via in released.values()} == {"abort_flag"}, released
        assert S.ODD_ONE_OUT_S <= took < S.ODD_ONE_OUT_S + 5, took
    finally:
        peer.set("lockstep/late/abort", "stop")   # any dog still up is released
        for wd in dogs:
            wd.join(5)
