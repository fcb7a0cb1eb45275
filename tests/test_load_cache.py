"""The load cache (conformance/cache.py): a cached load is the load it replaces, a stale
or corrupted cache is never trusted, an unwritable trace directory still loads."""
import json
import os
import stat
from pathlib import Path

import pytest

from lockstep.conformance import cache as C
from lockstep.conformance.load import load_run
from lockstep.conformance.report import conform, format_report
from lockstep.conformance.simulate import simulate
from lockstep.model import tracefmt as F
from lockstep.model.config import Config
from lockstep.model.semantics import Model
from lockstep.model.tables import THREADS, shipped_tables

CFG = Config(mesh=2, d_in=2, d_out=2, chunks=6, hard_cut=True, steps=2)
FIELDS = ("rank", "t", "thread", "i", "src", "label", "dst", "op", "peer", "chan_i",
          "group", "gseq", "msg", "has_msg", "t_ns", "dur_ns", "meas", "line", "pos",
          "file", "done", "partner", "inst", "dup", "lane", "deps")


def _run(tmp_path, name="run", cfg=CFG, seed=1) -> Path:
    d = tmp_path / name
    simulate(cfg, d, seed=seed, gloo_like=True)
    return d


def _as_format2(d: Path) -> None:
    """Rewrite each rank's long-form trace as one format-2 segment, as runtime/trace.py
    writes it: a checkpoint of the model's initial state, then compact step lines."""
    m = Model(load_run(d, cache=False).cfg, shipped_tables())
    s0 = m.initial_state()
    for r, role in enumerate(m.roles):
        p = d / f"rank{r}.jsonl"
        lines = [json.loads(x) for x in p.read_text().splitlines()]
        t0 = min(x["t_ns"] for x in lines)
        c = F.Counters(s0.procs[r].pcs)
        out = [F.checkpoint_event(r, role, 0, t0, F.Counters(s0.procs[r].pcs),
                                  s0.procs[r].v)]
        enc = F.StepEncoder(THREADS[role], c, t0,
                            F.shared_labels(m.tables[r], THREADS[role]))
        out += [enc.encode(x) if x.get("ev") == "step" else x for x in lines]
        p.write_text("".join(json.dumps(x, separators=(",", ":")) + "\n" for x in out))


def _same_load(a, b) -> None:
    assert a.warnings == b.warnings and a.n_events == b.n_events
    for ra, rb in zip(a.ranks, b.ranks):
        for f in ("start", "releases", "faults", "truncated", "has_exit", "next_i",
                  "ended", "err_line"):
            assert getattr(ra, f) == getattr(rb, f), f
        assert [(p, n, d) for p, n, d in ra.checkpoints] == \
            [(p, n, d) for p, n, d in rb.checkpoints]
        for ea, eb in zip(ra.steps, rb.steps):
            for f in FIELDS:
                assert getattr(ea, f) == getattr(eb, f), (ea.where(), f)
                assert type(getattr(ea, f)) is type(getattr(eb, f)), (ea.where(), f)
            assert (ea.prev and ea.prev.pos) == (eb.prev and eb.prev.pos)
        assert [e.pos for e in rb.prev_of if e] == [e.pos for e in ra.prev_of if e]


@pytest.mark.parametrize("fmt", ["long", "format2"])
def test_a_cached_load_is_the_load_it_replaces(tmp_path, fmt):
    d = _run(tmp_path)
    if fmt == "format2":
        _as_format2(d)
    where = tmp_path / "cache"
    fresh = load_run(d, cache=False)
    assert fresh.cache_note == "load cache: off (cache=False)"
    first = load_run(d, cache=where)
    assert "wrote rank0, rank1, rank2" in first.cache_note, first.cache_note
    second = load_run(d, cache=where)
    assert "read rank0, rank1, rank2" in second.cache_note, second.cache_note
    assert "wrote" not in second.cache_note
    _same_load(fresh, first)
    _same_load(fresh, second)
    assert bool(fresh.ranks[0].checkpoints) == (fmt == "format2")


def test_a_value_marshal_cannot_hold_is_not_cached(tmp_path):
    lc = C.LoadCache(tmp_path / "cache")
    lc.put(0, 0, b"k" * 32, (F.Msg(1, 0, 0, 0, 2, True, True),))   # a NamedTuple
    assert not (tmp_path / "cache").exists()
    assert "not cached (a value marshal cannot hold): rank0" in lc.note()


def test_a_stale_cache_is_rebuilt_and_the_verdict_follows_the_trace(tmp_path, monkeypatch):
    d = _run(tmp_path)
    monkeypatch.setenv(C.ENV, str(tmp_path / "cache"))
    assert conform(d).ok
    assert "read" in load_run(d).cache_note
    # one field of one line: the leader's first result carries another chunk index
    p = d / "rank1.jsonl"
    lines = p.read_text().splitlines()
    k = next(k for k, x in enumerate(lines) if '"label":"send_result_header"' in x)
    ev = json.loads(lines[k])
    ev["msg"]["chunk"] += 7
    lines[k] = json.dumps(ev, sort_keys=True, separators=(",", ":"))
    p.write_text("".join(x + "\n" for x in lines))
    run = load_run(d)
    assert "stale, rebuilt from the trace: rank1" in run.cache_note, run.cache_note
    assert "read rank0, rank2" in run.cache_note
    assert next(e for e in run.ranks[1].steps if e.label == "send_result_header").msg[2] \
        == ev["msg"]["chunk"]
    rep = conform(d)
    assert not rep.ok and rep.result.divergence is not None, format_report(rep)
    # and back: the original trace conforms again through a rebuilt cache
    ev["msg"]["chunk"] -= 7
    lines[k] = json.dumps(ev, sort_keys=True, separators=(",", ":"))
    p.write_text("".join(x + "\n" for x in lines))
    assert conform(d).ok


@pytest.mark.parametrize("damage", ["flip", "cut", "empty", "garbage_payload"])
def test_a_corrupted_cache_is_ignored(tmp_path, damage):
    d = _run(tmp_path)
    where = tmp_path / "cache"
    fresh = load_run(d, cache=where)
    (f,) = [p for p in where.rglob("rank1.cache")]
    blob = f.read_bytes()
    head = len(C.MAGIC) + 64
    if damage == "flip":
        k = head + (len(blob) - head) // 2
        blob = blob[:k] + bytes([blob[k] ^ 0x20]) + blob[k + 1:]
    elif damage == "cut":
        blob = blob[:len(blob) // 2]
    elif damage == "empty":
        blob = b""
    else:   # a checksum that holds over a payload that is not a rank's
        import hashlib
        import marshal
        body = marshal.dumps((C.VERSION, [(0, "x")], [], None))
        blob = blob[:len(C.MAGIC) + 32] + hashlib.sha256(body).digest() + body
    f.write_bytes(blob)
    run = load_run(d, cache=where)
    assert "corrupt, ignored and rebuilt: rank1" in run.cache_note, run.cache_note
    _same_load(fresh, run)
    assert "read rank0, rank1, rank2" in load_run(d, cache=where).cache_note


def test_a_read_only_trace_directory_loads_without_a_cache(tmp_path, monkeypatch):
    d = _run(tmp_path)
    monkeypatch.setattr(C, "MIN_BYTES", 0)       # the default location, at any size
    # unwritable: a file where the cache directory would be (this holds for root
    # too, whom the permission bits below do not stop), and no write permission
    (d / C.SUBDIR).write_text("not a directory")
    mode = d.stat().st_mode
    os.chmod(d, stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
    try:
        fresh = load_run(d, cache=False)
        run = load_run(d)
        assert "cannot write there" in run.cache_note and C.ENV in run.cache_note, \
            run.cache_note
        _same_load(fresh, run)
        assert conform(d).ok
        # a cache directory elsewhere, for a trace directory the user cannot write
        monkeypatch.setenv(C.ENV, str(tmp_path / "elsewhere"))
        assert "wrote rank0" in load_run(d).cache_note
        again = load_run(d)
        assert "read rank0, rank1, rank2" in again.cache_note, again.cache_note
        _same_load(fresh, again)
    finally:
        os.chmod(d, mode)


def test_the_default_location_and_off(tmp_path, monkeypatch):
    d = _run(tmp_path)
    monkeypatch.delenv(C.ENV, raising=False)
    assert "not used" in load_run(d).cache_note         # a small trace
    assert not (d / C.SUBDIR).exists()
    monkeypatch.setattr(C, "MIN_BYTES", 0)
    assert "wrote" in load_run(d).cache_note
    assert sorted(p.name for p in (d / C.SUBDIR).iterdir()) == \
        ["rank0.cache", "rank1.cache", "rank2.cache"]
    assert "read" in load_run(d).cache_note
    monkeypatch.setenv(C.ENV, "off")
    assert load_run(d).cache_note == f"load cache: off ({C.ENV}=off)"
    monkeypatch.delenv(C.ENV)
    C.clear(d)
    assert not (d / C.SUBDIR).exists()
