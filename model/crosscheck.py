"""Check the checker: the same configurations through lockstep's explorer and through SPIN.

For every configuration (the shipped protocol on a few shapes, and every mutation) the
tables are exported to Promela (model.promela), SPIN builds and runs a verifier, and the
verdicts are compared with lockstep's: "violation found" vs "clean" must agree, and so
must the property class where SPIN can name it:

  SPIN says                                   lockstep verdict class
  assertion violated V_<property>             <property> (framing_error, call_count, ...)
  invalid end state + monitor "VERDICT x"     x in deadlock / stranding /
    (read from a replay of the trail)           collective_mismatch / crash_hang
  errors: 0                                   clean

SPIN is run without partial-order reduction (-DNOREDUCE) so its state count is the plain
interleaving count. lockstep is run twice: unreduced (symmetry and partial-order
reduction off: the count comparable with SPIN's) and with its default search (symmetry
and partial-order reduction on: what it ships, and what a user waits for). The explorer's
defaults reduce, so the comparable column asks for por=False explicitly: with the default,
lockstep's "symmetry off" count was the partial-order-reduced one (21,993 instead of
75,957 states on the full PP1), and its ratio to SPIN's -DNOREDUCE count mixed the
reduction into what docs/crosscheck.md explains as encoding differences.
SPIN's time is what a user waits for: spin -a + the C compile + the pan run.

    python -m lockstep.model.crosscheck              the verdict table (every mutation)
    python -m lockstep.model.crosscheck --scale      growth over mesh 1..4 x chunks 1..4, and the
                                            full PP1 configuration, lockstep vs SPIN
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

from .config import Config
from .explore import explore
from .mutations import MUTATIONS, model_for, mutation_config
from .promela import UNEXPORTABLE
from .explore import Canon
from .promela import export_with_rows
from .tables import THREADS

HANG_CLASSES = ("deadlock", "stranding", "collective_mismatch", "crash_hang")
PP1_FULL = Config(mesh=4, d_in=2, d_out=2, chunks=3, hard_cut=True, faults=1)


def spin_available() -> bool:
    return shutil.which("spin") is not None and shutil.which(os.environ.get("CC", "gcc")) \
        is not None


@dataclass
class SpinResult:
    verdict: str                 # "clean", a property name, or "invalid_end_state"
    error: str = ""              # pan's error line
    states: int = 0
    transitions: int = 0
    depth: int = 0
    t_export: float = 0.0
    t_spin: float = 0.0          # spin -a
    t_cc: float = 0.0            # C compile of pan.c
    t_pan: float = 0.0           # the search
    t_replay: float = 0.0        # classification only (not part of time-to-verdict)
    vector: int = 0
    mem_mb: float = 0.0
    log: str = ""
    rows_reached: Optional[set] = None   # rows whose statement pan reached (clean runs)

    @property
    def t_total(self) -> float:
        """Time to verdict: spin -a + compile + run (the export is lockstep's side)."""
        return self.t_spin + self.t_cc + self.t_pan


class SpinTimeout(RuntimeError):
    """A step of the SPIN run (spin -a, the C compile, pan) passed its time limit."""


def _run(cmd, cwd, timeout):
    try:
        p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SpinTimeout(f"`{' '.join(cmd)}` did not finish within {timeout} s") from None
    return p.returncode, p.stdout + p.stderr


def run_spin(cfg: Config, *, cc_opt: str = "-O2", noreduce: bool = True,
             collectives: str = "split", fault_budget: str = "upto",
             max_depth: int = 1_000_000, hash_bits: int = 22, timeout: int = 600,
             workdir: Optional[str] = None, keep: bool = False,
             coverage: bool = False) -> SpinResult:
    """Export `cfg`, build pan and run it; classify the first error it reports.

    coverage: `spin -o3` (no statement merging) so that pan's "unreached" report names
    every row statement it never executed; the state count is the same."""
    t0 = time.perf_counter()
    text, rowlines = export_with_rows(cfg, collectives, fault_budget, dstep=not coverage)
    t_export = time.perf_counter() - t0
    tmp = workdir or tempfile.mkdtemp(prefix="lockstep-spin-")
    try:
        pml = os.path.join(tmp, "model.pml")
        with open(pml, "w") as f:
            f.write(text)
        t = time.perf_counter()
        rc, out = _run(["spin"] + (["-o3"] if coverage else []) + ["-a", "model.pml"],
                       tmp, timeout)
        t_spin = time.perf_counter() - t
        if rc != 0 or not os.path.exists(os.path.join(tmp, "pan.c")):
            raise RuntimeError(f"spin -a failed for {cfg.describe()}:\n{out[-3000:]}")
        flags = [os.environ.get("CC", "gcc"), cc_opt, "-DSAFETY", "-o", "pan", "pan.c"]
        if noreduce:
            flags.insert(2, "-DNOREDUCE")
        t = time.perf_counter()
        rc, out = _run(flags, tmp, timeout)
        t_cc = time.perf_counter() - t
        if rc != 0:
            raise RuntimeError(f"compiling pan.c failed:\n{out[-3000:]}")
        t = time.perf_counter()
        rc, log = _run(["./pan", f"-m{max_depth}", f"-w{hash_bits}"], tmp, timeout)
        t_pan = time.perf_counter() - t
        if "max search depth too small" in log:
            raise RuntimeError(f"pan: depth bound {max_depth} reached for {cfg.describe()}")
        res = SpinResult("clean", t_export=t_export, t_spin=t_spin, t_cc=t_cc, t_pan=t_pan,
                         log=log)
        m = re.search(r"(\d+) states, stored", log)
        res.states = int(m.group(1)) if m else 0
        m = re.search(r"(\d+) transitions", log)
        res.transitions = int(m.group(1)) if m else 0
        m = re.search(r"depth reached (\d+)", log)
        res.depth = int(m.group(1)) if m else 0
        m = re.search(r"State-vector (\d+) byte", log)
        res.vector = int(m.group(1)) if m else 0
        m = re.search(r"([\d.]+)\s+total actual memory usage", log)
        res.mem_mb = float(m.group(1)) if m else 0.0
        m = re.search(r"errors: (\d+)", log)
        if not m:
            raise RuntimeError(f"pan gave no verdict for {cfg.describe()}:\n{log[-3000:]}")
        if int(m.group(1)) == 0:
            if coverage:
                unreached = {int(x) for x in re.findall(r"model\.pml:(\d+), state", log)}
                res.rows_reached = {k for k, lines in rowlines.items()
                                    if not all(n in unreached for n in lines)}
            return res
        m = re.search(r"pan:\d+: (.*?) \(at depth", log)
        res.error = m.group(1) if m else "error"
        a = re.search(r"assertion violated V_(\w+)", log)
        if a:
            res.verdict = a.group(1)
        elif "invalid end state" in log:
            t = time.perf_counter()
            _, replay = _run(["spin", "-t", "model.pml"], tmp, timeout)
            res.t_replay = time.perf_counter() - t
            v = re.search(r"VERDICT (\w+)", replay)
            res.verdict = v.group(1) if v else "invalid_end_state"
        else:
            res.verdict = "spin_error"
        return res
    finally:
        if not keep and workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------ comparison

@dataclass
class Row:
    name: str
    cfg: Config
    expected: str
    lock: object = None          # explore Result, unreduced (no symmetry, no POR)
    lock_sym: object = None      # explore Result, default search (symmetry and POR)
    spin: Optional[SpinResult] = None
    rows_lock: Optional[set] = None

    @property
    def coverage(self) -> str:
        """For clean runs: do both searches execute the same table rows?"""
        if self.spin.rows_reached is None or self.rows_lock is None:
            return "-"
        if self.spin.rows_reached == self.rows_lock:
            return f"{len(self.rows_lock)}="
        return (f"{len(self.rows_lock)}/{len(self.spin.rows_reached)} "
                f"DIFF")

    def coverage_diff(self) -> tuple:
        return (sorted(self.rows_lock - self.spin.rows_reached),
                sorted(self.spin.rows_reached - self.rows_lock))

    @property
    def outcome_agrees(self) -> bool:
        return (self.lock.verdict == "clean") == (self.spin.verdict == "clean")

    @property
    def class_agrees(self) -> bool:
        return self.lock.verdict == self.spin.verdict

    @property
    def mark(self) -> str:
        if not self.outcome_agrees:
            return "DISAGREE"
        return "same" if self.class_agrees else "same outcome, other class"


def shipped_configs() -> list:
    """The shipped protocol on shapes that exercise each switch (small enough for SPIN
    to build and run in seconds)."""
    return [
        ("pp0", Config(mesh=1, chunks=2)),
        ("pp1_mesh2", Config(mesh=2, chunks=2)),
        ("pp1_mesh2_buffered", Config(mesh=2, chunks=2, p2p="buffered")),
        ("pp1_mesh2_depth1", Config(mesh=2, chunks=3, d_in=1, d_out=1)),
        ("pp1_mesh2_cut_fault", Config(mesh=2, chunks=2, hard_cut=True, faults=1)),
        ("pp1_mesh2_noop_fault", Config(mesh=2, chunks=2, noops=1, faults=1)),
        ("pp1_mesh3_R0a_cut", Config(mesh=3, chunks=2, hard_cut=True, regime="R0a")),
        ("pp1_mesh3_R0_steps2", Config(mesh=3, chunks=2, regime="R0", steps=2)),
        ("inject_wrong_group", Config(mesh=3, chunks=1, faults=1,
                                      inject=frozenset({"wrong_group"}))),
        ("inject_count_mismatch", Config(mesh=3, chunks=1,
                                         inject=frozenset({"count_mismatch"}))),
        ("inject_cond_flag", Config(mesh=3, chunks=1, inject=frozenset({"cond_flag"}))),
        ("inject_rank0_bad_envelope", Config(mesh=2, chunks=2,
                                             inject=frozenset({"rank0_bad_envelope"}))),
        ("inject_leader_bad_result", Config(mesh=2, chunks=2,
                                            inject=frozenset({"leader_bad_result"}))),
        ("pp1_full", PP1_FULL),
    ]


# Configurations SPIN can only build with the joint collective encoding: since the
# leader's comms thread, pp1_full with split collectives did not finish in 600 s (pan
# past 4.5 GB); joint: 5,104,034 states, 124 s (80 s of it the C compile), 3.8 GB. Their
# row coverage is not compared: the coverage build needs split collectives.
JOINT_ONLY = {"pp1_full"}


def mutation_configs(base: Config = Config(mesh=2, chunks=2)) -> list:
    return [(f"mutation {n}", mutation_config(base, n)) for n in MUTATIONS
            if n not in UNEXPORTABLE]


def rows_fired(cfg: Config) -> set:
    """Every table row some reachable transition executes, keyed like
    model.promela.export_with_rows: (process, thread, src, label). No symmetry: which
    worker fires a row matters here."""
    m = model_for(cfg)
    canon = Canon(m, symmetry=False)
    init = canon(m.initial_state())
    seen, todo, fired = {init}, [init], set()
    while todo:
        s = todo.pop()
        for tr in m.enabled(s):
            if tr.kind == "violation":
                continue
            for p, t, row in tr.parts:
                if row is not None:
                    fired.add((m.names[p], THREADS[m.roles[p]][t], row.src, row.label))
            s2 = canon(m.step(s, tr))
            if s2 not in seen:
                seen.add(s2)
                todo.append(s2)
    return fired


def compare(name: str, cfg: Config, expected: str = "clean", coverage: bool = True,
            **spin_kw) -> Row:
    row = Row(name, cfg, expected)
    row.lock = explore(model_for(cfg), symmetry=False, por=False)
    row.lock_sym = explore(model_for(cfg))
    row.spin = run_spin(cfg, **spin_kw)
    if coverage and row.lock.verdict == "clean" and row.spin.verdict == "clean":
        # a second, untimed build for row coverage: no statement merging, no d_step, and
        # split collectives (a joint completion is expanded at every arrival site, so its
        # rows have no single line of their own); -O0 since only coverage is read
        kw = dict(spin_kw, cc_opt="-O0", collectives="split", coverage=True)
        row.spin.rows_reached = run_spin(cfg, **kw).rows_reached
        row.rows_lock = rows_fired(cfg)
    return row


def crosscheck(configs=None, **spin_kw) -> list:
    if configs is None:
        configs = [(n, c, "clean") for n, c in shipped_configs()] + \
            [(n, c, MUTATIONS[c.mutation].expected) for n, c in mutation_configs()]
    return [compare(n, c, e, **spin_kw) for n, c, e in configs]


def format_table(rows) -> str:
    head = (f"{'configuration':42} {'lockstep':20} {'SPIN':20} {'agree':10} "
            f"{'states':>7} {'sym':>7} {'SPIN st':>8} {'lock s':>7} {'SPIN s':>7} "
            f"{'(cc)':>6} {'rows':>6}")
    out = [head, "-" * len(head)]
    for r in rows:
        out.append(f"{r.name:42} {r.lock.verdict:20} {r.spin.verdict:20} "
                   f"{'yes' if r.class_agrees else ('outcome' if r.outcome_agrees else 'NO'):10} "
                   f"{r.lock.states:>7,} {r.lock_sym.states:>7,} {r.spin.states:>8,} "
                   f"{r.lock.seconds:>7.3f} {r.spin.t_total:>7.2f} {r.spin.t_cc:>6.2f} "
                   f"{r.coverage:>6}")
    n_out = sum(r.outcome_agrees for r in rows)
    n_cls = sum(r.class_agrees for r in rows)
    out.append("")
    cov = [r for r in rows if r.rows_lock is not None]
    n_cov = sum(r.spin.rows_reached == r.rows_lock for r in cov)
    out.append(f"{len(rows)} configurations: violation/clean agrees on {n_out}, "
               f"property class agrees on {n_cls}" + (
                   f"; on {n_cov} of {len(cov)} clean ones both searches execute exactly "
                   f"the same table rows" if cov else ""))
    for r in cov:
        if r.spin.rows_reached != r.rows_lock:
            only_l, only_s = r.coverage_diff()
            out.append(f"  {r.name}: rows only lockstep fires {only_l}; only SPIN {only_s}")
    return "\n".join(out)


# ------------------------------------------------------------------ scale

def scale_table(meshes=(1, 2, 3, 4), chunks=(1, 2, 3, 4), spin_full: bool = True,
                spin_variants=(("split", True), ("split", False), ("joint", True),
                               ("joint", False)), **spin_kw) -> str:
    out = []
    head = (f"{'mesh':>4} {'chunks':>6} {'verdict':10} {'states':>9} {'s':>7} "
            f"{'states(sym)':>11} {'s(sym)':>7} {'ratio':>6}")
    out += ["lockstep, d_in=d_out=2, hard_cut, faults=1 (symmetry off vs on, no "
            "partial-order reduction)", head, "-" * len(head)]
    for mesh in meshes:
        for ch in chunks:
            cfg = Config(mesh=mesh, d_in=2, d_out=2, chunks=ch, hard_cut=True, faults=1)
            full = explore(model_for(cfg), symmetry=False, por=False)
            red = explore(model_for(cfg), symmetry=True, por=False)
            out.append(f"{mesh:>4} {ch:>6} {full.verdict:10} {full.states:>9,} "
                       f"{full.seconds:>7.2f} {red.states:>11,} {red.seconds:>7.2f} "
                       f"{full.states / red.states:>6.2f}")
    if spin_full:
        out.append("")
        out.append(f"full PP1: {PP1_FULL.describe()}")
        full = explore(model_for(PP1_FULL), symmetry=False, por=False)
        red = explore(model_for(PP1_FULL))
        out.append(f"  {'checker':34} {'verdict':8} {'states':>10}  {'time to verdict':>15}")
        out.append(f"  {'lockstep, symmetry and POR on':34} {red.verdict:8} "
                   f"{red.states:>10,}  "
                   f"{red.seconds:>13.2f} s  ({red.states_per_s:,.0f} states/s, "
                   f"peak {red.peak_mb:.0f} MB)")
        out.append(f"  {'lockstep, unreduced':34} {full.verdict:8} {full.states:>10,}  "
                   f"{full.seconds:>13.2f} s  ({full.states_per_s:,.0f} states/s)")
        best = None
        for coll, nr in spin_variants:
            what = f"SPIN {coll}, {'-DNOREDUCE' if nr else 'partial order'}"
            try:
                sp = run_spin(PP1_FULL, collectives=coll, noreduce=nr, **spin_kw)
            except SpinTimeout as exc:
                out.append(f"  {what:34} {'-':8} {'-':>10}  {exc}")
                continue
            out.append(f"  {what:34} {sp.verdict:8} {sp.states:>10,}  {sp.t_total:>13.2f} s  "
                       f"= spin -a {sp.t_spin:.2f} + cc {sp.t_cc:.2f} + pan {sp.t_pan:.2f} "
                       f"({sp.states / max(sp.t_pan, 1e-9):,.0f} states/s, {sp.mem_mb:.0f} MB)")
            if best is None or sp.t_total < best.t_total:
                best = sp
        if best is not None:
            out.append(f"  fastest SPIN time to verdict / lockstep (default search): "
                       f"{best.t_total / red.seconds:.1f}x; pan alone: "
                       f"{best.t_pan / red.seconds:.1f}x")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lockstep.model.crosscheck", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", action="store_true", help="state/time growth and full PP1")
    ap.add_argument("--cc-opt", default="-O2", help="C optimisation for pan (default -O2)")
    ap.add_argument("--only", default="", help="run configurations whose name contains this")
    ap.add_argument("--collectives", choices=("split", "joint"), default="split",
                    help="Promela encoding of collectives (model.promela)")
    ap.add_argument("--fault-budget", choices=("exact", "upto"), default="upto")
    ap.add_argument("--faults", type=int, default=0,
                    help="crash budget of the mutations' base configuration")
    ap.add_argument("--no-coverage", action="store_true",
                    help="skip the row-coverage comparison of clean runs")
    a = ap.parse_args(argv)
    if not spin_available():
        print("spin (and a C compiler) are needed: apt-get install spin gcc", file=sys.stderr)
        return 2
    if a.scale:
        print(scale_table(cc_opt=a.cc_opt))
        return 0
    base = Config(mesh=2, chunks=2, faults=a.faults)
    print(f"# SPIN: spin -a, {os.environ.get('CC', 'gcc')} {a.cc_opt} -DSAFETY -DNOREDUCE, "
          f"pan -m1000000 -w22; collectives={a.collectives}, "
          f"fault_budget={a.fault_budget}; mutations on {base.describe()}")
    configs = [(n, c, "clean") for n, c in shipped_configs()] + \
        [(n, c, MUTATIONS[c.mutation].expected) for n, c in mutation_configs(base)]
    configs = [x for x in configs if a.only in x[0]]
    rows = []
    unfinished = []
    for n, c, e in configs:
        joint = n in JOINT_ONLY
        try:
            rows.append(compare(n + (" (joint)" if joint and a.collectives != "joint" else ""),
                                c, e, coverage=not a.no_coverage and not joint,
                                cc_opt=a.cc_opt, fault_budget=a.fault_budget,
                                collectives="joint" if joint else a.collectives))
        except SpinTimeout as exc:
            unfinished.append(f"  {n}: not compared: {exc}")
            print(unfinished[-1], file=sys.stderr, flush=True)
            continue
        print(f"  {n}: lockstep {rows[-1].lock.verdict}, SPIN {rows[-1].spin.verdict}",
              file=sys.stderr, flush=True)
    print(format_table(rows))
    if unfinished:
        print(f"{len(unfinished)} configuration(s) not compared (SPIN did not finish):")
        print("\n".join(unfinished))
    return 0 if rows and all(r.outcome_agrees for r in rows) and not unfinished else 1


if __name__ == "__main__":
    sys.exit(main())
