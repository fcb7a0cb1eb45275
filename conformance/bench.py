"""Replay throughput on a generated trace: `python -m lockstep.conformance.bench`.

Generates (or reuses, with --dir) a run of about --events step events with the
simulator (mesh 3, depth 2, one hard cut, steps 2, gloo-like completion order on rank0's
comms thread), then loads it twice (a first load, the load cache of conformance/cache.py
cleared before it; then a second load, which reads that cache) and replays it through
the model (the Replayer's construction, `link`, timed apart: it was never in the
total), timing each phase on one core in CPU seconds (`time.process_time`: the figure
to quote on a shared machine, where wall time is inflated by the other jobs) beside
wall seconds. Target (TARGETS.md, raised 2026-12-01): a 1,000,000-event trace loaded
and replayed in under 3 CPU seconds.

--floor also times what no driver of the model avoids: `Model.step` and
`Model.enabled_as` alone on the replay's own transitions (`model floor`), and the
rows' guards, makes, accepts and updates alone (`spec floor`: every call the replay
made, and the taken rows' guards and updates, the least any replay through them makes).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import shutil
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

from lockstep import accel
from lockstep.model.config import Config
from lockstep.model.tables import Tables, shipped_rows

from . import cache
from .load import load_run
from .replay import Replayer
from .simulate import simulate


def generate(events: int, out: Path, mesh: int = 3, seed: int = 0) -> tuple:
    base = Config(mesh=mesh, d_in=2, d_out=2, chunks=20, hard_cut=True, steps=2)
    with tempfile.TemporaryDirectory() as tmp:
        probe = simulate(base, tmp, seed=seed)
    per_chunk = probe.events / base.chunks
    cfg = base.with_(chunks=max(2, int(events / per_chunk)))
    t0 = time.perf_counter()
    res = simulate(cfg, out, seed=seed, gloo_like=True)
    return cfg, res, time.perf_counter() - t0


def _taken(run, tables=None) -> tuple:
    """Replay once with a hook that keeps each (state, transition) committed:
    (the replayer, [(state, transition), ...])."""
    rep = Replayer(run, tables=tables)
    m = rep.m
    step = m.step
    taken = []

    def keep(s, tr):
        taken.append((s, tr))
        return step(s, tr)
    m.step = keep
    rep.replay()
    del m.step            # the instance attribute: Model.step again
    return rep, taken


@contextlib.contextmanager
def _gc_off():
    """The cyclic collector off, as replay() has it: the kept states are acyclic tuples,
    and its passes over them would be timed too."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _timed(calls) -> float:
    """CPU seconds of calling each (function, args) once, in a plain loop."""
    c0 = time.process_time()
    for fn, args in calls:
        fn(*args)
    return time.process_time() - c0


def model_floor(run) -> str:
    """The model's own part of a replay, without the replayer: replay once keeping each
    (state, transition) committed, then time `Model.step` alone on each and
    `Model.enabled_as` alone on each one's rows at its state. No driver of the model
    can replay the trace for less than their sum."""
    with _gc_off():
        rep, taken = _taken(run)
        m = rep.m
        c_step = _timed([(m.step, (s, tr)) for s, tr in taken])
        c_as = _timed([(m.enabled_as, (s, [(p, t, row.label) for p, t, row in tr.parts]))
                       for s, tr in taken if tr.parts and tr.parts[0][2] is not None])
    return (f"model floor {len(taken):,} transitions: Model.step alone {c_step:.3f} CPU s, "
            f"Model.enabled_as alone {c_as:.3f} CPU s, sum {c_step + c_as:.3f} CPU s")


def _recording_tables(calls) -> Tables:
    """The shipped rows with every guard, make, accept and update wrapped to append
    (function, args) to `calls` before it runs."""
    def wrap(fn):
        if fn is None:
            return None

        def recorded(*args):
            calls.append((fn, args))
            return fn(*args)
        recorded.__wrapped__ = fn
        return recorded
    return Tables({role: [r._replace(guard=wrap(r.guard), make=wrap(r.make),
                                     accept=wrap(r.accept), update=wrap(r.update))
                          for r in rows] for role, rows in shipped_rows().items()})


class SpecFloor(NamedTuple):
    calls: list           # (function, args) of every spec call the replay made
    c_calls: float        # CPU s of making them alone
    least: list           # the taken rows' guards and updates: (function, args)
    c_least: float

    def line(self) -> str:
        return (f"spec floor  {len(self.calls):,} guard/make/accept/update calls as "
                f"replayed {self.c_calls:.3f} CPU s; the taken rows' guards and updates "
                f"alone ({len(self.least):,} calls) {self.c_least:.3f} CPU s")


def spec_floor(run) -> SpecFloor:
    """The spec's pure functions alone (model/guards.py: the guards, makes, accepts and
    updates of the rows): every call a replay makes, recorded with its arguments and
    timed alone; and the least any replay through those functions makes, the guard and
    the update of each row a committed transition takes. Neither counts the model's
    states and transitions, the replayer around them, or the load."""
    calls = []
    with _gc_off():
        _, taken = _taken(run, _recording_tables(calls))
        c_calls = _timed(calls)
        cfg = run.cfg
        least = []
        for s, tr in taken:
            for p, t, row in tr.parts:
                if row is None:
                    continue
                v = s.procs[p].v
                # the rows are the recording ones: time the functions they wrap
                if row.guard is not None:
                    least.append((row.guard.__wrapped__, (v, cfg)))
                if row.update is not None:
                    least.append((row.update.__wrapped__, (v, cfg, tr.msg)))
        c_least = _timed(least)
    return SpecFloor(calls, c_calls, least, c_least)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lockstep.conformance.bench")
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--mesh", type=int, default=3)
    ap.add_argument("--dir", default="", help="reuse/keep the generated run here")
    ap.add_argument("--verify", action="store_true",
                    help="also check every step against Model.enabled (slow)")
    ap.add_argument("--floor", action="store_true",
                    help="also time the model's part alone (Model.step and "
                         "Model.enabled_as on the replay's transitions) and the "
                         "spec's pure functions alone (guards, makes, accepts, updates)")
    a = ap.parse_args(argv)
    keep = bool(a.dir)
    out = Path(a.dir) if keep else Path(tempfile.mkdtemp(prefix="lockstep-bench-"))
    try:
        if keep and (out / "run.json").exists():
            print(f"reusing {out}")
        else:
            cfg, res, gen_s = generate(a.events, out, a.mesh)
            print(f"generated {res.events:,} step events ({cfg.describe()}) in "
                  f"{gen_s:.1f} s -> {out}")
        cache.clear(out)
        t0, c0 = time.perf_counter(), time.process_time()
        run = load_run(out)
        t_first, c_first = time.perf_counter() - t0, time.process_time() - c0
        first_note = run.cache_note
        del run
        t0, c0 = time.perf_counter(), time.process_time()
        run = load_run(out)
        t_load, c_load = time.perf_counter() - t0, time.process_time() - c0
        t0, c0 = time.perf_counter(), time.process_time()
        rep = Replayer(run, verify=a.verify)
        t_link, c_link = time.perf_counter() - t0, time.process_time() - c0
        t1, c1 = time.perf_counter(), time.process_time()
        res = rep.replay()
        t_replay, c_replay = time.perf_counter() - t1, time.process_time() - c1
        n = run.n_events
        c_all = c_load + c_replay
        print(f"events      {n:,} ({res.steps:,} model transitions)")
        print(f"first load  {c_first:7.3f} CPU s  {n / c_first:10,.0f} events/CPU s  "
              f"(wall {t_first:.3f} s; json + checks; {first_note})")
        print(f"load        {c_load:7.3f} CPU s  {n / c_load:10,.0f} events/CPU s  "
              f"(wall {t_load:.3f} s; second load: {run.cache_note})")
        print(f"link        {c_link:7.3f} CPU s  {n / c_link:10,.0f} events/CPU s  "
              f"(wall {t_link:.3f} s; the Replayer's construction: happens-before, "
              f"channel and collective partners; not in the total, as before)")
        print(f"replay      {c_replay:7.3f} CPU s  {n / c_replay:10,.0f} events/CPU s  "
              f"(wall {t_replay:.3f} s)")
        print(f"total       {c_all:7.3f} CPU s  {n / c_all:10,.0f} events/CPU s  "
              f"(wall {t_load + t_replay:.3f} s; second load + replay; target: 1,000,000 "
              f"events < 3 CPU s; with the first load {c_first + c_replay:.3f} CPU s; "
              f"with the link {c_all + c_link:.3f} CPU s)")
        print(f"verdict     {'conforms' if res.ok else 'DIVERGES'}")
        print(f"build       {accel.describe()}")
        if a.floor:
            print(model_floor(run))
            print(spec_floor(run).line())
        if res.divergence:
            print(res.divergence.text())
        return 0 if res.ok else 1
    finally:
        if not keep:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
