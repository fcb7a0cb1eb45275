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


def cli_conform(run_dir, as_json: bool = False, reference=None, last: int = 0,
                suffixes: bool = False) -> int:
    """`lockstep conform RUN_DIR [--json] [--reference FILE] [--last K] [--suffixes]`: 0
    when the trace conforms (and, with a reference stream, the outputs and state agree
    with it), 1 otherwise, 2 when RUN_DIR is not a run directory (`not_a_run`).
    `--suffixes`: also every suffix of the retained segments."""
    from .report import conform, format_report
    bad = not_a_run("conform", run_dir)
    if bad:
        return bad
    if suffixes:
        return cli_suffixes(run_dir)
    if reference:       # read first: a bad --reference is a usage error (2) before any work
        from .reference import cli_reference, load_reference
        reference = load_reference(reference)
    rep = conform(run_dir, last=last)
    print(json.dumps(rep.as_dict(), indent=1) if as_json else format_report(rep))
    ok = rep.ok
    if reference:
        same, text = cli_reference(run_dir, reference)
        print(text)
        ok = ok and same
    return 0 if ok else 1


def not_a_run(cmd: str, run_dir) -> int:
    """2 (said in one line naming the path) when `run_dir` is not a run directory or its
    run.json is unreadable, else 0: such a directory is a usage error, not a run that
    does not conform."""
    from .load import RunDirError, open_run_dir
    try:
        open_run_dir(run_dir)
    except RunDirError as e:
        print(f"lockstep {cmd}: {e.file}: {e.detail}", file=sys.stderr)
        return 2
    return 0


def cli_suffixes(run_dir) -> int:
    """The retained run, then each suffix of it (the newest K segments per rank, K from
    the most a rank holds minus one down to 1), one line each: 0 when all conform."""
    import time
    from pathlib import Path
    from .report import conform
    most = max((len(list(Path(run_dir).glob(f"rank{r}.*jsonl")))
                for r in range(64)), default=1)
    ok = True
    for k in [0] + list(range(most - 1, 0, -1)):
        c0 = time.process_time()
        rep = conform(run_dir, last=k)
        what = "retained run" if k == 0 else f"newest {k} segment{'s' if k > 1 else ''}"
        print(f"{what:22} {'conforms' if rep.ok else 'DIVERGES'}  {rep.replayed:>9,} "
              f"events  {time.process_time() - c0:.1f} CPU s"
              + ("" if rep.ok else f"\n{rep.divergence}"))
        ok = ok and rep.ok
    return 0 if ok else 1


def cli_overlap(run_dir, out_dir) -> int:
    """`lockstep overlap RUN_DIR --out DIR`: writes overlap.txt/.json, timeline.json
    (Perfetto) and overlap.png (if matplotlib). 0 unless the trace is malformed (1), or
    shows the send-after-decode scheduling bug (1), or RUN_DIR is not a run (2)."""
    from .load import TraceError
    from .overlap import format_overlap, overlap_report
    bad = not_a_run("overlap", run_dir)
    if bad:
        return bad
    try:
        ov = overlap_report(run_dir, out_dir)
    except TraceError as e:
        print(f"lockstep overlap: {e}", file=sys.stderr)
        return 1
    print(format_overlap(ov))
    print("files        " + ", ".join(f"{k}: {v}" for k, v in ov.files.items()))
    return 1 if ov.verdict.startswith("send-after-decode") else 0
