"""Where the mesh's idle time goes: a per-chunk breakdown of the leader's gap between
Phase B k-1 and Phase B k, by the steps of which rank and thread it waits on.

The window of chunk k is the leader's main thread (the one that drives the mesh) from the
end of its Phase B k-1 (the row tagged ``phase_b_done``) to the start of its Phase B k (the
call-count all_gather that opens Phase B). Every main-thread step inside the window is a
part (``rank1.main <label>``, the part of its interval inside the window), and the time
between two of them is ``between rows`` (main waited for a row to be enabled, typically
for its comms thread to queue an envelope, or was in the interpreter itself: guards, the
update, tracing, hand-offs); the parts add up to the window. What main waits on is the
rest of the job meanwhile: for ``between rows`` and for every main step that receives
from a peer, the steps of the leader's other threads and of every rank the leader
exchanges point-to-point messages with (rank0), clipped to the interval, and the rest of
it per such thread (``no row / between rows``: that thread waited for a row to be
enabled, or was between two). That is "which step of which rank the mesh waits on".

Unlike conformance/overlap.py (rank0's clock only), this compares clocks across ranks:
it is only meaningful when every rank ran on one host, where ``time.monotonic_ns`` is one
system-wide clock (the embedded launcher's runs, the bench). Figures are means over the
steady chunks (so the parts add up to the total idle), after `warmup` windows.
"""
from __future__ import annotations

import bisect
from collections import defaultdict
from dataclasses import dataclass, field

from lockstep.model.ops import COUNTS, Coll

LEADER = 1


@dataclass
class Part:
    what: str                  # "rank1.main recv_envelope_header" or "between rows"
    ms: float                  # mean per chunk
    waits_on: list = field(default_factory=list)   # [(peer step, ms)] for a receive


@dataclass
class IdleBreakdown:
    chunks: int = 0
    idle_ms: float = 0.0
    parts: list = field(default_factory=list)
    why: str = ""

    def lines(self, top: int = 4) -> list:
        if not self.chunks:
            return [f"  (no breakdown: {self.why})"]
        out = [f"  mesh idle per chunk (leader, Phase B k-1 end -> Phase B k start), mean "
               f"of {self.chunks} chunks: {self.idle_ms:.3f} ms"]
        for p in sorted(self.parts, key=lambda p: -p.ms):
            out.append(f"    {p.what:<44} {p.ms:8.3f} ms")
            for what, ms in sorted(p.waits_on, key=lambda w: -w[1])[:top]:
                out.append(f"      waits on {what:<38} {ms:8.3f} ms")
        return out


def _intervals(steps):
    return [(ev.t_ns - (ev.dur_ns or 0), ev.t_ns, ev) for ev in steps]


class _Overlaps:
    """Intervals sorted by start: those overlapping [lo, hi) without a scan of them all."""

    def __init__(self, items, span=lambda x: x):
        self.items = sorted(items, key=lambda x: span(x)[0])
        self.starts = [span(x)[0] for x in self.items]
        self.span = span
        self.longest = max((span(x)[1] - span(x)[0] for x in self.items), default=0)

    def __call__(self, lo, hi):
        k = bisect.bisect_left(self.starts, lo - self.longest)
        for x in self.items[k:bisect.bisect_left(self.starts, hi)]:
            if self.span(x)[1] > lo:
                yield x


def _labels(model, pred) -> set:
    return {r.label for table in model.tables[LEADER] for rows in table.values()
            for r in rows if pred(r)}


def idle_breakdown(run, warmup: int = 3) -> IdleBreakdown:
    from lockstep.model.semantics import Model
    from lockstep.model.tables import shipped_tables
    model = Model(run.cfg, shipped_tables())
    ends = _labels(model, lambda r: "phase_b_done" in r.tags)
    starts = _labels(model, lambda r: isinstance(r.op, Coll) and r.op.kind == COUNTS)
    out = IdleBreakdown()
    steps = _intervals(run.ranks[LEADER].steps)
    mesh_thread = next((ev.thread for _, _, ev in steps if ev.label in starts), None)
    main = [s for s in steps if s[2].thread == mesh_thread]
    peer_ranks = {_peer_rank(model, ev.peer) for _, _, ev in steps} - {None, LEADER}
    others = [(f"rank{LEADER}.{s[2].thread}", s) for s in steps if s[2].thread != mesh_thread]
    others += [(f"rank{r.rank}.{s[2].thread}", s) for r in run.ranks if r.rank in peer_ranks
               for s in _intervals(r.steps)]
    windows, last_end = [], None
    for a, b, ev in main:
        if ev.label in ends:
            last_end = b
        elif ev.label in starts and last_end is not None:
            windows.append((last_end, a))
            last_end = None
    windows = windows[warmup:]
    in_main = _Overlaps(main)
    in_others = _Overlaps(others, span=lambda x: x[1])
    if not windows:
        out.why = "fewer Phase B windows than the warm-up"
        return out
    total = defaultdict(float)
    waits = defaultdict(lambda: defaultdict(float))

    def waits_on(key, lo, hi):
        covered = defaultdict(int)
        for who, (pa, pb, pev) in in_others(lo, hi):
            d = min(pb, hi) - max(pa, lo)
            waits[key][f"{who} {pev.label}"] += d
            covered[who] += d
        for who, d in covered.items():
            waits[key][f"{who} (no row / between rows)"] += max(0, hi - lo - d)

    for w0, w1 in windows:
        prev_end = w0
        for a, b, ev in in_main(w0, w1):
            lo, hi = max(a, w0), min(b, w1)
            if lo > prev_end:
                total["between rows"] += lo - prev_end
                waits_on("between rows", prev_end, lo)
            key = f"rank{LEADER}.{ev.thread} {ev.label}"
            total[key] += hi - lo
            if ev.op == "recv" and ev.peer is not None:
                waits_on(key, lo, hi)
            prev_end = max(prev_end, hi)
        if w1 > prev_end:
            total["between rows"] += w1 - prev_end
            waits_on("between rows", prev_end, w1)
    n = len(windows)
    out.chunks = n
    out.idle_ms = sum(w1 - w0 for w0, w1 in windows) / n / 1e6
    out.parts = [Part(k, v / n / 1e6, [(w, ms / n / 1e6) for w, ms in waits[k].items()])
                 for k, v in total.items()]
    return out


def _peer_rank(model, peer):
    if peer is None:
        return None
    return model.index.get(peer)
