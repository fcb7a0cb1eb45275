"""Exhaustive explicit-state search with shortest counterexamples.

Breadth-first over canonical states, so the first violation found is at minimal
depth: counterexamples are shortest. A violation is either a `violation` transition
(framing, collective mismatch: visible as soon as it is enabled), a transition or state
property (model.properties), or a stuck state that is not a clean end.

Reductions
  symmetry   workers with identical tables are interchangeable: permuting them is an
             automorphism of the transition system (groups and channels refer to them
             only as members of mesh_pg, never by index, and every property is
             invariant under the permutation). Canonical form = workers sorted. A
             worker singled out by a fault or mutation keeps its place. tests/ checks
             reduced and unreduced searches agree on small configurations.
             Workers are sorted by hash, with ties broken by repr, so the order is a
             function of the multiset of worker states: one representative per orbit.
  interning  process states repeat across millions of global states; each distinct
             one is stored once, a global state is a tuple of references to them.
Counterexample steps are recovered by replaying the chain of canonical states from
the initial state concretely, so worker names stay consistent along the path.
"""
from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

from .properties import (check_progress_at_exit, check_state, check_terminal,
                         check_transition)
from .semantics import Model, State, Tr, Violation


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
                "peak_mb": round(self.peak_mb, 1), "symmetry": self.symmetry}


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


def explore(model: Model, symmetry: bool = True, progress: bool = False,
            max_states: int = 0) -> Result:
    """Search every reachable state of `model`; stop at the first violation."""
    t0 = time.perf_counter()
    canon = Canon(model, symmetry)
    init = canon(model.initial_state())
    parent = {init: None}
    frontier = [init]
    transitions = terminals = depth = 0
    last_report = t0
    found = None
    enabled, step = model.enabled, model.step
    while frontier and found is None:
        nxt = []
        for s in frontier:
            trs = enabled(s)
            if not trs or all(tr.kind == "crash" for tr in trs):
                # Only crashes left: the run is stuck unless someone dies. Judge it as a
                # terminal state too, or a crash budget would hide every fault-free hang
                # (found by the SPIN cross-check); the crashes are still explored.
                terminals += 1
                v = check_terminal(model, s)
                if v:
                    found = (s, None, v)
                    break
                if not trs:
                    continue
            for tr in trs:
                transitions += 1
                if tr.kind == "violation":
                    found = (s, tr, tr.info)
                    break
                s2 = step(s, tr)
                v = check_transition(model, s, tr, s2) or check_state(model, s2) \
                    or check_progress_at_exit(model, s, tr)
                if v:
                    found = (s, tr, v)
                    break
                c = canon(s2)
                if c not in parent:
                    parent[c] = s
                    nxt.append(c)
            if found:
                break
            if progress:
                now = time.perf_counter()
                if now - last_report > 2.0:
                    last_report = now
                    rate = len(parent) / (now - t0)
                    print(f"\r  {len(parent):,} states  {rate:,.0f}/s  depth {depth}  "
                          f"frontier {len(nxt):,}", end="", file=sys.stderr, flush=True)
            if max_states and len(parent) > max_states:
                raise RuntimeError(f"state budget {max_states:,} exceeded")
        frontier = nxt
        depth += 1
    if progress:
        print("\r" + " " * 70 + "\r", end="", file=sys.stderr, flush=True)
    secs = time.perf_counter() - t0
    res = Result(model.cfg.describe(), "clean", None, states=len(parent),
                 transitions=transitions, depth=depth, seconds=secs,
                 peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                 terminals=terminals, symmetry=symmetry)
    if found:
        s, tr, v = found
        res.verdict, res.violation = v.prop, v
        res.steps = counterexample(model, canon, parent, s, tr, v)
    return res


def counterexample(model: Model, canon: Canon, parent: dict, last: State,
                   tr: Optional[Tr], v: Violation) -> list:
    """Numbered, one line per step, from the initial state to the violation."""
    chain = [last]
    while parent[chain[-1]] is not None:
        chain.append(parent[chain[-1]])
    chain.reverse()
    lines, s = [], model.initial_state()
    for target in chain[1:]:
        for cand in model.enabled(s):
            if cand.kind != "violation" and canon(model.step(s, cand)) == target:
                lines.append(model.describe(s, cand))
                s = model.step(s, cand)
                break
        else:  # pragma: no cover - would mean step() is not deterministic
            raise AssertionError("counterexample replay diverged")
    if tr is not None:
        # Re-find the final transition in the concrete (non-canonical) last state.
        for cand in model.enabled(s):
            if canon(s) == last and cand.kind == tr.kind and _same(cand, tr):
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
