"""The command line as people read it: help, defaults, exit codes, typed run options."""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys

import pytest

from lockstep import cli
from lockstep.model.runopts import FaultSwitch, RunOptions, parse_fault


def _subparsers():
    ap = cli.build_parser()
    (sub,) = [a for a in ap._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


@pytest.mark.parametrize("name", sorted(_subparsers()))
def test_every_option_of_every_subcommand_has_help_with_its_default(name):
    p = _subparsers()[name]
    fmt = p._get_formatter()
    for act in p._actions:
        if isinstance(act, argparse._HelpAction) or not act.option_strings:
            continue
        assert act.help, f"{name} {act.option_strings}: no help text"
        shown = fmt._get_help_string(act)
        flag_like = act.nargs == 0
        assert flag_like or "default:" in shown, f"{name} {act.option_strings}: {shown!r}"


@pytest.mark.parametrize("name, flag", [("check", "--inject"), ("run", "--fault")])
def test_the_fault_switches_help_names_every_switch(name, flag):
    """check's --inject help listed five of the seven switches (rank0_bad_envelope and
    leader_bad_result, which both accept, were missing), and run's --fault none."""
    from lockstep.model.config import INJECTABLE
    (act,) = [a for a in _subparsers()[name]._actions if flag in a.option_strings]
    for switch in INJECTABLE:
        assert switch in act.help, (name, flag, switch, act.help)


def test_top_level_help_documents_exit_codes_and_version():
    p = subprocess.run([sys.executable, "-m", "lockstep", "--help"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0
    for code, word in ((cli.EXIT_OK, "clean"), (cli.EXIT_VIOLATION, "violation"),
                       (cli.EXIT_USAGE, "usage"), (cli.EXIT_RUN_FAILED, "run failed")):
        assert f"{code}  {word}" in p.stdout
    v = subprocess.run([sys.executable, "-m", "lockstep", "--version"], capture_output=True,
                       text=True, timeout=60)
    assert v.returncode == 0 and v.stdout.startswith("lockstep ")


def test_a_mutation_says_on_stderr_what_it_changed_of_an_option_the_user_set(capsys):
    rc = cli.main(["check", "--mutation", "blocking_send_then_recv", "--p2p", "buffered"])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_VIOLATION
    assert "needs p2p=rendezvous" in err and "you set buffered" in err


def test_semantic_switches_combine_with_a_mutation(capsys):
    rc = cli.main(["check", "--mutation", "no_epoch_filter", "--d-in", "1", "--d-out", "2",
                   "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == cli.EXIT_VIOLATION and "depth=1/2" in out["config"]


def test_watchdog_switch_reaches_the_model(capsys):
    rc = cli.main(["check", "--faults", "1", "--no-watchdog", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == cli.EXIT_VIOLATION and out["verdict"] == "crash_hang", out["verdict"]


def test_usage_errors_exit_2_naming_the_option(capsys):
    assert cli.main(["check", "--depth", "2", "--d-in", "1"]) == cli.EXIT_USAGE
    assert "--depth" in capsys.readouterr().err
    assert cli.main(["run", "--fault", "nosuch@2"]) == cli.EXIT_USAGE
    assert "unknown switch 'nosuch'" in capsys.readouterr().err
    assert cli.main(["run", "--op-deadline-s", "0"]) == cli.EXIT_USAGE
    assert "op_deadline_s" in capsys.readouterr().err
    assert cli.main(["breakit", "--case", "leader_reject"]) == cli.EXIT_USAGE
    assert "unknown case(s) ['leader_reject']; known: wrong_group" in capsys.readouterr().err


@pytest.mark.parametrize("argv,field", [
    (["check", "--steps", "0"], "steps must be in [1, 1000]"),
    (["check", "--faults", "-1"], "faults must be >= 0"),
    (["check", "--chunks", "-3"], "chunks must be >= 0"),
    (["check", "--noops", "-2"], "noops must be >= 0"),
    (["run", "--mesh", "2", "--chunks", "-1"], "chunks must be >= 0"),
])
def test_a_configuration_out_of_range_is_a_usage_error_naming_the_field(argv, field,
                                                                       capsys):
    """Before, `check --steps 0` reported a stranding of the shipped tables and `run
    --chunks -1` ran and exited 0: a verdict on a configuration nobody can mean."""
    assert cli.main(argv) == cli.EXIT_USAGE
    assert field in capsys.readouterr().err


@pytest.mark.parametrize("argv,says", [
    (["--depth", "2", "--d-in", "3"], "--depth sets both queue depths"),
    (["--depth", "2", "--d-out", "1"], "--depth sets both queue depths"),
    (["--depth", "0"], "queue depths must be >= 1"),
    (["--hard-cut-at", "3", "--cut-at", "3"], "--hard-cut-at K is --cut-at K"),
    (["--pg-timeout-s", "1"], "pg_timeout_s: must be > op_deadline_s (30)"),
    (["--op-deadline-s", "90"], "pg_timeout_s: must be > op_deadline_s (90)"),
    (["--deadline-s", "0"], "deadline_s: must be > 0"),
    (["--deadline-s", "-5"], "deadline_s: must be > 0"),
])
def test_run_flags_that_contradict_or_cannot_work_are_refused_before_any_rank(
        argv, says, tmp_path, capsys):
    """Before: --depth beside --d-in silently dropped one (and --depth 0 fell back to
    --d-in), --hard-cut-at with --cut-at took one cut more, a backend timeout under the
    op deadline failed a slow healthy run as a rank's backend error, and --deadline-s 0
    killed every rank at once as a hang: each started the ranks."""
    assert cli.main(["run", "--out", str(tmp_path / "r"), *argv]) == cli.EXIT_USAGE
    assert says in capsys.readouterr().err
    assert not list((tmp_path / "r").glob("rank*"))   # refused before any rank started


@pytest.mark.parametrize("kw,field", [
    ({"mesh": "2"}, "mesh must be an integer"),
    ({"steps": True}, "steps must be an integer"),
    ({"eager": 0}, "eager must be >= 1"),
    ({"steps": 1001}, "steps must be in [1, 1000]"),
    ({"watchdog": 1}, "watchdog must be true or false"),
    ({"bogus": 1}, "unknown field 'bogus'"),
])
def test_a_config_read_from_json_names_the_bad_field(kw, field):
    from lockstep.model.config import config_from_dict
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        config_from_dict({"mesh": 2, **kw})
    assert config_from_dict({"mesh": 2, "hard_cut": True, "chunks": 0}).hard_cut == 1


@pytest.mark.parametrize("opts,field", [
    ({"costs": {"phase_b_ms": -1}}, "opts.costs.phase_b_ms"),
    ({"fault": {"name": "wrong_group", "at_chunk": "2"}}, "opts.fault.at_chunk"),
    ({"hard_cut_at": 1.5}, "opts.hard_cut_at"),
    ({"hard_cut": 3}, "unknown option(s) ['hard_cut']"),
    ({"backend": "mpi"}, "opts.backend"),
    ({"fault": "wrong_group@2"}, "opts.fault: must be a JSON object"),
])
def test_run_options_reject_bad_values_naming_the_field(opts, field):
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("(", r"\(")
                       .replace(")", r"\)").replace("]", r"\]")):
        RunOptions.from_dict(opts)


def test_run_options_round_trip_through_json():
    from lockstep.model.runopts import CutSchedule
    o = RunOptions(cuts=CutSchedule(at=(3, 3), every=5, control=2),
                   fault=parse_fault("leader_reject@2"), lost_after_s=0.25)
    back = RunOptions.from_dict(json.loads(json.dumps(o.to_dict())))
    assert back == o and back.fault == FaultSwitch("leader_reject", 2)


def test_cut_of_a_directory_with_no_run_is_refused_and_pending_says_why(tmp_path, capsys):
    """A mistyped run directory used to get a request nobody would read ("pending")."""
    assert cli.main(["cut", str(tmp_path)]) == cli.EXIT_USAGE
    assert "no run here (no run.json" in capsys.readouterr().err
    assert not (tmp_path / "control").exists()
    (tmp_path / "run.json").write_text("{}")          # a run that is not running
    assert cli.main(["cut", str(tmp_path), "--wait-s", "0.05"]) == cli.EXIT_RUN_FAILED
    out = capsys.readouterr().out
    assert "pending: rank0 did not take it within 0.05 s" in out and "control" in out


def test_the_runtime_bench_refuses_too_few_chunks_to_measure(capsys):
    """`python -m lockstep.bench --chunks 5` used to start every rank and die in each
    of them with a TypeError (no chunk after the warm-up to take the CPU from)."""
    from lockstep import bench
    with pytest.raises(SystemExit) as e:
        bench.main(["--chunks", "5"])
    assert e.value.code == 2 and "--chunks: must be >= 20, got 5" in capsys.readouterr().err


def test_the_soak_refuses_a_run_with_nothing_after_its_warm_up(monkeypatch, tmp_path,
                                                              capsys):
    """`python -m lockstep.soak --chunks 200` ran 200 chunks, all of them warm-up, and
    printed 'RSS None -> None MB ... (0 samples)' as ok."""
    from lockstep import soak
    monkeypatch.setattr(soak, "soak", lambda *a, **k: pytest.fail("it ran"))
    assert soak.main(["--chunks", "200", "--out", str(tmp_path)]) == 2
    assert "--chunks 200 leaves nothing after the warm-up of 200" in capsys.readouterr().err
    assert soak.main(["--chunks", "300", "--warmup", "300", "--out", str(tmp_path)]) == 2


def test_a_reader_that_leaves_early_gets_no_traceback():
    """`lockstep conform RUN | head` printed a BrokenPipeError traceback. The reader here
    (`true`) is gone before lockstep has imported torch, so the first write breaks."""
    from pathlib import Path
    run = Path(__file__).resolve().parent.parent / "traces" / "cpu_gloo_depth1"
    p = subprocess.run(f"set -o pipefail; '{sys.executable}' -m lockstep conform '{run}' "
                       "| true", shell=True, executable="/bin/bash", capture_output=True,
                       text=True, timeout=120)
    assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr
    assert p.returncode == cli.EXIT_PIPE, (p.returncode, p.stderr)


@pytest.mark.parametrize("argv", [["export", "--out", "{f}/x.pml"], ["render", "--out", "{f}"],
                                  ["overlap", "{run}", "--out", "{f}"]])
def test_an_output_path_that_cannot_be_written_is_one_line(argv, tmp_path, capsys):
    """--out naming a file used to end in a FileExistsError / NotADirectoryError traceback."""
    from pathlib import Path
    f = tmp_path / "afile"
    f.write_text("")
    run = Path(__file__).resolve().parent.parent / "traces" / "cpu_gloo_depth1"
    argv = [a.format(f=f, run=run) for a in argv]
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert str(f) in err and ("File exists" in err or "Not a directory" in err), err


def test_a_fault_switch_that_would_never_fire_is_refused(tmp_path):
    """`run --chunks 5 --fault leader_reject@99` ran clean and exited 0: the switch never
    fired and the run read as a fault injected and survived."""
    from lockstep.model.config import Config
    from lockstep.runtime.run import run_local
    with pytest.raises(ValueError, match=r"fault.at_chunk: 99 is beyond the stream's 5 "
                                         r"chunks \(0\.\.4\): it would never fire"):
        run_local(Config(mesh=2, chunks=5), {"fault": {"name": "leader_reject",
                                                       "at_chunk": 99}}, tmp_path)
    with pytest.raises(ValueError, match=r"fault.rank: 7 is not a rank of this run \(0\.\.2\)"):
        run_local(Config(mesh=2, chunks=5), {"fault": {"name": "wrong_group", "at_chunk": 1,
                                                       "rank": 7}}, tmp_path)
    assert not list(tmp_path.glob("rank*"))


def test_check_stops_at_a_state_budget_with_no_verdict(capsys):
    """A configuration too big to explore here (mesh 6, 8 chunks, cuts and a crash) ran
    on silently with no bound; --max-states stops it, says so, and claims no verdict."""
    argv = ["check", "--mesh", "6", "--chunks", "8", "--hard-cuts", "2", "--faults", "1",
            "--max-states", "20000"]
    assert cli.main(argv) == cli.EXIT_RUN_FAILED
    err = capsys.readouterr().err
    assert "state budget 20,000 exceeded" in err and "no verdict" in err, err
    assert cli.main(["check", "--max-states", "-1"]) == cli.EXIT_USAGE


BIG = ["check", "--mesh", "6", "--chunks", "8", "--hard-cuts", "2", "--faults", "1"]


def test_the_state_budget_bounds_the_multiprocess_search(capsys):
    """--max-states with --workers was refused: the parallel search had no budget. It
    counts its workers' states at the end of each level and stops the same way."""
    assert cli.main(BIG + ["--workers", "2", "--max-states", "5000"]) == cli.EXIT_RUN_FAILED
    (line,) = capsys.readouterr().err.splitlines()
    assert "state budget 5,000 exceeded at depth" in line and "no verdict" in line, line


@pytest.mark.parametrize("workers", ["1", "2"])
def test_check_stops_at_a_time_budget_with_no_verdict(workers, capsys):
    """No time budget: a search too big for the machine ran on until killed. With
    --max-seconds it stops mid-search with one line (states, depth, seconds), exit 3."""
    assert cli.main(BIG + ["--workers", workers, "--max-seconds", "0.5"]) \
        == cli.EXIT_RUN_FAILED
    out, err = capsys.readouterr()
    (line,) = err.splitlines()
    assert re.search(r"time budget 0\.5 s exceeded at depth \d+ with [\d,]+ states "
                     r"after \d+\.\d s: no verdict", line), line
    assert "--max-seconds" in line and out == ""
    assert cli.main(["check", "--max-seconds", "-1"]) == cli.EXIT_USAGE
    assert cli.main(["check", "--max-seconds", "nan"]) == cli.EXIT_USAGE


def test_a_parallel_check_of_many_short_levels_keeps_its_time_budget(monkeypatch, capsys):
    """The coordinator looked at the clock only when a worker took longer than LOOK_S to
    answer: levels of a quarter second each ran a 0.5 s budget for 8 s (20 on the CI
    machine). With no wait ever timing out (LOOK_S of an hour), the budget still holds."""
    from lockstep.model import parallel
    monkeypatch.setattr(parallel, "LOOK_S", 3600.0)
    argv = ["check", "--mesh", "4", "--chunks", "4", "--workers", "2"]
    assert cli.main(argv + ["--max-seconds", "0.05"]) == cli.EXIT_RUN_FAILED
    (line,) = capsys.readouterr().err.splitlines()
    assert "time budget 0.05 s exceeded" in line, line


def test_a_long_check_prints_its_progress_without_being_asked(monkeypatch, capsys):
    """Without --progress a check that took minutes printed nothing until its verdict:
    it read as a hang. Past AUTO_AFTER_S (here 0) it prints its progress on its own;
    not on a terminal, as whole lines. A short check prints what it always did."""
    from lockstep.model import meter
    argv = ["check", "--mesh", "2", "--chunks", "2"]
    assert cli.main(argv) == cli.EXIT_OK
    quiet = capsys.readouterr()
    assert quiet.err == "" and "verdict  clean" in quiet.out
    monkeypatch.setattr(meter, "AUTO_AFTER_S", 0.0)
    assert cli.main(BIG + ["--max-seconds", "1"]) == cli.EXIT_RUN_FAILED
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) >= 2 and "\r" not in "".join(lines), lines
    assert re.fullmatch(r"  [\d,]+ states  [\d,]+/s  depth \d+  frontier [\d,]+  \d+ s",
                        lines[0]), lines[0]
    assert "time budget 1 s exceeded" in lines[-1]
    assert cli.main(argv + ["--json"]) == cli.EXIT_OK
    assert capsys.readouterr().err == ""


def test_the_progress_line_on_a_terminal_is_rewritten_and_erased():
    """On a terminal the line is rewritten in place (a carriage return, padded over a
    longer line before) and erased at the end, so the verdict starts a clean line."""
    import io
    from lockstep.model.meter import Meter

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    m = Meter(True, stream=tty)
    m.next_line = 0.0
    m.look(123456, 7, 89)
    m.next_line = 0.0
    m.look(5, 8, 1)
    m.close()
    first, second, erase = tty.getvalue().split("\r")[1:4]
    assert first.startswith("  123,456 states") and len(second) == len(first)
    assert second.startswith("  5 states") and erase == " " * len(first)
