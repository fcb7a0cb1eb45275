"""Replay a run's traces through the model: happens-before from the trace coordinates,
then one linearisation stepped through `Model.step` from `Model.initial_state()`. The
replayer is a driver: every step it takes is a transition of the model's own `enabled`
made of the recorded events' rows (`Model.enabled_as`; when none matches, the whole
entry of `Model.enabled_for`, i.e. `enabled_of` at (process, thread, row label), for the
diagnosis). It has no matching rules of its own.

Happens-before, with no clock compared across ranks (the trace's coordinates):
  * a rank's file order, across all of its threads: the runtime writes a rank's events
    under one lock in the order it applied their updates (runtime/interp.py), so an
    event is replayed after every earlier line of its rank, with one exception;
  * each send to the receive with the same directed channel and `chan_i`;
  * each collective event to the other members' events with the same group and `gseq`.
The exception (`_may_lag`): an earlier line on another thread, or on the other side of a
pair-state thread (control states "a/b", e.g. rank0's comms thread, which keeps a send
and a receive in flight together), may still be unreplayed while a send on its own side
up to it is. The transport completes a send before its receiver posts the receive (gloo,
model/events.py EAGER_SEND_RULE), so under rendezvous p2p the model's send, and what its
side did after it, can come after later lines of the rank. A comms event fired out of
its recorded pair order is compared on its own side of the pair (`_lane_ok`: the
trace's reading of the pair state, not a rule of the model). The rule reads thread
indices, state names and op classes only, never a rank or role.

A step: the events that make one transition (the event, its channel partner, or every
member's event of the collective) must be ready; the model's transitions made of those
events' rows are looked up at the current state; a transition is taken when its parts
are exactly those events' rows (label, and dst continuing the recorded dst) and the
recorded messages are the model's (`views.msg_ok`). The trace's coordinates (chan_i, gseq)
must be the model's next ones. Crashes, the watchdog and the abort flag are placed last,
when nothing else can move; an exit that sets the abort flag too.

Environment rules (two, documented in model/events.py). UNWRITTEN: a rank whose trace
ended without an exit step (killed, failed, released, untraced error exit) may have
completed, after its last written line, its part of a transition whose other
participants wrote theirs (a rendezvous send or receive, a collective; buffered: a send
whose receive the peer wrote). That transition is taken with the ended rank's part being
whatever row the model enables for it there; the written parts must match exactly.
EAGER_SEND_RULE: under rendezvous p2p, a recorded send whose receiver is crashed in the
model (killed, its trace replayed) and received nothing completed in the transport: it
is the model's `send` transition of the sender's posted row (`events.eager_sends`).

The first divergence names the culprit, not the member of a transition tried first: a
reason about another recorded event (a member's row or fields, the partner's
coordinates) is a `Blame` of that event, a wait points at the event waited on, and
`_diverge_stuck` follows both to the event the reason is about (`_culprit`). A
collective recorded ahead of its group's next seq waits only while its rank has a line
for a seq in between; otherwise the recorded gseq is wrong at that line.
"""
from __future__ import annotations

import gc
import time
from typing import Optional

from lockstep.model.events import UNWRITTEN, eager_sends
from lockstep.model.ops import Coll, Exit, Local, Recv, Send
from lockstep.model.properties import (check_progress_at_exit, check_state, check_terminal,
                                       check_transition)
from lockstep.model.semantics import (ABORTED, CRASHED, DEAD_THREAD, ERROR, FINAL, GROUPS,
                                      LIVE, Model, State, Tr)
from lockstep.model.tables import THREADS, shipped_tables

from .explain import guard_words, msg_diff
from .load import Ev, Run, fmt_msg
from .views import HEADER_KINDS, header_view, local_subject, msg_ok

FIRED, WAIT, BAD = 0, 1, 2
EAGER = "eager"            # _group: a send to a crashed receiver (EAGER_SEND_RULE)
OPCLASS = {Send: "send", Recv: "recv", Coll: "coll", Exit: "exit", Local: "local"}
WINDOW = 64
_COMM = ("send", "recv", "coll")
_GI = {g: k for k, g in enumerate(GROUPS)}


class Blame:
    """A reason about one recorded event other than the one tried (a member's row, the
    partner's coordinates: the culprit), or, for a wait, the event waited on. Called
    like the plain reasons, lazily, for the text."""
    __slots__ = ("ev", "text")

    def __init__(self, ev, text):
        self.ev, self.text = ev, text

    def __call__(self) -> str:
        return self.text()


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
    def __init__(self, run: Run, verify: bool = False, window: int = WINDOW,
                 tables=None):
        """`tables`: the rows to replay against (default the shipped ones; their
        mutation name must be the run's config's, as `Model` requires)."""
        self.run, self.verify, self.window = run, verify, window
        cfg = run.cfg
        crashed = run.crashed
        if len(crashed) > cfg.faults:
            cfg = cfg.with_(faults=len(crashed))
        self.cfg = cfg
        self.m = m = Model(cfg, shipped_tables() if tables is None else tables)
        m.posted = _current_posted(m)
        self.n = m.n
        start = run.start       # a suffix starts at its checkpoints' consistent cut
        self.s = m.initial_state() if start is None else \
            start.state._replace(faults_left=cfg.faults)
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
        self.nthreads = [len(THREADS[role]) for role in m.roles]
        self.sent = {} if start is None else dict(start.sent)   # (src, dst) -> sent so far
        self.rcvd = dict(self.sent)   # (src, dst) -> received so far (equal at the cut)
        self.unwritten_sends = set()
        self.end_phase = False
        self._idx_s = self._idx_p = self._idx = None
        self._checked_r0 = self._checked_viol = None
        gc_was = gc.isenabled()
        gc.disable()      # _link makes a few tuples per event, all acyclic: as in replay()
        try:
            self._link()
        finally:
            if gc_was:
                gc.enable()

    # ------------------------------------------------------------------ coordinates
    def _link(self):
        m, run = self.m, self.run
        p2p, colls = {}, {}
        self.events = [rt.steps for rt in run.ranks]
        lanes = {}            # (src, dst) -> _lane: a few hundred distinct pairs
        for rt in run.ranks:
            r = rt.rank
            latest = {}       # (thread, lane) -> the rank's latest event there
            sends = {}        # (thread, lane) -> the latest send there
            own_sends = {}    # (thread, lane) -> ev.sends there, until the next send
            for ev in rt.steps:
                ev.done = False               # a Run may be replayed more than once
                ev.partner = ev.dup = None
                t, op = ev.t, ev.op
                pair = (ev.src, ev.dst)
                lane = lanes.get(pair, 0)
                if lane == 0 and pair not in lanes:
                    lane = lanes[pair] = _lane(*pair)
                ev.lane = lane
                ev.deps = tuple(latest.values())          # every earlier line of the rank
                key = (t, lane)
                latest[key] = ev
                if op == "send":
                    sends[key] = ev
                    own_sends.clear()
                # the sends its own side (a whole thread: both sides) completed before it
                mine = own_sends.get(key)
                if mine is None:
                    mine = own_sends[key] = tuple(
                        x for k, x in sends.items() if k[0] == t and
                        (lane is None or k[1] is None or k[1] == lane))
                ev.sends = mine
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
        self.p2p, self.colls = p2p, colls
        self.heads = [0] * self.n

    @staticmethod
    def _ready(ev) -> bool:
        for d in ev.deps:
            if not d.done and not _may_lag(d, ev):
                return False
        return True

    def _has_pending(self, r) -> bool:
        """Rank r has an unreplayed event. The head skips replayed events, so this is
        whether one is left at or after it (amortised O(1): the replayer asks at every
        step, and a count of the rest would make the replay quadratic)."""
        evs, h = self.events[r], self.heads[r]
        ln = len(evs)
        while h < ln and evs[h].done:
            h += 1
        self.heads[r] = h
        return h < ln

    def _pending(self, r) -> int:
        """How many of rank r's events are unreplayed (for the result, once)."""
        self._has_pending(r)
        return sum(1 for e in self.events[r][self.heads[r]:] if not e.done)

    def _ended(self, q) -> bool:
        """Rank q's trace has nothing more, it ended without an exit step, and the
        model still has it live: the UNWRITTEN rule applies to it."""
        return self.s.procs[q].status == LIVE and \
            self.run.ranks[q].ended in UNWRITTEN and not self._has_pending(q)

    def _head(self, q):
        """Rank q's first unreplayed event, or None."""
        return self.events[q][self.heads[q]] if self._has_pending(q) else None

    def _gone(self, q) -> str:
        rt = self.run.ranks[q]
        if self._has_pending(q) or rt.ended == "exit":
            return ""
        last = rt.steps[-1].line if rt.steps else 0
        return (f"; {self.m.names[q]}'s trace ends at line {last} ({rt.ended}"
                f"{', its last line cut short' if rt.truncated else ''})")

    def _who(self, p, t) -> str:
        return f"{self.m._who(p, t)} (rank {p})"

    def _candidates(self, s, ev) -> list:
        """The model's transitions at s in which ev's row takes part: the entry of
        `Model.enabled_of` at (rank, thread, label), computed by `Model.enabled_for`
        from that row's rule alone."""
        return self.m.enabled_for(s, ev.rank, ev.t, ev.label)

    def _exact(self, s, evs) -> list:
        """The model's transitions at s made of exactly the rows of `evs`
        (`Model.enabled_as`: judged from those rows alone where the rule allows)."""
        return self.m.enabled_as(s, [(e.rank, e.t, e.label) for e in evs])

    def _index(self, s, procs):
        if self._idx_s is not s or self._idx_p != procs:
            self._idx = self.m.enabled_of(s, procs)
            self._idx_s, self._idx_p = s, procs
        return self._idx

    # ------------------------------------------------------------------ firing
    def try_fire(self, ev: Ev, explain: bool = False):
        code, why = self._fire(ev)
        if explain:
            return code, (why() if callable(why) else why)
        return code

    def _group(self, ev, s):
        """The recorded events that make one transition with `ev` and the ranks whose
        part is unwritten (UNWRITTEN), or (code, why)."""
        m = self.m
        op = ev.op
        if op == "local" or op == "exit":
            return (ev,), ()
        if op == "coll":
            grp = ev.group
            if ev.rank not in m.group_rank[grp]:
                return (ev,), ()          # the model's index says: not a member
            seq = s.seq[_GI[grp]]
            if ev.gseq != seq:
                if ev.gseq > seq and any(ev.rank in self.colls.get((grp, k), ())
                                         for k in range(seq, ev.gseq)):
                    return WAIT, lambda: (f"{grp} seq {ev.gseq} recorded, but the group "
                                          f"is at seq {seq}")
                return BAD, lambda: (
                    f"{grp} seq {ev.gseq} recorded, but the group's next collective is "
                    f"seq {seq}" + (f" and {m.names[ev.rank]} recorded no event for seq "
                                    f"{seq}{'' if ev.gseq == seq + 1 else ' on'} (a "
                                    f"collective skipped, or a wrong gseq)"
                                    if ev.gseq > seq else " (a collective taken twice, "
                                    "or a wrong gseq)"))
            evs, unw = [], []
            for mm in m.members[grp]:
                e = ev.inst.get(mm)
                if e is None:
                    if self._ended(mm):
                        unw.append(mm)
                        continue
                    return WAIT, Blame(self._head(mm), lambda mm=mm: (
                        f"{grp} seq {ev.gseq}: {m.names[mm]} has no event for this "
                        f"collective (members recorded: "
                        f"{', '.join(m.names[x] for x in sorted(ev.inst))})" + self._gone(mm)))
                if not e.done and not self._ready(e):
                    return WAIT, Blame(self._head(e.rank), lambda e=e: (
                        f"{grp} seq {ev.gseq}: {m.names[e.rank]}'s event ({e.where()}) is "
                        f"not ready"))
                evs.append(e)
            return tuple(evs), tuple(unw)
        q = m.index[ev.peer]
        f = ev.partner
        key = (ev.rank, q) if op == "send" else (q, ev.rank)
        nxt = (self.sent if op == "send" else self.rcvd).get(key, 0)
        if ev.chan_i != nxt:
            return BAD, lambda: (f"{op} is message #{ev.chan_i} on {m.names[key[0]]} -> "
                                 f"{m.names[key[1]]}, but #{nxt} is the next one")
        if self.cfg.p2p == "buffered":
            if op == "send":
                chan = s.chans[m.chan_index[(ev.rank, q)]]
                if len(chan) >= self.cfg.eager and self._ended(q):
                    self._unwritten_recv(ev, q, s)      # then the send, in this state
                return (ev,), ()
            if f is None:
                if (q, ev.rank, ev.chan_i) in self.unwritten_sends or \
                        (self._ended(q) and self._unwritten_send(ev, q, s)):
                    return (ev,), ()
                return WAIT, lambda: (f"no send with chan_i={ev.chan_i} was recorded "
                                      f"by {ev.peer}" + self._gone(q))
            if not f.done:
                return WAIT, Blame(self._head(f.rank),
                                   lambda: f"waits for the matching send ({f.where()})")
            return (ev,), ()
        if f is None:
            if self._ended(q):
                return (ev,), (q,)
            if op == "send" and s.procs[q].status == CRASHED:
                return (ev,), EAGER             # model/events.py EAGER_SEND_RULE
            return WAIT, lambda: (f"no {'receive' if op == 'send' else 'send'} with "
                                  f"chan_i={ev.chan_i} was recorded by {ev.peer}"
                                  + self._gone(q))
        if not f.done and not self._ready(f):
            return WAIT, Blame(self._head(f.rank), lambda: (
                f"the matching event {f.where()} is not ready (earlier events of its "
                f"thread are pending)"))
        fi = (self.rcvd if op == "send" else self.sent).get(key, 0)
        if f.chan_i != fi:
            return BAD, Blame(f, lambda: (f"{f.op} is message #{f.chan_i} on "
                                          f"{m.names[key[0]]} -> {m.names[key[1]]}, but "
                                          f"#{fi} is the next one"))
        return (ev, f), ()

    def _fire(self, ev):
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
        prev = ev.prev          # `_chain`, inline: it runs at every attempt
        if ev.src != (prev.dst if prev is not None else self.init_pcs[ev.rank][ev.t]):
            return BAD, self._chain(ev)
        row = self._row_at(ev, s)
        if row is not None:
            bad = self._fields(ev, row)
            if bad is not None:
                return BAD, bad
        g = self._group(ev, s)
        if type(g[0]) is int:
            return g
        s = self.s                  # an UNWRITTEN completion may have been taken
        evs, unw = g
        if len(evs) > 1:
            for e in evs:
                if e is not ev and self._chain(e) is not None:
                    return BAD, Blame(e, self._chain(e))
        byk = {(e.rank, e.t): e for e in evs}
        if unw is EAGER:
            unw = ()
            cands = [tr for tr in eager_sends(self.m, s, ev.rank)
                     if tr.parts[0][1] == ev.t and tr.parts[0][2].label == ev.label]
        else:
            if not unw:
                # the transitions made of exactly the recorded rows; the first that
                # matches is the one the whole lookup below would take (nothing else
                # matches), which stays for the diagnosis when none does
                for tr in self._exact(s, evs):
                    if self._mismatch(tr, byk, unw, s) is None:
                        if tr.kind == "exit":        # `_schedule` places only exits
                            code, why = self._schedule(tr, ev)
                            if code != FIRED:
                                return code, why
                        return self._commit(tr, evs, s, unw)
            cands = self._candidates(s, ev)
        while not cands and unw and self._unwritten_route(unw, s):
            s = self.s              # an ended rank took a routing step (UNWRITTEN)
            cands = self._candidates(s, ev)
        if not cands:
            return WAIT, lambda: self._why_not(ev, s)
        nparts = len(evs) + len(unw)
        viol = near = None
        for tr in cands:
            if tr.kind == "violation":
                viol = viol or tr
                continue
            if len(tr.parts) != nparts:
                continue
            why = self._mismatch(tr, byk, unw, s)
            if why is None:
                code, why = self._schedule(tr, ev)
                if code != FIRED:
                    return code, why
                return self._commit(tr, evs, s, unw)
            near = near or why
        if viol is not None and (near is None or ev.op == "coll"):
            return BAD, lambda: f"{viol.info.prop}: {viol.info.detail}"
        if near is not None:
            return BAD, near
        return WAIT, lambda: self._why_not(ev, s)

    def _unwritten_route(self, unw, s) -> bool:
        """UNWRITTEN: an ended rank's unwritten routing step toward the part its peers
        recorded: its only enabled row, local, with no effect, choice or tag."""
        for q in unw:
            trs = [tr for trs in self.m.enabled_of(s, (q,)).values() for tr in trs]
            if len(trs) != 1 or trs[0].kind != "local":
                continue
            (p, t, row), = trs[0].parts
            if row.effect or row.choice or row.tags:
                continue
            self._step_env(trs[0])
            self.res.notes.append(f"{self.m.names[q]}: its {row.label} was never written "
                                  f"(UNWRITTEN: a routing step after its last line)")
            return True
        return False

    def _chain(self, ev):
        """The recorded src must continue the thread's previous recorded dst."""
        prev = ev.prev
        prev_dst = prev.dst if prev is not None else self.init_pcs[ev.rank][ev.t]
        if ev.src == prev_dst:
            return None
        return lambda: (f"recorded src {ev.src!r} does not continue from "
                        f"{'the previous event of the thread' if prev else 'the initial state'}"
                        f" ({prev_dst!r})")

    def _mismatch(self, tr, byk, unw, s):
        """None when the model's transition `tr` is the recorded one, else why not."""
        seen = set()
        kind = None
        for p, t, row in tr.parts:
            if type(row.op) is Send:
                kind = row.op.kind
            e = byk.get((p, t))
            if e is None:
                if p in unw and p not in seen:
                    seen.add(p)
                    continue
                return lambda: f"the model's transition involves {self.m._who(p, t)}"
            if row.label != e.label:
                return Blame(e, lambda e=e, row=row: (f"{self._who(e.rank, e.t)} recorded "
                                                      f"{e.label}, the model takes "
                                                      f"{row.label}"))
            pc = s.procs[p].pcs[t]
            if e.src == pc:
                if row.dst != e.dst:
                    return Blame(e, lambda e=e, row=row, pc=pc: (
                        f"{self.m.names[e.rank]}'s row {row.label!r} at {pc!r} leads to "
                        f"{row.dst!r}, not to the recorded {e.dst!r}"))
            elif not _lane_ok(e, row, pc):
                return Blame(e, lambda e=e, pc=pc: (
                    f"recorded {e.src!r} -> {e.dst!r}, but the model's "
                    f"{self.m.names[e.rank]}.{e.thread} thread is at {pc!r}"))
        msg = tr.msg
        if tr.kind in ("p2p", "send", "recv"):
            if kind is None:           # buffered receive: the head of the channel
                p, t, row = tr.parts[0]
                kind = s.chans[self.m.chan_index[(self.m.index[row.op.peer], p)]][0][0]
            for p, t, row in tr.parts:
                e = byk.get((p, t))
                if e is None or not e.has_msg:
                    continue
                ok = e.msg == msg if type(row.op) is Send else msg_ok(e.msg, msg, kind)
                if not ok:
                    return Blame(e, lambda e=e, row=row: self._msg_why(e, msg, kind, row))
        elif tr.kind == "coll":
            op0 = tr.parts[0][2].op
            hv = header_view(msg) if op0.kind in HEADER_KINDS else None
            for p, t, row in tr.parts:
                e = byk.get((p, t))
                if e is None or not (e.has_msg or (op0.op != "all_reduce" and e.line)):
                    continue
                rec = e.msg if e.has_msg else None
                if not (rec == msg or (hv is not None and rec == hv)):
                    return Blame(e, lambda e=e, rec=rec: (
                        f"{e.group} seq {e.gseq}: {self.m.names[e.rank]} recorded "
                        f"{fmt_msg(e.msg) if e.has_msg else 'no message'}, the model's "
                        f"value is {fmt_msg(msg)}" + msg_diff(rec, msg)))
        return None

    def _msg_why(self, e, msg, kind, row):
        m = self.m
        shown = msg if type(row.op) is Send or kind not in HEADER_KINDS else header_view(msg)
        verb = "sending" if type(row.op) is Send else "receiving"
        return (f"{m.names[e.rank]} recorded {verb} {fmt_msg(e.msg)}, the model's "
                f"message is {fmt_msg(msg)} ({row.label})" + msg_diff(e.msg, shown))

    def _schedule(self, tr, ev):
        """The driver's placement: an exit after the process's other thread's events;
        an exit that sets the abort flag last."""
        if tr.kind == "exit":
            row = tr.parts[0][2]
            p = ev.rank
            if self.nthreads[p] > 1 and any(
                    not e.done and e.t != ev.t for e in self.events[p][self.heads[p]:]):
                return WAIT, lambda: "the process exits after its other thread's events"
            if row.op.how == "abort" and not self.end_phase:
                return WAIT, lambda: "an exit that sets the abort flag is taken last"
        return FIRED, None

    def _unwritten_send(self, ev, q, s) -> bool:
        """Buffered: the send of ended rank q that ev's receive took (UNWRITTEN)."""
        key = (q, ev.rank, ev.chan_i)
        if key in self.unwritten_sends:
            return False
        for trs in self._index(s, (q,)).values():
            for tr in trs:
                if tr.kind == "send" and tr.parts[0][0] == q and \
                        self.m.index[tr.parts[0][2].op.peer] == ev.rank and \
                        (not ev.has_msg or msg_ok(ev.msg, tr.msg, tr.parts[0][2].op.kind)):
                    self.unwritten_sends.add(key)
                    self._commit(tr, (), s, (q,))
                    return True
        return False

    def _fields(self, ev, row):
        """The recorded op, peer and group are the row's (they are redundant with the
        row the label names; a trace that disagrees is wrong at this line)."""
        op = row.op
        cls = type(op)
        if OPCLASS[cls] != ev.op:
            return f"recorded op {ev.op!r}, but row {row.label} is {OPCLASS[cls]}"
        if (cls is Send or cls is Recv) and op.peer != ev.peer:
            return f"recorded peer {ev.peer!r}, but row {row.label} talks to {op.peer!r}"
        if cls is Coll and op.group != ev.group:
            return (f"recorded a collective on {ev.group}, but row {row.label} is "
                    f"{op.op} on {op.group} (collective on the wrong group)")
        return None

    def _unwritten_recv(self, ev, q, s) -> bool:
        """Buffered: ended rank q took the head of the full channel that ev's recorded
        send needs room in (UNWRITTEN: the send proves the room was made)."""
        for trs in self._index(s, (q,)).values():
            for tr in trs:
                if tr.kind == "recv" and tr.parts[0][0] == q and \
                        self.m.index[tr.parts[0][2].op.peer] == ev.rank:
                    self._commit(tr, (), s, (q,))
                    return True
        return False

    def _own_posted(self, ev, s) -> bool:
        """The model's process offers the event's row at its state (guards true), and
        the row leads where the event says it went."""
        pr = s.procs[ev.rank]
        if pr.status != LIVE:
            return False
        row = self._row_at(ev, s)
        if row is None or self._fields(ev, row) is not None:
            return False
        if ev.src == pr.pcs[ev.t] and row.dst != ev.dst:
            return False
        loc, sends, recvs, colls = self.m.posted(ev.rank, pr)
        for tr in loc:
            if tr.parts[0][1] == ev.t and tr.parts[0][2].label == ev.label:
                return True
        for p, t, row in list(sends) + list(recvs) + [e for _, e in colls]:
            if t == ev.t and row.label == ev.label:
                return True
        return False

    def _row_at(self, ev, s):
        """The row ev took at the model's state: (thread, control state, label) names
        it, except where two rows share them (cond_flag_all's `last_generator_call` at
        `gen`, told apart by their guards and dst): then the one to the recorded dst;
        the first when none goes there (the recorded dst is wrong: `_mismatch` says)."""
        pr = s.procs[ev.rank]
        if pr.status != LIVE:
            return None
        pc = pr.pcs[ev.t]
        first = None
        for row in self.m.tables[ev.rank][ev.t].get(pc, ()):
            if row.label == ev.label:
                if row.dst == ev.dst:
                    return row
                if first is None:
                    first = row
        return first

    def _why_not(self, ev, s) -> str:
        """Why the model's index has nothing for this event here, in domain words."""
        m, p, t = self.m, ev.rank, ev.t
        pr = s.procs[p]
        if pr.status != LIVE:
            return f"{m.names[p]} is no longer live in the model ({pr.status}: {pr.reason})"
        pc = pr.pcs[t]
        if pc == FINAL or pc == DEAD_THREAD:
            return f"thread {ev.thread} has already finished ({pc})"
        rows = m.tables[p][t].get(pc, ())
        row = self._row_at(ev, s)
        if row is None:
            return (f"no row labelled {ev.label!r} leaves {m.names[p]}.{ev.thread} state "
                    f"{pc!r} (rows there: {', '.join(sorted({r.label for r in rows})) or 'none'})")
        if row.guard is not None and not row.guard(pr.v, self.cfg):
            return (f"row {row.label} at {pc!r} is not enabled (guard "
                    f"{getattr(row.guard, '__name__', '?')} false): "
                    + guard_words(m, p, row, pr.v, self.cfg))
        if "join_comms" in row.tags:
            return (f"{row.label} joins the other thread, which is at "
                    f"{[q for u, q in enumerate(pr.pcs) if u != t]}")
        if ev.op == "send" and self.cfg.p2p == "buffered":
            q = m.index[ev.peer]
            chan = s.chans[m.chan_index[(p, q)]]
            return (f"the channel {m.names[p]} -> {m.names[q]} holds {len(chan)} "
                    f"message(s) (eager={self.cfg.eager})")
        if ev.op in _COMM:
            return (f"its row {row.label} is posted, but the model enables no {ev.op} "
                    f"with the recorded partners ({_coord(ev)})")
        return f"row {row.label} at {pc!r} is not enabled"

    def _commit(self, tr, evs, s, unw=()):
        m = self.m
        # verify: the model enables it, or it is the EAGER_SEND_RULE environment step
        if self.verify and tr not in m.enabled(s) and not (
                tr.kind == "send" and tr in eager_sends(m, s, tr.parts[0][0])):
            raise AssertionError("replayer took a transition the model does not enable: "
                                 + m.describe(s, tr))
        s2 = m.step(s, tr)
        res = self.res
        parts = tr.parts
        if parts[0][0] == 0 or (len(parts) > 1 and parts[1][0] == 0):
            v, v2 = s.procs[0].v, s2.procs[0].v
            e = evs[0] if evs else None
            if e is not None and e.has_msg and tr.kind == "local":
                subj = local_subject(v, v2)
                if e.msg != subj:
                    return BAD, lambda: (f"rank0 recorded {e.label} of {fmt_msg(e.msg)}, the "
                                         f"model's {e.label} acts on {fmt_msg(subj)}"
                                         + msg_diff(e.msg, subj))
            if v2 is None or v.decode_q is not v2.decode_q:
                self._queue_moves(tr, v, v2)
        tagged = False
        for part in parts:
            if part[2].tags:
                tagged = True
                break
        viol = tagged and (check_transition(m, s, tr, s2) or check_progress_at_exit(m, s, tr))
        if not viol:
            viol = self._state_check(s2)
        self.s = s2
        res.steps += 1
        if viol is not None:
            res.violations.append((res.steps, viol, evs[0] if evs else None))
        for e in evs:
            e.done = True
        if tr.kind == "p2p":
            (p, _, row), (q, _, _) = parts
            key = (p, q)
            self.sent[key] = self.sent.get(key, 0) + 1
            self.rcvd[key] = self.rcvd.get(key, 0) + 1
        elif tr.kind == "send":
            p, _, row = parts[0]
            key = (p, m.index[row.op.peer])
            self.sent[key] = self.sent.get(key, 0) + 1
            if self.cfg.p2p == "rendezvous":
                res.notes.append(f"{m.names[p]}: its {row.label} ({evs[0].where()}) "
                                 f"completed in the transport; its receiver "
                                 f"{m.names[key[1]]} was killed before receiving it "
                                 f"(EAGER_SEND_RULE)")
        elif tr.kind == "recv":
            p, _, row = parts[0]
            key = (m.index[row.op.peer], p)
            self.rcvd[key] = self.rcvd.get(key, 0) + 1
        for q in unw:
            rows = [row for p, _, row in parts if p == q]
            where = ", ".join(e.where() for e in evs) or "its peer's receive"
            text = (f"{m.names[q]}: its {rows[0].label if rows else tr.kind} "
                    f"({tr.kind}, completed with {where}) was never written (UNWRITTEN: "
                    f"its trace ended {self.run.ranks[q].ended} after the op)")
            res.lost.append((q, text))
            res.notes.append(text)
        return FIRED, None

    def _state_check(self, s2):
        """`check_state(m, s2)`, which reads rank0's process state only (its docstring):
        judged again only when that state is another object (most steps leave it)."""
        r0 = s2.procs[0]
        if r0 is not self._checked_r0:
            self._checked_r0, self._checked_viol = r0, check_state(self.m, s2)
        return self._checked_viol

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
        gc_was = gc.isenabled()
        gc.disable()      # states are acyclic tuples: generational passes only cost time
        try:
            self._loop()
        finally:
            if gc_was:
                gc.enable()
            res.seconds = time.perf_counter() - t0
        res.state = self.s
        res.replayed = res.events - sum(self._pending(r) for r in range(self.n))
        if res.divergence is None:
            self._finish()
        res.ok = res.divergence is None and not res.violations
        return res

    def _loop(self):
        events, heads, n = self.events, self.heads, self.n
        attempt = self._fire
        while True:
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
            if not any(self._has_pending(r) for r in range(n)):
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
                if not ev.done and ev.op != "exit" and self._ready(ev) and \
                        self.try_fire(ev) == FIRED:
                    return True
        return False

    # ------------------------------------------------------------------ endings
    def _end_phase(self) -> bool:
        s, m, run = self.s, self.m, self.run
        self.end_phase = True
        try:
            # 1. crashed ranks, once their recorded events are replayed
            for r in run.crashed:
                if s.procs[r].status == LIVE and not self._has_pending(r):
                    self._step_env(Tr("crash", ((r, None, None),)))
                    return True
            # 2. an exit that sets the abort flag
            for r in range(self.n):
                h = self.heads[r]
                for ev in self.events[r][h:h + self.window]:
                    if not ev.done and ev.op == "exit" and self._ready(ev) and \
                            self.try_fire(ev) == FIRED:
                        return True
            # 3. the watchdog and the abort flag
            live = [p for p, pr in enumerate(s.procs) if pr.status == LIVE]
            if not live:
                return False
            if any(self._has_pending(p) for p in live):
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

    def _culprit(self, ev):
        """The event a stuck head's reason is about: a reason about another recorded
        event (`Blame`: a member's row or fields, the partner's coordinates) names that
        one; a wait names the first unreplayed event of the rank waited on, whose own
        reason is followed in turn (never back to an event already visited). The member
        of a transition that is blamed is the one the reason is about, never the one
        tried first."""
        code, why = self._fire(ev)
        seen = {id(ev)}
        while isinstance(why, Blame) and why.ev is not None and id(why.ev) not in seen:
            ev = why.ev
            seen.add(id(ev))
            if code == BAD:
                break
            code, why = self._fire(ev)
        return ev, code, why

    def _diverge_stuck(self):
        """Name the culprit: of the events first in their rank's file, each followed to
        the event its reason is about (`_culprit`), one whose own row the model does not
        offer (no such row, a guard false, a broken src chain, another dst) before one
        that is wrong only in combination, before one that merely waits (a healthy
        member of a collective the culprit never joins)."""
        m, s = self.m, self.s
        best = None
        for r in range(self.n):
            if self._head(r) is None:
                continue
            ev, code, why = self._culprit(self._head(r))
            s = self.s                  # an UNWRITTEN completion may have been taken
            own = self._chain(ev) is None and self._own_posted(ev, s)
            cand = (0 if not own else 1 if code == BAD else 2, ev.rank, ev.line, ev,
                    why() if callable(why) else why)
            if best is None or cand[:3] < best[:3]:
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
        _, r, _, ev, why = best
        row = self._row_at(ev, s)
        gf = row if row is not None and row.guard is not None and \
            not row.guard(s.procs[r].v, self.cfg) else None
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

def _current_posted(m: Model):
    """Model.posted for a replay, replaced on the replayer's own instance as the
    explorer replaces it on its own (model/explore.py): the same pure function of (p, pr),
    kept for each process's current state only, found by identity. A replay visits each
    process state once, so the model's cache of every state seen (keyed by hashing whole
    states) would only grow."""
    compute = m._posted
    last = [None] * m.n

    def posted(p, pr):
        hit = last[p]
        if hit is not None and hit[0] is pr:
            return hit[1]
        out = compute(p, pr)
        last[p] = (pr, out)
        return out
    return posted


P2P_OPS = ("send", "recv")


def _may_lag(d, ev) -> bool:
    """Earlier line `d` of ev's rank may still be unreplayed when ev is replayed: d is on
    another thread or the other side of ev's pair-state thread, and a send on d's own side
    up to d is not replayed yet. The transport may complete a send before its receiver
    posts the receive (gloo: model/events.py EAGER_SEND_RULE), so under rendezvous the
    model's send, and what its side did after it, may come after later lines. Two p2p
    ops on the two sides of one pair-state thread were in flight together: the order in
    which the thread noticed their completions is not causal (the leader's send of
    result k may be noticed after its receive of envelope k+1, which rank0 sent after
    receiving result k), so neither bounds the other. For the same reason a send noticed
    late is bounded only by its own side: lines of other threads, or of the other side
    of its pair-state thread, written before it may come after it (chaos: the leader
    wrote its send of result k after queueing envelope k+1 and main's broadcasts)."""
    if d.t == ev.t and (d.lane is None or ev.lane is None or d.lane == ev.lane):
        return False
    if ev.op == "send" or (d.t == ev.t and d.op in P2P_OPS and ev.op in P2P_OPS):
        return True
    for x in d.sends:
        if not x.done:
            return True
    return False


def _lane(src: str, dst: str):
    """A comms thread: 0 = send side, 1 = receive side, None = both (a barrier)."""
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
