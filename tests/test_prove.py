"""`lockstep prove` (model/prove.py): the shipped protocol proves, the guard mutations give
two-rank counterexamples, the group rules are violated by the mutations that break them,
and a mutated call-count formula is caught with an envelope the real validator accepts."""
import json

import pytest

from lockstep.model import contract as C
from lockstep.model import prove as P
from lockstep.model.mutations import MUTATIONS


@pytest.fixture(scope="module")
def shipped():
    return {o.name: o for o in P.prove_all()}


def test_shipped_protocol_proves_every_obligation(shipped):
    failed = [f"{o.name}: {o.detail}" for o in shipped.values() if not o.ok]
    assert not failed, "\n".join(failed)
    sections = {o.section for o in shipped.values()}
    assert sections == {"contract", "guards", "groups"}


def test_contract_obligations_cover_every_regime(shipped):
    for r in C.REGIMES:
        assert shipped[f"contract.calls_fixed[{r}]"].ok
        assert shipped[f"contract.calls_match_protocol[{r}]"].ok
    assert "R1/recompute=True: excluded by rule:r1_no_recompute" in \
        shipped["contract.envelope.consistent"].detail


def test_mutated_call_count_formula_gives_a_concrete_envelope(shipped):
    o = shipped["contract.mutant_caught[calls_off_by_one_r0a]"]
    assert o.ok and "calls_match_protocol[R0a]" in o.detail
    assert "regime=R0a" in o.counterexample[0]
    assert "mutant validator accepts it; shipped validator rejects it" in o.counterexample[-1]
    # the mutant is applied only for the duration of the proof
    assert C.expected_generator_calls("R0a", 4) == 5
    fails = [x for x in P.contract_obligations("calls_off_by_one_r0a") if not x.ok]
    # the R0a count leaves the table; at 1000 steps it also leaves the declared bounds
    assert [x.name for x in fails] == ["contract.calls_match_protocol[R0a]",
                                       "contract.bounds_cover_formula"]


def test_dropped_call_count_rule_breaks_the_fixed_count(shipped):
    o = shipped["contract.mutant_caught[no_call_count_rule]"]
    assert o.ok and len(o.counterexample) == 3
    a, b = o.counterexample[:2]
    assert a.split("expected_generator_calls=")[0] == b.split("expected_generator_calls=")[0]
    assert a != b
    assert len(C.ENVELOPE_RULES) == len({r.name for r in C.ENVELOPE_RULES}) >= 8


@pytest.mark.parametrize("name", P.GUARD_MUTANTS)
def test_guard_mutations_give_two_rank_counterexamples(name):
    fails = [o for o in P.guard_obligations(name) if not o.ok]
    assert fails, f"{name}: no pair of ranks diverges"
    o = fails[0]
    assert o.name.startswith("guards.same_collectives[")
    lines = o.counterexample
    assert any(line.startswith("replicated, equal on both:") for line in lines)
    assert any(line.startswith("per-rank (free in the proof), differing:")
               and "(none)" not in line for line in lines)
    nxt = [line.split("next: ")[1] for line in lines if "next: " in line]
    assert len(nxt) == 2 and nxt[0] != nxt[1], lines


def test_guard_mutant_obligations_report_the_counterexample(shipped):
    for name in P.GUARD_MUTANTS:
        assert shipped[f"guards.mutant_caught[{name}]"].ok
        assert shipped[f"guards.mutant_caught[{name}]"].counterexample


@pytest.mark.parametrize("mutation,rule", [
    ("phase_b_on_world", "phase_b_never_on_world"),
    ("rank0_in_mesh_collective", "rank0_never_in_mesh_collective")])
def test_group_rules_are_violated_by_the_mutations_that_break_them(mutation, rule):
    obs = {o.name: o for o in P.group_obligations(mutation)}
    o = obs[f"groups.{rule}[{mutation}]"]
    assert not o.ok and o.counterexample
    assert [n for n, x in obs.items() if not x.ok] == [o.name]
    assert mutation in P.group_rule_violators()[rule]


def test_every_group_rule_bites(shipped):
    for name in P.GROUP_RULES:
        assert shipped[f"groups.rule_bites[{name}]"].ok, name


def test_wrong_group_mutation_is_also_a_guard_divergence():
    fails = [o.name for o in P.guard_obligations("phase_b_on_world") if not o.ok]
    assert "guards.same_collectives[leader/worker*][phase_b_on_world]" in fails


def test_an_unmodelled_collective_guard_raises(monkeypatch):
    monkeypatch.delitem(P.GUARDS, "more_calls")
    with pytest.raises(P.UnmodelledGuard, match="more_calls"):
        P.guard_obligations()


def test_a_wrong_guard_model_is_caught_against_the_code(monkeypatch):
    monkeypatch.setitem(P.GUARDS, "more_calls", lambda v, cfg: v.calls_done + 2 < v.planned)
    o = P.check_models()
    assert not o.ok and "more_calls" in o.detail


def test_a_wrong_update_model_is_caught_against_the_code(monkeypatch):
    kind, deps = P.UPDATES["start_phase_b"]
    monkeypatch.setitem(P.UPDATES, "start_phase_b", (kind, {"planned": ("msg",)}))
    o = P.check_models()
    assert not o.ok and "calls_done" in o.detail


def test_concolic_executor_runs_check_code_on_symbols():
    """The executor forks on every symbolic comparison and on finite fields."""
    import z3
    x = z3.Int("x")

    def fn(path):
        s = P.Sym(x, path)
        if s + 1 > 3:
            return "big"
        return "small" if s >= 0 else "negative"
    paths = P._paths(fn, [])
    assert sorted(o for _, o in paths) == ["big", "negative", "small"]
    assert not P._sat(*[c for c, o in paths if o == "big"], x <= 2)


def test_cli(capsys):
    assert P.cli_prove("extra_generator_call", as_json=True) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and out["mutation"] == "extra_generator_call"
    assert P.cli_prove("not_a_mutation") == 2
    assert set(MUTATIONS) & set(P.CONTRACT_MUTANTS) == set()
