"""Soak: a long stream with a hard cut every K chunks, measured from the launcher side.

    python -m lockstep.soak --chunks 20000 --cut-every 100 [--mesh 2] [--out runs/soak]

Prints, per rank, the resident memory (VmRSS from /proc/PID/status, sampled by the
launcher: the ranks do not measure themselves) as a
least-squares slope in MB per 1,000 chunks after warm-up and as the growth from the
first to the last sample after warm-up; the trace bytes per chunk (all ranks, deleted
segments included); and the time `lockstep conform` takes on the run, then on each
suffix of its retained segments (`--trace-segment-mb/-s`, `--trace-keep`). The chunk a sample belongs to is read from the
tail of rank0's trace. Lives in lockstep/ because it calls conformance (runtime/ must
not import it).
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

from lockstep.cli import add_segment_args
from lockstep.conformance.report import conform
from lockstep.model.config import Config
from lockstep.model.runopts import CutSchedule, RunOptions, StageCosts
from lockstep.runtime.run import run_local


def rss_kb(pid: int):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def last_chunk(trace: Path) -> int:
    """The highest chunk index in the last 8 KB of a trace (-1 if none yet)."""
    try:
        with open(trace, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 8192))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return -1
    best = -1
    for line in tail.splitlines()[1:]:       # the first may be cut
        try:
            m = json.loads(line).get("m")     # a format-2 step's message (model/tracefmt.py)
        except (ValueError, AttributeError):
            continue
        if type(m) is list and len(m) > 2 and type(m[2]) is int:
            best = max(best, m[2])
    return best


def slope(points) -> float:
    """Least-squares slope of (x, y) points (0 with fewer than two)."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return 0.0 if sxx == 0 else sum((x - mx) * (y - my) for x, y in points) / sxx


def written_bytes(out: Path) -> int:
    """Trace bytes the ranks wrote: the open segments plus every closed one (its size is
    in rank{R}.segments, deleted or not)."""
    total = sum(p.stat().st_size for p in Path(out).glob("rank*.jsonl")
                if p.name.count(".") == 1)
    for log in Path(out).glob("rank*.segments"):
        for line in log.read_text().splitlines():
            words = line.split()
            if "bytes" in words:
                total += int(words[words.index("bytes") + 1])
    return total


def warmup_chunks(chunks: int, warmup: int = 0) -> int:
    """Chunks before the memory fit starts: `warmup`, or 10% of the run and >= 200."""
    return warmup or max(200, chunks // 10)


def soak(out: Path, *, chunks: int, cut_every: int, mesh: int = 2, warmup: int = 0,
         period_s: float = 0.5, stage_b_ms: float = 0.0, conformance: bool = True,
         segment_mb: float = 0.0, segment_s: float = 0.0, keep: int = 0) -> dict:
    warmup = warmup_chunks(chunks, warmup)
    cuts = CutSchedule(every=cut_every) if cut_every else CutSchedule()
    cfg = Config(mesh=mesh, d_in=2, d_out=2, chunks=chunks, hard_cut=cuts.bound(chunks),
                 steps=2)
    opts = RunOptions(cuts=cuts, costs=StageCosts(phase_b_ms=stage_b_ms),
                      trace_segment_mb=segment_mb, trace_segment_s=segment_s, trace_keep=keep)
    samples = {r: [] for r in range(mesh + 1)}    # rank -> [(chunk, rss_kb)]
    done = threading.Event()

    def sampler(run):
        while not done.is_set():
            k = last_chunk(run.run_dir / "rank0.jsonl")
            for r, p in enumerate(run._procs):   # noqa: SLF001 - the launcher's own children
                kb = rss_kb(p.pid)
                if kb is not None and k >= 0:
                    samples[r].append((k, kb))
            done.wait(period_s)
    t0 = time.monotonic()
    res = run_local(cfg, opts, out, deadline_s=60.0 + chunks * 0.1, on_start=sampler)
    wall = time.monotonic() - t0
    done.set()
    trace_bytes = written_bytes(out)
    per_rank = {}
    for r, pts in samples.items():
        after = [(k, kb) for k, kb in pts if k >= warmup]
        per_rank[r] = {
            "samples": len(after),
            "rss_mb_start": round(after[0][1] / 1024, 2) if after else None,
            "rss_mb_end": round(after[-1][1] / 1024, 2) if after else None,
            "growth_mb": round((after[-1][1] - after[0][1]) / 1024, 3) if after else None,
            "slope_mb_per_1000": round(slope(after) * 1000 / 1024, 4),
        }
    report = {"chunks": chunks, "cut_every": cut_every, "mesh": mesh, "warmup": warmup,
              "ok": res.ok, "wall_s": round(wall, 1),
              "chunks_per_s": round(chunks / wall, 1),
              "trace_bytes": trace_bytes, "trace_bytes_per_chunk": round(trace_bytes / chunks),
              "ranks": per_rank}
    if conformance:
        t1, c1 = time.perf_counter(), time.process_time()
        rep = conform(out)
        report["conform_s"] = round(time.perf_counter() - t1, 1)
        report["conform_cpu_s"] = round(time.process_time() - c1, 1)
        report["conforms"] = rep.ok
        report["conform_divergence"] = rep.divergence
        report["suffixes"] = []
        most = max(len(list(Path(out).glob(f"rank{r}.*jsonl"))) for r in range(mesh + 1))
        for k in range(most - 1, 0, -1):     # every suffix of the retained segments
            c1 = time.process_time()
            rep = conform(out, last=k)
            report["suffixes"].append({"segments": k, "conforms": rep.ok,
                                       "events": rep.replayed,
                                       "cpu_s": round(time.process_time() - c1, 1),
                                       "divergence": rep.divergence})
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lockstep.soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=20000, help="INFER chunks (default: %(default)s)")
    ap.add_argument("--cut-every", type=int, default=100, help="a hard cut every K chunks (default: %(default)s)")
    ap.add_argument("--mesh", type=int, default=2, help="mesh ranks incl. the leader (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=0,
                    help="chunks before the memory fit starts (default: 10%%, >= 200)")
    ap.add_argument("--stage-b-ms", type=float, default=0.0,
                    help="synthetic Phase B cost per generator call, ms (default: %(default)s)")
    ap.add_argument("--no-conform", action="store_true", help="skip the conformance run")
    ap.add_argument("--out", default="runs/soak", help="run directory (default: %(default)s)")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    add_segment_args(ap)
    a = ap.parse_args(argv)
    warmup = warmup_chunks(a.chunks, a.warmup)
    if a.chunks <= warmup:   # no RSS sample after the warm-up: the report would be None
        print(f"python -m lockstep.soak: --chunks {a.chunks} leaves nothing after the "
              f"warm-up of {warmup} chunks, so no memory slope to fit: more --chunks, or "
              f"a smaller --warmup", file=sys.stderr)
        return 2
    rep = soak(Path(a.out).resolve(), chunks=a.chunks, cut_every=a.cut_every, mesh=a.mesh,
               warmup=a.warmup, stage_b_ms=a.stage_b_ms, conformance=not a.no_conform,
               segment_mb=a.trace_segment_mb, segment_s=a.trace_segment_s,
               keep=a.trace_keep)
    if a.json:
        print(json.dumps(rep, indent=1))
    else:
        print(f"soak: {rep['chunks']} chunks, a cut every {rep['cut_every']}, mesh "
              f"{rep['mesh']}: {'ok' if rep['ok'] else 'FAILED'} in {rep['wall_s']} s "
              f"({rep['chunks_per_s']} chunks/s); warm-up {rep['warmup']} chunks")
        for r, d in rep["ranks"].items():
            print(f"  rank {r}: RSS {d['rss_mb_start']} -> {d['rss_mb_end']} MB after "
                  f"warm-up (growth {d['growth_mb']} MB), slope "
                  f"{d['slope_mb_per_1000']} MB / 1000 chunks ({d['samples']} samples)")
        print(f"  traces: {rep['trace_bytes']} bytes, {rep['trace_bytes_per_chunk']} "
              f"bytes per chunk")
        if "conform_s" in rep:
            print(f"  conformance: {'conforms' if rep['conforms'] else 'DIVERGES'} in "
                  f"{rep['conform_s']} s ({rep['conform_cpu_s']} CPU s)"
                  + ("" if rep["conforms"] else f": {rep['conform_divergence']}"))
            for x in rep["suffixes"]:
                print(f"  suffix of the newest {x['segments']} segments: "
                      f"{'conforms' if x['conforms'] else 'DIVERGES'}, {x['events']} events "
                      f"in {x['cpu_s']} CPU s"
                      + ("" if x["conforms"] else f": {x['divergence']}"))
    ok = rep["ok"] and rep.get("conforms", True) and all(
        x["conforms"] for x in rep.get("suffixes", ()))
    return 0 if ok else 1


if __name__ == "__main__":
    from lockstep.cli import stoppable
    sys.exit(stoppable("python -m lockstep.soak", main))
