"""model.release.committed_exits: the states from which a thread's only way out is one
own failure (the runtime records the root cause there, runtime/node.py)."""
from lockstep.model.config import Config
from lockstep.model.release import committed_exits
from lockstep.model.semantics import Model
from lockstep.model.tables import THREADS, shipped_tables


def _committed(role, thread):
    m = Model(Config(mesh=3), shipped_tables())
    p = m.roles.index(role)
    return committed_exits(m.tables[p][THREADS[role].index(thread)])


def test_the_leader_is_committed_from_the_moment_it_broadcasts_its_error():
    c = _committed("leader", "main")
    assert c["notify_rank0"] == c["exit_err"] == ("error", "envelope rejected")
    assert c["count_fail"][1] == "generator call counts differ across the mesh"
    assert "bcast_hdr" not in c          # it may still broadcast an INFER, NOOP, SHUTDOWN


def test_a_state_that_loops_until_its_exit_is_committed_and_echo_exits_never_are():
    assert _committed("rank0", "main")["failing"] == ("error", "rank0 failed")
    # rank0's comms exits on the leader's ERROR result: an echo, never rank0's own cause
    assert not _committed("rank0", "comms")
    assert set(_committed("worker", "main")) <= {"exit", "exit_count"}   # parity, counts


def test_a_state_with_another_way_out_is_not_committed():
    from lockstep.model.ops import Exit, Local, Row
    table = {"a": [Row("main", "a", "fail", Exit("error", "boom"), "exit"),
                   Row("main", "a", "go_on", Local("work"), "b")],
             "b": [Row("main", "b", "finish", Exit("ok", "done"), "exit")],
             "c": [Row("main", "c", "to_a", Local("work"), "a")],
             "d": [Row("main", "d", "to_e", Local("work"), "e")],
             "e": [Row("main", "e", "fail", Exit("abort", "refused"), "exit")]}
    assert committed_exits(table) == {"d": ("abort", "refused"), "e": ("abort", "refused")}
