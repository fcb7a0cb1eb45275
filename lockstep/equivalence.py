"""`lockstep equivalence`: proof that PP and TP change nothing but speed.

For each regime, the stream (hard cut included) is computed once in this process by the
reference: the DiT workload of runtime/dit.py at mesh size 1, no PP, no TP, no
torch.distributed (its all_reduce is the identity), driven through the same plan rank0
decides (runtime.workload.infer_meta). Then the same stream runs under the lockstep
runtime (`run_local`, CPU/gloo, rank0 + a mesh of N) for each N, and
conformance/reference.py compares chunk by chunk: rank0's anchors, every mesh rank's
state (start frame, KV-cache positions exactly; KV values), the result's
`output_digest_i64` and the decoded latents and pixels. Mesh 1 must be bit-exact; TP is
held to conformance.reference.TOLERANCE (the why is in that module's docstring).

Each run is also replayed through the model (`conform`): the control plane conforms
while the equivalence check judges the state, which is the point of the drift cases
(`--drift NAME`): the trace conforms and the state is wrong.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

DEFAULTS = {"chunks": 6, "steps": 2, "hard_cut_at": 3}


def reference_stream(regime: str, *, chunks: int, steps: int, hard_cut_at,
                     spec=None, device="cpu", dtype=None) -> dict:
    """The stream computed in one process, as a reference file's content (on CPU in
    float32 unless told otherwise: the runtime's ranks compute on CPU by default)."""
    import torch
    from lockstep.model import contract as C
    from lockstep.runtime.dit import DiTSpec, DiTWorkload, spec_dict
    from lockstep.runtime.workload import infer_meta
    spec = spec or DiTSpec()
    records, outputs = [], []
    kw = dict(mesh_size=1, spec=spec, device=device, dtype=dtype or torch.float32)
    rank0 = DiTWorkload(rank=0, record=records.append, **kw)
    mesh = DiTWorkload(rank=1, record=records.append, **kw)
    epoch, init = 0, True

    def identity(t):
        return t

    with torch.no_grad():
        for k in range(chunks):
            if hard_cut_at is not None and k == hard_cut_at and k > 0:
                epoch, init = epoch + 1, True
            extra, tensors = rank0.build(k, epoch, init, regime, steps)
            meta = infer_meta(extra, call_id=k, chunk_index=k,
                                cache_epoch=epoch, init_cache=init, regime=regime,
                                steps=steps)
            init = False
            for i in range(meta["expected_generator_calls"]):
                mesh.generator_call(i, meta, tensors, identity)
            out = mesh.result(meta, tensors)
            rmeta = C.make_result_meta(meta, **mesh.result_meta(meta, out))
            outputs.append([k, epoch, rank0.decode(rmeta, out)])
    from lockstep.conformance.reference import REFERENCE_VERSION
    return {"version": REFERENCE_VERSION, "workload": "dit", "spec": spec_dict(spec),
            "regime": regime, "steps": steps, "chunks": chunks, "hard_cut_at": hard_cut_at,
            "records": records, "outputs": outputs}


def run_stream(mesh: int, regime: str, run_dir: Path, *, chunks: int, steps: int,
               hard_cut_at, spec_opts=None, drift=None, deadline_s: float = 60.0,
               costs=None):
    from lockstep.model.config import Config
    from lockstep.runtime.run import run_local
    cfg = Config(mesh=mesh, d_in=2, d_out=2, chunks=chunks, hard_cut=hard_cut_at is not None,
                 regime=regime, steps=steps)
    opts = {"workload": "dit", "dit": dict(spec_opts or {}), "hard_cut_at": hard_cut_at,
            "op_deadline_s": 20.0}
    if drift:
        opts["drift"] = dict(drift)
    if costs:
        opts["costs"] = dict(costs)
    return run_local(cfg, opts, run_dir, deadline_s=deadline_s)


def check_one(mesh: int, regime: str, out: Path, ref: dict, ref_path: Path, *,
              drift=None, deadline_s: float = 60.0, conform: bool = True) -> dict:
    from lockstep.conformance.reference import compare
    name = f"{regime}_mesh{mesh}" + (f"_{drift['name']}" if drift else "")
    run_dir = out / name
    t0 = time.perf_counter()
    res = run_stream(mesh, regime, run_dir, chunks=ref["chunks"], steps=ref["steps"],
                     hard_cut_at=ref["hard_cut_at"], spec_opts=ref["spec"], drift=drift,
                     deadline_s=deadline_s)
    row = {"name": name, "mesh": mesh, "regime": regime, "drift": drift,
           "run_ok": res.ok, "run": res.summary() if not res.ok else "all ranks exited 0",
           "run_dir": str(run_dir), "reference": str(ref_path),
           "seconds": round(time.perf_counter() - t0, 2)}
    v = compare(run_dir, ref, mesh=mesh)
    row.update(equivalent=v.ok and res.ok, exact=v.exact, line=v.line(), first=v.first,
               max_err=v.max_err, digests_equal=v.digests_equal, chunks=v.chunks,
               problems=v.problems[:20])
    if conform:
        from lockstep.conformance.report import conform as conform_run
        rep = conform_run(run_dir)
        row["conforms"] = bool(rep.ok)
    return row


def equivalence(out: Path, meshes=(1, 2, 3, 4), regimes=("R1", "R0a"), *, drift=None,
                chunks=DEFAULTS["chunks"], steps=DEFAULTS["steps"],
                hard_cut_at=DEFAULTS["hard_cut_at"], spec=None, deadline_s: float = 60.0,
                conform: bool = True, log=print) -> list:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for regime in regimes:
        ref = reference_stream(regime, chunks=chunks, steps=steps, hard_cut_at=hard_cut_at,
                               spec=spec)
        ref_path = out / f"reference_{regime}.json"
        ref_path.write_text(json.dumps(ref))
        for mesh in meshes:
            row = check_one(mesh, regime, out, ref, ref_path, drift=drift,
                            deadline_s=deadline_s, conform=conform)
            rows.append(row)
            if log:
                log(format_row(row))
    return rows


def format_row(row: dict) -> str:
    conf = {True: "trace conforms", False: "TRACE DIVERGES", None: ""}[row.get("conforms")]
    drift = f" drift={row['drift']['name']}@rank{row['drift'].get('rank')}" \
        if row["drift"] else ""
    return (f"{row['regime']:4} mesh {row['mesh']}{drift}: {row['line']}; {conf}; "
            f"{row['seconds']:.1f} s" + ("" if row["run_ok"] else f"; RUN FAILED: {row['run']}"))


def cli(a) -> int:
    from lockstep.runtime.dit import DRIFTS
    drift = None
    if a.drift:
        if a.drift not in DRIFTS:
            print(f"lockstep equivalence: unknown drift {a.drift!r}; known: {DRIFTS}")
            return 2
        drift = {"name": a.drift, "rank": a.drift_rank, "at_chunk": a.drift_at}
    rows = equivalence(Path(a.out), meshes=tuple(a.mesh), regimes=tuple(a.regime),
                       drift=drift, chunks=a.chunks, steps=a.steps,
                       hard_cut_at=a.hard_cut_at, deadline_s=a.deadline_s,
                       log=None if a.json else print)
    if a.json:
        print(json.dumps(rows, indent=1))
    ok = all(r["conforms"] in (True, None) and r["run_ok"] for r in rows)
    # with a drift switch on, success means every run was caught
    caught = all(not r["equivalent"] for r in rows) if drift else \
        all(r["equivalent"] for r in rows)
    return 0 if ok and caught else 1
