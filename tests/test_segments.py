"""Trace segments (issue 14 item 3): rollover, keep-last-K, checkpoints, suffix replay,
the compact line format, and each corruption caught at its file and line."""
import json
import shutil
from pathlib import Path

import pytest

from lockstep.conformance.load import TraceError, load_run
from lockstep.conformance.report import conform
from lockstep.model.config import Config
from lockstep.runtime.run import run_local

DEADLINE_S = 90
CHUNKS = 40


def _record(out: Path, **opts) -> Path:
    cfg = Config(mesh=3, d_in=2, d_out=2, chunks=CHUNKS, hard_cut=2, steps=2)
    res = run_local(cfg, {"cuts": {"at": [12, 25]}, **opts}, out, deadline_s=DEADLINE_S)
    assert res.ok, res.summary()
    return out


@pytest.fixture(scope="module")
def rolled(tmp_path_factory):
    """A mesh-3 gloo run whose traces roll over every 4 KB, every segment kept."""
    return _record(tmp_path_factory.mktemp("rolled"), trace_segment_mb=4 / 1024)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _lines(p: Path) -> list:
    return p.read_text().splitlines()


def _edit_checkpoint(p: Path, edit) -> None:
    lines = _lines(p)
    d = json.loads(lines[0])
    edit(d)
    lines[0] = json.dumps(d, separators=(",", ":"), sort_keys=True)
    p.write_text("".join(x + "\n" for x in lines))


def _segments(d: Path, rank: int) -> list:
    return sorted(d.glob(f"rank{rank}.0*.jsonl"))


def test_segments_roll_over_with_a_checkpoint_and_an_index(rolled):
    for r in range(4):
        segs = _segments(rolled, r)
        assert len(segs) >= 2, f"rank{r}: no rollover"
        assert [int(p.name.split(".")[1]) for p in segs] == list(range(len(segs)))
        for k, p in enumerate(segs + [rolled / f"rank{r}.jsonl"]):
            first = json.loads(_lines(p)[0])
            assert (first["ev"], first["segment"], first["rank"]) == ("checkpoint", k, r)
        log = _lines(rolled / f"rank{r}.segments")
        assert [x.split()[:3] for x in log] == [["segment", str(k), p.name]
                                                for k, p in enumerate(segs)]


def test_the_whole_run_and_every_suffix_conform(rolled):
    rep = conform(rolled)
    assert rep.ok, rep.divergence
    whole = rep.replayed
    most = max(len(_segments(rolled, r)) + 1 for r in range(4))
    for k in range(1, most):
        rep = conform(rolled, last=k)
        assert rep.ok, (k, rep.divergence)
        assert rep.notes[0].startswith("suffix: the replay starts at the consistent cut")
        assert rep.replayed < whole


def test_keep_last_k_deletes_the_oldest_segments_and_the_tail_conforms(tmp_path):
    run = _record(tmp_path, trace_segment_mb=6 / 1024, trace_keep=2)
    deleted = 0
    for r in range(4):
        segs = _segments(run, r)
        assert len(segs) <= 1, f"rank{r} keeps {[p.name for p in segs]}"
        log = _lines(run / f"rank{r}.segments")
        gone = [x for x in log if "deleted (keep 2)" in x]
        deleted += len(gone)
        for x in gone:
            assert not (run / x.split()[2]).exists()
    assert deleted >= 1, "nothing rolled far enough to be deleted"
    rep = conform(run)
    assert rep.ok, rep.divergence
    assert rep.notes[0].startswith("suffix:")


def _expect(d: Path, file: str, line: int, field: str, words: str, last: int = 0):
    with pytest.raises(TraceError) as e:
        load_run(d, last=last)
    got = (Path(e.value.file).name, e.value.line, e.value.field)
    assert got == (file, line, field), str(e.value)
    assert words in str(e.value), str(e.value)


def test_a_changed_field_of_a_checkpoint_is_caught_at_its_file(rolled, tmp_path):
    d = _copy(rolled, tmp_path / "d")
    p = _segments(d, 0)[1]
    _edit_checkpoint(p, lambda c: c["v"].__setitem__("next_call", c["v"]["next_call"] + 1))
    _expect(d, p.name, 1, "v.next_call", "the lines before it lead to")


def test_a_counter_off_by_one_is_caught_at_its_file(rolled, tmp_path):
    d = _copy(rolled, tmp_path / "d")
    p = _segments(d, 1)[1]
    _edit_checkpoint(p, lambda c: c.__setitem__("recv", c["recv"] + 1))
    _expect(d, p.name, 1, "recv", "implies")


def test_segment_0_must_be_the_models_initial_state(rolled, tmp_path):
    d = _copy(rolled, tmp_path / "d")
    p = _segments(d, 2)[0]
    _edit_checkpoint(p, lambda c: c["v"].__setitem__("planned", 1))
    _expect(d, p.name, 1, "v.planned", "initial state")


def test_a_cut_last_line_is_a_crash_only_in_the_newest_segment(rolled, tmp_path):
    """An older segment was closed by a rollover: its last line is whole. (The loader
    once shadowed its `last` flag with a local list, which accepted this cut.)"""
    d = _copy(rolled, tmp_path / "d")
    p = _segments(d, 1)[0]
    text = p.read_text()
    p.write_text(text[:-8])                        # the last line cut, no newline
    _expect(d, p.name, text.count("\n"), "json", "not a JSON object")


def test_a_missing_segment_in_the_middle_of_a_tail_is_caught(rolled, tmp_path):
    d = _copy(rolled, tmp_path / "d")
    segs = _segments(d, 1)
    segs[1].unlink()
    nxt = segs[2] if len(segs) > 2 else d / "rank1.jsonl"
    _expect(d, nxt.name, 1, "segment", "segment 1 is missing")


def test_a_counter_off_by_one_in_the_oldest_retained_checkpoint_is_rejected(rolled,
                                                                              tmp_path):
    """The oldest retained checkpoint has no predecessor to check it against: its
    counters number the rank's lines, so an off-by-one shifts them and the replay
    rejects the first collective whose members do not match (suffix.py, Rule 3). The
    tail kept is the shortest whose oldest worker2 segment has a step besides its exit
    (where the run rolled over is timing: its last file may hold the exit alone)."""
    d = _copy(rolled, tmp_path / "d")
    files = _segments(d, 3) + [d / "rank3.jsonl"]
    k = max(i for i, f in enumerate(files) if len(_lines(f)) >= 3)
    last = len(files) - k
    _edit_checkpoint(files[k],
                     lambda c: c["gseq"].__setitem__("mesh_pg", c["gseq"]["mesh_pg"] + 1))
    assert conform(rolled, last=last).ok
    rep = conform(d, last=last)
    assert not rep.ok
    assert "worker2" in rep.divergence and "mesh_pg seq" in rep.divergence, \
        rep.divergence


def test_checkpoints_that_disagree_at_the_cut_are_rejected_at_the_file(rolled, tmp_path):
    """Rule 3: at the cut every member of a group is at the same gseq. A worker whose
    checkpoint is behind the others by more than its own window holds cannot catch up."""
    d = _copy(rolled, tmp_path / "d")
    _edit_checkpoint(d / "rank3.jsonl",
                     lambda c: c["gseq"].__setitem__("mesh_pg", c["gseq"]["mesh_pg"] + 10 ** 6))
    _expect(d, "rank3.jsonl", 1, "gseq", "every member enters every collective", last=1)


def test_a_changed_first_checkpoint_of_a_suffix_diverges(rolled, tmp_path):
    d = _copy(rolled, tmp_path / "d")
    _edit_checkpoint(d / "rank0.jsonl",
                     lambda c: c["v"].__setitem__("next_call", c["v"]["next_call"] + 7))
    rep = conform(d, last=1)
    assert not rep.ok


def test_a_line_that_spells_out_what_its_row_implies_is_accepted(rolled, tmp_path):
    """A legal variant: src, i, chan_i, gseq and dst written out where they are implied
    (what the writer does when the runtime deviates) read as the same events."""
    d = _copy(rolled, tmp_path / "d")
    before = load_run(rolled)
    evs = [e for e in before.ranks[1].steps if e.file == "rank1.000001.jsonl"]
    p = d / "rank1.000001.jsonl"
    lines = _lines(p)
    for e in evs:
        x = json.loads(lines[e.line - 1])
        x.update(s=e.src, i=e.i, to=e.dst)
        if e.chan_i is not None:
            x["ci"] = e.chan_i
        if e.gseq is not None:
            x["g"] = e.gseq
        lines[e.line - 1] = json.dumps(x)
    p.write_text("".join(x + "\n" for x in lines))
    rep = conform(d)
    assert rep.ok, rep.divergence
    assert rep.replayed == conform(rolled).replayed


def test_a_line_whose_row_does_not_exist_is_caught(rolled, tmp_path):
    """dst and op are not written: a label its thread's state has no row for is named."""
    d = _copy(rolled, tmp_path / "d")
    p = _segments(d, 2)[1]
    lines = _lines(p)
    k = next(j for j, x in enumerate(lines) if json.loads(x).get("l") == "generator_call")
    x = json.loads(lines[k])
    x["l"] = "counts_agree"
    lines[k] = json.dumps(x)
    p.write_text("".join(x + "\n" for x in lines))
    _expect(d, p.name, k + 1, "l", "'counts_agree': the worker's main thread has no such "
            "row from state 'gen'")


def _step(i, t_ns):
    return {"ev": "step", "rank": 2, "role": "worker", "thread": "main", "i": i,
            "src": "handshake" if i == 0 else "wait_hdr", "label": "x", "dst": "wait_hdr",
            "op": "local", "t_ns": t_ns, "dur_ns": 1000}


def test_the_writer_rolls_over_by_age_and_keeps_the_newest_k(tmp_path):
    """By time (--trace-segment-s): a segment older than the limit is closed at the next
    step; keep 2 leaves the open one and one closed one, and the log says what went."""
    import time

    from lockstep.model.guards import MeshVars
    from lockstep.runtime.trace import TraceWriter
    w = TraceWriter(tmp_path, 2, role="worker", threads=("main",),
                    initial=(("handshake",), MeshVars()), segment_s=0.01, keep=2)
    w.snapshot = lambda: (("wait_hdr",), MeshVars(calls_done=7))
    for i in range(4):
        w.write(_step(i, time.monotonic_ns()))
        time.sleep(0.02)
        assert w.full()
        w.roll()
    w.close()
    assert sorted(p.name for p in tmp_path.glob("rank2*.jsonl")) == \
        ["rank2.000003.jsonl", "rank2.jsonl"]
    log = _lines(tmp_path / "rank2.segments")
    assert [x.split()[1] for x in log if "deleted" in x] == ["0", "1", "2"]
    first = json.loads(_lines(tmp_path / "rank2.jsonl")[0])
    assert (first["segment"], first["pcs"], first["i"], first["v"]["calls_done"]) == \
        (4, ["wait_hdr"], [4], 7)
    step = json.loads(_lines(tmp_path / "rank2.000003.jsonl")[1])
    assert set(step) == {"l", "t", "d"}, "src, i and dst are implied by the previous line"


def test_keep_without_a_rollover_is_refused():
    from lockstep.model.runopts import RunOptions
    assert RunOptions.from_dict({"trace_segment_s": 60, "trace_keep": 3}).trace_keep == 3
    with pytest.raises(ValueError, match="trace_keep"):
        RunOptions.from_dict({"trace_keep": 3})


def test_a_segment_full_at_the_exit_step_opens_no_segment_after_it(tmp_path):
    """Every step fills a segment (1-byte segments), so one is full right after each
    rank's exit step. The interpreter leaves its control states where an exit row found
    them, the segment's lines imply the row's dst: a checkpoint written then would
    disagree with the segment it follows, and the load would reject the run. Nothing is
    written after a process's exit step, so no segment opens after it."""
    cfg = Config(mesh=2, d_in=2, d_out=2, chunks=2, hard_cut=0, steps=2)
    res = run_local(cfg, {"trace_segment_mb": 1 / 2 ** 20}, tmp_path / "run",
                    deadline_s=DEADLINE_S)
    assert res.ok, res.summary()
    rep = conform(tmp_path / "run")
    assert rep.ok, rep.divergence
    for r in range(3):
        assert len(_segments(tmp_path / "run", r)) > 10
