"""runtime/cpuprofile.py: the per-rank CPU counters and cProfile switch."""
import json
import pstats
import threading

import pytest

from lockstep.runtime import cpuprofile as CP


def _spin(n):
    return sum(i * i for i in range(n))


def test_mode_is_checked(monkeypatch):
    monkeypatch.setenv(CP.ENV, "cpu")
    assert CP.mode() == "cpu"
    monkeypatch.delenv(CP.ENV)
    assert CP.mode() is None
    monkeypatch.setenv(CP.ENV, "wall")      # a typo must not silently profile nothing
    with pytest.raises(ValueError, match="LOCKSTEP_PROFILE"):
        CP.mode()


def test_counters_measure_the_thread_body(tmp_path):
    prof = CP.RankProfile(tmp_path, 3, "cpu")
    prof.run("main", _spin, 300_000)
    prof.run("comms", _spin, 10)
    prof.dump(chunks=10)
    (row,) = CP.load(tmp_path)
    assert row["rank"] == 3 and row["chunks"] == 10
    assert row["threads_s"]["main"] > row["threads_s"]["comms"]
    assert row["process_s"] >= row["threads_s"]["main"]
    assert set(row["threads_sys_s"]) == {"main", "comms"}
    assert all(s >= 0 for s in row["threads_sys_s"].values())
    lines = CP.cpu_lines([row])
    assert lines[1].split()[0] == "3" and lines[-1].split()[0] == "all"
    assert not list(tmp_path.glob("*.pstats"))     # "cpu" mode writes no profile


def _other(n):
    return _spin(n)


def test_cprofile_mode_profiles_every_interpreter_thread(tmp_path):
    """Two threads run bodies at once, as a rank's main and comms threads do: each
    body shows in the profile (per thread before 3.12, one per rank from 3.12, where a
    second cProfile in the same interpreter refuses to start)."""
    prof = CP.RankProfile(tmp_path, 0, "cprofile")
    started, release = threading.Event(), threading.Event()

    def comms():
        started.set()
        release.wait(10)
        _other(20_000)

    t = threading.Thread(target=prof.run, args=("comms", comms))
    t.start()
    assert started.wait(10)
    prof.run("main", _spin, 50_000)
    release.set()
    t.join(10)
    assert not t.is_alive()
    if CP.PROCESS_WIDE_PROFILER:
        files = {"rank0.pstats"}
        names = {fn[2] for fn in pstats.Stats(str(tmp_path / "rank0.pstats")).stats}
    else:
        files = {"rank0.main.pstats", "rank0.comms.pstats"}
        names = {fn[2] for f in files for fn in pstats.Stats(str(tmp_path / f)).stats}
    assert {p.name for p in tmp_path.glob("*.pstats")} == files
    assert {"_spin", "_other"} <= names


def test_a_failing_body_is_still_counted(tmp_path):
    prof = CP.RankProfile(tmp_path, 1, "cpu")
    with pytest.raises(ZeroDivisionError):
        prof.run("main", lambda: 1 / 0)
    prof.dump(chunks=1)
    assert "main" in json.loads((tmp_path / "rank1.cpu.json").read_text())["threads_s"]


def test_a_run_without_a_profile_is_a_usage_error_naming_the_switch(tmp_path, capsys):
    from lockstep.runtime.cpuprofile import ENV, main
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and f"{ENV}=cpu" in err and "Traceback" not in err
