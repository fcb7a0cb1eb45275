"""The replay bench (conformance/bench.py) on a small generated trace: it replays to a
verdict, times the Replayer's construction apart, and its model floor times the model on
exactly the transitions the replay took."""
import re

from lockstep.conformance import bench


def test_bench_floor_times_the_replays_own_transitions(tmp_path, capsys):
    assert bench.main(["--events", "3000", "--dir", str(tmp_path / "run"), "--floor"]) == 0
    out = capsys.readouterr().out
    assert "verdict     conforms" in out
    assert re.search(r"^link +\d+\.\d+ CPU s", out, re.M)
    steps = int(re.search(r"\(([\d,]+) model transitions\)", out).group(1).replace(",", ""))
    floor = re.search(r"model floor ([\d,]+) transitions: Model.step alone ([\d.]+) CPU s, "
                      r"Model.enabled_as alone ([\d.]+) CPU s", out)
    assert floor, out
    assert int(floor.group(1).replace(",", "")) == steps > 1000


def test_spec_floor_records_the_calls_the_model_makes(tmp_path):
    """The recording rows see the model's own calls: each committed transition's
    updates run once in `Model.step`, so the recorded update calls are exactly the taken
    rows' updates; every other recorded call is a guard, make or accept, and the
    recording leaves the verdict alone."""
    from lockstep.conformance.load import load_run
    assert bench.main(["--events", "2000", "--dir", str(tmp_path / "run")]) == 0
    run = load_run(tmp_path / "run")
    floor = bench.spec_floor(run)
    rep, taken = bench._taken(run)
    parts = [row for s, tr in taken for p, t, row in tr.parts if row is not None]
    updates = {row.update for row in parts if row.update is not None}
    recorded_updates = sorted(fn.__name__ for fn, args in floor.calls if fn in updates)
    assert recorded_updates == sorted(row.update.__name__ for row in parts
                                      if row.update is not None)
    assert len(floor.least) == sum((row.guard is not None) + (row.update is not None)
                                   for row in parts)
    assert len(floor.calls) > len(floor.least) > len(taken) > 500
    assert floor.c_calls > 0 and floor.c_least > 0 and "spec floor" in floor.line()
    assert bench.Replayer(run, tables=bench._recording_tables([])).replay().ok
