"""Reductions of the explorer and the claims they rest on: partial-order reduction and
abort-chain compression agree with the full search (on every manifest configuration
and every mutation), a deliberately unsound reduction is caught by the same check, the
multiprocess search agrees with the serial one, and verdicts carry across mesh sizes
with state counts that grow as predicted (docs/model-check.md, "Every mesh size")."""
import pytest

import lockstep.model.explore as explore_mod
import lockstep.model.reduction as reduction
from lockstep.model.check import manifest_entries
from lockstep.model.config import Config
from lockstep.model.crosscheck import compare, spin_available
from lockstep.model.explore import _search, explore
from lockstep.model.meter import Meter
from lockstep.model.mutations import MUTATIONS, model_for, mutation_config
from lockstep.model.semantics import Model

ENTRIES = manifest_entries() + [
    (f"{n}_faults1", mutation_config(Config(mesh=2, chunks=2, faults=1), n))
    for n in MUTATIONS] + [
    (f"{n}_faults2", mutation_config(Config(mesh=3, chunks=2, hard_cut=True, faults=2), n))
    for n in MUTATIONS]


def _raw(cfg, por, symmetry=True):
    """One search, with no re-search: what the reduction alone concludes."""
    return _search(model_for(cfg), symmetry, Meter(False), 0, por, por)


@pytest.mark.parametrize("cfg", [c for _, c in ENTRIES], ids=[n for n, _ in ENTRIES])
def test_reduced_and_unreduced_searches_agree(cfg):
    red, full = _raw(cfg, True), _raw(cfg, False)
    assert (red.verdict == "clean") == (full.verdict == "clean"), (red.verdict,
                                                                   full.verdict)
    if full.verdict == "clean":
        assert red.states <= full.states
    else:   # what is printed: the unreduced verdict and a shortest counterexample
        printed = explore(model_for(cfg))
        assert printed.verdict == full.verdict and printed.steps == full.steps


def test_with_the_watchdog_on_the_reduced_search_takes_no_crash():
    """A crash is observable only as missing steps and through the watchdog's abort
    flag (model.reduction): the reduced search of a crash budget is the search
    without one, and the unreduced search with crashes has the same verdict (the
    agreement test above, on every configuration and mutation with a budget)."""
    cfg = Config(mesh=3, chunks=2, hard_cut=True, faults=2)
    red, none = _raw(cfg, True), _raw(cfg.with_(faults=0), True)
    assert (red.verdict, red.states, red.transitions) == \
        (none.verdict, none.states, none.transitions)
    full = _raw(cfg, False)
    assert full.states > 3 * red.states
    assert red.crash_free and not none.crash_free and not full.crash_free


def test_leaving_crashes_out_with_the_watchdog_off_is_caught(monkeypatch):
    """Without the watchdog a crash leaves its peers blocked (crash_hang): leaving the
    crashes out there would miss it, and the agreement check sees that."""
    cfg = mutation_config(Config(mesh=2, chunks=2), "no_watchdog")
    assert _raw(cfg, True).verdict == _raw(cfg, False).verdict == "crash_hang"
    monkeypatch.setattr(reduction.Ample, "crashes_unobservable", lambda self: True)
    assert _raw(cfg, True).verdict == "clean"


@pytest.mark.parametrize("cfg", [Config(mesh=3, chunks=2, faults=1),
                                 Config(mesh=2, chunks=2, p2p="buffered", hard_cut=True)],
                         ids=lambda c: c.describe())
def test_reduction_without_symmetry_agrees(cfg):
    assert _raw(cfg, True, symmetry=False).verdict == _raw(cfg, False, False).verdict


def test_reduction_shrinks_the_state_space():
    cfg = Config(mesh=3, chunks=2, hard_cut=True, faults=1)
    red, full = _raw(cfg, True), _raw(cfg, False)
    assert red.verdict == full.verdict == "clean"
    assert red.states < 0.7 * full.states


def test_an_unsound_reduction_is_caught_by_the_agreement_check(monkeypatch):
    """Expanding one process's transitions without asking whether the group is closed
    (rank0's main thread steps ahead of its comms thread's receive) misses real
    violations: the agreement test above would fail for such a reduction."""
    def unsound(self, s, trs, pids):
        if s.abort or len(trs) < 2:
            return trs
        for p in range(len(s.procs)):
            amp = [t for t in trs if t.parts and all(x[0] == p for x in t.parts)]
            if amp and len(amp) < len(trs) and any(t.kind != "crash" for t in amp):
                return amp
        return trs
    monkeypatch.setattr(reduction.Ample, "__call__", unsound)
    cfg = mutation_config(Config(mesh=2, chunks=2), "unbounded_decode_queue")
    assert _raw(cfg, False).verdict == "queue_bound"
    assert _raw(cfg, True).verdict == "clean"


@pytest.mark.parametrize("cfg", [Config(mesh=4, d_in=2, d_out=2, chunks=3, hard_cut=True,
                                        faults=1),
                                 Config(mesh=2, chunks=2, p2p="buffered", noops=1),
                                 mutation_config(Config(mesh=2, chunks=2),
                                                 "unbounded_decode_queue")],
                         ids=lambda c: c.describe())
def test_lone_steps_change_no_count_and_spare_enabled(cfg, monkeypatch):
    """A lone step is the ample set the ordinary choice would make (a closed group
    with one transition), found without `enabled`: the same states, transitions and
    verdict, with `enabled` computed in far fewer states."""
    calls = []
    enabled = Model.enabled
    monkeypatch.setattr(Model, "enabled", lambda self, s: calls.append(1) or enabled(self, s))
    fast = _raw(cfg, True)
    with_lone = len(calls)
    monkeypatch.setattr(reduction.Ample, "lone_step", lambda self, s, pids: None)
    calls.clear()
    slow = _raw(cfg, True)
    assert (fast.verdict, fast.states, fast.transitions) == \
        (slow.verdict, slow.states, slow.transitions)
    assert with_lone < 0.7 * len(calls), (with_lone, len(calls))


def test_a_lone_step_of_a_group_that_is_not_closed_is_caught(monkeypatch):
    """Taking a thread's one posted local row without `enabled` is sound only when its
    group is closed: taking it whenever a thread has one (rank0's main thread decodes
    ahead of its comms thread's queue_result) misses a real violation, and the
    agreement check sees it."""
    def any_thread(self, s, pids):
        if s.abort or s.faults_left:
            return None
        for p, pr in enumerate(s.procs):
            if pr.status == "live":
                local, sends, recvs, colls = self.model.posted(p, pr)
                busy = {e[1] for e in sends + recvs} | {e[1] for _g, e in colls}
                for t in range(len(pr.pcs)):
                    mine = [tr for tr in local if tr.parts[0][1] == t]
                    if len(mine) == 1 and t not in busy:
                        return mine[0]
        return None
    cfg = mutation_config(Config(mesh=2, chunks=2), "unbounded_decode_queue")
    assert _raw(cfg, True).verdict == _raw(cfg, False).verdict == "queue_bound"
    monkeypatch.setattr(reduction.Ample, "lone_step", any_thread)
    assert _raw(cfg, True).verdict == "clean"


@pytest.mark.parametrize("cfg", [Config(mesh=3, chunks=2, hard_cut=True, faults=1),
                                 Config(mesh=2, chunks=2, p2p="buffered", noops=1)],
                         ids=lambda c: c.describe())
def test_multiprocess_search_matches_the_serial_search(cfg):
    par = explore(model_for(cfg), workers=2)
    ser = explore(model_for(cfg), por=False)
    assert par.workers == 2
    assert (par.verdict, par.states, par.transitions, par.depth) == \
        (ser.verdict, ser.states, ser.transitions, ser.depth)


def test_multiprocess_search_finds_a_mutation_with_a_shortest_counterexample():
    cfg = mutation_config(Config(mesh=2, chunks=2), "no_epoch_filter")
    par, ser = explore(model_for(cfg), workers=2), explore(model_for(cfg), por=False)
    assert par.verdict == ser.verdict == MUTATIONS["no_epoch_filter"].expected
    assert par.steps == ser.steps


# ------------------------------------------------------------------ every mesh size

@pytest.mark.parametrize("base", [Config(chunks=2, faults=1), Config(chunks=2, hard_cut=True),
                                  Config(chunks=2, faults=2)], ids=lambda c: c.describe())
def test_state_counts_grow_affinely_in_the_mesh_size(base):
    """Workers move in lock-step through joint collectives; what tells two workers
    apart is which ones crashed (at most `faults`) and which have already taken their
    own exit step. So with symmetry the count is affine in the mesh size once there
    are more workers than faults (docs/model-check.md)."""
    counts = [_raw(base.with_(mesh=m), False).states for m in range(2, 7)]
    first = [b - a for a, b in zip(counts, counts[1:])]
    steady = first[max(0, base.faults - 1):]
    assert len(set(steady)) == 1, counts


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_mutation_verdicts_are_the_same_for_every_mesh_size(name):
    verdicts = {explore(model_for(mutation_config(Config(mesh=m, chunks=2), name))).verdict
                for m in range(2, 6)}
    assert verdicts == {MUTATIONS[name].expected}


def test_one_crash_per_twin_removes_transitions_not_states(monkeypatch):
    """Crashing either of two workers in the same state reaches one canonical state:
    the rule drops the duplicate crash, never a state. The same comparison catches a
    rule that drops a crash with no twin."""
    # The crashes themselves are expanded here: the rule is about them.
    monkeypatch.setattr(reduction.Ample, "leave_out_crashes", False)
    cfg = Config(mesh=4, chunks=2, faults=2)
    with_rule = _raw(cfg, True)
    monkeypatch.setattr(explore_mod, "one_crash_per_twin", lambda trs, base, lo, hi: trs)
    without = _raw(cfg, True)
    assert with_rule.states == without.states
    assert with_rule.transitions < without.transitions
    monkeypatch.setattr(explore_mod, "one_crash_per_twin", lambda trs, base, lo, hi: [
        t for t in trs if t.kind != "crash" or not lo <= t.parts[0][0] < hi])
    assert _raw(cfg, True).states < without.states


@pytest.mark.skipif(not spin_available(), reason="needs spin and a C compiler")
def test_the_spin_crosscheck_compares_unreduced_counts():
    """SPIN runs with -DNOREDUCE, so the lockstep count beside it must be the plain
    interleaving count (no symmetry, no partial-order reduction), not the default
    search's; the default search is reported beside it."""
    cfg = Config(mesh=2, chunks=2, hard_cut=True, faults=1)
    row = compare("cut_fault", cfg, coverage=False, cc_opt="-O0")
    unreduced = explore(model_for(cfg), symmetry=False, por=False)
    assert (row.lock.states, row.lock.por, row.lock.symmetry) == \
        (unreduced.states, False, False)
    assert row.lock_sym.states < row.lock.states and row.lock_sym.por
