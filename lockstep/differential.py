"""Differential test, runtime against model: draw a configuration, run the real gloo job,
and require (1) that conformance accepts its traces and (2) that its outcome is one the
model reaches for that configuration.

    python -m lockstep.differential --examples 40 [--seed S] [--out runs/differential]

An outcome is what a user of the control plane sees: the outputs rank0 emitted, as
(chunk_index, cache_epoch) in emission order (so which chunks were dropped and in which
order the rest came out), and how each rank ended (ok / error / aborted / crashed). The
model's outcomes are collected by a search of the shipped model for the drawn config,
carrying the emitted sequence along each path; a terminal state contributes its
statuses. The runtime's comes from its user-facing files, not from the traces:
`outputs.json` and each rank's exit line (`rank{R}.err`: exit=ok / error / released, none
for a killed rank). So a run whose traces conform but whose outputs were lost or
reordered is still caught, and the check does not trust the replay it is checking.

Why a search of its own and not the explorer: the explorer's states do not carry the
emitted history (rank0 keeps counters, not the list), and adding it to the spec's state
would multiply the state space of every check. The search here is small (configs of at
most 4 chunks) and uses only `Model.enabled` / `Model.step`.

Lives in `lockstep/` (beside the CLI): it ties the runtime to conformance. The space of
configurations is defined once (`draw_case`): the CI test (tests/test_differential.py)
draws from it through hypothesis (which shrinks a failure), this command through a
seeded random choice per example (hypothesis's own generation starts from the smallest
examples and stays near them: a budget of 40 drew no mesh of 2).
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path
from typing import NamedTuple, Optional

from lockstep.model.config import INJECTABLE, Config
from lockstep.model.semantics import Model
from lockstep.model.tables import shipped_tables

# The exit kinds of a rank's one exit line (runtime/worker_main.py) as the model's
# final statuses; a killed rank writes none (checked against the replay on the corpus:
# tests/test_differential.py).
END_OF_EXIT = {"ok": "ok", "error": "error", "released": "aborted", "": "crashed"}
# Faults that make one mesh rank differ from the others: they need a second mesh rank.
NEEDS_PEER = frozenset({"count_mismatch", "cond_flag"})


class Outcome(NamedTuple):
    emitted: tuple   # ((chunk_index, cache_epoch), ...) in emission order
    ends: tuple      # per rank: ok | error | aborted | crashed

    def text(self) -> str:
        em = " ".join(f"{c}@{e}" for c, e in self.emitted) or "(none)"
        return f"emitted {em}; ends {'/'.join(self.ends)}"


class Case(NamedTuple):
    """One drawn configuration: the model's Config and the runtime's options for it."""
    cfg: Config
    opts: dict

    def text(self) -> str:
        o = self.opts
        extra = [f"cuts at {o['cuts']['at']}"] if o.get("cuts") else []
        if o.get("fault"):
            extra.append(f"fault {o['fault']['name']}@{o['fault']['at_chunk']}")
        if o.get("heartbeat_ms"):
            extra.append(f"heartbeat {o['heartbeat_ms']} ms")
        return self.cfg.describe() + ("; " + ", ".join(extra) if extra else "")


def make_case(mesh: int, d_in: int, d_out: int, chunks: int, regime: str, steps: int,
              cuts: tuple = (), heartbeat_ms: Optional[float] = None, noops: int = 0,
              fault: Optional[tuple] = None, cond_flag_all: bool = False) -> Case:
    """The Config bounds what the options make the runtime do: as many cuts as it is
    given, the fault it arms, the heartbeats it may send."""
    opts = {"costs": {"phase_b_ms": 1.0}}
    if cuts:
        opts["cuts"] = {"at": sorted(cuts)}
    if heartbeat_ms:
        opts["heartbeat_ms"] = heartbeat_ms
    inject = frozenset()
    if fault:
        opts["fault"] = {"name": fault[0], "at_chunk": fault[1]}
        inject = frozenset({fault[0]})
    cfg = Config(mesh=mesh, d_in=d_in, d_out=d_out, chunks=chunks, hard_cut=len(cuts),
                 regime=regime, steps=steps, noops=noops if heartbeat_ms else 0,
                 inject=inject, cond_flag_all=cond_flag_all)
    return Case(cfg, opts)


def draw_case(pick) -> Case:
    """The space of drawn configurations, once: `pick(options)` returns one of them (a
    hypothesis draw in the test, a seeded random choice in the command). Bounds keep
    the model's search to seconds: heartbeats multiply the interleavings most (a NOOP
    can go between any two steps), then mesh and chunks."""
    mesh = pick(range(1, 5))
    chunks = pick(range(1, 4 if mesh >= 3 else 5))
    ncuts = pick(range(0, 3 if mesh <= 2 and chunks <= 3 else 2))
    # a cut needs one chunk built (1); `chunks` itself lands while SHUTDOWN drains
    cuts = tuple(pick(range(1, chunks + 1)) for _ in range(ncuts))
    hb = pick([None, None, 1.0, 5.0])
    noops = pick(range(1, 3 if mesh == 1 else 2))
    faults = [f for f in INJECTABLE if mesh >= 2 or f not in NEEDS_PEER]
    fault = pick([None] * len(faults) + faults)      # half the draws arm no fault
    if fault:
        fault = (fault, pick(range(chunks)))
    return make_case(mesh, pick(range(1, 4)), pick(range(1, 4)), chunks,
                     pick(["R1", "R0a", "R0"]), pick(range(1, 3)), cuts, hb, noops, fault,
                     pick([False, True]))


def cases():
    """`draw_case` as a hypothesis strategy (hypothesis is a test dependency)."""
    from hypothesis import strategies as st
    return st.composite(lambda d: draw_case(lambda xs: d(st.sampled_from(list(xs)))))()


# ------------------------------------------------------------------ the two outcomes

def model_outcomes(cfg: Config, limit: int = 2_000_000) -> frozenset:
    """Every outcome the shipped model reaches for `cfg`: a search over (state, emitted
    so far), terminal where nothing is enabled."""
    m = Model(cfg, shipped_tables())
    s0 = m.initial_state()
    seen, todo, out = {(s0, ())}, [(s0, ())], set()
    while todo:
        s, em = todo.pop()
        trs = [tr for tr in m.enabled(s) if tr.kind != "violation"]
        if not trs:
            out.add(Outcome(em, tuple(pr.status for pr in s.procs)))
        for tr in trs:
            em2 = em
            if any("emit" in row.tags for _, _, row in tr.parts):
                head = s.procs[0].v.decode_q[0]     # Phase C emits the oldest result
                em2 = em + ((head.chunk, head.epoch),)
            key = (m.step(s, tr), em2)
            if key not in seen:
                if len(seen) >= limit:
                    raise RuntimeError(f"model_outcomes: over {limit} states for "
                                       f"{cfg.describe()}")
                seen.add(key)
                todo.append(key)
    return frozenset(out)


def runtime_outcome(run_dir: Path, world: int) -> Outcome:
    """The outcome of a real run, from outputs.json and each rank's exit line."""
    from lockstep.conformance.sources import err_exit
    p = Path(run_dir) / "outputs.json"
    outs = json.loads(p.read_text()) if p.exists() else []
    ends = tuple(END_OF_EXIT.get(err_exit(Path(run_dir) / f"rank{r}.err"), "unknown")
                 for r in range(world))
    return Outcome(tuple((c, e) for c, e, *_ in outs), ends)


def judge(cfg: Config, run_dir: Path, allowed: Optional[frozenset] = None) -> dict:
    """Conformance and outcome verdicts of one recorded run of `cfg`."""
    from lockstep.conformance.report import conform
    rep = conform(run_dir)
    got = runtime_outcome(run_dir, cfg.world)
    allowed = model_outcomes(cfg) if allowed is None else allowed
    return {"conforms": rep.ok, "verdict": rep.verdict, "outcome": got,
            "allowed": got in allowed, "model_outcomes": len(allowed)}


def run_case(case: Case, run_dir: Path, deadline_s: float = 60.0) -> dict:
    from lockstep.runtime.run import run_local
    res = run_local(case.cfg, case.opts, run_dir, deadline_s=deadline_s)
    out = judge(case.cfg, run_dir)
    out["deadline_hit"] = res.deadline_hit
    out["ok"] = out["conforms"] and out["allowed"] and not res.deadline_hit
    return out


def explain(case: Case, v: dict) -> str:
    bad = [] if v["conforms"] else [f"conformance: {v['verdict']}"]
    if not v["allowed"]:
        bad.append(f"outcome not among the model's {v['model_outcomes']}: "
                   f"{v['outcome'].text()}")
    if v.get("deadline_hit"):
        bad.append("deadline hit")
    return f"{case.text()}: " + ("; ".join(bad) or "ok")


# ------------------------------------------------------------------ the command

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lockstep.differential",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=40, help="configurations to draw, count (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the draws (default: %(default)s)")
    ap.add_argument("--out", default="runs/differential", help="directory for the run directories (default: %(default)s)")
    ap.add_argument("--deadline-s", type=float, default=60.0, help="hard deadline per run, s (default: %(default)s)")
    a = ap.parse_args(argv)
    out = Path(a.out).resolve()
    rows = []
    for i in range(a.examples):     # example i draws from random.Random(f"{seed}:{i}")
        case = draw_case(random.Random(f"{a.seed}:{i}").choice)
        run_dir = out / f"case{i:03d}"
        shutil.rmtree(run_dir, ignore_errors=True)
        t0 = time.monotonic()
        v = run_case(case, run_dir, a.deadline_s)
        rows.append((case, v, time.monotonic() - t0))
        print(f"[{i}] {'ok  ' if v['ok'] else 'FAIL'} {v['outcome'].text()}  "
              f"({v['model_outcomes']} model outcomes)  {explain(case, v)}", flush=True)
    bad = [(c, v) for c, v, _ in rows if not v["ok"]]
    print(f"\n{len(rows)} configurations, {len(rows) - len(bad)} ok: conform and an outcome "
          f"the model allows; {sum(not v['conforms'] for _, v, _ in rows)} do not conform, "
          f"{sum(not v['allowed'] for _, v, _ in rows)} outcomes outside the model's, "
          f"{sum(bool(v['deadline_hit']) for _, v, _ in rows)} deadlines hit")
    faults = sorted({c.opts['fault']['name'] for c, _, _ in rows if c.opts.get('fault')})
    print(f"drawn: mesh {sorted({c.cfg.mesh for c, _, _ in rows})}, regimes "
          f"{sorted({c.cfg.regime for c, _, _ in rows})}, "
          f"{sum(bool(c.cfg.hard_cut) for c, _, _ in rows)} with cuts, "
          f"{sum(bool(c.opts.get('heartbeat_ms')) for c, _, _ in rows)} with heartbeats, "
          f"faults {faults}")
    for c, v in bad:
        print("FAIL " + explain(c, v))
    return 1 if bad else 0


if __name__ == "__main__":
    from lockstep.cli import stoppable
    sys.exit(stoppable("python -m lockstep.differential", main))
