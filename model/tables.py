"""The transition tables: the single source of truth for every role.

One table per role, as data (`Row`s from model.ops). The explorer explores them, the
runtime interprets them on torch.distributed, the replayer checks traces against them,
and the docs and diagrams are rendered from them.

Roles and threads
  rank0.main    Phase A (build + preflight), Phase C (decode), hard cuts, shutdown.
  rank0.comms   the only thread that touches the transport while it lives. Its control
                state is a pair "S/R": the send side S in {idle, hdr, pay} and the
                receive side R in {idle, pay, put}. Keeping a receive posted while it
                sends (both sides live in one state) is what prevents the send/send
                deadlock under rendezvous p2p (PROTOCOL.md, Overlap).
  leader.main   global rank 1 = mesh group rank 0; after the startup handshake (a
                world_pg all_gather every rank makes on its main thread, before rank0
                can send anything) it touches only mesh_pg: takes envelope k from the
                inbox, validates it, broadcasts it, runs the count
                check and Phase B, and queues result k (or its ERROR) in the outbox.
  leader.comms  the only leader thread that talks to rank0 (every point-to-point
                message on world_pg), over an "S/R" pair like rank0's: the send
                side S in {idle, hdr, pay} sends result k while Phase B k+1 runs, the
                receive side R in {idle, pay, put} keeps the receive of envelope k+1
                posted and completes it while Phase B k runs. Between the two threads
                two bounded queues: the inbox (leader_in envelopes) and the outbox
                (leader_out results). After a SHUTDOWN or ERROR envelope it receives
                nothing more; it ends once main has relayed or queued its terminal and
                every result owed is sent (main's exit rows join it). After the
                leader's own ERROR a header receive may stay posted (a posted receive
                is never withdrawn, so no guard another step changes may close a posted
                op); the thread ends with no frame half received (rank0 is committed
                to a payload after its header), abandoning that header receive (rank0
                leaves on the ERROR). It sends nothing after its ERROR result.
  worker        mesh group ranks 1..N-1.

D_in is the number of envelopes in flight end to end: built by rank0, result not yet
received by rank0's comms thread. The envelopes the leader holds ahead (in its inbox or
being received) count, so D_in = 2 is what lets the leader receive envelope k+1 while
Phase B k runs; with D_in = 1 nothing overlaps. leader_in / leader_out bound how many
of those wait at the leader (queue_bound checks both, like D_in / D_out).

Commitment points (tag "commit"): after such a row the peer is committed to what
follows (a header promises a payload). Everything that can fail happens before them:
rank0's preflight runs in Phase A before the envelope is queued; the leader validates
the whole envelope before its first mesh broadcast.

Designs considered and rejected: a single-thread leader (receive k, broadcast, Phase
B, send result k, only then receive k+1: correct, but the mesh idles while the control
plane moves, 7.6 ms a chunk in issue 13's measurement, so it is not kept even as a
mutation: no property fails); the comms thread relaying the header to the mesh itself
(two leader threads on mesh_pg: mutation `comms_broadcasts_header`); the ERROR result
jumping the outbox (a result owed goes out after the terminal: `error_result_first`);
comms threads doing blocking send-then-receive (deadlocks under rendezvous: mutation
`blocking_send_then_recv`, both sides; one side alone is kept apart by the other's
posted receive); validation after the
mesh broadcast (mutation `broadcast_before_validate`); an abort flag as the only release
(it also works, but leaves the mesh waiting a watchdog period on every rejected
envelope, so terminal messages come first and the abort flag covers what no message can
reach: crashes and ranks blocked inside a collective).
"""
from __future__ import annotations

from typing import NamedTuple

from . import guards as g
from .ops import (COND, COUNTS, ENV_HDR, ENV_PAY, GEN, MESH, PARITY, RES_HDR, RES_PAY,
                  WORLD, Coll, Exit, Local, Recv, Row, Send)

ROLES = ("rank0", "leader", "worker")
THREADS = {"rank0": ("main", "comms"), "leader": ("main", "comms"), "worker": ("main",)}
INITIAL = {"rank0": ("handshake", "idle/idle"), "leader": ("handshake", "idle/idle"),
           "worker": ("handshake",)}
AFTER_HANDSHAKE = {"rank0": "run", "leader": "wait_env", "worker": "wait_hdr"}
FINAL = "done"   # a thread that finished without ending its process


def _handshake(thread: str, after: str) -> list:
    """Startup parity handshake over world_pg: every rank contributes the digest of every
    flag that can add a collective, before the first chunk (break-it test 6)."""
    op = Coll("all_gather", WORLD, None, PARITY)
    return [
        Row(thread, "handshake", "parity_ok", op, after, make=g.parity_key,
            accept=g.parity_agrees, why="every rank runs the same collectives"),
        Row(thread, "handshake", "parity_mismatch", op, "exit",
            make=g.parity_key, accept=g.parity_differs,
            why="a flag differs across ranks: fail before the first chunk"),
    ]


def _exit(thread: str, src: str, label: str, how: str, reason: str, guard=None,
          **kw) -> Row:
    return Row(thread, src, label, Exit(how, reason), "exit", guard=guard, **kw)


# ----------------------------------------------------------------------------- rank0

def rank0_main_rows() -> list:
    rows = _handshake("main", AFTER_HANDSHAKE["rank0"])
    rows.append(_exit("main", "exit", "exit_parity", "error", "parity mismatch"))
    loop = [
        Row("main", "{s}", "build_envelope", Local("phase_a+preflight"), "{s}",
            guard=g.can_build_ok, make=g.new_envelope, update=g.enqueue_envelope,
            tags=frozenset({"phase_a"}), effect="phase_a",
            why="Phase A builds and fully materialises envelope k before it is queued"),
        Row("main", "{s}", "preflight_fails", Local("phase_a+preflight"), "failing",
            guard=g.can_build_preflight_fails, make=g.new_envelope, update=g.fail_preflight,
            tags=frozenset({"fault"}), choice="fault", effect="rank0_preflight",
            why="preflight raised before any header: send an ERROR terminal instead"),
        Row("main", "{s}", "build_bad_envelope", Local("phase_a+preflight"), "{s}",
            guard=g.can_build_bad, make=g.new_bad_envelope, update=g.enqueue_bad_envelope,
            tags=frozenset({"phase_a", "fault"}), choice="fault",
            effect="rank0_bad_envelope",
            why="an envelope preflight let through and the leader's validator refuses"),
        Row("main", "{s}", "hard_cut", Local("hard_cut"), "{s}", guard=g.can_cut,
            update=g.hard_cut, tags=frozenset({"cut"}), choice="env", effect="hard_cut",
            why="prompt change: bump cache_epoch, flush both queues"),
        Row("main", "{s}", "decode_result", Local("phase_c"), "{s}", guard=g.head_current,
            update=g.decode_head, tags=frozenset({"emit"}), effect="phase_c",
            why="Phase C: decode and emit result k"),
        Row("main", "{s}", "drop_stale_result", Local("drop"), "{s}", guard=g.head_stale,
            update=g.drop_head, why="a result of an old cache_epoch is never decoded"),
        Row("main", "{s}", "reject_result", Local("reject"), "failing",
            guard=g.head_rejected, update=g.reject_head,
            why="the result contract check refused it (its verdict) or "
                "observed_generator_calls differs from the plan"),
        Row("main", "{s}", "queue_noop", Local("heartbeat"), "{s}", guard=g.can_heartbeat,
            update=g.queue_noop, choice="env", effect="heartbeat",
            why="NOOP heartbeat through the comms thread (the heartbeat_ms policy)"),
    ]
    for s in ("run",):
        rows += [r._replace(src=s, dst=r.dst.replace("{s}", s)) for r in loop]
    rows.append(Row("main", "run", "queue_shutdown", Local("shutdown"), "drain",
                    guard=g.all_built, update=g.queue_shutdown,
                    why="all chunks built: SHUTDOWN goes out, in-flight work drains"))
    # drain: keep decoding what is in flight, then leave once the comms thread is done.
    for r in loop:
        if r.label in ("decode_result", "drop_stale_result"):
            rows.append(r._replace(src="drain", dst="drain"))
    rows.append(Row("main", "drain", "reject_result_in_drain", Local("reject"), "failing",
                    guard=g.head_rejected, update=g.reject_head_in_drain,
                    why="a refused result after SHUTDOWN was queued: SHUTDOWN releases the "
                        "mesh; rank0 drains and fails"))
    rows.append(Row("main", "drain", "hard_cut_in_drain", Local("hard_cut"), "drain",
                    guard=g.can_cut_in_drain, update=g.hard_cut_in_drain,
                    tags=frozenset({"cut"}), choice="env", effect="hard_cut",
                    why="prompt change while draining: what is still to come is dropped"))
    rows.append(_exit("main", "drain", "exit_clean", "ok", "shutdown complete",
                      guard=g.drained, tags=frozenset({"join_comms", "end"})))
    # failing: the ERROR terminal is queued; drop what still arrives, then fail.
    rows.append(Row("main", "failing", "drop_after_failure", Local("drop"), "failing",
                    guard=g.has_result, update=g.drop_head))
    rows.append(_exit("main", "failing", "exit_failed", "error", "rank0 failed",
                      guard=g.drained, tags=frozenset({"join_comms"})))
    return rows


def pair_rows(thread: str, send: dict, recv: dict, blocking_send: bool = False) -> list:
    """A comms thread's rows over its (send side, receive side) pair "S/R": every send
    row of side S and every receive row of side R is offered in "S/R", so a receive
    stays posted while a send is in flight. A receive row to "exit" ends the process.

    With `blocking_send`, a receive is posted only when nothing is being sent: the
    blocking send-then-receive design the mutations check."""
    rows = []
    for s, srows in send.items():
        for r, rrows in recv.items():
            pc = f"{s}/{r}"
            for row in srows:
                rows.append(row._replace(thread=thread, src=pc, dst=f"{row.dst}/{r}"))
            if blocking_send and s != "idle":
                continue
            for row in rrows:
                dst = "exit" if row.dst == "exit" else f"{s}/{row.dst}"
                rows.append(row._replace(thread=thread, src=pc, dst=dst))
    return rows


def rank0_comms_rows(blocking_send: bool = False) -> list:
    """Rows of rank0's comms thread over its (send side, receive side) pair."""
    send = {
        "idle": [Row("comms", "", "take_envelope", Local("dequeue"), "hdr",
                     guard=g.can_take, update=g.take_envelope)],
        "hdr": [Row("comms", "", "send_envelope_header", Send("leader", ENV_HDR), "pay",
                    guard=g.out_has_payload, make=g.outgoing,
                    tags=frozenset({"commit"}),
                    why="commitment point: the leader now expects the payload"),
                Row("comms", "", "send_header_only", Send("leader", ENV_HDR), "idle",
                    guard=g.out_header_only, make=g.outgoing, update=g.header_only_sent,
                    why="NOOP / SHUTDOWN / ERROR carry no payload")],
        "pay": [Row("comms", "", "send_envelope_payload", Send("leader", ENV_PAY), "idle",
                    make=g.outgoing, update=g.payload_sent)],
    }
    recv = {
        "idle": [Row("comms", "", "recv_result_header", Recv("leader", (RES_HDR,)), "pay",
                     guard=g.expecting_result, accept=g.is_infer,
                     update=g.got_result_header),
                 Row("comms", "", "recv_error_result", Recv("leader", (RES_HDR,)), "exit",
                     guard=g.expecting_result, accept=g.is_error,
                     why="the leader rejected an envelope: rank0 fails")],
        "pay": [Row("comms", "", "recv_result_payload", Recv("leader", (RES_PAY,)), "put",
                    update=g.got_result_payload)],
        "put": [Row("comms", "", "queue_result", Local("enqueue"), "idle",
                    guard=g.decode_room, update=g.put_result,
                    why="bounded decode queue: blocks while D_out results wait")],
    }
    rows = pair_rows("comms", send, recv, blocking_send)
    # After the envelope header (the commitment point) the leader expects the payload:
    # an ERROR received meanwhile does not withdraw it. rank0 sends it, then fails.
    rows = [r._replace(dst="pay/err") if r.label == "recv_error_result"
            and r.src.startswith("pay/") else r for r in rows]
    rows.append(send["pay"][0]._replace(
        thread="comms", src="pay/err", dst="exit",
        why="committed: the payload the leader expects goes out before rank0 fails"))
    rows.append(Row("comms", "idle/idle", "comms_done", Local("stop"), FINAL,
                    guard=g.comms_finished,
                    why="terminal sent and every result received: the thread ends"))
    rows.append(_exit("comms", "exit", "exit_leader_error", "error",
                      "leader rejected an envelope"))
    return rows


# ----------------------------------------------------------------------------- mesh

def phase_b_rows(thread: str, after: str, group: str = MESH) -> list:
    """Phase B: exactly the planned generator calls, each one TP collective."""
    gen = Coll("all_reduce", group, None, GEN)
    done = frozenset({"phase_b_done"})
    return [
        Row(thread, "gen", "generator_call", gen, "gen", guard=g.more_calls,
            make=g.contribution, update=g.call_done),
        Row(thread, "gen", "last_generator_call", gen, after, guard=g.last_call,
            make=g.contribution, update=g.call_done, tags=done),
        Row(thread, "gen", "last_generator_call", gen, "cond",
            guard=g.last_call_then_cond, make=g.contribution, update=g.call_done),
        Row(thread, "cond", "conditional_collective", Coll("all_reduce", MESH, None, COND),
            after, make=g.contribution, tags=done,
            why="only ranks whose flag is set issue it (FM-03)"),
        _exit(thread, "gen", "wrong_group_caught", "abort",
              "Phase-B all_reduce requested on world_pg; the table allows mesh_pg",
              guard=g.wrong_group_requested, tags=frozenset({"fault"}), choice="fault",
              effect="wrong_group",
              why="the collective wrapper refuses before the backend is called; the "
                  "abort flag releases the members already blocked in the collective"),
    ]


def count_check_rows(thread: str, fail_to: str) -> list:
    """All-gather of the planned call count before any generator collective (FM-02)."""
    op = Coll("all_gather", MESH, None, COUNTS)
    return [
        Row(thread, "count_check", "counts_agree", op, "gen", make=g.plan_calls,
            accept=g.counts_agree, update=g.start_phase_b),
        Row(thread, "count_check", "counts_differ", op, fail_to, make=g.plan_calls,
            accept=g.counts_differ,
            why="every member sees the same vector, so all of them stop together"),
    ]


def leader_main_rows() -> list:
    """The leader's main thread: after the startup handshake only mesh_pg. It takes
    envelope k from the inbox, validates it, broadcasts it, runs Phase B and queues
    result k in the outbox."""
    enq = frozenset({"enqueue"})
    rows = _handshake("main", AFTER_HANDSHAKE["leader"])
    rows.append(_exit("main", "exit", "exit_parity", "error", "parity mismatch"))
    rows += [
        Row("main", "wait_env", "take_envelope", Local("dequeue"), "validate",
            guard=g.inbox_has_infer, update=g.take_envelope_in),
        Row("main", "wait_env", "take_header_only", Local("dequeue"), "bcast_hdr",
            guard=g.inbox_has_header_only, update=g.take_envelope_in,
            why="NOOP / SHUTDOWN / ERROR: nothing to validate, relayed to the mesh"),
        Row("main", "validate", "envelope_valid", Local("validate"), "bcast_hdr",
            guard=g.envelope_valid,
            why="the contract validator's verdict (taken when the payload was decoded, "
                "before the first mesh broadcast) is valid"),
        Row("main", "validate", "envelope_invalid", Local("validate"), "bcast_hdr",
            guard=g.envelope_invalid, update=g.reject_envelope,
            why="the validator refused it: tell the mesh (ERROR broadcast) and rank0 "
                "(ERROR result)"),
        Row("main", "validate", "validation_raises", Local("validate"), "bcast_hdr",
            update=g.reject_envelope, tags=frozenset({"fault"}), choice="fault",
            effect="leader_reject", why="break-it 2: the leader fails after receiving, before the broadcast"),
    ]
    bcast = Coll("broadcast", MESH, 0, ENV_HDR)
    rows += [
        Row("main", "bcast_hdr", "bcast_envelope_header", bcast, "bcast_pay",
            guard=g.env_is_infer, make=g.current_envelope, tags=frozenset({"commit"})),
        Row("main", "bcast_hdr", "bcast_noop", bcast, "wait_env", guard=g.env_is_noop,
            make=g.current_envelope),
        Row("main", "bcast_hdr", "bcast_shutdown", bcast, "exit_ok",
            guard=g.env_is_shutdown, make=g.current_envelope, update=g.finish_results),
        Row("main", "bcast_hdr", "bcast_error", bcast, "notify_rank0",
            guard=g.rejected_by_leader, make=g.current_envelope),
        Row("main", "bcast_hdr", "relay_rank0_error", bcast, "exit_rank0_error",
            guard=g.error_from_rank0, make=g.current_envelope, update=g.finish_results),
        Row("main", "bcast_pay", "bcast_envelope_payload", Coll("broadcast", MESH, 0, ENV_PAY),
            "count_check", make=g.current_envelope),
    ]
    rows += count_check_rows("main", "count_fail")
    rows += phase_b_rows("main", "queue_res")
    joined = frozenset({"join_comms"})
    rows += [
        Row("main", "queue_res", "spoil_result", Local("result_fault"), "queue_res",
            guard=g.bad_result_armed, update=g.spoil_result, tags=frozenset({"fault"}),
            choice="fault", effect="leader_bad_result",
            why="a result the leader's preflight let through and rank0's check refuses"),
        Row("main", "queue_res", "queue_result", Local("result_preflight"), "wait_env",
            guard=g.outbox_room, make=g.result, update=g.queue_result, tags=enq,
            effect="result_preflight",
            why="result preflight (encode) before it is queued; the comms thread sends "
                "it while Phase B k+1 runs"),
        Row("main", "notify_rank0", "queue_error_result", Local("result_preflight"),
            "exit_err", guard=g.outbox_room, make=g.error_result, update=g.queue_error_result,
            tags=enq,
            effect="result_preflight", why="release rank0, which waits for this result"),
        Row("main", "count_fail", "queue_error_result", Local("result_preflight"),
            "exit_count", guard=g.outbox_room, make=g.error_result,
            update=g.queue_error_result, tags=enq, effect="result_preflight",
            why="every member saw the counts differ; release rank0 too"),
        _exit("main", "exit_ok", "exit_clean", "ok", "SHUTDOWN relayed", tags=joined),
        _exit("main", "exit_err", "exit_rejected", "error", "envelope rejected",
              tags=joined),
        _exit("main", "exit_count", "exit_count_mismatch", "error",
              "generator call counts differ across the mesh", tags=joined),
        _exit("main", "exit_rank0_error", "exit_rank0_failed", "error",
              "rank0 sent ERROR", tags=joined),
    ]
    return rows


def leader_comms_rows(blocking_send: bool = False) -> list:
    """The leader's comms thread: the only leader thread that talks to rank0. Its
    receive side keeps the receive of envelope k+1 posted while Phase B k runs; its
    send side sends result k while Phase B k+1 runs."""
    send = {
        "idle": [Row("comms", "", "take_result", Local("dequeue"), "hdr",
                     guard=g.can_take_result, update=g.take_result)],
        "hdr": [Row("comms", "", "send_result_header", Send("rank0", RES_HDR), "pay",
                    guard=g.out_is_result, make=g.outgoing_result,
                    tags=frozenset({"commit", "outgoing"}),
                    why="result preflight (encode) already done: the payload follows"),
                Row("comms", "", "send_error_result", Send("rank0", RES_HDR), "idle",
                    guard=g.out_is_error, make=g.outgoing_result,
                    update=g.error_result_sent, tags=frozenset({"outgoing"}),
                    why="the leader's terminal: release rank0, which waits for it")],
        "pay": [Row("comms", "", "send_result_payload", Send("rank0", RES_PAY), "idle",
                    make=g.outgoing_result, update=g.result_sent,
                    tags=frozenset({"outgoing"}))],
    }
    wire = frozenset({"wire_ids"})
    recv = {
        "idle": [Row("comms", "", "recv_envelope_header", Recv("rank0", (ENV_HDR,)), "pay",
                     guard=g.receiving, accept=g.is_infer, update=g.got_envelope_header,
                     tags=wire),
                 Row("comms", "", "recv_header_only", Recv("rank0", (ENV_HDR,)), "put",
                     guard=g.receiving, accept=g.is_header_only,
                     update=g.got_envelope_header, tags=wire,
                     why="NOOP / SHUTDOWN / ERROR carry no payload; after a terminal "
                         "nothing more is received")],
        "pay": [Row("comms", "", "recv_envelope_payload", Recv("rank0", (ENV_PAY,)), "put",
                    update=g.store_envelope_in,
                    why="the payload's metadata completes the envelope (plan bits)")],
        "put": [Row("comms", "", "queue_envelope", Local("enqueue"), "idle",
                    guard=g.inbox_room, update=g.queue_envelope,
                    tags=frozenset({"enqueue"}),
                    why="bounded inbox: blocks while leader_in envelopes wait"),
                Row("comms", "", "drop_envelope", Local("drop"), "idle",
                    guard=g.results_over, update=g.drop_envelope_in,
                    why="main has its terminal: an envelope received now is never "
                        "broadcast (the leader's ERROR goes out next)")],
    }
    rows = pair_rows("comms", send, recv, blocking_send)
    rows.append(Row("comms", "idle/idle", "comms_done", Local("stop"), FINAL,
                    guard=g.leader_comms_finished,
                    why="main's terminal relayed or queued and every result owed sent: "
                        "the thread ends (a header receive still posted is abandoned), "
                        "then main exits"))
    return rows


def leader_rows() -> list:
    return leader_main_rows() + leader_comms_rows()


def worker_rows() -> list:
    rows = _handshake("main", AFTER_HANDSHAKE["worker"])
    rows.append(_exit("main", "exit", "exit_parity", "error", "parity mismatch"))
    bcast = Coll("broadcast", MESH, 0, ENV_HDR)
    rows += [
        Row("main", "wait_hdr", "recv_envelope_header", bcast, "bcast_pay",
            accept=g.msg_is_infer, update=g.store_envelope),
        Row("main", "wait_hdr", "recv_noop", bcast, "wait_hdr", accept=g.msg_is_noop),
        Row("main", "wait_hdr", "recv_shutdown", bcast, "exit_ok",
            accept=g.msg_is_shutdown),
        Row("main", "wait_hdr", "recv_error", bcast, "exit_err", accept=g.msg_is_error),
        Row("main", "bcast_pay", "recv_envelope_payload",
            Coll("broadcast", MESH, 0, ENV_PAY), "count_check", update=g.store_envelope),
    ]
    rows += count_check_rows("main", "exit_count")
    rows += phase_b_rows("main", "wait_hdr")
    rows += [
        _exit("main", "exit_ok", "exit_clean", "ok", "SHUTDOWN received"),
        _exit("main", "exit_err", "exit_on_error", "error", "leader broadcast ERROR"),
        _exit("main", "exit_count", "exit_count_mismatch", "error",
              "generator call counts differ across the mesh"),
    ]
    return rows


def shipped_rows() -> dict:
    """role -> list of rows of the shipped protocol."""
    return {"rank0": rank0_main_rows() + rank0_comms_rows(),
            "leader": leader_rows(), "worker": worker_rows()}


class Tables(NamedTuple):
    """The rows a `Model` runs, handed to it by its caller (the spec never edits them).

    rows: role -> rows; "worker*" / "leader*" are the rows of the one targeted rank when
    an edit changes one rank only. `mutation` names the edit ("" = the shipped tables):
    a Model refuses tables whose name differs from its config's, so a mutated config
    cannot silently run the shipped rows (or the reverse)."""
    rows: dict
    mutation: str = ""
    targets_one_rank: bool = False   # the edit aims at one rank: keep it out of symmetry


def shipped_tables() -> Tables:
    return Tables(shipped_rows())
