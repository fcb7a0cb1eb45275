"""Release causes: what the abort flag holds, and how every rank's one exit line names the
root cause and its own release path. Pure Python (no torch): the runtime writes causes,
the conformance checker reads them.

The cause (the abort flag's value) is canonical JSON (sorted keys, no spaces, ASCII; never
pickle) of one object::

    {"kind": K, "rank": R, "role": ROLE, "call_id": C, "chunk_index": I,
     "cache_epoch": E, "group": G, "detail": "one line"}

``kind`` is one of ``KINDS``; ``rank``/``role`` are the ORIGIN (the rank that failed, was
killed or went silent), not the rank that wrote the flag; ids are ``"-"`` when unknown.
The flag is first-cause-wins (``compare_set("", cause)``): the first writer is the root
cause and every later writer reads it back instead. A rank records its own failure (the
cause, not yet the flag) as soon as one of its threads is committed to it
(``committed_exits``), not only at its exit row: its way out may wait on peers (the
leader's ERROR result to rank0), longer than a peer that exits on its terminal message
waits for the cause (the echo rule below).

Who writes which kind:
  error           a rank's own failure: an error exit from a table row, or an uncaught
                  exception that is not an echo (below)
  table_refused   a rank's table refused an op (TableViolation / WrongGroup / a refused
                  transport check, or an ``abort`` exit row)
  deadline        a per-op deadline fired in this rank (a live peer that never answered)
  killed          the embedded launcher reaped a rank killed by a signal (kill -9, OOM)
  heartbeat_lost  a watchdog saw a peer's heartbeat stall with no clean-exit mark; names
                  the SILENT rank (the only cause under torchrun for a kill -9)
  collective_mismatch
                  a watchdog saw two members of a group under different names at one
                  number of the group's collectives, one waiting there (an extra or a
                  missing collective on one rank: runtime/sidechannel.py
                  collective_mismatch); names the odd one out (alone in its collective
                  there, every other member in one other: three members or more; with
                  two, or a tie, the one member whose generator call issued more, or
                  ended with fewer, collectives than each of its earlier calls with that
                  index), else the rank whose watchdog saw it; a failure outside that rank's table,
                  like a deadline (the detail names every side)
  duplicate_rank  a second process started with a RANK another one holds (a launch
                  script's copy-paste error); names that rank: both of its processes
                  exit with an error, every other rank is released

Echo rule: a rank whose own failure is an ECHO of a peer's disappearance (gloo "Connection
closed / reset by peer", a broken pipe, a peer's terminal ERROR message) does not claim the
root cause. It waits up to ``echo_grace_s`` (``lost_after_s + 0.1`` s, two heartbeats:
long enough for the heartbeat path to name a silent peer even where no launcher records
kills) for the flag to be set and exits naming that cause, ``via=echo``. Only if the grace
passes with the flag still clear does it set the flag itself (kind ``error``, detail
prefixed ``echo:``), so a release never waits on anything unbounded.

Exit line (one per rank, on stderr)::

    lockstep: rank=R role=ROLE [ids] exit=KIND via=VIA root=RANK/ROLE/KIND reason=TEXT

``via`` is this rank's own release path (``VIAS``); ``root`` names the root cause;
``reason`` is the cause's text, then `` | own: ...`` with this rank's own error when it
differs from the cause.
"""
from __future__ import annotations

import json
import re

from .tracefmt import loads

KINDS = ("error", "table_refused", "deadline", "killed", "heartbeat_lost",
         "collective_mismatch", "duplicate_rank")

# A rank's own release path, as written in its exit line:
VIAS = (
    "own",               # this rank is the root cause (it set the flag)
    "abort_flag",        # its watchdog read the flag set by another rank or the launcher
    "heartbeat",         # its watchdog saw the silent peer and set the flag naming it
    "echo",              # its own error was an echo; it read the cause after <= grace
    "terminal_message",  # a table exit on a peer's terminal (ERROR) message
    "ok",                # a clean exit
    "store_lost",        # the side channel itself is gone (never a normal path)
)

# The exit kinds an exit line may name (``exit=KIND``) and the process exit status each
# leaves with (runtime/worker_main.py EXIT_*): a table exit with no error, an error exit
# (table or uncaught), a release by the watchdog or the abort flag.
EXIT_CODES = {"ok": 0, "error": 1, "released": 3}

# Exit rows (by label) whose exit is a peer's terminal message arriving: echoes.
ECHO_EXIT_LABELS = frozenset({"exit_leader_error", "exit_rank0_failed", "exit_on_error"})

_ECHO_RE = re.compile(r"Connection closed by peer|Connection reset by peer|Read error|"
                      r"Broken pipe|Socket closed|ECONNRESET|EPIPE|Connection refused|"
                      r"Connection was likely closed", re.I)
_FIELDS = ("call_id", "chunk_index", "cache_epoch", "group")


def committed_exits(thread_table: dict) -> dict:
    """The states of one thread's table (``{state: rows}``) from which every path ends in
    the same own failure (rows that stay in the state aside): ``{state: (how, reason)}``
    of that Exit row, for ``how`` in
    error / abort and a label that is not an echo (``ECHO_EXIT_LABELS``). A process whose
    thread enters such a state is the root cause from then on, whatever its remaining
    rows wait for (the leader's ``exit_rejected`` joins its comms thread, which first
    sends rank0 the ERROR result): the runtime records the cause there, so a peer that
    exits on this process's terminal message (an echo) finds it at once instead of
    racing the rest of this process's way out."""
    from .ops import Exit
    out: dict = {}
    changed = True
    while changed:
        changed = False
        for state, rows in thread_table.items():
            if state in out or not rows:
                continue
            ends = set()
            for r in rows:
                if isinstance(r.op, Exit):
                    own = r.op.how in ("error", "abort") and r.label not in ECHO_EXIT_LABELS
                    ends.add((r.op.how, r.op.reason) if own else None)
                elif r.dst != state:    # a row that stays (rank0 dropping results while
                    ends.add(out.get(r.dst))    # failing) leaves no other way out
            if len(ends) == 1 and None not in ends:
                out[state] = ends.pop()
                changed = True
    return out


def own_kind(how: str) -> str:
    """The cause kind of an own failure by its Exit row's ``how``."""
    return "table_refused" if how == "abort" else "error"


def started_twice(c: dict | None, rank: int) -> bool:
    """A ``duplicate_rank`` cause naming ``rank``: a process of that RANK is one of the two
    that hold it, and fails (exit error) whatever path read the cause; it was not released
    by someone else's fault."""
    return c is not None and c.get("kind") == "duplicate_rank" and c.get("rank") == rank


def role_of(rank: int) -> str:
    """The lockstep role convention: rank 0, then the mesh leader, then workers."""
    return "rank0" if rank == 0 else ("leader" if rank == 1 else "worker")


def cause(kind: str, rank: int, role: str, detail: str, **ids) -> dict:
    if kind not in KINDS:
        raise ValueError(f"cause kind {kind!r} not in {KINDS}")
    c = {"kind": kind, "rank": int(rank), "role": str(role),
         "detail": " ".join(str(detail).split())[:400]}
    for f in _FIELDS:
        v = ids.get(f, "-")
        c[f] = "-" if v is None else v
    return c


def encode(c: dict) -> str:
    return json.dumps(c, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def decode(raw) -> dict | None:
    """The cause in a flag value (bytes or str); None if the flag is clear."""
    if isinstance(raw, bytes):
        raw = raw.decode(errors="replace")
    if not raw:
        return None
    try:
        c = loads(raw)
    except ValueError:
        c = None
    if not isinstance(c, dict) or c.get("kind") not in KINDS:
        return cause("error", -1, "?", f"unstructured flag value: {raw}")
    return c


def ids_from_ctx(ctx: str) -> dict:
    """call_id / chunk_index / cache_epoch / group from an interpreter context string."""
    out = {}
    for f in _FIELDS:
        m = re.search(rf"\b{f}=(\S+)", ctx)
        if m:
            v = m.group(1)
            out[f] = int(v) if re.fullmatch(r"-?\d+", v) else v
    return out


def tag(c: dict) -> str:
    """``RANK/ROLE/KIND``: what the ``root=`` field of an exit line holds."""
    return f"{c['rank']}/{c['role']}/{c['kind']}"


def text(c: dict) -> str:
    ids = " ".join(f"{f}={c.get(f, '-')}" for f in _FIELDS)
    return f"root cause rank={c['rank']} role={c['role']} kind={c['kind']} {ids}: " \
           f"{c['detail']}"


def is_echo(message: str) -> bool:
    """Is this error message an echo of a peer's disappearance (closed/reset pair)?"""
    return bool(_ECHO_RE.search(message or ""))


def parse_line(line: str) -> dict:
    """``{"exit", "via", "root"}`` of an exit line (missing fields omitted)."""
    out = {}
    for f in ("exit", "via", "root"):
        m = re.search(rf" {f}=(\S+)", line or "")
        if m:
            out[f] = m.group(1)
    return out
