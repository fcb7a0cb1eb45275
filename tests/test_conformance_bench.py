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
