"""The DiT workload under lockstep equals the one-process reference (mesh 1 bit-exact,
TP within tolerance), hard cuts in R1 and R0a included; every state-drift case is caught
with a one-line reason while the trace still conforms. Every run has a hard deadline
(run_local kills the children)."""
from __future__ import annotations

import pytest
import torch

from lockstep.conformance.reference import TOLERANCE, compare
from lockstep.equivalence import check_one, equivalence, reference_stream
from lockstep.model import contract as C
from lockstep.runtime.dit import DiTSpec, DiTWorkload, PlanBitError
from lockstep.runtime.workload import infer_meta

DEADLINE_S = 60


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    out = tmp_path_factory.mktemp("equivalence")
    return out, equivalence(out, meshes=(1, 2, 3, 4), regimes=("R1", "R0a"),
                            deadline_s=DEADLINE_S, log=None)


def test_equivalence_mesh_1_to_4_with_hard_cuts_in_R1_and_R0a(matrix):
    _, rows = matrix
    assert [(r["regime"], r["mesh"]) for r in rows] == [
        (g, m) for g in ("R1", "R0a") for m in (1, 2, 3, 4)]
    for r in rows:
        assert r["run_ok"], r["run"]
        assert r["conforms"] is True, r["name"]
        assert r["equivalent"], (r["name"], r["problems"])
        assert r["chunks"] >= 3, r          # the whole new epoch at least
        if r["mesh"] == 1:                  # no TP: bit-exact
            assert r["exact"] and r["digests_equal"] == r["chunks"]
            assert all(e == 0.0 for e in r["max_err"].values()), r["max_err"]
        else:
            assert all(r["max_err"][k] <= TOLERANCE[k] for k in TOLERANCE), r["max_err"]


def test_conform_with_reference_accepts_the_run_and_refuses_another_stream(matrix, capsys):
    from lockstep.cli import main
    out, _ = matrix
    assert main(["conform", str(out / "R0a_mesh3"), "--reference",
                 str(out / "reference_R0a.json")]) == 0
    assert "EQUIVALENT" in capsys.readouterr().out
    assert main(["conform", str(out / "R0a_mesh3"), "--reference",
                 str(out / "reference_R1.json")]) == 1
    assert "regime 'R0a' but the reference stream has 'R1'" in capsys.readouterr().out


@pytest.mark.parametrize("name,rank,at,mesh,regime,first", [
    ("skip_kv_reset", 2, 3, 2, "R1",
     # how far the unreset cache got depends on how many old-epoch envelopes reached the
     # mesh before the cut (the leader's comms thread takes them early): positions vary
     "chunk 3 epoch 1 rank 2: KV cache positions ["),
    ("stale_start_frame", 2, 4, 3, "R1",
     "chunk 4 epoch 1 rank 2: start frame used 0 != reference 3"),
    ("wrong_anchor", 0, 2, 2, "R0a", "chunk 2 epoch 0 rank 0: anchor max |err|"),
])
def test_state_drift_is_caught_while_the_trace_conforms(tmp_path, name, rank, at, mesh,
                                                        regime, first):
    ref = reference_stream(regime, chunks=6, steps=2, hard_cut_at=3)
    row = check_one(mesh, regime, tmp_path, ref, tmp_path / "ref.json",
                    drift={"name": name, "rank": rank, "at_chunk": at},
                    deadline_s=DEADLINE_S)
    assert row["run_ok"], row["run"]               # the control plane is clean ...
    assert row["conforms"] is True                 # ... and the model sees nothing
    assert not row["equivalent"]                   # the state check does
    assert row["first"].startswith(first), row["first"]
    assert row["line"] == f"DIFFERS: {row['first']}"
    # the values a real bug moves sit far above the tolerance
    worst = max(row["max_err"][k] / TOLERANCE[k] for k in TOLERANCE)
    assert worst > 10, row["max_err"]


def test_stale_start_frame_on_the_leader_is_caught_by_the_contract():
    """The leader reports the start frame it used (mesh_current_start_frame), so the
    result contract (leader_before_reply, rank0_on_result) sees a stale one on the
    leader; a worker's never reaches a result field, only the state check sees it."""
    spec = DiTSpec()
    rank0 = DiTWorkload(rank=0, spec=spec)
    leader = DiTWorkload(rank=1, spec=spec, drift={"name": "stale_start_frame",
                                                   "rank": 1, "at_chunk": 1})
    for k in range(2):
        extra, tensors = rank0.build(k, 0, k == 0, "R1", 2)
        meta = infer_meta(extra, call_id=k, chunk_index=k,
                            cache_epoch=0, init_cache=k == 0, regime="R1", steps=2)
        for i in range(meta["expected_generator_calls"]):
            leader.generator_call(i, meta, tensors, lambda t: t)
        out = leader.result(meta, tensors)
        rmeta = C.make_result_meta(meta, **leader.result_meta(meta, out))
        descs = {n: C.TensorDesc("bfloat16", tuple(t.shape)) for n, t in out.items()}
        if k == 0:
            C.validate_result(rmeta, descs, envelope_meta=meta, where=C.LEADER_BEFORE_REPLY)
            continue
        with pytest.raises(C.ContractError, match="mesh used start frame 0, envelope says 3"):
            C.validate_result(rmeta, descs, envelope_meta=meta, where=C.LEADER_BEFORE_REPLY)


def test_reference_is_deterministic_and_every_chunk_differs():
    a = reference_stream("R0a", chunks=4, steps=2, hard_cut_at=2)
    b = reference_stream("R0a", chunks=4, steps=2, hard_cut_at=2)
    assert a == b
    digests = [o["output_digest_i64"] for _, _, o in a["outputs"]]
    assert len(set(digests)) == len(digests)


def _envelope(spec, **over):
    w = DiTWorkload(rank=0, spec=spec)
    extra, tensors = w.build(0, 0, True, "R1", 2)
    meta = infer_meta(extra, call_id=0, chunk_index=0,
                        cache_epoch=0, init_cache=True, regime="R1", steps=2)
    meta.update(over)
    return meta, tensors


@pytest.mark.parametrize("field", ["current_start_frame", "init_cache", "do_kv_recompute",
                                   "expected_generator_calls"])
def test_mesh_asserts_the_plan_bits_it_needs_naming_the_field(field):
    spec = DiTSpec()
    meta, tensors = _envelope(spec)
    del meta[field]
    mesh = DiTWorkload(rank=1, spec=spec)
    with pytest.raises(PlanBitError, match=repr(field)):
        mesh.generator_call(0, meta, tensors, lambda t: t)


def test_mesh_refuses_a_call_count_the_schedule_does_not_give():
    spec = DiTSpec()
    meta, tensors = _envelope(spec, expected_generator_calls=3)
    with pytest.raises(PlanBitError, match="expected_generator_calls=3"):
        DiTWorkload(rank=1, spec=spec).generator_call(0, meta, tensors, lambda t: t)


def test_tp_shards_sum_to_the_full_projection():
    """Column-parallel shards concatenate, row-parallel partials sum, to the full layer."""
    spec = DiTSpec()
    full = DiTWorkload(rank=1, mesh_size=1, spec=spec)
    parts = [DiTWorkload(rank=r + 1, mesh_size=3, spec=spec) for r in range(3)]
    x = torch.randn(5, spec.dim, generator=torch.Generator().manual_seed(1))
    q = torch.cat([x @ p.w["0.wq"] for p in parts], dim=1)
    torch.testing.assert_close(q, x @ full.w["0.wq"])
    h = torch.randn(5, spec.ffn, generator=torch.Generator().manual_seed(2))
    per = spec.ffn // 3
    y = sum(h[:, i * per:(i + 1) * per] @ p.w["0.w2"] for i, p in enumerate(parts))
    torch.testing.assert_close(y, h @ full.w["0.w2"])


def test_mesh_sizes_that_do_not_divide_the_heads_are_refused():
    with pytest.raises(ValueError, match="not divisible by mesh 5"):
        DiTSpec().check_mesh(5)


def test_compare_names_a_digest_that_does_not_match_the_bits_received(matrix, tmp_path):
    import json
    import shutil
    out, _ = matrix
    run = tmp_path / "run"
    shutil.copytree(out / "R1_mesh1", run)
    outputs = json.loads((run / "outputs.json").read_text())
    outputs[0][2]["output_digest_i64"] += 1
    (run / "outputs.json").write_text(json.dumps(outputs))
    ref = json.loads((out / "reference_R1.json").read_text())
    v = compare(run, ref)
    assert not v.ok and "the leader's output_digest_i64 says" in v.first
