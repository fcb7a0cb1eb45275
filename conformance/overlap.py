"""Overlap metrics from rank0's trace alone: no clock is compared across ranks.

What the runtime records (and the simulator writes): on every rank0 step event whose row
emits an output (`decode_result`, the row tagged `emit`), a `meas` object with

  tA0_ns          monotonic time Phase A of this chunk started (rank0 clock)
  tA1_ns          monotonic time its envelope was ready (Phase A + preflight done)
  tRecv_ns        monotonic time its result was received (payload in hand)
  tEmit_ns        monotonic time its output was emitted (end of Phase C)
  t_b_ms          Phase B duration measured on the mesh (leader), carried in the result
  t_mesh_idle_ms  the leader's gap between the end of Phase B k-1 and the start of k
  q_in            envelopes in flight toward the mesh when decode starts (rank0's
                  `inflight`, <= D_in)
  q_out           results waiting for decode when decode starts, this one included
                  (`len(decode_q)`, <= D_out)

and the step's own `dur_ns` (Phase C time). Per chunk k, in emission order
(PROTOCOL.md, Overlap proof):

  period_k  = tEmit[k] - tEmit[k-1]
  stage0_k  = (tA1 - tA0) + (tEmit - tRecv)        rank0's side (includes decode-queue wait)
  stage1_k  = t_b_ms                               the mesh's side
  hidden_k  = max(0, stage0_k + stage1_k - period_k), capped at min(stage0_k, stage1_k)
  OverlapScore = median(hidden_k / min(stage0_k, stage1_k)) after warm-up

The cap keeps the score a fraction (1 = the shorter stage entirely hidden): stage0 as
defined includes the time a result waits in the decode queue, so without it a pipeline
with results queued would score above 1.

Medians skip the first `warmup` chunks (default max(2, D_in + D_out), fewer on short
runs). `work0` = (tA1 - tA0) + Phase C is rank0's busy time per chunk without the queue
wait; `max_stage_ms` / `sum_stage_ms` use it, since "period near max(stage0, stage1)"
is about stage *work*.

Verdict, from the PROTOCOL.md signatures, checked in this order:
  serialised (depth 1)             D_in or D_out is 1: correct, no overlap possible
  send-after-decode scheduling bug mesh idle tracks decode time (>= half of Phase C)
                                   with both queues near empty (q_in 0, q_out <= 1) and
                                   a low OverlapScore (< 0.5): rank0 sends k+1 after
                                   decoding k. Under R0a the same signature is the
                                   regime's design (envelope k+1 needs the decode of k):
                                   "serialised by R0a (by design)"
  stage-0 bound                    decode queue pinned at D_out and the mesh idle for
                                   more than 10% of Phase B: rank0 is the bottleneck
                                   (nothing left to hide, not a bug)
  stage-1 bound                    Phase B longer than rank0's work by > 10%, envelopes in
                                   flight pinned at D_in and the decode queue near empty:
                                   rank0 waits on the mesh (its idle time is then the
                                   control-plane transfers, not waiting for rank0)
  overlapping                      OverlapScore >= 0.30 (the minimal gate; the project
                                   aims for >= 0.9 with balanced stages)
  not overlapping                  anything else

Outputs of `overlap_report(run_dir, out_dir)`: overlap.txt, overlap.json, timeline.json
(Chrome trace-event format, opens in Perfetto / chrome://tracing: one process per rank,
one track per thread, each on its own rank's clock) and overlap.png when matplotlib is
importable (skipped otherwise; it is not a dependency).
"""
from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from .load import Run, load_run

MEAS_FIELDS = ("tA0_ns", "tA1_ns", "tRecv_ns", "tEmit_ns", "t_b_ms", "t_mesh_idle_ms",
               "q_in", "q_out")
GATE = 0.30


@dataclass
class ChunkTiming:
    k: int                    # emission index
    chunk: Optional[int]
    epoch: Optional[int]
    a_ms: float               # tA1 - tA0
    c_ms: float               # Phase C (the decode step's dur_ns)
    wait_ms: float            # tEmit - tRecv - c_ms: time in the decode queue
    stage0_ms: float
    stage1_ms: float
    period_ms: Optional[float]
    hidden_ms: Optional[float]
    ratio: Optional[float]    # hidden / min(stage0, stage1)
    mesh_idle_ms: float
    q_in: int
    q_out: int
    emit_ms: float            # tEmit relative to the first emission (rank0 clock)


@dataclass
class Overlap:
    chunks: list = field(default_factory=list)
    measured: int = 0         # chunks after warm-up with a period
    warmup: int = 0
    d_in: int = 0
    d_out: int = 0
    regime: str = "R1"
    period_ms: float = 0.0
    stage0_ms: float = 0.0
    stage1_ms: float = 0.0
    work0_ms: float = 0.0
    max_stage_ms: float = 0.0
    sum_stage_ms: float = 0.0
    overlap_score: float = 0.0
    mesh_idle_ms: float = 0.0
    decode_ms: float = 0.0
    q_in: float = 0.0
    q_out: float = 0.0
    verdict: str = "insufficient data"
    why: str = ""
    files: dict = field(default_factory=dict)

    def summary_line(self) -> str:
        if not self.measured:
            return f"{self.verdict} ({self.why})"
        return (f"{self.verdict}: period {self.period_ms:.2f} ms, stage0 "
                f"{self.stage0_ms:.2f} ms (work {self.work0_ms:.2f}), stage1 "
                f"{self.stage1_ms:.2f} ms, OverlapScore {self.overlap_score:.2f}, mesh idle "
                f"{self.mesh_idle_ms:.2f} ms, q_in {self.q_in:g} q_out {self.q_out:g} "
                f"(median of {self.measured} chunks after {self.warmup} warm-up)")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["chunks"] = [asdict(c) for c in self.chunks]
        return d


def emit_events(run: Run) -> list:
    """rank0's emitting step events that carry the overlap measurements."""
    from .report import _rows_with
    from lockstep.model.semantics import Model
    from lockstep.model.tables import shipped_tables
    emit = _rows_with(Model(run.cfg, shipped_tables()), lambda r: "emit" in r.tags)
    return [ev for ev in run.ranks[0].steps
            if ev.label in emit and ev.meas and all(
                type(ev.meas.get(f)) in (int, float) for f in MEAS_FIELDS[:4]) and all(
                type(ev.meas.get(f, 0)) in (int, float) or ev.meas.get(f) is None
                for f in MEAS_FIELDS[4:])]


def analyse(run_or_dir, warmup: Optional[int] = None) -> Overlap:
    run = run_or_dir if isinstance(run_or_dir, Run) else load_run(run_or_dir)
    cfg = run.cfg
    ov = Overlap(d_in=cfg.d_in, d_out=cfg.d_out, regime=cfg.regime)
    evs = emit_events(run)
    if not evs:
        ov.why = "no decode_result step of rank0 carries the overlap measurements"
        return ov
    t_first = evs[0].meas["tEmit_ns"]
    prev_emit = None
    for k, ev in enumerate(evs):
        me = ev.meas
        a = (me["tA1_ns"] - me["tA0_ns"]) / 1e6
        c = (ev.dur_ns or 0) / 1e6
        tail = (me["tEmit_ns"] - me["tRecv_ns"]) / 1e6
        s0 = a + tail
        s1 = float(me.get("t_b_ms") or 0.0)
        period = hidden = ratio = None
        if prev_emit is not None:
            period = (me["tEmit_ns"] - prev_emit) / 1e6
            lo = min(s0, s1)
            hidden = min(max(0.0, s0 + s1 - period), lo)
            ratio = hidden / lo if lo > 0 else None
        prev_emit = me["tEmit_ns"]
        msg = ev.msg if ev.has_msg and isinstance(ev.msg, tuple) and len(ev.msg) == 7 \
            else None
        ov.chunks.append(ChunkTiming(
            k=k, chunk=msg[2] if msg else None, epoch=msg[3] if msg else None,
            a_ms=a, c_ms=c, wait_ms=max(0.0, tail - c), stage0_ms=s0, stage1_ms=s1,
            period_ms=period, hidden_ms=hidden, ratio=ratio,
            mesh_idle_ms=float(me.get("t_mesh_idle_ms") or 0.0),
            q_in=int(me.get("q_in") or 0), q_out=int(me.get("q_out") or 0),
            emit_ms=(me["tEmit_ns"] - t_first) / 1e6))
    n = len(ov.chunks)
    if warmup is None:
        warmup = max(2, cfg.d_in + cfg.d_out)
    warmup = max(1, min(warmup, n // 3))
    ov.warmup = warmup
    steady = [c for c in ov.chunks[warmup:] if c.period_ms is not None]
    ov.measured = len(steady)
    if len(steady) < 2:
        ov.why = f"only {n} chunks emitted"
        return ov
    med = statistics.median
    ov.period_ms = med(c.period_ms for c in steady)
    ov.stage0_ms = med(c.stage0_ms for c in steady)
    ov.stage1_ms = med(c.stage1_ms for c in steady)
    ov.work0_ms = med(c.a_ms + c.c_ms for c in steady)
    ov.decode_ms = med(c.c_ms for c in steady)
    ov.max_stage_ms = max(ov.work0_ms, ov.stage1_ms)
    ov.sum_stage_ms = ov.work0_ms + ov.stage1_ms
    ratios = [c.ratio for c in steady if c.ratio is not None]
    ov.overlap_score = med(ratios) if ratios else 0.0
    ov.mesh_idle_ms = med(c.mesh_idle_ms for c in steady)
    ov.q_in = med(c.q_in for c in steady)
    ov.q_out = med(c.q_out for c in steady)
    ov.verdict, ov.why = _verdict(ov)
    return ov


def _verdict(ov: Overlap) -> tuple:
    if ov.d_in == 1 or ov.d_out == 1:
        return "serialised (depth 1)", ("depth 1 is correct but cannot overlap: period "
                                        f"{ov.period_ms:.2f} ms vs stage sum "
                                        f"{ov.sum_stage_ms:.2f} ms")
    if ov.q_in < 1 and ov.q_out <= 1 and ov.decode_ms > 0 and \
            ov.mesh_idle_ms >= 0.5 * ov.decode_ms and ov.overlap_score < 0.5:
        if ov.regime == "R0a":
            return "serialised by R0a (by design)", (
                f"under R0a envelope k+1 is built from the decode of k, so the mesh idles "
                f"{ov.mesh_idle_ms:.2f} ms per chunk (decode {ov.decode_ms:.2f} ms) with "
                f"both queues near empty: the recompute regime's cost, not a bug")
        return "send-after-decode scheduling bug", (
            f"mesh idle {ov.mesh_idle_ms:.2f} ms tracks decode {ov.decode_ms:.2f} ms with "
            f"both queues near empty (q_in {ov.q_in:g}, q_out {ov.q_out:g}): rank0 sends "
            f"envelope k+1 only after decoding k")
    if ov.q_out >= ov.d_out and ov.mesh_idle_ms > 0.1 * ov.stage1_ms:
        return "stage-0 bound", (
            f"decode queue pinned at D_out={ov.d_out}, mesh idle {ov.mesh_idle_ms:.2f} ms "
            f"per chunk: rank0's {ov.work0_ms:.2f} ms is the bottleneck")
    if ov.stage1_ms > 1.1 * ov.work0_ms and ov.q_in >= ov.d_in and ov.q_out <= 1:
        return "stage-1 bound", (f"Phase B {ov.stage1_ms:.2f} ms > rank0 work "
                                 f"{ov.work0_ms:.2f} ms; envelopes in flight at D_in="
                                 f"{ov.d_in}, decode queue near empty: rank0 waits on the "
                                 f"mesh")
    if ov.overlap_score >= GATE:
        return "overlapping", (f"OverlapScore {ov.overlap_score:.2f} >= {GATE}; period "
                               f"{ov.period_ms:.2f} ms vs max stage {ov.max_stage_ms:.2f} ms,"
                               f" sum {ov.sum_stage_ms:.2f} ms")
    return "not overlapping", f"OverlapScore {ov.overlap_score:.2f} < {GATE}"


def format_overlap(ov: Overlap) -> str:
    lines = [f"overlap      {ov.summary_line()}", f"why          {ov.why}"]
    if ov.measured:
        lines.append(f"stages       max(stage0 work, stage1) {ov.max_stage_ms:.2f} ms, "
                     f"sum {ov.sum_stage_ms:.2f} ms, period {ov.period_ms:.2f} ms "
                     f"({ov.period_ms / ov.max_stage_ms:.2f} x max)" if ov.max_stage_ms
                     else "stages       -")
    lines.append(f"{'k':>4} {'chunk':>5} {'ep':>3} {'period':>8} {'stage0':>8} "
                 f"{'stage1':>8} {'hidden':>8} {'ratio':>6} {'idle':>7} {'q_in':>4} "
                 f"{'q_out':>5}")
    for c in ov.chunks[:200]:
        f = (lambda x, w=8: f"{x:{w}.2f}" if x is not None else f"{'-':>{w}}")
        lines.append(f"{c.k:>4} {c.chunk if c.chunk is not None else '-':>5} "
                     f"{c.epoch if c.epoch is not None else '-':>3} {f(c.period_ms)} "
                     f"{f(c.stage0_ms)} {f(c.stage1_ms)} {f(c.hidden_ms)} {f(c.ratio, 6)} "
                     f"{f(c.mesh_idle_ms, 7)} {c.q_in:>4} {c.q_out:>5}")
    if len(ov.chunks) > 200:
        lines.append(f"... {len(ov.chunks) - 200} more chunks in overlap.json")
    return "\n".join(lines)


# ---------------------------------------------------------------------- timeline

def chrome_trace(run: Run, path, max_events: int = 200_000) -> int:
    """Write a Chrome trace-event JSON timeline: pid = rank, tid = thread, ts in us on
    each rank's own clock (starting at 0 per rank). Returns the events written."""
    out = []
    written = 0
    for rt in run.ranks:
        r = rt.rank
        out.append({"name": "process_name", "ph": "M", "pid": r,
                    "args": {"name": f"rank{r} {rt.role}"}})
        out.append({"name": "process_sort_index", "ph": "M", "pid": r,
                    "args": {"sort_index": r}})
        tids = {}
        if not rt.steps:
            continue
        t0 = min(ev.t_ns - ev.dur_ns for ev in rt.steps)
        for ev in rt.steps:
            if written >= max_events:
                break
            tid = tids.setdefault(ev.thread, len(tids))
            args = {"i": ev.i, "src": ev.src, "dst": ev.dst, "line": ev.line}
            if ev.op in ("send", "recv"):
                args.update(peer=ev.peer, chan_i=ev.chan_i)
            elif ev.op == "coll":
                args.update(group=ev.group, gseq=ev.gseq)
            if ev.has_msg and isinstance(ev.msg, tuple) and len(ev.msg) == 7:
                args.update(call_id=ev.msg[1], chunk=ev.msg[2], epoch=ev.msg[3])
            out.append({"name": ev.label, "cat": ev.op, "ph": "X", "pid": r, "tid": tid,
                        "ts": (ev.t_ns - ev.dur_ns - t0) / 1e3,
                        "dur": max(ev.dur_ns, 1) / 1e3, "args": args})
            written += 1
            if ev.meas and "q_in" in ev.meas:
                out.append({"name": "queues", "ph": "C", "pid": r,
                            "ts": (ev.t_ns - t0) / 1e3,
                            "args": {"q_in": ev.meas.get("q_in"),
                                     "q_out": ev.meas.get("q_out")}})
        for name, tid in tids.items():
            out.append({"name": "thread_name", "ph": "M", "pid": r, "tid": tid,
                        "args": {"name": name}})
    Path(path).write_text(json.dumps({
        "traceEvents": out, "displayTimeUnit": "ms",
        "otherData": {"run": str(run.path), "config": run.cfg.describe(),
                      "clocks": "per rank (never compared across ranks)",
                      "truncated": written >= max_events}}))
    return written


def plot(ov: Overlap, path) -> bool:
    """period, stage0, stage1 per chunk as a PNG; False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ks = [c.k for c in ov.chunks]
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.plot(ks, [c.period_ms if c.period_ms is not None else float("nan")
                 for c in ov.chunks], label="period")
    ax.plot(ks, [c.stage0_ms for c in ov.chunks], label="stage0 (A + wait + C)")
    ax.plot(ks, [c.a_ms + c.c_ms for c in ov.chunks], label="stage0 work (A + C)",
            linestyle=":")
    ax.plot(ks, [c.stage1_ms for c in ov.chunks], label="stage1 (Phase B)")
    ax.axvline(ov.warmup - 0.5, color="grey", linewidth=0.5)
    ax.set_xlabel("chunk (emission order)")
    ax.set_ylabel("ms")
    ax.set_title(f"{ov.verdict}: OverlapScore {ov.overlap_score:.2f}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def overlap_report(run_dir, out_dir, warmup: Optional[int] = None) -> Overlap:
    """Analyse a run and write overlap.txt/.json, timeline.json and (maybe) overlap.png."""
    run = load_run(run_dir)
    ov = analyse(run, warmup)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overlap.txt").write_text(format_overlap(ov) + "\n")
    (out / "overlap.json").write_text(json.dumps(ov.as_dict(), indent=1) + "\n")
    chrome_trace(run, out / "timeline.json")
    ov.files = {"text": str(out / "overlap.txt"), "json": str(out / "overlap.json"),
                "timeline": str(out / "timeline.json")}
    if plot(ov, out / "overlap.png"):
        ov.files["plot"] = str(out / "overlap.png")
    (out / "overlap.json").write_text(json.dumps(ov.as_dict(), indent=1) + "\n")
    return ov
