"""Replay a run's traces through the model: happens-before from matching, then one
linearisation stepped through `Model.step` from `Model.initial_state()`.

Happens-before, with no clock compared across ranks:
  * program order per (rank, thread) (`i`);
  * each send to the receive with the same directed channel and `chan_i`;
  * each collective event to the other members' events with the same group and `gseq`.
rank0's comms thread is the one refinement: its control state is a pair (send side,
receive side) and the runtime keeps a send and a receive in flight together, completing
whichever finishes first. Its send-side events are ordered among themselves, its
receive-side events among themselves, and its other rows (comms_done, the error exit)
after both; the order in which a send and a receive that were both in flight completed
is not program order. (A gloo run shows why: rank0 records sending envelope k+1 before
receiving the rest of result k while the leader records sending result k before
receiving envelope k+1; under the rendezvous reading only the second order exists.)
Checking a comms event then compares only its own side of the pair state with the model
(`src`/`dst` must also chain within the trace, so no field escapes the check).

The linearisation follows each rank's file order where it can: the runtime writes a
rank's events under the process lock in the order it applied their updates to the
shared local variables, so file order is the order rank0's two threads changed them.
A joint transition fires as soon as every participant's event is ready (all its
happens-before predecessors replayed), even if that event is not yet first in its
rank's file; if every rank is blocked, any ready event within a short window is tried.
The greedy choice is sound: whatever it accepts is a model execution consistent with
happens-before. Crashes, the watchdog and the abort flag are placed last, when nothing
else can move: they are not ordered by any message, so that placement is always
consistent with happens-before.

Matching a step to the model: the transition is built directly from the tables at the
participants' current control states, indexed by (proc, thread, state, label), with the
same rules as `Model.enabled` (guards, rendezvous/buffered p2p, collective signatures,
`accept`, non-members): scanning `enabled` for every event would cost an order of
magnitude more. `verify=True` asserts for every step that the built transition is one of
`Model.enabled(state)` (the tests run it on every configuration they replay).

Endings:
  * a rank whose trace ends with no exit and no release crashed (kill -9): the model's
    crash transition, after its recorded events (the configuration's fault budget is
    raised to the number of crashed ranks: a kill is the environment's, not the
    protocol's). A send or collective another rank completed with the crashed rank,
    whose event the crashed rank never wrote (killed after the op, before the line), is
    replayed as that rank's lost event, at most one per thread, and reported; the same
    holds for a released rank (the watchdog's os._exit does not wait for the line);
  * a rank whose `release` event names itself as the root cause (``via: own``: it failed
    outside its table, e.g. a per-op deadline, a refused op, an uncaught error, and set
    the abort flag itself; model/release.py) is replayed the same way: the model's crash
    of that rank (it stops beating without a clean mark), then the watchdog;
  * `release` events: the watchdog transition (heartbeat of a failed rank lost) and the
    abort transition, which releases every live rank at once. A rank that died of an
    uncaught error the runtime did not trace (no exit step, no release event, but its
    one-line error exit in rank{R}.err; load.py) is released the same way: its error
    exit set the abort flag;
  * an exit that sets the abort flag is taken last for the same reason;
  * a send that completed into the transport after its peer had ended (gloo sends are
    eager; the rendezvous reading would block it until the abort flag) is applied to the
    sender alone and reported as tolerated.
"""
from __future__ import annotations

import time

LOST_COLLS = 3   # collectives an ended rank may have completed without writing them
from typing import Optional

from lockstep.model.ops import Coll, Exit, Local, Recv, Send
from lockstep.model.properties import (check_progress_at_exit, check_state, check_terminal,
                              check_transition)
from lockstep.model.semantics import (ABORTED, CRASHED, DEAD_THREAD, ERROR, FINAL, GROUPS, LIVE,
                             Model, State, Tr)
from lockstep.model.tables import THREADS

from .load import Ev, Run, fmt_msg
from .views import HEADER_KINDS, header_view, local_subject, msg_ok

FIRED, WAIT, BAD = 0, 1, 2
OPCLASS = {Send: "send", Recv: "recv", Coll: "coll", Exit: "exit", Local: "local"}
WINDOW = 64
_COMM = ("send", "recv", "coll")
_GI = {g: k for k, g in enumerate(GROUPS)}


_new = tuple.__new__        # _new(Tr, (kind, parts, msg, info)): a Tr without the
#                             namedtuple's Python-level __new__
_EMPTY = {}


class Divergence:
    """The first step the model does not allow, with the context to debug it."""

    def __init__(self, step, rank, who, event, reason, allowed, context, verdict=None,
                 state=""):
        self.step, self.rank, self.who, self.event = step, rank, who, event
        self.reason, self.allowed, self.context = reason, allowed, context
        self.verdict, self.state = verdict, state

    def text(self) -> str:
        out = [f"FIRST DIVERGENCE at step {self.step} (after {self.step - 1} model "
               f"transitions replayed)"]
        if self.event is not None:
            e = self.event
            out.append(f"  {self.who}, {e.where()}:")
            out.append(f"    recorded: {e.brief()}")
        elif self.who:
            out.append(f"  {self.who}")
        out.append(f"  why: {self.reason}")
        if self.verdict:
            out.append(f"  property: {self.verdict}")
        if self.state:
            out.append(f"  model state: {self.state}")
        out.append(f"  the model allowed here ({len(self.allowed)}):")
        out += [f"    - {a}" for a in self.allowed[:12]] or ["    (nothing)"]
        if len(self.allowed) > 12:
            out.append(f"    ... {len(self.allowed) - 12} more")
        out.append("  last events of every rank (-> = next, not replayed):")
        for r, lines in self.context.items():
            out += [f"    {line}" for line in lines]
        return "\n".join(out)

    def __str__(self):
        return self.text()


class ReplayResult:
    def __init__(self):
        self.ok = False
        self.steps = 0
        self.events = 0
        self.replayed = 0
        self.seconds = 0.0
        self.divergence: Optional[Divergence] = None
        self.violations = []      # (step, Violation, event or None)
        self.notes = []
        self.state: Optional[State] = None
        self.model: Optional[Model] = None
        self.accepted = {}        # call_id -> result Msg put in the decode queue
        self.decoded = {}         # call_id -> times decoded
        self.ended = {}           # call_id -> how it left the queue undecoded
        self.emitted = []         # (chunk, epoch, call_id) in emission order
        self.lost = []            # synthesised lost events (rank, text)
        self.absorbed = []        # tolerated sends to an ended peer

    @property
    def events_per_s(self) -> float:
        return self.replayed / self.seconds if self.seconds > 0 else 0.0


class Replayer:
    def __init__(self, run: Run, verify: bool = False, window: int = WINDOW):
        self.run, self.verify, self.window = run, verify, window
        cfg = run.cfg
        crashed = run.crashed
        if len(crashed) > cfg.faults:
            cfg = cfg.with_(faults=len(crashed))
        self.cfg = cfg
        self.m = m = Model(cfg)
        self.n = m.n
        self.s = m.initial_state()
        self.init_pcs = [pr.pcs for pr in self.s.procs]
        self.res = ReplayResult()
        self.res.model = m
        if crashed:
            self.res.notes.append(
                f"crashed (trace ends with no exit and no release, or a release naming "
                f"itself as the root cause): {', '.join(m.names[r] for r in crashed)}; "
                f"replayed as kill -9 (fault budget {run.cfg.faults} -> {cfg.faults})"
                if cfg.faults != run.cfg.faults else
                f"crashed: {', '.join(m.names[r] for r in crashed)}")
        errs = [rt.rank for rt in run.ranks if rt.ended == "error_exit"]
        if errs:
            self.res.notes.append(
                f"untraced error exit (no exit step or release event; its rank*.err has "
                f"the reason): {', '.join(m.names[r] for r in errs)}; replayed as released "
                f"by the abort flag (an uncaught error sets it on the way out)")
        # (proc, thread) -> state -> label -> rows; state -> collective rows
        self.idx = []
        self.coll_rows = []       # (p)(t) state -> collective rows there
        self.uniform = []         # (p)(t) state -> its collective rows share group,
        #                           signature and `make` (the fast path of _coll)
        for p in range(self.n):
            per_t, per_c, per_u = [], [], []
            for t, table in enumerate(m.tables[p]):
                d, c, u = {}, {}, {}
                for pc, rows in table.items():
                    lab = {}
                    for r in rows:
                        lab.setdefault(r.label, []).append(r)
                    d[pc] = lab
                    cr = [r for r in rows if type(r.op) is Coll]
                    if cr:
                        c[pc] = cr
                        sigs = {(r.op.group, r.op.op, r.op.root, r.op.kind) for r in cr}
                        if len(sigs) == 1 and len({r.make for r in cr}) == 1:
                            g, o, root, kind = sigs.pop()
                            u[pc] = (o, root, kind)
                per_t.append(d)
                per_c.append(c)
                per_u.append(u)
            self.idx.append(per_t)
            self.coll_rows.append(per_c)
            self.uniform.append(per_u)
        # non-members that have some collective row on the group somewhere: only
        # they can trip the model's "not a member" rule
        self.non_members = {g: tuple(
            p for p in range(self.n) if p not in mem and any(
                r.op.group == g for per_pc in self.coll_rows[p] for rs in per_pc.values()
                for r in rs)) for g, mem in m.members.items()}
        self.comms = (0, THREADS["rank0"].index("comms"))
        self.nthreads = [len(THREADS[role]) for role in m.roles]
        self.sent = {}            # (src, dst) -> messages sent so far
        self.rcvd = {}            # (src, dst) -> messages received so far
        self.lost_per_thread = {}
        self.end_phase = False
        self._guard_false = None
        self.static = [[{} for _ in range(k)] for k in self.nthreads]
        self._link()

    # ------------------------------------------------------------------ matching
    def _link(self):
        m, run = self.m, self.run
        p2p, colls = {}, {}
        self.events = [rt.steps for rt in run.ranks]
        comms_t = self.comms[1]
        for rt in run.ranks:
            r = rt.rank
            last = [None, None]           # rank0 comms: latest event on each side
            for ev in rt.steps:
                ev.done = False               # a Run may be replayed more than once
                ev.partner = ev.dup = None
                if r == 0 and ev.t == comms_t:
                    lane = _lane(ev.src, ev.dst)
                    ev.lane = lane
                    if lane is None:
                        ev.deps = tuple({id(x): x for x in last if x is not None}.values())
                        last = [ev, ev]
                    else:
                        ev.deps = (last[lane],) if last[lane] is not None else ()
                        last[lane] = ev
                elif ev.prev is not None:
                    ev.deps = (ev.prev,)
                op = ev.op
                if op == "send" or op == "recv":
                    q = m.index.get(ev.peer)
                    key = (r, q, ev.chan_i) if op == "send" else (q, r, ev.chan_i)
                    slot = p2p.get(key)
                    if slot is None:
                        slot = p2p[key] = [None, None]
                    k = 0 if op == "send" else 1
                    if slot[k] is not None:
                        ev.dup = slot[k]
                    else:
                        slot[k] = ev
                elif op == "coll":
                    key = (ev.group, ev.gseq)
                    inst = colls.get(key)
                    if inst is None:
                        inst = colls[key] = {}
                    if r in inst:
                        ev.dup = inst[r]
                    else:
                        inst[r] = ev
                    ev.inst = inst
        for a, b in p2p.values():
            if a is not None and b is not None:
                a.partner, b.partner = b, a
        self.p2p = p2p
        self.heads = [0] * self.n

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _ready(ev) -> bool:
        for d in ev.deps:
            if not d.done:
                return False
        return True

    def _pending(self, r) -> int:
        """Events of rank r not replayed yet (counted from its head: only called when
        the replay is stuck or done, so the scan is short)."""
        evs, h = self.events[r], self.heads[r]
        while h < len(evs) and evs[h].done:
            h += 1
        self.heads[r] = h
        return sum(1 for e in evs[h:] if not e.done)

    def _gone(self, q) -> str:
        """Why rank q's trace has nothing more, when it ended without an exit."""
        rt = self.run.ranks[q]
        if self._pending(q) or rt.ended == "exit":
            return ""
        last = rt.steps[-1].line if rt.steps else 0
        return (f"; {self.m.names[q]}'s trace ends at line {last} ({rt.ended}"
                f"{', its last line cut short' if rt.truncated else ''})")

    def _who(self, p, t) -> str:
        return f"{self.m._who(p, t)} (rank {p})"

    def _own(self, ev, s, accept_msg=None, need_accept=False):
        """The row of `ev` at its thread's current model state, or (None, code, why).

        The static part (label, dst, op, peer, group, own side of the comms pair) depends
        only on the event's recorded fields and the model state, so it is cached per
        (proc, thread); guards and `accept` are evaluated every time."""
        p, t = ev.rank, ev.t
        pr = s.procs[p]
        if pr.status != LIVE:
            return None, BAD, lambda: (f"{self.m.names[p]} is no longer live in the model "
                                       f"({pr.status}: {pr.reason})")
        pc = pr.pcs[t]
        if ev.line:
            prev = ev.prev
            prev_dst = prev.dst if prev is not None else self.init_pcs[p][t]
            if ev.src != prev_dst:
                return None, BAD, lambda: (
                    f"recorded src {ev.src!r} does not continue from "
                    f"{'the previous event of the thread' if ev.prev else 'the initial state'}"
                    f" ({prev_dst!r})")
            key = (pc, ev.sk)
            cache = self.static[p][t]
            cands = cache.get(key)
            if cands is None:
                cands = cache[key] = self._static(p, t, pc, ev)
            if type(cands) is str:
                return None, BAD, cands
        else:       # a synthesised lost event: any row of its kind
            cands = [r for rows in self.idx[p][t].get(pc, _EMPTY).values() for r in rows
                     if OPCLASS[type(r.op)] == ev.op and
                     (type(r.op) is not Coll or r.op.group == ev.group)]
        cfg, v = self.cfg, pr.v
        guard_false = None
        for row in cands:
            if row.guard is not None and not row.guard(v, cfg):
                guard_false = row
                continue
            if need_accept and row.accept is not None and not row.accept(v, cfg,
                                                                         accept_msg):
                guard_false = guard_false or row
                continue
            return row, FIRED, None
        if guard_false is not None:
            self._guard_false = guard_false
            what = "does not accept the message" if need_accept and (
                guard_false.guard is None or guard_false.guard(v, cfg)) else \
                f"is not enabled (guard {getattr(guard_false.guard, '__name__', '?')} false)"
            return None, BAD, lambda: (f"row {guard_false.label} at {pc!r} {what}"
                                       + (f": {fmt_msg(accept_msg)}" if need_accept else ""))
        return None, BAD, lambda: f"no row of kind {ev.op} at {pc!r}"

    def _static(self, p, t, pc, ev):
        """Rows at `pc` matching the event's recorded fields, or the reason (a str)."""
        if pc == FINAL or pc == DEAD_THREAD:
            return f"thread {ev.thread} has already finished ({pc})"
        table = self.idx[p][t].get(pc, _EMPTY)
        cands = table.get(ev.label)
        if not cands:
            return (f"no row labelled {ev.label!r} leaves {self.m.names[p]}.{ev.thread} "
                    f"state {pc!r} (rows there: {', '.join(sorted(table)) or 'none'})")
        exact = ev.src == pc
        out = []
        for row in cands:
            if exact:
                if row.dst != ev.dst:
                    continue
            elif not _lane_ok(ev, row, pc):
                continue
            op = row.op
            cls = type(op)
            if OPCLASS[cls] != ev.op:
                return f"recorded op {ev.op!r}, but row {row.label} is {OPCLASS[cls]}"
            if (cls is Send or cls is Recv) and op.peer != ev.peer:
                return f"recorded peer {ev.peer!r}, but row {row.label} talks to {op.peer!r}"
            if cls is Coll and op.group != ev.group:
                return (f"recorded a collective on {ev.group}, but row {row.label} is "
                        f"{op.op} on {op.group} (collective on the wrong group)")
            out.append(row)
        if out:
            return out
        if exact:
            return (f"row {ev.label!r} at {pc!r} leads to "
                    f"{sorted(r.dst for r in cands)}, not {ev.dst!r}")
        return (f"recorded {ev.src!r} -> {ev.dst!r}, but the model's {ev.thread} thread "
                f"is at {pc!r}")

    # ------------------------------------------------------------------ firing
    def try_fire(self, ev: Ev, explain: bool = False):
        """Fire the transition of `ev` if it is ready. Returns FIRED/WAIT/BAD, or
        (code, reason) with explain."""
        code, why = self._try(ev, explain)
        if explain:
            return code, (why() if callable(why) else why)
        return code

    def _try(self, ev, explain):
        code, why = self._dispatch(ev)
        if code == WAIT and ev.line and self._ready(ev):
            # waiting for another rank is only worth it if this event's own row is
            # right: a wrong step is reported as such, not as a wait
            row, bad, bad_why = self._own(ev, self.s)
            if row is None and not self.s.abort:
                return bad, bad_why
        return code, why

    def _dispatch(self, ev):
        if ev.done:
            return FIRED, None
        s = self.s
        if s.abort:
            return WAIT, lambda: (f"the abort flag is set ({s.abort}): the model now "
                                  f"allows only the release of every live rank")
        if ev.dup is not None:
            return BAD, lambda: (f"a second event for the same "
                                 f"{'channel message' if ev.op != 'coll' else 'collective'}"
                                 f" ({_coord(ev)}; the first is at {ev.dup.where()})")
        op = ev.op
        if op == "local" or op == "exit":
            return self._local(ev)
        if op == "coll":
            return self._coll(ev)
        if self.cfg.p2p == "rendezvous":
            if op == "send":
                return self._rendezvous(ev, ev.partner)
            f = ev.partner
            if f is None:
                return WAIT, lambda: (f"no send with chan_i={ev.chan_i} was recorded by "
                                      f"{ev.peer}" + self._gone(self.m.index[ev.peer]))
            if not f.done and not self._ready(f):
                return WAIT, lambda: (f"waits for {ev.peer}'s matching send "
                                      f"({f.where()}), not yet ready")
            return self._rendezvous(f, ev)
        return self._buffered(ev)

    def _local(self, ev):
        s = self.s
        row, code, why = self._own(ev, s)
        if row is None:
            return code, why
        p, t = ev.rank, ev.t
        pr = s.procs[p]
        cls = type(row.op)
        if "join_comms" in row.tags and not all(
                q == FINAL or q == DEAD_THREAD for u, q in enumerate(pr.pcs) if u != t):
            return WAIT, lambda: (f"{row.label} joins the other thread, which is at "
                                  f"{[q for u, q in enumerate(pr.pcs) if u != t]}")
        if cls is Exit:
            if self.nthreads[p] > 1 and self._other_thread_pending(ev):
                return WAIT, lambda: "the process exits after its other thread's events"
            if row.op.how == "abort" and not self.end_phase:
                return WAIT, lambda: "an exit that sets the abort flag is taken last"
        tr = _new(Tr, ("exit" if cls is Exit else "local", ((p, t, row),), None, None))
        return self._commit(tr, (ev,), s)

    def _other_thread_pending(self, ev) -> bool:
        for e in self.events[ev.rank][self.heads[ev.rank]:]:
            if not e.done and e.t != ev.t:
                return True
        return False

    def _rendezvous(self, e, f):
        """e: the send event, f: the receive event (either may be None)."""
        if f is None:
            return WAIT, lambda: (f"no receive with chan_i={e.chan_i} was recorded by "
                                  f"{e.peer}" + self._gone(self.m.index[e.peer]))
        if e is None:
            return WAIT, lambda: "no matching send"
        for x in (e, f):
            if not x.done:
                for d in x.deps:
                    if not d.done:
                        return WAIT, lambda: (f"the matching event {x.where()} is not "
                                              f"ready (earlier events of its thread are "
                                              f"pending)")
        s = self.s
        row, code, why = self._own(e, s)
        if row is None:
            return code, lambda: (f"sender {self._who(e.rank, e.t)}: "
                                  + (why() if callable(why) else why))
        p, q = e.rank, f.rank
        key = (p, q)
        ci = self.sent.get(key, 0)
        if e.line and e.chan_i != ci:
            return BAD, lambda: (f"send is message #{e.chan_i} on {self.m.names[p]} -> "
                                 f"{self.m.names[q]}, but #{ci} is the next one")
        ri = self.rcvd.get(key, 0)
        if f.line and f.chan_i != ri:
            return BAD, lambda: (f"receive is message #{f.chan_i} on {self.m.names[p]} -> "
                                 f"{self.m.names[q]}, but #{ri} is the next one")
        cfg = self.cfg
        msg = row.make(s.procs[p].v, cfg)
        if e.has_msg and e.msg != msg:
            return BAD, lambda: (f"{self.m.names[p]} recorded sending {fmt_msg(e.msg)}, "
                                 f"the model's {row.label} sends {fmt_msg(msg)}")
        rrow, code, why = self._own(f, s, msg, True)
        if rrow is None:
            return code, lambda: (f"receiver {self._who(q, f.t)}: "
                                  + (why() if callable(why) else why))
        if row.op.kind not in rrow.op.kinds:
            return BAD, lambda: (f"framing: {row.op.kind} sent, but {rrow.label} expects "
                                 f"{'|'.join(rrow.op.kinds)}")
        if f.has_msg and f.msg != msg and not msg_ok(f.msg, msg, row.op.kind):
            return BAD, lambda: (f"{self.m.names[q]} recorded receiving {fmt_msg(f.msg)}, "
                                 f"the model's message is {fmt_msg(msg)}")
        tr = _new(Tr, ("p2p", ((p, e.t, row), (q, f.t, rrow)), msg, None))
        code, why = self._commit(tr, (e, f), s)
        if code == FIRED:
            self.sent[key] = ci + 1
            self.rcvd[key] = ri + 1
        return code, why

    def _buffered(self, ev):
        s, m, cfg = self.s, self.m, self.cfg
        if ev.op == "send":
            row, code, why = self._own(ev, s)
            if row is None:
                return code, why
            p = ev.rank
            q = m.index[row.op.peer]
            ci = self.sent.get((p, q), 0)
            if ev.line and ev.chan_i != ci:
                return BAD, lambda: (f"send is message #{ev.chan_i} on {m.names[p]} -> "
                                     f"{m.names[q]}, but #{ci} is the next one")
            chan = s.chans[m.chan_index[(p, q)]]
            if len(chan) >= cfg.eager:
                return WAIT, lambda: (f"the channel {m.names[p]} -> {m.names[q]} holds "
                                      f"{len(chan)} message(s) (eager={cfg.eager})")
            msg = row.make(s.procs[p].v, cfg)
            if ev.has_msg and ev.msg != msg:
                return BAD, lambda: (f"{m.names[p]} recorded sending {fmt_msg(ev.msg)}, "
                                     f"the model's {row.label} sends {fmt_msg(msg)}")
            tr = _new(Tr, ("send", ((p, ev.t, row),), msg, None))
            code, why = self._commit(tr, (ev,), s)
            if code == FIRED:
                self.sent[(p, q)] = ci + 1
            return code, why
        f = ev.partner
        if f is None:
            return WAIT, lambda: (f"no send with chan_i={ev.chan_i} was recorded by "
                                  f"{ev.peer}" + self._gone(m.index[ev.peer]))
        if not f.done:
            return WAIT, lambda: f"waits for the matching send ({f.where()})"
        p, q = ev.rank, f.rank
        ri = self.rcvd.get((q, p), 0)
        if ev.line and ev.chan_i != ri:
            return BAD, lambda: (f"receive is message #{ev.chan_i} on {m.names[q]} -> "
                                 f"{m.names[p]}, but #{ri} is the next one")
        chan = s.chans[m.chan_index[(q, p)]]
        if not chan:
            return BAD, lambda: "the channel is empty in the model"
        kind, msg = chan[0]
        row, code, why = self._own(ev, s, msg, True)
        if row is None:
            return code, why
        if kind not in row.op.kinds:
            return BAD, lambda: (f"framing: the channel holds {kind}, {row.label} expects "
                                 f"{'|'.join(row.op.kinds)}")
        if ev.has_msg and not msg_ok(ev.msg, msg, kind):
            return BAD, lambda: (f"{m.names[p]} recorded receiving {fmt_msg(ev.msg)}, the "
                                 f"model's message is {fmt_msg(msg)}")
        tr = _new(Tr, ("recv", ((p, ev.t, row),), msg, None))
        code, why = self._commit(tr, (ev,), s)
        if code == FIRED:
            self.rcvd[(q, p)] = ri + 1
        return code, why

    def _coll(self, ev):
        s, m, cfg = self.s, self.m, self.cfg
        grp = ev.group
        members = m.members[grp]
        if ev.rank not in m.group_rank[grp]:
            return BAD, lambda: (f"{m.names[ev.rank]} is not a member of {grp} "
                                 f"(collective mismatch)")
        gi = _GI[grp]
        if s.seq[gi] != ev.gseq:
            seq = s.seq[gi]
            return (WAIT if ev.gseq > seq else BAD), lambda: (
                f"{grp} seq {ev.gseq} recorded, but the group is at seq {seq}")
        inst = ev.inst
        evs, rows = [], []
        for mm in members:
            e = inst.get(mm)
            if e is None:
                return WAIT, lambda: (f"{grp} seq {ev.gseq}: {m.names[mm]} has no event for "
                                      f"this collective (members recorded: "
                                      f"{', '.join(m.names[x] for x in sorted(inst))})"
                                      + self._gone(mm))
            for d in e.deps:
                if not d.done:
                    return WAIT, lambda: (f"{grp} seq {ev.gseq}: {m.names[mm]}'s "
                                          f"event ({e.where()}) is not ready")
            evs.append(e)
        # every member's own row (broadcast receivers are checked against the value),
        # and the model's collective rules: one signature across every posted entry of
        # every member, and no non-member posted on the group. Fast path: a member is
        # single-threaded at a state whose collective rows all share one signature and
        # one `make` (then its posted entries are its row's signature).
        uniform = self.uniform
        procs = s.procs
        sig0 = None
        slow = False
        for e in evs:
            row, code, why = self._own(e, s)
            if row is None:
                return code, (why if e is ev else
                              (lambda e=e, why=why: f"member {self._who(e.rank, e.t)}: "
                               + (why() if callable(why) else why)))
            rows.append(row)
            pcs = procs[e.rank].pcs
            sig = uniform[e.rank][e.t].get(pcs[e.t]) if len(pcs) == 1 else None
            if sig is None:
                slow = True
            elif sig0 is None:
                sig0 = sig
            elif sig != sig0:
                return BAD, lambda sig=sig, e=e: (
                    f"collective mismatch on {grp} seq {ev.gseq}: {m.names[e.rank]} is in "
                    f"{sig[0]}({sig[2]}), {m.names[members[0]]} in {sig0[0]}({sig0[2]})")
        op0 = rows[0].op
        sig0 = (op0.op, op0.root, op0.kind)
        firsts = rows
        if slow:
            firsts = self._coll_firsts(s, grp, members, sig0, op0, ev)
            if type(firsts) is tuple:
                return firsts
        for pq in self.non_members[grp]:
            pr = s.procs[pq]
            if pr.status != LIVE:
                continue
            for t, pc in enumerate(pr.pcs):
                for r in self.coll_rows[pq][t].get(pc, ()):
                    if r.op.group == grp and (r.guard is None or r.guard(pr.v, cfg)):
                        return BAD, lambda: (f"{m.names[pq]} posts {r.op.op} on {grp} but "
                                             f"is not a member (collective mismatch)")
        if op0.op == "broadcast":
            k = op0.root
            value = rows[k].make(s.procs[members[k]].v, cfg)
        else:
            k = None
            value = tuple([firsts[j].make(procs[mm].v, cfg) for j, mm in enumerate(members)])
        hv = header_view(value) if op0.kind in HEADER_KINDS else None
        parts = []
        for j, (mm, e, row) in enumerate(zip(members, evs, rows)):
            if j != k and row.accept is not None and not row.accept(s.procs[mm].v, cfg,
                                                                     value):
                row2, code, why = self._own(e, s, value, True)
                if row2 is None:
                    return code, (lambda e=e, why=why: f"member {self._who(e.rank, e.t)}: "
                                  + (why() if callable(why) else why))
                row = row2
            if e.has_msg or (op0.op != "all_reduce" and e.line):
                rec = e.msg if e.has_msg else None
                ok = rec == value or (hv is not None and rec == hv)
                if not ok:
                    return BAD, lambda e=e: (
                        f"{grp} seq {ev.gseq}: {m.names[e.rank]} recorded "
                        f"{fmt_msg(e.msg) if e.has_msg else 'no message'}, the model's "
                        f"value is {fmt_msg(value)}")
            parts.append((mm, e.t, row))
        return self._commit(_new(Tr, ("coll", tuple(parts), value, None)), tuple(evs), s)

    def _coll_firsts(self, s, grp, members, sig0, op0, ev):
        """Slow path of the signature rule: scan every posted collective row of every
        member (as Model.enabled does); returns each member's first posted row, or a
        (BAD, reason) tuple."""
        m, cfg = self.m, self.cfg
        firsts = []
        for mm in members:
            pr = s.procs[mm]
            first = None
            for t, pc in enumerate(pr.pcs):
                for r in self.coll_rows[mm][t].get(pc, ()):
                    if r.op.group != grp or (r.guard is not None and
                                             not r.guard(pr.v, cfg)):
                        continue
                    if (r.op.op, r.op.root, r.op.kind) != sig0:
                        return BAD, lambda r=r, mm=mm: (
                            f"collective mismatch on {grp} seq {ev.gseq}: "
                            f"{m.names[mm]} is in {r.op.op}({r.op.kind}), "
                            f"{m.names[members[0]]} in {op0.op}({op0.kind})")
                    if first is None:
                        first = r
            firsts.append(first)
        return firsts

    def _commit(self, tr, evs, s):
        m = self.m
        if self.verify and tr not in m.enabled(s):
            raise AssertionError("replayer built a transition the model does not enable: "
                                 + m.describe(s, tr))
        s2 = m.step(s, tr)
        res = self.res
        parts = tr.parts
        if parts[0][0] == 0 or (len(parts) > 1 and parts[1][0] == 0):
            v, v2 = s.procs[0].v, s2.procs[0].v
            e = evs[0]
            if e.has_msg and tr.kind == "local":
                subj = local_subject(v, v2)
                if e.msg != subj:
                    return BAD, lambda: (f"rank0 recorded {e.label} of {fmt_msg(e.msg)}, the "
                                         f"model's {e.label} acts on {fmt_msg(subj)}")
            if v2 is None or v.decode_q is not v2.decode_q:
                self._queue_moves(tr, v, v2)
        # transition properties look only at row tags (model/properties.py): skip the
        # calls for untagged steps
        tagged = False
        for part in parts:
            if part[2].tags:
                tagged = True
                break
        viol = (tagged and (check_transition(m, s, tr, s2) or
                            check_progress_at_exit(m, s, tr))) or check_state(m, s2)
        self.s = s2
        res.steps += 1
        if viol is not None:
            res.violations.append((res.steps, viol, evs[0] if evs else None))
        for e in evs:
            e.done = True
        return FIRED, None

    def _queue_moves(self, tr, v, v2):
        res = self.res
        before = v.decode_q
        after = v2.decode_q if v2 is not None else before
        emit = any("emit" in row.tags for _, _, row in tr.parts)
        for x in after:
            if x not in before:
                res.accepted[x.call_id] = x
        for j, x in enumerate(before):
            if x in after:
                continue
            if emit and j == 0:
                res.decoded[x.call_id] = res.decoded.get(x.call_id, 0) + 1
                res.emitted.append((x.chunk, x.epoch, x.call_id))
            else:
                label = tr.parts[0][2].label if tr.parts else tr.kind
                res.ended[x.call_id] = label

    # ------------------------------------------------------------------ main loop
    def replay(self) -> ReplayResult:
        t0 = time.perf_counter()
        res = self.res
        res.events = sum(len(x) for x in self.events)
        try:
            self._loop()
        finally:
            res.seconds = time.perf_counter() - t0
        res.state = self.s
        res.replayed = res.events - sum(self._pending(r) for r in range(self.n))
        if res.divergence is None:
            self._finish()
        res.ok = res.divergence is None and not res.violations
        return res

    def _loop(self):
        events, heads, n = self.events, self.heads, self.n
        attempt = self._dispatch      # the wait-or-wrong distinction only matters
        while True:                   # when everything is stuck (_diverge_stuck)
            progressed = False
            for r in range(n):
                evs = events[r]
                h = heads[r]
                ln = len(evs)
                while h < ln:
                    ev = evs[h]
                    if ev.done or attempt(ev)[0] == FIRED:
                        h += 1
                        progressed = True
                    else:
                        break
                heads[r] = h
            if progressed:
                continue
            if not any(self._pending(r) for r in range(n)):
                if self._end_phase():
                    continue
                if any(pr.status == LIVE for pr in self.s.procs):
                    self._diverge_stuck()
                return
            if self._window():
                continue
            if self._end_phase():
                continue
            self._diverge_stuck()
            return

    def _window(self) -> bool:
        for r in range(self.n):
            evs = self.events[r]
            h = self.heads[r]
            for ev in evs[h + 1:h + 1 + self.window]:
                # only communication: a rank's local steps keep their file order (the
                # order of its state changes); a message may be recorded out of it
                if not ev.done and ev.op in _COMM and self._ready(ev) and \
                        self.try_fire(ev) == FIRED:
                    return True
        return False

    # ------------------------------------------------------------------ endings
    def _end_phase(self) -> bool:
        s, m, run = self.s, self.m, self.run
        self.end_phase = True
        try:
            # 1. crashed ranks, once their recorded events are replayed: first a lost
            #    event another rank completed with them, then the crash itself
            for r in run.crashed:
                if s.procs[r].status == LIVE and self._pending(r) == 0:
                    if self._synthesise_lost(r):
                        return True
                    self._step_env(Tr("crash", ((r, None, None),)))
                    return True
            # 2. sends into the transport after the peer ended (gloo eager sends)
            if self._absorb_orphans():
                return True
            # 3. an exit that sets the abort flag
            for r in range(self.n):
                h = self.heads[r]
                for ev in self.events[r][h:h + self.window]:
                    if not ev.done and ev.op == "exit" and self._ready(ev) and \
                            self.try_fire(ev) == FIRED:
                        return True
            # 4. the watchdog and the abort flag
            live = [p for p, pr in enumerate(s.procs) if pr.status == LIVE]
            if not live:
                return False
            # a released rank can be os._exit'ed between its op completing at the peers
            # and its trace line (the watchdog does not wait): same as a kill -9
            for r in live:
                if run.ranks[r].ended == "released" and self._pending(r) == 0 and \
                        self._synthesise_lost(r):
                    return True
            if any(self._pending(p) for p in live):
                return False
            if not all(run.ranks[p].ended in ("released", "error_exit") for p in live):
                return False
            if not s.abort:
                wd = [tr for tr in m.enabled(s) if tr.kind == "watchdog"]
                if not wd:
                    return False
                self._step_env(wd[0])
                return True
            self._step_env(Tr("abort", (), None, s.abort))
            return True
        finally:
            self.end_phase = False

    def _step_env(self, tr):
        s = self.s
        if self.verify and tr.kind != "crash" and tr not in self.m.enabled(s):
            raise AssertionError(f"{tr.kind} not enabled")
        if tr.kind == "crash" and s.faults_left <= 0:
            raise AssertionError("no fault budget left for a crash")
        s2 = self.m.step(s, tr)
        self.s = s2
        self.res.steps += 1
        viol = check_state(self.m, s2)
        if viol is not None:
            self.res.violations.append((self.res.steps, viol, None))

    def _blocked_on(self, r):
        """Ready events of other ranks waiting for a partner event rank r never wrote."""
        out = []
        for q in range(self.n):
            if q == r:
                continue
            h = self.heads[q]
            for ev in self.events[q][h:h + self.window]:
                if ev.done or not self._ready(ev):
                    continue
                if ev.op in ("send", "recv") and ev.partner is None and \
                        self.m.index.get(ev.peer) == r:
                    out.append(ev)
                elif ev.op == "coll" and r in self.m.group_rank[ev.group] and \
                        r not in ev.inst:
                    out.append(ev)
        return out

    def _synthesise_lost(self, r) -> bool:
        m, s = self.m, self.s
        blocked = self._blocked_on(r)
        if self.cfg.p2p == "buffered":
            # a message in the channel to r whose receive r never wrote
            for q in range(self.n):
                slot = self.p2p.get((q, r, self.rcvd.get((q, r), 0)))
                if slot is not None and slot[1] is None and slot[0].done:
                    blocked.append(slot[0])
        for ev in blocked:
            if ev.op == "coll":
                if ev.gseq != s.seq[GROUPS.index(ev.group)]:
                    continue
                op = "coll"
            else:
                op = "recv" if ev.op == "send" else "send"
                key = (ev.rank, r) if ev.op == "send" else (r, ev.rank)
                if ev.chan_i != (self.rcvd if ev.op == "send" else self.sent).get(key, 0):
                    continue
            for t in range(self.nthreads[r]):
                # p2p: at most one unwritten op per thread (the kill lands between the
                # op and its line). Collectives: gloo's broadcast completes at a receiver
                # without waiting for the other receivers, so a member that ended may
                # be "behind" by a few collectives the others recorded.
                # (rank0's comms thread drives a send and a receive at once: one each)
                p2p_lost = 2 if THREADS[m.roles[r]][t] == "comms" else 1
                if self.lost_per_thread.get((r, t), 0) >= (LOST_COLLS if op == "coll"
                                                           else p2p_lost):
                    continue
                syn = Ev()
                syn.rank, syn.t, syn.thread = r, t, THREADS[m.roles[r]][t]
                syn.i = -1
                syn.src = syn.dst = s.procs[r].pcs[t]
                syn.label, syn.op = "(lost)", op
                syn.peer = m.roles[ev.rank] if op != "coll" else None
                if syn.peer == "worker":
                    continue
                syn.chan_i, syn.group, syn.gseq = ev.chan_i, ev.group, ev.gseq
                syn.msg, syn.has_msg = None, False
                syn.t_ns = syn.dur_ns = 0
                syn.meas, syn.line, syn.pos = None, 0, -1
                extra = []
                if op == "coll":
                    ev.inst[r] = syn
                    syn.inst = ev.inst
                    # another member that ended (released / killed) right after the
                    # same collective may be missing its line too
                    for q in m.members[ev.group]:
                        if q not in ev.inst and q != r and self._ended(q) and \
                                self.lost_per_thread.get((q, 0), 0) < LOST_COLLS:
                            other = self._lost_ev(q, 0, ev)
                            ev.inst[q] = other
                            other.inst = ev.inst
                            extra.append(q)
                else:
                    syn.partner, ev.partner = ev, syn
                first = syn if ev.done or (ev.op == "recv" and
                                           self.cfg.p2p == "buffered") else ev
                code = self.try_fire(first)
                if code == FIRED:
                    self.lost_per_thread[(r, t)] = self.lost_per_thread.get((r, t), 0) + 1
                    for q in extra:
                        self.lost_per_thread[(q, 0)] = self.lost_per_thread.get((q, 0), 0) + 1
                        self.res.notes.append(f"{m.names[q]}: the same collective "
                                              f"({ev.where()}) was never written either")
                    self.res.lost.append((r, f"{m.names[r]}.{syn.thread}: a {op} "
                                             f"completed with {ev.where()} was never "
                                             f"written (killed after the op)"))
                    self.res.notes.append(self.res.lost[-1][1])
                    return True
                if op == "coll":
                    for q in [r] + extra:
                        del ev.inst[q]
                else:
                    ev.partner = None
        return False

    def _lost_ev(self, r, t, ev):
        """A placeholder for a collective rank r completed but never wrote."""
        m, s = self.m, self.s
        syn = Ev()
        syn.rank, syn.t, syn.thread = r, t, THREADS[m.roles[r]][t]
        syn.i = -1
        syn.src = syn.dst = s.procs[r].pcs[t]
        syn.label, syn.op, syn.peer = "(lost)", "coll", None
        syn.chan_i, syn.group, syn.gseq = ev.chan_i, ev.group, ev.gseq
        syn.msg, syn.has_msg = None, False
        syn.t_ns = syn.dur_ns = 0
        syn.meas, syn.line, syn.pos = None, 0, -1
        return syn

    def _ended(self, q) -> bool:
        pr = self.s.procs[q]
        if pr.status != LIVE:
            return True
        rt = self.run.ranks[q]
        return self._pending(q) == 0 and rt.ended in ("released", "crashed", "failed", "error_exit")

    def _absorb_orphans(self) -> bool:
        m, s = self.m, self.s
        for r in range(self.n):
            if s.procs[r].status != LIVE:
                continue
            h = self.heads[r]
            for ev in self.events[r][h:h + self.window]:
                if ev.done or ev.op != "send" or ev.partner is not None or \
                        not self._ready(ev):
                    continue
                q = m.index.get(ev.peer)
                if q is None or not self._ended(q):
                    continue
                row, code, _ = self._own(ev, s)
                if row is None:
                    continue
                msg = row.make(s.procs[r].v, self.cfg)
                if ev.has_msg and ev.msg != msg:
                    continue
                procs = list(s.procs)
                procs[r], _ = m._apply(procs[r], ev.t, row, msg)
                self.s = s._replace(procs=tuple(procs))
                ev.done = True
                self.sent[(r, q)] = self.sent.get((r, q), 0) + 1
                text = (f"tolerated: {m.names[r]} {row.label} ({ev.where()}) completed into "
                        f"the transport after {m.names[q]} had ended (an eager send; the "
                        f"{self.cfg.p2p} reading would block it until the abort flag)")
                self.res.absorbed.append(text)
                self.res.notes.append(text)
                return True
        return False

    # ------------------------------------------------------------------ verdicts
    def _finish(self):
        s, m, run, res = self.s, self.m, self.run, self.res
        live = [p for p, pr in enumerate(s.procs) if pr.status == LIVE]
        if live:
            viol = check_terminal(m, s)
            if viol is not None:
                res.violations.append((res.steps, viol, None))
        for p, pr in enumerate(s.procs):
            rt = run.ranks[p]
            if rt.releases and pr.status != ABORTED:
                res.notes.append(f"{m.names[p]} wrote a release event but the model ends "
                                 f"it {pr.status} (the release came after its exit)")

    def _diverge_stuck(self):
        m, s = self.m, self.s
        best = None
        for r in range(self.n):
            h = self.heads[r]
            if h >= len(self.events[r]):
                continue
            ev = self.events[r][h]
            self._guard_false = None
            code, why = self.try_fire(ev, explain=True)
            cand = (0 if code == BAD else 1, r, ev, why, self._guard_false)
            if best is None or cand[:2] < best[:2]:
                best = cand
        step = self.res.steps + 1
        if best is None:
            live = [p for p, pr in enumerate(s.procs) if pr.status == LIVE]
            rel = [p for p in live if self.run.ranks[p].ended in ("released", "error_exit")]
            if rel and not any(pr.status in (CRASHED, ERROR) for pr in s.procs) \
                    and not s.abort:
                reason = (f"{', '.join(m.names[p] for p in rel)} recorded a release by the "
                          f"watchdog, but no rank failed or crashed in the model: nothing "
                          f"sets the abort flag (a false release)")
            else:
                one = len(live) == 1
                reason = (f"every trace is replayed but {', '.join(m.names[p] for p in live)}"
                          f" {'is' if one else 'are'} still live in the model with no exit, "
                          f"release or crash to end {'it' if one else 'them'}")
            self.res.divergence = Divergence(step, None, "end of the traces", None, reason,
                                             self._allowed(None), self._context())
            return
        _, r, ev, why, gf = best
        verdict = self._forced_verdict(ev, gf) if gf is not None else None
        pr = s.procs[r]
        state = (f"{m.names[r]} {pr.status} at {'/'.join(pr.pcs) or '-'}"
                 + (f"; {_vars(pr.v)}" if pr.v is not None else ""))
        self.res.divergence = Divergence(step, r, self._who(r, ev.t), ev, why,
                                         self._allowed(r), self._context(), verdict, state)

    def _forced_verdict(self, ev, row):
        """The property the recorded step would violate if the model took it anyway."""
        m, s = self.m, self.s
        kind = {Local: "local", Exit: "exit", Coll: "coll"}.get(type(row.op))
        if kind is None:
            return None
        # a hypothetical step of this rank alone (for a collective: its own part only)
        tr = Tr(kind, ((ev.rank, ev.t, row),))
        try:
            s2 = m.step(s, tr)
            viol = check_transition(m, s, tr, s2) or check_state(m, s2)
        except Exception:  # noqa: BLE001 - a forced step may not even be computable
            return None
        if viol is None:
            return None
        self.res.violations.append((self.res.steps + 1, viol, ev))
        return f"{viol.prop}: {viol.detail}"

    def _allowed(self, r):
        m, s = self.m, self.s
        trs = m.enabled(s)
        crash = [tr for tr in trs if tr.kind == "crash"]
        trs = [tr for tr in trs if tr.kind != "crash"]
        if r is not None:
            mine = [tr for tr in trs if any(p == r for p, _, _ in tr.parts)]
            others = [tr for tr in trs if tr not in mine]
            trs = mine + others
        out = [m.describe(s, tr) for tr in trs]
        if crash:
            out.append(f"any live rank may crash (fault budget {s.faults_left})")
        return out

    def _context(self, k: int = 4) -> dict:
        m = self.m
        out = {}
        for r, evs in enumerate(self.events):
            h = self.heads[r]
            rt = self.run.ranks[r]
            lines = [f"rank{r} {m.names[r]} ({len(evs)} events, ends: {rt.ended}"
                     f"{', last line cut' if rt.truncated else ''}):"]
            for ev in evs[max(0, h - k):h]:
                lines.append(f"     line {ev.line}: {ev.brief()}")
            if h < len(evs):
                lines.append(f"  -> line {evs[h].line}: {evs[h].brief()}")
            elif not evs:
                lines.append("     (no step events)")
            else:
                lines.append("     (all replayed)")
            out[r] = lines
        return out


def replay(run: Run, verify: bool = False) -> ReplayResult:
    return Replayer(run, verify=verify).replay()


# ---------------------------------------------------------------------- helpers

def _lane(src: str, dst: str):
    """rank0 comms: 0 = send side, 1 = receive side, None = both (a barrier)."""
    if "/" not in src or "/" not in dst:
        return None
    a, b = src.split("/", 1)
    c, d = dst.split("/", 1)
    if a != c and b == d:
        return 0
    if b != d and a == c:
        return 1
    return None


def _lane_ok(ev, row, pc) -> bool:
    """A comms event fired out of its recorded pair order: compare its own side."""
    lane = _lane(row.src, row.dst)
    if lane is None or ev.lane != lane:
        return False
    es, ed = ev.src.split("/", 1), ev.dst.split("/", 1)
    rs, rd = pc.split("/", 1), row.dst.split("/", 1)
    other = 1 - lane
    return es[lane] == rs[lane] and ed[lane] == rd[lane] and es[other] == ed[other]


def _coord(ev) -> str:
    if ev.op == "coll":
        return f"{ev.group} seq {ev.gseq}"
    return f"{ev.op} {ev.peer} chan_i={ev.chan_i}"


def _vars(v) -> str:
    d = v._asdict()
    keep = ("epoch", "next_chunk", "next_call", "inflight", "decode_q", "send_q",
            "awaiting", "terminal_queued", "terminal_sent", "emitted", "last_emitted",
            "env", "planned", "calls_done", "seen_call", "seen_chunk")
    parts = []
    for k in keep:
        if k in d:
            x = d[k]
            if isinstance(x, tuple) and x and isinstance(x[0], tuple):
                x = "[" + ", ".join(f"call {y[1]}/chunk {y[2]}/epoch {y[3]}" for y in x) + "]"
            elif isinstance(x, tuple) and len(x) == 7:
                x = fmt_msg(x)
            parts.append(f"{k}={x}")
    return " ".join(parts)
