"""Partial-order reduction: ample sets over closed groups of threads.

In a state s the explorer may expand an *ample set* A, a subset of the enabled
transitions, instead of all of them. Here A is the set of enabled transitions whose
participants all belong to a *closed* group G of threads, plus the crash of each
process all of whose threads are in G. G is the closure of one live thread under:
  partners   the threads that can take part in a row it has posted (guard true): for a
             send or receive, the threads of the peer process that have a receive or
             send row toward its role; for a collective, every thread with a row on
             that group, unless a member of the group is gone (then the collective
             can never complete and ties nobody);
  its own process, with crash budget left: every other thread of it (a crash ends all
             of a process's threads at once, so it is dependent on each of them);
  its own process, with no crash budget left: each other thread u whose *future*
             rows conflict with the rows at the thread's control state. u's future
             rows are the rows reachable from u's control state in its table, less
             those that can never fire (a collective on a group with a member gone, a
             rendezvous send or receive to a process that is gone). Two rows conflict
             when one writes a variable (or control state) the other reads or writes:
             their footprints (model.footprint, derived from the source of their
             guard, make, accept and update and from the properties their tags ask
             for).
Rows whose guard is false do not count as partners: a guard reads only its process's
variables, which only its process's threads write (and those are in G or, by the
conflict rule, cannot write what the guard reads). Typical groups: {rank0} while both
its threads only do local work; rank0's threads and the leader's comms thread while
they talk point-to-point and the leader's main thread runs Phase B with the workers
(once no crash is left: the comms thread's rows touch the inbox, the outbox and its own
frame, Phase B touches the call counter); the mesh while it runs collectives.

Every closed group is tried; a group is accepted only if A holds at least one
transition that is not a crash and A is smaller than the full enabled set; the
smallest accepted A is used.

Why it is sound here (the properties of model.properties keep their verdicts)
  C1 (no transition dependent on A can run before a member of A): a transition b
  that does not belong to G involves only threads outside G. b cannot be joint with
  a thread of G: a joint transition needs a posted row of every participant, the rows
  G's threads post depend only on their own process's variables, and by closure they
  involve only G (a collective left out because a member of its group is gone can
  never fire: a gone process never comes back). b of another process touches none of
  G's variables; b of a thread u of the same process as a thread t of G is one of u's
  future rows, which by the conflict rule neither writes what t's rows read or write
  nor reads what they write: b cannot enable, disable or change any row at t's
  control state, and commutes with each of them. (Mesh_pg's sequence number belongs
  to whoever is in its collective; a buffered channel is read only by a posted
  receive, and G's receive and send rows have their peers' threads in G.) The
  exceptions, and why they do no harm:
  - crash(p), p's threads in G, is dependent on G's transitions, so it is in A. With
    crash budget left every thread of p is in G, so no thread outside G is disabled
    by it. It shares the fault budget with crash(x), x outside G; when one fault is
    left, crash(x) disables crash(p). A run that takes crash(x) then never crashes p,
    so it is covered by a (a non-crash member of A) followed by that run: a stays
    enabled, because only G's own moves, crash(p) or the abort flag change G. With no
    budget left no crash is enabled, and G may hold some threads of a process only.
  - watchdog (and an exit that sets the abort flag) disables everything. But once the
    abort flag is set the only transition is the release of every live process,
    which ends in a state with no live process: a clean end (model.properties
    `_check_end`), with no transition or state property on the way (the abort state
    keeps rank0's local variables, already judged in the state before). A run that
    reaches the watchdog is therefore covered, as far as verdicts go, by any run that
    covers its prefix.
  Properties. A covering run is the original one with independent transitions
  swapped; two transitions that touch a common variable with at least one write
  never swap, so every transition reads the same values in both runs, and every
  variable takes the same sequence of values. Transition properties read only the
  participants' variables that their tags name (properties.TAG_READS, part of each
  row's read set) and the message, which the sender's row makes from what it reads:
  each is judged alike. The state invariants (queue bounds) read rank0's variables,
  each violation one variable (decode_q, inflight): a value that breaks a bound in one
  run appears in the other. Violation transitions are enabled by their participants'
  posted rows, which the swap does not change. Terminal checks (deadlock, stranding,
  crash > hang, collective mismatch at a stuck state) are about states where nothing
  but crashes is enabled; a run from s that never takes a member of A cannot stop
  there (a stays enabled), so such a state is reached by a run that takes A first
  (C0 and C1 suffice to keep every terminal state; Godefroid, "Partial-Order
  Methods", thm. 6.14).
  Cycle proviso (C3, BFS form): if a member of A leads to a state already visited at
  a depth not greater than s's, s is expanded fully. Every cycle in a breadth-first
  graph has an edge that does not go deeper, so every cycle of the reduced graph
  holds a fully expanded state and no transition is ignored forever. (The state
  graph is acyclic, tests/test_model_check.py checks it, so this rarely fires; it is
  kept so the reduction stays sound if a table ever adds a loop.)
  Violations found under the reduction are real (every reduced state is reachable);
  the search then re-runs without it so the printed counterexample is a shortest one.

Crashes with the watchdog on: no crash is expanded (`Ample.crashes_unobservable`)
  With the heartbeat watchdog modelled (cfg.watchdog, every configuration but the
  no_watchdog mutation's), the reduced search starts with no crash budget: it never
  takes a crash, and the rest of this module then works at budget 0 (threads split
  by their conflicts). Why no verdict is lost: a survivor can observe a crash of w in
  two ways only, and neither can show a violation that a run without the crash does
  not show.
  1. w takes no step. Take a run that crashes w in state x and goes on with
     transitions b1 b2 ... up to the first watchdog step (or its end). Drop the
     crash: every b_i is still enabled in the run where w is alive but takes no step
     after x (it is frozen in its state at x). b_i does not involve w; a local row's
     guard reads its own process; a rendezvous pair needs only its two (live)
     participants; a collective on a group holding w cannot fire after the crash, so
     no b_i is one; a collective on a group without w reads its members only; the
     fault budget is one higher, so every later crash of another process is still
     there. So the frozen run takes the same transitions over the same participant
     states: every transition property (it reads its participants and the message)
     and every violation transition (framing: the two participants' rows; a
     collective mismatch needs every member waiting, so not on a group holding w)
     is judged alike, and rank0's invariants see the same rank0 (or none, w = rank0:
     frozen at x, already judged there). The frozen run is a run of the system (a
     process may take no step for as long as it likes), so the search without
     crashes visits it (inductively, with the other crashes of the run dropped too).
  2. the watchdog: with w gone and someone live it is enabled; it sets the abort
     flag, after which the only transition is the release of every live process, a
     clean end with no property on the way (see the watchdog exception above). No
     violation lies after it. And no state with a live survivor is terminal (the
     watchdog is enabled in it): a crash can add no stuck state, so no deadlock,
     stranding or crash_hang verdict either.
  Hence the set of violations reachable with crashes equals the set without them:
  the verdict (clean or not) is the same, and a violation found is real. Crashes
  are still expanded where the verdict depends on them: with the watchdog off (the
  no_watchdog mutation: a crash then leaves survivors blocked, crash_hang), and by
  the unreduced search (--no-por), which also prints every counterexample
  (model.explore searches again without the reduction once a violation is known).
  tests/test_model_reduction.py checks the agreement on every manifest configuration
  and every mutation with a crash budget, and that the rule applied with the
  watchdog off misses no_watchdog's crash_hang. It rests on the semantics as they
  are: a crash observable other than through missing steps and the abort flag (a
  peer's timeout row, a property that reads crash markers) would break it.

Lone steps: an ample set found without computing enabled(s) (`Ample.lone_step`)
  With no crash budget and no abort flag, if a closed group G's threads have posted
  either exactly one row between them, a local or exit row, or only collective rows,
  all on one group, that the collective rule (Model._collective, on those entries)
  makes into exactly one transition, that transition is G's only enabled one: the
  explorer expands it alone, from the state's summaries (G, as above) and the
  posted rows of G's processes, without `Model.enabled(s)` and without choosing among
  the other groups. It is the ample set of the rule above for G, of size one, so the
  smallest there is (the rule above would pick a set of the same size; in practice
  the very same one: every manifest count and `big`'s are unchanged). C1, the
  properties and the cycle proviso (the explorer applies it to this step as to any
  ample set) hold as above. What the rule above has that this one skips is the look
  at the other transitions: it expands s fully when a violation transition (framing,
  collective mismatch) is enabled. That is not lost, only put off. A violation
  transition v is made from posted send, receive or collective rows, so none of G's
  threads takes part in v (G posted a local row only, or took part in the one
  collective that is not a violation); by C1 the lone step neither disables v nor
  changes its participants, so v is enabled in the successor too, and in each state
  after it that is reached by lone steps. The state graph is acyclic and finite, so
  such a path reaches a state with no lone step (or an already visited one: the same
  argument applies to where it was reached first); there `enabled` is computed, v
  is seen, and the state is expanded fully, so v is found. The one step that could
  disable v is one that sets the abort flag (every live process is then released):
  the explorer does not take a lone step whose successor has the flag set, and
  expands that state by the rule above. A lone step is not a terminal state, so no
  stuck state is missed. The collective's outcome is cached per (candidate group,
  its processes' interned states): the rule reads only the entries and the members'
  states (the sequence number appears only in a violation's text, and a violation
  is never a lone step).
  Cost (docs/model-check.md): half of `big`'s states are expanded this way; the
  lone step costs about a fifth of `enabled` plus the choice of the ample set there.
  tests/test_model_reduction.py checks that lone steps change no count, that they are
  taken, and that a variant taking a thread's single local row whether or not its
  group is closed misses `unbounded_decode_queue` under the agreement check.

Designs considered and rejected
  Process granularity (a process's threads always together, the reduction before the
  leader's comms thread): sound, but with the comms thread the leader has a receive
  posted toward rank0 nearly always and a collective toward the mesh while Phase B
  runs, so its group was almost always everyone. Splitting a process with crash
  budget left: a crash of the process after its other thread's point-to-point step
  reaches a state (the peer moved, the process dead) that crashing it first does
  not, so the crash ties the threads. Computing only the group's transitions
  (enabled() on a view of s where outsiders have left) instead of filtering all of
  them: the same sets, but no faster (the outsiders are mostly blocked, so their
  transitions are cheap). Leaving crashes out of A (a crash absorbs the process's
  local steps): true only for single-process local steps, not for collectives; the
  explorer uses the local case as a rule of its own (model.explore, "crash after a
  local step").
"""
from __future__ import annotations

from .footprint import field_mask, reads_of, row_footprint
from .ops import Coll, Exit, Recv, Send
from .semantics import LIVE, Model, State, Tr


class Threads:
    """The static part: one bit per thread of every process (an *agent*), the threads
    that can answer each kind of row, and the footprint of each row."""

    def __init__(self, model: Model):
        self.model = model
        self.n = model.n
        self.nthreads = [len(model.tables[p]) for p in range(model.n)]
        self.offset = [sum(self.nthreads[:p]) for p in range(model.n)]
        self.bit = [[1 << (self.offset[p] + t) for t in range(self.nthreads[p])]
                    for p in range(model.n)]
        self.procmask = [sum(bits) for bits in self.bit]
        s0 = model.initial_state()
        self.fields = [type(pr.v)._fields for pr in s0.procs]
        self.rendezvous = model.cfg.p2p == "rendezvous"
        # Who can answer a send (their receive rows) or a receive (their send rows) of
        # a role, per process; who has a row on each group.
        self.recv_threads, self.send_threads, self.coll_threads = {}, {}, {}
        for p, table in enumerate(model.tables):
            for t, rows_by_pc in enumerate(table):
                for rows in rows_by_pc.values():
                    for row in rows:
                        op, b = row.op, self.bit[p][t]
                        if type(op) is Recv:
                            key = (p, op.peer)
                            self.recv_threads[key] = self.recv_threads.get(key, 0) | b
                        elif type(op) is Send:
                            key = (p, op.peer)
                            self.send_threads[key] = self.send_threads.get(key, 0) | b
                        elif type(op) is Coll:
                            self.coll_threads[op.group] = \
                                self.coll_threads.get(op.group, 0) | b
        self.member_mask = {grp: sum(1 << q for q in members)
                            for grp, members in model.members.items()}
        self._row_fp, self._future, self._guard = {}, {}, {}

    def agents(self, mask: int) -> tuple:
        """The (process, thread) of each agent in `mask`, in process and thread order."""
        return tuple((p, t) for p in range(self.n) for t in range(self.nthreads[p])
                     if mask & self.bit[p][t])

    def row_fp(self, p, t, row) -> tuple:
        hit = self._row_fp.get(id(row))
        if hit is None:
            hit = self._row_fp[id(row)] = row_footprint(
                row, self.fields[p], t, self.nthreads[p])
        return hit

    def guard_reads(self, p, t, row) -> int:
        """What can turn row's guard from false to true: the fields its guard reads,
        and for a `join_comms` row the other threads' control states."""
        hit = self._guard.get(id(row))
        if hit is None:
            nf = len(self.fields[p])
            hit = field_mask(reads_of(row.guard), self.fields[p],
                        (1 << (nf + self.nthreads[p])) - 1)
            if "join_comms" in row.tags:
                hit |= ((1 << self.nthreads[p]) - 1) << nf
            self._guard[id(row)] = hit
        return hit

    def now_fp(self, p, t, pr) -> tuple:
        """(reads, writes, guard reads) at thread t in process state pr: the footprint
        of its rows whose guard holds (what it may take), and what the guards of the
        others read (what would have to change before one of them could be taken)."""
        m = self.model
        r = w = g = 0
        posted = m.posted(p, pr)
        able = {id(row) for _p, _t, row in posted[1] + posted[2] if _t == t}
        able |= {id(row) for _g, (_p, _t, row) in posted[3] if _t == t}
        able |= {id(tr.parts[0][2]) for tr in posted[0] if tr.parts[0][1] == t}
        for row in m.tables[p][t].get(pr.pcs[t], ()):
            if id(row) in able:
                rr, ww = self.row_fp(p, t, row)
                r, w = r | rr, w | ww
            else:
                g |= self.guard_reads(p, t, row)
        return r, w, g

    def future_fp(self, p, u, pc, live: int) -> tuple:
        """(reads, writes) of every row thread u may still take from pc: the rows
        reachable in its table, less those that can never fire given who is live."""
        key = (p, u, pc, live)
        hit = self._future.get(key)
        if hit is None:
            table, m = self.model.tables[p][u], self.model
            r = w = 0
            seen, todo = {pc}, [pc]
            while todo:
                for row in table.get(todo.pop(), ()):
                    op = row.op
                    if type(op) is Coll and \
                            self.member_mask[op.group] & live != self.member_mask[op.group]:
                        continue
                    if self.rendezvous and type(op) in (Send, Recv) and \
                            not live >> m.index[op.peer] & 1:
                        continue
                    if "join_comms" in row.tags:
                        # It waits for every other thread to finish: not before the
                        # unfinished thread this future is weighed against moves.
                        continue
                    rr, ww = self.row_fp(p, u, row)
                    r, w = r | rr, w | ww
                    if type(op) is not Exit and row.dst not in seen:
                        seen.add(row.dst)
                        todo.append(row.dst)
            hit = self._future[key] = (r, w)
        return hit


def _conflict(now: tuple, future: tuple) -> bool:
    """Whether a thread's rows now (reads, writes, guard reads of the rows it cannot take
    yet) and another thread's future rows (reads, writes) may fail to commute, or the
    future may enable a row it cannot take yet."""
    return bool(now[1] & (future[0] | future[1]) or future[1] & (now[0] | now[2]))


class Ample:
    """Chooses the ample set of a state. Caches, per interned process state, what its
    threads have posted, and per combination of those (with the crash budget's sign)
    the closed groups."""

    # False: a process's threads always together (the process-level reduction, kept
    # for comparison: the bench's "por proc" row).
    split_threads = True
    # False: crashes expanded with the watchdog on too (the bench's "por crash" row).
    leave_out_crashes = True

    def __init__(self, model: Model):
        self.model = model
        self.n = model.n
        self.th = Threads(model)
        # pid * n + p -> summary id: [fine ids, coarse ids] (`summary`), _UNSEEN if not
        # computed yet
        self._ids = ([], [])
        self._summaries = {}   # summary -> id
        self._by_offer = {}    # (p, control states, id(offer set)) -> (offer set, ids)
        self._by_id = []
        # (summary ids..., budget left) -> (key id, closed groups, `_lone_candidates`)
        self._closed = {}
        self._picked = {}      # (key id, participants of each transition) -> choice
        self._kinds = []       # pid * n + p -> `_posted_kinds`, _UNSEEN if not computed
        self._kinds_by_offer = {}   # (p, id(offer set)) -> (offer set, `_posted_kinds`)
        self._last = (None, None)   # (state, `_combination`) of the last `lone_step`
        # a candidate's number and its processes' ids, packed into one int
        # (_PID_BITS each) -> its lone collective or None
        self._coll_outcome = {}
        self._candidates = {}  # (agent mask, group) -> `_lone_candidates` entry

    def crashes_unobservable(self) -> bool:
        """Whether the reduced search may leave every crash out: the watchdog is on
        (module docstring, "Crashes with the watchdog on")."""
        return self.leave_out_crashes and self.model.watchdog_enabled()

    def summary(self, p, pr, pid):
        """Ids for what matters about process p in local state pr: None if it is not
        live, else (fine, coarse): fine stands for its control states, per thread what
        its posted rows reach ((peer process, answering threads) or group) and its
        rows' footprints; coarse for the posted rows' reach alone, all that counts
        with crash budget left (its threads are then together), so fewer distinct
        combinations need their groups computed."""
        key = pid * self.n + p
        fine, coarse = self._ids
        if key >= len(fine):
            self._grow(key + 1)
        if fine[key] is _UNSEEN:
            if pr.status != LIVE:
                fine[key] = coarse[key] = None
            else:
                # A function of the control states and the rows posted (one offer
                # set stands for thousands of process states, model.explore): keyed
                # by those, the offer set kept alive beside its id.
                posted = self.model.posted(p, pr)
                by = (p, pr.pcs, id(posted))
                hit = self._by_offer.get(by)
                if hit is None or hit[0] is not posted:
                    hit = self._by_offer[by] = (posted, *self._summarise(p, pr, posted))
                fine[key], coarse[key] = hit[1], hit[2]
        return None if fine[key] is None else (fine[key], coarse[key])

    def _summarise(self, p, pr, posted) -> tuple:
        """(fine, coarse) summary ids of live process p in state pr (`summary`)."""
        th, m = self.th, self.model
        _local, sends, recvs, colls = posted
        per = [[] for _ in range(th.nthreads[p])]
        role = m.roles[p]
        for _p, t, row in sends:
            q = m.index[row.op.peer]
            per[t].append((q, th.recv_threads.get((q, role), 0)))
        for _p, t, row in recvs:
            q = m.index[row.op.peer]
            per[t].append((q, th.send_threads.get((q, role), 0)))
        for grp, (_p, t, row) in colls:
            per[t].append((grp, th.coll_threads.get(grp, 0)))
        reach = tuple(tuple(sorted(set(x), key=repr)) for x in per)
        return (self._intern((pr.pcs, reach, tuple(
            th.now_fp(p, t, pr) for t in range(th.nthreads[p])))),
                self._intern((None, reach, None)))

    def _intern(self, val) -> int:
        hit = self._summaries.get(val)
        if hit is None:
            hit = self._summaries[val] = len(self._by_id)
            self._by_id.append(val)
        return hit

    def groups(self, key: tuple) -> list:
        """The closed groups (agent bit masks) of a combination of summaries, smallest
        first."""
        *ids, budget = key
        th, by_id = self.th, self._by_id
        live = 0
        for p, i in enumerate(ids):
            if i is not None:
                live |= 1 << p
        live_agents = sum(th.procmask[p] for p in range(self.n) if live >> p & 1)
        found = set()
        for p, i in enumerate(ids):
            if i is None:
                continue
            for t in range(th.nthreads[p]):
                group = self._closure(p, t, ids, live, live_agents, budget)
                found.add(group)
        return sorted(found, key=lambda g: bin(g).count("1"))

    def _closure(self, p0, t0, ids, live, live_agents, budget) -> int:
        th, by_id, m = self.th, self._by_id, self.model
        group, todo = th.bit[p0][t0], [(p0, t0)]
        while todo:
            p, t = todo.pop()
            pcs, posted, now = by_id[ids[p]]
            add = 0
            for target, answer in posted[t]:
                if type(target) is int:    # a peer process
                    if th.rendezvous and not live >> target & 1:
                        continue
                    add |= answer
                elif th.member_mask[target] & live == th.member_mask[target]:
                    add |= answer
            if budget:
                add |= th.procmask[p]
            else:
                mine = now[t]
                for u in range(th.nthreads[p]):
                    if u != t and not group & th.bit[p][u] and _conflict(
                            mine, th.future_fp(p, u, pcs[u], live)):
                        add |= th.bit[p][u]
            add &= live_agents & ~group
            if add:
                group |= add
                for q in range(self.n):
                    if add & th.procmask[q]:
                        for u in range(th.nthreads[q]):
                            if add & th.bit[q][u]:
                                todo.append((q, u))
        return group

    def _combination(self, s: State, pids: list) -> tuple:
        """(key id, closed groups, one-thread groups as (process, thread)) of the
        combination of s's summaries; `pids` are the interned ids of s's process
        states (model.explore.Interner)."""
        together = s.faults_left > 0 or not self.split_threads
        # The summary ids of (process, interned state): flat lists indexed by
        # pid * n + p, one for each value of `together` (a list index instead of a
        # probe of a dict of that size: this lookup was the largest line of the
        # ample set's cost, docs/model-check.md).
        which, n = self._ids[together], self.n
        try:
            key = [which[i * n + p] for p, i in enumerate(pids)]
        except IndexError:
            self._grow(max(pids) * n + n)
            key = [which[i * n + p] for p, i in enumerate(pids)]
        if _UNSEEN in key:
            procs = s.procs
            for p, i in enumerate(pids):
                if key[p] is _UNSEEN:
                    self.summary(p, procs[p], i)
                    key[p] = which[i * n + p]
        key.append(together)
        key = tuple(key)
        closed = self._closed.get(key)
        if closed is None:
            groups = self.groups(key)
            closed = self._closed[key] = (len(self._closed), groups,
                                          self._lone_candidates(key, groups))
        return closed

    def _lone_candidates(self, key: tuple, groups: list) -> tuple:
        """The groups that may hold a lone step (`lone_step`), as ((process, thread),
        ...), the group of their collective (None: a local step), their processes and
        a number: those whose threads' posted rows reach nothing, or one group
        only."""
        ids, out = key[:-1], []
        for g in groups:
            agents = self.th.agents(g)
            reach = {x for p, t in agents for x, _answer in self._by_id[ids[p]][1][t]}
            if not reach or len(reach) == 1 and type(next(iter(reach))) is not int:
                grp = next(iter(reach)) if reach else None
                # one copy of each candidate: thousands of combinations share it
                hit = self._candidates.get((g, grp))
                if hit is None:
                    hit = self._candidates[(g, grp)] = (
                        agents, grp, tuple(sorted({p for p, _t in agents})),
                        len(self._candidates))
                out.append(hit)
        return tuple(out)

    def __call__(self, s: State, trs: list, pids: list) -> list:
        """The transitions to expand in s (trs itself when no group qualifies); `pids`
        are the interned ids of s's process states (model.explore.Interner)."""
        if s.abort or len(trs) < 2:
            return trs
        last, closed = self._last
        if last is not s:
            closed = self._combination(s, pids)
        kid, groups, _lone = closed
        if not groups:
            return trs
        bit, procmask = self.th.bit, self.th.procmask
        owner = [kid]
        for tr in trs:
            if tr.kind == "crash":
                owner.append(-procmask[tr.parts[0][0]])   # negative: a crash
                continue
            m = 0
            for p, t, _row in tr.parts:
                m |= bit[p][t]
            owner.append(m)
        # The choice depends on the groups and on who takes part in each transition
        # only: states that share both share it (a few thousand of them in millions).
        owner = tuple(owner)
        pick = self._picked.get(owner)
        if pick is None:
            pick = self._picked[owner] = _smallest(groups, owner[1:])
        return trs if pick is None else [trs[i] for i in pick]

    def lone_step(self, s: State, pids: list):
        """The one transition of a closed group whose threads have posted one row
        between them (a local or exit row), or collective rows on one group only that
        the collective rule makes into one transition; in a state with no crash budget
        and no abort flag. An ample set found without `enabled(s)` (module
        docstring, "Lone steps"); None if no group qualifies."""
        if s.abort or s.faults_left:
            return None
        closed = self._combination(s, pids)
        self._last = (s, closed)
        kinds, n, procs = self._kinds, self.n, s.procs
        for agents, grp, members, number in closed[2]:
            one, entries = None, []
            for p, t in agents:
                i = pids[p] * n + p
                if i >= len(kinds):
                    kinds.extend([_UNSEEN] * (i - len(kinds) + 4096))
                mine = kinds[i]
                if mine is _UNSEEN:
                    posted = self.model.posted(p, procs[p])
                    hit = self._kinds_by_offer.get((p, id(posted)))
                    if hit is None or hit[0] is not posted:
                        hit = self._kinds_by_offer[(p, id(posted))] = (
                            posted, self._posted_kinds(p, posted))
                    mine = kinds[i] = hit[1]
                mine = mine[t]
                if mine is None:
                    continue
                if grp is None and type(mine) is Tr and one is None:
                    one = mine
                elif grp is not None and type(mine) is tuple and mine[0] == grp:
                    entries += mine[1]
                else:
                    break
            else:
                if one is not None:
                    return one
                if entries:
                    # The collective rule reads the entries and the members' states
                    # only: its outcome is a function of these processes' states.
                    key = number
                    for p in members:
                        key = key << _PID_BITS | pids[p]
                    hit = self._coll_outcome.get(key, _UNSEEN)
                    if hit is _UNSEEN:
                        out = []
                        self.model._collective(s, grp, entries, out)
                        hit = self._coll_outcome[key] = \
                            out[0] if len(out) == 1 and out[0].kind == "coll" else None
                    if hit is not None:
                        return hit
        return None

    def _posted_kinds(self, p, posted) -> tuple:
        """Per thread of live process p with these posted rows, what it has posted:
        None (nothing), its transition (one row, a local or exit row), (group,
        entries) (collective rows on one group only), or _BUSY (anything else)."""
        local, sends, recvs, colls = posted
        out = []
        for t in range(self.th.nthreads[p]):
            mine = [tr for tr in local if tr.parts[0][1] == t]
            comm = [e for e in sends + recvs if e[1] == t]
            coll = [(g, e) for g, e in colls if e[1] == t]
            groups = {g for g, _e in coll}
            if comm or mine and (coll or len(mine) > 1) or len(groups) > 1:
                out.append(_BUSY)
            elif mine:
                out.append(mine[0])
            else:
                out.append((coll[0][0], tuple(e for _g, e in coll)) if coll else None)
        return tuple(out)

    def _grow(self, size: int) -> None:
        for ids in self._ids:
            if len(ids) < size:
                ids.extend([_UNSEEN] * (size - len(ids) + 4096))


_UNSEEN = object()   # a summary not computed yet (None: the process is not live)
_BUSY = object()     # a thread that has posted more than one row, or a send or receive
# Bits of an interned process state id in a packed key: the explorer's keys pack them
# in as many (model.explore.Interner.FIELD), so every id fits.
_PID_BITS = 24


def _smallest(groups: list, owner: tuple):
    """The indices of the smallest ample set among `groups` (agent masks, smallest
    first) of transitions with these participants (`owner`: agent mask, negated for a
    crash, 0 for a transition of nobody's such as the watchdog); None: none qualifies
    (at least one transition that is not a crash, fewer than all)."""
    best, size = None, len(owner)
    for g in groups:
        amp = [i for i, m in enumerate(owner) if m and abs(m) & g == abs(m)]
        if len(amp) < size and any(owner[i] > 0 for i in amp):
            best, size = amp, len(amp)
    return best
