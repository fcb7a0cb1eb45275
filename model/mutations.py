"""Every failure mode of PROTOCOL.md as a named edit of the shipped tables.

A mutation is the protocol as someone might have written it: the checker must find a
counterexample for each, with the verdict its failure mode predicts, and find none for
the shipped tables. A mutation may also fix the configuration it needs to be
observable (a hard cut for the epoch filter, rendezvous p2p for the send/send deadlock,
an injected runtime fault for the paths that handle one).

Edits address rows by (thread, src, label), never by position, so a change to an
unrelated row does not silently retarget a mutation. An edit that finds nothing to
change raises: a mutation that no longer mutates is a defect, not a pass.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from . import guards as g
from .ops import ENV_HDR, GEN, MESH, WORLD, Coll, Exit, Local, Row, Send
from .semantics import Model
from .tables import Tables, leader_comms_rows, rank0_comms_rows, shipped_rows


@dataclass(frozen=True)
class Mutation:
    name: str
    failure_mode: str
    expected: str                 # the verdict the failure mode predicts
    summary: str
    edit: Callable                # edit(rows: dict, cfg) -> rows
    config: dict = field(default_factory=dict)   # what the mutation needs to show
    targets_one_rank: bool = False


def _replace(rows, pred, fn, what):
    out, hit = [], False
    for r in rows:
        if pred(r):
            hit = True
            r = fn(r)
            if r is None:
                continue
        out.append(r)
    if not hit:
        raise LookupError(f"mutation edit found no row: {what}")
    return out


def _label(*labels):
    return lambda r: r.label in labels


def _target_role(cfg) -> str:
    return "worker" if cfg.mesh >= 2 else "leader"


def _target_rows(rows, cfg, fn):
    role = _target_role(cfg)
    rows = dict(rows)
    rows[role + "*"] = fn(list(rows[role]))
    return rows


# ------------------------------------------------------------------ the edits

def phase_b_on_world(rows, cfg):
    return _target_rows(rows, cfg, lambda rs: _replace(
        rs, _label("generator_call", "last_generator_call"),
        lambda r: r._replace(op=r.op._replace(group=WORLD)), "generator_call"))


def leader_throw_no_terminal(rows, cfg):
    rows = dict(rows)
    rows["leader"] = _replace(
        rows["leader"], _label("validation_raises"),
        lambda r: r._replace(op=Exit("vanish", "validation raised; caught and returned"),
                             dst="exit"), "validation_raises")
    return rows


def header_before_preflight(rows, cfg):
    rows = dict(rows)
    r0 = _replace(rows["rank0"], _label("preflight_fails"), lambda r: None,
                  "preflight_fails")
    r0 = _replace(r0, _label("build_envelope"),
                  lambda r: r._replace(guard=g.can_build), "build_envelope")
    late = []
    for r in r0:
        if r.label == "send_envelope_payload":
            late.append(r._replace(guard=g.late_preflight_ok))
            late.append(Row("comms", r.src, "late_preflight_raises", Exit(
                "thread_die", "serialisation raised after the header"), "dead",
                guard=g.late_preflight_raises,
                why="the exception ends the comms thread; the process lives on"))
        else:
            late.append(r)
    rows["rank0"] = late
    return rows


def _skip_count_check(rows, start):
    def edit(rs):
        rs = _replace(rs, _label("counts_differ"), lambda r: None, "counts_differ")
        return _replace(rs, _label("counts_agree"), lambda r: Row(
            r.thread, r.src, "skip_count_check", Local("phase_b_plan"), "gen",
            update=start), "counts_agree")
    rows = dict(rows)
    for role in ("leader", "worker"):
        rows[role] = edit(rows[role])
    return rows


def no_count_check(rows, cfg):
    return _skip_count_check(rows, g.start_phase_b_own)


def no_epoch_filter(rows, cfg):
    rows = dict(rows)
    r0 = _replace(rows["rank0"], _label("drop_stale_result"), lambda r: None,
                  "drop_stale_result")
    rows["rank0"] = _replace(r0, _label("decode_result"),
                             lambda r: r._replace(guard=g.has_result), "decode_result")
    return rows


def no_parity_handshake(rows, cfg):
    rows = dict(rows)
    for role in ("rank0", "leader", "worker"):
        rows[role] = _replace(rows[role], _label("parity_ok", "parity_mismatch",
                                                 "exit_parity"),
                              lambda r: None, "handshake")
    return rows


def blocking_send_then_recv(rows, cfg):
    """Both comms threads send with a blocking send and post no receive meanwhile. One
    side alone is not enough to deadlock: the other side's posted receive takes the
    send (with the leader's comms thread, rank0's blocking send alone is clean)."""
    rows = dict(rows)
    for role, rebuild in (("rank0", rank0_comms_rows), ("leader", leader_comms_rows)):
        comms = {(r.src, r.label, r.dst) for r in rebuild()}
        rows[role] = [r for r in rows[role] if (r.src, r.label, r.dst) not in comms] \
            + rebuild(blocking_send=True)
    return rows


def second_thread_transport(rows, cfg):
    rows = dict(rows)
    rows["rank0"] = _replace(rows["rank0"], _label("queue_noop"), lambda r: Row(
        "main", r.src, "send_noop_directly", Send("leader", ENV_HDR), r.dst,
        guard=g.can_heartbeat, make=g.direct_noop, update=g.spend_noop,
        why="a heartbeat sent from the main thread, bypassing the comms thread"),
        "queue_noop")
    return rows


def broadcast_before_validate(rows, cfg):
    rows = dict(rows)
    lead = _replace(rows["leader"], _label("take_envelope"),
                    lambda r: r._replace(dst="bcast_hdr"), "take_envelope")
    lead = _replace(lead, _label("bcast_envelope_payload"),
                    lambda r: r._replace(dst="validate"), "bcast_envelope_payload")
    lead = _replace(lead, _label("envelope_valid"),
                    lambda r: r._replace(dst="count_check"), "envelope_valid")
    rows["leader"] = lead
    return rows


def rank0_in_mesh_collective(rows, cfg):
    rows = dict(rows)
    r0 = _replace(rows["rank0"], _label("parity_ok"),
                  lambda r: r._replace(dst="mesh_step") if r.thread == "main" else r,
                  "parity_ok")
    r0.append(Row("main", "mesh_step", "join_generator_collective",
                  Coll("all_reduce", MESH, None, GEN), "run", make=g.contribution,
                  why="rank0 believes it is a mesh rank (plan/role mismatch)"))
    rows["rank0"] = r0
    return rows


def no_watchdog(rows, cfg):
    return rows


def chunk_index_reset_on_cut(rows, cfg):
    rows = dict(rows)
    rows["rank0"] = _replace(rows["rank0"], _label("hard_cut"),
                             lambda r: r._replace(update=g.hard_cut_resetting_chunks),
                             "hard_cut")
    return rows


def unbounded_decode_queue(rows, cfg):
    rows = dict(rows)
    rows["rank0"] = _replace(rows["rank0"], _label("queue_result"),
                             lambda r: r._replace(guard=None), "queue_result")
    return rows


def mesh_infers_call_count(rows, cfg):
    return _skip_count_check(rows, g.start_phase_b_inferred)


def drop_results_after_shutdown(rows, cfg):
    rows = dict(rows)
    r0 = _replace(rows["rank0"], _label("recv_result_header", "recv_error_result"),
                  lambda r: r._replace(guard=g.expecting_result_before_terminal),
                  "recv_result_header")
    r0 = _replace(r0, _label("comms_done"),
                  lambda r: r._replace(guard=g.terminal_was_sent), "comms_done")
    # ... and main trusts the comms thread's end: it exits once the decode queue is empty.
    rows["rank0"] = _replace(r0, _label("exit_clean"),
                             lambda r: r._replace(guard=g.decode_queue_empty), "exit_clean")
    return rows


def comms_broadcasts_header(rows, cfg):
    """The leader's comms thread relays the header to the mesh itself, as soon as it
    has it (a hop saved), instead of handing the envelope to main."""
    rows = dict(rows)
    rows["leader"] = _replace(rows["leader"], lambda r: r.label == "queue_envelope",
                              lambda r: r._replace(
                                  op=Coll("broadcast", MESH, 0, ENV_HDR),
                                  make=g.envelope_in, label="bcast_header_from_comms",
                                  why="the comms thread broadcasts on mesh_pg"),
                              "queue_envelope")
    return rows


def error_result_first(rows, cfg):
    """The leader's ERROR result jumps the outbox (rank0 "hears of it at once") and the
    comms thread sends whatever is queued: the results still owed go out after the
    terminal."""
    rows = dict(rows)
    lead = _replace(rows["leader"], _label("queue_error_result"),
                    lambda r: r._replace(update=g.queue_error_result_first),
                    "queue_error_result")
    rows["leader"] = _replace(lead, _label("take_result"),
                              lambda r: r._replace(guard=g.outbox_nonempty), "take_result")
    return rows


def _unbounded(label, what):
    def edit(rows, cfg):
        rows = dict(rows)
        rows["leader"] = _replace(rows["leader"], _label(label),
                                  lambda r: r._replace(guard=None), what)
        return rows
    return edit


unbounded_leader_inbox = _unbounded("queue_envelope", "queue_envelope")
unbounded_leader_outbox = _unbounded("queue_result", "queue_result")


MUTATIONS = {m.name: m for m in [
    Mutation("phase_b_on_world", "PP-FM-WRONG-GROUP", "collective_mismatch",
             "one mesh rank issues its Phase-B all_reduce on world_pg", phase_b_on_world,
             {"mesh": 2}, targets_one_rank=True),
    Mutation("leader_throw_no_terminal", "PP-FM-LEADER-THROW", "stranding",
             "the leader's validation raises and it returns without a terminal action",
             leader_throw_no_terminal, {"inject": frozenset({"leader_reject"})}),
    Mutation("header_before_preflight", "FM-04", "stranding",
             "rank0 sends the header, then serialises; the exception kills the comms "
             "thread after the header", header_before_preflight,
             {"inject": frozenset({"rank0_preflight"})}),
    Mutation("extra_generator_call", "FM-02", "collective_mismatch",
             "one mesh rank runs expected_generator_calls + 1, no count check",
             no_count_check, {"inject": frozenset({"count_mismatch"}), "mesh": 2},
             targets_one_rank=True),
    Mutation("no_epoch_filter", "FM-10", "stale_epoch_decode",
             "rank0 decodes results without checking cache_epoch", no_epoch_filter,
             {"hard_cut": True, "chunks": 2}),
    Mutation("conditional_collective_no_parity", "FM-03", "collective_mismatch",
             "a per-rank flag adds a collective on one rank and there is no parity "
             "handshake", no_parity_handshake,
             {"inject": frozenset({"cond_flag"}), "mesh": 2}, targets_one_rank=True),
    Mutation("blocking_send_then_recv", "overlap deadlock", "deadlock",
             "both comms threads send with a blocking send and post no receive: rank0 "
             "sends envelope k+1 while the leader sends result k (rendezvous p2p)",
             blocking_send_then_recv, {"p2p": "rendezvous", "d_in": 2, "chunks": 2}),
    Mutation("second_thread_transport", "cross-thread interleaving", "framing_error",
             "rank0's main thread sends a heartbeat itself while the comms thread owns "
             "the transport", second_thread_transport, {"noops": 1}),
    Mutation("broadcast_before_validate", "PP-FM-LEADER-THROW", "collective_mismatch",
             "the leader broadcasts the envelope to the mesh before validating it",
             broadcast_before_validate,
             {"inject": frozenset({"leader_reject"}), "mesh": 2}),
    Mutation("rank0_in_mesh_collective", "FM-01", "collective_mismatch",
             "rank0 takes part in a mesh collective (plan/role mismatch)",
             rank0_in_mesh_collective),
    Mutation("no_watchdog", "orphan (kill -9)", "crash_hang",
             "no heartbeat watchdog: a crashed rank leaves its peers blocked",
             no_watchdog, {"faults": 1, "watchdog": False}),
    Mutation("chunk_index_reset_on_cut", "contract drift", "id_monotonic",
             "a hard cut restarts chunk_index at 0", chunk_index_reset_on_cut,
             {"hard_cut": True, "chunks": 2}),
    Mutation("unbounded_decode_queue", "queue bound", "queue_bound",
             "the comms thread appends results to an unbounded decode queue",
             unbounded_decode_queue, {"d_in": 2, "d_out": 1, "chunks": 2}),
    Mutation("mesh_infers_call_count", "FM-02 (plan bit inferred)", "call_count",
             "the mesh derives the generator-call count from its own num_denoise_steps "
             "instead of the envelope's expected_generator_calls, and checks nothing "
             "(R0a)",
             mesh_infers_call_count, {"regime": "R0a"}),
    Mutation("comms_broadcasts_header", "cross-thread group use", "collective_mismatch",
             "the leader's comms thread broadcasts the envelope header on mesh_pg itself "
             "as soon as it has it, while main runs the mesh's collectives",
             comms_broadcasts_header, {"mesh": 2}),
    Mutation("error_result_first", "send after terminal", "send_after_terminal",
             "the leader's ERROR result jumps its outbox: a result still owed goes out "
             "after the terminal, to a rank0 that has left on it (buffered p2p)",
             error_result_first,
             {"inject": frozenset({"leader_reject"}), "p2p": "buffered", "eager": 2,
              "d_in": 2, "chunks": 2, "leader_out": 2}),
    Mutation("unbounded_leader_inbox", "queue bound", "queue_bound",
             "the leader's comms thread appends envelopes to an unbounded inbox",
             unbounded_leader_inbox, {"noops": 1, "d_in": 2, "chunks": 2}),
    Mutation("unbounded_leader_outbox", "queue bound", "queue_bound",
             "the leader's main thread appends results to an unbounded outbox",
             unbounded_leader_outbox, {"d_in": 2, "chunks": 2}),
    Mutation("drop_results_after_shutdown", "drain on SHUTDOWN", "progress",
             "the comms thread stops receiving once SHUTDOWN is sent, dropping results "
             "still in flight", drop_results_after_shutdown,
             {"p2p": "buffered", "eager": 2, "d_in": 2, "chunks": 2}),
]}


def build_tables(cfg) -> dict:
    """role -> rows for `cfg`: the shipped tables, edited by cfg.mutation if any."""
    rows = shipped_rows()
    if not cfg.mutation:
        return rows
    try:
        mut = MUTATIONS[cfg.mutation]
    except KeyError:
        raise ValueError(f"unknown mutation {cfg.mutation!r}; known: "
                         f"{', '.join(MUTATIONS)}") from None
    return mut.edit(rows, cfg)


def mutated_tables(cfg) -> Tables:
    """What a Model for `cfg` runs: the shipped tables, or cfg.mutation's edit, named."""
    mut = MUTATIONS.get(cfg.mutation)
    return Tables(build_tables(cfg), cfg.mutation, bool(mut and mut.targets_one_rank))


def model_for(cfg):
    """The Model of `cfg`, mutated or not: the tooling's one way to build one."""
    return Model(cfg, mutated_tables(cfg))


def mutation_config(base, name: str):
    """`base` with what mutation `name` needs to be observable."""
    mut = MUTATIONS[name]
    kw = dict(mut.config)
    if "mesh" in kw:
        kw["mesh"] = max(kw["mesh"], base.mesh)
    if "inject" in kw:
        kw["inject"] = frozenset(base.inject) | kw["inject"]
    for k in ("chunks", "d_in", "faults", "noops", "eager", "hard_cut"):
        if k in kw:
            kw[k] = max(kw[k], getattr(base, k))
    return base.with_(mutation=name, **kw)
