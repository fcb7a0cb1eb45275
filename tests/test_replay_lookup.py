"""The replayer's lookups (`Model.enabled_as` from the recorded rows, then
`Model.enabled_for` for one row) give the verdicts, notes and
first-divergence reports that a replayer looking each step up in `Model.enabled_of`'s
whole index gives: on every committed trace and on hand-corrupted ones (a guard false,
a message altered, a collective out of its order, a buffered send and receive)."""
import json
from pathlib import Path

import pytest

from lockstep.conformance.load import load_run
from lockstep.conformance.replay import Replayer
from lockstep.conformance.simulate import simulate
from lockstep.model.config import Config

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = sorted(p.parent for pat in ("traces/*/run.json", "conformance/testdata/*/run.json")
                   for p in ROOT.glob(pat))


class IndexReplayer(Replayer):
    """The reference: every step looked up in the index of the ranks it involves."""

    def _exact(self, s, evs):
        return []

    def _candidates(self, s, ev):
        return self.m.enabled_of(s, (ev.rank,)).get((ev.rank, ev.t, ev.label), [])


def outcome(cls, run_dir):
    res = cls(load_run(run_dir), verify=True).replay()
    div = res.divergence.text() if res.divergence is not None else None
    return res.ok, res.steps, div, res.notes, [(k, v) for k, v, _ in res.violations]


def same(run_dir):
    fast = outcome(Replayer, run_dir)
    assert fast == outcome(IndexReplayer, run_dir)
    return fast


def test_the_reference_is_not_the_replayer():
    """The reference replayer really takes the other lookup."""
    assert IndexReplayer._candidates is not Replayer._candidates
    assert IndexReplayer._exact is not Replayer._exact


@pytest.mark.parametrize("run_dir", COMMITTED, ids=lambda p: p.name)
def test_committed_traces_replay_the_same(run_dir):
    same(run_dir)


def lines(d, rank):
    return [json.loads(x) for x in (d / f"rank{rank}.jsonl").read_text().splitlines()]


def put(d, rank, evs):
    nxt = {}
    for e in evs:
        if e.get("ev") == "step":
            e["i"] = nxt.get(e["thread"], 0)
            nxt[e["thread"]] = e["i"] + 1
    (d / f"rank{rank}.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evs))


def at(evs, label, n=0):
    return [k for k, e in enumerate(evs) if e.get("label") == label][n]


def test_a_guard_false_is_rejected_at_the_same_line_with_the_same_message(tmp_path):
    d = tmp_path / "d_in"
    simulate(Config(mesh=2, chunks=4), d, seed=1)
    evs = lines(d, 0)
    third, back = at(evs, "build_envelope", 2), at(evs, "recv_result_payload")
    evs.insert(back, evs.pop(third))      # a third envelope while two are in flight
    put(d, 0, evs)
    ok, _, div, _, _ = same(d)
    assert not ok and f"rank0.jsonl line {back + 1}" in div and "D_in = 2" in div


def test_an_altered_message_is_rejected_the_same(tmp_path):
    d = tmp_path / "msg"
    simulate(Config(mesh=2, chunks=3), d, seed=2)
    evs = lines(d, 1)
    k = at(evs, "recv_envelope_payload")
    evs[k]["msg"]["chunk"] += 1
    put(d, 1, evs)
    ok, _, div, _, _ = same(d)
    assert not ok and "leader recorded receiving" in div and "chunk: 1 (recorded)" in div


def test_a_collective_out_of_order_is_rejected_the_same(tmp_path):
    d = tmp_path / "coll"
    simulate(Config(mesh=3, chunks=3), d, seed=3)
    evs = lines(d, 3)
    colls = [k for k, e in enumerate(evs) if e.get("op") == "coll"]
    a, b = colls[2], colls[3]
    evs[a]["gseq"], evs[b]["gseq"] = evs[b]["gseq"], evs[a]["gseq"]
    put(d, 3, evs)
    ok, _, div, _, _ = same(d)
    assert not ok and div is not None


@pytest.mark.parametrize("p2p", ["rendezvous", "buffered"])
def test_simulated_runs_with_a_cut_and_a_crash_replay_the_same(tmp_path, p2p):
    cfg = Config(mesh=3, chunks=4, hard_cut=True, p2p=p2p, faults=1)
    d = tmp_path / p2p
    simulate(cfg, d, seed=4, crash=(1, 40))
    assert same(d)[2] is None
