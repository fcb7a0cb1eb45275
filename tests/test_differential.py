"""Runtime against model (lockstep/differential.py): drawn configurations run on real gloo
(127.0.0.1, the launcher's hard deadline kills every child), their traces conform and
their outcome is one the model reaches; a wrong outcome is caught by the same check."""
import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings

from lockstep.conformance.load import load_config
from lockstep.conformance.report import conform
from lockstep.differential import cases, judge, model_outcomes, run_case, runtime_outcome

TRACES = Path(__file__).resolve().parent.parent / "traces"
DEADLINE_S = 60


# CI budget: 3 drawn configurations, the same ones every run (derandomize); the larger
# budget is `python -m lockstep.differential --examples 40` (docs/differential.md).
@settings(max_examples=3, derandomize=True, deadline=None, database=None,
          phases=[Phase.generate], suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_the_runtime_reaches_an_outcome_the_model_allows(case):
    with tempfile.TemporaryDirectory(prefix="lockstep-diff-") as tmp:
        v = run_case(case, Path(tmp), DEADLINE_S)
        assert not v["deadline_hit"], case.text()
        assert v["conforms"], f"{case.text()}: {v['verdict']}"
        assert v["allowed"], f"{case.text()}: {v['outcome'].text()} is not one of the " \
                             f"model's {v['model_outcomes']} outcomes"


@pytest.fixture(scope="module")
def cut_run(tmp_path_factory):
    """A committed run (mesh 2, 4 chunks, a hard cut after chunk 0) and its model's
    outcomes, copied so it can be corrupted."""
    src = TRACES / "cpu_gloo_cut_first"
    cfg, _ = load_config(src)
    return src, cfg, model_outcomes(cfg)


def _copy(src, tmp_path):
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def test_the_committed_run_is_allowed(cut_run):
    src, cfg, allowed = cut_run
    v = judge(cfg, src, allowed)
    assert v["conforms"] and v["allowed"], v["outcome"].text()
    assert v["outcome"].emitted == ((1, 1), (2, 1), (3, 1))   # chunk 0 dropped by the cut


@pytest.mark.parametrize("edit", ["drop_middle", "swap", "stale_epoch", "rank_error"])
def test_a_wrong_outcome_is_caught(cut_run, tmp_path, edit):
    """A hand-edited outputs.json (a chunk dropped, two swapped, a chunk emitted under
    the epoch the cut retired) or exit line is an outcome the model never reaches."""
    src, cfg, allowed = cut_run
    run = _copy(src, tmp_path)
    out = run / "outputs.json"
    outs = json.loads(out.read_text())
    if edit == "drop_middle":
        del outs[1]
    elif edit == "swap":
        outs[0], outs[1] = outs[1], outs[0]
    elif edit == "stale_epoch":
        outs[0][1] = 0
    else:
        err = run / "rank2.err"
        err.write_text(err.read_text().replace("exit=ok", "exit=error"))
    out.write_text(json.dumps(outs))
    v = judge(cfg, run, allowed)
    assert not v["allowed"], v["outcome"].text()


@pytest.mark.parametrize("run_dir", sorted(p.parent for p in TRACES.glob("*/run.json")),
                         ids=lambda p: p.name)
def test_exit_lines_read_as_the_replays_final_statuses(run_dir):
    """The runtime's outcome reads each rank's end from its exit line; on every committed
    run that reading is the replay's final status of that rank (kills included)."""
    cfg, _ = load_config(run_dir)
    rep = conform(run_dir)
    assert rep.ok
    assert runtime_outcome(run_dir, cfg.world).ends == \
        tuple(pr.status for pr in rep.result.state.procs)
