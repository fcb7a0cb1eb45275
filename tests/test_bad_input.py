"""Bad input to every reader of a run directory: a clear error
naming the file, line and field (exit 1), or the path (exit 2), never a traceback, never
a wrong "conforms". Each hand-made case below raised a Python exception (or exited 1 for
a directory that is not a run) before its fix; the fuzz tests draw line and field edits
of a recorded segmented run and of a long-form one."""
import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from lockstep import cli

TESTDATA = Path(__file__).resolve().parent.parent / "conformance" / "testdata"
SEGMENTED = TESTDATA / "gloo_mesh2_segments"     # format 2, rolled into segments
LONG = TESTDATA / "breakit_wrong_group"          # format 1, releases, .err exit lines
FUZZ = settings(max_examples=50, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow,
                                       HealthCheck.function_scoped_fixture])


def lockstep(*argv) -> tuple:
    """(exit code, stdout, stderr) of `lockstep ARGV` run in this process, as a user
    runs it: an exception escaping main is the defect these tests look for."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def _copy(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def _edit_line(p: Path, n: int, edit) -> None:
    """Line n (1-based) of p, parsed, edited in place by `edit`, written back."""
    lines = p.read_text().split("\n")
    d = json.loads(lines[n - 1])
    edit(d)
    lines[n - 1] = json.dumps(d)
    p.write_text("\n".join(lines))


def _set(**kv):
    return lambda d: d.update(kv)


def _diverges_at(rc, out, err, where: str, field: str):
    assert rc == 1, (rc, out, err)
    assert err == "" and "Traceback" not in out
    assert f"TRACE ERROR {where}: field '{field}'" in out, out
    # the trace is rejected, the run's configuration (run.json) is still said
    config = next(ln for ln in out.splitlines() if ln.startswith("config "))
    assert config.split()[1].startswith("mesh="), out


# ---------------------------------------------------------------- format-2 lines

@pytest.mark.parametrize("fname, line, edit, field", [
    ("rank2.000001.jsonl", 2, _set(l={}), "l"),           # a label that is an object
    ("rank2.000001.jsonl", 2, _set(s=[1]), "l"),          # a state that is a list
    ("rank2.000001.jsonl", 2, _set(i="x"), "i"),          # a step number not an int
    ("rank2.000001.jsonl", 2, _set(g=None), "g"),         # a gseq not an int
    ("rank0.000001.jsonl", 4, _set(ci="0"), "ci"),        # a chan_i not an int
    ("rank0.000001.jsonl", 4, _set(ci=-3), "ci"),
    ("rank2.000001.jsonl", 2, _set(v=-1), "v"),           # a gathered vector not a list
    ("rank2.000001.jsonl", 2, _set(v=[{}, 2]), "v"),      # ... with an item no row gathers
    ("rank2.000001.jsonl", 2, _set(v=[]), "msg"),         # ... that no update can take
    ("rank0.000001.jsonl", 4, lambda d: d.update(v=d.pop("m")), "m"),   # a send's vector
    ("rank0.000000.jsonl", 1, _set(rank=False), "rank"),  # false passed for rank 0
    ("rank0.000000.jsonl", 1, _set(format=2.0), "format"),
])
def test_format2_line_of_the_wrong_shape_is_named(tmp_path, fname, line, edit, field):
    run = _copy(SEGMENTED, tmp_path / "run")
    _edit_line(run / fname, line, edit)
    _diverges_at(*lockstep("conform", run), f"{fname} line {line}", field)


def _segment_log(run: Path, rank: int, deleted=()) -> None:
    """rank{R}.segments as runtime/trace.py writes it for the run's closed segments."""
    lines = []
    for p in sorted(run.glob(f"rank{rank}.0*.jsonl")):
        n = int(p.name.split(".")[1])
        lines.append(f"segment {n} {p.name} opened 2026-12-02T05:47:35Z closed "
                     f"2026-12-02T05:47:35Z lines 4 bytes 1264")
        if n in deleted:
            lines.append(f"segment {n} {p.name} deleted (keep 3)")
    (run / f"rank{rank}.segments").write_text("".join(x + "\n" for x in lines))


def _without_trace_keep(run: Path) -> None:
    meta = json.loads((run / "run.json").read_text())
    del meta["opts"]["trace_keep"]
    (run / "run.json").write_text(json.dumps(meta))


def test_a_lost_first_segment_is_not_replayed_as_a_suffix(tmp_path):
    """A copy that lost a rank's oldest segments read as a flight recorder's suffix, and
    conformed, although run.json says every segment was kept."""
    run = _copy(SEGMENTED, tmp_path / "run")
    (run / "rank1.000000.jsonl").unlink()
    _diverges_at(*lockstep("conform", run), "rank1.000001.jsonl line 1", "segment")
    _without_trace_keep(run)           # another writer's run.json: the segment log tells
    _segment_log(_copy(SEGMENTED, tmp_path / "log"), 1)
    shutil.copy(tmp_path / "log" / "rank1.segments", run)
    rc, out, err = lockstep("conform", run)
    _diverges_at(rc, out, err, "rank1.segments line 1", "segment")
    assert "segment 0 is missing" in out


def test_a_segment_the_flight_recorder_deleted_is_a_suffix(tmp_path):
    run = _copy(SEGMENTED, tmp_path / "run")
    _without_trace_keep(run)
    _segment_log(run, 1, deleted={0})
    (run / "rank1.000000.jsonl").unlink()
    rc, out, err = lockstep("conform", run)
    assert rc == 0 and "CONFORMS" in out and "suffix:" in out, (out, err)
    assert lockstep("conform", "--last", "2", SEGMENTED)[0] == 0   # a suffix asked for


# ---------------------------------------------------------------- long-form lines

def _first(p: Path, pred) -> int:
    return next(n for n, x in enumerate(p.read_text().splitlines(), 1)
                if pred(json.loads(x)))


def _coll(d):
    return d.get("op") == "coll" and "msg" in d


def _send(d):
    return d.get("op") == "send"


def _release(d):
    return d.get("ev") == "release"


@pytest.mark.parametrize("fname, pred, edit, field", [
    ("rank2.jsonl", _coll, _set(thread={}), "thread"),
    ("rank2.jsonl", _coll, _set(msg=0), "msg"),           # a message that is a number
    ("rank2.jsonl", _coll, _set(msg=[1.5]), "msg[0]"),
    ("rank0.jsonl", _send, _set(msg=[1, 2]), "msg"),      # a send's message is an object
    ("rank0.jsonl", _release, _set(cause=[1]), "cause"),
    ("rank0.jsonl", _release, lambda d: d["cause"].update(detail=7), "cause.detail"),
    ("rank0.jsonl", _release, lambda d: d["cause"].update(rank="3"), "cause.rank"),
    ("rank0.jsonl", _release, _set(via=1), "via"),
    ("rank0.jsonl", lambda d: d.get("ev") == "start", _set(backend=["gloo"]), "backend"),
    # A JSON true/false is a Python 1/0: it passed for rank 0, or for a world of 1.0.
    ("rank0.jsonl", _release, _set(rank=False), "rank"),
    ("rank0.jsonl", lambda d: d.get("ev") == "start", _set(rank=False), "rank"),
    ("rank0.jsonl", lambda d: d.get("ev") == "start", _set(world=4.0), "world"),
])
def test_long_form_line_of_the_wrong_shape_is_named(tmp_path, fname, pred, edit, field):
    run = _copy(LONG, tmp_path / "run")
    n = _first(run / fname, pred)
    _edit_line(run / fname, n, edit)
    _diverges_at(*lockstep("conform", run), f"{fname} line {n}", field)


# ---------------------------------------------------------------- the other files

@pytest.mark.parametrize("name, value", [
    ("launch.json", {"killed_at_deadline": -1}),
    ("launch.json", {"killed_at_deadline": [[1]]}),
    ("launch.json", [1, 2]),
    ("outputs.json", [1, 2]),
    ("outputs.json", {"a": 1}),
])
def test_side_files_of_the_wrong_shape_do_not_crash(tmp_path, name, value):
    run = _copy(SEGMENTED, tmp_path / "run")
    (run / name).write_text(json.dumps(value))
    rc, out, err = lockstep("conform", run)
    assert rc in (0, 1) and "Traceback" not in out + err and "verdict" in out, (out, err)
    if name == "outputs.json":
        assert rc == 1 and "outputs.json" in out


def test_an_output_numbered_by_a_bool_is_not_an_output(tmp_path):
    """outputs.json's [3, true, digest] read as chunk 3 of epoch 1 (true == 1)."""
    run = _copy(SEGMENTED, tmp_path / "run")
    outs = json.loads((run / "outputs.json").read_text())
    outs[0][1] = True
    (run / "outputs.json").write_text(json.dumps(outs))
    rc, out, err = lockstep("conform", run)
    assert rc == 1 and "outputs.json: every entry is [chunk, epoch, digest]" in out, (out, err)


@pytest.mark.parametrize("stop", [{"killed": [False]}, {"not_started": [True]},
                                  {"killed": "0"}])
def test_launch_json_ranks_that_are_not_ints_are_not_read(tmp_path, stop):
    """launch.json's interrupted.killed [false] named rank 0 as killed by the launcher
    (false == 0 in a set of ranks); its lists are read as killed_at_deadline is."""
    from types import SimpleNamespace
    from lockstep.conformance.report import _launch_record
    (tmp_path / "launch.json").write_text(json.dumps({"interrupted": stop}))
    assert _launch_record(SimpleNamespace(path=tmp_path)) == {}
    (tmp_path / "launch.json").write_text(json.dumps({"interrupted": {"killed": [0]}}))
    assert _launch_record(SimpleNamespace(path=tmp_path)) != {}


@pytest.mark.parametrize("opts", [[1], "gloo", {"backend": ["gloo"]}])
def test_run_json_opts_of_the_wrong_shape_are_not_compared(tmp_path, opts):
    """run.json's opts is what the launcher wrote; one of another shape names no
    backend to compare with the traces' (it crashed sources.py)."""
    run = _copy(SEGMENTED, tmp_path / "run")
    meta = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps(dict(meta, opts=opts)))
    rc, out, err = lockstep("conform", run)
    assert rc == 0 and "CONFORMS" in out, (out, err)


@pytest.mark.parametrize("make, says", [
    (lambda d: None, "not a directory"),
    (lambda d: d.mkdir(), "run.json: missing"),
    (lambda d: (d.mkdir(), (d / "run.json").write_text("{garbage")), "not readable JSON"),
    (lambda d: (d.mkdir(), (d / "run.json").write_bytes(b"\xff\xfe{")), "not readable JSON"),
    (lambda d: (d.mkdir(), (d / "run.json").write_text("[1]")), "not a JSON object"),
    (lambda d: (d.mkdir(), (d / "run.json").write_text('{"config": {"mesh": "x"}}')),
     "not a model Config"),
    (lambda d: (d.mkdir(), (d / "run.json").mkdir()), "run.json: not readable JSON"),
])
@pytest.mark.parametrize("cmd", [("conform",), ("conform", "--suffixes"), ("overlap",)])
def test_not_a_run_directory_exits_2_naming_the_path(tmp_path, make, says, cmd):
    d = tmp_path / "x"
    make(d)
    rc, out, err = lockstep(*cmd, d)
    assert rc == 2 and out == "", (rc, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lockstep {cmd[0]}: {d}"), err
    assert says in lines[0], err


@pytest.mark.parametrize("text, says", [
    ("[1]", "not a JSON object"), ("{garbage", "not JSON"), ('{"version": -1}', "version -1"),
])
def test_a_reference_that_is_not_one_exits_2_before_any_work(tmp_path, text, says):
    """`--reference FILE` of another shape raised an AttributeError after the report
    was printed; it is a usage error naming FILE, before the replay."""
    ref = tmp_path / "ref.json"
    ref.write_text(text)
    rc, out, err = lockstep("conform", SEGMENTED, "--reference", ref)
    assert rc == 2 and out == "" and err.startswith(f"lockstep conform: {ref}: "), (out, err)
    assert says in err


# ---------------------------------------------------------------- nested too deeply

DEEP = "[" * 100_000 + "]" * 100_000      # json's recursive parser: a RecursionError


def _reference(**kw) -> str:
    return json.dumps(dict({"version": 1, "spec": {}, "records": [], "outputs": []}, **kw))


@pytest.mark.parametrize("text, says", [
    (_reference()[:-1] + ', "x": ' + DEEP + "}", "not JSON: nested 100,001 levels deep"),
    (_reference(version=True), "reference version True"),          # true == 1
    (_reference(records=[{"chunk": 0, "epoch": 0, "rank": False}]),
     "field 'records[0]': rank: False is not an integer"),          # false == rank 0
    (_reference(spec=[1]), "field 'spec': not an object"),
    (_reference(outputs=[[0, 1]]), "field 'outputs[0]'"),
])
def test_a_reference_nested_too_deeply_or_of_the_wrong_shape_exits_2(tmp_path, text, says):
    """--reference FILE nested deeper than json can parse raised RecursionError; one of
    another shape (a spec that is a list, an output of two items) raised a TypeError
    after the report; a bool passed for version 1 and for rank 0's record."""
    ref = tmp_path / "ref.json"
    ref.write_text(text)
    rc, out, err = lockstep("conform", SEGMENTED, "--reference", ref)
    assert rc == 2 and out == "" and err.startswith(f"lockstep conform: {ref}: "), (out, err)
    assert says in err and len(err.splitlines()) == 1, err


def test_a_trace_line_nested_too_deeply_is_named(tmp_path):
    run = _copy(SEGMENTED, tmp_path / "run")
    lines = (run / "rank2.000001.jsonl").read_text().split("\n")
    lines[1] = '{"l": ' + DEEP + "}"
    (run / "rank2.000001.jsonl").write_text("\n".join(lines))
    rc, out, err = lockstep("conform", run)
    _diverges_at(rc, out, err, "rank2.000001.jsonl line 2", "json")
    assert "nested 100,001 levels deep" in out
    rc, out, err = lockstep("coverage", run)      # coverage skips a line it cannot read
    assert "Traceback" not in out + err and rc in (0, 1), (out, err)


@pytest.mark.parametrize("name", ["run.json", "outputs.json", "launch.json"])
def test_a_side_file_nested_too_deeply_is_an_error_not_a_traceback(tmp_path, name):
    run = _copy(SEGMENTED, tmp_path / "run")
    (run / name).write_text(DEEP)
    rc, out, err = lockstep("conform", run)
    assert "Traceback" not in out + err, (out, err)
    if name == "run.json":      # not a run: a usage error naming the file
        assert rc == 2 and "run.json: not readable JSON" in err and "nested" in err, err
    elif name == "outputs.json":
        assert rc == 1 and "outputs.json: not JSON (nested 100,000 levels deep" in out, out
    else:                       # launch.json only names who killed a rank: not read
        assert rc == 0 and "CONFORMS" in out, out


def test_a_cut_request_or_release_flag_nested_too_deeply_is_refused_not_raised():
    from lockstep.model.release import decode
    from lockstep.runtime.control import _request_reason
    with pytest.raises(ValueError, match="nested 100,000 levels deep"):
        _request_reason(DEEP)                  # the watcher refuses it (ValueError)
    assert decode(DEEP)["kind"] == "error"     # an unstructured flag value


@pytest.mark.parametrize("text, says", [
    ("[1, 2]\n", "line 1: not a JSON object"),
    ('{"ev": "step", "role": "worker", "thread": "main", "label": []}\n', "line 1: role"),
    ('{"ev": "step", "thread": "main", "label": "x"}\n', "line 1: role"),
    ('{"ev": "checkpoint", "role": "worker"}\n{"d": 1}\n', "line 2: a format-2 step"),
])
def test_coverage_names_a_line_of_the_wrong_shape(tmp_path, text, says):
    run = _copy(SEGMENTED, tmp_path / "run")
    (run / "rank2.jsonl").write_text(text)
    rc, out, err = lockstep("coverage", run)
    assert rc == 2 and out == "" and f"rank2.jsonl {says}" in err, (rc, out, err)


def test_coverage_reads_a_file_that_is_not_utf8(tmp_path):
    run = _copy(SEGMENTED, tmp_path / "run")
    with open(run / "rank2.jsonl", "ab") as f:
        f.write(b"\xff\xfe garbage cut by a full disk")
    rc, out, err = lockstep("coverage", run)
    assert rc in (0, 1) and "row coverage" in out, (rc, out, err)


# ---------------------------------------------------------------- fuzz

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                 max_size=3),
    max_leaves=6)
STEP_KEYS = ["l", "c", "s", "to", "i", "ci", "g", "m", "v", "t", "d", "meas", "ev",
             "label", "thread", "src", "dst", "op", "msg", "chan_i", "gseq", "cause",
             "via", "reason", "what", "rank", "role", "segment", "pcs", "send", "recv"]


def _fuzz_edit(run: Path, data) -> str:
    files = sorted(p for p in run.iterdir() if p.suffix in (".jsonl", ".json", ".err"))
    p = data.draw(st.sampled_from(files), label="file")
    if p.suffix == ".json":
        p.write_text(json.dumps(data.draw(JSON_VALUES, label="whole")))
        return p.name
    lines = p.read_text().split("\n")
    n = data.draw(st.integers(0, max(0, len(lines) - 2)), label="line")
    how = data.draw(st.sampled_from(["field", "field", "drop", "garbage", "truncate"]))
    if how == "field" and lines[n].startswith("{"):
        d = json.loads(lines[n])
        key = data.draw(st.sampled_from(sorted(d) + STEP_KEYS), label="key")
        d[key] = data.draw(JSON_VALUES, label="value")
        lines[n] = json.dumps(d)
    elif how == "drop":
        del lines[n]
    elif how == "garbage":
        lines[n] = data.draw(st.sampled_from(["[]", '"s"', "1", "null", "{", "NaN"]))
    else:
        text = "\n".join(lines)
        lines = [text[:data.draw(st.integers(0, len(text)), label="cut")]]
    p.write_text("\n".join(lines))
    return p.name


@pytest.mark.parametrize("base", [SEGMENTED, LONG], ids=["format2", "long"])
@FUZZ
@given(data=st.data())
def test_fuzzed_run_directory_answers_in_one_of_its_exit_codes(tmp_path, base, data):
    run = _copy(base, tmp_path / "run")
    _fuzz_edit(run, data)
    for cmd in (("conform",), ("coverage",)):
        rc, out, err = lockstep(*cmd, run)
        assert rc in (0, 1, 2), (cmd, rc, out, err)
        if cmd == ("conform",) and rc != 2:
            assert "verdict" in out and err == "", (out, err)
