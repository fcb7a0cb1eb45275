"""Local variables of each role, and the pure guard / update functions over them.

These functions are the *same code* the runtime calls: the runtime interpreter keeps a
role's local variables in these NamedTuples and asks these guards which row is enabled.
They take `(v, cfg[, msg])` and return a bool or a new NamedTuple; they do no I/O and
hold no state, so the explorer can call them millions of times and the replayer can
trust them.

Message summaries (`Msg`, model/messages.py) carry the ids the protocol reasons about
(action, call_id, chunk_index, cache_epoch, generator calls, init_cache); every one is
built by `messages.message`, the one definition the runtime's codec also frames.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

from .contract import Action
from .messages import Msg, message

INFER, NOOP, SHUTDOWN, ERROR = Action.INFER, Action.NOOP, Action.SHUTDOWN, Action.ERROR


def _quick_replace(cls):
    """Give a variables NamedTuple a `_replace` that copies the tuple and sets the named
    fields, instead of the generic one's `_make(map(kwds.pop, fields, self))` over every
    field: 2-3x cheaper for the one to four fields an update sets, and every update of
    every driver (explorer, runtime, replay) goes through it. Same result, same
    ValueError for a field the tuple does not have."""
    index = {f: i for i, f in enumerate(cls._fields)}
    new = tuple.__new__

    def _replace(self, **changes):
        vals = list(self)
        try:
            for name, value in changes.items():
                vals[index[name]] = value
        except KeyError:
            raise ValueError(f"Got unexpected field names: {list(changes)!r}") from None
        return new(cls, vals)
    cls._replace = _replace
    return cls


@_quick_replace
class Rank0Vars(NamedTuple):
    """rank0 is one process with two threads: `main` (Phase A, Phase C, hard cuts) and
    `comms` (the only thread that touches the transport). Both threads see these."""
    epoch: int = 0
    next_chunk: int = 0
    next_call: int = 0
    cuts: int = 0                  # hard cuts taken (the config bounds them)
    init_cache: bool = True        # the next INFER envelope starts a fresh KV cache
    inflight: int = 0              # envelopes enqueued whose result is not yet received
    send_q: tuple = ()             # main -> comms
    decode_q: tuple = ()           # comms -> main, bounded by d_out
    env_out: Optional[Msg] = None  # comms: envelope being sent
    res_in: Optional[Msg] = None   # comms: result being received / waiting to be queued
    awaiting: int = 0              # comms: INFER envelopes sent whose result is pending
    terminal_queued: bool = False  # main queued SHUTDOWN or ERROR: nothing more is built
    terminal_sent: bool = False    # comms sent SHUTDOWN or ERROR: it sends nothing more
    built: int = 0                 # INFER envelopes built in the current epoch
    emitted: int = 0               # outputs emitted in the current epoch
    last_emitted: int = -1         # chunk_index of the last emitted output
    noops_left: int = 0
    flag: bool = False             # the cond_flag_all feature flag: rank0 issues no mesh
                                   # collective, but its setting is part of the parity key
    inject: frozenset = frozenset()
    failure: str = ""              # why rank0 is failing (drives the ERROR terminal)


@_quick_replace
class MeshVars(NamedTuple):
    """A mesh rank: the leader (group rank 0) or a worker. The leader also remembers
    the last ids it accepted, to validate monotonicity. The leader is one process with
    two threads, `main` (mesh_pg: broadcast, count check, Phase B) and `comms` (world_pg:
    the only thread that talks to rank0); both see these, the queues join them."""
    env: Optional[Msg] = None      # the envelope of the current call (leader: main's)
    planned: int = 0               # generator calls this rank will run for it
    calls_done: int = 0
    seen_call: int = -1            # leader: last call_id received
    seen_chunk: int = -1           # leader: last INFER chunk_index received
    rejected: bool = False         # leader: the current envelope was rejected
    flag: bool = False             # adds the conditional collective: the cond_flag_all
                                   # feature on every rank; cond_flag flips it on one
    plan_delta: int = 0            # +1 on one rank under the count_mismatch fault
    bad_result: bool = False       # leader: its next result is one rank0's check refuses
    inject: frozenset = frozenset()
    inbox: tuple = ()              # leader: comms -> main, envelopes received (leader_in)
    outbox: tuple = ()             # leader: main -> comms, results to send (leader_out)
    env_in: Optional[Msg] = None   # leader comms: envelope being received
    res_out: Optional[Msg] = None  # leader comms: result being sent
    terminal_in: bool = False      # leader comms: SHUTDOWN or ERROR received: no more
    terminal_sent: bool = False    # leader comms: its ERROR result went out: nothing more
    results_done: bool = False     # leader main: its terminal is relayed or queued, it
                                   # queues no more results


def rank0_initial(cfg) -> Rank0Vars:
    """rank0's variables at start: the heartbeat budget and the faults rank0 injects."""
    return Rank0Vars(noops_left=cfg.noops, flag=cfg.cond_flag_all,
                     inject=cfg.inject & {"rank0_preflight", "rank0_bad_envelope"})


def mesh_initial(cfg, leader: bool, targeted: bool) -> MeshVars:
    """A mesh rank's variables at start. `targeted`: the one mesh rank that the
    one-rank faults (config.ONE_RANK_FAULTS) change; cond_flag makes its flag differ
    from the feature setting every other rank has."""
    mine = cfg.inject & {"leader_reject", "leader_bad_result"} if leader else frozenset()
    if targeted:
        mine |= cfg.inject & {"wrong_group"}
    odd = targeted and "cond_flag" in cfg.inject
    return MeshVars(inject=mine, flag=cfg.cond_flag_all != odd,
                    plan_delta=1 if targeted and "count_mismatch" in cfg.inject else 0)


# ---------------------------------------------------------------- rank0, main thread

def can_build(v: Rank0Vars, cfg) -> bool:
    """Phase A may start: chunks remain, D_in credit, decode queue not full, and under
    R0a the previous chunk of this epoch is decoded (envelope k+1 needs decode of k)."""
    if v.terminal_queued or v.next_chunk >= cfg.chunks:
        return False
    if v.inflight >= cfg.d_in or len(v.decode_q) >= cfg.d_out:
        return False
    if cfg.regime == "R0a" and v.built and v.last_emitted != v.next_chunk - 1:
        return False
    return True


def can_build_ok(v, cfg) -> bool:
    """An injected fault is one-shot and may fire at any chunk, or never."""
    return can_build(v, cfg)


def can_build_preflight_fails(v, cfg) -> bool:
    """Preflight (serialisation, dtype mapping) can raise for any envelope."""
    return can_build(v, cfg)


def new_envelope(v: Rank0Vars, cfg) -> Msg:
    return message(INFER, v.next_call, v.next_chunk, v.epoch, cfg.calls, v.init_cache)


def enqueue_envelope(v: Rank0Vars, cfg, msg=None) -> Rank0Vars:
    """Phase A done and preflight passed: the envelope is fully materialised."""
    return _enqueue(v, new_envelope(v, cfg))


def _enqueue(v: Rank0Vars, env: Msg) -> Rank0Vars:
    return v._replace(send_q=v.send_q + (env,), next_call=v.next_call + 1,
                      next_chunk=v.next_chunk + 1, inflight=v.inflight + 1,
                      init_cache=False, built=v.built + 1)


def can_build_bad(v: Rank0Vars, cfg) -> bool:
    """The rank0_bad_envelope fault is armed (one-shot, at any chunk)."""
    return "rank0_bad_envelope" in v.inject and can_build(v, cfg)


def new_bad_envelope(v: Rank0Vars, cfg) -> Msg:
    """An envelope rank0's preflight let through and the leader's validator refuses:
    its ids are envelope k's, its verdict at the leader is `valid=False`."""
    return message(INFER, v.next_call, v.next_chunk, v.epoch, cfg.calls, v.init_cache,
                   valid=False)


def enqueue_bad_envelope(v: Rank0Vars, cfg, msg=None) -> Rank0Vars:
    return _enqueue(v._replace(inject=v.inject - {"rank0_bad_envelope"}),
                    new_bad_envelope(v, cfg))


def fail_preflight(v: Rank0Vars, cfg, msg=None) -> Rank0Vars:
    """Preflight raised before any header: queue an ERROR terminal (header only)."""
    return _queue_terminal(v._replace(inject=v.inject - {"rank0_preflight"},
                                      failure="preflight failed"), ERROR)


def _queue_terminal(v: Rank0Vars, action) -> Rank0Vars:
    term = message(action, v.next_call, -1, v.epoch)
    return v._replace(send_q=v.send_q + (term,), next_call=v.next_call + 1,
                      terminal_queued=True)


def can_cut(v: Rank0Vars, cfg) -> bool:
    return v.cuts < cfg.hard_cut and not v.terminal_queued and v.next_chunk >= 1


def can_cut_in_drain(v: Rank0Vars, cfg) -> bool:
    return v.cuts < cfg.hard_cut


def hard_cut(v: Rank0Vars, cfg, msg=None) -> Rank0Vars:
    """Prompt change: bump cache_epoch, flush both queues, next envelope init_cache.
    Results already on the wire still arrive; decode drops them by epoch."""
    return v._replace(epoch=v.epoch + 1, cuts=v.cuts + 1, init_cache=True,
                      inflight=v.inflight - sum(m.action == INFER for m in v.send_q),
                      send_q=(), decode_q=(),
                      built=0, emitted=0)


def hard_cut_in_drain(v: Rank0Vars, cfg, msg=None) -> Rank0Vars:
    """A cut while SHUTDOWN drains: bump cache_epoch and flush the decode queue. The send
    queue stays: the SHUTDOWN behind its envelopes must still go out, and their results,
    of the old epoch now, are received and dropped like any stale result."""
    return v._replace(epoch=v.epoch + 1, cuts=v.cuts + 1, init_cache=True, decode_q=(),
                      built=0, emitted=0)


def head_current(v: Rank0Vars, cfg) -> bool:
    return bool(v.decode_q) and v.decode_q[0].epoch == v.epoch and \
        v.decode_q[0].valid and v.decode_q[0].calls == cfg.calls


def head_stale(v: Rank0Vars, cfg) -> bool:
    return bool(v.decode_q) and v.decode_q[0].epoch != v.epoch


def head_rejected(v: Rank0Vars, cfg) -> bool:
    """A current result rank0's contract check refused (the validator's verdict, `valid`)
    or whose observed_generator_calls differs from the plan."""
    return bool(v.decode_q) and v.decode_q[0].epoch == v.epoch and \
        (not v.decode_q[0].valid or v.decode_q[0].calls != cfg.calls)


def has_result(v: Rank0Vars, cfg) -> bool:
    return bool(v.decode_q)


def decode_head(v: Rank0Vars, cfg, msg=None) -> Rank0Vars:
    """Phase C: decode and emit the oldest result."""
    head = v.decode_q[0]
    return v._replace(decode_q=v.decode_q[1:], emitted=v.emitted + 1,
                      last_emitted=head.chunk)


def drop_head(v: Rank0Vars, cfg, msg=None) -> Rank0Vars:
    return v._replace(decode_q=v.decode_q[1:])


def reject_head(v: Rank0Vars, cfg, msg=None) -> Rank0Vars:
    """A result rank0 refuses (contract verdict or call count): never decoded; rank0
    tells the mesh to stop with an ERROR terminal."""
    return _queue_terminal(v._replace(decode_q=v.decode_q[1:],
                                      failure="result rejected"), ERROR)


def reject_head_in_drain(v: Rank0Vars, cfg, msg=None) -> Rank0Vars:
    """A refused result while SHUTDOWN drains: never decoded; SHUTDOWN is already queued
    (it releases the mesh), so rank0 drains what is in flight and fails."""
    return v._replace(decode_q=v.decode_q[1:], failure="result rejected")


def can_heartbeat(v: Rank0Vars, cfg) -> bool:
    return v.noops_left > 0 and not v.terminal_queued


def queue_noop(v: Rank0Vars, cfg, msg=None) -> Rank0Vars:
    noop = message(NOOP, v.next_call, -1, v.epoch)
    return v._replace(send_q=v.send_q + (noop,), next_call=v.next_call + 1,
                      noops_left=v.noops_left - 1)


def direct_noop(v: Rank0Vars, cfg) -> Msg:
    """The message a *second* thread would send if it bypassed the comms thread."""
    return message(NOOP, v.next_call, -1, v.epoch)


def spend_noop(v: Rank0Vars, cfg, msg=None) -> Rank0Vars:
    return v._replace(next_call=v.next_call + 1, noops_left=v.noops_left - 1)


def all_built(v: Rank0Vars, cfg) -> bool:
    return v.next_chunk >= cfg.chunks and not v.terminal_queued


def queue_shutdown(v: Rank0Vars, cfg, msg=None) -> Rank0Vars:
    """SHUTDOWN may go out with work in flight: the comms thread still receives every
    pending result, and the leader only reads SHUTDOWN after sending them."""
    return _queue_terminal(v, SHUTDOWN)


# ---------------------------------------------------------------- rank0, comms thread

def can_take(v: Rank0Vars, cfg) -> bool:
    return bool(v.send_q) and not v.terminal_sent


def take_envelope(v: Rank0Vars, cfg, msg=None) -> Rank0Vars:
    return v._replace(send_q=v.send_q[1:], env_out=v.send_q[0])


def outgoing(v: Rank0Vars, cfg) -> Msg:
    return v.env_out


def out_has_payload(v: Rank0Vars, cfg) -> bool:
    return v.env_out.action == INFER


def out_header_only(v: Rank0Vars, cfg) -> bool:
    return v.env_out.action != INFER


def header_only_sent(v: Rank0Vars, cfg, msg=None) -> Rank0Vars:
    terminal = v.env_out.action in (SHUTDOWN, ERROR)
    return v._replace(env_out=None, terminal_sent=v.terminal_sent or terminal)


def payload_sent(v: Rank0Vars, cfg, msg=None) -> Rank0Vars:
    return v._replace(env_out=None, awaiting=v.awaiting + 1)


def expecting_result(v: Rank0Vars, cfg) -> bool:
    return v.awaiting > 0


def is_error(v, cfg, msg) -> bool:
    return msg.action == ERROR


def is_infer(v, cfg, msg) -> bool:
    return msg.action == INFER


def is_header_only(v, cfg, msg) -> bool:
    return msg.action != INFER


def got_result_header(v: Rank0Vars, cfg, msg) -> Rank0Vars:
    return v._replace(res_in=msg)


def got_result_payload(v: Rank0Vars, cfg, msg) -> Rank0Vars:
    return v._replace(res_in=msg, awaiting=v.awaiting - 1, inflight=v.inflight - 1)


def decode_room(v: Rank0Vars, cfg) -> bool:
    return len(v.decode_q) < cfg.d_out


def put_result(v: Rank0Vars, cfg, msg=None) -> Rank0Vars:
    return v._replace(decode_q=v.decode_q + (v.res_in,), res_in=None)


def comms_finished(v: Rank0Vars, cfg) -> bool:
    return v.terminal_sent and v.awaiting == 0 and v.env_out is None and v.res_in is None


def drained(v: Rank0Vars, cfg) -> bool:
    """main may exit: nothing in flight, nothing left to decode (the table also joins
    the comms thread)."""
    return v.inflight == 0 and not v.decode_q


# ---------------------------------------------------------------- startup handshake

def parity_key(v: MeshVars | Rank0Vars, cfg):
    """What every rank contributes to the parity all_gather: every flag that can add a
    collective (rank0's is its feature setting). The runtime contributes the digest of
    its full parity dict besides."""
    return v.flag


def parity_agrees(v, cfg, gathered) -> bool:
    return len(set(gathered)) == 1


def parity_differs(v, cfg, gathered) -> bool:
    return len(set(gathered)) != 1


# ---------------------------------------------------------------- leader, comms thread

def receiving(v: MeshVars, cfg) -> bool:
    """The comms thread keeps a receive posted until a terminal envelope arrived. Only
    its own receive changes this: a receive once posted cannot be withdrawn (the runtime
    has it in flight), so the leader's own terminal does not stop it; the thread's end
    abandons it (`leader_comms_finished`)."""
    return not v.terminal_in


def got_envelope_header(v: MeshVars, cfg, msg: Msg) -> MeshVars:
    """Envelope header received: its ids are checked on the wire (tag wire_ids); after a
    SHUTDOWN or ERROR nothing more is received."""
    seen_chunk = msg.chunk if msg.action == INFER else v.seen_chunk
    return v._replace(env_in=msg, seen_call=max(v.seen_call, msg.call_id),
                      seen_chunk=max(seen_chunk, v.seen_chunk),
                      terminal_in=v.terminal_in or msg.action in (SHUTDOWN, ERROR))


def store_envelope_in(v: MeshVars, cfg, msg: Msg) -> MeshVars:
    """The payload's metadata completes the envelope (plan bits, contract verdict)."""
    return v._replace(env_in=msg)


def inbox_room(v: MeshVars, cfg) -> bool:
    """Room in the inbox, and main still takes envelopes (it has no terminal yet)."""
    return len(v.inbox) < cfg.leader_in and not v.results_done


def results_over(v: MeshVars, cfg) -> bool:
    """main has relayed or queued its terminal: nothing received now is broadcast."""
    return v.results_done


def drop_envelope_in(v: MeshVars, cfg, msg=None) -> MeshVars:
    return v._replace(env_in=None)


def queue_envelope(v: MeshVars, cfg, msg=None) -> MeshVars:
    return v._replace(inbox=v.inbox + (v.env_in,), env_in=None)


def can_take_result(v: MeshVars, cfg) -> bool:
    return bool(v.outbox) and not v.terminal_sent


def take_result(v: MeshVars, cfg, msg=None) -> MeshVars:
    return v._replace(outbox=v.outbox[1:], res_out=v.outbox[0])


def outgoing_result(v: MeshVars, cfg) -> Msg:
    return v.res_out


def out_is_result(v: MeshVars, cfg) -> bool:
    return v.res_out.action == INFER


def out_is_error(v: MeshVars, cfg) -> bool:
    """The ERROR result. Not held back while a frame is half received: its send, once
    posted, stays posted while the receive side moves (the runtime has it in flight);
    the comms thread still receives that frame's payload before it ends."""
    return v.res_out.action == ERROR


def result_sent(v: MeshVars, cfg, msg=None) -> MeshVars:
    return v._replace(res_out=None)


def error_result_sent(v: MeshVars, cfg, msg=None) -> MeshVars:
    return v._replace(res_out=None, terminal_sent=True)


def leader_comms_finished(v: MeshVars, cfg) -> bool:
    """main queues no more results, every result owed is sent and no frame is half
    received. After a SHUTDOWN or rank0's ERROR nothing more is received; after the
    leader's own ERROR a header receive may still be posted: rank0 leaves on the ERROR
    and sends nothing more, so it is abandoned."""
    return v.results_done and not v.outbox and v.res_out is None and v.env_in is None


def finish_results(v: MeshVars, cfg, msg=None) -> MeshVars:
    """SHUTDOWN or rank0's ERROR relayed to the mesh: main queues no more results."""
    return v._replace(results_done=True)


# ---------------------------------------------------------------- leader, main thread

def inbox_has_infer(v: MeshVars, cfg) -> bool:
    return bool(v.inbox) and v.inbox[0].action == INFER


def inbox_has_header_only(v: MeshVars, cfg) -> bool:
    return bool(v.inbox) and v.inbox[0].action != INFER


def take_envelope_in(v: MeshVars, cfg, msg=None) -> MeshVars:
    return v._replace(env=v.inbox[0], inbox=v.inbox[1:], rejected=False)


def outbox_room(v: MeshVars, cfg) -> bool:
    return len(v.outbox) < cfg.leader_out


def queue_result(v: MeshVars, cfg, msg=None) -> MeshVars:
    """Phase B done: result k (preflight done) waits for the comms thread."""
    return v._replace(outbox=v.outbox + (result(v, cfg),))


def queue_error_result(v: MeshVars, cfg, msg=None) -> MeshVars:
    """The leader's terminal: the ERROR result goes behind the results still owed;
    envelopes received ahead are dropped (the mesh never sees them)."""
    return v._replace(outbox=v.outbox + (error_result(v, cfg),), inbox=(),
                      results_done=True)


def ids_valid(v: MeshVars, cfg, msg: Msg) -> bool:
    """call_id monotonic across all actions, chunk_index monotonic across INFER."""
    if msg.call_id <= v.seen_call:
        return False
    return msg.action != INFER or msg.chunk > v.seen_chunk


def envelope_valid(v: MeshVars, cfg) -> bool:
    """Leader validation before any mesh broadcast: the contract validator's verdict
    on the envelope as the leader decoded it (`Msg.valid`, set by the runtime's codec
    from model.contract.validate_envelope at leader_before_broadcast) and the plan."""
    return v.env.valid and v.env.calls == cfg.calls


def envelope_invalid(v: MeshVars, cfg) -> bool:
    return not (v.env.valid and v.env.calls == cfg.calls)


def reject_envelope(v: MeshVars, cfg, msg=None) -> MeshVars:
    """Turn the current call into an ERROR terminal for the mesh; rank0 is told next."""
    err = message(ERROR, v.env.call_id, v.env.chunk, v.env.epoch)
    return v._replace(env=err, rejected=True, inject=v.inject - {"leader_reject"})


def current_envelope(v: MeshVars, cfg) -> Msg:
    return v.env


def env_is(action):
    def guard(v: MeshVars, cfg) -> bool:
        return v.env.action == action
    guard.__name__ = f"env_is_{Action(action).name}"
    return guard


env_is_infer, env_is_noop = env_is(INFER), env_is(NOOP)
env_is_shutdown, env_is_error = env_is(SHUTDOWN), env_is(ERROR)


def env_not_infer(v: MeshVars, cfg) -> bool:
    return v.env.action != INFER


def rejected_by_leader(v: MeshVars, cfg) -> bool:
    return v.env.action == ERROR and v.rejected


def error_from_rank0(v: MeshVars, cfg) -> bool:
    return v.env.action == ERROR and not v.rejected


def error_result(v: MeshVars, cfg) -> Msg:
    """The leader's ERROR result: ids echo the envelope; calls = 0, because both ways
    here (envelope rejected before its broadcast, counts differ before the first call)
    stop before any generator call of this envelope (calls_done still counts the last
    envelope's)."""
    e = v.env
    return message(ERROR, e.call_id, e.chunk, e.epoch, 0)


def result(v: MeshVars, cfg) -> Msg:
    """PPResult summary: ids echo the envelope; calls = observed_generator_calls;
    under the leader_bad_result fault, a result rank0's check refuses."""
    e = v.env
    return message(INFER, e.call_id, e.chunk, e.epoch, v.calls_done,
                   valid=not v.bad_result)


def bad_result_armed(v: MeshVars, cfg) -> bool:
    """The leader_bad_result fault is armed (one-shot, at any result)."""
    return "leader_bad_result" in v.inject


def spoil_result(v: MeshVars, cfg, msg=None) -> MeshVars:
    return v._replace(bad_result=True, inject=v.inject - {"leader_bad_result"})


# ---------------------------------------------------------------- every mesh rank

def msg_action(action):
    def accept(v, cfg, msg) -> bool:
        return msg.action == action
    accept.__name__ = f"msg_is_{Action(action).name}"
    return accept


msg_is_infer, msg_is_noop = msg_action(INFER), msg_action(NOOP)
msg_is_shutdown, msg_is_error = msg_action(SHUTDOWN), msg_action(ERROR)


def store_envelope(v: MeshVars, cfg, msg: Msg) -> MeshVars:
    return v._replace(env=msg)


def plan_calls(v: MeshVars, cfg) -> int:
    """The generator-call count this rank will run: the envelope's, never inferred."""
    return v.env.calls + v.plan_delta


def infer_calls_locally(v: MeshVars, cfg) -> int:
    """The bug the contract forbids: the mesh derives the count from its own view."""
    return cfg.steps + v.plan_delta


def counts_agree(v: MeshVars, cfg, gathered) -> bool:
    """Every member planned the envelope's expected_generator_calls. Decided from the
    gathered vector and the broadcast envelope only, so every member decides alike."""
    return all(c == v.env.calls for c in gathered)


def counts_differ(v: MeshVars, cfg, gathered) -> bool:
    return not counts_agree(v, cfg, gathered)


def start_phase_b(v: MeshVars, cfg, gathered) -> MeshVars:
    return v._replace(planned=gathered[0], calls_done=0)


def start_phase_b_own(v: MeshVars, cfg, gathered=None) -> MeshVars:
    """Without the count check each rank runs its own plan."""
    return v._replace(planned=plan_calls(v, cfg), calls_done=0)


def start_phase_b_inferred(v: MeshVars, cfg, gathered=None) -> MeshVars:
    return v._replace(planned=infer_calls_locally(v, cfg), calls_done=0)


def more_calls(v: MeshVars, cfg) -> bool:
    return v.calls_done + 1 < v.planned


def last_call(v: MeshVars, cfg) -> bool:
    return v.calls_done + 1 == v.planned and not v.flag


def last_call_then_cond(v: MeshVars, cfg) -> bool:
    return v.calls_done + 1 == v.planned and v.flag


def wrong_group_requested(v: MeshVars, cfg) -> bool:
    return "wrong_group" in v.inject


def call_done(v: MeshVars, cfg, msg=None) -> MeshVars:
    return v._replace(calls_done=v.calls_done + 1)


def contribution(v, cfg):
    """Value fed into a data-free collective (the all_reduce of one generator call)."""
    return 0


# ---------------------------------------------------------------- mutation-only guards
# Guards of the broken variants in model.mutations; the shipped tables never use them.

def late_preflight_ok(v: Rank0Vars, cfg) -> bool:
    return "rank0_preflight" not in v.inject


def late_preflight_raises(v: Rank0Vars, cfg) -> bool:
    return "rank0_preflight" in v.inject


def hard_cut_resetting_chunks(v: Rank0Vars, cfg, msg=None) -> Rank0Vars:
    return hard_cut(v, cfg)._replace(next_chunk=0)


def expecting_result_before_terminal(v: Rank0Vars, cfg) -> bool:
    return v.awaiting > 0 and not v.terminal_sent


def terminal_was_sent(v: Rank0Vars, cfg) -> bool:
    return v.terminal_sent and v.env_out is None and v.res_in is None


def decode_queue_empty(v: Rank0Vars, cfg) -> bool:
    return not v.decode_q


def envelope_in(v: MeshVars, cfg) -> Msg:
    return v.env_in


def queue_error_result_first(v: MeshVars, cfg, msg=None) -> MeshVars:
    v = queue_error_result(v, cfg)
    return v._replace(outbox=v.outbox[-1:] + v.outbox[:-1])


def outbox_nonempty(v: MeshVars, cfg) -> bool:
    return bool(v.outbox)
