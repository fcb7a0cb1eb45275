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
