"""Row coverage: which shipped rows a set of recorded runs exercised, per role and thread.

A row is named by (role, thread, label): the tables repeat one row in several states
(rank0's comms thread over its pair states, the drain copies of decode), and a trace
exercises the row when any copy fires. A shipped row no committed trace exercises is
either dead protocol (the model cannot reach it either) or a run the corpus is
missing; `tests/test_traces.py` fails on it (STYLE.md: "sometimes" properties, trace
corpora judged by the rows they exercise).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from lockstep.model.tables import shipped_rows
from lockstep.model.tracefmt import CHECKPOINT, KEY_THREADS, loads


def shipped() -> dict:
    """(role, thread) -> sorted labels of the shipped tables."""
    out = {}
    for role, rows in shipped_rows().items():
        for r in rows:
            out.setdefault((role, r.thread), set()).add(r.label)
    return {k: sorted(v) for k, v in sorted(out.items())}


def exercised(run_dirs) -> set:
    """{(role, thread, label)} of every step event in the runs' rank*.jsonl files. A
    line that is JSON of another shape (not an object, a step without its role, thread
    or label as strings) is a ValueError naming its file and line: counted, it would
    name a row that never ran."""
    seen = set()
    for d in run_dirs:
        for f in sorted(Path(d).glob("rank*.jsonl")):
            role = None
            for ln, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
                try:
                    ev = loads(line)
                except ValueError:
                    continue          # a last line cut by kill -9
                if type(ev) is not dict:
                    raise ValueError(f"{f} line {ln}: not a JSON object")
                kind = ev.get("ev")
                if kind == "step":
                    row = (ev.get("role"), ev.get("thread"), ev.get("label"))
                elif kind == CHECKPOINT:          # format 2: the role is the file's
                    role = ev.get("role")
                    continue
                elif kind is None:
                    key = next((k for k in KEY_THREADS if k in ev), None)
                    if key is None:
                        raise ValueError(f"{f} line {ln}: a format-2 step names its "
                                         "row's label (\"l\" or \"c\")")
                    row = (role, KEY_THREADS[key], ev[key])
                else:
                    continue
                if not all(type(x) is str for x in row):
                    raise ValueError(f"{f} line {ln}: role, thread and label of a step "
                                     f"are strings, got {row!r:.80}")
                seen.add(row)
    return seen


def coverage(run_dirs) -> dict:
    """(role, thread) -> {"run": [...], "never": [...]} over the shipped rows."""
    seen = exercised(run_dirs)
    return {k: {"run": [lb for lb in labels if (*k, lb) in seen],
                "never": [lb for lb in labels if (*k, lb) not in seen]}
            for k, labels in shipped().items()}


def format_coverage(cov: dict) -> str:
    total = sum(len(c["run"]) + len(c["never"]) for c in cov.values())
    run = sum(len(c["run"]) for c in cov.values())
    out = [f"row coverage: {run} / {total} shipped (role, thread, row) exercised"]
    for (role, thread), c in cov.items():
        out.append(f"  {role}.{thread}: {len(c['run'])}/{len(c['run']) + len(c['never'])}")
        if c["never"]:
            out.append(f"    never ran: {', '.join(c['never'])}")
    return "\n".join(out)


def cli_coverage(run_dirs) -> int:
    """`lockstep coverage RUN_DIR...`: 0 when every shipped row was exercised; 2 when a
    directory holds no trace (a typo would otherwise read as "nothing ran")."""
    for d in run_dirs:
        if not any(Path(d).glob("rank*.jsonl")):
            print(f"lockstep coverage: {d}: no rank traces (rank*.jsonl) here", file=sys.stderr)
            return 2
    cov = coverage(run_dirs)
    print(format_coverage(cov))
    return 0 if not any(c["never"] for c in cov.values()) else 1
