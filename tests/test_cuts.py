"""Hard cuts at any moment (issue 14): the schedule forms, the control interface (another
thread or process asks rank0 for a cut), the bound, and the per-call data released when a
cut flushes or a stale result is dropped. Multi-process runs have a hard deadline (the
launcher kills every child)."""
import json
import random
import threading
import time

import pytest

from lockstep.conformance.load import step_views
from lockstep.conformance.report import conform
from lockstep.model.config import Config
from lockstep.model.guards import Rank0Vars
from lockstep.model.policy import Policy, cuts_due
from lockstep.model.runopts import CutSchedule, RunOptions, legacy_cut_at
from lockstep.runtime.control import ControlWatcher, CutControl, CutRefused, \
    request_cut_file
from lockstep.runtime.run import run_local

DEADLINE_S = 60


def _steps(run_dir, rank):
    return step_views(run_dir, rank)


def test_schedule_forms_and_the_legacy_one_cut_form():
    s = CutSchedule(at=(7, 3, 7), every=4)
    assert s.chunks_at(10) == (3, 4, 7, 7, 8)
    r = CutSchedule(random=0.3, seed=5)
    assert r.chunks_at(50) == CutSchedule(random=0.3, seed=5).chunks_at(50)
    assert r.chunks_at(50) != CutSchedule(random=0.3, seed=6).chunks_at(50)
    old = RunOptions.from_dict({"hard_cut_at": 20})
    assert old.cuts.at == (20,) and legacy_cut_at(old.to_dict()) == 20
    assert RunOptions.from_dict(old.to_dict()) == old
    with pytest.raises(ValueError, match="opts.cuts.every"):
        RunOptions.from_dict({"cuts": {"every": 0}})
    with pytest.raises(ValueError, match="opts.cuts: unknown"):
        RunOptions.from_dict({"cuts": {"evry": 3}})


def test_policy_counts_due_cuts_back_to_back_and_in_drain():
    p = Policy(cuts=(3, 3, 5), chunks=5)
    v = Rank0Vars(next_chunk=3)
    assert cuts_due(v, p) == 2                                    # two back to back
    assert cuts_due(v._replace(cuts=2), p, requested=1) == 3      # plus one from outside
    assert cuts_due(Rank0Vars(next_chunk=5), p) == 2              # 5 = the drain cut...
    assert cuts_due(Rank0Vars(next_chunk=5, terminal_queued=True), p) == 3   # ...once draining


def test_a_run_beyond_the_models_bound_is_refused_before_any_rank_starts(tmp_path):
    with pytest.raises(ValueError, match="Config.hard_cut allows 1"):
        run_local(Config(mesh=1, chunks=6, hard_cut=1), {"cuts": {"at": [2, 4]}}, tmp_path)
    assert not list(tmp_path.glob("rank*"))


def test_control_refuses_beyond_its_budget_and_a_file_request_is_answered(tmp_path):
    c = CutControl(budget=1)
    w = ControlWatcher(tmp_path, c)
    w.start()
    try:
        assert request_cut_file(tmp_path, "reset", wait_s=5.0) == "taken"
        got = request_cut_file(tmp_path, "prompt_change", wait_s=5.0)
        assert got.startswith("refused") and "allows 1 cut" in got
    finally:
        w.stop()
    assert c.requested == 1 and c.take_reason() == "reset" and c.take_reason() is None
    with pytest.raises(CutRefused, match="unknown cut reason"):
        c.request_cut("because")


@pytest.mark.parametrize("body", [b"[1]", b'{"reason": ["reset"]}', b'{"reason": 5}', b"null",
                                  b'"reset"', b"\xff\xfe", b"{"])
def test_a_malformed_request_file_is_refused_and_the_watcher_goes_on(tmp_path, body):
    """A hand-written or foreign file in RUN_DIR/control/ raised out of poll_once (an
    AttributeError for a JSON list), ending rank0's watcher thread: every later request
    then stayed pending. It is refused like a bad reason, and the next one is taken."""
    c = CutControl(budget=1)
    (tmp_path / "control").mkdir()
    (tmp_path / "control" / "cut-00000000000000000001-1-1.json").write_bytes(body)
    w = ControlWatcher(tmp_path, c)
    assert w.poll_once() == 1
    assert (tmp_path / "control" / "cut-00000000000000000001-1-1.json.refused").exists()
    w.start()
    try:
        assert request_cut_file(tmp_path, "reset", wait_s=5.0) == "taken"
    finally:
        w.stop()
    assert c.take_reason() == "reset"


def test_cuts_at_random_moments_through_the_control_interface_conform(tmp_path):
    """A seeded thread of the test process asks rank0 (another process) for cuts at
    random moments through RUN_DIR/control; every one taken is a model row, the run
    conforms, and every envelope after a cut starts a fresh cache."""
    rng = random.Random(14)
    budget = 8
    cfg = Config(mesh=2, chunks=60, hard_cut=budget + 2, steps=2)
    opts = {"cuts": {"at": [10, 10], "control": budget, "reason": "reset"},
            "costs": {"phase_b_ms": 5.0}}
    answers = []

    def cutter(run):
        # from the moment rank0 is past its handshake (not after a guess at start-up:
        # a start-up shorter than the guess let the run end before any cut)
        trace, end = tmp_path / "rank0.jsonl", time.monotonic() + DEADLINE_S
        while time.monotonic() < end and not (
                trace.exists() and b'"l":"parity_ok"' in trace.read_bytes()):
            time.sleep(0.01)
        for _ in range(budget):
            time.sleep(rng.uniform(0.0, 0.08))
            answers.append(request_cut_file(tmp_path, rng.choice(("prompt_change", "reset")),
                                            wait_s=0.0))
    res = run_local(cfg, opts, tmp_path, deadline_s=DEADLINE_S, on_start=cutter)
    assert res.ok, res.summary()
    rep = conform(tmp_path)
    assert rep.ok, rep.divergence
    ev = _steps(tmp_path, 0)
    cuts = [e for e in ev if e["label"] in ("hard_cut", "hard_cut_in_drain")]
    taken = len(list((tmp_path / "control").glob("*.taken")))
    sources = [e["meas"]["cut_source"] for e in cuts]
    assert sources.count("schedule") == 2
    assert sources.count("control") == taken, (sources, taken)
    assert taken >= 1, "no control cut was taken before the run ended"
    # the plan bits of a cut: the first envelope after each cut has init_cache
    after_cut = False
    for e in ev:
        if e["label"] in ("hard_cut", "hard_cut_in_drain"):
            after_cut = True
        elif e["label"] == "build_envelope":
            assert e["msg"]["init_cache"] == (after_cut or e["msg"]["chunk"] == 0)
            after_cut = False
    outputs = json.loads((tmp_path / "outputs.json").read_text())
    assert [c for c, _, _ in outputs] == sorted({c for c, _, _ in outputs})


def test_cut_flush_and_stale_drops_release_rank0s_per_call_data():
    """The interpreter's per-call dictionaries keep nothing of a message the model's
    update removed from rank0's queues without sending or decoding it."""
    from lockstep.model.messages import message
    from lockstep.model.contract import Action
    from lockstep.runtime.interp import RankInterpreter
    it = RankInterpreter.__new__(RankInterpreter)
    it.env_frames, it.env_meta, it.times, it.results = {}, {}, {}, {}
    envs = [message(Action.INFER, k, k, 0, 2, False) for k in range(3)]
    for d in (it.env_frames, it.env_meta, it.times, it.results):
        d.update({k: object() for k in range(3)})
    before = Rank0Vars(send_q=(envs[2],), decode_q=(envs[0], envs[1]))
    it._release(before, before._replace(send_q=(), decode_q=(envs[1],)))  # cut + drop
    for d in (it.env_frames, it.env_meta, it.times, it.results):
        assert set(d) == {1}
    it._release(Rank0Vars(send_q=(envs[1],)), Rank0Vars(env_out=envs[1]))  # taken: kept
    assert set(it.env_frames) == {1}
