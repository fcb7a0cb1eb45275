"""Communication operations as data, and the row type of a transition table.

A table row says *what* a role may do from a control state; it never does it. The
explorer, the runtime interpreter and the trace replayer are three drivers of the same
rows (STYLE.md: protocol code does no I/O). Everything here is a plain immutable value
so that tables can be compared, rendered, exported to Promela and hashed.

Addressing: point-to-point peers are named by role (`"rank0"`, `"leader"`); collective
roots are *group* ranks, as in `torch.distributed.broadcast(group_src=...)`, because
mixing group and global ranks is a classic wrong-root bug (PROTOCOL.md, Topology).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

# Process groups. world_pg holds every rank; mesh_pg holds global ranks 1..N.
WORLD = "world_pg"
MESH = "mesh_pg"

# Message kinds on the wire / in a collective. A header and its payload are separate
# messages so that "header sent, payload never comes" (FM-04) is expressible.
ENV_HDR = "env_hdr"
ENV_PAY = "env_pay"
RES_HDR = "res_hdr"
RES_PAY = "res_pay"
PARITY = "parity"      # startup parity handshake contribution
COUNTS = "counts"      # planned generator-call count, all_gather'd before Phase B
GEN = "gen"            # a TP collective inside one generator call
COND = "cond"          # a collective issued only behind a per-rank flag (FM-03)


class Send(NamedTuple):
    """Point-to-point send to a role. Blocks until matched under rendezvous p2p."""
    peer: str
    kind: str


class Recv(NamedTuple):
    """Point-to-point receive from a role, expecting one of `kinds`."""
    peer: str
    kinds: tuple


class Coll(NamedTuple):
    """A collective: completes only when every member of `group` entered the same
    (op, group, root, kind) at the same sequence number."""
    op: str            # "broadcast" | "all_reduce" | "all_gather"
    group: str
    root: Optional[int]  # group rank of the root (broadcast only)
    kind: str


class Local(NamedTuple):
    """Computation or bookkeeping with no communication (Phase A/B/C, validation)."""
    what: str


class Exit(NamedTuple):
    """Leave the protocol.

    how:
      "ok"         clean exit (marks itself clean: the watchdog does not fire)
      "error"      exit with a one-line reason; peers must already be released by a
                   terminal message, else the watchdog notices the unclean exit
      "abort"      set the run's abort flag, then exit: releases peers blocked in a
                   collective, which no message can reach
      "vanish"     leave as if clean without telling anyone (a bug; mutations only)
      "thread_die" only this thread ends, the process lives on (a Python thread
                   killed by an exception; mutations only)
    """
    how: str
    reason: str


Op = object  # one of Send, Recv, Coll, Local, Exit


class Row(NamedTuple):
    """One transition of a role's table: `src --label[guard] / op; update--> dst`.

    guard(v, cfg) -> bool        over the process's local variables, before the op
    make(v, cfg) -> value        what this role contributes (message sent, value reduced)
    accept(v, cfg, msg) -> bool  for receiving rows: which row handles the message
    update(v, cfg, msg) -> v'    new local variables (msg is None for local rows)
    tags                         what properties observe ('emit', 'commit', ...)
    choice                       "" (the protocol takes the row whenever its guard holds),
                                 "env" (the environment chooses when: a hard cut, a
                                 heartbeat) or "fault" (an injected fault fires it)
    effect                       the real work the row stands for, by name ("phase_a",
                                 "phase_c", "validate", ...; for a fault row the
                                 injectable fault it realises, model.config.INJECTABLE):
                                 a driver maps effects to its workload and never looks
                                 at the label
    """
    thread: str
    src: str
    label: str
    op: Op
    dst: str
    guard: Optional[Callable] = None
    make: Optional[Callable] = None
    accept: Optional[Callable] = None
    update: Optional[Callable] = None
    tags: frozenset = frozenset()
    why: str = ""
    choice: str = ""
    effect: str = ""


def op_text(op) -> str:
    """One-line rendering used in counterexamples, diagrams and runtime errors."""
    if isinstance(op, Send):
        return f"send({op.peer}, {op.kind})"
    if isinstance(op, Recv):
        return f"recv({op.peer}, {'|'.join(op.kinds)})"
    if isinstance(op, Coll):
        root = f", root={op.root}" if op.root is not None else ""
        return f"{op.op}({op.group}{root}, {op.kind})"
    if isinstance(op, Exit):
        return f"exit({op.how}: {op.reason})"
    if isinstance(op, Local):
        return op.what
    return repr(op)
