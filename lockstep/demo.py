"""`lockstep demo`: the README's main job on the embedded default.

Model check (full PP1 configuration and every mutation), the z3 proofs, a CPU/gloo run of rank0 + a
3-rank mesh with a hard cut running the tensor-parallel causal DiT (runtime/dit.py), its
conformance check and overlap report, its equivalence with the same stream computed in one
process without PP or TP, the state diagrams, and a short summary; everything lands in one
output directory.
"""
from __future__ import annotations

import json
import time
from pathlib import Path


def demo(out: Path, chunks: int = 24, mesh: int = 3) -> int:
    from lockstep.model import check as chk
    from lockstep.model.config import Config
    from lockstep.runtime.run import run_local

    out.mkdir(parents=True, exist_ok=True)
    summary, ok = [], True
    t0 = time.perf_counter()

    full = Config(mesh=4, d_in=2, d_out=2, chunks=3, hard_cut=True, faults=1)
    r = chk.check(full)
    (out / "model_check.txt").write_text(chk.format_result(r) + "\n")
    ok &= r.verdict == "clean"
    summary.append(f"model check  full PP1 ({full.describe()}): {r.verdict}, "
                   f"{r.states:,} states in {r.seconds:.2f} s ({r.states_per_s:,.0f}/s), "
                   f"peak {r.peak_mb:.0f} MB")

    shipped, rows = chk.all_mutations(Config(mesh=2, chunks=2))
    table, caught = chk.mutation_table(shipped, rows)
    (out / "mutations.txt").write_text(table + "\n")
    ok &= caught
    summary.append(f"mutations    {sum(r.verdict == m.expected for m, r in rows)}/{len(rows)}"
                   f" caught with the predicted verdict; shipped protocol {shipped.verdict}")

    from lockstep.model.prove import prove_all
    obligations = prove_all()
    (out / "prove.txt").write_text("\n".join(
        f"{'PASS' if o.ok else 'FAIL'}  {o.name}: {o.detail}" for o in obligations) + "\n")
    ok &= all(o.ok for o in obligations)
    summary.append(f"z3 proofs    {sum(o.ok for o in obligations)}/{len(obligations)} "
                   f"obligations proved (contract, guards, group rules)")

    cfg = Config(mesh=mesh, d_in=2, d_out=2, chunks=chunks, hard_cut=True, steps=2)
    # The workload is the tensor-parallel causal DiT of runtime/dit.py (docs/plugin.md).
    opts = {"workload": "dit", "hard_cut_at": chunks // 3,
            "costs": {"phase_a_ms": 4.0, "phase_b_ms": 4.0, "phase_c_ms": 4.0}}
    run_dir = out / "run"
    res = run_local(cfg, opts, run_dir, deadline_s=120)
    (out / "run.txt").write_text(res.summary() + "\n")
    outputs = json.loads((run_dir / "outputs.json").read_text()) \
        if (run_dir / "outputs.json").exists() else []
    ok &= res.ok
    summary.append(f"gloo run     rank0 + mesh of {mesh}, {chunks} chunks, hard cut at "
                   f"{opts['hard_cut_at']}: {'all ranks exited 0' if res.ok else 'FAILED'}; "
                   f"{len(outputs)} outputs emitted; traces in {run_dir}")

    summary += _conformance(run_dir, out)
    line, same = _equivalence(cfg, opts, run_dir, out)
    ok &= same
    summary.append(line)
    summary += _diagrams(out)
    summary.append(f"total        {time.perf_counter() - t0:.1f} s; outputs in {out}")
    text = "\n".join(summary)
    (out / "SUMMARY.txt").write_text(text + "\n")
    print(text)
    return 0 if ok else 1


def _conformance(run_dir: Path, out: Path) -> list:
    try:
        from lockstep.conformance.report import conform, format_report
    except ImportError:
        return ["conformance  (not available in this build)"]
    rep = conform(run_dir)
    (out / "conformance.txt").write_text(format_report(rep) + "\n")
    lines = [f"conformance  {'trace conforms' if rep.ok else 'DIVERGES'} "
             f"({rep.events:,} events)"]
    try:
        from lockstep.conformance.overlap import overlap_report
        ov = overlap_report(run_dir, out / "overlap")
        lines.append(f"overlap      {ov.summary_line()}")
    except (ImportError, AttributeError) as e:
        lines.append(f"overlap      (not available: {e})")
    return lines


def _equivalence(cfg, opts, run_dir: Path, out: Path) -> tuple:
    """The run's outputs and state against the same stream computed in one process
    without PP or TP (lockstep/equivalence.py)."""
    from lockstep.conformance.reference import compare
    from lockstep.equivalence import reference_stream
    ref = reference_stream(cfg.regime, chunks=cfg.chunks, steps=cfg.steps,
                           hard_cut_at=opts["hard_cut_at"])
    (out / "reference.json").write_text(json.dumps(ref))
    v = compare(run_dir, ref)
    return f"equivalence  vs one process without PP/TP: {v.line()}", v.ok


def _diagrams(out: Path) -> list:
    try:
        from lockstep.model.render import render_all
    except ImportError:
        return ["diagrams     (not available in this build)"]
    try:
        files = render_all(out / "diagrams")
    except Exception as e:  # noqa: BLE001 - graphviz missing is reported, not fatal
        return [f"diagrams     not rendered: {type(e).__name__}: {e}"]
    return [f"diagrams     {len(files)} files in {out / 'diagrams'}"]
