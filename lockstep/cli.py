"""`lockstep`: the one command line. The only module that may import model/, runtime/
and conformance/ together; each subcommand lives with the part it drives."""
from __future__ import annotations

import argparse
import json
import sys


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mesh", type=int, default=2, help="mesh ranks incl. the leader (1 = PP0)")
    p.add_argument("--depth", type=int, default=None, help="D_in = D_out = DEPTH")
    p.add_argument("--d-in", type=int, default=2)
    p.add_argument("--d-out", type=int, default=2)
    p.add_argument("--chunks", type=int, default=2)
    p.add_argument("--hard-cut", action="store_true", help="allow one hard cut anywhere")
    p.add_argument("--faults", type=int, default=0, help="crash-fault budget")
    p.add_argument("--p2p", choices=("rendezvous", "buffered"), default="rendezvous")
    p.add_argument("--eager", type=int, default=1, help="buffered p2p channel capacity")
    p.add_argument("--regime", choices=("R1", "R0a", "R0"), default="R1")
    p.add_argument("--steps", type=int, default=1, help="num_denoise_steps")
    p.add_argument("--noops", type=int, default=0, help="NOOP heartbeats rank0 may send")
    p.add_argument("--inject", action="append", default=[],
                   help="runtime fault to model (repeatable)")


def _config(a):
    from lockstep.model.config import Config
    d_in = a.depth if a.depth is not None else a.d_in
    d_out = a.depth if a.depth is not None else a.d_out
    return Config(mesh=a.mesh, d_in=d_in, d_out=d_out, chunks=a.chunks,
                  hard_cut=a.hard_cut, faults=a.faults, p2p=a.p2p, eager=a.eager,
                  regime=a.regime, steps=a.steps, noops=a.noops,
                  inject=frozenset(a.inject))


def cmd_check(a) -> int:
    from lockstep.model import check as chk
    from lockstep.model.mutations import MUTATIONS, mutation_config
    cfg = _config(a)
    if a.all_mutations:
        shipped, rows = chk.all_mutations(cfg, symmetry=not a.no_symmetry,
                                          por=not a.no_por)
        table, ok = chk.mutation_table(shipped, rows)
        if a.json:
            print(json.dumps({"shipped": shipped.as_dict(), "ok": ok, "mutations": [
                dict(r.as_dict(), mutation=m.name, failure_mode=m.failure_mode,
                     expected=m.expected, caught=r.verdict == m.expected)
                for m, r in rows]}, indent=1))
        else:
            print(table)
            if a.verbose:
                for m, r in rows:
                    print(f"\n== {m.name}: {m.summary}")
                    print("\n".join(r.steps))
        return 0 if ok else 1
    if a.mutation:
        if a.mutation not in MUTATIONS:
            print(f"lockstep: unknown mutation {a.mutation!r}; known: "
                  f"{', '.join(MUTATIONS)}", file=sys.stderr)
            return 2
        cfg = mutation_config(cfg, a.mutation)
    r = chk.check(cfg, symmetry=not a.no_symmetry, progress=a.progress and not a.json,
                  por=not a.no_por, workers=a.workers)
    print(json.dumps(r.as_dict(), indent=1) if a.json else chk.format_result(r))
    return 0 if r.verdict == "clean" else 1


def cmd_manifest(a) -> int:
    from lockstep.model import check as chk
    if a.update:
        chk.write_manifest(chk.compute_manifest())
        print(f"wrote {chk.MANIFEST}")
        return 0
    diffs = chk.diff_manifest()
    if diffs:
        print("state-space manifest differs (a table change altered the state space; "
              "explain it and run `lockstep manifest --update`):")
        print("\n".join("  " + d for d in diffs))
        return 1
    print("state-space manifest matches")
    return 0


def cmd_run(a) -> int:
    from lockstep.model.config import Config
    from lockstep.runtime.run import run_local
    cfg = Config(mesh=a.mesh, d_in=a.depth or a.d_in, d_out=a.depth or a.d_out,
                 chunks=a.chunks, hard_cut=a.hard_cut_at is not None, regime=a.regime,
                 steps=a.steps, inject=frozenset([a.fault.split("@")[0]] if a.fault else []))
    opts = {"backend": a.backend, "hard_cut_at": a.hard_cut_at,
            "costs": {"phase_a_ms": a.stage_a_ms, "phase_b_ms": a.stage_b_ms,
                      "phase_c_ms": a.stage_c_ms},
            "op_deadline_s": a.op_deadline_s}
    if a.fault:
        name, _, at = a.fault.partition("@")
        opts["fault"] = {"name": name, "at_chunk": int(at or 0)}
    res = run_local(cfg, opts, a.out, deadline_s=a.deadline_s)
    print(res.summary())
    return 0 if res.ok else 1


def cmd_breakit(a) -> int:
    from pathlib import Path
    from lockstep.runtime.breakit import breakit, format_table
    if a.backend != "gloo":
        print("lockstep breakit: only --backend gloo runs on this machine; the NCCL "
              "variant needs a multi-GPU host (see docs/breakit.md)", file=sys.stderr)
        return 2
    rows = breakit(Path(a.out), baseline=not a.no_baseline, only=a.case or None)
    print(json.dumps(rows, indent=1) if a.json else format_table(rows))
    ok = all(r["signature"] and r["conforms"] in (True, None) and (
        r["fault_to_all_exited_s"] is None or r["fault_to_all_exited_s"] < 1.0)
        for r in rows)
    return 0 if ok else 1


def cmd_demo(a) -> int:
    from pathlib import Path
    from lockstep.demo import demo
    return demo(Path(a.out), chunks=a.chunks, mesh=a.mesh)


def cmd_render(a) -> int:
    from lockstep.model.render import cli_render
    return cli_render(a.out, a.mutation or None, _config(a))


def cmd_export(a) -> int:
    from lockstep.model.mutations import mutation_config
    from lockstep.model.promela import export_promela
    cfg = _config(a)
    if a.mutation:
        cfg = mutation_config(cfg, a.mutation)
    text = export_promela(cfg, fault_budget=a.fault_budget)
    if a.out == "-":
        print(text)
    else:
        with open(a.out, "w") as f:
            f.write(text)
        print(f"wrote {a.out} ({cfg.describe()})")
    return 0


def cmd_crosscheck(a) -> int:
    from lockstep.model.crosscheck import main as crosscheck_main
    return crosscheck_main(a.rest)


def cmd_prove(a) -> int:
    from lockstep.model.prove import cli_prove
    return cli_prove(a.mutation or None, a.json)


def cmd_docs(a) -> int:
    from lockstep.model.docgen import cli_docs
    return cli_docs(a.check)


def cmd_conform(a) -> int:
    from lockstep.conformance import cli_conform
    return cli_conform(a.run_dir, a.json)


def cmd_overlap(a) -> int:
    from lockstep.conformance import cli_overlap
    return cli_overlap(a.run_dir, a.out or a.run_dir)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="lockstep", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("check", help="model-check the protocol tables")
    _add_config_args(p)
    p.add_argument("--mutation", default="", help="check a named broken variant")
    p.add_argument("--all-mutations", action="store_true",
                   help="shipped protocol clean and every mutation caught as predicted")
    p.add_argument("--no-symmetry", action="store_true")
    p.add_argument("--no-por", action="store_true",
                   help="no partial-order reduction (default: on; state counts unreduced)")
    p.add_argument("--workers", type=int, default=1,
                   help="search processes (count, default 1; >1: multiprocess search "
                        "without partial-order reduction)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--progress", action="store_true", help="live progress line")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(fn=cmd_check)

    p = sub.add_parser("manifest", help="compare state counts with model/manifest.json")
    p.add_argument("--update", action="store_true")
    p.set_defaults(fn=cmd_manifest)

    p = sub.add_parser("run", help="run the control plane (CPU/gloo by default)")
    p.add_argument("--mesh", type=int, default=3)
    p.add_argument("--chunks", type=int, default=10)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--d-in", type=int, default=2)
    p.add_argument("--d-out", type=int, default=2)
    p.add_argument("--hard-cut-at", type=int, default=None, help="chunk index of a hard cut")
    p.add_argument("--regime", choices=("R1", "R0a", "R0"), default="R1")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--backend", default="gloo")
    p.add_argument("--stage-a-ms", type=float, default=0.0)
    p.add_argument("--stage-b-ms", type=float, default=0.0, help="per generator call")
    p.add_argument("--stage-c-ms", type=float, default=0.0)
    p.add_argument("--fault", default="", help="NAME@CHUNK, e.g. leader_reject@3")
    p.add_argument("--op-deadline-s", type=float, default=30.0)
    p.add_argument("--deadline-s", type=float, default=120.0, help="hard deadline, whole run")
    p.add_argument("--out", default="runs/latest", help="run directory (traces)")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("breakit", help="every failure mode as a real multi-process job")
    p.add_argument("--backend", default="gloo", choices=("gloo", "nccl"))
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--case", action="append", default=[])
    p.add_argument("--out", default="runs/breakit")
    p.set_defaults(fn=cmd_breakit)

    p = sub.add_parser("demo", help="model check, gloo run, conformance, diagrams, report")
    p.add_argument("--out", default="out/demo")
    p.add_argument("--chunks", type=int, default=24)
    p.add_argument("--mesh", type=int, default=3)
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("render", help="state diagrams per role and counterexample charts")
    _add_config_args(p)
    p.add_argument("--mutation", default="")
    p.add_argument("--out", default="docs/diagrams")
    p.set_defaults(fn=cmd_render)

    p = sub.add_parser("export", help="export the tables as a Promela model for SPIN")
    _add_config_args(p)
    p.add_argument("--promela", action="store_true", default=True)
    p.add_argument("--mutation", default="")
    p.add_argument("--fault-budget", choices=("exact", "upto"), default="upto")
    p.add_argument("--out", default="-")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("crosscheck", help="SPIN and lockstep on the same configurations "
                       "(options of python -m lockstep.model.crosscheck follow)")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_crosscheck)

    p = sub.add_parser("prove", help="z3: contract, guard and group-rule proofs")
    p.add_argument("--mutation", default="")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_prove)

    p = sub.add_parser("docs", help="regenerate docs/ from the tables and the contract")
    p.add_argument("--check", action="store_true", help="fail if docs/ is stale")
    p.set_defaults(fn=cmd_docs)

    p = sub.add_parser("conform", help="replay a run's traces through the model")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_conform)

    p = sub.add_parser("overlap", help="overlap report, Perfetto timeline and plot")
    p.add_argument("run_dir")
    p.add_argument("--out", default="")
    p.set_defaults(fn=cmd_overlap)

    a = ap.parse_args(argv)
    try:
        return a.fn(a)
    except ValueError as e:
        print(f"lockstep: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
