"""Child entry point: ``python -m lockstep.runtime.worker_main --target module:function [--args-file F |
--args-json J]``.

Reads the rank and world size from the environment (``dist_env()``: spawn_local or torchrun),
imports the target and calls ``target(rank, world_size, args)``.

Why it ends with ``os._exit`` on every path: after a comm failure the process may still own
gloo work that never completes (FACTS.md: nothing releases a blocked gloo call), and normal
interpreter shutdown (atexit, process-group destructors, non-daemon threads) can then block
forever; a rank that hangs while exiting is a hang. So stdout/stderr are flushed and the
process leaves with ``os._exit``. Targets must flush their own files (traces are written
line-flushed anyway).

Why stderr gets exactly ONE line on an uncaught exception: the line is the rank's
actionable reason, parsed by tests and the CLI (model/release.py):
``lockstep: rank=R role=ROLE exit=error via=VIA root=RANK/ROLE/KIND reason=...``. The
traceback goes to ``$LOCKSTEP_RUN_DIR/rank{R}.traceback`` (or nowhere if no run dir).
Before exiting, the root cause is settled on the side channel if this process has one
(``sidechannel.abort_active``): the rank's own failure is written to the abort flag
(first-cause-wins), so peers are released in milliseconds; an ECHO of a peer's
disappearance (closed / reset connection) claims nothing and waits a bounded grace for
the real cause. Only one of a process's exit paths writes the line (``claim_exit``).

Exit codes: 0 ok (or the int the target returns), 1 uncaught exception, 3 released by the
watchdog (see sidechannel.py).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
import threading
import traceback

from lockstep.model.release import EXIT_CODES   # pure Python: the exit kinds' statuses

EXIT_OK, EXIT_ERROR, EXIT_RELEASED = (EXIT_CODES[k] for k in ("ok", "error", "released"))

_ROLE = "?"
_RANK: int | None = None
_EXIT_LOCK = threading.Lock()


def claim_exit() -> bool:
    """True for the first of this process's exit paths (watchdog release, error exit,
    table exit) and False for every later one: exactly one exit line per rank."""
    return _EXIT_LOCK.acquire(blocking=False)


def set_role(role: str) -> None:
    """Name this process's role (rank0 / leader / worker) for its exit line."""
    global _ROLE
    _ROLE = role


def get_role() -> str:
    return _ROLE


def backend_text(text: str) -> str:
    """A gloo / c10d message without its source paths (``[/pytorch/...]``, ``[enforce
    fail at ...]``) and its generic advice (". This is typically ..."): the fact only."""
    text = re.sub(r"\[(?:/|enforce fail at )[^\]]*\]\s*", "", str(text))
    return text.split(". This is typically")[0]


def one_line(text: str, limit: int = 400) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def exit_line(exit_kind: str, reason: str, rank: int | None = None, role: str | None = None) -> str:
    """``lockstep: rank=R role=ROLE exit=KIND reason=...`` (one line, no newline)."""
    if rank is None:
        rank = _RANK if _RANK is not None else int(os.environ.get("RANK", "-1"))
    return (f"lockstep: rank={rank} role={role or _ROLE} exit={exit_kind} "
            f"reason={one_line(reason)}")


def cause_line(exit_kind: str, via: str, cause: dict | None, own: str | None = None,
               ctx: str | None = None) -> str:
    """The one exit line naming the root cause and this rank's release path:
    ``lockstep: CTX exit=KIND via=VIA root=RANK/ROLE/KIND reason=ROOT TEXT | own: ...``.
    ``ctx`` defaults to ``rank=R role=ROLE``; without a cause the reason is ``own``."""
    from lockstep.model import release as R
    if ctx is None:
        rank = _RANK if _RANK is not None else int(os.environ.get("RANK", "-1"))
        ctx = f"rank={rank} role={_ROLE}"
    if cause is None:
        return f"lockstep: {ctx} exit={exit_kind} via={via} root=- reason={one_line(own or '', 600)}"
    reason = R.text(cause)
    if own:   # gloo messages carry a source path and advice; keep the fact
        own = backend_text(own)
    if own and via != "own" and own not in reason:
        reason += f" | own: {own}"
    # 900: the root cause's text (up to ~450 with a dead rank's last stderr line) and
    # this rank's own part (where it was: ~250), whole
    return f"lockstep: {ctx} exit={exit_kind} via={via} root={R.tag(cause)} " \
           f"reason={one_line(reason, 900)}"


def classify(e: BaseException) -> tuple[str, bool]:
    """(cause kind, is_echo) of an exception, from the innermost error of its chain."""
    from lockstep.model import release as R
    chain, x = [], e
    while x is not None and len(chain) < 8:
        chain.append(x)
        x = x.__cause__ or x.__context__
    names = {type(x).__name__ for x in chain}
    text = " ".join(str(x) for x in chain)
    if names & {"DuplicateRank"}:
        return "duplicate_rank", False
    if names & {"OpDeadline"}:
        return "deadline", False
    if names & {"TableViolation", "WrongGroup", "TableRefused", "GroupMembershipError"}:
        return "table_refused", False
    return "error", R.is_echo(text)


def write_exit_line(exit_kind: str, reason: str, rank: int | None = None) -> None:
    try:
        sys.stderr.write(exit_line(exit_kind, reason, rank) + "\n")
        sys.stderr.flush()
    except Exception:
        try:
            os.write(2, (exit_line(exit_kind, reason, rank) + "\n").encode())
        except Exception:
            pass


def _flush_and_exit(code: int) -> None:
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except Exception:
            pass
    os._exit(code)


def resolve(target: str):
    mod, _, fn = target.partition(":")
    if not mod or not fn:
        raise ValueError(f"target must be 'module:function', got {target!r}")
    obj = importlib.import_module(mod)
    for part in fn.split("."):
        obj = getattr(obj, part)
    return obj


def main(argv: list[str] | None = None) -> None:
    global _RANK
    ap = argparse.ArgumentParser(prog="lockstep.runtime.worker_main")
    ap.add_argument("--target", required=True, help="module:function")
    ap.add_argument("--args-file")
    ap.add_argument("--args-json")
    ns = ap.parse_args(argv)
    code = EXIT_ERROR
    try:
        from lockstep.runtime.launch import dist_env
        env = dist_env()
        _RANK = env.rank
        if ns.args_file:
            with open(ns.args_file) as f:
                args = json.load(f)
        else:
            args = json.loads(ns.args_json or os.environ.get("LOCKSTEP_ARGS", "{}"))
        ret = resolve(ns.target)(env.rank, env.world_size, args)
        code = ret if isinstance(ret, int) and not isinstance(ret, bool) else EXIT_OK
    except BaseException as e:  # noqa: BLE001 - every failure must end in one line + exit
        if isinstance(e, SystemExit) and isinstance(e.code, int):
            _flush_and_exit(e.code)
        reason = f"{type(e).__name__}: {e}"
        run_dir = os.environ.get("LOCKSTEP_RUN_DIR")
        if run_dir:
            try:
                with open(os.path.join(run_dir, f"rank{_RANK if _RANK is not None else 'X'}"
                                       ".traceback"), "w") as f:
                    traceback.print_exc(file=f)
            except Exception:
                pass
        error_exit(e, reason)
    _flush_and_exit(code)


def error_exit(e: BaseException, reason: str) -> None:
    """Settle the root cause (set the flag, or wait for it if ours is an echo), write the
    one line, leave. A process whose watchdog already claimed the exit just waits for it."""
    if not claim_exit():
        import time
        time.sleep(2.0)
        _flush_and_exit(EXIT_RELEASED)
    from lockstep.model import release as R
    cause, via = None, "own"
    try:
        from lockstep.runtime import sidechannel
        kind, echo = classify(e)
        mine = R.cause(kind, _RANK if _RANK is not None else -1, _ROLE, reason,
                       **R.ids_from_ctx(reason))
        cause, via = sidechannel.abort_active(mine, echo=echo)
        if sidechannel._ACTIVE is not None:   # the cause settled: it reads nothing more
            try:                              # (node._error_exit says why not before)
                sidechannel._ACTIVE.mark_exit()
            except Exception:  # noqa: BLE001
                pass
    except Exception:
        pass
    # our error only echoed the root cause: we were released (unless it names our RANK
    # as started twice: this process is one of the two)
    released = via == "echo" and not R.started_twice(cause, _RANK)
    line = cause_line("released" if released else "error", via, cause, own=reason)
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except Exception:
        pass
    _flush_and_exit(EXIT_RELEASED if released else EXIT_ERROR)


if __name__ == "__main__":
    # Run through the canonical module object, not __main__, so set_role() and friends
    # called by the target (which imports runtime.worker_main) share this module's state.
    from lockstep.runtime import worker_main as _canonical
    _canonical.main()
