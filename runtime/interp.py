"""The table interpreter: each thread of each rank executes its role's rows from model/.

The loop is the same for every role: under the process lock, evaluate the model's
guards on the local variables (the same `model.guards` functions the checker explores),
pick an enabled row, perform its op on torch.distributed, apply the model's update,
write a trace event. A thread with no enabled row waits; a state with no row at all is
a crash with a reason. The runtime never decides *whether* something is allowed, only
*which* allowed row to take (scheduling policy) and *what real work* a row does
(Phase A/B/C through the workload).

The interpreter is generic over threads: a thread whose state offers collectives runs
the collective; one whose state offers point-to-point rows drives every posted send and
receive as async jobs, completing whichever finishes first. That is how the comms
threads of rank0 and of the leader keep a receive posted while they send (their
control state is a pair "S/R"; PROTOCOL.md, Overlap). Per-thread scratch (the header
of a frame being received, the jobs in flight) is kept per thread; real data that
crosses threads is keyed by call_id, like the model's queues it travels beside.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from contextlib import contextmanager
from typing import NamedTuple

import torch

from lockstep.model import contract as C
from lockstep.model.events import FAULT, RELEASE, local_subject, step_event
from lockstep.model import messages as M
from lockstep.model.messages import Msg
from lockstep.model.ops import (COND, COUNTS, ENV_HDR, ENV_PAY, GEN, MESH, PARITY, RES_HDR,
                                RES_PAY, WORLD, Coll, Exit, Local, Recv, Send, op_text)
from lockstep.model import policy as P
from lockstep.model import release as R
from lockstep.model.semantics import DEAD_THREAD, Model
from lockstep.model.tables import FINAL, THREADS

from . import codec, transport as T
from .workload import envelope_fields, error_text


class Received(NamedTuple):
    """The leader's envelope as its comms thread received it: decoded meta and tensors
    (views into the packed payload) and the wire bytes (None when it was refused)."""
    meta: dict
    tensors: dict
    wire: "codec.Wire | None"


class TableViolation(RuntimeError):
    """The runtime was asked to do something no row allows."""


class WrongGroup(TableViolation):
    """A collective on a group (or of a kind) no row of the current state allows."""


class WorkloadError(RuntimeError):
    """A workload method raised, or returned what the interface or the contract refuses:
    one line naming the method and what was wrong (the rank's exit line adds the rank,
    role and ids). The control plane's own errors pass through it unchanged."""


@contextmanager
def workload_call(what: str):
    """Around one workload method and the checks of what it returned (`what` names it,
    e.g. "generator_call(call_index=1)"): a failure inside becomes a WorkloadError naming
    it. A transport error raised through the workload's all_reduce (a deadline, a
    release, a refused collective) is the transport's and passes through as it is."""
    try:
        yield
    except (T.CommError, TableViolation, T.GroupMembershipError):
        raise
    except Exception as e:  # noqa: BLE001 - the user's code: named, then re-raised
        raise WorkloadError(f"workload {what} {error_text(e)}") from e


def _shape_of(value) -> str:
    return f"a {len(value)}-tuple" if isinstance(value, tuple) else type(value).__name__


def _returned(what: str, value, want=dict):
    if not isinstance(value, want):
        raise TypeError(f"returned {type(value).__name__}, must return a "
                        f"{want.__name__}: {what}")
    return value


class RankInterpreter:
    def __init__(self, model: Model, p: int, groups, workload, tracer, *, abort_poll,
                 opts, parity: dict, control=None, outputs=None, peer_left=None):
        self.m, self.p, self.cfg = model, p, model.cfg
        self.groups, self.work, self.trace = groups, workload, tracer
        self.abort_poll, self.opts, self.parity = abort_poll, opts, parity
        # peer_left(rank): that rank is in its exit path (sends nothing more); the side
        # channel answers it. None: no peer is ever known to have left.
        self.peer_left = peer_left or (lambda rank: False)
        self.role = model.roles[p]
        self.name = model.names[p]
        self.threads = THREADS[self.role]
        pr = model.initial_state().procs[p]
        self.v, self.pcs = pr.v, list(pr.pcs)
        self.table = model.tables[p]
        self.cv = threading.Condition()
        self.i = [0] * len(self.threads)
        self.chan_i = {"send": 0, "recv": 0}
        self.gseq = {WORLD: 0, MESH: 0}
        self.exit = None            # (how, reason) once the process leaves
        # on_commit(how, reason): once, when a thread enters a state from which every path
        # is that own failure (model.release.committed_exits): the root cause is known
        # there, before the rest of the way out (terminal messages, joins) has run.
        self.on_commit = None       # set by the caller (runtime/node.py)
        self._committed = [R.committed_exits(th) for th in self.table]
        self.deadline = opts.op_deadline_s
        self.policy = P.Policy.from_opts(opts.to_dict(), chunks=self.cfg.chunks)
        self.control = control          # rank0: runtime.control.CutControl (cuts from outside)
        if control is not None:
            control.on_request(self._wake)
        self.last_step = [time.monotonic()] * len(self.threads)
        # real data beside the model's summaries, keyed by call_id; an entry lives while
        # its message is in the model's queues or on the wire, never longer (`_release`)
        self.env_frames, self.env_meta, self.times = {}, {}, {}
        self.results = {}
        self.cur = None             # mesh: (meta, tensors) of the current envelope
        self.received = {}          # leader: Received envelopes, ahead of their broadcast
        self.result_out = {}        # leader: result frames queued for the comms thread
        self.prev_meta = None         # rank0: the last INFER built (Phase A preflight)
        self.sent_ids = None          # rank0: ids of the last envelope header sent
        self.last_b_end = None
        self.t_b_start = 0.0
        self.outputs = [] if outputs is None else outputs   # rank0: emitted outputs
        # per thread: [send job, recv job, (send row, msg), recv rows]
        self._comms_jobs = [[None, None, None, None] for _ in self.threads]
        self._in_coll = [None] * len(self.threads)   # the group of a collective in flight
        self._guard_memo = [None] * len(self.threads)   # per thread: (pc, v, rows) (_guarded)
        self._recv_hdr = None       # (Header, words) of the frame the p2p thread receives
        self._bcast_hdr = None      # the header of the frame main broadcasts
        self._bcast_wire = None     # the leader: the codec.Wire main broadcasts
        self._tl = threading.local()
        self.comm = T.Transport(groups, p, check=self._table_check, abort_poll=abort_poll,
                                op_deadline_s=self.deadline, cuda_window=opts.cuda_window)

    # ------------------------------------------------------------------ context
    def ctx(self, err: BaseException | None = None) -> str:
        """``rank= role= call_id= chunk_index= cache_epoch= group=``; the group is that
        of ``err``'s op when it is a transport error (a rank's threads use different
        groups: the last one any thread used named the leader's comms thread's world_pg
        for its main thread's deadline in a mesh_pg broadcast), else the last used."""
        group = self.last_group
        if isinstance(err, T.CommError) and err.group:
            p2p = err.group == WORLD and str(err.op).split()[0] in ("send", "recv")
            group = "world_pg(p2p)" if p2p else err.group
        v = self.v
        env = getattr(v, "env", None)
        if env is not None:
            ids = f"call_id={env.call_id} chunk_index={env.chunk} cache_epoch={env.epoch}"
        elif self.role == "rank0":
            ids = (f"call_id={v.next_call - 1} chunk_index={v.next_chunk - 1} "
                   f"cache_epoch={v.epoch}")
        else:
            ids = "call_id=- chunk_index=- cache_epoch=-"
        return f"rank={self.p} role={self.role} {ids} group={group}"

    # ------------------------------------------------------------------ main loop
    def run_thread(self, t: int) -> None:
        while True:
            with self.cv:
                rows = self._wait_enabled(t)
                if rows is None:
                    return
                kinds = {type(r.op) for r in rows}
                # An op that already completed is applied before a local row: a local
                # row may end the thread (comms_done) and the completion would be lost
                # although the peer saw it (gloo completes sends eagerly).
                if (Exit in kinds or Local in kinds) and not self._completed(t):
                    row = self._choose_local(t, rows)
                    rows = None
                    self._busy = t   # applied after the lock is re-taken: see _apply
                elif Coll in kinds:
                    self._in_coll[t] = rows[0].op.group
            if rows is None:
                self._do_local(t, row)
            elif Coll in kinds:
                self._coll(t, rows)
            else:
                self._p2p_step(t, rows)

    def _wait_enabled(self, t):
        while True:
            if self.exit is not None:
                return None
            if self._busy not in (None, t) or self._exiting not in (None, t):
                # another thread's local step is not applied, or its exit is pending
                self.cv.wait(0.02)
                continue
            pc = self.pcs[t]
            if pc in (FINAL, DEAD_THREAD):
                return None
            if not self.table[t].get(pc):
                raise TableViolation(f"{self.name}: no row leaves state {pc!r}")
            idle_ms = (time.monotonic() - self.last_step[t]) * 1000.0
            requested = self.control.requested if self.control is not None else 0
            ok = [r for r in self._guarded(t) if self._joined(t, r)
                  and not self._recv_may_still_land(t, r)
                  and P.fires(r, self.v, self.p, self.policy, idle_ms, requested)]
            if ok:
                return ok
            reason = self.abort_poll()
            if reason:
                raise T.Released(self.p, f"wait for a row of {pc!r}", "-", None, reason)
            self.cv.wait(0.02)

    def _guarded(self, t) -> list:
        """Under the lock: the rows of thread t's state whose guard holds on the variables
        now, in table order. Guards are pure functions of (v, cfg) and v is an immutable
        tuple, so the list stands until t's state or v changes: a step asks for it up to
        four times (wait, monitor, completion, new work), the model's guards run once."""
        pc, v = self.pcs[t], self.v
        memo = self._guard_memo[t]
        if memo is not None and memo[1] is v and memo[0] == pc:
            return memo[2]
        rows = [r for r in self.table[t].get(pc, ()) if r.guard is None or r.guard(v, self.cfg)]
        self._guard_memo[t] = (pc, v, rows)
        return rows

    def _recv_may_still_land(self, t, row) -> bool:
        """Under the lock: `row` ends thread t (a local row to FINAL: comms_done) while
        t's receive is posted in the backend and its peer is still running. A posted
        gloo receive cannot be withdrawn: a send the peer makes now still lands in it,
        and the peer goes on as if it was received (rank0, its envelope header sent,
        owes the payload), though the model's ended thread never took it. So the row
        waits, with the receive still served, until the peer is in its exit path (it
        sends nothing more); a peer that dies or stalls is the watchdog's (lost_after_s).
        Both orders are the tables' (the row and the receive are enabled together)."""
        if row.dst != FINAL or not isinstance(row.op, Local):
            return False
        js = self._comms_jobs[t]
        if js[1] is None or js[1].done:
            return False
        return not self.peer_left(self.m.index[js[3][0].op.peer])

    def _wake(self) -> None:
        """A cut was requested from outside: re-evaluate the rows now, not at the next
        poll (the policy decides whether one fires)."""
        with self.cv:
            self.cv.notify_all()

    def _joined(self, t, row) -> bool:
        if "join_comms" not in row.tags:
            return True
        return all(pc in (FINAL, DEAD_THREAD) for u, pc in enumerate(self.pcs) if u != t)

    def _choose_local(self, t, rows):
        return P.choose_local([r for r in rows if isinstance(r.op, (Local, Exit))])

    # ------------------------------------------------------------------ apply + trace
    def _apply(self, t, row, msg=None, t0=None, **ev):
        """Under the lock: the model's update, the new control state, the trace."""
        # A local row is one model step: chosen on the state, applied to the same state.
        # Its real work (Phase A, Phase C) runs outside the lock, so until it is applied
        # no other thread of this process applies a row (the comms thread's operations
        # stay in flight meanwhile). Without this, a result queued during Phase A filled
        # the decode queue under an envelope whose guard had seen room: a step the model
        # forbids (found by conformance on a 1,500-chunk soak).
        while (self._busy not in (None, t) or self._world_coll_elsewhere(t, row)) \
                and self.exit is None:
            self.cv.wait(0.02)
        if self._busy == t:
            self._busy = None
        self._in_coll[t] = None
        if self.exit is not None:
            # Another thread of this process already left (an Exit ends the process):
            # work finished outside the lock after that is dropped, never traced.
            return
        if isinstance(row.op, Exit) and row.op.how != "thread_die":
            self._let_ops_land(t)
        before = self.v
        if row.update is not None:
            self.v = row.update(self.v, self.cfg, msg)
        if msg is None and isinstance(row.op, Local):
            msg = local_subject(before, self.v)
        now = time.monotonic_ns()
        # another thread's rows read the variables, and its join rows this thread's end
        others_may_move = self.v is not before or isinstance(row.op, Exit) \
            or row.dst == FINAL
        if isinstance(row.op, Exit):
            if row.op.how == "thread_die":
                self.pcs[t] = DEAD_THREAD
            else:
                self.exit = (row.op.how, row.op.reason)
        else:
            self.pcs[t] = row.dst
            end = self._committed[t].get(row.dst)
            if end is not None and self.on_commit is not None:
                self.on_commit, tell = None, self.on_commit
                tell(*end)
        if self.role == "rank0":
            self._release(before, self.v)
        if self.trace.keeps(row):   # i numbers the thread's written step events
            self.trace.write(step_event(self.p, self.role, self.threads[t], self.i[t], row,
                                        msg=msg, t_ns=now, dur_ns=now - (t0 or now), **ev))
            self.i[t] += 1
            # between two steps, under the lock: a checkpoint. Not after the process's
            # exit step: nothing follows it, and pcs stay where the exit row found them
            # while the closed segment's lines imply its dst (a checkpoint then would
            # contradict the segment it follows).
            if self.exit is None and self.trace.full():
                self.trace.roll()
        self.last_step[t] = now / 1e9      # the same clock as time.monotonic()
        self.cv.notify_all()
        if others_may_move and self._new_work_elsewhere(t):
            self.comm.nudge()   # a p2p thread waiting on its ops has new work

    def _new_work_elsewhere(self, t) -> bool:
        """Under the lock: does a thread other than t, waiting on its p2p ops, now have an
        enabled row none of them is (what its wait's interrupt asks)? Only then is it
        woken: a wake-up that finds nothing to do costs two context switches."""
        return any(u != t and (js[0] is not None or js[1] is not None) and self._new_work(u)
                   for u, js in enumerate(self._comms_jobs))

    def let_sends_land(self, t) -> None:
        """Under the lock, before thread t's exception ends the process outside the
        tables (a backend error, a release): a send another thread has in flight is
        given EXIT_GRACE_S to complete and be applied (traced) by its own thread. Its
        peer may have received it: the leader's result payload landed at rank0 while the
        leader's main failed on a broadcast to a killed worker, and the leader's trace
        lost the send rank0 recorded receiving. A receive posted meanwhile is not waited
        for (nothing may come)."""
        if self.exit is None:
            self._let_ops_land(t, sends_only=True)

    def _let_ops_land(self, t, sends_only: bool = False) -> None:
        """Under the lock, before thread t's exit ends the process: a send or receive
        another thread has in flight is given EXIT_GRACE_S to complete and be applied
        (traced) first. gloo completes sends eagerly and the peer records its side, so
        an op cut off by the exit would leave one side of a message in the traces; the
        order taken (the op, then the exit) is one the tables allow. Only exits that do
        not join the comms thread get here with ops in flight (abort, parity)."""
        others = [u for u in range(len(self.threads)) if u != t]
        jobs = 1 if sends_only else 2    # [send job, recv job, ...] of each thread

        def in_flight():
            return any(j is not None for u in others for j in self._comms_jobs[u][:jobs])
        if not in_flight():
            return
        self._exiting = t
        end = time.monotonic() + self.EXIT_GRACE_S
        while in_flight() and time.monotonic() < end:
            self.cv.wait(0.005)
        self._exiting = None

    EXIT_GRACE_S = 0.2
    _exiting = None      # the thread whose exit waits for other threads' sends to land

    def _world_coll_elsewhere(self, t, row) -> bool:
        """A p2p completion (world_pg) waits while another thread of this process has a
        world_pg collective not yet applied (the leader's handshake, while its comms
        thread's first receive is posted): the peer sent only after that collective, so
        the model's order is the collective first, and the trace's file order (the
        order of applying) must say so."""
        return isinstance(row.op, (Send, Recv)) and any(
            g == WORLD for u, g in enumerate(self._in_coll) if u != t)

    def _release(self, a, b) -> None:
        """Drop the real data of every message that left rank0's queues for nowhere: an
        envelope flushed from the send queue by a hard cut (never sent: no result will
        come, so its metadata goes too), a result dropped as stale, rejected, or dropped
        after a failure (a decoded one was released by Phase C already). Bookkeeping,
        not a decision: which messages leave is the model's update."""
        if not (a.send_q or a.decode_q):
            return
        live = {m.call_id for m in b.send_q} | {m.call_id for m in b.decode_q}
        if b.env_out is not None:
            live.add(b.env_out.call_id)
        for m in a.send_q + a.decode_q:
            if m.call_id not in live:
                for d in (self.env_frames, self.env_meta, self.times, self.results):
                    d.pop(m.call_id, None)

    # ------------------------------------------------------------------ local rows
    def _do_local(self, t, row):
        """A local row: the real work its effect stands for, then the model's update."""
        t0 = time.monotonic_ns()
        work = self.EFFECTS.get(row.effect) if row.effect else None
        meas = work(self, row) if work is not None else None
        with self.cv:
            self._apply(t, row, None, t0, meas=meas)

    def _phase_a(self, row):
        v = self.v
        msg = row.make(v, self.cfg)           # the message the model's update enqueues
        t_a0 = time.monotonic_ns()
        # rank0's ids (ctx) still name the chunk before this one: the row is not applied
        built_as = f"build(chunk_index={msg.chunk}, cache_epoch={msg.epoch}, " \
                   f"call_id={msg.call_id})"
        with workload_call(built_as):
            built = self.work.build(msg.chunk, msg.epoch, msg.init_cache,
                                    self.cfg.regime, self.cfg.steps)
            if not (isinstance(built, tuple) and len(built) == 2):
                raise TypeError(f"returned {_shape_of(built)}, must return a "
                                f"(meta dict, tensors dict) tuple")
            extra = _returned("meta dict (fields beyond the ids)", built[0])
            tensors = _returned("tensors dict (name -> tensor)", built[1])
            fields = envelope_fields(extra, regime=self.cfg.regime, steps=self.cfg.steps)
        with workload_call(f"{built_as}: its envelope was refused by the preflight:"):
            frames = codec.encode_envelope_msg(msg, fields, tensors,
                                               prev=self.prev_meta)
        self.prev_meta = meta = {**fields, **codec.M.wire_ids("envelope", msg)}
        if not msg.valid:
            # The rank0_bad_envelope fault (model: build_bad_envelope): the latents in a
            # dtype the contract refuses, framed past the preflight; the leader's
            # validator must refuse it.
            bad = {**tensors, "latents_in": tensors["latents_in"].to(torch.float32)}
            frames = codec.encode_unchecked("envelope", meta, bad)
            self._event(FAULT, what="rank0_bad_envelope", field="latents_in")
        self.env_frames[msg.call_id], self.env_meta[msg.call_id] = frames, meta
        self.times[msg.call_id] = {"tA0_ns": t_a0, "tA1_ns": time.monotonic_ns()}

    def _preflight_fails(self, row):
        msg = row.make(self.v, self.cfg)
        fields = envelope_fields({}, regime=self.cfg.regime, steps=self.cfg.steps)
        bad = {"latents_in": torch.zeros(2, 2, dtype=torch.float64)}
        try:
            codec.encode_envelope_msg(msg, fields, bad, prev=self.prev_meta)
        except (codec.CodecError, C.ContractError) as e:
            self._event(FAULT, what="rank0_preflight", error=str(e))
            return
        raise TableViolation("injected preflight fault did not raise")

    def _terminal_frames(self, msg: Msg):
        """Header-only envelope: every id from the model's message (model.messages),
        encoded when the comms thread sends it, so it is ordered against the envelope
        sent before it (main may have built later INFERs meanwhile)."""
        return codec.encode_envelope_msg(msg, {}, {}, prev=self.sent_ids)

    def _phase_c(self, row):
        head = self.v.decode_q[0]
        meta, tensors = self.results.pop(head.call_id)
        with workload_call(f"decode(chunk_index={head.chunk}, cache_epoch={head.epoch}, "
                           f"call_id={head.call_id})"):
            value = self.work.decode(meta, tensors)
            try:   # outputs.json: the log encodes it (once), before writing any of it
                self.outputs.append((head.chunk, head.epoch, value))
            except (TypeError, ValueError) as e:
                raise TypeError(f"returned {type(value).__name__}, not JSON: {e}") from None
        tm = self.times.pop(head.call_id, {})
        tm.update(tEmit_ns=time.monotonic_ns(), t_b_ms=meta.get("t_b_ms"),
                  t_mesh_idle_ms=meta.get("t_mesh_idle_ms"),
                  q_in=self.v.inflight, q_out=len(self.v.decode_q))
        return tm

    def _wrong_group(self, row):
        """The workload asks for world_pg; the guarded wrapper refuses before the
        backend is called because the table's row says mesh_pg."""
        self._tl.where = (0, GEN)    # inside a generator call, as the workload would be
        try:
            self.guarded_all_reduce(torch.zeros(1), WORLD)
        except WrongGroup as e:
            self._event(FAULT, what="wrong_group", error=str(e))
            return
        raise TableViolation("wrong-group call was not refused")

    def _result_preflight(self, row):
        """Result preflight on main, before the result is queued for the comms thread:
        the frames of the model's message (`result` / `error_result`), keyed by call_id;
        the comms thread sends them."""
        msg = row.make(self.v, self.cfg)
        self.result_out[msg.call_id] = self._result_frames(msg)

    def _cut(self, row):
        """A hard cut (the policy decided it fires): record why. The oldest pending
        request from the control interface is attributed first, else the schedule's."""
        reason = self.control.take_reason() if self.control is not None else None
        if reason is not None:
            return {"cut_reason": reason, "cut_source": "control"}
        return {"cut_reason": self.opts.cuts.reason, "cut_source": "schedule"}

    def _fault_event(self, row):
        self._event(FAULT, what=row.effect, where=row.src)

    # effect (a row attribute) -> the real work; rows without an effect do none
    EFFECTS = {"phase_a": _phase_a, "rank0_preflight": _preflight_fails,
               "rank0_bad_envelope": _phase_a, "phase_c": _phase_c,
               "leader_reject": _fault_event, "leader_bad_result": _fault_event,
               "wrong_group": _wrong_group, "hard_cut": _cut,
               "result_preflight": _result_preflight}

    def guarded_all_reduce(self, t, group_name, name="all_reduce"):
        """The workload's collectives go through runtime.transport, whose check is the
        table: a collective on a group the current state's rows do not name is refused
        before the backend is called (this is how a wrong-group collective becomes a
        crash instead of a hang). On CUDA the host does not wait for each one: the stream
        does, and the call's end drains them (Transport.stream_all_reduce)."""
        self.comm.stream_all_reduce(t, group_name, name=name)
        return t

    def _counted_all_reduce(self, group_name, call_index):
        """The ``all_reduce`` a generator call gets: each names its place in the call
        when it fails ("all_reduce #2 of generator_call(call_index=1)"), so the ranks'
        lines show where their collectives parted (one rank's extra or missing
        all_reduce waits at the op deadline in a collective no other rank joined), and
        each counts in the call's tally (``Transport.calls``: the rank's own evidence of
        an extra or a skipped one)."""
        issued = 0

        def all_reduce(x):
            nonlocal issued
            issued += 1
            self.comm.calls.issue()
            return self.guarded_all_reduce(
                x, group_name, f"all_reduce #{issued} of generator_call(call_index={call_index})")
        return all_reduce

    def _table_check(self, op: str, group: str, peer, row) -> None:
        """The transport's check, before every backend call. A control-plane op performs
        a row the monitor checked when the row was taken (`row`, its table op): the
        backend op must be that row's. The workload's collectives (Phase B) name no row:
        they are checked against the rows here, as the calling thread and the collective
        kind it is inside (set by `_coll`)."""
        if row is not None:
            if _backend_op(row, self.m.index) != (op, group, peer):
                raise TableViolation(f"{self.name}: {op} group={group} peer={peer} is not "
                                     f"the backend op of its row {op_text(row)}")
            return
        t, kind = getattr(self._tl, "where", (0, GEN))
        self._monitor(t, Coll(op, group, None, kind))

    def _monitor(self, t, op) -> None:
        """The online monitor: every op of every thread (control plane and workload) is
        checked against the rows of the thread's current state before the backend is
        called. A call no row allows raises with the state and the rows it allows."""
        with self.cv:
            pc = self.pcs[t]
            rows = self._guarded(t)
        if any(_allows(r.op, op) for r in rows):
            return
        err = WrongGroup if isinstance(op, Coll) else TableViolation
        raise err(f"{self.name}.{self.threads[t]}: {op_text(op)} refused in state {pc!r}; "
                  f"its rows allow {sorted({op_text(r.op) for r in rows})}")

    # ------------------------------------------------------------------ p2p
    def _peer(self, row) -> int:
        return self.m.index[row.op.peer]

    def _p2p(self) -> None:
        self.last_group = "world_pg(p2p)"

    def _send_job(self, row, msg):
        dst = self._peer(row)
        if row.op.kind == ENV_HDR:
            frames = self.env_frames.get(msg.call_id) if msg.action == C.Action.INFER \
                else self._terminal_frames(msg)
            if msg.action != C.Action.INFER:
                self.env_frames[msg.call_id] = frames
            part = frames.header
        elif row.op.kind == ENV_PAY:
            part = codec.pack_payload(self.env_frames[msg.call_id])
        elif row.op.kind == RES_HDR:
            part = self.result_out[msg.call_id].header   # preflight done on main
        else:
            part = codec.pack_payload(self.result_out[msg.call_id])
        return T.send_frame(self.comm, part, dst, WORLD, row=row.op)

    def _after_send(self, row, msg):
        kind, last = row.op.kind, msg.action != C.Action.INFER
        if kind == ENV_HDR:
            self.sent_ids = codec.M.wire_ids("envelope", msg)
        if kind == ENV_PAY or (kind == ENV_HDR and last):
            self.env_frames.pop(msg.call_id, None)
        if kind == RES_PAY or (kind == RES_HDR and last):
            self.result_out.pop(msg.call_id, None)

    def _next_chan(self, d):
        n = self.chan_i[d]
        self.chan_i[d] += 1
        return n

    def _recv_job(self, rows):
        src = self._peer(rows[0])
        kind = rows[0].op.kinds[0]
        if kind in (ENV_HDR, RES_HDR):
            return T.recv_header(self.comm, src, WORLD,
                                 "envelope" if kind == ENV_HDR else "result",
                                 row=rows[0].op, then=self._recv_header_msg)
        h, words = self._recv_hdr
        return T.recv_payload(self.comm, h, src, WORLD, row=rows[0].op,
                              then=lambda parts, buf: self._payload_msg(
                                  kind, codec.Wire(h, words, buf), *parts))

    def _recv_header_msg(self, h, words):
        self._recv_hdr = (h, words)
        return codec.header_msg(h)

    def _bcast_header_msg(self, h, words):
        self._bcast_hdr = h
        return codec.header_msg(h)

    def _payload_msg(self, kind, wire, meta, manifest, tensors):
        # The contract validator's verdict is the message's `valid`: the model's guards
        # (envelope_valid / envelope_invalid, head_current / head_rejected) choose the row.
        h = wire.info
        if kind == ENV_PAY:
            # The leader's one check of the envelope (leader_before_broadcast); a valid
            # one is relayed to the mesh as these bytes (`_mesh_wire`).
            m, msg, err = codec.decode_verdict(codec.decode_envelope, "envelope", h, meta,
                                               manifest, tensors,
                                               where=C.LEADER_BEFORE_BROADCAST)
            self.received[h.call_id] = Received(m.meta, m.tensors, wire) if m is not None \
                else Received(dict(meta), {}, None)
        else:
            env_meta = self.env_meta.get(h.call_id)
            m, msg, err = codec.decode_verdict(codec.decode_result, "result", h, meta,
                                               manifest, tensors, envelope_meta=env_meta)
            self.results[h.call_id] = (m.meta, m.tensors) if m is not None else (meta, {})
            self.times.setdefault(h.call_id, {})["tRecv_ns"] = time.monotonic_ns()
            self.env_meta.pop(h.call_id, None)
        if err is not None:
            self.detail = f"refused field {err.field!r}: {err.reason}"
        return msg

    def _pick_accepting(self, rows, msg):
        ok = [r for r in rows if r.accept is None or r.accept(self.v, self.cfg, msg)]
        if not ok:
            raise TableViolation(f"{self.name}: no row at {rows[0].src!r} accepts "
                                 f"{msg}")
        return ok[0]

    def _p2p_step(self, t, rows):
        """Drive the posted send and the posted receive of thread t together."""
        sends = [r for r in rows if isinstance(r.op, Send)]
        recvs = [r for r in rows if isinstance(r.op, Recv)]
        js = self._comms_jobs[t]   # [send job, recv job, (send row, msg), recv rows]
        t0 = time.monotonic_ns()
        with self.cv:
            if sends and js[0] is None:
                msg = sends[0].make(self.v, self.cfg)
                self._monitor(t, sends[0].op)
                js[0], js[2] = self._send_job(sends[0], msg), (sends[0], msg)
            if recvs and js[1] is None:
                self._monitor(t, recvs[0].op)
                js[1], js[3] = self._recv_job(recvs), recvs
        self._p2p()
        i, value = self.comm.wait_any([js[0], js[1]], interrupt=lambda: self._new_work(t))
        if i is None:   # a row not in flight became enabled: the thread takes it first
            return
        # The other side may have moved while this op was in flight (the control state
        # is a pair), so the row is looked up again in the current state (same op and
        # functions, `_side`).
        recv_value = None
        if i == 1 and js[0] is not None:
            with self.cv:
                exits = self._current_row(t, js[3], value).dst == "exit"
            if exits and self._send_lands(js[0]):
                i, recv_value = 0, value        # the send first, then the receive
        if i == 0:
            self._apply_send(t, js, t0)
            if recv_value is None:
                return
            value = recv_value
        recv_rows = js[3]
        with self.cv:
            row = self._current_row(t, recv_rows, value)
            self._apply(t, row, value, t0, peer=row.op.peer,
                        chan_i=self._next_chan("recv"))
            js[1] = js[3] = None

    def _apply_send(self, t, js, t0) -> None:
        row, msg = js[2]
        self._after_send(row, msg)
        with self.cv:
            row = self._current_row(t, [row], msg)
            self._apply(t, row, msg, t0, peer=row.op.peer, chan_i=self._next_chan("send"))
            js[0] = js[2] = None    # applied: an exit waiting for it may go on

    def _send_lands(self, op) -> bool:
        """A receive whose row ends the process (the leader's ERROR) completed while this
        thread's send is in flight: the send is given EXIT_GRACE_S to complete, so it is
        applied (traced) first. gloo completes small sends eagerly and the peer records
        receiving them; the order taken (the send, then the receive, both enabled in the
        pair state) is one the tables allow."""
        return self.comm.settle(op, self.EXIT_GRACE_S)

    def _completed(self, t) -> bool:
        """Thread t has a p2p job whose backend work has completed, not yet applied."""
        return any(j is not None and j.done for j in self._comms_jobs[t][:2])

    def _new_work(self, t) -> bool:
        """Thread t, with p2p jobs in flight, has an enabled row none of them is: a local
        row, or a send or receive not yet posted (another thread queued work for it)."""
        js = self._comms_jobs[t]
        with self.cv:
            if self.exit is not None:   # the process is leaving: its ops are abandoned
                return True
            for r in self._guarded(t):
                cls = type(r.op)
                if (cls is Send and js[0] is None) or (cls is Recv and js[1] is None) \
                        or cls in (Local, Exit):
                    return self._joined(t, r) and not self._recv_may_still_land(t, r)
        return False

    def _current_row(self, t, rows, msg):
        same = {_side(r) for r in rows}   # one side's row, in whatever pair state now
        now = [r for r in self._guarded(t) if _side(r) in same]
        if not now:
            raise TableViolation(f"{self.name}: {[op_text(r.op) for r in rows]} completed "
                                 f"but state {self.pcs[t]!r} no longer allows it")
        return self._pick_accepting(now, msg) if isinstance(now[0].op, Recv) else now[0]

    # ------------------------------------------------------------------ collectives
    def _members(self, name):
        return self.m.members[name]

    def _coll(self, t, rows):
        op = rows[0].op
        for r in rows:
            if (r.op.op, r.op.group, r.op.kind) != (op.op, op.group, op.kind):
                raise TableViolation(f"{self.name}: two collectives offered at {r.src}")
        if self.p not in self._members(op.group):
            raise TableViolation(f"{self.name} is not a member of {op.group}")
        t0 = time.monotonic_ns()
        self.last_group = op.group
        self._tl.where = (t, op.kind)     # the workload's collectives are checked as this
        if op.kind not in (GEN, COND):    # those are checked per call (_table_check)
            self._monitor(t, op)
        meas = None
        if op.kind == PARITY:
            with self.cv:
                key = int(rows[0].make(self.v, self.cfg))
            names, digests = self._parity_vector(key)
            got = self.comm.wait(T.all_gather_ints(self.comm, [key] + digests, op.group,
                                                   row=op))
            value = tuple(bool(row[0]) for row in got)
            decide = tuple(got)
            meas = {"parity_keys": names, "digests": [list(row[1:]) for row in got]}
            if len(set(got)) > 1:
                self.detail = _parity_detail(got, self._members(op.group), names)
        elif op.kind == COUNTS:
            with self.cv:
                planned = int(rows[0].make(self.v, self.cfg))
            self.t_b_start = time.monotonic()
            got = self.comm.wait(T.all_gather_ints(self.comm, [planned], op.group, row=op))
            value = decide = tuple(x[0] for x in got)
            if len(set(value)) > 1:   # name the odd rank: the exit line's root cause
                common = max(set(value), key=value.count)
                odd = [m for m, x in zip(self._members(op.group), value) if x != common]
                self.detail = f"calls {list(value)}: differs on ranks {odd}"
        elif op.kind in (ENV_HDR, ENV_PAY):
            value = decide = self._bcast(rows, op)
        elif op.kind == GEN:
            with self.cv:
                idx = self.v.calls_done
            meta, tensors = self.cur
            self.comm.calls.begin(idx)
            with workload_call(f"generator_call(call_index={idx})"):
                self.work.generator_call(idx, meta, tensors,
                                         self._counted_all_reduce(op.group, idx))
            self.comm.drain()       # the call's collectives done before its row applies
            self.comm.calls.end()
            value = decide = None
        elif op.kind == COND:
            self.comm.all_reduce(torch.zeros(1), op.group)
            value = decide = None
        else:
            raise TableViolation(f"{self.name}: unknown collective kind {op.kind}")
        with self.cv:
            row = self._pick_accepting(rows, decide)
            gseq = self.gseq[op.group]
            self.gseq[op.group] += 1
            self._apply(t, row, value, t0, group=op.group, gseq=gseq, meas=meas)
            if "phase_b_done" in row.tags:
                self.t_b_end = time.monotonic()

    detail = ""
    last_group = "-"
    _busy = None         # the thread whose chosen local row is not yet applied

    def _parity_vector(self, key: int):
        """One digest per parity key (sorted), so a mismatch names the key."""
        d = self.parity
        names = sorted(d)
        digests = [int.from_bytes(hashlib.sha256(json.dumps(d[k], sort_keys=True).encode())
                                  .digest()[:7], "little") for k in names]
        return names, digests

    def _bcast(self, rows, op):
        if self._members(op.group)[op.root] == self.p:
            return self._bcast_root(rows, op)
        if op.kind == ENV_HDR:
            return self.comm.wait(T.bcast_header(self.comm, None, op.group, op.root,
                                                 "envelope", row=op,
                                                 then=self._bcast_header_msg))
        h = self._bcast_hdr
        meta, manifest, tensors = self.comm.wait(
            T.bcast_payload(self.comm, None, h, op.group, op.root, row=op))
        m = codec.decode_envelope(h, meta, manifest, tensors, where=C.MESH_BEFORE_PHASE_B)
        self.cur = (m.meta, m.tensors)
        return m.msg

    def _bcast_root(self, rows, op):
        """The leader (mesh rank 0) broadcasts the model's message and decodes nothing
        back: what it sends is what it holds. As a mesh rank it runs no check at
        mesh_before_phase_b: that place's checks are leader_before_broadcast's, which
        it ran on receipt (tests/test_codec.py holds the two places equal)."""
        if op.kind == ENV_HDR:
            with self.cv:
                env = rows[0].make(self.v, self.cfg)
            w = self._bcast_wire = self._mesh_wire(env)
            self.comm.wait(T.bcast_header(self.comm, w.header, op.group, op.root,
                                          "envelope", row=op))
            return codec.header_msg(w.info)
        w, self._bcast_wire = self._bcast_wire, None
        self.comm.wait(T.bcast_payload(self.comm, w.payload, w.info, op.group, op.root,
                                       row=op))
        return M.summary("envelope", self.cur[0])

    def _mesh_wire(self, env: Msg):
        """What the leader broadcasts: an INFER is relayed as the bytes the comms thread
        received and validated (codec.relay checks they are the model's message); a
        terminal it decided or relays is encoded from the model's message (ids from
        model.messages.wire_ids)."""
        if env.action == C.Action.INFER:
            rec = self.received.pop(env.call_id)   # what the comms thread received
            self.cur = (rec.meta, rec.tensors)
            return codec.relay("envelope", env, rec.meta, rec.wire)
        return codec.wire(codec.encode_envelope_msg(env, {}, {}, prev=None,
                                                    where=C.LEADER_BEFORE_BROADCAST))

    def _result_frames(self, msg: Msg):
        """Result preflight, before the result header (commitment point): the ids and
        the observed count are the model's message (`result` / `error_result`)."""
        if msg.action != C.Action.INFER:
            return codec.encode_result_msg(msg, {}, {}, envelope_meta=None)
        meta, tensors = self.cur
        spoil = not msg.valid     # the leader_bad_result fault (model: spoil_result)
        t_b = (self.t_b_end - self.t_b_start) * 1000.0
        idle = 0.0 if self.last_b_end is None else \
            max(0.0, (self.t_b_start - self.last_b_end) * 1000.0)
        self.last_b_end = self.t_b_end
        with workload_call("result"):
            out = _returned("tensors dict (name -> tensor)", self.work.result(meta, tensors))
        # The workload reports what it used (digest, start frame); the envelope's
        # start frame is the fallback for a workload that reports none.
        with workload_call("result_meta"):
            measured = _returned("dict of result fields", self.work.result_meta(meta, out))
        fields = {"mesh_current_start_frame": meta["current_start_frame"],
                  "t_b_ms": round(t_b, 3), "t_mesh_idle_ms": round(idle, 3), **measured}
        if spoil:   # a start frame rank0's check refuses, framed without the preflight
            fields["mesh_current_start_frame"] = meta["current_start_frame"] + 1
            self._event(FAULT, what="leader_bad_result", field="mesh_current_start_frame")
            return codec.encode_unchecked("result", M.full_meta("result", msg, fields), out)
        with workload_call("result/result_meta: the result was refused by the preflight:"):
            # the envelope's tensors too: latents_out must keep latents_in's shape
            return codec.encode_result_msg(msg, fields, out, envelope_meta=meta,
                                           envelope_tensors=tensors)

    # ------------------------------------------------------------------ events
    def _event(self, ev, **kw):
        self.trace.write(dict(ev=ev, rank=self.p, role=self.role, t_ns=time.monotonic_ns(),
                              **kw))

    def release_event(self, reason: str):
        self._event(RELEASE, reason=reason)


def _parity_detail(got, members, names) -> str:
    """Name the mismatched parity keys and the ranks that differ from the majority."""
    keys = ["cond_flag (a flag that adds a collective)"] + list(names)
    cols = [c for c in range(len(keys)) if len({row[c] for row in got}) > 1]
    values = [row[cols[0]] for row in got]
    common = max(set(values), key=values.count)
    odd = [members[i] for i, x in enumerate(values) if x != common]
    return f"key={', '.join(keys[c] for c in cols)} differs on ranks {odd} (others agree)"


def _side(row) -> tuple:
    """What identifies a comms-thread row across the pair states it appears in: its op
    and its functions (the pair state is src/dst only)."""
    return (row.op, row.guard, row.accept, row.update, row.make)


def _backend_op(row_op, index) -> tuple:
    """(op, group, peer or root as a group rank) of the one backend op a control-plane
    row performs, as the transport names it."""
    if isinstance(row_op, Send):
        return ("send", WORLD, index[row_op.peer])
    if isinstance(row_op, Recv):
        return ("recv", WORLD, index[row_op.peer])
    return (row_op.op, row_op.group, row_op.root)


def _allows(row_op, op) -> bool:
    """Does a row's op allow the op a thread is about to issue?"""
    if type(row_op) is not type(op):
        return False
    if isinstance(op, Send):
        return row_op == op
    if isinstance(op, Recv):
        return row_op.peer == op.peer and bool(set(row_op.kinds) & set(op.kinds))
    return row_op == op

