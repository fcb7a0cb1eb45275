"""The table interpreter: each thread of each rank executes its role's rows from model/.

The loop is the same for every role: under the process lock, evaluate the model's
guards on the local variables (the same `model.guards` functions the checker explores),
pick an enabled row, perform its op on torch.distributed, apply the model's update,
write a trace event. A thread with no enabled row waits; a state with no row at all is
a crash with a reason. The runtime never decides *whether* something is allowed, only
*which* allowed row to take (scheduling policy) and *what real work* a row does
(Phase A/B/C through the workload).

The rank0 comms thread keeps a receive posted while it sends: its state offers both a
send row and a receive row, and the interpreter drives both as async jobs, completing
whichever finishes first (PROTOCOL.md, Overlap).
"""
from __future__ import annotations

import hashlib
import json
import threading
import time

import torch

from lockstep.model import contract as C
from lockstep.model.events import FAULT, RELEASE, local_subject, step_event
from lockstep.model import guards as G
from lockstep.model.messages import Msg
from lockstep.model.ops import (COND, COUNTS, ENV_HDR, ENV_PAY, GEN, MESH, PARITY, RES_HDR,
                       WORLD, Coll, Exit, Local, Recv, Send, op_text)
from lockstep.model.semantics import DEAD_THREAD, Model
from lockstep.model.tables import FINAL, THREADS

from . import codec, wire
from .groups import GuardedComm
from .workload import envelope_fields

LOCAL_ORDER = ("exit", "hard_cut", "preflight_fails", "build_envelope", "decode_result",
               "drop_stale_result", "reject_result", "drop_after_failure",
               "queue_shutdown", "queue_noop", "queue_result", "take_envelope")


class TableViolation(RuntimeError):
    """The runtime was asked to do something no row allows."""


class WrongGroup(RuntimeError):
    pass


class RankInterpreter:
    def __init__(self, model: Model, p: int, groups, workload, tracer, *, abort_poll,
                 opts: dict):
        self.m, self.p, self.cfg = model, p, model.cfg
        self.groups, self.work, self.trace = groups, workload, tracer
        self.abort_poll, self.opts = abort_poll, opts
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
        self.deadline = float(opts.get("op_deadline_s", 30.0))
        self.fault = opts.get("fault") or {}
        # real data beside the model's summaries, keyed by call_id
        self.env_frames, self.env_meta, self.times = {}, {}, {}
        self.results = {}
        self.cur = None             # mesh: (meta, tensors) of the current envelope
        self.prev_meta = None
        self.last_b_end = None
        self.t_b_start = 0.0
        self.outputs = []
        self._comms_jobs = [None, None, None, None]
        self.comm = GuardedComm(groups, p, check=self._table_check, abort_poll=abort_poll,
                                op_deadline_s=self.deadline)

    # ------------------------------------------------------------------ context
    def ctx(self) -> str:
        v = self.v
        env = getattr(v, "env", None)
        if env is not None:
            ids = f"call_id={env.call_id} chunk_index={env.chunk} cache_epoch={env.epoch}"
        elif self.role == "rank0":
            ids = (f"call_id={v.next_call - 1} chunk_index={v.next_chunk - 1} "
                   f"cache_epoch={v.epoch}")
        else:
            ids = "call_id=- chunk_index=- cache_epoch=-"
        return f"rank={self.p} role={self.role} {ids} group={self.last_group}"

    # ------------------------------------------------------------------ main loop
    def run_thread(self, t: int) -> None:
        thread = self.threads[t]
        while True:
            with self.cv:
                rows = self._wait_enabled(t)
                if rows is None:
                    return
                kinds = {type(r.op) for r in rows}
                if Exit in kinds or Local in kinds:
                    row = self._choose_local(t, rows)
                    rows = None
            if rows is None:
                self._do_local(t, row)
            elif thread == "comms":
                self._comms_step(t, rows)
            elif Coll in kinds:
                self._coll(t, rows)
            elif Send in kinds:
                self._send(t, rows[0])
            else:
                self._recv(t, rows)

    def _wait_enabled(self, t):
        while True:
            if self.exit is not None:
                return None
            pc = self.pcs[t]
            if pc in (FINAL, DEAD_THREAD):
                return None
            rows = self.table[t].get(pc)
            if not rows:
                raise TableViolation(f"{self.name}: no row leaves state {pc!r}")
            ok = [r for r in rows if (r.guard is None or r.guard(self.v, self.cfg))
                  and self._joined(t, r) and self._fault_allows(r)]
            if ok:
                return ok
            reason = self.abort_poll()
            if reason:
                raise wire.Released(reason)
            self.cv.wait(0.02)

    def _joined(self, t, row) -> bool:
        if "join_comms" not in row.tags:
            return True
        return all(pc in (FINAL, DEAD_THREAD) for u, pc in enumerate(self.pcs) if u != t)

    def _fault_allows(self, row) -> bool:
        """Fault rows fire only where the run's fault-injection switch says."""
        if "fault" not in row.tags:
            return True
        f = self.fault
        want = {"preflight_fails": "rank0_preflight", "validation_raises": "leader_reject",
                "wrong_group_caught": "wrong_group"}.get(row.label)
        if not f or f.get("name") != want or f.get("rank", self.p) != self.p:
            return False
        chunk = self.v.next_chunk if self.role == "rank0" else self.v.env.chunk
        return chunk == f.get("at_chunk", 0)

    def _choose_local(self, t, rows):
        if self.role == "rank0" and self.threads[t] == "main":
            cut_at = self.opts.get("hard_cut_at")
            rows = [r for r in rows if r.label != "hard_cut" or
                    (cut_at is not None and self.v.next_chunk == cut_at)]
            rows = [r for r in rows if r.label != "queue_noop"]
            if not rows:
                return None
        order = {name: i for i, name in enumerate(LOCAL_ORDER)}
        # A fault row is only enabled here when its switch fires now: it goes first.
        return min(rows, key=lambda r: (0 if "fault" in r.tags else 1,
                                        0 if isinstance(r.op, Exit) else 1,
                                        order.get(r.label, 99)))

    # ------------------------------------------------------------------ apply + trace
    def _apply(self, t, row, msg=None, t0=None, **ev):
        """Under the lock: the model's update, the new control state, the trace."""
        if self.exit is not None:
            # Another thread of this process already left (an Exit ends the process):
            # work finished outside the lock after that is dropped, never traced.
            return
        before = self.v
        if row.update is not None:
            self.v = row.update(self.v, self.cfg, msg)
        if msg is None and isinstance(row.op, Local):
            msg = local_subject(before, self.v)
        now = time.monotonic_ns()
        if isinstance(row.op, Exit):
            if row.op.how == "thread_die":
                self.pcs[t] = DEAD_THREAD
            else:
                self.exit = (row.op.how, row.op.reason)
        else:
            self.pcs[t] = row.dst
        self.trace.write(step_event(self.p, self.role, self.threads[t], self.i[t], row,
                                    msg=msg, t_ns=now, dur_ns=now - (t0 or now), **ev))
        self.i[t] += 1
        self.cv.notify_all()

    # ------------------------------------------------------------------ local rows
    def _do_local(self, t, row):
        if row is None:           # only rows the policy holds back: wait a little
            with self.cv:
                self.cv.wait(0.01)
            return
        t0 = time.monotonic_ns()
        meas = None
        label = row.label
        if label == "build_envelope":
            self._phase_a()
        elif label == "preflight_fails":
            self._preflight_fails()
        elif label == "decode_result":
            meas = self._phase_c()
        elif label == "validation_raises":
            self._event(FAULT, what="leader_reject", where="leader validation")
        elif label == "envelope_valid":
            self._validate()
        elif label == "wrong_group_caught":
            self._wrong_group()
        with self.cv:
            self._apply(t, row, None, t0, meas=meas)

    def _phase_a(self):
        v = self.v
        msg = G.new_envelope(v, self.cfg)     # the message the model's update enqueues
        t_a0 = time.monotonic_ns()
        extra, tensors = self.work.build(msg.chunk, msg.epoch, msg.init_cache,
                                         self.cfg.regime, self.cfg.steps)
        fields = envelope_fields(extra, regime=self.cfg.regime, steps=self.cfg.steps)
        frames = codec.encode_envelope_msg(msg, fields, tensors,
                                           prev=self.prev_meta)   # preflight
        self.prev_meta = meta = {**fields, **codec.M.wire_ids("envelope", msg)}
        self.env_frames[msg.call_id], self.env_meta[msg.call_id] = frames, meta
        self.times[msg.call_id] = {"tA0_ns": t_a0, "tA1_ns": time.monotonic_ns()}

    def _preflight_fails(self):
        msg = G.new_envelope(self.v, self.cfg)
        fields = envelope_fields({}, regime=self.cfg.regime, steps=self.cfg.steps)
        bad = {"latents_in": torch.zeros(2, 2, dtype=torch.float64)}
        try:
            codec.encode_envelope_msg(msg, fields, bad, prev=self.prev_meta)
        except (codec.CodecError, C.ContractError) as e:
            self._event(FAULT, what="rank0_preflight", error=str(e))
            return
        raise TableViolation("injected preflight fault did not raise")

    def _terminal_frames(self, msg: Msg):
        """Header-only envelope: every id from the model's message (model.messages)."""
        return codec.encode_envelope_msg(msg, {}, {}, prev=self.prev_meta)

    def _phase_c(self):
        head = self.v.decode_q[0]
        meta, tensors = self.results.pop(head.call_id)
        self.outputs.append((head.chunk, head.epoch, self.work.decode(meta, tensors)))
        tm = self.times.pop(head.call_id, {})
        tm.update(tEmit_ns=time.monotonic_ns(), t_b_ms=meta.get("t_b_ms"),
                  t_mesh_idle_ms=meta.get("t_mesh_idle_ms"),
                  q_in=self.v.inflight, q_out=len(self.v.decode_q))
        return tm

    def _validate(self):
        meta, tensors = self.cur
        C.validate_envelope(meta, {k: C.TensorDesc(str(t.dtype).split(".")[-1],
                                                   tuple(t.shape))
                                   for k, t in tensors.items()},
                            where="leader_before_broadcast")

    def _wrong_group(self):
        """The workload asks for world_pg; the guarded wrapper refuses before the
        backend is called because the table's row says mesh_pg."""
        try:
            self.guarded_all_reduce(torch.zeros(1), WORLD)
        except WrongGroup as e:
            self._event(FAULT, what="wrong_group", error=str(e))
            return
        raise TableViolation("wrong-group call was not refused")

    def guarded_all_reduce(self, t, group_name):
        """The workload's collectives go through runtime.groups.GuardedComm, whose check
        is the table: a collective on a group the current state's rows do not name is
        refused before the backend is called (this is how a wrong-group collective
        becomes a crash instead of a hang)."""
        self.comm.all_reduce(t, group_name)
        return t

    def _table_check(self, op: str, group: str, peer) -> None:
        row_groups = {r.op.group for r in self.table[0].get(self.pcs[0], ())
                      if isinstance(r.op, Coll)}
        if group not in row_groups:
            raise WrongGroup(f"{op} on {group} refused: state {self.pcs[0]!r} allows "
                             f"only {sorted(row_groups)}")

    # ------------------------------------------------------------------ p2p
    def _peer(self, row) -> int:
        return self.m.index[row.op.peer]

    def _pollkw(self, what):
        if what.startswith(("send", "recv", "comms")):
            self.last_group = "world_pg(p2p)"
        # the label is only formatted if the op fails: it is off the per-chunk path
        return {"abort_poll": self.abort_poll, "deadline_s": self.deadline,
                "what": lambda: f"{self.ctx()} {what}"}

    def _send_job(self, row, msg):
        dst = self._peer(row)
        if row.op.kind == ENV_HDR:
            frames = self.env_frames.get(msg.call_id) if msg.action == C.Action.INFER \
                else self._terminal_frames(msg)
            if msg.action != C.Action.INFER:
                self.env_frames[msg.call_id] = frames
            parts = [frames.header]
        elif row.op.kind == ENV_PAY:
            parts = [codec.pack_payload(self.env_frames[msg.call_id])]
        elif row.op.kind == RES_HDR:
            self.result_frames = self._result_frames(msg)   # result preflight
            parts = [self.result_frames.header]
        else:
            parts = [codec.pack_payload(self.result_frames)]
        return wire.send_parts(parts, dst)

    def _after_send(self, row, msg):
        if row.op.kind == ENV_PAY or (row.op.kind == ENV_HDR and msg.action != C.Action.INFER):
            self.env_frames.pop(msg.call_id, None)

    def _send(self, t, row):
        t0 = time.monotonic_ns()
        with self.cv:
            msg = row.make(self.v, self.cfg)
        wire.run_one(self._send_job(row, msg), **self._pollkw(op_text(row.op)))
        self._after_send(row, msg)
        with self.cv:
            self._apply(t, row, msg, t0, peer=row.op.peer, chan_i=self._next_chan("send"))

    def _next_chan(self, d):
        n = self.chan_i[d]
        self.chan_i[d] += 1
        return n

    def _recv_job(self, rows):
        src = self._peer(rows[0])
        kind = rows[0].op.kinds[0]
        if kind in (ENV_HDR, RES_HDR):
            return self._hdr_then_msg(src, "envelope" if kind == ENV_HDR else "result")
        return self._payload_then_msg(src, kind)

    def _hdr_then_msg(self, src, expect):
        h = yield from wire.recv_header(src, expect)
        self._hdr = h
        return codec.header_msg(h)

    def _payload_then_msg(self, src, kind):
        h = self._hdr
        meta, manifest, tensors = yield from wire.recv_payload(h, src)
        if kind == ENV_PAY:
            m = codec.decode_envelope(h, meta, manifest, tensors, where="leader_before_broadcast")
            self.cur = (m.meta, m.tensors)
            return m.msg
        env_meta = self.env_meta.get(h.call_id)
        m = codec.decode_result(h, meta, manifest, tensors, envelope_meta=env_meta)
        self.results[h.call_id] = (m.meta, m.tensors)
        self.times.setdefault(h.call_id, {})["tRecv_ns"] = time.monotonic_ns()
        self.env_meta.pop(h.call_id, None)
        return m.msg

    def _pick_accepting(self, rows, msg):
        ok = [r for r in rows if r.accept is None or r.accept(self.v, self.cfg, msg)]
        if not ok:
            raise TableViolation(f"{self.name}: no row at {rows[0].src!r} accepts "
                                 f"{msg}")
        return ok[0]

    def _recv(self, t, rows):
        t0 = time.monotonic_ns()
        msg = wire.run_one(self._recv_job(rows), **self._pollkw(op_text(rows[0].op)))
        with self.cv:
            row = self._pick_accepting(rows, msg)
            self._apply(t, row, msg, t0, peer=row.op.peer, chan_i=self._next_chan("recv"))

    def _comms_step(self, t, rows):
        """Drive the posted send and the posted receive together."""
        sends = [r for r in rows if isinstance(r.op, Send)]
        recvs = [r for r in rows if isinstance(r.op, Recv)]
        js = self._comms_jobs   # [send job, recv job, (send row, msg), recv rows]
        t0 = time.monotonic_ns()
        with self.cv:
            if sends and js[0] is None:
                msg = sends[0].make(self.v, self.cfg)
                js[0], js[2] = self._send_job(sends[0], msg), (sends[0], msg)
            if recvs and js[1] is None:
                js[1], js[3] = self._recv_job(recvs), recvs
        i, value = wire.poll([js[0], js[1]], **self._pollkw("comms"))
        # The other side may have moved while this op was in flight (the control state
        # is a pair), so the row is looked up again in the current state by its label.
        if i == 0:
            row, msg = js[2]
            js[0] = js[2] = None
            self._after_send(row, msg)
            with self.cv:
                row = self._current_row(t, [row], msg)
                self._apply(t, row, msg, t0, peer=row.op.peer,
                            chan_i=self._next_chan("send"))
        else:
            recv_rows = js[3]
            js[1] = js[3] = None
            with self.cv:
                row = self._current_row(t, recv_rows, value)
                self._apply(t, row, value, t0, peer=row.op.peer,
                            chan_i=self._next_chan("recv"))

    def _current_row(self, t, rows, msg):
        labels = {r.label for r in rows}
        now = [r for r in self.table[t].get(self.pcs[t], ()) if r.label in labels
               and (r.guard is None or r.guard(self.v, self.cfg))]
        if not now:
            raise TableViolation(f"{self.name}: {sorted(labels)} completed but state "
                                 f"{self.pcs[t]!r} no longer allows it")
        return self._pick_accepting(now, msg) if isinstance(now[0].op, Recv) else now[0]

    # ------------------------------------------------------------------ collectives
    def _pg(self, name):
        return self.groups.world_pg if name == WORLD else self.groups.mesh_pg

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
        pg = self._pg(op.group)
        kw = self._pollkw(f"{op_text(op)} seq {self.gseq[op.group]}")
        meas = None
        if op.kind == PARITY:
            with self.cv:
                key = int(rows[0].make(self.v, self.cfg))
            names, digests = self._parity_vector(key)
            got = wire.run_one(wire.all_gather_ints([key] + digests, pg,
                                                    len(self._members(op.group))), **kw)
            value = tuple(bool(row[0]) for row in got)
            decide = tuple(got)
            meas = {"parity_keys": names, "digests": [list(row[1:]) for row in got]}
            if len(set(got)) > 1:
                self.detail = _parity_detail(got, self._members(op.group), names)
        elif op.kind == COUNTS:
            with self.cv:
                planned = int(rows[0].make(self.v, self.cfg))
            self.t_b_start = time.monotonic()
            got = wire.run_one(wire.all_gather_ints([planned], pg,
                                                    len(self._members(op.group))), **kw)
            value = decide = tuple(x[0] for x in got)
        elif op.kind in (ENV_HDR, ENV_PAY):
            value = decide = self._bcast(rows, op, pg, kw)
        elif op.kind == GEN:
            with self.cv:
                idx = self.v.calls_done
            meta, tensors = self.cur
            self.work.generator_call(idx, meta, tensors,
                                     lambda x: self.guarded_all_reduce(x, op.group))
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

    def _parity_vector(self, key: int):
        """One digest per parity key (sorted), so a mismatch names the key."""
        d = dict(self.opts.get("parity", {}))
        names = sorted(d)
        digests = [int.from_bytes(hashlib.sha256(json.dumps(d[k], sort_keys=True).encode())
                                  .digest()[:7], "little") for k in names]
        return names, digests

    def _bcast(self, rows, op, pg, kw):
        root_global = self._members(op.group)[op.root]
        is_root = root_global == self.p
        if op.kind == ENV_HDR:
            frames = None
            if is_root:
                with self.cv:
                    env = rows[0].make(self.v, self.cfg)
                frames = self._mesh_frames(env)
                self._bframes = frames
            h = wire.run_one(wire.bcast_header(frames, root_global, pg, "envelope"), **kw)
            self._hdr = h
            return codec.header_msg(h)
        frames = self._bframes if is_root else None
        h = self._hdr
        meta, manifest, tensors = wire.run_one(
            wire.bcast_payload(frames, h, root_global, pg), **kw)
        m = codec.decode_envelope(h, meta, manifest, tensors, where="mesh_before_phase_b")
        self.cur = (m.meta, m.tensors)
        return m.msg

    def _mesh_frames(self, env: Msg):
        """The leader re-encodes what it validated (or the terminal it decided): the ids
        are the model's message's (model.messages.wire_ids)."""
        if env.action == C.Action.INFER:
            meta, tensors = self.cur
            return codec.encode_envelope_msg(env, meta, tensors, prev=None,
                                             where="leader_before_broadcast")
        return codec.encode_envelope_msg(env, {}, {}, prev=None,
                                         where="leader_before_broadcast")

    def _result_frames(self, msg: Msg):
        """Result preflight, before the result header (commitment point): the ids and
        the observed count are the model's message (`result` / `error_result`)."""
        if msg.action != C.Action.INFER:
            return codec.encode_result_msg(msg, {}, {}, envelope_meta=None)
        meta, tensors = self.cur
        t_b = (self.t_b_end - self.t_b_start) * 1000.0
        idle = 0.0 if self.last_b_end is None else \
            max(0.0, (self.t_b_start - self.last_b_end) * 1000.0)
        self.last_b_end = self.t_b_end
        out = self.work.result(meta, tensors)
        fields = {"mesh_current_start_frame": meta["current_start_frame"],
                  "t_b_ms": round(t_b, 3), "t_mesh_idle_ms": round(idle, 3)}
        return codec.encode_result_msg(msg, fields, out, envelope_meta=meta)

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
