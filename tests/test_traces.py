"""Every recorded trace in traces/ (CPU/gloo and, when recorded, GPU/NCCL) conforms."""
from pathlib import Path

import pytest

from lockstep.conformance.report import conform, format_report

RUNS = sorted(p.parent for p in Path(__file__).resolve().parent.parent.glob(
    "traces/*/run.json"))


def test_the_corpus_is_not_empty():
    assert RUNS


@pytest.mark.parametrize("run_dir", RUNS, ids=lambda p: p.name)
def test_recorded_trace_conforms(run_dir):
    rep = conform(run_dir)
    assert rep.ok, format_report(rep)


# Shipped rows no committed run exercises yet, each with the reason; this list may only
# shrink (a row missing from the corpus and not listed here fails the test below). Empty:
# CI enforces that the corpus exercises every shipped row.
NOT_YET_EXERCISED: set = set()


def test_every_shipped_row_is_exercised_by_the_corpus():
    from lockstep.conformance.coverage import coverage, format_coverage
    cov = coverage(RUNS)
    never = {(role, thread, lb) for (role, thread), c in cov.items() for lb in c["never"]}
    assert never <= NOT_YET_EXERCISED, format_coverage(cov)
    stale = NOT_YET_EXERCISED - never
    assert not stale, f"exercised now, remove from NOT_YET_EXERCISED: {sorted(stale)}"


def test_coverage_reports_rows_that_never_ran(tmp_path):
    from lockstep.conformance.coverage import coverage
    cov = coverage([RUNS[0]] if RUNS else [])
    assert any(c["never"] for c in cov.values())     # one run cannot exercise every row
    assert coverage([tmp_path])[("rank0", "main")]["run"] == []


def test_coverage_of_a_directory_with_no_trace_is_a_usage_error(tmp_path, capsys):
    """A mistyped run directory used to read as "0 / 81 rows ran" (exit 1)."""
    from lockstep import cli
    assert cli.main(["coverage", str(tmp_path / "nosuch")]) == cli.EXIT_USAGE
    assert "no rank traces (rank*.jsonl)" in capsys.readouterr().err
    assert cli.main(["coverage", str(RUNS[0])]) == cli.EXIT_VIOLATION   # one run: rows left
