"""Global semantics: `initial_state`, `enabled`, `step`: the one API the explorer, the
runtime's online monitor and the trace replayer all drive.

A global state is every process's status, control states and local variables, the
point-to-point channel contents (buffered mode), one collective sequence number per
group, the abort flag and the remaining crash-fault budget. Nothing here bounds a
counter or knows about search: the configuration bounds a search, not the semantics.

Rules
  p2p, rendezvous  a send fires only together with a matching posted receive (the
                   conservative reading of NCCL point-to-point). A posted receive from
                   the sender that expects another kind is a framing error.
  p2p, buffered    a send appends to the channel while it holds fewer than `eager`
                   messages; a receive takes the head; a head of an unexpected kind is
                   a framing error.
  collectives      fire only when every member of the group waits at a collective and
                   all of them are the same (op, group, root, kind) at the group's
                   sequence number; any other combination of members all waiting is a
                   collective mismatch. A collective on a group the process is not in
                   is an error (stock torch only warns and returns None).
  crash            with budget left, any live process may die at any step (kill -9).
  watchdog         a process that crashed or exited with an error stops its heartbeat
                   without a clean-exit mark; the survivors' watchdogs set the abort
                   flag. Once the flag is set, every live process is released (exits)
                   before anything else happens: the fast path of crash > hang.
Release paths (model/release.py; the runtime has exactly these, conformance accepts
exactly these): (1) a terminal message: a table exit row (status error/ok); (2) the abort
flag set by a failing rank: an error exit row (status error) or an `abort` exit row (sets
the flag in the step); a failure outside the table (uncaught error, refused op) is a
crash of that rank; either way the `watchdog` transition sets the flag, which the runtime
does at once on the failing rank's way out; (3) the flag set for a killed or silent
rank (launcher record `killed`, heartbeat loss `heartbeat_lost`): `crash`, then
`watchdog`; (4) a per-op deadline: a failure outside the table of the rank whose op
expired (crash, then watchdog); (5) collectives that differ across a group's members (a
workload's extra or missing all_reduce inside one generator call, which no row sees): a
failure outside the table of the rank the cause names, the odd one out (by the members'
waits, or by its own generator calls' counts) or else the one whose watchdog saw it (crash, then watchdog). Every survivor then leaves by `abort`, or
by its own exit row when a terminal message reached it first. The flag's first value is
the root cause; later writers never change it (the model keeps the first `abort` too).
Violations that are visible immediately (framing error, collective mismatch, a message
no row accepts) are returned by `enabled` as transitions of kind "violation", so every
driver sees them the same way.
"""
from __future__ import annotations

from itertools import product
from typing import NamedTuple, Optional

from .config import Config
from .guards import mesh_initial, rank0_initial
from .ops import MESH, WORLD, Coll, Exit, Recv, Send, op_text
from .tables import AFTER_HANDSHAKE, FINAL, INITIAL, THREADS, Tables

LIVE, OK, ERROR, CRASHED, ABORTED = "live", "ok", "error", "crashed", "aborted"
FINAL_STATUSES = (OK, ERROR, CRASHED, ABORTED)
DEAD_THREAD = "dead"
GROUPS = (WORLD, MESH)
_MOVES = frozenset(("local", "exit", "p2p", "send", "recv", "coll"))


class Proc(NamedTuple):
    status: str
    pcs: tuple          # one control state per thread of the role
    v: object           # the role's local variables; None once the process is gone
    reason: str = ""


class State(NamedTuple):
    procs: tuple
    chans: tuple        # buffered p2p: ((kind, msg), ...) for rank0->leader, leader->rank0
    seq: tuple          # collective sequence number per group, in GROUPS order
    abort: str          # "" or the reason written to the abort flag
    faults_left: int


KILLED = Proc(CRASHED, (), None, "killed (crash fault)")   # every crashed process


class Tr(NamedTuple):
    """A transition. parts: ((proc, thread, row), ...) of every participant."""
    kind: str           # local exit p2p send recv coll crash watchdog abort violation
    parts: tuple
    msg: object = None
    info: object = None  # for violations: a Violation


class Violation(NamedTuple):
    prop: str
    detail: str


class Model:
    """The tables bound to a configuration: which process runs which rows."""

    def __init__(self, cfg: Config, tables: Tables):
        """`tables`: the rows to run, from the caller (`tables.shipped_tables()`, or a
        mutation's edit from the tooling); their mutation name must be the config's."""
        if not isinstance(tables, Tables):
            raise TypeError(f"Model(cfg, tables): tables must be a model.tables.Tables, "
                            f"not {type(tables).__name__}")
        if tables.mutation != cfg.mutation:
            raise ValueError(
                f"the config names mutation {cfg.mutation or '(none)'!r} but the tables "
                f"are {tables.mutation or 'the shipped ones'!r}: build the tables for the "
                f"config (model.mutations.mutated_tables(cfg))")
        self.cfg = cfg
        self.source = tables
        per_role = tables.rows
        self.n = cfg.mesh + 1
        self.roles = ("rank0", "leader") + ("worker",) * (cfg.mesh - 1)
        self.names = ("rank0", "leader") + tuple(f"worker{i}" for i in range(1, cfg.mesh))
        self.index = {"rank0": 0, "leader": 1}
        self.members = {WORLD: tuple(range(self.n)), MESH: tuple(range(1, self.n))}
        self.group_rank = {grp: {p: i for i, p in enumerate(m)}
                           for grp, m in self.members.items()}
        self.chan_index = {(0, 1): 0, (1, 0): 1}
        # Faults aimed at "one mesh rank" go to the last mesh rank; it is then kept out
        # of the symmetry reduction, which only permutes identical workers.
        self.target = self.n - 1
        self.tables = tuple(self._compile(per_role, p) for p in range(self.n))
        first, last = 2, self.n
        if (cfg.targets_one_rank or tables.targets_one_rank) and self.target >= 2:
            last = self.n - 1
        self.sym = (first, last) if last - first >= 2 else None
        self._rows_cache = {}
        # per process and thread, the collective rows at each control state, and the
        # groups a process has any collective row on (no other entry can be posted)
        self.coll_rows = tuple(
            tuple({pc: tuple(r for r in rows if type(r.op) is Coll)
                   for pc, rows in th.items()} for th in table) for table in self.tables)
        self.coll_groups = tuple(
            frozenset(r.op.group for th in table for rows in th.values() for r in rows)
            for table in self.coll_rows)
        # the rows a recorded step names, per (process, thread, control state, label),
        # and a process's collective rows per (process, control states): pure functions
        # of the tables, looked up at every replayed step (enabled_as)
        self._named_rows = {}
        self._coll_rows_at = {}
        self._local_trs = {}
        self._watchdog = self._watchdog_enabled()
        # Transitions and process states that recur in millions of states are built
        # once: the crash of each process, the watchdog per (gone process, status),
        # the abort release and the released process per abort reason.
        self._crash = tuple(Tr("crash", ((p, None, None),)) for p in range(self.n))
        self._watchdog_trs = {}
        self._release = {}

    def _compile(self, per_role, p):
        role = self.roles[p]
        rows = per_role[role]
        if p == self.target and role == "worker" and "worker*" in per_role:
            rows = per_role["worker*"]
        if p == self.target and role == "leader" and "leader*" in per_role:
            rows = per_role["leader*"]
        threads = THREADS[role]
        table = tuple({} for _ in threads)
        for row in rows:
            table[threads.index(row.thread)].setdefault(row.src, []).append(row)
        return tuple({pc: tuple(rs) for pc, rs in t.items()} for t in table)

    # ------------------------------------------------------------------ initial state
    def initial_state(self) -> State:
        cfg = self.cfg
        procs = []
        for p, role in enumerate(self.roles):
            v = rank0_initial(cfg) if role == "rank0" else \
                mesh_initial(cfg, leader=role == "leader", targeted=p == self.target)
            pcs = self._start_pcs(p, INITIAL[role])
            if not any(pc in self.tables[p][t] for t, pc in enumerate(pcs)):
                raise ValueError(f"{self.names[p]}: no rows from its initial state {pcs}")
            procs.append(Proc(LIVE, pcs, v))
        return State(tuple(procs), ((), ()), (0, 0), "", cfg.faults)

    def _start_pcs(self, p, pcs):
        # A mutation may remove the handshake: start where the handshake would lead.
        out = []
        for t, pc in enumerate(pcs):
            if pc == "handshake" and pc not in self.tables[p][t]:
                pc = AFTER_HANDSHAKE[self.roles[p]]
            out.append(pc)
        return tuple(out)

    # ------------------------------------------------------------------ enabled
    def enabled(self, s: State) -> list:
        """Every transition enabled in `s`, violations included. Deterministic order."""
        procs = s.procs
        if s.abort:
            for pr in procs:
                if pr.status == LIVE:
                    return [self._released(s.abort)[0]]
            return []
        out, sends, recvs, colls = self._gather(procs, None)
        if sends or recvs:
            if self.cfg.p2p == "rendezvous":
                self._rendezvous(s, sends, recvs, out)
            else:
                self._buffered(s, sends, recvs, out)
        for grp, entries in colls.items():
            self._collective(s, grp, entries, out)
        if s.faults_left > 0:
            crash = self._crash
            out += [crash[p] for p, pr in enumerate(procs) if pr.status == LIVE]
        if self._watchdog:
            gone = live = None
            for p, pr in enumerate(procs):
                st = pr.status
                if st == LIVE:
                    live = True
                elif gone is None and (st == CRASHED or st == ERROR):
                    gone = p
            if gone is not None and live:
                out.append(self._watchdog_tr(gone, procs[gone].status))
        return out

    def _watchdog_tr(self, p, status):
        hit = self._watchdog_trs.get((p, status))
        if hit is None:
            # Name the role, not the index, of an interchangeable worker: the abort
            # reason is part of the state and must not break the symmetry.
            who = self.roles[p] if self.sym and self.sym[0] <= p < self.sym[1] \
                else self.names[p]
            hit = self._watchdog_trs[(p, status)] = Tr(
                "watchdog", (), None, f"heartbeat of {who} lost ({status})")
        return hit

    def _released(self, abort):
        """(the abort release transition, the state of a process it releases)."""
        hit = self._release.get(abort)
        if hit is None:
            hit = self._release[abort] = (
                Tr("abort", (), None, abort),
                Proc(ABORTED, (), None, f"released by abort flag: {abort}"))
        return hit

    def posted(self, p, pr):
        """(local, sends, recvs, colls) that live process p offers in local state pr;
        cached per distinct (p, pr). The explorer may replace it on an instance with
        a lookup keyed by its interned process states (model.explore)."""
        hit = self._rows_cache.get((p, pr))
        if hit is None:
            hit = self._rows_cache[(p, pr)] = self._posted(p, pr)
        return hit

    def _posted(self, p, pr):
        """What process p, in local state pr, offers: a pure function of (p, pr), so it
        is computed once per distinct process state (the explorer's hot path)."""
        tables = self.tables[p]
        return self._offers(p, pr, [(t, row) for t, pc in enumerate(pr.pcs)
                                    for row in tables[t].get(pc, ())])

    def _offers(self, p, pr, rows):
        """`_posted` of the given (thread, row) pairs at pr's control states only."""
        cfg, v = self.cfg, pr.v
        local, sends, recvs, colls = [], [], [], []
        for t, row in rows:
            if row.guard is not None and not row.guard(v, cfg):
                continue
            op = row.op
            cls = type(op)
            if cls is Coll:
                colls.append((op.group, (p, t, row)))
            elif cls is Send:
                sends.append((p, t, row))
            elif cls is Recv:
                recvs.append((p, t, row))
            elif "join_comms" in row.tags and not all(
                    q == FINAL or q == DEAD_THREAD
                    for u, q in enumerate(pr.pcs) if u != t):
                continue
            else:
                local.append(self._local_tr(p, t, row))
        return tuple(local), tuple(sends), tuple(recvs), tuple(colls)

    def _local_tr(self, p, t, row):
        """The local or exit transition of one row: a pure function of (p, t, row), so
        each is built once (every driver offers the same few hundred)."""
        key = (p, t, id(row))
        hit = self._local_trs.get(key)
        if hit is None or hit.parts[0][2] is not row:    # (an id is reused only if freed)
            hit = self._local_trs[key] = Tr("exit" if type(row.op) is Exit else "local",
                                            ((p, t, row),))
        return hit

    def watchdog_enabled(self) -> bool:
        return self._watchdog

    def _watchdog_enabled(self) -> bool:
        # The no_watchdog mutation switches it off through its config (watchdog=False).
        return self.cfg.watchdog

    def _rendezvous(self, s, sends, recvs, out):
        cfg = self.cfg
        for p, t, row in sends:
            q = self.index[row.op.peer]
            msg = row.make(s.procs[p].v, cfg)
            if s.procs[q].status != LIVE:
                continue
            sender = self.roles[p]
            posted = [(q2, u, r) for q2, u, r in recvs if q2 == q and r.op.peer == sender]
            if not posted:
                continue
            kind_ok = [(q2, u, r) for q2, u, r in posted if row.op.kind in r.op.kinds]
            if not kind_ok:
                u, r = posted[0][1], posted[0][2]
                out.append(self._violation(
                    "framing_error",
                    f"{self._who(p, t)} sends {row.op.kind} ({_msg(msg)}) to "
                    f"{self.names[q]}, whose {THREADS[self.roles[q]][u]} thread posted "
                    f"{op_text(r.op)}", ((p, t, row), posted[0])))
                continue
            vq = s.procs[q].v
            taken = [(q2, u, r) for q2, u, r in kind_ok
                     if r.accept is None or r.accept(vq, cfg, msg)]
            if not taken:
                out.append(self._violation(
                    "framing_error", f"{self.names[q]} has no row that accepts "
                    f"{row.op.kind} {_msg(msg)} from {self._who(p, t)}",
                    ((p, t, row), kind_ok[0])))
                continue
            for part in taken:
                out.append(_new(Tr, ("p2p", ((p, t, row), part), msg, None)))

    def _buffered(self, s, sends, recvs, out):
        cfg = self.cfg
        for p, t, row in sends:
            q = self.index[row.op.peer]
            if len(s.chans[self.chan_index[(p, q)]]) < cfg.eager:
                out.append(Tr("send", ((p, t, row),), row.make(s.procs[p].v, cfg)))
        by_thread = {}
        for p, t, row in recvs:
            by_thread.setdefault((p, t, self.index[row.op.peer]), []).append(row)
        for (p, t, src), rows in by_thread.items():
            chan = s.chans[self.chan_index[(src, p)]]
            if not chan:
                continue
            kind, msg = chan[0]
            v = s.procs[p].v
            taken = [r for r in rows if kind in r.op.kinds and
                     (r.accept is None or r.accept(v, cfg, msg))]
            if taken:
                out += [Tr("recv", ((p, t, r),), msg) for r in taken]
            else:
                out.append(self._violation(
                    "framing_error", f"{self._who(p, t)} posted {op_text(rows[0].op)} "
                    f"but the channel from {self.names[src]} holds {kind} {_msg(msg)}",
                    ((p, t, rows[0]),)))

    def _collective(self, s, grp, entries, out):
        cfg = self.cfg
        members = self.members[grp]
        ranks = self.group_rank[grp]
        for p, t, row in entries:
            if p not in ranks:
                out.append(self._violation(
                    "collective_mismatch", f"{self._who(p, t)} calls {op_text(row.op)} "
                    f"but is not a member of {grp} (stock torch warns and returns None)",
                    ((p, t, row),)))
                return
        by_member = {}
        for e in entries:
            mine = by_member.get(e[0])
            if mine is None:
                by_member[e[0]] = [e]
            else:
                mine.append(e)
        if len(by_member) < len(members):
            return
        op = entries[0][2].op
        for e in entries:
            if e[2].op != op:       # rows of one group that differ: compare (op, root, kind)
                sig = {(e[2].op.op, e[2].op.root, e[2].op.kind) for es in by_member.values()
                       for e in es}
                break
        else:
            sig = ()                # every entry the same op: one signature
        if len(sig) > 1:
            detail = "; ".join(f"{self._who(p, es[0][1])} in {op_text(es[0][2].op)}"
                               for p, es in sorted(by_member.items()))
            out.append(self._violation(
                "collective_mismatch", f"{grp} seq {s.seq[GROUPS.index(grp)]}: {detail}",
                tuple(es[0] for es in by_member.values())))
            return
        if op.op == "broadcast":
            root = members[op.root]
            options = [(e, e[2].make(s.procs[root].v, cfg)) for e in by_member[root]]
        else:
            value = tuple(by_member[m][0][2].make(s.procs[m].v, cfg) for m in members)
            options = [(None, value)]
        for root_entry, value in options:
            choices = []
            for m in members:
                if root_entry is not None and m == root_entry[0]:
                    choices.append((root_entry,))
                    continue
                v = s.procs[m].v
                taken = tuple(e for e in by_member[m]
                              if e[2].accept is None or e[2].accept(v, cfg, value))
                if not taken:
                    out.append(self._violation(
                        "framing_error", f"{self.names[m]} has no row that accepts "
                        f"{op_text(op)} value {_msg(value)}", (by_member[m][0],)))
                    break
                choices.append(taken)
            else:
                for parts in product(*choices):
                    out.append(_new(Tr, ("coll", parts, value, None)))

    def _violation(self, prop, detail, parts):
        return Tr("violation", tuple(parts), None, Violation(prop, detail))

    def _who(self, p, t):
        threads = THREADS[self.roles[p]]
        return self.names[p] + (f".{threads[t]}" if len(threads) > 1 else "")

    # ------------------------------------------------------------------ step
    def step(self, s: State, tr: Tr) -> State:
        """The successor of `s` under enabled transition `tr` (pure)."""
        kind = tr.kind
        chans, seq, abort, faults = s.chans, s.seq, s.abort, s.faults_left
        if kind in _MOVES:
            procs = list(s.procs)
            apply, msg = self._apply, tr.msg
            for p, t, row in tr.parts:
                procs[p], new_abort = apply(procs[p], t, row, msg)
                if new_abort and not abort:
                    abort = new_abort
            if kind == "send":
                p, t, row = tr.parts[0]
                ci = self.chan_index[(p, self.index[row.op.peer])]
                chans = _set(chans, ci, chans[ci] + ((row.op.kind, tr.msg),))
            elif kind == "recv":
                p, t, row = tr.parts[0]
                ci = self.chan_index[(self.index[row.op.peer], p)]
                chans = _set(chans, ci, chans[ci][1:])
            elif kind == "coll":
                gi = GROUPS.index(tr.parts[0][2].op.group)
                seq = _set(seq, gi, seq[gi] + 1)
            procs = tuple(procs)
        elif kind == "crash":
            p = tr.parts[0][0]
            procs = _set(s.procs, p, KILLED)
            faults -= 1
        elif kind == "watchdog":
            procs, abort = s.procs, tr.info
        elif kind == "abort":
            gone = self._released(abort)[1]
            procs = tuple(gone if pr.status == LIVE else pr for pr in s.procs)
        else:
            raise ValueError(f"cannot step a {kind} transition")
        return _new(State, (procs, chans, seq, abort, faults))

    def _apply(self, pr: Proc, t, row, msg):
        v = pr.v
        if row.update is not None:
            v = row.update(v, self.cfg, msg)
        op = row.op
        if type(op) is Exit:
            if op.how == "thread_die":
                return _new(Proc, (pr.status, _set(pr.pcs, t, DEAD_THREAD), v, "")), ""
            status = OK if op.how in ("ok", "vanish") else ERROR
            return _new(Proc, (status, (), None, op.reason)), \
                (op.reason if op.how == "abort" else "")
        pcs = pr.pcs
        return _new(Proc, (pr.status, (row.dst,) if len(pcs) == 1 else _set(pcs, t, row.dst),
                           v, pr.reason)), ""

    # ------------------------------------------------------------------ replay index
    def _gather(self, procs, local_of):
        """What every live process offers: local/exit transitions (of the processes in
        `local_of` only, all when None), sends, receives and collective entries by group."""
        out, sends, recvs, colls = [], [], [], {}
        posted = self.posted
        for p, pr in enumerate(procs):
            if pr.status != LIVE:
                continue
            hit = posted(p, pr)
            if local_of is None or p in local_of:
                out += hit[0]
            if hit[1]:
                sends += hit[1]
            if hit[2]:
                recvs += hit[2]
            for grp, entry in hit[3]:
                entries = colls.get(grp)
                if entries is None:
                    colls[grp] = [entry]
                else:
                    entries.append(entry)
        return out, sends, recvs, colls

    def enabled_of(self, s: State, procs) -> dict:
        """The transitions of `enabled(s)` in which a process of `procs` takes part,
        keyed by (process, thread, row label) of each of its participants in `procs`
        (a row's (thread, src, label) is unique, so a key names one row at the state).

        The same rules as `enabled` (it calls the same `_rendezvous`, `_buffered` and
        `_collective` on the same posted rows), restricted to the transitions that can
        involve `procs`: what a trace replayer needs to look a recorded step up instead
        of re-deriving it. Violations are indexed under their participants like any
        transition; crash, watchdog and abort are the environment's and are not here
        (a driver takes them from `enabled`). With the abort flag set nothing else is
        enabled, so the index is empty."""
        if s.abort:
            return {}
        want = set(procs)
        out, sends, recvs, colls = self._gather(s.procs, want)
        if sends or recvs:
            if self.cfg.p2p == "rendezvous":
                mine = [e for e in sends
                        if e[0] in want or self.index[e[2].op.peer] in want]
                if mine:
                    self._rendezvous(s, mine, recvs, out)
            else:
                self._buffered(s, [e for e in sends if e[0] in want],
                               [e for e in recvs if e[0] in want], out)
        for grp, entries in colls.items():
            if want.intersection(self.members[grp]) or any(e[0] in want for e in entries):
                self._collective(s, grp, entries, out)
        idx = {}
        for tr in out:
            for p, t, row in tr.parts:
                if p in want:
                    idx.setdefault((p, t, row.label), []).append(tr)
        return idx

    def enabled_for(self, s: State, p: int, t: int, label: str) -> list:
        """`enabled_of(s, procs)[(p, t, label)]` for any `procs` holding p (empty when
        absent): the transitions of `enabled(s)`, violations included, in which thread t
        of process p takes a row labelled `label` (several rows at one control state
        may share a label, told apart by their guards), in the same order.

        A replayer looks up one recorded step at a time; this runs only the rule that
        row's op belongs to (the same `posted`, `_rendezvous`, `_buffered` and
        `_collective` as `enabled`), on the posted rows that rule reads: a local or exit
        row, its own; a send, the receiver's posted receives (rendezvous) or the channel
        (buffered); a receive, the sender's posted sends to p (rendezvous) or the
        channel head and p's other receives on that thread from that peer (buffered); a
        collective, every live process's posted entries on the row's group."""
        procs = s.procs
        pr = procs[p]
        if s.abort or pr.status != LIVE:
            return []
        local, sends, recvs, colls = self.posted(p, pr)
        # every transition's parts are posted entries; a label may name several rows
        # at one control state (told apart by their guards), so match by label
        mine = [tr for tr in local if tr.parts[0][1] == t and tr.parts[0][2].label == label]
        out = []
        rendezvous = self.cfg.p2p == "rendezvous"
        if sends:
            ours = [e for e in sends if e[1] == t and e[2].label == label]
            if ours and rendezvous:
                for q in sorted({self.index[e[2].op.peer] for e in ours}):
                    pq = procs[q]
                    their = self.posted(q, pq)[2] if pq.status == LIVE else ()
                    self._rendezvous(s, [e for e in ours if self.index[e[2].op.peer] == q],
                                     their, out)
            elif ours:
                self._buffered(s, ours, (), out)
        if recvs:
            for q in sorted({self.index[e[2].op.peer] for e in recvs
                             if e[1] == t and e[2].label == label}):
                if rendezvous:
                    pq = procs[q]
                    if pq.status == LIVE:
                        self._rendezvous(s, [e for e in self.posted(q, pq)[1]
                                             if self.index[e[2].op.peer] == p], recvs, out)
                else:
                    self._buffered(s, (), [e for e in recvs if e[1] == t and
                                           self.index[e[2].op.peer] == q], out)
        if colls:
            groups = {e[2].op.group for g, e in colls if e[1] == t and e[2].label == label}
            if groups:
                self._collectives_on(s, groups, out)
        if out:
            # the rules' transitions that involve this row (a receive's sender may be
            # offered to p's other receives too)
            mine += [tr for tr in out
                     if any(x == p and u == t and r.label == label for x, u, r in tr.parts)]
        return mine

    def _collectives_on(self, s, groups, out):
        """`enabled`'s collective rule on `groups`: every live process's posted entries
        on them (the collective rows at its control states, whose guards hold: the
        entries `posted` has), in `_gather`'s order."""
        cfg = self.cfg
        by_group = {}
        for q, pq in enumerate(s.procs):
            if pq.status != LIVE or groups.isdisjoint(self.coll_groups[q]):
                continue
            rows = self._coll_rows_at.get((q, pq.pcs))
            if rows is None:
                at = self.coll_rows[q]
                rows = self._coll_rows_at[(q, pq.pcs)] = tuple(
                    (t, r) for t, pc in enumerate(pq.pcs) for r in at[t].get(pc, ()))
            if not rows:
                continue
            v = pq.v
            for t, r in rows:       # `_offers(q, pq, rows)[3]`: all of them are Coll rows
                if r.guard is not None and not r.guard(v, cfg):
                    continue
                g = r.op.group
                if g in groups:
                    entries = by_group.get(g)
                    if entries is None:
                        by_group[g] = [(q, t, r)]
                    else:
                        entries.append((q, t, r))
        for grp, entries in by_group.items():
            self._collective(s, grp, entries, out)

    def enabled_as(self, s: State, steps) -> list:
        """The transitions of `enabled(s)` whose parts are exactly `steps`, one
        (process, thread, row label) per participant in any order; no violations; in
        `enabled`'s order. A replayer checks a recorded step with it.

        A local or exit row, a buffered send or receive and a rendezvous pair are
        judged from the named rows alone (`_offers`: their guards; then the same
        `_buffered` / `_rendezvous`): those rules enable such a transition on its own
        rows' guards, kinds and acceptance, whatever else is posted. A collective runs
        the collective rule on every entry posted on the group (`_collectives_on`),
        because that rule reads them all (another member's second entry, a
        non-member's entry)."""
        procs = s.procs
        if s.abort:
            return []
        local, sends, recvs = [], [], []
        for p, t, label in steps:
            pr = procs[p]
            if pr.status != LIVE:
                return []
            key = (p, t, pr.pcs[t], label)
            rows = self._named_rows.get(key)
            if rows is None:
                rows = self._named_rows[key] = tuple(
                    (t, r) for r in self.tables[p][t].get(key[2], ()) if r.label == label)
            if not rows:
                return []
            lo, se, re, co = self._offers(p, pr, rows)
            if co:
                out = []
                self._collectives_on(s, {g for g, e in co}, out)
                break
            local += lo
            sends += se
            recvs += re
        else:
            if len(steps) == 1 and not sends and not recvs:
                return local          # each is the one row's, none a violation
            out = local
            if self.cfg.p2p == "rendezvous":
                if sends and recvs:
                    self._rendezvous(s, sends, recvs, out)
            elif sends or recvs:
                self._buffered(s, sends, recvs, out)
        want = sorted(steps)
        return [tr for tr in out if tr.kind != "violation" and len(tr.parts) == len(want)
                and sorted((p, t, r.label) for p, t, r in tr.parts) == want]

    # ------------------------------------------------------------------ helpers
    def describe(self, s: State, tr: Tr) -> str:
        """One line per step for counterexamples: who, state, op, message ids."""
        if tr.kind == "crash":
            return f"{self.names[tr.parts[0][0]]} CRASHES (kill -9)"
        if tr.kind == "watchdog":
            return f"watchdog: {tr.info}; abort flag set"
        if tr.kind == "abort":
            live = [self.names[p] for p, pr in enumerate(s.procs) if pr.status == LIVE]
            return f"abort flag releases {', '.join(live)}"
        if tr.kind == "violation":
            return f"VIOLATION {tr.info.prop}: {tr.info.detail}"
        bits = []
        for p, t, row in tr.parts:
            bits.append(f"{self._who(p, t)} {row.src} --{row.label}: {op_text(row.op)}"
                        f"--> {row.dst}")
        line = " || ".join(bits)
        if tr.kind == "coll":
            line = f"[{tr.parts[0][2].op.group} seq {s.seq[GROUPS.index(tr.parts[0][2].op.group)]}] " + line
        if tr.msg is not None:
            line += f"  {_msg(tr.msg)}"
        return line


# A NamedTuple's generated __new__ is a Python-level call; the hot paths build
# states and transitions with tuple.__new__ (the same object, a third of the cost).
_new = tuple.__new__


def _set(tup, i, val):
    return tup[:i] + (val,) + tup[i + 1:]


def _msg(m) -> str:
    from .guards import Msg
    from .contract import Action
    if isinstance(m, Msg):
        return (f"{Action(m.action).name} call_id={m.call_id} chunk={m.chunk} "
                f"epoch={m.epoch} calls={m.calls}" + ("" if m.valid else " INVALID"))
    return repr(m)
