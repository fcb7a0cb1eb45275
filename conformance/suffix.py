"""Where a suffix replay starts: one consistent global state from the ranks' checkpoints.

A flight recorder keeps only each rank's newest segments, so a run directory may hold,
for every rank, a tail that begins at its oldest retained segment's checkpoint (the
rank's own state before that segment's first line, conformance/segments.py). Ranks roll
over at different moments, so their checkpoints are not one moment of the run: a
message the leader receives in its window may have been sent before rank0's window
(rank0's lines for it are deleted), and a collective may have been entered by one
member inside its window and by another before its own. The replay needs one global
state where no transition is half taken. What a suffix replay assumes, and checks:

Rule 1 (the cut). The replay starts at the *earliest consistent cut at or after every
checkpoint*: for each rank, the shortest prefix of its window to skip so that no
remaining line's partner lies before its partner's window. A partner lies before the
window when the partner's counters say so: a receive with chan_i below the sender's
send counter, a send with chan_i below the receiver's receive counter, a collective
with gseq below any member's counter for its group (every member enters a collective,
model/semantics.py). Skipping a line can make its own partners orphans, so the prefixes
grow to a fixpoint.

Rule 2 (skipped lines). A skipped line is applied to its own rank's state by its row
(`Model._apply`: the row's update and destination, the same function `Model.step`
uses for each part), with the row's guard required true in the checkpoint state, the
recorded message as the message (a header receiver recorded only the header's ids:
the payload that follows completes it, as on the wire), and a skipped send's recorded
message required to be the one its row makes. What it cannot know: whether the
partner's half (deleted, or before the partner's checkpoint) matched: those lines are
checked only by a replay of an older suffix or of the whole run.

Rule 3 (the counters agree). At the cut, every channel's send counter equals its
receive counter (rendezvous p2p: nothing is in flight between two transitions) and
every member of a group has the same gseq. Anything else is a corrupted or
inconsistent checkpoint, rejected naming the checkpoint file and line 1. A frame in
flight to a killed rank across the cut (EAGER_SEND_RULE) is not representable at a cut
and is rejected the same way: such a run is checked from an older suffix or whole.
The oldest retained checkpoint's counters have no earlier segment to be checked
against (later ones do: conformance/segments.py): they number the rank's lines, so a
counter that is off shifts its coordinates against its partners', and the replay
rejects the first transition whose parts then disagree (naming that line), or Rule 3
does when no shift can reconcile them.

The suffix replay then drives `Model.step` from that state exactly as a whole-run
replay does; what happened before the cut (outputs emitted, results accepted) is not in
its accounting, so the checks that count over the whole run (exactly-once, sources
agree) count over the window only (conformance/report.py).
"""
from __future__ import annotations

from typing import NamedTuple

from lockstep.model.messages import Msg
from lockstep.model.semantics import LIVE, Proc, State
from lockstep.model.tracefmt import GROUP_NAMES

from .load import Run, TraceError, fmt_msg


class Start(NamedTuple):
    """The replay's first state and the channel counters of the consistent cut."""
    state: State
    sent: dict          # (src rank, dst rank) -> next chan_i
    skipped: tuple      # per rank: lines skipped before the cut (Rule 2)
    segments: tuple     # per rank: the first retained segment's number


def is_suffix(run: Run) -> bool:
    return any(rt.first_segment > 0 for rt in run.ranks)


def _as_msg(x):
    if type(x) is tuple and len(x) == 7 and not isinstance(x[0], (tuple, bool)):
        return Msg(*x)
    if type(x) is tuple:
        return tuple(_as_msg(a) for a in x)
    return x


def _row(model, ev):
    """The row a loaded line is (conformance/segments.py found it: it exists)."""
    return next(r for r in model.tables[ev.rank][ev.t][ev.src]
                if r.label == ev.label and r.dst == ev.dst)


def apply_line(model, proc: Proc, ev, row) -> Proc:
    """Rule 2: the line applied to its own rank's state by its row, with the recorded
    message (the message the runtime's update was given). A recorded value no update
    could have been given (a vector of the wrong length, a count that is not one) is the
    trace's fault, named at its line: the loader checks types, not what a row takes."""
    try:
        return model._apply(proc, ev.t, row, _as_msg(ev.msg) if ev.has_msg else None)[0]  # noqa: SLF001
    except (TypeError, ValueError, IndexError, KeyError, AttributeError) as e:
        raise TraceError(ev.file, ev.line, "msg", f"{fmt_msg(ev.msg)[:80]}: row "
                         f"{row.label}'s update cannot take the recorded message "
                         f"({type(e).__name__}: {str(e)[:80]})") from None


def check_checkpoints(run: Run, model) -> None:
    """Each later checkpoint of a rank is the state its earlier lines lead to: from the
    oldest retained checkpoint, every line applied by Rule 2 (that is what the runtime
    did: its update got the same message). A field changed in a checkpoint is rejected
    at its file, line 1. (Counters and control states: conformance/segments.py.)"""
    for rt in run.ranks:
        if len(rt.checkpoints) < 2:
            continue
        d0 = rt.checkpoints[0][2]
        proc, k = Proc(LIVE, tuple(d0["pcs"]), d0["v"]), 0
        for pos, name, d in rt.checkpoints[1:]:
            while k < pos:
                ev = rt.steps[k]
                proc = apply_line(model, proc, ev, _row(model, ev))
                k += 1
            if proc.v != d["v"]:
                v = d["v"]
                f = next(f for f in type(v)._fields if getattr(v, f) != getattr(proc.v, f))
                raise TraceError(run.path / name, 1, f"v.{f}", f"{getattr(v, f)!r}, but the "
                                 f"lines before it lead to {getattr(proc.v, f)!r}")


class _Frontier:
    """One rank at the cut: its model process state and its counters."""

    def __init__(self, rt, ck):
        self.rt, self.file = rt, ck[1]
        d = ck[2]
        self.proc = Proc(LIVE, tuple(d["pcs"]), d["v"])
        self.send, self.recv = d["send"], d["recv"]
        self.gseq = dict(d["gseq"])
        self.k = 0                   # lines skipped

    def skip_to(self, n: int, model) -> None:
        steps = self.rt.steps
        while self.k < n:
            ev = steps[self.k]
            pr, row, cfg = self.proc, _row(model, ev), model.cfg
            if row.guard is not None and not row.guard(pr.v, cfg):
                raise TraceError(ev.file, ev.line, "l", f"{ev.label}: its guard is false in "
                                 f"the state the checkpoint ({self.file}) leads to")
            msg = _as_msg(ev.msg) if ev.has_msg else None
            if ev.op == "send":
                made = row.make(pr.v, cfg)
                if made != msg:
                    raise TraceError(ev.file, ev.line, "m", f"recorded {msg}, but from the "
                                     f"checkpoint's state the row makes {made}")
                self.send += 1
            elif ev.op == "recv":
                self.recv += 1
            elif ev.op == "coll":
                self.gseq[ev.group] += 1
            self.proc = apply_line(model, pr, ev, row)
            self.k += 1


def suffix_start(run: Run, model) -> Start:
    """Rules 1-3 (module docstring); raises TraceError on an inconsistent checkpoint."""
    ranks = run.ranks
    for rt in ranks:
        if not rt.checkpoints:
            raise TraceError(rt.path, 0, "checkpoint", "a suffix replay needs every "
                             "rank's trace in segments (format 2), with checkpoints")
    fr = [_Frontier(rt, rt.checkpoints[0]) for rt in ranks]
    p2p_peer = {0: 1, 1: 0}

    def orphan(ev) -> bool:
        q = p2p_peer.get(ev.rank)
        if ev.op == "send":
            return ev.chan_i < fr[q].recv
        if ev.op == "recv":
            return ev.chan_i < fr[q].send
        if ev.op == "coll":
            return any(ev.gseq < fr[m].gseq[ev.group] for m in model.members[ev.group]
                       if m != ev.rank)
        return False

    changed = True
    while changed:
        changed = False
        for f in fr:
            steps = f.rt.steps
            last = max((j for j in range(f.k, len(steps)) if orphan(steps[j])),
                       default=-1)
            if last >= f.k:
                f.skip_to(last + 1, model)
                changed = True
    for a, b in ((0, 1), (1, 0)):
        if fr[a].send != fr[b].recv:
            raise TraceError(run.path / fr[a].file if fr[a].send > fr[b].recv else
                             run.path / fr[b].file, 1, "send" if fr[a].send > fr[b].recv
                             else "recv",
                             f"at the cut {model.names[a]} has sent {fr[a].send} messages to "
                             f"{model.names[b]}, which has received {fr[b].recv} "
                             f"(checkpoints {fr[a].file} and {fr[b].file}, "
                             f"{fr[a].k} and {fr[b].k} lines skipped)")
    seq = []
    for g in GROUP_NAMES:
        mem = model.members[g]
        vals = {m: fr[m].gseq[g] for m in mem}
        if len(set(vals.values())) > 1:
            hi = max(mem, key=lambda m: (vals[m], m))
            raise TraceError(run.path / fr[hi].file, 1, "gseq",
                             f"{g}: at the cut the members are at "
                             + ", ".join(f"{model.names[m]} {vals[m]}" for m in mem)
                             + " (every member enters every collective)")
        seq.append(vals[mem[0]])
    state = State(tuple(f.proc for f in fr), ((), ()), tuple(seq), "", model.cfg.faults)
    for f in fr:
        del f.rt.steps[:f.k]
        for pos, ev in enumerate(f.rt.steps):
            ev.pos = pos
    return Start(state, {(0, 1): fr[0].send, (1, 0): fr[1].send},
                 tuple(f.k for f in fr), tuple(rt.first_segment for rt in ranks))
