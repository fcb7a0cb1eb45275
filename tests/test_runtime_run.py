"""The runtime interprets the model's tables on real torch.distributed (gloo, 127.0.0.1).
Every test has a hard deadline enforced by the launcher, which kills all children."""
import json

import pytest

from lockstep.conformance.load import step_views
from lockstep.model.config import Config
from lockstep.runtime.run import run_local
from lockstep.soak import written_bytes

DEADLINE_S = 90


def _steps(run_dir, rank):
    return step_views(run_dir, rank)


def test_mesh3_chunks50_hard_cut_emits_every_current_chunk_once_in_order(tmp_path):
    cfg = Config(mesh=3, d_in=2, d_out=2, chunks=50, hard_cut=True, steps=2)
    res = run_local(cfg, {"hard_cut_at": 20}, tmp_path, deadline_s=DEADLINE_S)
    assert res.ok, res.summary()
    outputs = json.loads((tmp_path / "outputs.json").read_text())
    chunks = [c for c, _, _ in outputs]
    assert chunks == sorted(set(chunks)), "each chunk emitted once, in order"
    cut = [e for e in _steps(tmp_path, 0) if e["label"] == "hard_cut"]
    assert len(cut) == 1
    # after the cut only epoch-1 chunks are emitted, and every one built after the cut is
    assert all(epoch == (0 if c < 20 else 1) for c, epoch, _ in outputs)
    assert [c for c in chunks if c >= 20] == list(range(20, 50))
    decoded = [e for e in _steps(tmp_path, 0) if e["label"] == "decode_result"]
    assert len(decoded) == len(outputs)
    # the traces are model transitions: every rank's last step is a clean exit row
    for r in range(4):
        assert _steps(tmp_path, r)[-1]["op"] == "exit"
    # issue 14 item 3: at most 2 KB of trace per chunk across all ranks (this run is the
    # mesh-3 default: one segment per rank, its checkpoint and the handshake included)
    assert written_bytes(tmp_path) / cfg.chunks <= 2048


def test_pp0_leader_alone(tmp_path):
    res = run_local(Config(mesh=1, chunks=5), {}, tmp_path, deadline_s=DEADLINE_S)
    assert res.ok, res.summary()
    assert [c for c, _, _ in json.loads((tmp_path / "outputs.json").read_text())] == \
        [0, 1, 2, 3, 4]


def _index(steps, label, chunk):
    return next(i for i, e in enumerate(steps)
                if e["label"] == label and e["msg"]["chunk"] == chunk)


def test_overlap_envelope_k_plus_1_built_before_result_k_decoded(tmp_path):
    """The overlap, asserted from the traces' happens-before, never from clocks (a load
    spike reorders wall-clock times, not these): rank0's trace is written under its
    process lock, so line order is the order its threads stepped in; the policy takes
    "build envelope k+1" before "decode result k" whenever both are enabled; and the
    leader's comms thread receives envelope k+1 before it sends result k (it keeps that
    receive posted while Phase B k runs) for some k: the single-thread leader never
    does."""
    cfg = Config(mesh=2, chunks=6)
    res = run_local(cfg, {"costs": {"phase_b_ms": 5}}, tmp_path, deadline_s=DEADLINE_S)
    assert res.ok, res.summary()
    r0, r1 = _steps(tmp_path, 0), _steps(tmp_path, 1)
    assert _index(r0, "build_envelope", 1) < _index(r0, "decode_result", 0)
    assert any(_index(r1, "recv_envelope_header", k + 1) < _index(r1, "send_result_payload", k)
               for k in range(cfg.chunks - 1))


@pytest.mark.parametrize("fault,origin", [
    ("leader_reject@2", 1),
    ("rank0_preflight@3", 0),
])
def test_injected_faults_end_every_rank_with_a_reason(tmp_path, fault, origin):
    """The rank that failed says so (via=own); every other rank read its terminal message
    (ERROR, relayed by the leader): the failing rank lingers until its peers are in their
    exit paths, so no receive of that message is reset and no flag pre-empts it."""
    name, _, at = fault.partition("@")
    cfg = Config(mesh=3, chunks=6, inject=frozenset({name}))
    res = run_local(cfg, {"fault": {"name": name, "at_chunk": int(at)}}, tmp_path,
                    deadline_s=DEADLINE_S)
    assert not res.deadline_hit, res.summary()
    role = ["rank0", "leader"][origin]
    assert res.returncodes == [1, 1, 1, 1], res.summary()
    for r, rr in enumerate(res.ranks):
        line = rr.reason_line() or ""
        via = "own" if r == origin else "terminal_message"
        assert f" exit=error via={via} root={origin}/{role}/error " in line, line
    assert res.cause and res.cause["rank"] == origin, res.cause


def test_parity_handshake_names_the_key_and_rank_that_differ(tmp_path):
    """One rank with a different fault-injection switch: every rank fails before the
    first chunk, naming the key and the rank, each by its own detection (the leader's
    comms thread, its first receive posted, is abandoned by main's exit row: it does not
    wait for the flag and turn the leader's error into a release)."""
    skew = {"rank": 2, "key": "fault", "value": {"name": "wrong_group", "at_chunk": 1}}
    res = run_local(Config(mesh=3, chunks=4), {"parity_skew": skew}, tmp_path,
                    deadline_s=DEADLINE_S)
    assert not res.deadline_hit, res.summary()
    for r in res.ranks:
        line = r.reason_line() or ""
        assert "parity mismatch (key=fault differs on ranks [2]" in line, line
        assert " exit=error via=own root=2/worker/error " in line, line
    assert not any(e["label"] == "build_envelope" for e in _steps(tmp_path, 0))


@pytest.mark.parametrize("argv", [
    # the terminal after a hard cut at the last chunk carries the new epoch (one
    # definition of the message in model/messages.py; it used to diverge)
    (Config(mesh=1, chunks=2, hard_cut=True), {"hard_cut_at": 2}),
    # R0 used to fail rank0's preflight: call count vs recompute bit
    (Config(mesh=2, chunks=3, regime="R0", steps=2), {}),
])
def test_run_conforms(tmp_path, argv):
    from lockstep.conformance.report import conform, format_report
    cfg, opts = argv
    res = run_local(cfg, opts, tmp_path, deadline_s=DEADLINE_S)
    assert res.ok, res.summary()
    rep = conform(tmp_path)
    assert rep.ok, format_report(rep)


def test_heartbeats_are_a_user_policy_and_conform(tmp_path):
    """NOOP heartbeats (queue_noop / bcast_noop / recv_noop) run when heartbeat_ms is
    set, instead of being filtered out; the run conforms."""
    from lockstep.conformance.report import conform, format_report
    cfg = Config(mesh=2, chunks=3, noops=3)
    res = run_local(cfg, {"heartbeat_ms": 5, "costs": {"phase_b_ms": 25}}, tmp_path,
                    deadline_s=DEADLINE_S)
    assert res.ok, res.summary()
    labels = {r: [e["label"] for e in _steps(tmp_path, r)] for r in range(3)}
    n = labels[0].count("queue_noop")
    assert 1 <= n <= 3, labels[0]          # the model's budget bounds them (noops=3)
    assert labels[1].count("bcast_noop") == n and labels[2].count("recv_noop") == n
    rep = conform(tmp_path)
    assert rep.ok, format_report(rep)
    # off unless asked for
    res = run_local(cfg, {}, tmp_path, deadline_s=DEADLINE_S)
    assert res.ok and "queue_noop" not in [e["label"] for e in _steps(tmp_path, 0)]


def test_trace_emits_writes_only_the_emitting_steps_and_changes_no_row(tmp_path):
    """RunOptions.trace="emits" (the bench's tracing-off run): the same run (outputs),
    only rank0's emitting steps written, numbered from 0 without gaps, so the period
    analysis still reads it."""
    from lockstep.conformance.overlap import analyse
    cfg = Config(mesh=2, chunks=6)
    full, emits = tmp_path / "full", tmp_path / "emits"
    for d, trace in ((full, "full"), (emits, "emits")):
        res = run_local(cfg, {"trace": trace}, d, deadline_s=DEADLINE_S)
        assert res.ok, res.summary()
    assert (json.loads((full / "outputs.json").read_text())
            == json.loads((emits / "outputs.json").read_text()))
    r0 = _steps(emits, 0)
    assert [e["label"] for e in r0] == ["decode_result"] * cfg.chunks
    assert [e["i"] for e in r0] == list(range(cfg.chunks))
    assert not _steps(emits, 1) and not _steps(emits, 2)
    assert len(_steps(full, 1)) > cfg.chunks
    assert len(analyse(emits).chunks) == cfg.chunks
