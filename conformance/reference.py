"""Compare a run of the DiT workload against a reference stream (`lockstep equivalence`
writes one; `lockstep conform RUN --reference FILE` checks a run against it).

A reference file is JSON: the stream computed in one process without PP or TP (same
weights, same plan), as the state records of rank0 (the anchor it re-encoded) and of the
mesh (start frame, KV-cache positions, per-head KV summaries, all heads) and the decoded
outputs (latents and pixels, values and exact digests), per (chunk, epoch).

The tolerance, and why. Tensor parallelism changes the summation order: each row-parallel
projection's output is the all_reduce of N partial matmuls, where the reference does one
matmul, so float32 results differ in the last bits, and after the bf16 cast of
`latents_out` a value sitting on a rounding boundary flips by one bf16 ulp (2^-8
relative), which the decoder and, in R0a, the re-encoded anchor carry forward.

* mesh 1 (no TP): the arithmetic is the reference's, op for op. **Bit-exact**: every
  `output_digest_i64` must equal the reference's and every value difference must be 0.
* mesh >= 2: the digest is still compared and reported (how many chunks came out
  bit-identical), but the verdict is a bound on the values: max |run - reference| per
  kind below `TOLERANCE`. bf16 values (latents, anchor) and what is computed from them
  (pixels) may differ by one bf16 ulp, 2^-7 = 0.0078 at |x| < 2: tolerance 1e-2. The KV
  summaries are float32 means: tolerance 1e-3, room for an R0a anchor whose bf16 flip
  reaches the cache. Measured (docs/equivalence.md): TP errors up to 9.8e-4 in latents
  (one ulp) and 4.8e-7 in KV; the drift cases of runtime/dit.py reach 0.14-0.63 in
  values (14-63x the tolerance) and 1.5 in KV (1500x), and two of the three are caught
  first, exactly, by the structural fields.

The digest the result carries is checked against the latents rank0 decoded (the leader's
exact digest must match the bits that crossed the wire), so a value comparison is always
of the very tensor the digest names. Structural state (start frame, cache positions) is
compared exactly at every mesh size, before values, so a drift is pinned to the rank
whose state went wrong, not to the first rank its all_reduce contaminated.

This module imports neither torch nor runtime/ (conformance/ stays torch-free).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from lockstep.model.runopts import legacy_cut_at
from lockstep.model.tracefmt import loads

# max |run - reference| per kind of value, for mesh >= 2 (see the module docstring)
TOLERANCE = {"anchor": 1e-2, "kv": 1e-3, "latents": 1e-2, "pixels": 1e-2}
REFERENCE_VERSION = 1


@dataclass
class Verdict:
    ok: bool
    exact: bool                       # mesh 1: bit-exact required
    first: str = ""                   # the one-line reason of the first disagreement
    problems: list = field(default_factory=list)
    max_err: dict = field(default_factory=dict)
    digests_equal: int = 0
    chunks: int = 0

    def line(self) -> str:
        errs = " ".join(f"{k}={v:.2e}" for k, v in sorted(self.max_err.items()))
        mode = "bit-exact" if self.exact else "within tolerance"
        if self.ok:
            return (f"EQUIVALENT ({mode}): {self.chunks} chunks, {self.digests_equal}/"
                    f"{self.chunks} output digests bit-identical; max |err| {errs}")
        return f"DIFFERS: {self.first}"


def load_reference(path) -> dict:
    """The reference stream `lockstep equivalence` wrote; ValueError naming `path` when
    the file is not JSON (nested too deeply to read included), not an object, of another
    version, or its spec, records and outputs are not of the shape compare() reads."""
    try:
        ref = loads(Path(path).read_text())
    except ValueError as e:       # not UTF-8, not JSON
        raise ValueError(f"{path}: not a reference stream (not JSON: {e})") from None
    if not isinstance(ref, dict):
        raise ValueError(f"{path}: not a reference stream (not a JSON object)")
    if type(ref.get("version")) is not int or ref["version"] != REFERENCE_VERSION:
        raise ValueError(f"{path}: reference version {ref.get('version')!r:.40}, "
                         f"expected {REFERENCE_VERSION}")
    if type(ref.get("spec")) is not dict:
        raise ValueError(f"{path}: field 'spec': not an object")
    records, outputs = ref.get("records"), ref.get("outputs")
    if type(records) is not list:
        raise ValueError(f"{path}: field 'records': not a list")
    for k, r in enumerate(records):
        # type(): a JSON false is a Python 0, and would pass for rank 0's record.
        bad = "not an object" if type(r) is not dict else next(
            (f"{f}: {r.get(f)!r:.40} is not an integer" for f in ("chunk", "epoch", "rank")
             if type(r.get(f)) is not int), None)
        if bad:
            raise ValueError(f"{path}: field 'records[{k}]': {bad}")
    if type(outputs) is not list:
        raise ValueError(f"{path}: field 'outputs': not a list")
    for k, o in enumerate(outputs):
        if not (type(o) is list and len(o) == 3 and type(o[0]) is int
                and type(o[1]) is int and type(o[2]) is dict):
            raise ValueError(f"{path}: field 'outputs[{k}]': {o!r:.60} is not "
                             f"[chunk, epoch, output]")
    return ref


def _run_records(run_dir: Path) -> dict:
    """The run's DiT state records by (chunk, epoch, rank); ValueError naming the file
    and line of one that is not JSON or not a record."""
    out = {}
    for p in sorted(run_dir.glob("dit_rank*.jsonl")):
        m = re.match(r"dit_rank(\d+)\.jsonl$", p.name)
        if not m:
            continue
        for ln, line in enumerate(p.read_text().splitlines(), 1):
            if line.strip():
                try:
                    r = loads(line)
                except ValueError as e:
                    raise ValueError(f"{p.name} line {ln}: not JSON ({e})") from None
                if type(r) is not dict or not all(type(r.get(f)) is int
                                                  for f in ("chunk", "epoch", "rank")):
                    raise ValueError(f"{p.name} line {ln}: not a state record (an object "
                                     f"with integer chunk, epoch and rank)")
                out[(r["chunk"], r["epoch"], r["rank"])] = r
    return out


def _cmp_values(got, want):
    """(max |got - want|, first index over the tolerance is computed by the caller)."""
    if got is None or want is None:
        return (0.0, None) if got is None and want is None else (float("inf"), 0)
    if len(got) != len(want):
        return float("inf"), 0
    worst, at = 0.0, None
    for i, (a, b) in enumerate(zip(got, want)):
        d = abs(a - b)
        if d > worst:
            worst, at = d, i
    return worst, at


def _slice_kv(kv, h0, h1):
    """[blocks][K, V][heads][head_dim] -> the same for heads [h0, h1)."""
    return [[s[h0:h1] for s in blk] for blk in kv]


def _flat_kv(kv):
    return [x for blk in kv for s in blk for row in s for x in row]


def compare(run_dir, reference: dict, mesh: int | None = None) -> Verdict:
    run_dir = Path(run_dir)
    run = loads((run_dir / "run.json").read_text())
    if mesh is None:
        mesh = run["config"]["mesh"]
    exact = mesh == 1
    v = Verdict(ok=True, exact=exact)
    plan = {"regime": run["config"].get("regime"), "steps": run["config"].get("steps"),
            "hard_cut_at": legacy_cut_at(run.get("opts", {})),
            "spec": {**reference["spec"], **run.get("opts", {}).get("dit", {})}}
    for key, got in plan.items():
        if got != reference.get(key):
            v.problems.append(f"run: {key} {got!r} but the reference stream has "
                              f"{reference.get(key)!r}: not the same stream")
    if v.problems:
        v.ok, v.first = False, v.problems[0]
        return v
    try:
        recs = _run_records(run_dir)
    except ValueError as e:
        v.problems.append(f"run: {e}")
        v.ok, v.first = False, v.problems[0]
        return v
    ref0 = {(r["chunk"], r["epoch"]): r for r in reference["records"] if r["rank"] == 0}
    refm = {(r["chunk"], r["epoch"]): r for r in reference["records"] if r["rank"] != 0}
    refout = {(c, e): o for c, e, o in reference["outputs"]}
    try:
        outputs = {(c, e): o for c, e, o in loads((run_dir / "outputs.json").read_text())}
    except (OSError, ValueError, TypeError) as e:    # TypeError: an entry of another shape
        outputs = {}
        v.problems.append(f"run: outputs.json unreadable ({e})")

    def problem(chunk, epoch, rank, what):
        v.problems.append(f"chunk {chunk} epoch {epoch} rank {rank}: {what}")

    def values(chunk, epoch, rank, kind, got, want):
        err, at = _cmp_values(got, want)
        v.max_err[kind] = max(v.max_err.get(kind, 0.0), err)
        tol = 0.0 if exact else TOLERANCE[kind]
        if err > tol:
            detail = "missing or of another length" if at is None or err == float("inf") \
                else f"first differing output {kind}[{at}] = {got[at]:.6g}, reference " \
                     f"{want[at]:.6g}"
            problem(chunk, epoch, rank, f"{kind} max |err| {err:.3g} > tol {tol:g}; {detail}")

    keys = sorted({k[:2] for k in recs} | set(outputs))
    for chunk, epoch in keys:
        key = (chunk, epoch)
        r0 = recs.get((chunk, epoch, 0))
        if key not in ref0:
            problem(chunk, epoch, 0, "chunk not in the reference stream")
            continue
        if r0 is not None:
            if r0["csf"] != ref0[key]["csf"]:
                problem(chunk, epoch, 0, f"current_start_frame {r0['csf']} != reference "
                        f"{ref0[key]['csf']}")
            values(chunk, epoch, 0, "anchor", r0["anchor"], ref0[key]["anchor"])
        mesh_recs = [recs[(chunk, epoch, r)] for r in range(1, mesh + 1)
                     if (chunk, epoch, r) in recs]
        want = refm.get(key)
        for rm in mesh_recs:             # structure first: it names the drifting rank
            if rm["csf"] != want["csf"]:
                problem(chunk, epoch, rm["rank"], f"start frame used {rm['csf']} != "
                        f"reference {want['csf']} (stale current_start_frame)")
            if rm["kv_pos"] != want["kv_pos"]:
                problem(chunk, epoch, rm["rank"], f"KV cache positions {rm['kv_pos']} != "
                        f"reference {want['kv_pos']} (a reset not obeyed?)")
        for rm in mesh_recs:
            h0, h1 = rm["heads"]
            values(chunk, epoch, rm["rank"], "kv", _flat_kv(rm["kv"]),
                   _flat_kv(_slice_kv(want["kv"], h0, h1)))
        out = outputs.get(key)
        if out is not None:
            v.chunks += 1
            ref = refout[key]
            if out["latents_digest"] != out["output_digest_i64"]:
                problem(chunk, epoch, 0, f"latents rank0 received digest to "
                        f"{out['latents_digest']}, the leader's output_digest_i64 says "
                        f"{out['output_digest_i64']}")
            same = out["output_digest_i64"] == ref["output_digest_i64"]
            v.digests_equal += same
            if exact and not same:
                problem(chunk, epoch, 1, f"output_digest_i64 {out['output_digest_i64']} != "
                        f"reference {ref['output_digest_i64']} (mesh 1 must be bit-exact)")
            values(chunk, epoch, 1, "latents", out["latents"], ref["latents"])
            values(chunk, epoch, 0, "pixels", out["pixels"], ref["pixels"])
    last_epoch = max((e for _, e in refout), default=0)
    missing = sorted(c for c, e in refout if e == last_epoch and (c, e) not in outputs)
    if missing:
        v.problems.append(f"run: chunks {missing} of the last epoch {last_epoch} were "
                          f"never emitted")
    if not outputs:
        v.problems.append("run: no outputs emitted")
    v.ok = not v.problems
    v.first = v.problems[0] if v.problems else ""
    return v


def cli_reference(run_dir, reference: dict) -> tuple:
    """For `lockstep conform RUN --reference FILE`: (ok, text); `reference` is what
    `load_reference(FILE)` read."""
    v = compare(run_dir, reference)
    lines = [f"reference    {v.line()}"] + [f"    ! {p}" for p in v.problems[:10]]
    return v.ok, "\n".join(lines)
