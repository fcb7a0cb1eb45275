"""Where the mesh's idle time goes: a per-chunk breakdown of the leader's gap between
Phase B k-1 and Phase B k, by the steps of which rank it waits on.

The window of chunk k on the leader runs from the end of its Phase B k-1 (the row tagged
``phase_b_done``) to the start of its Phase B k (the call-count all_gather that opens
Phase B: the leader's ``t_b_start``). Every leader step inside the window is counted with
the part of its interval that lies inside (``rank1.<thread> <label>``), the time between
two steps of one thread as ``between rows`` (the interpreter's own time: guards, the
update, tracing, hand-offs). A leader step that receives from a peer (its event names
the peer) is also split by what the peer was doing meanwhile: the peer's steps that
overlap the receive, clipped to it, and the rest of it per peer thread (``no row /
between rows``: the thread waited for a row to be enabled, or was between two). That is "which step of
which rank the mesh waits on".

Unlike conformance/overlap.py (rank0's clock only), this compares clocks across ranks:
it is only meaningful when every rank ran on one host, where ``time.monotonic_ns`` is one
system-wide clock (the embedded launcher's runs, the bench). Figures are means over the
steady chunks (so the parts add up to the total idle), after `warmup` windows.
"""
from __future__ import annotations

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
    lead = _intervals(run.ranks[LEADER].steps)
    peers = {r.rank: _intervals(r.steps) for r in run.ranks if r.rank != LEADER}
    windows, last_end = [], None
    for a, b, ev in lead:
        if ev.label in ends:
            last_end = b
        elif ev.label in starts and last_end is not None:
            windows.append((last_end, a))
            last_end = None
    windows = windows[warmup:]
    if not windows:
        out.why = "fewer Phase B windows than the warm-up"
        return out
    total = defaultdict(float)
    waits = defaultdict(lambda: defaultdict(float))
    for w0, w1 in windows:
        prev_end = defaultdict(lambda: w0)     # per leader thread
        for a, b, ev in lead:
            if b <= w0 or a >= w1:
                continue
            lo, hi = max(a, w0), min(b, w1)
            key = f"rank{LEADER}.{ev.thread} {ev.label}"
            total[key] += hi - lo
            total["between rows"] += max(0, lo - prev_end[ev.thread])
            prev_end[ev.thread] = hi
            peer = _peer_rank(model, ev.peer)
            if peer is not None and peer in peers and ev.op == "recv":
                covered = defaultdict(int)
                for pa, pb, pev in peers[peer]:
                    if pb <= lo or pa >= hi:
                        continue
                    d = min(pb, hi) - max(pa, lo)
                    waits[key][f"rank{peer}.{pev.thread} {pev.label}"] += d
                    covered[pev.thread] += d
                for thread, d in covered.items():
                    waits[key][f"rank{peer}.{thread} (no row / between rows)"] += max(
                        0, hi - lo - d)
        for end in prev_end.values():
            total["between rows"] += w1 - end
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
