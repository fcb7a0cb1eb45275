"""Decisions are rows: choices and faults are row attributes, the scheduling policy is one
module (model/policy.py) the runtime and the simulator share."""
import re
from pathlib import Path

from lockstep.model import guards as g
from lockstep.model import policy as P
from lockstep.model.tables import shipped_rows

ROOT = Path(__file__).resolve().parents[1]


def _row(label):
    return next(r for rows in shipped_rows().values() for r in rows if r.label == label)


def test_choices_and_faults_are_marked_on_the_rows():
    rows = [r for rs in shipped_rows().values() for r in rs]
    faults = {r.effect for r in rows if r.choice == "fault"}
    assert faults == {"rank0_preflight", "leader_reject", "wrong_group", "rank0_bad_envelope",
                      "leader_bad_result"}
    assert {r.effect for r in rows if r.choice == "env"} == {"hard_cut", "heartbeat"}
    assert all(r.choice in ("", "env", "fault") for r in rows)
    # every row tagged "fault" is a fault choice and vice versa
    assert all(("fault" in r.tags) == (r.choice == "fault") for r in rows)


def test_policy_fires_faults_cuts_and_heartbeats_only_where_the_run_says():
    pre, cut, hb = _row("preflight_fails"), _row("hard_cut"), _row("queue_noop")
    v = g.Rank0Vars(next_chunk=3)
    off = P.Policy()
    assert not any(P.fires(r, v, 0, off, idle_ms=1e9) for r in (pre, cut, hb))
    on = P.Policy({"name": "rank0_preflight", "at_chunk": 3}, cuts=(3,),
                  heartbeat_ms=10)
    assert P.fires(pre, v, 0, on) and P.fires(cut, v, 0, on)
    assert not P.fires(pre, v._replace(next_chunk=2), 0, on)
    assert not P.fires(hb, v, 0, on, idle_ms=5) and P.fires(hb, v, 0, on, idle_ms=10)
    assert not P.fires(pre, v, 0, on._replace(fault={"name": "leader_reject"}))
    # a firing choice goes first; otherwise table order
    build = _row("build_envelope")
    assert P.choose_local([build, cut]) is cut and P.choose_local([build]) is build


def test_no_driver_decides_on_a_row_label():
    pat = re.compile(r"\.label\s*(==|!=|in\b)|label\s*==|LOCAL_ORDER|FAULT_ROWS")
    for path in sorted((ROOT / "runtime").glob("*.py")) + [ROOT / "conformance/simulate.py"]:
        hits = [ln for ln in path.read_text().splitlines() if pat.search(ln)
                and not ln.lstrip().startswith("#")]
        if path.name == "simulate.py":   # measurements only (overlap times), no choices
            hits = [h for h in hits if "label ==" not in h and "label in" not in h]
        assert not hits, f"{path.name}: {hits}"
