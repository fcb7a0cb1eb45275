"""Where one chunk's time goes, row by row: every rank's steps between the end of the
leader's Phase B k-1 and the end of its Phase B k, as offsets from the first (median
over the steady chunks of their start and end, in us), in the order they start.

At depth 1 this is the whole chain: result k-1 goes leader -> rank0, Phase C, Phase A
builds envelope k, envelope k goes rank0 -> leader -> mesh, Phase B k. A step's row
says where its time is: its interval is the op (the backend's wait, or a local row's
work), and the gap before a thread's next step is the interpreter between two rows (the
guards, the update, the trace line, the hand-offs) or a wait for a row to be enabled.

A row taken several times a window (a generator call per denoising step) is listed per
occurrence (`#2`, ...). Like conformance/idle.py this compares clocks across ranks:
meaningful only when every rank ran on one host (the bench's runs)."""
from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass

from .idle import LEADER, _intervals, _labels


@dataclass
class Entry:
    what: str          # "rank0.comms recv_result_header" (+ " #2" for a repeat)
    start_us: float    # median start after the window opened
    end_us: float      # median end
    chunks: int        # windows it occurred in


def chunk_timeline(run, warmup: int = 3) -> list:
    """[Entry] of the steady windows, by median start; [] if there are none."""
    from lockstep.model.semantics import Model
    from lockstep.model.tables import shipped_tables
    ends = _labels(Model(run.cfg, shipped_tables()), lambda r: "phase_b_done" in r.tags)
    marks = sorted(b for _, b, ev in _intervals(run.ranks[LEADER].steps) if ev.label in ends)
    windows = list(zip(marks, marks[1:]))[warmup:]
    if not windows:
        return []
    steps = sorted((a, b, f"rank{r.rank}.{ev.thread} {ev.label}")
                   for r in run.ranks for a, b, ev in _intervals(r.steps))
    offs = defaultdict(list)
    k = 0
    for w0, w1 in windows:
        seen = defaultdict(int)
        while k < len(steps) and steps[k][0] < w0:
            k += 1
        j = k
        while j < len(steps) and steps[j][0] < w1:
            a, b, what = steps[j]
            seen[what] += 1
            key = what if seen[what] == 1 else f"{what} #{seen[what]}"
            offs[key].append(((a - w0) / 1e3, (b - w0) / 1e3))
            j += 1
    out = [Entry(key, statistics.median(s for s, _ in v), statistics.median(e for _, e in v),
                 len(v)) for key, v in offs.items()]
    return sorted(out, key=lambda e: (e.start_us, e.end_us))


def lines(entries: list, min_share: float = 0.5, windows: int | None = None) -> list:
    """One line per entry that occurred in at least `min_share` of the windows."""
    if not entries:
        return ["  (no timeline: fewer Phase B windows than the warm-up)"]
    n = windows or max(e.chunks for e in entries)
    out = [f"  {'step (rank.thread row)':<46} {'start':>8} {'end':>8} {'took':>7}  (us, "
           f"median of {n} chunks)"]
    for e in entries:
        if e.chunks >= min_share * n:
            out.append(f"  {e.what:<46} {e.start_us:8.0f} {e.end_us:8.0f} "
                       f"{e.end_us - e.start_us:7.0f}")
    return out
