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
