"""The sources of a run agree (conformance/sources.py): each rule rejects a hand-corrupted
committed trace at the right file and line, and accepts the legal variant."""
import json
import shutil
from pathlib import Path

from lockstep.conformance.report import conform

TRACES = Path(__file__).resolve().parent.parent / "traces"


def copy(tmp_path, name) -> Path:
    d = tmp_path / name
    shutil.copytree(TRACES / name, d)
    return d


def sources(rep):
    return next(v for v in rep.verdicts if v.name == "sources_agree")


def test_exit_ok_with_missing_exit_event_is_rejected(tmp_path):
    d = copy(tmp_path, "cpu_gloo_pp0")
    assert sources(conform(d)).status == "ok"          # the legal variant
    lines = (d / "rank1.jsonl").read_text().splitlines(True)
    k = max(j for j, x in enumerate(lines) if '"op":"exit"' in x)
    (d / "rank1.jsonl").write_text("".join(lines[:k]))
    v = sources(conform(d))
    assert v.status == "violated" and "rank1.err says exit=ok" in v.detail
    assert f"rank1.jsonl line {k}" in v.detail


def test_cut_line_only_for_a_killed_rank(tmp_path):
    d = copy(tmp_path, "cpu_gloo_pp0")
    text = (d / "rank1.jsonl").read_text()
    (d / "rank1.jsonl").write_text(text + '{"dst":"x","ev":"st')
    v = sources(conform(d))
    assert v.status == "violated" and "cut short" in v.detail
    k = copy(tmp_path, "cpu_gloo_kill_worker")        # legal: the killed rank's cut
    rep = conform(k)
    assert sources(rep).status == "ok", sources(rep).detail


def test_outputs_agree_with_decodes(tmp_path):
    d = copy(tmp_path, "cpu_gloo_pp0")
    outs = json.loads((d / "outputs.json").read_text())
    outs[1][0] += 1
    (d / "outputs.json").write_text(json.dumps(outs))
    v = sources(conform(d))
    assert v.status == "violated" and "outputs.json entry 1" in v.detail
    outs[1][0] -= 1
    (d / "outputs.json").write_text(json.dumps(outs[:-1]))
    v = sources(conform(d))
    assert v.status == "violated" and "outputs" in v.detail


def test_run_json_backend_agrees(tmp_path):
    d = copy(tmp_path, "cpu_gloo_pp0")
    meta = json.loads((d / "run.json").read_text())
    meta["opts"]["backend"] = "nccl"
    (d / "run.json").write_text(json.dumps(meta))
    v = sources(conform(d))
    assert v.status == "violated" and "line 1: backend 'gloo'" in v.detail


def test_missing_rank_file_is_the_headline(tmp_path):
    d = copy(tmp_path, "cpu_gloo_pp0")
    (d / "rank1.jsonl").unlink()
    rep = conform(d)
    assert rep.headline.startswith("MISSING TRACE rank1.jsonl")
    from lockstep.conformance.report import format_report
    assert format_report(rep).startswith("MISSING TRACE")


def test_the_launchers_record_names_a_deadline_kill_and_decides_nothing(tmp_path):
    """A rank killed at the hard deadline writes nothing: RUN_DIR/launch.json (the local
    launcher's) names it in the failure mode; the verdict is the traces' alone."""
    d = copy(tmp_path, "cpu_gloo_kill_worker")
    before = conform(d)
    assert before.failure_mode == "orphan: kill -9 of worker (rank 3)"
    (d / "launch.json").write_text(json.dumps({"deadline_s": 8.0, "deadline_hit": True,
                                               "killed_at_deadline": [3]}))
    after = conform(d)
    assert after.ok == before.ok and "orphan" not in after.failure_mode
    assert "the launcher's hard deadline (8 s) killed worker (rank 3)" in after.failure_mode
    (d / "launch.json").write_text("{not json")               # unreadable: ignored
    assert conform(d).failure_mode == before.failure_mode


def test_a_local_run_writes_its_launch_record(tmp_path):
    from lockstep.model.config import Config
    from lockstep.runtime.run import run_local
    (tmp_path / "launch.json").write_text('{"killed_at_deadline": [0, 1]}')   # stale
    res = run_local(Config(mesh=1, chunks=2), {}, tmp_path, deadline_s=60)
    assert res.ok, res.summary()
    rec = json.loads((tmp_path / "launch.json").read_text())
    assert rec["deadline_hit"] is False and rec["killed_at_deadline"] == []
    assert rec["returncodes"] == [0, 0] and rec["deadline_s"] == 60


def _drop_exit_line(p: Path) -> None:
    p.write_text("".join(ln for ln in p.read_text().splitlines(True)
                         if not ln.startswith("lockstep: rank=")))


def test_an_err_without_its_exit_line_is_named_unless_the_rank_was_killed(tmp_path):
    """Every ending but kill -9 and a release writes the rank's exit line
    (runtime/worker_main.py): a .err without one, next to a trace that ends with an exit
    step, is a run directory whose files disagree (it conformed)."""
    d = copy(tmp_path, "cpu_gloo_pp0")
    _drop_exit_line(d / "rank1.err")
    v = sources(conform(d))
    assert v.status == "violated", v.detail
    assert "rank1.err has no exit line" in v.detail and "rank1.jsonl line" in v.detail
    k = copy(tmp_path, "cpu_gloo_kill_worker")       # released ranks, rank 3 killed
    (k / "rank3.err").write_text("")                  # legal: the killed rank's .err
    assert sources(conform(k)).status == "ok", sources(conform(k)).detail
    # legal too: a released rank (its watchdog's forced exit, release_grace_s after the
    # release event, beats the line when the process stalls)
    _drop_exit_line(k / "rank1.err")
    assert sources(conform(k)).status == "ok", sources(conform(k)).detail


def test_an_exit_line_of_another_rank_or_of_no_kind_is_named(tmp_path):
    d = copy(tmp_path, "cpu_gloo_pp0")
    a, b = (d / "rank0.err").read_text(), (d / "rank1.err").read_text()
    (d / "rank0.err").write_text(b)
    (d / "rank1.err").write_text(a)
    v = sources(conform(d))
    assert v.status == "violated" and "rank0.err: its exit line is of rank 1" in v.detail
    (d / "rank0.err").write_text(a.replace("exit=ok", "exit=fine"))
    (d / "rank1.err").write_text(b)
    v = sources(conform(d))
    assert v.status == "violated" and "rank0.err: exit=fine is not an exit kind" in v.detail


def test_outputs_json_missing_after_rank0s_exit_step_is_named(tmp_path):
    """rank0 writes outputs.json whenever it exits through its table; only a rank0 that
    was killed (or released) leaves none (it conformed without one). Older recordings
    kept none: only a run of the local launcher (its launch.json) is held to it."""
    d = copy(tmp_path, "cpu_gloo_pp0")
    (d / "outputs.json").unlink()
    assert sources(conform(d)).status == "ok"
    (d / "launch.json").write_text(json.dumps({"killed_at_deadline": [],
                                               "returncodes": [0, 0]}))
    v = sources(conform(d))
    assert v.status == "violated" and "outputs.json: missing" in v.detail
    k = copy(tmp_path, "cpu_gloo_kill_rank0")        # legal: rank0 killed
    assert not (k / "outputs.json").exists()
    assert sources(conform(k)).status == "ok", sources(conform(k)).detail


def test_launch_json_returncodes_agree_with_the_exit_lines(tmp_path):
    """The local launcher's returncodes are each rank's exit status: one that is not the
    status of the rank's exit line's kind (model/release.py EXIT_CODES) is named; a rank
    the launcher killed itself is not compared; an unreadable launch.json is a warning
    naming the file (it decides nothing) and a missing .err of a rank it started an
    error."""
    d = copy(tmp_path, "cpu_gloo_pp0")
    rec = {"deadline_s": 60.0, "deadline_hit": False, "killed_at_deadline": [],
           "signalled": [], "returncodes": [0, 0], "wall_s": 3.0}
    (d / "launch.json").write_text(json.dumps(rec))
    assert sources(conform(d)).status == "ok", sources(conform(d)).detail
    (d / "launch.json").write_text(json.dumps(dict(rec, returncodes=[0, 1])))
    v = sources(conform(d))
    assert v.status == "violated" and "launch.json: field 'returncodes': rank 1 exited 1, " \
        "but rank1.err says exit=ok (status 0)" in v.detail
    (d / "launch.json").write_text(json.dumps(dict(rec, returncodes=[0, 1],
                                                   killed_at_deadline=[1])))
    assert "returncodes" not in sources(conform(d)).detail
    (d / "launch.json").write_text(json.dumps(rec))
    (d / "rank1.err").unlink()
    v = sources(conform(d))
    assert v.status == "violated" and "rank1.err: missing, but launch.json" in v.detail
    (d / "launch.json").write_text("\x00garbage{")
    rep = conform(d)
    assert rep.ok and any(w.startswith("launch.json: not readable JSON")
                          for w in rep.warnings), rep.warnings


def test_exit_codes_are_the_runtimes():
    from lockstep.model.release import EXIT_CODES
    from lockstep.runtime import worker_main as W
    assert EXIT_CODES == {"ok": W.EXIT_OK, "error": W.EXIT_ERROR,
                          "released": W.EXIT_RELEASED}
