"""Exhaustive explicit-state search with shortest counterexamples.

Breadth-first over canonical states, so the first violation found is at minimal
depth: counterexamples are shortest. A violation is either a `violation` transition
(framing, collective mismatch: visible as soon as it is enabled), a transition or state
property (model.properties), or a stuck state that is not a clean end.

Reductions (each can be switched off; docs/model-check.md has the figures)
  symmetry   workers with identical tables are interchangeable: permuting them is an
             automorphism of the transition system (groups and channels refer to them
             only as members of mesh_pg, never by index, and every property is
             invariant under the permutation). Canonical form = workers sorted. A
             worker singled out by a fault or mutation keeps its place. tests/ checks
             reduced and unreduced searches agree on small configurations.
             The search sorts workers by interned id (Interner), a total order on
             worker states, so one key per orbit; `Canon` (sorted by hash, ties by
             repr) is the same quotient for drivers that need a process-independent
             representative (model.parallel, the acyclicity test).
  partial-order reduction (`por`)   ample sets over closed groups of threads (a
             process's threads split by the read/write sets of their rows, once no
             crash is left), with a breadth-first cycle proviso: model.reduction says
             why it is sound. A
             violation found under it is searched again without it, so the verdict and
             the counterexample printed are the unreduced search's: shortest.
  no crashes with the watchdog on (with `por`)   the search starts with no crash
             budget when the watchdog is modelled: a crash is observable only as steps
             the process no longer takes and as the watchdog's abort flag, whose
             release ends cleanly; model.reduction says why no verdict is lost.
  lone steps (with `por`, no crash budget)   where a closed group has exactly one
             transition (one local row, or one collective), it is found from the
             state's summaries and expanded without `Model.enabled` (model.reduction
             says why a violation enabled elsewhere is still found).
  abort chain (with `por`)   once the abort flag is set, the only transition is the
             release of every live process; the search follows it without storing the
             state in between (judging it on the way).
  crash after a local step (with `por`)   a crash overwrites the whole process, so
             crashing p right after p's own local step reaches exactly the state that
             crashing p before the step reached (from the parent, where the crash was
             expanded: it is in every ample set p's step is in). The search skips it.
             For a symmetric worker, whose place moves under the canonical sort, it
             skips the crash of every place holding p's new state (any of them gives
             the same canonical state).
  one crash per twin (with `por` and symmetry)   crashing either of two symmetric
             workers in the same local state reaches the same canonical state; of the
             transitions chosen for a state, only one such crash is expanded. Fewer
             transitions, the same states.
  compact keys   process states repeat across millions of global states: each distinct
             one is interned to an int, and a global state is stored as one int that
             packs its process ids and its interned channels/sequence numbers/abort
             flag/fault budget. Frontiers hold (key, rest id, pids), and states are
             rebuilt from those when expanded. The model's per-process work (rows posted, a row's successor
             process state) is memoised on interned states, and the state invariants
             (rank0 only) are judged once per distinct rank0 state. Rejected: keeping
             `State` objects as keys (each lookup rehashes every nested tuple: the
             profile's largest item before), and a tuple of ints as key (about twice the
             memory of a packed int at a million states).
Counterexample steps are recovered by replaying the chain of canonical states from
the initial state concretely, so worker names stay consistent along the path.

Mesh sizes: verdicts for a mesh with more workers than crash faults carry to every
larger mesh (the argument, and what does not carry, is in docs/model-check.md, "Every
mesh size"; tests/test_model_reduction.py checks its two predictions: the same verdict
for every mutation at mesh 2..5, and state counts affine in the mesh size).
"""
from __future__ import annotations

import gc
import resource
import time
from dataclasses import dataclass, field
from typing import Optional

from .meter import Meter, StateBudgetExceeded, TimeBudgetExceeded  # noqa: F401 (public)
from .properties import (check_progress_at_exit, check_rank0, check_terminal,
                         check_transition)
from .reduction import Ample
from .semantics import Model, State, Tr, Violation


LOOK_EVERY = 256   # states expanded between two looks at the meter (its clock and line)


@dataclass
class Result:
    config: str
    verdict: str                      # "clean" or the property violated
    violation: Optional[Violation]
    steps: list = field(default_factory=list)   # numbered counterexample lines
    states: int = 0
    transitions: int = 0
    depth: int = 0
    seconds: float = 0.0
    peak_mb: float = 0.0
    terminals: int = 0
    symmetry: bool = True
    por: bool = False
    workers: int = 1
    researched: bool = False   # found under POR; states, steps: the unreduced search's
    crash_free: bool = False   # crash budget left out (the watchdog on: model.reduction)

    @property
    def states_per_s(self) -> float:
        return self.states / self.seconds if self.seconds > 0 else float("inf")

    def as_dict(self) -> dict:
        return {"config": self.config, "verdict": self.verdict,
                "property": self.violation.prop if self.violation else None,
                "detail": self.violation.detail if self.violation else None,
                "counterexample": self.steps, "cex_length": len(self.steps),
                "states": self.states, "transitions": self.transitions,
                "depth": self.depth, "seconds": round(self.seconds, 3),
                "states_per_s": round(self.states_per_s),
                "peak_mb": round(self.peak_mb, 1), "symmetry": self.symmetry,
                "por": self.por, "researched": self.researched,
                "crash_free": self.crash_free,
                "workers": self.workers}


class Canon:
    """Canonical form: symmetric workers sorted, process states interned."""

    def __init__(self, model: Model, symmetry: bool):
        self.sym = model.sym if symmetry else None
        self.pool = {}

    def __call__(self, s: State) -> State:
        pool = self.pool
        procs = tuple(pool.setdefault(pr, pr) for pr in s.procs)
        if self.sym:
            lo, hi = self.sym
            mid = procs[lo:hi]
            keys = [hash(pr) for pr in mid]
            if len(set(keys)) == len(set(mid)):   # equal states may share a hash
                mid = tuple(pr for _, pr in sorted(zip(keys, mid), key=_first))
            else:   # equal hashes (hash(-1) == hash(-2) in CPython): break ties by repr
                mid = tuple(sorted(mid, key=lambda pr: (hash(pr), repr(pr))))
            procs = procs[:lo] + mid + procs[hi:]
        return State(procs, s.chans, s.seq, s.abort, s.faults_left)


def _first(pair):
    return pair[0]


class Interner:
    """Compact keys: process states interned to small ints, a global state packed into
    one int (its interned process states and its interned channels/sequence/abort/
    budget tuple, FIELD bits each). Symmetric workers are sorted by interned id: a
    total order on worker states, so one key per orbit, like Canon's order.

    It also memoises the model's per-process work on interned states (the rows a
    process posts, and the successor process state of a row), so the hot path hashes
    small ints, not nested tuples. The memo is keyed by object identity of interned
    states only; those stay alive in `procs`, so an identity is never reused."""

    FIELD = 24

    def __init__(self, model: Model, symmetry: bool):
        self.model = model
        self.n = model.n
        self.sym = model.sym if symmetry else None
        self.procs, self.pool, self.ids = [], {}, {}
        self.rests, self.rest_ids = [], {}
        self.checked = {}
        posted, apply = model._posted, model._apply
        n, ids, memo_posted, memo_apply = self.n, self.ids, {}, {}
        offers = {}

        # Keyed by id() of interned states alone: they are never freed, so no other
        # live object can have their id (a state that is not interned is not stored).
        # What a process offers repeats across its states (the same rows enabled):
        # one copy of each (model.posted's own cache, keyed by the state, is not used:
        # it kept a copy per state, a fifth of the memory of the search).
        def fast_posted(p, pr):
            hit = memo_posted.get(id(pr) * n + p)
            if hit is None:
                hit = posted(p, pr)
                if id(pr) in ids:
                    hit = memo_posted[id(pr) * n + p] = offers.setdefault(hit, hit)
            return hit

        def fast_apply(pr, t, row, msg):
            key = (id(pr), t, id(row), msg)
            hit = memo_apply.get(key)
            if hit is None:
                if id(pr) not in ids:
                    return apply(pr, t, row, msg)
                new, abort = apply(pr, t, row, msg)
                hit = memo_apply[key] = (self.procs[self.intern(new)], abort)
            return hit

        model.posted, model._apply = fast_posted, fast_apply

    def intern(self, pr) -> int:
        i = self.ids.get(id(pr))
        if i is None:
            i = self.pool.get(pr)
            if i is None:
                i = self.pool[pr] = len(self.procs)
                self.procs.append(pr)
                self.ids[id(pr)] = i
        return i

    def pids(self, s: State) -> list:
        ids = self.ids
        out = [ids.get(id(pr)) for pr in s.procs]
        if None in out:
            out = [self.intern(pr) if i is None else i for i, pr in zip(out, s.procs)]
        if self.sym:
            lo, hi = self.sym
            out[lo:hi] = sorted(out[lo:hi])
        return out

    def rest_id(self, s: State) -> int:
        """The interned id of s's channels, sequence numbers, abort flag and budget."""
        rest = (s.chans, s.seq, s.abort, s.faults_left)
        k = self.rest_ids.get(rest)
        if k is None:
            k = self.rest_ids[rest] = len(self.rests)
            self.rests.append(rest)
        return k

    def key(self, s: State, pids: list) -> int:
        return self.pack(self.rest_id(s), pids)

    def pack(self, k: int, pids: list) -> int:
        f = self.FIELD
        for i in pids:
            k = (k << f) | i
        return k

    def state(self, k: int) -> tuple:
        """(the canonical state a key stands for, the pids of its processes)."""
        f, mask, procs = self.FIELD, (1 << self.FIELD) - 1, self.procs
        pids = []
        for _ in range(self.n):
            pids.append(k & mask)
            k >>= f
        pids.reverse()
        return State(tuple([procs[i] for i in pids]), *self.rests[k]), pids

    def rank0_violation(self, m: Model, pid0: int):
        """State invariants read rank0 only: judge each interned rank0 state once."""
        hit = self.checked.get(pid0, self)
        if hit is self:
            hit = self.checked[pid0] = check_rank0(m, self.procs[pid0])
        return hit


def explore(model: Model, symmetry: bool = True, progress=False,
            max_states: int = 0, por: bool = True, workers: int = 1,
            max_seconds: float = 0.0) -> Result:
    """Search every reachable state of `model`; stop at the first violation.

    With `por`, the partial-order reduction of model.reduction; a violation found under
    it is searched for again without it, so the counterexample is a shortest one.
    With `workers` > 1, the hash-partitioned multiprocess search of model.parallel
    (no partial-order reduction: its cycle proviso needs the whole visited set).
    `progress` (False, True, "auto") and `max_seconds`: model.meter; past `max_states`
    or `max_seconds` the search raises StateBudgetExceeded / TimeBudgetExceeded."""
    meter = Meter(progress, max_seconds)
    try:
        return search(model, symmetry, meter, max_states, por, workers)
    finally:
        meter.close()


def search(model: Model, symmetry: bool, meter: Meter, max_states: int, por: bool,
           workers: int) -> Result:
    """explore() on a running meter (the parallel search's re-search of a violation
    shares its clock)."""
    if workers > 1:
        from .parallel import explore_parallel
        return explore_parallel(model, symmetry, workers, meter, max_states)
    res = _without_gc(_search, model, symmetry, meter, max_states, por, por)
    if por and res.violation is not None:
        first = res
        res = _without_gc(_search, Model(model.cfg, model.source), symmetry, meter,
                          max_states, False, False)
        res.seconds += first.seconds
        res.peak_mb = max(res.peak_mb, first.peak_mb)
        res.por, res.researched = True, True
    return res


def _without_gc(fn, *args):
    """Run fn with the cyclic garbage collector paused. The search allocates millions
    of tuples and keeps most of them (interned states, memo entries, frontier), none
    in a reference cycle: every collection pass re-walks them for nothing (about a
    tenth of the search's time). Collected as usual afterwards."""
    was = gc.isenabled()
    gc.disable()
    try:
        return fn(*args)
    finally:
        if was:
            gc.enable()


def _search(model: Model, symmetry: bool, meter: Meter, max_states: int,
            por: bool, compress: bool) -> Result:
    """The breadth-first search. `compress`: follow the abort flag's release without
    storing the state in between (it has one transition and no choice), and do not
    crash a process again right after its own local step (the crash overwrites the
    process, so it reaches the state the crash before that step reached; a symmetric
    worker is exempt, its place moves when the state is made canonical).

    The frontier holds (key, rest id, pids) of each state, so expanding one rebuilds
    its `State` from interned parts without decoding the key. A successor's pids are
    its parent's with the participants' entries replaced, and its rest id is the
    parent's when step() kept the parent's channels, sequence numbers, flag and budget
    (identity checks on what step returned: nothing here knows which kinds change what)."""
    t0 = time.perf_counter()
    keys = Interner(model, symmetry)
    ample = Ample(model) if por else None
    tagged = {id(r) for table in model.tables for rows_by_pc in table
              for rows in rows_by_pc.values() for r in rows if r.tags}
    s0 = model.initial_state()
    crash_free = s0.faults_left > 0 and ample is not None and ample.crashes_unobservable()
    if crash_free:
        # With the watchdog on no crash can show a violation that a run without it
        # does not (model.reduction, "Crashes with the watchdog on").
        s0 = s0._replace(faults_left=0)
    pids0 = keys.pids(s0)
    r_init = keys.rest_id(s0)
    init = keys.pack(r_init, pids0)
    parent = {init: None}
    frontier = [(init, r_init, pids0)]
    transitions = terminals = depth = 0
    looks = LOOK_EVERY
    found = None
    enabled, step = model.enabled, model.step
    pids_of, rest_of, r0_bad = keys.pids, keys.rest_id, keys.rank0_violation
    r0_seen, ids_get, intern = keys.checked, keys.ids.get, keys.intern
    pool, rests, field = keys.procs, keys.rests, keys.FIELD
    lo, hi = keys.sym or (0, 0)
    twins = keys.sym is not None and compress
    new_state = tuple.__new__   # State(...) without the NamedTuple's Python __new__
    skip_next = {}

    n = keys.n
    shift = [field * (n - 1 - p) for p in range(n)]   # where process p's id sits
    rest_shift = field * n

    def successor(s, k, base, r, tr):
        """(s2, its canonical pids, rest id, key) for s2 = step(s, tr); k, base, r: s's
        key, pids and rest id. Where no symmetric place changed, the key is k with
        the changed fields replaced; else it is packed again."""
        s2 = step(s, tr)
        procs2 = s2.procs
        c = k
        if procs2 is s.procs:
            ps = base
        elif tr.parts:
            ps = base.copy()
            moved = False
            for part in tr.parts:
                p = part[0]
                pr = procs2[p]
                i = ids_get(id(pr))
                if i is None:
                    i = intern(pr)
                if lo <= p < hi:
                    moved = True
                elif not moved:
                    c += (i - ps[p]) << shift[p]
                ps[p] = i
            if moved:
                ps[lo:hi] = sorted(ps[lo:hi])
                c = None
        else:
            ps = pids_of(s2)
            c = None
        if s2.chans is not s.chans or s2.seq is not s.seq or \
                s2.abort is not s.abort or s2.faults_left != s.faults_left:
            r2 = rest_of(s2)
            if c is not None:
                c += (r2 - r) << rest_shift
            r = r2
        if c is None:
            c = r
            for i in ps:
                c = (c << field) | i
        return s2, ps, r, c

    lone = ample.lone_step if ample is not None and compress else None
    while frontier and found is None:
        nxt = []
        fresh = set() if por else None
        skip, skip_next = skip_next, {}
        for k, r, base in frontier:
            s = new_state(State, (tuple([pool[i] for i in base]), *rests[r]))
            trs = succ = None
            if lone is not None:
                tr = lone(s, base)
                if tr is not None:
                    s2, ps, r2, c = successor(s, k, base, r, tr)
                    # Not a step that sets the abort flag: it would disable a violation
                    # enabled in s, which the ample rule sees (model.reduction, "Lone
                    # steps"). The cycle proviso as below.
                    if not s2.abort and (c not in parent or c in fresh):
                        trs, succ = (tr,), [(tr, s2, ps, r2, c)]
            if trs is None:
                trs = enabled(s)
            if not trs or trs[0].kind == "crash" and all(tr.kind == "crash" for tr in trs):
                # Only crashes left: the run is stuck unless someone dies. Judge it as a
                # terminal state too, or a crash budget would hide every fault-free hang
                # (found by the SPIN cross-check); the crashes are still explored.
                terminals += 1
                v = check_terminal(model, s)
                if v:
                    found = (k, None, v)
                    break
                if not trs:
                    continue
            if skip:  # after the terminal check: it judges s by all of trs
                gone = skip.pop(k, 0)
                if gone:
                    trs = [tr for tr in trs if tr.kind != "crash" or
                           not gone >> tr.parts[0][0] & 1]
            if ample is not None and succ is None:
                for tr in trs:
                    if tr.kind == "violation":
                        break
                else:
                    amp = ample(s, trs, base)
                    if amp is not trs:
                        if twins and s.faults_left and \
                                len(set(base[lo:hi])) < hi - lo:
                            amp = one_crash_per_twin(amp, base, lo, hi)
                        succ = []
                        for tr in amp:
                            s2, ps, r2, c = successor(s, k, base, r, tr)
                            if c in parent and c not in fresh:
                                succ = None     # cycle proviso: expand s fully
                                break
                            succ.append((tr, s2, ps, r2, c))
            if succ is None:
                succ = []
                if twins and s.faults_left and len(set(base[lo:hi])) < hi - lo:
                    trs = one_crash_per_twin(trs, base, lo, hi)
                for tr in trs:
                    if tr.kind == "violation":
                        succ.append((tr, None, None, None, None))
                        break
                    succ.append((tr, *successor(s, k, base, r, tr)))
            for tr, s2, ps, r2, c in succ:
                transitions += 1
                if s2 is None:
                    found = (k, tr, tr.info)
                    break
                v = None
                for _p, _t, row in tr.parts:
                    if row is not None and id(row) in tagged:
                        v = check_transition(model, s, tr, s2) or \
                            check_progress_at_exit(model, s, tr)
                        break
                if not v:
                    v = r0_seen.get(ps[0], keys)
                    if v is keys:
                        v = r0_bad(model, ps[0])
                if v:
                    found = (k, tr, v)
                    break
                if compress and s2.abort:
                    # The abort flag is set: only the release of every live process is
                    # enabled, a chain with no choice. Follow it, judging each step,
                    # and store only where it ends.
                    while True:
                        nxt_trs = enabled(s2)
                        if len(nxt_trs) != 1 or nxt_trs[0].kind != "abort":
                            break
                        transitions += 1
                        s2 = step(s2, nxt_trs[0])
                        ps = pids_of(s2)
                        v = r0_bad(model, ps[0])
                        if v:
                            break
                    if v:
                        found = (k, tr, v)
                        break
                    r2 = rest_of(s2)
                    c = keys.pack(r2, ps)
                if c not in parent:
                    parent[c] = k
                    nxt.append((c, r2, ps))
                    if fresh is not None:
                        fresh.add(c)
                    if compress and tr.kind == "local" and s.faults_left:
                        # A crash overwrites the whole process: after a local step
                        # of p, crash(p) reaches the state crash(p) reached from s.
                        p = tr.parts[0][0]
                        if not lo <= p < hi:
                            skip_next[c] = 1 << p
                        else:
                            # A symmetric worker: p's place in c is any place holding
                            # its new state (crashing a twin of it is the same state).
                            x = ids_get(id(s2.procs[p]))
                            skip_next[c] = sum(1 << j for j in range(lo, hi)
                                               if ps[j] == x)
            if found:
                break
            looks -= 1
            if not looks:
                looks = LOOK_EVERY
                meter.look(len(parent), depth, len(nxt))
            if max_states and len(parent) > max_states:
                raise StateBudgetExceeded(max_states, len(parent), depth, meter.seconds())
        frontier = nxt
        depth += 1
    secs = time.perf_counter() - t0
    res = Result(model.cfg.describe(), "clean", None, states=len(parent),
                 transitions=transitions, depth=depth, seconds=secs,
                 peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                 terminals=terminals, symmetry=symmetry, por=por, crash_free=crash_free)
    if found:
        k, tr, v = found
        res.verdict, res.violation = v.prop, v
        chain = [k]
        while parent[chain[-1]] is not None:
            chain.append(parent[chain[-1]])
        chain.reverse()
        res.steps = counterexample(model, lambda s: keys.key(s, pids_of(s)), chain,
                                   keys.state(k)[0], tr, v, s0)
    return res


def one_crash_per_twin(trs: list, base: list, lo: int, hi: int) -> list:
    """Crashing either of two symmetric workers (places lo..hi-1) in the same state
    reaches the same canonical state: keep one crash per distinct worker state. `base`
    holds the interned ids of the state's processes."""
    out, crashed = [], set()
    for tr in trs:
        if tr.kind == "crash":
            p = tr.parts[0][0]
            if lo <= p < hi:
                if base[p] in crashed:
                    continue
                crashed.add(base[p])
        out.append(tr)
    return out


def counterexample(model: Model, key, chain: list, last: State, tr: Optional[Tr],
                   v: Violation, start: State) -> list:
    """Numbered, one line per step, from the search's initial state `start` to the
    violation. `chain` holds the keys of the states on the path (from the initial
    one); `key` maps a concrete state to its key, so the path is replayed concretely
    and worker names stay consistent along it."""
    lines, s = [], start
    for target in chain[1:]:
        for cand in model.enabled(s):
            if cand.kind != "violation" and key(model.step(s, cand)) == target:
                lines.append(model.describe(s, cand))
                s = model.step(s, cand)
                break
        else:  # pragma: no cover - would mean step() is not deterministic
            raise AssertionError("counterexample replay diverged")
    if tr is not None:
        # Re-find the final transition in the concrete (non-canonical) last state.
        for cand in model.enabled(s):
            if key(s) == chain[-1] and cand.kind == tr.kind and _same(cand, tr):
                lines.append(model.describe(s, cand))
                break
        else:
            lines.append(model.describe(s, tr))
    lines.append(f"=> {v.prop}: {v.detail}")
    return [f"{i + 1:3d}. {line}" for i, line in enumerate(lines)]


def _same(a: Tr, b: Tr) -> bool:
    la = [(r.label if r else None) for _, _, r in a.parts]
    lb = [(r.label if r else None) for _, _, r in b.parts]
    return la == lb
