"""Footprints of rows (model.footprint) and the thread-level partial-order reduction that
rests on them: on every reachable state of small configurations (shipped, faults, every
mutation), what each guard, make, accept, update and tag property of an enabled
transition reads, and what its update changes, lies inside the derived sets; a
footprint that leaves a write out is caught by that check; a thread-level reduction
that ignores conflicts is caught by the agreement check of test_model_reduction."""
import pytest

import lockstep.model.footprint as footprint
import lockstep.model.reduction as reduction
from lockstep.model.config import Config
from lockstep.model.explore import _search
from lockstep.model.meter import Meter
from lockstep.model.mutations import MUTATIONS, model_for, mutation_config
from lockstep.model.properties import check_progress_at_exit, check_transition
from lockstep.model.reduction import Threads
from lockstep.model.semantics import State

CONFIGS = [Config(mesh=2, chunks=2), Config(mesh=3, chunks=3, hard_cut=True, faults=1),
           Config(mesh=2, chunks=2, p2p="buffered", noops=1, hard_cut=True),
           Config(mesh=3, chunks=2, hard_cut=True, faults=1, cond_flag_all=True),
           Config(mesh=3, chunks=2, hard_cut=True, faults=1,
                  inject=frozenset({"leader_reject", "rank0_bad_envelope"}))]
CONFIGS += [mutation_config(Config(mesh=2, chunks=2), n) for n in MUTATIONS]


class Recorder:
    """Stands for a process's variables and notes every field read through it."""

    def __init__(self, v, log):
        object.__setattr__(self, "_v", v)
        object.__setattr__(self, "_log", log)

    def __getattr__(self, name):
        if name == "_replace":
            return lambda **kw: Recorder(self._v._replace(**kw), self._log)
        self._log.add(name)
        return getattr(self._v, name)


def _plain(v):
    return v._v if isinstance(v, Recorder) else v


def _names(th, p, mask):
    fields = th.fields[p]
    if mask == (1 << (len(fields) + th.nthreads[p])) - 1:
        return None     # everything
    return {f for i, f in enumerate(fields) if mask >> i & 1}


def _reachable(model, limit=3000):
    seen, frontier = {model.initial_state()}, [model.initial_state()]
    while frontier and len(seen) < limit:
        nxt = []
        for s in frontier:
            for tr in model.enabled(s):
                if tr.kind == "violation":
                    continue
                s2 = model.step(s, tr)
                if s2 not in seen:
                    seen.add(s2)
                    nxt.append(s2)
                yield s, tr, s2
        frontier = nxt


def footprint_escapes(cfg) -> list:
    """Every (row, what) whose observed reads or changes lie outside its footprint."""
    model = model_for(cfg)
    th, out = Threads(model), []
    for s, tr, s2 in _reachable(model):
        if tr.kind not in ("local", "exit", "p2p", "send", "recv", "coll"):
            continue
        for p, t, row in tr.parts:
            reads_mask, writes_mask = th.row_fp(p, t, row)
            reads, writes = _names(th, p, reads_mask), _names(th, p, writes_mask)
            if reads is None:
                continue
            v, cfg_ = s.procs[p].v, model.cfg
            log = set()
            if row.guard is not None:
                row.guard(Recorder(v, log), cfg_)
            if row.make is not None:
                row.make(Recorder(v, log), cfg_)
            if row.accept is not None:
                row.accept(Recorder(v, log), cfg_, tr.msg)
            if row.update is not None:
                new = _plain(row.update(Recorder(v, log), cfg_, tr.msg))
                changed = {f for f in v._fields if getattr(new, f) != getattr(v, f)}
                if writes is not None and not changed <= writes:
                    out.append((row.label, "writes", changed - writes))
            # The properties the row's tags ask for, on the same recording variables.
            procs = list(s.procs)
            procs[p] = procs[p]._replace(v=Recorder(v, log))
            after = list(s2.procs)
            if after[p].v is not None:
                after[p] = after[p]._replace(v=Recorder(after[p].v, log))
            s_rec = State(tuple(procs), *s[1:])
            check_transition(model, s_rec, tr._replace(parts=((p, t, row),)),
                             State(tuple(after), *s2[1:]))
            check_progress_at_exit(model, s_rec, tr._replace(parts=((p, t, row),)))
            if not log <= reads:
                out.append((row.label, "reads", log - reads))
    return out


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.describe())
def test_footprints_hold_what_rows_read_and_write(cfg):
    assert footprint_escapes(cfg) == []


def test_a_footprint_missing_a_write_is_caught(monkeypatch):
    from lockstep.model import guards
    real = footprint._touches

    def forgetful(fn):
        r, w = real(fn)
        return (r, w - {"send_q"}) if fn is guards.take_envelope else (r, w)
    monkeypatch.setattr(footprint, "_touches", forgetful)
    escapes = footprint_escapes(Config(mesh=2, chunks=2))
    assert ("take_envelope", "writes", {"send_q"}) in escapes


def test_derived_footprints_are_not_everything():
    """The derivation must see through the guards module: were every row 'everything',
    the thread-level reduction would be the process-level one and this check vacuous."""
    model = model_for(Config(mesh=2, chunks=2))
    th = Threads(model)
    rows = [(p, t, row) for p, table in enumerate(model.tables)
            for t, by_pc in enumerate(table) for rs in by_pc.values() for row in rs]
    precise = [row.label for p, t, row in rows
               if _names(th, p, th.row_fp(p, t, row)[1]) is not None]
    assert "take_envelope" in precise and "decode_result" in precise
    assert "exit_clean" not in precise      # an exit ends the process: everything


def test_a_thread_reduction_ignoring_conflicts_is_caught(monkeypatch):
    """Splitting a process's threads without weighing their footprints (rank0's main
    thread decodes ahead of its comms thread's queue_result) misses a real violation:
    the agreement check of test_model_reduction would fail for such a reduction."""
    monkeypatch.setattr(reduction, "_conflict", lambda now, future: False)
    cfg = mutation_config(Config(mesh=2, chunks=2), "unbounded_decode_queue")
    full = _search(model_for(cfg), True, Meter(False), 0, False, False)
    reduced = _search(model_for(cfg), True, Meter(False), 0, True, True)
    assert full.verdict == "queue_bound"
    assert reduced.verdict == "clean"
