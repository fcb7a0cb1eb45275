"""Conformance: simulated traces of many configurations conform (every built transition
checked against Model.enabled), a recorded gloo run conforms, hand-made corruptions are
rejected with the right first divergence, and mutated traces are rejected or replay
equivalently (hypothesis)."""
import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lockstep import conformance
from lockstep.conformance.load import TraceError, load_run
from lockstep.conformance.overlap import analyse, chrome_trace, overlap_report
from lockstep.conformance.report import conform, format_report
from lockstep.conformance.simulate import Costs, simulate
from lockstep.model.config import INJECTABLE, Config

TESTDATA = Path(__file__).resolve().parent.parent / "conformance" / "testdata"
GLOO = TESTDATA / "gloo_mesh3_cut"


def gen(tmp_path, cfg, name="run", **kw) -> Path:
    d = tmp_path / name
    simulate(cfg, d, **kw)
    return d


def check(d, **kw):
    rep = conform(d, verify=True, **kw)
    assert rep.ok, format_report(rep)
    return rep


# ---------------------------------------------------------------- files as lines

def read(d, rank) -> list:
    return (Path(d) / f"rank{rank}.jsonl").read_text().splitlines()


def write(d, rank, lines) -> None:
    (Path(d) / f"rank{rank}.jsonl").write_text("".join(x + "\n" for x in lines))


def events(d, rank) -> list:
    return [json.loads(x) for x in read(d, rank)]


def put(d, rank, evs, renumber=True) -> None:
    """Write events back; with renumber, `i` is recomputed per thread in file order
    (the corrupted trace then claims the new order, as a buggy runtime would)."""
    if renumber:
        nxt = {}
        for e in evs:
            if e.get("ev") == "step":
                e["i"] = nxt.get(e["thread"], 0)
                nxt[e["thread"]] = e["i"] + 1
    write(d, rank, [json.dumps(e, sort_keys=True, separators=(",", ":")) for e in evs])


def find(evs, label, n=0) -> int:
    hits = [k for k, e in enumerate(evs) if e.get("label") == label]
    return hits[n]


def conforming_copy(src, tmp_path) -> Path:
    """A recorded run that conforms as committed, copied to corrupt."""
    check(src)
    d = tmp_path / "run"
    shutil.copytree(src, d)
    return d


def diverges(d):
    rep = conform(d)
    assert not rep.ok, format_report(rep)
    assert rep.result is not None and rep.result.divergence is not None, format_report(rep)
    return rep, rep.result.divergence


# ---------------------------------------------------------------- valid traces

@pytest.mark.parametrize("mesh", [1, 2, 3])
@pytest.mark.parametrize("p2p", ["rendezvous", "buffered"])
def test_simulated_runs_conform(tmp_path, mesh, p2p):
    for seed, (cut, policy, gloo) in enumerate([(False, "des", False), (True, "des", True),
                                                 (True, "random", False)]):
        cfg = Config(mesh=mesh, chunks=5, p2p=p2p, hard_cut=cut, steps=2)
        rep = check(gen(tmp_path, cfg, f"s{seed}", seed=seed, policy=policy,
                        gloo_like=gloo))
        assert rep.ended.startswith("clean end")
        assert rep.failure_mode is None
        assert rep.replayed == rep.events > 0


@pytest.mark.parametrize("cfg", [
    Config(mesh=2, chunks=6, regime="R0a", hard_cut=True),
    Config(mesh=3, chunks=4, regime="R0", steps=2),
    Config(mesh=3, chunks=4, d_in=1, d_out=1),
    Config(mesh=2, chunks=4, noops=2),
    Config(mesh=2, chunks=4, p2p="buffered", eager=2, noops=1, hard_cut=True),
], ids=lambda c: c.describe().replace(" ", ","))
def test_more_configurations_conform(tmp_path, cfg):
    for seed in range(3):
        check(gen(tmp_path, cfg, f"s{seed}", seed=seed,
                  policy="random" if seed else "des"))


@pytest.mark.parametrize("fault", INJECTABLE)
def test_injected_faults_end_as_released_failures(tmp_path, fault):
    cfg = Config(mesh=3, chunks=5, inject=frozenset({fault}))
    rep = check(gen(tmp_path, cfg, seed=1, fault_at=2))
    assert rep.failure_mode, format_report(rep)
    assert rep.ended.startswith("released failure"), rep.ended
    expect = {"rank0_preflight": "FM-04", "leader_reject": "LEADER-THROW",
              "wrong_group": "WRONG-GROUP", "count_mismatch": "FM-02",
              "cond_flag": "FM-03", "rank0_bad_envelope": "envelope refused",
              "leader_bad_result": "result rejected"}[fault]
    assert expect in rep.failure_mode


@pytest.mark.parametrize("victim", [0, 1, 3])
@pytest.mark.parametrize("tail", ["", "lose_last", "cut_last_line"])
def test_crash_conforms_as_kill_9(tmp_path, victim, tail):
    cfg = Config(mesh=3, chunks=8)            # faults=0: a kill is the environment's
    kw = {tail: True} if tail else {}
    for n, after in enumerate((5, 17, 30)):
        d = gen(tmp_path, cfg, f"c{n}", seed=n, crash=(victim, after), **kw)
        rep = check(d)
        assert "kill -9" in rep.failure_mode
        assert rep.ended.startswith("released failure")
        if tail == "cut_last_line":
            assert any("cut short" in w for w in rep.warnings)


def test_crash_with_buffered_p2p_and_lost_event(tmp_path):
    cfg = Config(mesh=3, chunks=5, p2p="buffered", hard_cut=True, steps=2)
    for seed in range(6):
        d = gen(tmp_path, cfg, f"b{seed}", seed=seed, policy="random",
                crash=(1 + seed % 2, 13), cut_last_line=True)
        check(d)


def test_recorded_gloo_run_conforms():
    """A real 4-rank gloo run (rank0 + mesh 3, hard cut): rank0's comms thread records
    sending envelope k+1 before receiving the rest of result k, a cycle for a strict
    rendezvous order that the per-side ordering of the comms thread resolves."""
    rep = check(GLOO)
    assert rep.emitted == 21 and rep.ended.startswith("clean end")
    assert rep.verdict("exactly_once").status == "ok"


@pytest.mark.parametrize("case,mode", [
    ("breakit_wrong_group", "WRONG-GROUP"), ("breakit_leader_throw", "LEADER-THROW"),
    ("breakit_kill_leader", "kill -9 of leader"), ("breakit_kill_worker", "kill -9 of worker"),
])
def test_recorded_breakit_runs_conform(case, mode):
    rep = check(GLOO.parent / case)
    assert mode in rep.failure_mode and rep.ended.startswith("released failure")


def test_untraced_error_exits_are_releases(tmp_path):
    """Survivors that die of an uncaught error write no release event; their one-line
    exit reason in rank*.err makes them released ranks, not more kill -9s."""
    d = gen(tmp_path, Config(mesh=3, chunks=6), seed=1, crash=(1, 20))
    for r in (0, 2, 3):
        lines = [x for x in read(d, r) if '"ev":"release"' not in x]
        write(d, r, lines)
        (d / f"rank{r}.err").write_text(f"lockstep: rank={r} role=x exit=error "
                                        f"reason=RuntimeError: Connection reset by peer\n")
    rep = check(d)
    assert "kill -9 of leader" in rep.failure_mode
    assert "untraced error exit of rank0, worker (rank 2), worker (rank 3)" in \
        rep.failure_mode
    assert rep.ended.count("released by the abort flag") == 3


def test_twenty_thousand_events(tmp_path):
    cfg = Config(mesh=3, chunks=700, hard_cut=True, steps=2)
    d = gen(tmp_path, cfg, seed=3, gloo_like=True)
    rep = conform(d)
    assert rep.ok and rep.events > 18000, format_report(rep)
    assert rep.events_per_s > 0


# ---------------------------------------------------------------- loader

def test_garbage_line_is_a_trace_error_with_file_line_field(tmp_path):
    d = gen(tmp_path, Config(mesh=2, chunks=2))
    lines = read(d, 1)
    lines.insert(5, "garbage {")
    write(d, 1, lines)
    with pytest.raises(TraceError) as e:
        load_run(d)
    assert (Path(e.value.file).name, e.value.line, e.value.field) == ("rank1.jsonl", 6,
                                                                        "json")
    rep = conform(d)
    assert not rep.ok and "rank1.jsonl line 6" in rep.divergence
    assert rep.verdict("trace_wellformed").status == "violated"


@pytest.mark.parametrize("field,value,expect", [
    ("i", "x", "i"), ("src", 3, "src"), ("thread", "side", "thread"),
    ("role", "worker", "role"), ("chan_i", -1, "chan_i"), ("op", "jump", "op"),
    ("msg", {"action": 1}, "msg.call_id"), ("rank", 0, "rank"), ("t_ns", 1.5, "t_ns"),
])
def test_malformed_fields_are_named(tmp_path, field, value, expect):
    d = gen(tmp_path, Config(mesh=2, chunks=2))
    evs = events(d, 1)
    k = next(k for k, e in enumerate(evs) if e.get("op") == "recv")
    evs[k][field] = value
    put(d, 1, evs, renumber=False)
    with pytest.raises(TraceError) as e:
        load_run(d)
    assert e.value.field == expect and e.value.line == k + 1


def test_raw_reorder_breaks_per_thread_numbering(tmp_path):
    d = gen(tmp_path, Config(mesh=2, chunks=3))
    lines = read(d, 2)          # a worker: one thread, so any swap breaks its numbering
    lines[4], lines[5] = lines[5], lines[4]
    write(d, 2, lines)
    with pytest.raises(TraceError) as e:
        load_run(d)
    assert e.value.field == "i" and e.value.line == 5


def test_truncated_last_line_is_a_warning_and_a_crash(tmp_path):
    d = gen(tmp_path, Config(mesh=2, chunks=3))
    text = (d / "rank2.jsonl").read_text()
    (d / "rank2.jsonl").write_text(text[:-20])        # the exit line, cut short
    run = load_run(d)
    assert any("cut short" in w for w in run.warnings)
    assert run.crashed == [2]
    rep = conform(d)
    assert rep.ok, format_report(rep)                # a kill -9 while writing: legal
    assert "kill -9" in rep.failure_mode


# ---------------------------------------------------------------- corruptions

def test_reordered_pair_is_the_first_divergence(tmp_path):
    d = gen(tmp_path, Config(mesh=3, chunks=4), seed=2)
    evs = events(d, 1)
    a = find(evs, "bcast_envelope_header", 1)
    b = find(evs, "bcast_envelope_payload", 1)
    evs[a], evs[b] = evs[b], evs[a]
    put(d, 1, evs)
    rep, div = diverges(d)
    assert div.rank == 1 and div.event.label == "bcast_envelope_payload"
    assert div.event.line == a + 1
    assert "FIRST DIVERGENCE" in rep.divergence and "leader" in rep.divergence
    assert div.allowed and any("bcast_envelope_header" in x for x in div.allowed)


def test_skipped_broadcast(tmp_path):
    d = gen(tmp_path, Config(mesh=3, chunks=4), seed=2)
    evs = events(d, 1)
    k = find(evs, "bcast_envelope_header", 2)
    del evs[k]
    put(d, 1, evs)
    _, div = diverges(d)
    assert div.rank == 1 and div.event.label == "bcast_envelope_payload"
    assert "does not continue" in div.reason


def test_collective_on_the_wrong_group(tmp_path):
    d = gen(tmp_path, Config(mesh=3, chunks=4, steps=2), seed=2)
    evs = events(d, 3)
    k = find(evs, "generator_call", 1)
    evs[k]["group"] = "world_pg"
    put(d, 3, evs)
    _, div = diverges(d)
    assert div.rank == 3 and div.event.line == k + 1
    assert "wrong group" in div.reason


def _blamed_at(d, rank, line):
    """The first divergence names `rank`, its file and `line`."""
    rep, div = diverges(d)
    assert div.rank == rank and div.event.line == line, div.text()
    assert f"(rank {rank}), rank{rank}.jsonl line {line}:" in rep.divergence
    return div


def test_a_members_wrong_dst_in_a_collective_is_its_own_divergence(tmp_path):
    """worker1 records its envelope-payload broadcast as leading back to `wait_hdr`: the
    divergence is worker1's line (its row leads to `count_check`), not the leader's
    event, the first member of the broadcast; the same line with other timings conforms
    (only the row's fields are judged)."""
    d = conforming_copy(GLOO, tmp_path)
    evs = events(d, 2)
    k = find(evs, "recv_envelope_payload")
    legal = tmp_path / "legal"
    shutil.copytree(d, legal)
    evs[k]["dst"] = "wait_hdr"
    put(d, 2, evs, renumber=False)
    div = _blamed_at(d, 2, k + 1)
    assert "worker1's row 'recv_envelope_payload' at 'bcast_pay' leads to 'count_check', " \
        "not to the recorded 'wait_hdr'" in div.reason
    evs[k].update(dst="count_check", dur_ns=evs[k]["dur_ns"] * 3)
    put(legal, 2, evs, renumber=False)
    check(legal)


@pytest.mark.parametrize("ahead, why", [
    (1, "mesh_pg seq 7 recorded, but the group's next collective is seq 6 and worker1 "
        "recorded no event for seq 6"),
    (2, "mesh_pg seq 8 recorded, but the group is at seq 6"),   # its seq-7 line waits
])
def test_a_members_wrong_gseq_is_its_own_divergence(tmp_path, ahead, why):
    """worker1's second envelope-payload broadcast recorded `ahead` collectives too far:
    the divergence is worker1's line, not rank0's send that waits on the leader, which
    waits on worker1 (each wait is followed to the event waited on)."""
    d = conforming_copy(GLOO, tmp_path)
    evs = events(d, 2)
    k = find(evs, "recv_envelope_payload", 1)
    assert evs[k]["gseq"] == 6
    evs[k]["gseq"] += ahead
    put(d, 2, evs, renumber=False)
    div = _blamed_at(d, 2, k + 1)
    assert why in div.reason


def _other(evs, k, field):
    """A value of `field` that another line of the file has and line k has not."""
    return next(e[field] for e in evs[k:] + evs[:k] if e.get(field) not in (None, evs[k][field]))


@pytest.mark.parametrize("field", ["dst", "label", "gseq", "chan_i"])
def test_every_one_field_corruption_names_its_own_line(tmp_path, field):
    """Each rank of the recorded gloo run, the field of a row (dst, label, the group or
    channel coordinate) changed at three lines in turn: every copy is rejected at that
    rank, file and line, whichever member of the transition the replay tries first (the
    dst and gseq cases named a healthy member or a waiting rank before `_culprit`)."""
    tried = 0
    for rank in range(4):
        lines = read(GLOO, rank)
        evs = [json.loads(x) for x in lines]
        for k in [k for k, e in enumerate(evs) if e.get("ev") == "step" and field in e][5:8]:
            tried += 1
            d = tmp_path / f"r{rank}_{k}"
            shutil.copytree(GLOO, d)
            e = dict(evs[k])
            e[field] = e[field] + 1 if field in ("gseq", "chan_i") else _other(evs, k, field)
            write(d, rank, lines[:k] + [json.dumps(e)] + lines[k + 1:])
            _blamed_at(d, rank, k + 1)
    assert tried >= 6          # rank0 has one collective, the workers no channel


def _sim_with(tmp_path, cfg, label, seeds=range(40), **kw):
    for seed in seeds:
        d = gen(tmp_path, cfg, f"s{seed}", seed=seed, **kw)
        if any(e.get("label") == label for e in events(d, 0)):
            return d
        shutil.rmtree(d)
    raise AssertionError(f"no simulated run with {label}")


def test_stale_epoch_decode(tmp_path):
    d = _sim_with(tmp_path, Config(mesh=2, chunks=6, hard_cut=True), "drop_stale_result",
                  policy="random")
    evs = events(d, 0)
    k = find(evs, "drop_stale_result")
    evs[k]["label"] = "decode_result"
    put(d, 0, evs, renumber=False)
    rep, div = diverges(d)
    assert div.rank == 0 and div.event.line == k + 1
    assert div.verdict and div.verdict.startswith("stale_epoch_decode")
    assert rep.verdict("stale_epoch_decode").status == "violated"


def test_stale_epoch_in_a_result_message(tmp_path):
    d = gen(tmp_path, Config(mesh=2, chunks=4), seed=1)
    evs = events(d, 0)
    k = find(evs, "recv_result_payload", 1)
    evs[k]["msg"]["epoch"] += 1
    put(d, 0, evs, renumber=False)
    _, div = diverges(d)
    assert div.event.line == k + 1 and "the model's message is" in div.reason


def test_missing_generator_call(tmp_path):
    d = gen(tmp_path, Config(mesh=3, chunks=4, steps=2), seed=2)
    evs = events(d, 2)
    k = find(evs, "generator_call", 2)
    del evs[k]
    put(d, 2, evs)
    rep, div = diverges(d)
    assert div.rank == 2 and div.event.label == "last_generator_call"
    assert div.verdict and div.verdict.startswith("call_count")
    assert rep.verdict("call_count").status == "violated"


def test_duplicated_decode(tmp_path):
    d = gen(tmp_path, Config(mesh=2, chunks=4), seed=1)
    evs = events(d, 0)
    k = find(evs, "decode_result", 1)
    evs.insert(k + 1, dict(evs[k]))
    put(d, 0, evs)
    _, div = diverges(d)
    assert div.rank == 0 and div.event.label == "decode_result" and \
        div.event.line == k + 2


def test_duplicated_result_message(tmp_path):
    d = gen(tmp_path, Config(mesh=2, chunks=4), seed=1)
    evs = events(d, 1)
    a = find(evs, "send_result_header", 1)
    evs[a + 2:a + 2] = [dict(evs[a]), dict(evs[a + 1])]        # the result sent twice
    put(d, 1, evs)
    _, div = diverges(d)
    assert div.rank == 1 and div.event.line == a + 3
    assert "second event for the same channel message" in div.reason


def test_truncated_file(tmp_path):
    d = gen(tmp_path, Config(mesh=3, chunks=6), seed=1)
    text = (d / "rank1.jsonl").read_text()
    (d / "rank1.jsonl").write_text(text[: len(text) // 2 + 7])
    rep, div = diverges(d)
    assert any("cut short" in w for w in rep.warnings)
    assert "last line cut" in rep.divergence


def test_false_release_is_rejected(tmp_path):
    d = gen(tmp_path, Config(mesh=2, chunks=3))
    lines = read(d, 2)
    while '"op":"exit"' in lines[-1]:
        lines.pop()
    lines.append(json.dumps({"ev": "release", "rank": 2, "role": "worker",
                             "reason": "lost heartbeat", "t_ns": 1}))
    write(d, 2, lines)
    rep, div = diverges(d)
    assert "release" in div.reason or "abort" in div.reason


# ---------------------------------------------------------------- report, CLI, overlap

def test_report_and_cli(tmp_path, capsys):
    d = gen(tmp_path, Config(mesh=2, chunks=3))
    assert conformance.cli_conform(d, as_json=True) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and out["verdicts"]["end"]["status"] == "ok"
    evs = events(d, 1)
    evs[find(evs, "bcast_envelope_payload")]["msg"]["calls"] += 1
    put(d, 1, evs, renumber=False)
    assert conformance.cli_conform(d) == 1
    assert "FIRST DIVERGENCE" in capsys.readouterr().out


@pytest.mark.parametrize("name,cfg,costs,kw,verdict", [
    ("balanced2", Config(mesh=3, chunks=30), Costs(4, 8, 4), {}, "overlapping"),
    ("depth1", Config(mesh=3, chunks=30, d_in=1, d_out=1), Costs(4, 8, 4), {},
     "serialised"),
    ("s0", Config(mesh=3, chunks=30), Costs(8, 4, 8), {}, "stage-0 bound"),
    ("s1", Config(mesh=3, chunks=30), Costs(2, 12, 2), {}, "stage-1 bound"),
    ("bug", Config(mesh=3, chunks=30), Costs(4, 8, 4), {"send_after_decode": True},
     "send-after-decode"),
    ("r0a", Config(mesh=3, chunks=30, regime="R0a"), Costs(4, 8, 4), {},
     "serialised by R0a"),
])
def test_overlap_verdicts(tmp_path, name, cfg, costs, kw, verdict):
    d = gen(tmp_path, cfg, name, costs=costs, seed=1, **kw)
    ov = analyse(d)
    assert ov.verdict.startswith(verdict), ov.summary_line()
    if verdict == "overlapping":
        assert ov.overlap_score >= 0.9 and ov.period_ms < 1.15 * ov.max_stage_ms
    if verdict == "serialised":
        assert ov.period_ms > 0.9 * ov.sum_stage_ms


def test_overlap_report_files_and_timeline(tmp_path, capsys):
    d = gen(tmp_path, Config(mesh=2, chunks=12))
    ov = overlap_report(d, tmp_path / "ov")
    assert ov.measured > 0 and "timeline" in ov.files
    tl = json.loads(Path(ov.files["timeline"]).read_text())
    xs = [e for e in tl["traceEvents"] if e["ph"] == "X"]
    assert {e["pid"] for e in xs} == {0, 1, 2} and all(e["dur"] > 0 for e in xs)
    assert conformance.cli_overlap(d, tmp_path / "ov2") == 0
    assert conformance.cli_overlap(GLOO, tmp_path / "ov3") == 0
    assert "stage-1 bound" in capsys.readouterr().out
    assert chrome_trace(load_run(d), tmp_path / "t.json", max_events=10) == 10


def test_conformance_imports_neither_torch_nor_runtime():
    import subprocess
    import sys
    code = ("import sys, conformance, conformance.report, conformance.overlap, "
            "conformance.simulate, conformance.bench; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'runtime')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ---------------------------------------------------------------- hypothesis

_BASES = {}


def _base(tmp_path_factory, key):
    if key not in _BASES:
        cfg = {"r": Config(mesh=2, chunks=3, hard_cut=True, steps=2),
               "b": Config(mesh=2, chunks=3, p2p="buffered", steps=2)}[key]
        d = tmp_path_factory.mktemp(f"base{key}")
        simulate(cfg, d, seed=4, gloo_like=key == "r")
        assert conform(d).ok
        _BASES[key] = (d, {r: read(d, r) for r in range(cfg.world)})
    return _BASES[key]


def _projection(d, world):
    out = {}
    for r in range(world):
        for e in events(d, r):
            if e.get("ev") == "step":
                out.setdefault((r, e["thread"]), []).append(tuple(
                    json.dumps(e.get(f), sort_keys=True) for f in
                    ("i", "src", "label", "dst", "op", "peer", "chan_i", "group", "gseq",
                     "msg")))
    return out


FIELDS = ("i", "src", "label", "dst", "op", "peer", "chan_i", "group", "gseq", "msg",
          "thread", "role", "rank", "t_ns", "dur_ns", "meas")
WORDS = ("main", "comms", "mesh_pg", "world_pg", "rank0", "leader", "worker", "send",
         "recv", "coll", "local", "exit", "gen", "run", "idle/idle", "wait_hdr",
         "decode_result", "generator_call", "hdr/pay", "pay/idle", "bcast_hdr")


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(base=st.sampled_from("rb"), kind=st.sampled_from(["swap", "delete", "duplicate",
                                                         "alter", "alter", "alter"]),
       rank=st.integers(0, 2), a=st.integers(0, 10**6), b=st.integers(0, 10**6),
       field=st.sampled_from(FIELDS), sub=st.sampled_from(
           ["action", "call_id", "chunk", "epoch", "calls", "init_cache"]),
       delta=st.sampled_from([-1, 1, 2]), word=st.sampled_from(WORDS))
def test_mutated_traces_are_rejected_or_equivalent(tmp_path_factory, base, kind, rank, a,
                                                   b, field, sub, delta, word):
    src, lines0 = _base(tmp_path_factory, base)
    d = tmp_path_factory.mktemp("mut")
    for f in src.iterdir():
        shutil.copy(f, d / f.name)
    lines = list(lines0[rank])
    i, j = a % len(lines), b % len(lines)
    if kind == "swap":
        lines[i], lines[j] = lines[j], lines[i]
    elif kind == "delete":
        del lines[i]
    elif kind == "duplicate":
        lines.insert(i, lines[i])
    else:
        e = json.loads(lines[i])
        if field not in e:
            return
        v = e[field]
        if field == "msg" and isinstance(v, dict):
            v = dict(v)
            v[sub] = (not v[sub]) if isinstance(v[sub], bool) else v[sub] + delta
        elif field == "msg" and isinstance(v, list):
            v = v + [v[0]] if delta > 0 else v[:-1]
        elif field == "meas":
            v = {"q_in": delta}
        elif isinstance(v, bool):
            v = not v
        elif isinstance(v, int):
            v = v + delta
        elif isinstance(v, str):
            v = word if word != v else v + "x"
        e[field] = v
        lines[i] = json.dumps(e, sort_keys=True, separators=(",", ":"))
    write(d, rank, lines)
    orig = conform(src)
    rep = conform(d)          # never raises: malformed input is a verdict
    if not rep.ok:
        assert rep.divergence or any(v.status == "violated" for v in rep.verdicts)
        return
    world = 3
    if _projection(d, world) == _projection(src, world):
        return
    # the only accepted change of the steps: a rank's trace now ends early, which is
    # exactly what a kill -9 leaves; the report must say so
    assert "kill -9" in (rep.failure_mode or "") and \
        "kill -9" not in (orig.failure_mode or ""), (kind, rank, i, j, field,
                                                     format_report(rep))


EAGER = TESTDATA / "kill_leader_after_eager_send"


def test_a_send_to_a_killed_receiver_may_have_completed_in_the_transport():
    """rank0's SHUTDOWN header (rank0.jsonl line 42) went out while the leader's comms
    thread was at `hdr/put` (its inbox full: no receive posted), and the leader was then
    killed: nobody received the frame, the send completed in the transport; the ending
    is model/events.py EAGER_SEND_RULE. (A real run with the leader's file cut back to
    that state: see conformance/testdata/README.md.)"""
    rep = conform(EAGER)
    assert rep.ok, format_report(rep)
    assert "rank0: its send_header_only (rank0.jsonl line 42) completed in the " \
        "transport" in format_report(rep)


def test_a_send_to_a_live_receiver_that_never_receives_it_is_rejected(tmp_path):
    """The same traces, but the leader was released (alive in the model until the abort
    flag) instead of killed: the unreceived send is the first divergence."""
    d = tmp_path / "run"
    shutil.copytree(EAGER, d)
    release = dict(events(d, 2)[-1], rank=1, role="leader")
    put(d, 1, events(d, 1) + [release], renumber=False)
    _, div = diverges(d)
    assert div.rank == 0 and div.event.line == 42
    assert div.event.label == "send_header_only"
    assert "enables no send" in div.reason


# ---------------------------------------------------------------- file order, bounds

def moved(evs, a, b) -> list:
    """The events with the one at index a moved to index b (a corrupted file order)."""
    out = list(evs)
    out.insert(b, out.pop(a))
    return out


def test_file_order_is_a_total_order_across_threads(tmp_path):
    """rank0 writes both threads' events under one lock: taking the first envelope
    (comms) before it is built (main) is rejected at the take, though each thread's own
    order is intact; moving a decode ahead of comms events it does not depend on (to
    just after main's previous line) is accepted."""
    d = gen(tmp_path, Config(mesh=2, chunks=4), seed=1)
    evs = events(d, 0)
    build, take = find(evs, "build_envelope"), find(evs, "take_envelope")
    assert take == build + 1
    put(d, 0, moved(evs, take, build), renumber=False)
    _, div = diverges(d)
    assert div.rank == 0 and div.event.label == "take_envelope"
    assert div.event.line == build + 1 and "guard" in div.reason
    legal = gen(tmp_path, Config(mesh=2, chunks=4), "legal", seed=1)
    decode = find(evs, "decode_result")
    after_main = max(k for k in range(decode) if evs[k].get("thread") == "main") + 1
    assert evs[after_main].get("thread") == "comms" and after_main < decode
    put(legal, 0, moved(evs, decode, after_main), renumber=False)
    check(legal)


def test_envelopes_in_flight_above_d_in_are_rejected(tmp_path):
    """A third envelope built while two are in flight (D_in = 2): rejected at the build,
    with the model's queue_bound verdict; built once a result came back: accepted."""
    cfg = Config(mesh=2, chunks=4)
    d = gen(tmp_path, cfg, seed=1)
    evs = events(d, 0)
    third, back = find(evs, "build_envelope", 2), find(evs, "recv_result_payload")
    assert back < third
    put(d, 0, moved(evs, third, back), renumber=True)
    rep, div = diverges(d)
    assert div.rank == 0 and div.event.label == "build_envelope"
    assert div.event.line == back + 1
    assert "D_in = 2" in div.reason and div.verdict.startswith("queue_bound")
    legal = gen(tmp_path, cfg, "legal", seed=1)
    put(legal, 0, moved(evs, third, back + 1), renumber=True)
    check(legal)


def test_results_waiting_above_d_out_are_rejected(tmp_path):
    """With D_out = 1, a result queued while the previous one is still waiting to be
    decoded: rejected at the queueing, with queue_bound; decoded just before: accepted."""
    cfg = Config(mesh=2, chunks=4, d_out=1)
    d = gen(tmp_path, cfg, seed=1)
    evs = events(d, 0)
    decode, queue = find(evs, "decode_result", 2), find(evs, "queue_result", 3)
    assert decode < queue
    put(d, 0, moved(evs, decode, queue), renumber=True)
    rep, div = diverges(d)
    assert div.rank == 0 and div.event.label == "queue_result"
    assert div.event.line == queue and div.verdict.startswith("queue_bound")
    assert rep.verdict("queue_bound").status == "violated"
    legal = gen(tmp_path, cfg, "legal", seed=1)
    put(legal, 0, moved(evs, decode, queue - 1), renumber=True)
    check(legal)


def test_an_extra_generator_call_breaks_the_call_count(tmp_path):
    """A worker that runs one generator call more than the envelope plans: rejected at
    that worker's line; the same trace as recorded conforms."""
    cfg = Config(mesh=3, chunks=4, steps=2)
    d = gen(tmp_path, cfg, seed=2)
    check(d)
    evs = events(d, 2)
    k = find(evs, "generator_call", 1)
    evs.insert(k, dict(evs[k]))
    put(d, 2, evs)
    rep, div = diverges(d)
    assert div.rank == 2 and div.event.line == k + 2
    assert div.event.label == "generator_call"


def test_call_ids_that_go_back_are_rejected(tmp_path):
    """The third envelope recorded with the second one's call_id by every rank (the
    ranks agree with each other, not with the model): rejected at rank0's build."""
    cfg = Config(mesh=2, chunks=4)
    d = gen(tmp_path, cfg, seed=1)
    check(d)
    first = None
    for r in range(cfg.world):
        evs = events(d, r)
        for k, e in enumerate(evs):
            m = e.get("msg")
            if isinstance(m, dict) and m.get("call_id") == 2:
                m["call_id"] = 1
                if r == 0 and first is None:
                    first = k
        put(d, r, evs, renumber=False)
    _, div = diverges(d)
    assert div.rank == 0 and div.event.line == first + 1
    assert div.event.label == "build_envelope" and "call_id=2" in div.reason


def test_an_eager_send_may_come_after_later_lines_of_its_rank(tmp_path):
    """A real shutdown_in_flight run: rank0 wrote its SHUTDOWN header send before
    receiving the leader's last results. (Re-recorded with the leader's comms thread,
    whose receive stays posted, this run no longer needs `_may_lag`; the corpus runs
    cpu_gloo_pp0 and cpu_gloo_heartbeats do.) A decode moved ahead of the queueing of
    its result (no send lags there) is rejected, at the decode."""
    d = conforming_copy(TESTDATA / "shutdown_eager_send_lags", tmp_path)
    evs = events(d, 0)
    last_send = max(k for k, e in enumerate(evs) if e.get("op") == "send")
    queue = find(evs, "queue_result", -1)
    decode = find(evs, "decode_result", -1)
    assert last_send < queue < decode
    put(d, 0, moved(evs, decode, queue), renumber=True)
    _, div = diverges(d)
    assert div.rank == 0 and div.event.line == queue + 1
    assert div.event.label == "decode_result" and "guard" in div.reason


def test_two_ops_of_a_pair_thread_may_be_noticed_out_of_causal_order(tmp_path):
    """As a real pp0 run did: the leader's comms thread wrote its receive of envelope
    k+1 before its send of result k's payload, which rank0 received before sending
    envelope k+1 (the send's completion was noticed late). Two p2p ops on the
    two sides of one pair-state thread do not bound each other; a local row still comes
    after both (moving queue_envelope ahead of its payload receive is rejected)."""
    cfg = Config(mesh=1, chunks=4)
    d = gen(tmp_path, cfg, seed=1)
    evs = events(d, 1)
    send = find(evs, "send_result_payload")
    recv = send + 1
    assert evs[recv]["label"] == "recv_envelope_header"
    r0 = events(d, 0)
    got = next(k for k, e in enumerate(r0) if e.get("label") == "recv_result_payload"
               and e["chan_i"] == evs[send]["chan_i"])
    sent = next(k for k, e in enumerate(r0) if e.get("op") == "send"
                and e["chan_i"] == evs[recv]["chan_i"])
    assert got < sent               # rank0 sent envelope k+1 after receiving result k
    # recorded as the runtime records it: each in the pair state it was applied in
    evs[recv].update(src="pay/idle", dst="pay/pay")
    evs[send].update(src="pay/pay", dst="idle/pay")
    evs[recv + 1]["src"] = "idle/pay"
    put(d, 1, moved(evs, recv, send), renumber=True)
    check(d)
    bad = gen(tmp_path, cfg, "bad", seed=1)
    pay = find(evs, "recv_envelope_payload", 1)
    assert evs[pay + 1]["label"] == "queue_envelope"
    put(bad, 1, moved(evs, pay + 1, pay), renumber=True)
    _, div = diverges(bad)
    assert div.rank == 1 and div.event.label == "queue_envelope"


def test_a_send_noticed_late_comes_after_lines_it_does_not_bound(tmp_path):
    """chaos trial 3 (seed 11, worker killed): the leader wrote its send of result 8's
    payload (rank1.jsonl line 127) after its receive and queueing of envelope 9 and
    main's broadcasts of it (lines 120-126), though rank0 received result 8 (line 75)
    before sending envelope 9's payload (line 79). Conforms: a send is bounded only by
    its own side's earlier lines. Its own side is still a bound: the send moved ahead
    of its header send is rejected."""
    d = conforming_copy(TESTDATA / "chaos_late_send", tmp_path)
    evs = events(d, 1)
    pay = next(k for k, e in enumerate(evs) if e.get("label") == "send_result_payload"
               and e["chan_i"] == 17)
    hdr = next(k for k, e in enumerate(evs) if e.get("label") == "send_result_header"
               and e["chan_i"] == 16)
    assert hdr < pay
    put(d, 1, moved(evs, pay, hdr), renumber=True)
    _, div = diverges(d)
    assert div.rank == 1


def test_random_policy_schedules_differently_from_des(tmp_path):
    """policy="random" picks uniformly among enabled transitions (it was once shadowed by
    the scheduling-policy object and silently ran the DES order): some seed must give a
    rank0 order the DES does not, and every such trace must conform."""
    cfg = Config(mesh=2, d_in=2, d_out=2, chunks=4)

    def order(d):
        return [json.loads(x).get("label") for x in (d / "rank0.jsonl").read_text().splitlines()]

    des = order(gen(tmp_path, cfg, "des", seed=1, policy="des"))
    orders = []
    for seed in range(1, 6):
        d = gen(tmp_path, cfg, f"r{seed}", seed=seed, policy="random")
        check(d)
        orders.append(order(d))
    assert any(o != des for o in orders)


# ---------------------------------------------------------------- the root cause's ending

def _verdict(rep, name):
    return next(v for v in rep.verdicts if v.name == name)


def test_a_root_released_while_committed_to_its_failure_is_an_ending_the_model_has():
    """The leader recorded its cause at exit_err (committed to "envelope rejected") and was
    released by the flag before its exit row: its cause names an ending the model has."""
    rep = check(TESTDATA / "leader_throw_root_released")
    assert "leader released by the abort flag" in _verdict(rep, "end").detail


def test_a_release_naming_a_rank_that_was_not_failing_is_rejected(tmp_path):
    """The same run with the cause moved to rank0, released in Phase A (committed to
    nothing): rank0 cannot be the root cause of an error."""
    d = conforming_copy(TESTDATA / "leader_throw_root_released", tmp_path)
    f = d / "rank1.jsonl"
    lines = f.read_text().splitlines()
    for i, ln in enumerate(lines):
        e = json.loads(ln)
        if e.get("ev") == "release":
            e["cause"] = dict(e["cause"], rank=0, role="rank0")
            lines[i] = json.dumps(e)
    f.write_text("\n".join(lines) + "\n")
    rep = conform(d)
    assert not rep.ok
    assert "rank 1's release names rank 0 (error) as the root cause, but the model ends " \
           "rank 0 aborted" in _verdict(rep, "end").detail
