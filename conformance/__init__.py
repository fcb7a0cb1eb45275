"""Conformance: load a run's per-rank traces, match them into happens-before, replay a
linearisation through the model's semantics, judge the invariants, measure overlap.

    from lockstep.conformance.report import conform, format_report
    rep = conform("runs/latest")          # Report: ok, events, events_per_s, divergence,
    print(format_report(rep))             # verdicts, failure_mode, ...

Modules: load (run directory -> events, TraceError), replay (happens-before + replay,
first divergence), report (conform, invariant verdicts), overlap (OverlapScore, verdict,
Chrome timeline), simulate (trace generator driven by the model), bench
(`python -m lockstep.conformance.bench`). This package imports model/ only: never torch or
runtime/ (checking a trace needs no GPU stack).
"""
from __future__ import annotations

import json
import sys


def cli_conform(run_dir, as_json: bool = False, reference=None) -> int:
    """`lockstep conform RUN_DIR [--json] [--reference FILE]`: 0 when the trace conforms
    (and, with a reference stream, the outputs and state agree with it), 1 otherwise."""
    from .report import conform, format_report
    rep = conform(run_dir)
    print(json.dumps(rep.as_dict(), indent=1) if as_json else format_report(rep))
    ok = rep.ok
    if reference:
        from .reference import cli_reference
        same, text = cli_reference(run_dir, reference)
        print(text)
        ok = ok and same
    return 0 if ok else 1


def cli_overlap(run_dir, out_dir) -> int:
    """`lockstep overlap RUN_DIR --out DIR`: writes overlap.txt/.json, timeline.json
    (Perfetto) and overlap.png (if matplotlib). 0 unless the trace is unreadable or
    shows the send-after-decode scheduling bug."""
    from .load import TraceError
    from .overlap import format_overlap, overlap_report
    try:
        ov = overlap_report(run_dir, out_dir)
    except TraceError as e:
        print(f"lockstep overlap: {e}", file=sys.stderr)
        return 1
    print(format_overlap(ov))
    print("files        " + ", ".join(f"{k}: {v}" for k, v in ov.files.items()))
    return 1 if ov.verdict.startswith("send-after-decode") else 0
