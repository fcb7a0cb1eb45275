"""The replayer's lookups, on every reachable state of shipped, buffered, crashing and
mutated models: Model.enabled_for (one row) is Model.enabled_of's entry for that row,
the index of every process together is Model.enabled minus the environment's
transitions, and Model.enabled_as (the recorded rows of one step) is exactly the
transitions of Model.enabled made of those rows, for every row and every pair of rows
at the state (guards false, kinds that do not match and partners that are not posted
give nothing)."""
from collections import deque

import pytest

from lockstep.model.config import Config
from lockstep.model.mutations import model_for, mutation_config
from lockstep.model.ops import MESH
from lockstep.model.semantics import LIVE

ENV = ("crash", "watchdog", "abort")


def states(m, limit):
    """Breadth-first reachable states (violations are not stepped)."""
    s0 = m.initial_state()
    seen, todo = {s0}, deque([s0])
    while todo and len(seen) < limit:
        s = todo.popleft()
        yield s
        for tr in m.enabled(s):
            if tr.kind == "violation":
                continue
            s2 = m.step(s, tr)
            if s2 not in seen:
                seen.add(s2)
                todo.append(s2)


def rows_at(m, s, p):
    pr = s.procs[p]
    for t, pc in enumerate(pr.pcs):
        for row in m.tables[p][t].get(pc, ()):
            yield t, row.label


def assert_same_index(m, s):
    every = m.enabled_of(s, range(m.n))
    for p, pr in enumerate(s.procs):
        if pr.status != LIVE:
            continue
        mine = m.enabled_of(s, (p,))
        for t, label in rows_at(m, s, p):
            want = mine.get((p, t, label), [])
            assert m.enabled_for(s, p, t, label) == want, (p, t, label)
            assert every.get((p, t, label), []) == want
        assert m.enabled_for(s, p, 0, "no such row") == []
    indexed = {tr for trs in every.values() for tr in trs}
    assert indexed == {tr for tr in m.enabled(s) if tr.kind not in ENV}
    assert_exact(m, s)


def labels(tr):
    return sorted((p, t, row.label) for p, t, row in tr.parts)


def assert_exact(m, s):
    made = [tr for tr in m.enabled(s) if tr.kind not in ENV + ("violation",)]
    steps = [(p, t, label) for p, pr in enumerate(s.procs) if pr.status == LIVE
             for t, label in rows_at(m, s, p)]
    asked = [[a] for a in steps] + [[a, b] for a in steps for b in steps if a[0] < b[0]]
    asked += [labels(tr) for tr in made]
    for want in asked:
        assert m.enabled_as(s, want) == [tr for tr in made if labels(tr) == sorted(want)], \
            want
        assert m.enabled_as(s, want[::-1]) == m.enabled_as(s, want)


CASES = [
    ("shipped", Config(mesh=2, chunks=2, hard_cut=True)),
    ("buffered", Config(mesh=2, chunks=2, p2p="buffered", eager=1)),
    ("crash", Config(mesh=2, chunks=1, faults=1)),
    ("one_label_two_rows", Config(mesh=2, chunks=2, cond_flag_all=True)),
    ("non_member", mutation_config(Config(mesh=2, chunks=1), "rank0_in_mesh_collective")),
    ("wrong_group", mutation_config(Config(mesh=2, chunks=1), "phase_b_on_world")),
    ("framing", mutation_config(Config(mesh=2, chunks=1), "second_thread_transport")),
    ("send_send", mutation_config(Config(mesh=2, chunks=2), "blocking_send_then_recv")),
    ("comms_bcast", mutation_config(Config(mesh=2, chunks=1), "comms_broadcasts_header")),
]


@pytest.mark.parametrize("name,cfg", CASES, ids=[c[0] for c in CASES])
def test_enabled_for_is_the_index_entry_on_every_reachable_state(name, cfg):
    m = model_for(cfg)
    n = 0
    for s in states(m, 1000):
        assert_same_index(m, s)
        n += 1
    assert n > 1          # non_member: its violation is at the first mesh collective


def test_a_collective_row_sees_a_non_member_on_its_group():
    """The rule reads every posted entry on the group, not only the members': with rank0
    in the mesh collective, the mesh members' rows get no collective (the membership
    violation is rank0's), although the members alone would make one."""
    cfg = Config(mesh=2, chunks=1)
    shipped, m = model_for(cfg), model_for(mutation_config(cfg, "rank0_in_mesh_collective"))
    for s in states(shipped, 5000):
        entries = [e for p in (1, 2) for g, e in m.posted(p, s.procs[p])[3] if g == MESH]
        if len({e[0] for e in entries}) == 2:
            break
    else:
        raise AssertionError("no state with the mesh in a collective was reached")
    members_only = []
    m._collective(s, MESH, entries, members_only)
    assert [tr.kind for tr in members_only] == ["coll"]
    r0 = s.procs[0]
    s = s._replace(procs=(r0._replace(pcs=("mesh_step",) + r0.pcs[1:]),) + s.procs[1:])
    assert [tr.info.prop for tr in m.enabled_for(s, 0, 0, "join_generator_collective")] == \
        ["collective_mismatch"]
    for p, t, row in entries:
        assert m.enabled_for(s, p, t, row.label) == []
    assert_same_index(m, s)
