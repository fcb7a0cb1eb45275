"""The `check` use of the model: run one configuration, every mutation, or the manifest.

Kept apart from the CLI so tests and benchmarks call the same functions the command
line does. No printing here except through the returned text.
"""
from __future__ import annotations

import json
from pathlib import Path

from lockstep.accel import source_file

from .config import Config, config_from_dict, config_to_dict  # noqa: F401 (public path)
from .explore import Result, explore
from .mutations import MUTATIONS, model_for, mutation_config

# Beside the .py file, not __file__ (a compiled module's is its build: accel.py).
MANIFEST = source_file(__name__).with_name("manifest.json")


def check(cfg: Config, symmetry: bool = True, progress=False, por: bool = True,
          workers: int = 1, max_states: int = 0, max_seconds: float = 0.0) -> Result:
    return explore(model_for(cfg), symmetry=symmetry, progress=progress, por=por,
                   workers=workers, max_states=max_states, max_seconds=max_seconds)


def format_result(r: Result) -> str:
    lines = [f"config   {r.config}",
             f"verdict  {r.verdict.upper() if r.verdict != 'clean' else 'clean'}",
             f"states   {r.states:,}  transitions {r.transitions:,}  depth {r.depth}  "
             f"terminal states {r.terminals:,}",
             f"time     {r.seconds:.3f} s  ({r.states_per_s:,.0f} states/s)  "
             f"peak memory {r.peak_mb:.0f} MB  symmetry {'on' if r.symmetry else 'off'}  "
             f"partial-order reduction {'on' if r.por else 'off'}"
             + (" (violation searched again without it: states and counterexample "
                "are the unreduced search's)" if r.researched else "")
             + (" (no crash expanded: with the watchdog on a crash shows no violation a "
                "run without it does not, model/reduction.py; --no-por expands them)"
                if r.crash_free else "")
             + (f"  workers {r.workers}" if r.workers > 1 else "")]
    if r.violation:
        lines.append(f"counterexample ({len(r.steps) - 1} steps, shortest):")
        lines += r.steps
    return "\n".join(lines)


def all_mutations(base: Config, symmetry: bool = True, por: bool = True):
    """(shipped result, [(mutation, result)]) on `base` widened per mutation."""
    shipped = check(base, symmetry, por=por)
    rows = [(MUTATIONS[name], check(mutation_config(base, name), symmetry, por=por))
            for name in MUTATIONS]
    return shipped, rows


def mutation_table(shipped: Result, rows) -> tuple[str, bool]:
    head = (f"{'mutation':34} {'failure mode':26} {'expected':20} {'found':20} "
            f"{'cex':>4} {'states':>8}")
    out = [head, "-" * len(head),
           f"{'(shipped protocol)':34} {'-':26} {'clean':20} {shipped.verdict:20} "
           f"{'-':>4} {shipped.states:>8,}"]
    ok = shipped.verdict == "clean"
    for mut, r in rows:
        caught = r.verdict == mut.expected
        ok &= caught
        mark = "" if caught else "  <-- NOT CAUGHT AS PREDICTED"
        out.append(f"{mut.name:34} {mut.failure_mode:26} {mut.expected:20} "
                   f"{r.verdict:20} {len(r.steps) - 1:>4} {r.states:>8,}{mark}")
    out.append("")
    out.append("all mutations caught with their predicted verdict, shipped protocol clean"
               if ok else "FAILED: see the rows marked above")
    return "\n".join(out), ok


# ------------------------------------------------------------------ the state manifest

def manifest_entries() -> list:
    """The configurations whose state counts are recorded: small shipped configurations
    across the switches, the full PP1 configuration, and every mutation."""
    ship = [
        ("pp0", Config(mesh=1, chunks=2)),
        ("pp0_cut_fault", Config(mesh=1, chunks=3, hard_cut=True, faults=1)),
        ("pp1_mesh2", Config(mesh=2, chunks=2)),
        ("pp1_mesh2_buffered", Config(mesh=2, chunks=2, p2p="buffered")),
        ("pp1_mesh2_depth1", Config(mesh=2, chunks=3, d_in=1, d_out=1)),
        ("pp1_mesh3_R0a_cut", Config(mesh=3, chunks=3, hard_cut=True, regime="R0a")),
        ("pp1_mesh3_R0_steps2", Config(mesh=3, chunks=2, regime="R0", steps=2)),
        ("pp1_mesh2_noop_fault", Config(mesh=2, chunks=2, noops=1, faults=1)),
        ("pp1_full", Config(mesh=4, d_in=2, d_out=2, chunks=3, hard_cut=True, faults=1)),
        ("pp1_mesh2_two_cuts", Config(mesh=2, chunks=3, hard_cut=2)),
        ("pp1_mesh3_R0a_two_cuts_fault", Config(mesh=3, chunks=3, hard_cut=2,
                                                regime="R0a", faults=1)),
        ("pp1_mesh3_cond_flag_all", Config(mesh=3, chunks=2, hard_cut=True, faults=1,
                                             cond_flag_all=True)),
    ]
    ship += [(f"inject_{f}", Config(mesh=3, chunks=2, hard_cut=True, faults=1,
                                    inject=frozenset({f})))
             for f in ("rank0_preflight", "leader_reject", "wrong_group",
                       "count_mismatch", "cond_flag", "rank0_bad_envelope",
                       "leader_bad_result")]
    base = Config(mesh=2, chunks=2)
    muts = [(f"mutation_{n}", mutation_config(base, n)) for n in MUTATIONS]
    return ship + muts


def compute_manifest(symmetry: bool = True) -> list:
    out = []
    for name, cfg in manifest_entries():
        r = check(cfg, symmetry)
        out.append({"name": name, "config": config_to_dict(cfg), "verdict": r.verdict,
                    "states": r.states, "transitions": r.transitions})
    return out


def write_manifest(entries, path: Path = MANIFEST) -> None:
    path.write_text(json.dumps(entries, indent=1) + "\n")


def diff_manifest(path: Path = MANIFEST) -> list:
    """Lines describing every difference between the recorded and the current counts."""
    recorded = {e["name"]: e for e in json.loads(path.read_text())}
    current = {e["name"]: e for e in compute_manifest()}
    diffs = []
    for name in sorted(set(recorded) | set(current)):
        a, b = recorded.get(name), current.get(name)
        if a is None:
            diffs.append(f"{name}: new configuration (not in the manifest)")
        elif b is None:
            diffs.append(f"{name}: in the manifest but no longer checked")
        else:
            # Configs compare as Configs: a field added since the recording is its default.
            if config_from_dict(a["config"]) != config_from_dict(b["config"]):
                diffs.append(f"{name}: config {a['config']} -> {b['config']}")
            for key in ("verdict", "states", "transitions"):
                if a[key] != b[key]:
                    diffs.append(f"{name}: {key} {a[key]} -> {b[key]}")
    return diffs
