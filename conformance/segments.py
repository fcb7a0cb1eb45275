"""Read a rank's trace segments (format 2, model/tracefmt.py) into step events.

A rank's files are `rank{R}.{N:06d}.jsonl` (closed segments, N from 0) and
`rank{R}.jsonl` (the newest). Each begins with a checkpoint. What is checked here, each
failure a TraceError naming the file, the line and the field:

  * the retained segments are consecutive (no segment missing in the middle of a
    retained tail) and each file's number is its checkpoint's `segment`;
  * a whole load that begins after segment 0 begins where the flight recorder deleted
    the older ones, not where a copy lost them (`check_head_kept`);
  * segment 0's checkpoint is the model's initial state of the rank (control states,
    local variables, zero counters);
  * a later segment's checkpoint continues the previous segment: its control states,
    step numbers, chan_i and gseq counters are what the previous segment's lines imply;
  * a step's row exists: (thread, src, label) is a row of the rank's table, src being
    the control state the thread's previous line (or the checkpoint) left it in.

A later checkpoint's local variables (`v`) are checked against what the rank's earlier
lines lead to (conformance/suffix.py `check_checkpoints`); a suffix replay starts from
the oldest retained ones (conformance/suffix.py).
"""
from __future__ import annotations

import re
from pathlib import Path

from lockstep.model import tracefmt as F
from lockstep.model.events import op_class
from lockstep.model.ops import Coll, Recv, Send
from lockstep.model.tables import THREADS

CHECKPOINT = F.CHECKPOINT
_COUNTERS = ("pcs", "i", "send", "recv", "gseq")


def ordered(paths) -> list:
    """Closed segments by number, then the newest (`rank{R}.jsonl`)."""
    def key(p):
        parts = p.name.split(".")
        return (1, 0) if len(parts) == 2 else (0, int(parts[1]))
    return sorted(paths, key=key)


# runtime/trace.py's rank{R}.segments lines: "segment N NAME opened ..." when N closed,
# "segment N NAME deleted (keep K)" when the flight recorder removed it.
_LOG_LINE = re.compile(r"^segment (\d+) rank\d+\.\d{6}\.jsonl (opened|deleted)\b")


def check_head_kept(rt, run_dir, keep) -> None:
    """A whole load whose oldest retained segment N of a rank is not 0 (a suffix) holds
    what a flight recorder kept only when it deleted segments 0..N-1. Lost instead (a
    copy made half-way, a file removed by hand), a suffix replay would answer "conforms"
    for a run it never saw whole: rejected when run.json says every segment was kept
    (`keep` 0, opts.trace_keep) or rank{R}.segments records one of them closed and
    never deleted. (A segment missing between two retained ones: SegmentReader.)"""
    first = rt.first_segment
    if rt.missing or first == 0:
        return
    if keep == 0:
        raise _err(rt.files[0], 1, "segment", f"{first}: the oldest segment here, but "
                   f"run.json's trace_keep is 0 (every segment kept): {_span(0, first - 1)} "
                   "missing")
    log = Path(run_dir) / f"rank{rt.rank}.segments"
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return
    closed, deleted = {}, set()
    for ln, line in enumerate(lines, 1):
        mt = _LOG_LINE.match(line)
        if mt and int(mt.group(1)) < first:
            if mt.group(2) == "opened":
                closed.setdefault(int(mt.group(1)), ln)
            else:
                deleted.add(int(mt.group(1)))
    lost = sorted(set(closed) - deleted)
    if lost:
        raise _err(log, closed[lost[0]], "segment", f"{lost[0]}: closed here and never "
                   f"deleted, but the trace begins at segment {first}: "
                   f"{_span(lost[0], first - 1)} missing (a copy made half-way?)")


def _span(a: int, b: int) -> str:
    return f"segment {a} is" if a == b else f"segments {a} to {b} are"


def _err(path, ln, field, detail):
    from .load import TraceError
    return TraceError(path, ln, field, detail)


class SegmentReader:
    """One rank's format-2 lines, segment after segment."""

    def __init__(self, rt, model):
        self.rt, self.m = rt, model
        self.threads = THREADS[rt.role]
        self.rows = {}
        for t, by_src in enumerate(model.tables[rt.rank]):
            for src, rows in by_src.items():
                for row in rows:
                    self.rows.setdefault((t, src, row.label), []).append(row)
        self.c = None
        self.t0 = self.prev_us = 0
        self.prev_path = None

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self, d: dict, path, pos: int) -> None:
        rt, m = self.rt, self.m
        for f in ("format", "segment", "t0_ns", "rank", "role", "v") + _COUNTERS:
            if f not in d:
                raise _err(path, 1, f, "missing from the checkpoint")
        if type(d["format"]) is not int or d["format"] != F.FORMAT:
            raise _err(path, 1, "format", f"{d['format']!r}: this reader knows format "
                       f"{F.FORMAT}")
        if type(d["rank"]) is not int or d["rank"] != rt.rank or d["role"] != rt.role:
            raise _err(path, 1, "rank", f"rank {d['rank']!r} ({d['role']!r}) in the trace "
                       f"of rank {rt.rank} ({rt.role})")
        seg = d["segment"]
        parts = path.name.split(".")
        if type(seg) is not int or seg < 0 or (len(parts) == 3 and int(parts[1]) != seg):
            raise _err(path, 1, "segment", f"{seg!r}: the file is segment "
                       f"{parts[1] if len(parts) == 3 else 'newest'}")
        if type(d["t0_ns"]) is not int:
            raise _err(path, 1, "t0_ns", "not an integer")
        try:
            v = F.vars_from_json(rt.role, d["v"])
        except ValueError as e:
            raise _err(path, 1, str(e).split(":")[0], str(e).split(": ", 1)[-1]) from None
        pcs, i, gseq = d["pcs"], d["i"], d["gseq"]
        n = len(self.threads)
        if type(pcs) is not list or len(pcs) != n or not all(type(x) is str for x in pcs):
            raise _err(path, 1, "pcs", f"{pcs!r}: one control state per thread "
                       f"{list(self.threads)}")
        if type(i) is not list or len(i) != n or not all(type(x) is int and x >= 0
                                                         for x in i):
            raise _err(path, 1, "i", f"{i!r}: one step number (int >= 0) per thread")
        if type(gseq) is not dict or set(gseq) != set(F.GROUP_NAMES) or \
                not all(type(x) is int and x >= 0 for x in gseq.values()):
            raise _err(path, 1, "gseq", f"{gseq!r}: the next sequence number of "
                       f"{' and '.join(F.GROUP_NAMES)}")
        for f in ("send", "recv"):
            if type(d[f]) is not int or d[f] < 0:
                raise _err(path, 1, f, f"{d[f]!r} is not a count (int >= 0)")
        new = F.Counters(pcs, i, d["send"], d["recv"], gseq)
        if self.c is None and seg == 0:
            start = m.initial_state().procs[rt.rank]
            want = F.Counters(start.pcs)
            self._same(path, want, new, "the model's initial state")
            if v != start.v:
                f = next(f for f in type(v)._fields if getattr(v, f) != getattr(start.v, f))
                raise _err(path, 1, f"v.{f}", f"{getattr(v, f)!r}: the model's initial "
                           f"state has {getattr(start.v, f)!r}")
        elif self.c is not None:
            prev = rt.checkpoints[-1][2]["segment"]
            if seg != prev + 1:
                raise _err(path, 1, "segment", f"{seg}: segment {prev + 1} is missing "
                           f"(the previous retained file, {self.prev_path.name}, is "
                           f"segment {prev})")
            self._same(path, self.c, new, f"the end of {self.prev_path.name}")
        else:   # the oldest retained segment of a suffix: its counters start the count
            rt.next_i[:] = list(i)
        rt.checkpoints.append((pos, path.name, dict(d, v=v)))
        self.c, self.t0, self.prev_us, self.prev_path = new, d["t0_ns"], 0, path

    @staticmethod
    def _same(path, want, got, what: str) -> None:
        w, g = want.as_json(), got.as_json()
        for f in _COUNTERS:
            if w[f] != g[f]:
                raise _err(path, 1, f, f"the checkpoint says {g[f]!r}, but {what} "
                           f"implies {w[f]!r}")

    # ------------------------------------------------------------------ steps
    def step(self, d: dict, path, ln: int):
        from .load import Ev, _SIGS
        c, rt = self.c, self.rt
        key = "l" if "l" in d else "c" if "c" in d else None
        if key is None:
            raise _err(path, ln, "l", "missing: a step names its row's label (\"l\", or "
                       "\"c\" on the comms thread)")
        thread = F.KEY_THREADS[key]
        if thread not in self.threads:
            raise _err(path, ln, key, f"the {rt.role} has no {thread} thread")
        t = self.threads.index(thread)
        label = d[key]
        src = d.get("s", c.pcs[t])
        try:
            rows = self.rows.get((t, src, label))
        except TypeError:       # a label or state that is not a string (a list, an object)
            rows = None
        if rows is None:
            raise _err(path, ln, key, f"{label!r:.60}: the {rt.role}'s {thread} thread has no "
                       f"such row from state {src!r:.60}" + ("" if "s" in d else
                                                         " (where its previous line left it)"))
        row = rows[0]
        if len(rows) > 1:
            row = next((r for r in rows if r.dst == d.get("to")), None)
            if row is None:
                raise _err(path, ln, "to", f"{d.get('to')!r}: {label} from {src!r} goes to "
                           f"one of {sorted(r.dst for r in rows)} (the line must say which)")
        dt, dur = d.get("t"), d.get("d", 0)
        if type(dt) is not int or type(dur) is not int or dur < 0:
            raise _err(path, ln, "t" if type(dt) is not int else "d",
                       "not an integer (microseconds)")
        self.prev_us += dt
        op = op_class(row.op)
        peer = ci = group = gseq = None
        if type(row.op) in (Send, Recv):
            peer = row.op.peer
            ci = d.get("ci", c.chan[op])
            if type(ci) is not int or ci < 0:
                raise _err(path, ln, "ci", f"{ci!r:.40}: the index on the channel is an "
                           "int >= 0")
            c.chan[op] = ci + 1
        elif type(row.op) is Coll:
            group = row.op.group
            gseq = d.get("g", c.gseq[group])
            if type(gseq) is not int or gseq < 0:
                raise _err(path, ln, "g", f"{gseq!r:.40}: the group's sequence number is "
                           "an int >= 0")
            c.gseq[group] = gseq + 1
        c.pcs[t] = row.dst
        i = d.get("i", rt.next_i[t])
        if type(i) is not int or i < 0:
            raise _err(path, ln, "i", f"{i!r:.40}: the thread's step number is an int >= 0")
        c.i[t] = i + 1
        sig = (src, label, row.dst, op, peer, group)
        shared = _SIGS.get(sig)
        if shared is None:
            shared = _SIGS[sig] = sig
        ev = object.__new__(Ev)
        ev.src, ev.label, ev.dst, ev.op, ev.peer, ev.group = shared
        ev.rank, ev.t, ev.thread, ev.i, ev.chan_i, ev.gseq = rt.rank, t, thread, i, ci, gseq
        ev.t_ns = self.t0 + self.prev_us * 1000
        ev.dur_ns = dur * 1000
        meas = d.get("meas")
        if meas is not None and type(meas) is not dict:
            raise _err(path, ln, "meas", "not an object")
        ev.meas = F.restore_meas(meas, self.t0) if meas else None
        ev.line = ln
        ev.msg, ev.has_msg = None, False
        try:
            if "m" in d:
                ev.msg, ev.has_msg = tuple(F.msg_of_list(d["m"])), True
            elif "v" in d:      # a gathered vector: a list (model/tracefmt.py)
                ev.msg, ev.has_msg = F.vector_of_json(d["v"]), True
        except ValueError as e:
            raise _err(path, ln, "m" if "m" in d else "v", str(e)) from None
        if (op == "send" or op == "recv") and "m" not in d:
            raise _err(path, ln, "m", f"missing: a {op} records its message"
                       + (" (\"m\"), not a gathered vector (\"v\")" if ev.has_msg else ""))
        ev.done = False
        ev.partner = ev.inst = ev.dup = ev.prev = ev.lane = None
        ev.deps = ()
        return ev
