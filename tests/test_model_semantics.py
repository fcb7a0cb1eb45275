"""Each semantic rule of model.semantics, with a case where it holds and one where it is
violated and caught."""
import pytest

from lockstep.model.config import Config
from lockstep.model.explore import explore
from lockstep.model.mutations import model_for, mutation_config
from lockstep.model.ops import MESH, WORLD
from lockstep.model.semantics import ABORTED, CRASHED, LIVE


def run(cfg, **kw):
    return explore(model_for(cfg), **kw)


def walk(m, s, pick):
    """Follow the first enabled transition for which pick(tr) holds."""
    for tr in m.enabled(s):
        if pick(tr):
            return m.step(s, tr), tr
    raise AssertionError("no such transition enabled")


def test_rendezvous_send_send_deadlocks_and_posted_receive_prevents_it():
    bad = mutation_config(Config(mesh=2, chunks=2), "blocking_send_then_recv")
    r = run(bad)
    assert r.verdict == "deadlock"
    assert "neither has a receive posted" in r.violation.detail
    assert run(Config(mesh=2, chunks=2, p2p="rendezvous")).verdict == "clean"


def test_buffered_p2p_one_eager_message_does_not_save_blocking_send():
    bad = mutation_config(Config(mesh=2, chunks=2), "blocking_send_then_recv")
    # the header goes into the buffer, the payload blocks: still a deadlock
    assert run(bad.with_(p2p="buffered", eager=1)).verdict == "deadlock"
    # enough buffering hides the bug (which is why the model checks rendezvous)
    assert run(bad.with_(p2p="buffered", eager=4)).verdict == "clean"


def test_collective_fires_only_when_every_member_has_entered():
    m = model_for(Config(mesh=3, chunks=1))
    s = m.initial_state()
    colls = [tr for tr in m.enabled(s) if tr.kind == "coll"]
    assert len(colls) == 1 and len(colls[0].parts) == 4   # world_pg: rank0 + 3 mesh
    s, _ = walk(m, s, lambda tr: tr.kind == "coll")
    assert s.seq == (1, 0)
    # the mesh now waits in a broadcast; nothing mesh-wide fires until the leader joins
    assert not [tr for tr in m.enabled(s) if tr.kind == "coll"]


def test_collective_on_another_group_is_a_mismatch():
    r = run(mutation_config(Config(mesh=2, chunks=1), "phase_b_on_world"))
    assert r.verdict == "collective_mismatch"
    assert WORLD in r.violation.detail and MESH in r.violation.detail


def test_collective_by_a_non_member_is_an_error():
    r = run(mutation_config(Config(mesh=2, chunks=1), "rank0_in_mesh_collective"))
    assert r.verdict == "collective_mismatch"
    assert "not a member of mesh_pg" in r.violation.detail


def test_different_ops_at_one_sequence_number_is_a_mismatch():
    r = run(mutation_config(Config(mesh=2, chunks=1), "broadcast_before_validate"))
    assert r.verdict == "collective_mismatch"
    assert "broadcast" in r.violation.detail and "all_gather" in r.violation.detail


def test_crash_is_released_by_watchdog_and_abort_flag():
    m = model_for(Config(mesh=2, chunks=1, faults=1))
    s = m.initial_state()
    s, _ = walk(m, s, lambda tr: tr.kind == "coll")               # handshake
    s, _ = walk(m, s, lambda tr: tr.kind == "crash" and tr.parts[0][0] == 2)
    assert s.procs[2].status == CRASHED and s.faults_left == 0
    assert not [tr for tr in m.enabled(s) if tr.kind == "crash"]  # budget spent
    s, tr = walk(m, s, lambda tr: tr.kind == "watchdog")
    assert "worker1" in s.abort
    assert [t.kind for t in m.enabled(s)] == ["abort"]           # the abort preempts
    s, _ = walk(m, s, lambda tr: tr.kind == "abort")
    assert {p.status for p in s.procs[:2]} == {ABORTED}
    assert m.enabled(s) == []


def test_crash_without_watchdog_is_a_crash_hang():
    r = run(mutation_config(Config(mesh=2, chunks=1), "no_watchdog"))
    assert r.verdict == "crash_hang"
    assert "CRASHES" in r.steps[0]


@pytest.mark.parametrize("mesh", [1, 2, 3])
def test_every_single_crash_is_released_in_the_shipped_protocol(mesh):
    assert run(Config(mesh=mesh, chunks=2, hard_cut=True, faults=1)).verdict == "clean"


def test_framing_error_when_two_threads_use_the_transport():
    r = run(mutation_config(Config(mesh=1, chunks=1), "second_thread_transport"))
    assert r.verdict == "framing_error"
    assert "rank0.main" in r.violation.detail


def test_step_is_pure():
    m = model_for(Config(mesh=2, chunks=2))
    s = m.initial_state()
    trs = m.enabled(s)
    assert m.step(s, trs[0]) == m.step(s, trs[0])
    assert s == m.initial_state()


def test_counters_are_not_bounded_by_the_semantics():
    """Replaying 40 chunks through a configuration that allows them just works."""
    m = model_for(Config(mesh=2, chunks=40, d_in=2, d_out=2))
    s, steps = m.initial_state(), 0
    while True:
        trs = [t for t in m.enabled(s) if t.kind not in ("crash",)]
        if not trs:
            break
        s = m.step(s, trs[0])
        steps += 1
    assert all(p.status == "ok" for p in s.procs)
    assert s.seq[1] >= 40 * 4


def test_output_order_violation_is_caught_on_the_emit_transition():
    """No shipped path reorders outputs; a crafted state where chunk 0 waits in the
    decode queue after chunk 1 was emitted shows the property firing."""
    from lockstep.model.guards import INFER, Msg
    from lockstep.model.properties import check_transition
    from lockstep.model.semantics import Proc, Tr
    m = model_for(Config(mesh=2, chunks=2))
    s = m.initial_state()
    r0 = s.procs[0]
    v = r0.v._replace(decode_q=(Msg(INFER, 0, 0, 0, m.cfg.calls),), last_emitted=1,
                      built=2, emitted=1)
    s = s._replace(procs=(Proc(r0.status, ("run", "idle/idle"), v),) + s.procs[1:])
    tr = next(t for t in m.enabled(s) if t.kind == "local"
              and t.parts[0][2].label == "decode_result")
    viol = check_transition(m, s, tr, m.step(s, tr))
    assert viol is not None and viol.prop == "output_order"
    assert "chunk 0 emitted after chunk 1" in viol.detail


def _reachable(m):
    """Every reachable state and every fired (state, transition) pair, small configs."""
    seen, todo, fired = {m.initial_state()}, [m.initial_state()], []
    while todo:
        s = todo.pop()
        for tr in m.enabled(s):
            if tr.kind == "violation":
                continue
            fired.append((s, tr))
            s2 = m.step(s, tr)
            if s2 not in seen:
                seen.add(s2)
                todo.append(s2)
    return seen, fired


def _labels(tr):
    return {row.label for _, _, row in tr.parts}


def test_several_hard_cuts_back_to_back_and_during_drain_are_explored_and_clean():
    cfg = Config(mesh=1, chunks=2, hard_cut=2)
    m = model_for(cfg)
    _, fired = _reachable(m)
    cuts = [(s, tr) for s, tr in fired if _labels(tr) & {"hard_cut", "hard_cut_in_drain"}]
    assert any("hard_cut_in_drain" in _labels(tr) for _, tr in cuts)
    back_to_back = [s for s, tr in cuts
                    if "hard_cut" in _labels(tr) and s.procs[0].v.cuts == 1
                    and s.procs[0].v.built == 0]
    assert back_to_back, "a second cut right after the first (nothing built) is explored"
    assert max(s.procs[0].v.cuts for s, _ in cuts) == 1   # never a third: the bound holds
    assert run(cfg).verdict == "clean"


def test_the_epoch_filter_is_still_needed_with_two_cuts():
    bad = mutation_config(Config(mesh=2, chunks=3, hard_cut=2), "no_epoch_filter")
    assert bad.hard_cut == 2
    assert run(bad).verdict == "stale_epoch_decode"


def test_model_refuses_tables_that_are_not_its_configs():
    """The caller hands the tables over: a mutated config with the shipped rows (or the
    reverse) is a clear error, never a silent check of the wrong protocol."""
    from lockstep.model.semantics import Model
    from lockstep.model.tables import shipped_tables
    mutated = mutation_config(Config(mesh=2, chunks=2), "no_epoch_filter")
    with pytest.raises(ValueError, match="names mutation 'no_epoch_filter' but the "
                                         "tables are 'the shipped ones'"):
        Model(mutated, shipped_tables())
    with pytest.raises(ValueError, match="'no_epoch_filter'"):
        Model(Config(mesh=2, chunks=2), model_for(mutated).source)
    with pytest.raises(TypeError, match="must be a model.tables.Tables"):
        Model(Config(), shipped_tables().rows)


def test_the_conditional_collective_runs_when_every_rank_has_the_flag():
    """cond_flag_all sets the flag on every rank (rank0's parity key included): the
    handshake passes and every mesh rank runs the conditional collective. The cond_flag
    fault flips one rank's flag: the handshake refuses before any chunk."""
    cfg = Config(mesh=3, chunks=1, cond_flag_all=True)
    _, fired = _reachable(model_for(cfg))
    labels = set().union(*(_labels(tr) for _, tr in fired))
    assert {"parity_ok", "conditional_collective"} <= labels
    assert "parity_mismatch" not in labels
    cond = [tr for _, tr in fired if "conditional_collective" in _labels(tr)]
    assert all(len(tr.parts) == cfg.mesh for tr in cond)    # every mesh rank, together
    assert run(cfg).verdict == "clean"
    odd = cfg.with_(inject=frozenset({"cond_flag"}))
    _, fired = _reachable(model_for(odd))
    labels = set().union(*(_labels(tr) for _, tr in fired))
    assert "parity_mismatch" in labels and "conditional_collective" not in labels
    plain = set().union(*(_labels(tr) for _, tr in _reachable(
        model_for(cfg.with_(cond_flag_all=False)))[1]))
    assert "conditional_collective" not in plain
