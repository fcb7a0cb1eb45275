"""Partial-order reduction: ample sets over closed groups of processes.

In a state s the explorer may expand an *ample set* A, a subset of the enabled
transitions, instead of all of them. Here A is the set of enabled transitions of a
*closed* group Q of processes, plus the crash of each live member of Q. Q is the
closure of one live process under "has a posted row with": the peer of a posted send
or receive, every member of a posted collective's group, unless a member of that group
is gone (then the collective can never complete and ties nobody). Rows whose guard is
false do not count: a guard reads only the process's own variables. Typical groups:
{rank0} while both its threads only do local work; {rank0, leader} while they talk
point-to-point and the mesh waits; the mesh ranks while they run collectives and
rank0 works on its own; {rank0, leader} after a worker crashed (the mesh's next
collective can never complete).

Every closed group other than all processes is tried; a group is accepted only if A
holds at least one transition that is not a crash and A is smaller than the full
enabled set; the smallest accepted A is used.

Why it is sound here (the properties of model.properties keep their verdicts)
  Closed means nobody outside Q can interact with Q before Q moves: a joint transition
  needs a posted row of every participant, a member's posted rows depend only on its
  own local state, and by closure they involve only Q (a collective left out because
  a member of its group is gone can never fire: a gone process never comes back, and
  a collective, or a mismatch between collectives, needs every member waiting). So a
  transition b outside Q
  touches neither Q's local states nor anything Q's posted rows read (mesh_pg's
  sequence number belongs to Q; a buffered channel is read only by a posted receive,
  and Q has none toward outsiders). Q's transitions and b commute and neither enables
  or disables the other: the usual condition C1 (no transition dependent on A can run
  before a member of A). The exceptions, and why they do no harm:
  - crash(q), q in Q, is dependent on Q's transitions, so it is in A. It shares the
    fault budget with crash(x), x outside Q; when one fault is left, crash(x)
    disables crash(q). A run that takes crash(x) then never crashes q, so it is
    covered by a (a non-crash member of A) followed by that run: a stays enabled,
    because only Q's own moves, crash(q) or the abort flag change Q.
  - watchdog (and an exit that sets the abort flag) disables everything. But once the
    abort flag is set the only transition is the release of every live process,
    which ends in a state with no live process: a clean end (model.properties
    `_check_end`), with no transition or state property on the way (the abort state
    keeps rank0's local variables, already judged in the state before). A run that
    reaches the watchdog is therefore covered, as far as verdicts go, by any run that
    covers its prefix.
  Every property is local to the processes a transition involves, or to rank0's
  local state: transition properties read the participants' states before and after
  (row tags emit, wire_ids, phase_b_done, end), the state invariant (queue bounds)
  reads rank0 only, violation transitions are enabled by their participants' posted
  rows. Moving Q's transitions ahead of independent ones keeps every process's own
  sequence of local states, so each such check is made in the same local context.
  Terminal checks (deadlock, stranding, crash > hang, collective mismatch at a stuck
  state) are about states where nothing but crashes is enabled; a run from s that
  never takes a member of A cannot stop there (a stays enabled), so such a state is
  reached by a run that takes A first (C0 and C1 suffice to keep every terminal
  state; Godefroid, "Partial-Order Methods", thm. 6.14).
  Cycle proviso (C3, BFS form): if a member of A leads to a state already visited at
  a depth not greater than s's, s is expanded fully. Every cycle in a breadth-first
  graph has an edge that does not go deeper, so every cycle of the reduced graph
  holds a fully expanded state and no transition is ignored forever. (The state
  graph is acyclic, tests/test_model_check.py checks it, so this rarely fires; it is
  kept so the reduction stays sound if a table ever adds a loop.)
  Violations found under the reduction are real (every reduced state is reachable);
  the search then re-runs without it so the printed counterexample is a shortest one.

Processes with two threads (rank0, the leader) are one process here: a process's
posted rows are those of all its threads, so the leader's group holds rank0 while its
comms thread has a receive or send posted and the mesh while its main thread is in a
collective; its threads' shared queues (inbox, outbox) are its own local state, which
no outsider reads. The argument above is over processes and holds unchanged.

Designs considered and rejected
  Computing only the group's transitions (enabled() on a view of s where outsiders
  have left) instead of filtering all of them: the same sets, but no faster (the
  outsiders are mostly blocked, so their transitions are cheap). rank0.main alone
  against the mesh: rank0's main thread does most of the local
  work, but it shares rank0's variables with the comms thread (send_q, decode_q), so
  its steps do not commute with the comms thread's receives; a thread-level reduction
  needs a read/write analysis of every guard and update, which the tables do not
  declare. Leaving crashes out of A (a crash absorbs the process's local steps): true
  only for single-process local steps, not for collectives; the explorer uses the
  local case as a rule of its own (model.explore, "crash after a local step").
"""
from __future__ import annotations

from .semantics import LIVE, Model, State


def partners(model: Model, p: int, pr) -> tuple:
    """Whom process p, in local state pr, has a posted row with: (bit mask of the
    peers of its sends and receives, tuple of the groups of its collectives). Rows whose
    guard is false do not count: a guard reads only p's own variables, so nobody else
    can make it true."""
    _local, sends, recvs, colls = model.posted(p, pr)
    peers = 0
    for _p, _t, row in sends + recvs:
        peers |= 1 << model.index[row.op.peer]
    groups = tuple(sorted({grp for grp, _entry in colls}))
    return peers & ~(1 << p), groups


class Ample:
    """Chooses the ample set of a state; caches each process state's partners and the
    groups each combination of partners closes into."""

    def __init__(self, model: Model):
        self.model = model
        self.n = model.n
        self.masks = {grp: sum(1 << q for q in members)
                      for grp, members in model.members.items()}
        self._partners = {}
        self._groups = {}
        self._closed = {}   # the processes' partners (a tuple) -> their closed groups

    def partners(self, p, pr, pid):
        """Cached per interned process state `pid` (model.explore.Interner): None for a
        process that is not live, else (peers mask, masks of its collectives' groups)."""
        key = pid * self.n + p
        hit = self._partners.get(key, self)
        if hit is self:
            if pr.status != LIVE:
                hit = None
            else:
                peers, groups = partners(self.model, p, pr)
                hit = (peers, tuple(self.masks.get(grp, 0) for grp in groups))
            self._partners[key] = hit
        return hit

    @staticmethod
    def _near(mine: tuple) -> tuple:
        """Each live process's partner mask (None if not live), from its partners."""
        live = 0
        for p, hit in enumerate(mine):
            if hit is not None:
                live |= 1 << p
        near = []
        for p, hit in enumerate(mine):
            if hit is None:
                near.append(None)
                continue
            peers, gmasks = hit
            for gm in gmasks:
                # A collective completes only when every member enters it: with a
                # member gone it never will, so it ties p to nobody.
                if gm & live == gm:
                    peers |= gm
            near.append(peers & ~(1 << p))
        return tuple(near)

    def groups(self, near: tuple) -> list:
        """The closed groups (bit masks) containing each live process, smallest first;
        `near` holds each process's partner mask, or None if it is not live."""
        hit = self._groups.get(near)
        if hit is None:
            everyone = (1 << self.n) - 1
            found = set()
            for p, m in enumerate(near):
                if m is None:
                    continue
                group, todo = 1 << p, m
                while todo & ~group:
                    new = todo & ~group
                    group |= new
                    todo = 0
                    for q in range(self.n):
                        if new >> q & 1 and near[q] is not None:
                            todo |= near[q]
                    todo |= group
                if group != everyone:
                    found.add(group)
            hit = self._groups[near] = sorted(found, key=lambda g: bin(g).count("1"))
        return hit

    def __call__(self, s: State, trs: list, pids: list) -> list:
        """The transitions to expand in s (trs itself when no group qualifies); `pids`
        are the interned ids of s's process states (model.explore.Interner)."""
        if s.abort or len(trs) < 2:
            return trs
        procs, partners, cache, n = s.procs, self.partners, self._partners, self.n
        mine = []
        for p, i in enumerate(pids):
            hit = cache.get(i * n + p, cache)
            mine.append(partners(p, procs[p], i) if hit is cache else hit)
        mine = tuple(mine)
        groups = self._closed.get(mine)
        if groups is None:
            groups = self._closed[mine] = self.groups(self._near(mine))
        if not groups:
            return trs
        owner = []
        for tr in trs:
            parts = tr.parts
            if len(parts) == 1:
                owner.append(1 << parts[0][0])
            else:
                m = 0
                for part in parts:
                    m |= 1 << part[0]
                owner.append(m)
        best, size = trs, len(trs)
        for g in groups:
            amp = [tr for tr, m in zip(trs, owner) if m and m & g == m]
            if len(amp) < size:
                for tr in amp:
                    if tr.kind != "crash":
                        best, size = amp, len(amp)
                        break
        return best
