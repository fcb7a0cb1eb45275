"""Properties, each reported with a named verdict.

  deadlock             no transition enabled, live ranks blocked sending to each other
  stranding            a blocked op whose partner can never arrive (named: who waits on
                       whom, and why the partner will not come)
  collective_mismatch  members of a group in different collectives, a collective on a
                       group the rank is not in, or one member on another group
  framing_error        a receive gets a message of another kind (header where a payload
                       was promised, two threads interleaving frames)
  queue_bound          rank0's D_in / D_out bounds or the leader's inbox / outbox bounds
                       (leader_in / leader_out) exceeded
  send_after_terminal  the leader sends a message after its terminal (ERROR) result: rank0
                       has left on the terminal, so it is never read
  stale_epoch_decode   a result of an old cache_epoch decoded
  call_count           a mesh rank ran a generator-call count other than the envelope's,
                       or rank0 decoded a result whose observed count is not the plan
  id_monotonic         call_id not strictly increasing, or chunk_index not strictly
                       increasing across INFER
  output_order         an output emitted twice or out of chunk order
  progress             every run ends with each accepted chunk decoded (or a terminal
                       error), and a run with no fault ends cleanly
  crash_hang           after a fault, a survivor is left blocked: only a backend timeout
                       would release it (crash > hang violated)

Transition properties look at row tags (`emit`, `wire_ids`, `phase_b_done`, `enqueue`:
a row that appends to a leader queue, whose bound is checked after it; `outgoing`: a
send that must not follow the sender's terminal), never at
row names, so a renamed row keeps its checks. Termination: every row that loops changes
a strictly increasing counter (call_id, calls_done, sequence numbers) bounded by the
configuration, so the state graph is acyclic and "no enabled transition" is the only
way a run can stop; tests check acyclicity on small configurations with networkx.
"""
from __future__ import annotations

from .guards import ids_valid
from .ops import Coll, Recv, Send, op_text
from .semantics import (CRASHED, DEAD_THREAD, ERROR, FINAL, LIVE, Model, State, Tr,
                        Violation)

VERDICTS = ("deadlock", "stranding", "collective_mismatch", "framing_error",
            "queue_bound", "send_after_terminal", "stale_epoch_decode", "call_count", "id_monotonic",
            "output_order", "progress", "crash_hang")


# The local variables each tag's check reads (check_transition, check_progress_at_exit),
# before or after the row: part of the row's read set for the thread-level
# partial-order reduction (model.footprint). tests/test_footprint.py checks it on
# recording proxies.
TAG_READS = {
    "emit": ("decode_q", "epoch", "last_emitted"),
    "wire_ids": ("seen_call", "seen_chunk"),
    "enqueue": ("inbox", "outbox"),
    "outgoing": ("terminal_sent",),
    "phase_b_done": ("calls_done", "env"),
    "end": ("emitted", "built", "epoch"),
}


def check_transition(m: Model, s: State, tr: Tr, s2: State):
    """Violations observable on one transition (before -> after)."""
    cfg = m.cfg
    for p, t, row in tr.parts:
        tags = row.tags if row is not None else ()
        if not tags:
            continue
        if "emit" in tags:
            v = s.procs[p].v
            head = v.decode_q[0]
            if head.epoch != v.epoch:
                return Violation("stale_epoch_decode",
                                 f"rank0 decodes chunk {head.chunk} of cache_epoch "
                                 f"{head.epoch} while the current epoch is {v.epoch}")
            if head.calls != cfg.calls:
                return Violation("call_count", f"rank0 decodes chunk {head.chunk} with "
                                 f"observed_generator_calls={head.calls}, plan {cfg.calls}")
            if head.chunk <= v.last_emitted:
                return Violation("output_order", f"chunk {head.chunk} emitted after chunk "
                                 f"{v.last_emitted}")
        if "wire_ids" in tags and not ids_valid(s.procs[p].v, cfg, tr.msg):
            v = s.procs[p].v
            return Violation("id_monotonic", f"{m.names[p]} receives call_id="
                             f"{tr.msg.call_id} chunk_index={tr.msg.chunk} after call_id="
                             f"{v.seen_call} chunk_index={v.seen_chunk}")
        if "enqueue" in tags:
            v2 = s2.procs[p].v
            if v2 is not None and len(v2.inbox) > cfg.leader_in:
                return Violation("queue_bound", f"{m.names[p]} inbox holds "
                                 f"{len(v2.inbox)} > leader_in={cfg.leader_in}")
            if v2 is not None and len(v2.outbox) > cfg.leader_out:
                return Violation("queue_bound", f"{m.names[p]} outbox holds "
                                 f"{len(v2.outbox)} > leader_out={cfg.leader_out}")
        if "outgoing" in tags and s.procs[p].v.terminal_sent:
            return Violation("send_after_terminal", f"{m._who(p, t)} sends "
                             f"{row.op.kind} call_id={tr.msg.call_id} after its terminal "
                             f"ERROR result")
        if "phase_b_done" in tags:
            v2 = s2.procs[p].v
            if v2 is not None and v2.calls_done != v2.env.calls:
                return Violation("call_count", f"{m.names[p]} ran {v2.calls_done} "
                                 f"generator calls; the envelope (call_id="
                                 f"{v2.env.call_id}) says expected_generator_calls="
                                 f"{v2.env.calls}")
    return None


def check_state(m: Model, s: State):
    """Invariants of every reachable state. They read rank0's local state only, so the
    explorer judges each distinct rank0 state once (`check_rank0`); the partial-order
    reduction relies on it too (model.reduction)."""
    return check_rank0(m, s.procs[0])


def check_rank0(m: Model, r0):
    """The state invariants, on rank0's process state."""
    if r0.status == LIVE:
        v = r0.v
        if len(v.decode_q) > m.cfg.d_out:
            return Violation("queue_bound", f"decode queue holds {len(v.decode_q)} > "
                             f"D_out={m.cfg.d_out}")
        if v.inflight > m.cfg.d_in:
            return Violation("queue_bound", f"{v.inflight} envelopes in flight > "
                             f"D_in={m.cfg.d_in}")
    return None


def check_terminal(m: Model, s: State):
    """A state with no enabled transition: a clean end, or a hang to be named."""
    live = [p for p, pr in enumerate(s.procs) if pr.status == LIVE]
    if not live:
        return _check_end(m, s)
    waits = blocked_ops(m, s)
    mismatch = _group_mismatch(m, s, waits)
    if mismatch:
        return Violation("collective_mismatch", mismatch)
    gone = [p for p, pr in enumerate(s.procs) if pr.status in (CRASHED, ERROR)]
    if gone:
        who = ", ".join(f"{m.names[p]} ({s.procs[p].status})" for p in gone)
        return Violation("crash_hang", f"after {who}, survivors blocked with no fast "
                         f"release: " + _explain(m, s, waits))
    cycle = _send_cycle(m, s, waits)
    if cycle:
        return Violation("deadlock", cycle)
    return Violation("stranding", _explain(m, s, waits))


def _check_end(m: Model, s: State):
    """Everyone has left. A failure that released every rank is not a hang; whether
    each accepted chunk was emitted is checked at rank0's clean exit."""
    return None


def check_progress_at_exit(m: Model, s: State, tr: Tr):
    """rank0's clean exit must come after every chunk of the final epoch is emitted."""
    for p, t, row in tr.parts:
        if row is not None and "end" in row.tags:
            v = s.procs[p].v
            if v.emitted != v.built:
                return Violation("progress", f"rank0 exits cleanly having emitted "
                                 f"{v.emitted} of the {v.built} chunks built in cache_epoch "
                                 f"{v.epoch}")
    return None


def blocked_ops(m: Model, s: State) -> dict:
    """(proc, thread) -> list of (row, guard_holds) rows it is posted at."""
    out = {}
    for p, pr in enumerate(s.procs):
        if pr.status != LIVE:
            continue
        for t, pc in enumerate(pr.pcs):
            if pc in (FINAL, DEAD_THREAD):
                continue
            rows = m.tables[p][t].get(pc, ())
            posted = [r for r in rows if r.guard is None or r.guard(pr.v, m.cfg)]
            out[(p, t)] = (pc, posted)
    return out


def _group_mismatch(m, s, waits):
    for grp, members in m.members.items():
        here, elsewhere = [], []
        for p in members:
            for t in range(len(s.procs[p].pcs) if s.procs[p].status == LIVE else 0):
                pc, posted = waits.get((p, t), (None, []))
                colls = [r for r in posted if isinstance(r.op, Coll)]
                if colls and colls[0].op.group == grp:
                    here.append((p, t, colls[0]))
                elif colls:
                    elsewhere.append((p, t, colls[0]))
        if here and elsewhere:
            a, b = here[0], elsewhere[0]
            return (f"{m._who(a[0], a[1])} waits in {op_text(a[2].op)} while "
                    f"{m._who(b[0], b[1])}, also a member of {grp}, waits in "
                    f"{op_text(b[2].op)}")
    return None


def _send_cycle(m, s, waits):
    """Two live threads each blocked sending to the other: the ordering deadlock."""
    senders = {}
    for (p, t), (pc, posted) in waits.items():
        sends = [r for r in posted if isinstance(r.op, Send)]
        recvs = [r for r in posted if isinstance(r.op, Recv)]
        if sends and not recvs:
            senders[(p, t)] = (m.index[sends[0].op.peer], sends[0])
    for (p, t), (q, row) in senders.items():
        for (q2, u), (back, row2) in senders.items():
            if q2 == q and back == p:
                return (f"{m._who(p, t)} blocks in {op_text(row.op)} while "
                        f"{m._who(q, u)} blocks in {op_text(row2.op)}: neither has a "
                        f"receive posted (send/send under {m.cfg.p2p} p2p)")
    return None


def _explain(m, s, waits) -> str:
    lines = []
    for (p, t), (pc, posted) in sorted(waits.items()):
        who = m._who(p, t)
        comm = [r for r in posted if isinstance(r.op, (Send, Recv, Coll))]
        if not comm:
            lines.append(f"{who} at {pc} waits locally (no row enabled)")
            continue
        r = comm[0]
        partner = _partner(m, s, p, r)
        lines.append(f"{who} at {pc} blocked in {op_text(r.op)}{partner}")
    return "; ".join(lines)


def _partner(m, s, p, row) -> str:
    op = row.op
    if isinstance(op, (Send, Recv)):
        q = m.index[op.peer]
    elif op.op == "broadcast":
        q = m.members[op.group][op.root]
    else:
        return ""
    if q == p:
        return ""
    pr = s.procs[q]
    if pr.status != LIVE:
        return f" but {m.names[q]} has exited ({pr.status}: {pr.reason})"
    states = "/".join(pr.pcs)
    return f" but {m.names[q]} is at {states}"
