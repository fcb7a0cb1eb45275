"""`lockstep`: the one command line. The only module that may import model/, runtime/
and conformance/ together; each subcommand lives with the part it drives."""
from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from dataclasses import fields
from pathlib import Path

DESCRIPTION = ("Hang-free control planes for pipeline-parallel inference: one set of\n"
               "transition tables drives a model checker, a torch.distributed runtime\n"
               "and a conformance checker of the runtime's traces.")

# Exit codes, the same for every subcommand (also printed by `lockstep --help`).
EXIT_OK = 0          # clean: no violation, the trace conforms, the run succeeded
EXIT_VIOLATION = 1   # a property violated, a trace diverges, a manifest or doc is stale
EXIT_USAGE = 2       # bad command line or option value
EXIT_RUN_FAILED = 3  # a real run failed: a rank exited with an error or a deadline hit
EXIT_PIPE = 141      # stdout's reader left (`| head`): a shell's code for SIGPIPE
# 128 + N: stopped by signal N (SIGHUP 129, SIGINT 130, SIGTERM 143), a shell's code for it

EPILOG = f"""exit codes:
  {EXIT_OK}  clean (no violation / the trace conforms / every rank exited ok)
  {EXIT_VIOLATION}  violation found (a property, a diverging trace, a stale manifest or doc)
  {EXIT_USAGE}  usage error (unknown option, bad value)
  {EXIT_RUN_FAILED}  run failed (a rank exited with an error, or the hard deadline was hit;
     check: the --max-states or --max-seconds budget was hit, no verdict)
  {EXIT_PIPE}  the output's reader left early (`| head`): the command did not finish
  129 / 130 / 143  stopped by SIGHUP / SIGINT (Ctrl-C) / SIGTERM: the ranks of a run
       going were killed and its RUN_DIR/launch.json says so (`lockstep conform` names it)
"""


class _Help(argparse.RawDescriptionHelpFormatter):
    """Every option shows its default, unless its help already says it or it has none."""

    def _get_help_string(self, action):
        h = action.help or ""
        d = action.default
        if "default:" in h or d is None or d is argparse.SUPPRESS or d is False \
                or isinstance(action, argparse._HelpAction):
            return h
        return f"{h} (default: {d})"


def _parser(sub, name: str, help_: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help_, description=help_, epilog=EPILOG,
                          formatter_class=_Help)


# ------------------------------------------------------------------ model configuration

def _config_defaults() -> dict:
    from lockstep.model.config import Config
    return {f.name: getattr(Config(), f.name) for f in fields(Config)}


def _add_config_args(p: argparse.ArgumentParser) -> None:
    """The model's switches. Each defaults to None here so that an option the user set can
    be told from a default (a mutation must never change a set option silently)."""
    d = _config_defaults()

    def opt(flag, help_, **kw):
        dest = flag.lstrip("-").replace("-", "_")
        shown = kw.pop("shown", d.get(dest))
        p.add_argument(flag, default=None, help=f"{help_} (default: {shown})", **kw)

    opt("--mesh", "mesh ranks including the leader; 1 = PP0", type=int)
    opt("--depth", "sets both queue depths, D_in = D_out = DEPTH (envelopes / results)",
        type=int, shown="unset")
    opt("--d-in", "D_in: envelopes in flight, built by rank0 and not yet answered, those "
        "the leader holds ahead included (count)", type=int)
    opt("--d-out", "D_out: results waiting for decode on rank0 (count)", type=int)
    opt("--leader-in", "the leader's inbox: envelopes its comms thread holds ahead "
        "(count)", type=int)
    opt("--leader-out", "the leader's outbox: results waiting for its comms thread "
        "(count)", type=int)
    opt("--chunks", "INFER envelopes rank0 builds (count)", type=int)
    opt("--hard-cut", "allow one hard cut (epoch bump + flush) anywhere",
        action="store_const", const=1, shown="no cut")
    opt("--hard-cuts", "allow this many hard cuts, anywhere: back to back, during drain "
        "(count)", type=int, dest="hard_cuts", shown=0)
    opt("--faults", "crash-fault budget: kill -9s of any process at any step (count)",
        type=int)
    opt("--p2p", "point-to-point semantics: rendezvous (conservative NCCL) or buffered",
        choices=("rendezvous", "buffered"))
    opt("--eager", "buffered p2p: messages a channel holds before a send blocks (count)",
        type=int)
    opt("--no-watchdog", "model no heartbeat watchdog (a crash then releases no one)",
        action="store_const", const=True, dest="no_watchdog", shown="watchdog on")
    opt("--regime", "recompute regime", choices=("R1", "R0a", "R0"))
    opt("--steps", "num_denoise_steps (generator calls per chunk follow from the regime)",
        type=int)
    opt("--noops", "NOOP heartbeats rank0 may send (count)", type=int)
    opt("--cond-flag-all", "a feature flag on every rank that adds one mesh collective "
        "after Phase B (the parity handshake passes; --inject cond_flag makes one rank "
        "differ)", action="store_const", const=True, dest="cond_flag_all", shown="off")
    from lockstep.model.config import INJECTABLE
    p.add_argument("--inject", action="append", default=None,
                   help="runtime fault switch to model, repeatable; one of "
                        f"{', '.join(INJECTABLE)} (default: none)")


def _config(a):
    """(Config, the fields the user set explicitly) from parsed config options."""
    from lockstep.model.config import Config
    if a.depth is not None and (a.d_in is not None or a.d_out is not None):
        raise ValueError("--depth sets both queue depths: give it or --d-in/--d-out, "
                         "not both")
    if a.hard_cut is not None and a.hard_cuts is not None:
        raise ValueError("--hard-cut is --hard-cuts 1: give one of them")
    cuts = a.hard_cuts if a.hard_cuts is not None else a.hard_cut
    kw = {"mesh": a.mesh, "chunks": a.chunks, "hard_cut": cuts, "faults": a.faults,
          "p2p": a.p2p, "eager": a.eager, "regime": a.regime, "steps": a.steps,
          "noops": a.noops, "d_in": a.depth if a.depth is not None else a.d_in,
          "d_out": a.depth if a.depth is not None else a.d_out,
          "leader_in": a.leader_in, "leader_out": a.leader_out,
          "watchdog": False if a.no_watchdog else None,
          "cond_flag_all": a.cond_flag_all,
          "inject": frozenset(a.inject) if a.inject else None}
    explicit = {k: v for k, v in kw.items() if v is not None}
    return Config(**explicit), set(explicit)


def _with_mutation(cfg, name: str, explicit: set, cmd: str):
    """`cfg` widened to what mutation `name` needs; every field it changes is said on
    stderr, naming the ones the user set."""
    from lockstep.model.mutations import MUTATIONS, mutation_config
    if name not in MUTATIONS:
        raise ValueError(f"unknown mutation {name!r}; known: {', '.join(MUTATIONS)}")
    new = mutation_config(cfg, name)
    for f in fields(cfg):
        if f.name == "mutation":
            continue
        old, val = getattr(cfg, f.name), getattr(new, f.name)
        if old != val:
            who = "you set" if f.name in explicit else "default"
            print(f"lockstep {cmd}: mutation {name} needs {f.name}={_show(val)} to be "
                  f"observable ({who} {_show(old)})", file=sys.stderr)
    return new


def _show(v):
    return ",".join(sorted(v)) or "none" if isinstance(v, frozenset) else v


# ------------------------------------------------------------------ subcommands

def cmd_check(a) -> int:
    from lockstep import accel
    from lockstep.model import check as chk
    from lockstep.model.mutations import MUTATIONS
    cfg, explicit = _config(a)
    if a.all_mutations:
        if a.mutation:
            raise ValueError("--all-mutations checks every mutation: drop --mutation")
        shipped, rows = chk.all_mutations(cfg, symmetry=not a.no_symmetry,
                                          por=not a.no_por)
        table, ok = chk.mutation_table(shipped, rows)
        if a.json:
            print(json.dumps({"shipped": shipped.as_dict(), "ok": ok,
                              "build": accel.describe(), "mutations": [
                dict(r.as_dict(), mutation=m.name, failure_mode=m.failure_mode,
                     expected=m.expected, caught=r.verdict == m.expected)
                for m, r in rows]}, indent=1))
        else:
            print(table)
            if a.verbose:
                for m, r in rows:
                    print(f"\n== {m.name}: {m.summary}")
                    print("\n".join(r.steps))
            print(f"build    {accel.describe()}")
        return EXIT_OK if ok else EXIT_VIOLATION
    if a.mutation:
        if a.mutation not in MUTATIONS:
            raise ValueError(f"unknown mutation {a.mutation!r}; known: "
                             f"{', '.join(MUTATIONS)}")
        cfg = _with_mutation(cfg, a.mutation, explicit, "check")
    if a.max_states < 0:
        raise ValueError(f"--max-states must be >= 0 (0: no budget), not {a.max_states}")
    if not a.max_seconds >= 0:
        raise ValueError(f"--max-seconds must be >= 0 (0: no budget), not {a.max_seconds}")
    from lockstep.model.meter import BudgetExceeded, StateBudgetExceeded
    # Without --progress, a search still going after a few seconds prints its progress
    # (model.meter, "auto"), so a long check is not taken for a hang; --json: none.
    progress = False if a.json else True if a.progress else "auto"
    try:
        r = chk.check(cfg, symmetry=not a.no_symmetry, progress=progress,
                      por=not a.no_por, workers=a.workers, max_states=a.max_states,
                      max_seconds=a.max_seconds)
    except BudgetExceeded as e:
        larger = "--max-states" if isinstance(e, StateBudgetExceeded) else "--max-seconds"
        print(f"lockstep check: {cfg.describe()}: {e}: no verdict (no violation in the "
              f"part explored); a smaller configuration, or a larger {larger}",
              file=sys.stderr)
        return EXIT_RUN_FAILED
    print(json.dumps(dict(r.as_dict(), build=accel.describe()), indent=1) if a.json
          else f"{chk.format_result(r)}\nbuild    {accel.describe()}")
    return EXIT_OK if r.verdict == "clean" else EXIT_VIOLATION


def cmd_manifest(a) -> int:
    from lockstep.model import check as chk
    if a.update:
        chk.write_manifest(chk.compute_manifest())
        print(f"wrote {chk.MANIFEST}")
        return EXIT_OK
    diffs = chk.diff_manifest()
    if diffs:
        print("state-space manifest differs (a table change altered the state space; "
              "explain it and run `lockstep manifest --update`):")
        print("\n".join("  " + d for d in diffs))
        return EXIT_VIOLATION
    print(f"state-space manifest matches ({chk.MANIFEST})")
    return EXIT_OK


def add_segment_args(p) -> None:
    """Trace segments (runtime/trace.py): `lockstep run` and `python -m lockstep.soak`."""
    p.add_argument("--trace-segment-mb", type=float, default=0.0,
                   help="roll each rank's trace over into a new segment at this size, MB "
                        "(default: one segment)")
    p.add_argument("--trace-segment-s", type=float, default=0.0,
                   help="roll each rank's trace over after this many seconds (default: "
                        "never)")
    p.add_argument("--trace-keep", type=int, default=0,
                   help="keep only the newest K segments per rank, a flight recorder "
                        "(default: all)")


def _run_options(a):
    from lockstep.model.runopts import (CutSchedule, RunOptions, StageCosts, parse_cut_at,
                                        parse_fault)
    if a.hard_cut_at is not None and a.cut_at:
        raise ValueError("--hard-cut-at K is --cut-at K: give the cuts in one of them "
                         "(both would add K to the list, one more cut)")
    at = parse_cut_at(a.cut_at) + (() if a.hard_cut_at is None else (a.hard_cut_at,))
    cuts = CutSchedule(at=at, every=a.cut_every, random=a.cut_random, seed=a.cut_seed,
                       control=a.cut_control, reason=a.cut_reason)
    return RunOptions(backend=a.backend, cuts=cuts,
                      fault=parse_fault(a.fault), heartbeat_ms=a.heartbeat_ms,
                      op_deadline_s=a.op_deadline_s,
                      pg_timeout_s=a.pg_timeout_s, lost_after_s=a.lost_after_s,
                      costs=StageCosts(a.stage_a_ms, a.stage_b_ms, a.stage_c_ms),
                      trace_segment_mb=a.trace_segment_mb, trace_segment_s=a.trace_segment_s,
                      trace_keep=a.trace_keep, workload=a.workload, device=a.device,
                      rank0_device=a.rank0_device, cuda_window=a.cuda_window,
                      workload_args=_json_object(a.workload_args, "--workload-args"))


def _json_object(text: str, flag: str) -> dict:
    try:
        val = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag} {text!r}: not JSON ({e.msg})") from None
    if not isinstance(val, dict):
        raise ValueError(f"{flag} {text!r}: must be a JSON object")
    return val


def cmd_run(a) -> int:
    from lockstep.model.config import INJECTABLE, Config
    from lockstep.runtime.run import run_local
    opts = _run_options(a)
    # Faults that change a rank's local state in the model (a wrong-group request, an
    # off-by-one plan, a per-rank flag) are also model switches; see model/config.py.
    inject = frozenset([opts.fault.name]) if opts.fault and opts.fault.name in INJECTABLE \
        else frozenset()
    noops = a.noops if a.noops is not None else (4 if a.heartbeat_ms is not None else 0)
    if a.depth is not None and (a.d_in is not None or a.d_out is not None):
        raise ValueError("--depth sets both queue depths: give it or --d-in/--d-out, "
                         "not both")
    if a.depth is not None:
        a.d_in = a.d_out = a.depth
    cfg = Config(mesh=a.mesh, d_in=2 if a.d_in is None else a.d_in,
                 d_out=2 if a.d_out is None else a.d_out,
                 chunks=a.chunks, hard_cut=opts.cuts.bound(a.chunks), regime=a.regime,
                 steps=a.steps, noops=noops, inject=inject,
                 cond_flag_all=a.cond_flag_all)
    out = Path(a.out).resolve()
    res = run_local(cfg, opts, out, deadline_s=a.deadline_s)
    print(res.summary())
    print(f"traces in {out}")
    return EXIT_OK if res.ok else EXIT_RUN_FAILED


def cmd_cut(a) -> int:
    from lockstep.runtime.control import CONTROL_DIR, CutRefused, request_cut_file
    run_dir = Path(a.run_dir)
    if not (run_dir / "run.json").is_file():   # a typo would leave a request nobody reads
        raise ValueError(f"{run_dir}: no run here (no run.json; `lockstep run --out "
                         f"{run_dir}` writes it before any rank starts)")
    try:
        got = request_cut_file(run_dir, a.reason, wait_s=a.wait_s)
    except CutRefused as e:
        raise ValueError(str(e)) from None
    if got == "pending":
        got += (f": rank0 did not take it within {a.wait_s:g} s; the request stays in "
                f"{run_dir / CONTROL_DIR} (a running run takes it later; is the run "
                "there still running? `--wait-s` waits longer)")
    print(f"lockstep cut: {got}")
    return EXIT_OK if got == "taken" else EXIT_RUN_FAILED


def cmd_breakit(a) -> int:
    from lockstep.breakit import breakit, cases, format_table, shortfalls
    if a.backend != "gloo":
        print("lockstep breakit: only --backend gloo runs on this machine; the NCCL "
              "variant needs a multi-GPU host (see docs/breakit.md)", file=sys.stderr)
        return EXIT_USAGE
    known = [c.name for c in cases()]
    unknown = [c for c in a.case if c not in known]
    if unknown:
        raise ValueError(f"unknown case(s) {unknown}; known: {', '.join(known)}")
    rows = breakit(Path(a.out).resolve(), baseline=not a.no_baseline, only=a.case or None)
    for r in rows:
        r["shortfalls"] = shortfalls(r)
    print(json.dumps(rows, indent=1) if a.json else format_table(rows))
    return EXIT_RUN_FAILED if any(r["shortfalls"] for r in rows) else EXIT_OK


def cmd_demo(a) -> int:
    from lockstep.demo import demo
    rc = demo(Path(a.out).resolve(), chunks=a.chunks, mesh=a.mesh)
    return EXIT_OK if rc == 0 else EXIT_RUN_FAILED


def cmd_render(a) -> int:
    from lockstep.model.render import cli_render
    cfg, explicit = _config(a)
    if a.mutation:
        _with_mutation(cfg, a.mutation, explicit, "render")   # says what it widens
    out = Path(a.out).resolve()
    print(f"lockstep render: writing into {out}", file=sys.stderr)
    return cli_render(out, a.mutation or None, cfg)


def cmd_export(a) -> int:
    from lockstep.model.promela import export_promela
    cfg, explicit = _config(a)
    if a.mutation:
        cfg = _with_mutation(cfg, a.mutation, explicit, "export")
    text = export_promela(cfg, fault_budget=a.fault_budget)
    if a.out == "-":
        print(text)
    else:
        Path(a.out).write_text(text)
        print(f"wrote {Path(a.out).resolve()} ({cfg.describe()})")
    return EXIT_OK


def cmd_crosscheck(a) -> int:
    from lockstep.model.crosscheck import main as crosscheck_main
    return crosscheck_main(a.rest)


def cmd_prove(a) -> int:
    from lockstep.model.prove import cli_prove
    return cli_prove(a.mutation or None, a.json)


def cmd_docs(a) -> int:
    from lockstep.model.docgen import DOCS, cli_docs
    # Default: the checkout's docs/ when lockstep runs from one, else ./docs.
    out = Path(a.out).resolve() if a.out else DOCS if DOCS.is_dir() else Path.cwd() / "docs"
    print(f"lockstep docs: {'checking' if a.check else 'writing into'} {out}",
          file=sys.stderr)
    return cli_docs(a.check, out)


def cmd_accel(a) -> int:
    from lockstep import accel
    if a.what == "build":
        accel.build(a.jobs)      # a module that fails runs as Python (said): not an error
        return EXIT_OK
    for name in accel.COMPILED:
        __import__(name)
    print(accel.describe())
    return EXIT_OK


def cmd_conform(a) -> int:
    from lockstep.conformance import cli_conform
    return cli_conform(a.run_dir, a.json, a.reference or None, last=a.last,
                       suffixes=a.suffixes)


def cmd_equivalence(a) -> int:
    from lockstep.equivalence import cli
    return cli(a)


def cmd_coverage(a) -> int:
    from lockstep.conformance.coverage import cli_coverage
    return cli_coverage(a.run_dirs)


def cmd_overlap(a) -> int:
    from lockstep.conformance import cli_overlap
    return cli_overlap(a.run_dir, a.out or a.run_dir)


def build_parser() -> argparse.ArgumentParser:
    from lockstep import __version__
    ap = argparse.ArgumentParser(prog="lockstep", description=DESCRIPTION, epilog=EPILOG,
                                 formatter_class=_Help)
    ap.add_argument("--version", action="version", version=f"lockstep {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = _parser(sub, "check", "model-check the protocol tables")
    _add_config_args(p)
    p.add_argument("--mutation", default="", help="check a named broken variant "
                   "(default: the shipped protocol)")
    p.add_argument("--all-mutations", action="store_true",
                   help="shipped protocol clean and every mutation caught as predicted")
    p.add_argument("--no-symmetry", action="store_true",
                   help="explore without worker-symmetry reduction")
    p.add_argument("--no-por", action="store_true",
                   help="explore without partial-order reduction (state counts unreduced, "
                        "every crash expanded)")
    p.add_argument("--workers", type=int, default=1,
                   help="search processes, count (>1: multiprocess search, without "
                        "partial-order reduction)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--progress", action="store_true",
                   help="progress line on stderr from the start (without it: from "
                        "5 s on; on a terminal rewritten in place every 2 s, else a "
                        "line every 10 s; none with --json)")
    p.add_argument("--max-states", type=int, default=0,
                   help="state budget: stop with no verdict (exit 3) once the search holds "
                        "more states than this, count (with --workers: judged at the end "
                        "of each level) (default: no budget)")
    p.add_argument("--max-seconds", type=float, default=0.0,
                   help="time budget: stop with no verdict (exit 3) once the search has "
                        "run this long, s (default: no budget)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="with --all-mutations: print every counterexample")
    p.set_defaults(fn=cmd_check)

    p = _parser(sub, "manifest", "compare state counts with the recorded manifest")
    p.add_argument("--update", action="store_true",
                   help="rewrite the manifest from the current tables")
    p.set_defaults(fn=cmd_manifest)

    p = _parser(sub, "run", "run the control plane as real processes (CPU/gloo default)")
    p.add_argument("--mesh", type=int, default=3, help="mesh ranks including the leader")
    p.add_argument("--chunks", type=int, default=10, help="INFER chunks rank0 builds")
    p.add_argument("--depth", type=int, default=None,
                   help="sets D_in = D_out = DEPTH (default: --d-in / --d-out)")
    p.add_argument("--d-in", type=int, default=None,
                   help="envelopes in flight (count) (default: 2)")
    p.add_argument("--d-out", type=int, default=None,
                   help="results awaiting decode (count) (default: 2)")
    p.add_argument("--hard-cut-at", type=int, default=None,
                   help="one hard cut before this chunk index (same as --cut-at K; default: none)")
    p.add_argument("--cut-at", default="", help="hard cuts before these chunk indices, "
                   "e.g. 3,7,7 (a repeat: back to back; CHUNKS: while SHUTDOWN drains; default: none)")
    p.add_argument("--cut-every", type=int, default=None,
                   help="a hard cut before every multiple of N chunks (default: none)")
    p.add_argument("--cut-random", type=float, default=None,
                   help="before each chunk, cut while a coin of this probability comes up "
                        "(default: none)")
    p.add_argument("--cut-seed", type=int, default=0, help="seed of --cut-random")
    p.add_argument("--cut-reason", default="schedule",
                   choices=("schedule", "prompt_change", "reset"),
                   help="reason recorded for the scheduled cuts")
    p.add_argument("--cut-control", type=int, default=0,
                   help="cuts `lockstep cut RUN_DIR` may add while the run goes, count")
    p.add_argument("--regime", choices=("R1", "R0a", "R0"), default="R1",
                   help="recompute regime")
    p.add_argument("--steps", type=int, default=2, help="num_denoise_steps")
    p.add_argument("--cond-flag-all", action="store_true",
                   help="a feature flag on every rank that adds one mesh collective after "
                        "Phase B (it is in the parity digest; the cond_flag fault makes one "
                        "rank differ)")
    p.add_argument("--backend", default="gloo", choices=("gloo", "nccl", "cpu:gloo,cuda:nccl"),
                   help="torch.distributed backend")
    p.add_argument("--device", default="cpu",
                   help="where the workload's tensors live: cpu, or cuda with "
                        "--backend cpu:gloo,cuda:nccl or nccl")
    p.add_argument("--rank0-device", default="",
                   help="rank0's device where it differs from --device, e.g. cpu when "
                        "rank0 would share the mesh's one GPU (default: --device)")
    p.add_argument("--cuda-window", type=int, default=16,
                   help="the workload's CUDA collectives the host may leave in flight "
                        "on the stream before it completes the oldest, count (0: each "
                        "is completed before the workload goes on)")
    p.add_argument("--stage-a-ms", type=float, default=0.0,
                   help="synthetic Phase A cost per chunk, ms")
    p.add_argument("--stage-b-ms", type=float, default=0.0,
                   help="synthetic Phase B cost per generator call, ms")
    p.add_argument("--stage-c-ms", type=float, default=0.0,
                   help="synthetic Phase C (decode) cost per chunk, ms")
    from lockstep.model.config import INJECTABLE
    p.add_argument("--fault", default="", help="fault-injection switch NAME@CHUNK, e.g. "
                   f"leader_reject@3; NAME one of {', '.join(INJECTABLE)} (default: none)")
    p.add_argument("--heartbeat-ms", type=float, default=None,
                   help="rank0 sends a NOOP heartbeat after this long idle, ms "
                        "(default: no heartbeats)")
    p.add_argument("--noops", type=int, default=None,
                   help="heartbeats the model allows, count (default: 4 with "
                        "--heartbeat-ms, else 0)")
    p.add_argument("--op-deadline-s", type=float, default=30.0,
                   help="per-op deadline: no progress for this long is a crash, s")
    p.add_argument("--pg-timeout-s", type=float, default=60.0,
                   help="backend timeout of every process group, s")
    p.add_argument("--lost-after-s", type=float, default=1.0,
                   help="a peer whose heartbeat is silent this long is lost, s")
    p.add_argument("--deadline-s", type=float, default=120.0,
                   help="hard deadline for the whole run (the launcher kills the rest), s")
    p.add_argument("--workload", default="mlp",
                   help="what the ranks compute: mlp (the demo MLP), dit (the causal DiT "
                        "of runtime/dit.py) or a class of your own, package.module:Class, "
                        "imported from this directory and PYTHONPATH (docs/plugin.md)")
    p.add_argument("--workload-args", default="{}", metavar="JSON",
                   help="a JSON object your workload class gets as ctx.args")
    p.add_argument("--out", default="runs/latest", help="run directory for the traces")
    add_segment_args(p)
    p.set_defaults(fn=cmd_run)

    p = _parser(sub, "cut", "ask a running `lockstep run` for a hard cut (its control "
                "interface: RUN_DIR/control/)")
    p.add_argument("run_dir", help="the run's directory (--out of lockstep run)")
    p.add_argument("--reason", default="prompt_change", choices=("prompt_change", "reset"),
                   help="why the stream is cut (recorded in rank0's trace)")
    p.add_argument("--wait-s", type=float, default=5.0,
                   help="wait this long for rank0 to take the request, s")
    p.set_defaults(fn=cmd_cut)

    p = _parser(sub, "breakit", "every failure mode as a real multi-process job")
    p.add_argument("--backend", default="gloo", choices=("gloo", "nccl"),
                   help="torch.distributed backend")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the stock torch.distributed baseline runs")
    p.add_argument("--case", action="append", default=[],
                   help="run only this case, repeatable (default: every case)")
    p.add_argument("--out", default="runs/breakit", help="directory for the runs")
    p.set_defaults(fn=cmd_breakit)

    p = _parser(sub, "demo", "model check, gloo run, conformance, diagrams, report")
    p.add_argument("--out", default="out/demo", help="output directory")
    p.add_argument("--chunks", type=int, default=24, help="chunks of the gloo run")
    p.add_argument("--mesh", type=int, default=3, help="mesh ranks of the gloo run")
    p.set_defaults(fn=cmd_demo)

    p = _parser(sub, "render", "state diagrams per role and counterexample charts")
    _add_config_args(p)
    p.add_argument("--mutation", default="",
                   help="draw the threads this mutation changes and its counterexample "
                        "(default: every diagram of the shipped protocol)")
    p.add_argument("--out", default="docs/diagrams", help="output directory")
    p.set_defaults(fn=cmd_render)

    p = _parser(sub, "export", "export the tables as a Promela model for SPIN")
    _add_config_args(p)
    p.add_argument("--promela", action="store_true", default=True,
                   help="Promela (the only format)")
    p.add_argument("--mutation", default="", help="export a named broken variant "
                   "(default: the shipped protocol)")
    p.add_argument("--fault-budget", choices=("exact", "upto"), default="upto",
                   help="crash budget: exactly --faults crashes, or up to --faults")
    p.add_argument("--out", default="-", help="output file, - for stdout")
    p.set_defaults(fn=cmd_export)

    p = _parser(sub, "crosscheck", "SPIN and lockstep on the same configurations "
                "(options of python -m lockstep.model.crosscheck follow)")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options for the cross-check")
    p.set_defaults(fn=cmd_crosscheck)

    p = _parser(sub, "prove", "z3: contract, guard and group-rule proofs")
    p.add_argument("--mutation", default="", help="prove against a named broken variant "
                   "(default: the shipped protocol)")
    p.add_argument("--json", action="store_true", help="print the obligations as JSON")
    p.set_defaults(fn=cmd_prove)

    p = _parser(sub, "docs", "regenerate the generated docs from the tables and contract")
    p.add_argument("--check", action="store_true",
                   help="fail (1) if any document is stale or missing")
    p.add_argument("--out", default=None,
                   help="docs directory (default: docs/ of the checkout lockstep runs from, "
                        "else ./docs)")
    p.set_defaults(fn=cmd_docs)

    p = _parser(sub, "accel", "compile the checker's and replayer's driver modules with "
                "Cython (optional; lockstep/accel.py), or say which run compiled")
    p.add_argument("what", nargs="?", choices=("status", "build"), default="status",
                   help="build: compile what has no build of its current source; status: "
                        "say which modules run compiled")
    p.add_argument("--jobs", type=int, default=0,
                   help="parallel compiles, count (0: every core)")
    p.set_defaults(fn=cmd_accel)

    p = _parser(sub, "conform", "replay a run's traces through the model")
    p.add_argument("run_dir", help="run directory (run.json + rank*.jsonl)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--reference", default="", help="also compare outputs and state with a "
                   "reference stream written by `lockstep equivalence` (default: none)")
    p.add_argument("--last", type=int, default=0, help="check only each rank's newest K "
                   "trace segments, a suffix replayed from their checkpoints (default: all)")
    p.add_argument("--suffixes", action="store_true", help="check the retained run and "
                   "then every suffix of it, one line each")
    p.set_defaults(fn=cmd_conform)

    p = _parser(sub, "equivalence", "the DiT stream without PP/TP vs under lockstep at each "
                "mesh size, chunk by chunk (digests, state, decoded output)")
    p.add_argument("--mesh", type=int, nargs="+", default=[1, 2, 3, 4],
                   help="mesh sizes to run (ranks incl. the leader)")
    p.add_argument("--regime", nargs="+", default=["R1", "R0a"], choices=("R1", "R0a", "R0"),
                   help="recompute regimes to run")
    p.add_argument("--chunks", type=int, default=6, help="chunks per stream")
    p.add_argument("--steps", type=int, default=2, help="num_denoise_steps")
    p.add_argument("--hard-cut-at", type=int, default=3,
                   help="chunk index of the stream's hard cut")
    p.add_argument("--drift", default="", choices=("", "skip_kv_reset", "stale_start_frame",
                                                     "wrong_anchor"),
                   help="state-drift switch; success = every run caught (default: none)")
    p.add_argument("--drift-rank", type=int, default=2, help="global rank the drift hits")
    p.add_argument("--drift-at", type=int, default=4, help="chunk the drift fires at")
    p.add_argument("--deadline-s", type=float, default=60.0,
                   help="hard deadline per run, s")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--out", default="runs/equivalence", help="directory for the runs")
    p.set_defaults(fn=cmd_equivalence)

    p = _parser(sub, "coverage", "which shipped rows the runs' traces exercised, per role "
                "and thread")
    p.add_argument("run_dirs", nargs="+", help="run directories (run.json + rank*.jsonl)")
    p.set_defaults(fn=cmd_coverage)

    p = _parser(sub, "overlap", "overlap report, Perfetto timeline and plot")
    p.add_argument("run_dir", help="run directory (run.json + rank*.jsonl)")
    p.add_argument("--out", default="", help="output directory (default: RUN_DIR)")
    p.set_defaults(fn=cmd_overlap)
    return ap


_PATH_ERRNOS = {errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.ENOENT, errno.EACCES,
                errno.EROFS}


def stoppable(prog: str, fn, *args) -> int:
    """``fn(*args)``, where SIGINT / SIGTERM / SIGHUP end it with one line on stderr and
    exit code 128 + N (runtime/launch.py: a run going has its ranks killed and recorded)."""
    from lockstep.runtime.launch import Interrupted, stop_signals_raise
    try:
        with stop_signals_raise():
            return fn(*args)
    except Interrupted as e:
        line = f"{prog}: stopped by {e.name}"
        if e.run_dir is not None:
            line += (f": killed ranks {e.killed}" if e.killed else ": no rank had started") \
                + f" of the run in {e.run_dir}"
            # a temporary run directory (the bench's) is gone by now: claim no record
            if (Path(e.run_dir) / "launch.json").is_file():
                line += " (recorded in its launch.json)"
        print(line, file=sys.stderr)
        return e.exit_code


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return stoppable(f"lockstep {a.cmd}", a.fn, a)
    except ValueError as e:
        print(f"lockstep {a.cmd}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # `lockstep conform RUN | head`: the reader left; no traceback, and no second
        # one when the interpreter flushes stdout at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_PIPE
    except OSError as e:
        # a path the user gave that cannot be written or read (--out naming a file, a
        # missing or read-only directory): one line naming it, not a traceback
        if e.errno not in _PATH_ERRNOS or e.filename is None:
            raise
        print(f"lockstep {a.cmd}: {e.filename}: {e.strerror}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
