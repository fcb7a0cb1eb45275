"""Multiprocess search: a hash-partitioned, level-synchronous breadth-first search.

Each of W worker processes owns the canonical states whose hash falls in its
partition: it keeps their visited set and expands the ones in its frontier. One level
at a time, the coordinator (the calling process) asks every worker to expand its
frontier, routes each successor to the worker that owns it, and asks the owners to
keep the new ones as their next frontier. Levels keep the search breadth-first, so
the level at which a violation first shows is the depth of a shortest counterexample;
the counterexample itself is then printed by the serial search (model.explore), which
stops at that same depth.

Ownership uses the process-independent canonical state (model.explore.Canon: workers
sorted by hash, ties by repr), not the serial search's interned ids, which differ from
one process to the next. Workers are forked, so every process shares the string hash
seed and the model object; states travel pickled.

No partial-order reduction here: its cycle proviso asks whether a successor is already
visited, which only the owner knows. On a machine with few cores the serial search with
the reductions is faster; this path is for many-core machines and is checked against
the serial search (same verdict, same number of distinct states) in
tests/test_model_check.py.

Budgets (`lockstep check --workers N --max-states / --max-seconds`, model.meter): the
coordinator counts the states its workers hold once they have kept a level's new ones,
so the state budget is judged level by level: the search stops after the level that
passes it (the serial search stops at the state that passes it), having stored at most
that one level beyond the budget. The time budget and the progress line are looked at
before every answer the coordinator waits for and about twice a second while it waits,
and a search stopped mid-level kills its workers at once.

Designs considered and rejected: a shared visited set in shared memory (a lock per
insert costs more than the hashing it saves in Python); a work-stealing search without
levels (loses shortest counterexamples).
"""
from __future__ import annotations

import multiprocessing as mp
import resource
import time

from .properties import (check_progress_at_exit, check_state, check_terminal,
                         check_transition)
from .semantics import Model


LOOK_S = 0.5   # the coordinator looks at the meter this often while a level runs


def _owner(s, workers: int) -> int:
    return hash(s) % workers


def _serve(model: Model, symmetry: bool, workers: int, conn) -> None:
    from .explore import Canon
    canon = Canon(model, symmetry)
    seen, frontier = set(), []
    while True:
        cmd, arg = conn.recv()
        if cmd == "stop":
            conn.close()
            return
        if cmd == "absorb":
            new = [s for s in arg if s not in seen]
            seen.update(new)
            frontier = list(dict.fromkeys(new))
            conn.send((len(frontier), len(seen)))
        elif cmd == "expand":
            out = [[] for _ in range(workers)]
            transitions = terminals = 0
            found = None
            for s in frontier:
                trs = model.enabled(s)
                if not trs or all(tr.kind == "crash" for tr in trs):
                    terminals += 1
                    v = check_terminal(model, s)
                    if v:
                        found = v
                        break
                for tr in trs:
                    transitions += 1
                    if tr.kind == "violation":
                        found = tr.info
                        break
                    s2 = model.step(s, tr)
                    v = check_transition(model, s, tr, s2) or check_state(model, s2) \
                        or check_progress_at_exit(model, s, tr)
                    if v:
                        found = v
                        break
                    c = canon(s2)
                    out[_owner(c, workers)].append(c)
                if found:
                    break
            conn.send((out, transitions, terminals, found))


def _recv(conn, meter, states: int, depth: int, frontier: int):
    """conn's next answer, looking at the meter (clock, progress line) before and while
    waiting: a level that answers within LOOK_S never waits for a poll to time out, so
    a search of many short levels was never looked at and ran far past its budget."""
    meter.look(states, depth, frontier)
    while not conn.poll(LOOK_S):
        meter.look(states, depth, frontier)
    return conn.recv()


def explore_parallel(model: Model, symmetry: bool, workers: int, meter,
                     max_states: int = 0):
    """The search of model.explore, spread over `workers` processes, on explore's
    meter (model.meter); past `max_states` (counted at the end of a level) it raises
    StateBudgetExceeded."""
    from .explore import Canon, Result, search
    from .meter import StateBudgetExceeded
    t0 = time.perf_counter()
    ctx = mp.get_context("fork")
    pipes, procs = [], []
    for _ in range(workers):
        here, there = ctx.Pipe()
        pr = ctx.Process(target=_serve, args=(model, symmetry, workers, there),
                         daemon=True)
        pr.start()
        there.close()
        pipes.append(here)
        procs.append(pr)
    finished = False
    try:
        init = Canon(model, symmetry)(model.initial_state())
        batches = [[] for _ in range(workers)]
        batches[_owner(init, workers)].append(init)
        transitions = terminals = depth = states = frontier = 0
        found = None
        while True:
            for conn, batch in zip(pipes, batches):
                conn.send(("absorb", batch))
            news = [_recv(conn, meter, states, depth, frontier) for conn in pipes]
            frontier = sum(n_new for n_new, _ in news)
            states = sum(n_seen for _, n_seen in news)
            if max_states and states > max_states:
                # The states of level `depth` passed it; the serial search names the
                # level it was expanding, the one before.
                raise StateBudgetExceeded(max_states, states, max(depth - 1, 0),
                                          meter.seconds())
            if frontier == 0:
                break
            for conn in pipes:
                conn.send(("expand", None))
            batches = [[] for _ in range(workers)]
            for conn in pipes:
                out, n_tr, n_term, v = _recv(conn, meter, states, depth, frontier)
                transitions += n_tr
                terminals += n_term
                found = found or v
                for dst, states_to in enumerate(out):
                    batches[dst] += states_to
            depth += 1
            if found:
                break
        finished = True
    finally:
        for conn in pipes:
            try:
                conn.send(("stop", None))
            except (BrokenPipeError, OSError):
                pass
        for pr in procs:
            # A search stopped mid-level (a budget, Ctrl-C): its workers are still
            # expanding and would only read "stop" after it.
            pr.join(timeout=10 if finished else 0)
            if pr.is_alive():
                pr.kill()
                pr.join()
    if found:
        # The level tells the depth; the serial search prints a shortest path to it
        # (no state budget: the violation was found within it, and the serial search
        # stops at the same depth).
        res = search(Model(model.cfg, model.source), symmetry, meter, 0, False, 1)
        res.workers = workers
        return res
    return Result(model.cfg.describe(), "clean", None, states=states,
                  transitions=transitions, depth=depth,
                  seconds=time.perf_counter() - t0,
                  peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  terminals=terminals, symmetry=symmetry, por=False, workers=workers)
