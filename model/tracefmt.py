"""The compact trace line format (format 2) and the segment checkpoint.

A rank's trace is one or more segments (runtime/trace.py rolls them by size or time).
Every segment's first line is a checkpoint, the rank's own model state before the
segment's first event, taken from the state the interpreter drives:

  {"ev":"checkpoint","format":2,"rank":R,"role":...,"segment":N,"t0_ns":T,
   "pcs":[control state per thread],"i":[next step number per thread],
   "send":n,"recv":n,            next chan_i on its channel to / from the peer
   "gseq":{"world_pg":g,"mesh_pg":h},   next collective sequence number per group
   "v":{the role's local variables (model/guards.py Rank0Vars / MeshVars), field by field}}

A step line then says only what the row and the counters do not imply:

  "l": label (main thread) or "c": label (comms thread)   the row is (thread, src, label)
  "t": microseconds since the rank's previous line in this segment (the first: since t0)
  "d": the step's duration in microseconds
  "m": a message [action, call_id, chunk, epoch, calls, init_cache 0/1(, 0 = invalid)]
  "v": a gathered vector (an all_gather, the parity handshake), messages as above
  "meas": measurements; a field named *_ns is written *_us, microseconds since t0
  "to": dst, only where two rows share (thread, src, label) (the guard picked one)
  "s", "i", "ci", "g": src, step number, chan_i, gseq: written only when they differ
                  from what the thread's previous line and the counters imply (never,
                  in a conforming run; they record what the runtime did if it deviates)

Implied, never written: dst, op, peer, group (the row's), rank and role (the file's),
"ev" (a line without "ev" is a step), and a local step's queue subject (the replayer
recomputes it from the model state: the runtime's is `local_subject` of the same
update). Other events (start, release, fault) keep their long form with t_ns.
"""
from __future__ import annotations

import json
from typing import Optional

from .guards import MeshVars, Msg, Rank0Vars

FORMAT = 2
CHECKPOINT = "checkpoint"
THREAD_KEYS = {"main": "l", "comms": "c"}
KEY_THREADS = {k: t for t, k in THREAD_KEYS.items()}
GROUP_NAMES = ("world_pg", "mesh_pg")
VARS = {"rank0": Rank0Vars, "leader": MeshVars, "worker": MeshVars}


def msg_list(m: Msg) -> list:
    out = [int(m.action), m.call_id, m.chunk, m.epoch, m.calls, int(bool(m.init_cache))]
    if not m.valid:
        out.append(0)
    return out


def msg_of_list(x) -> Msg:
    """Inverse of msg_list; raises ValueError on anything else."""
    if type(x) is not list or len(x) not in (6, 7) or \
            not all(type(a) is int for a in x) or x[5] not in (0, 1) or \
            (len(x) == 7 and x[6] != 0):
        raise ValueError(f"{x!r:.60} is not a message [action, call_id, chunk, epoch, calls, "
                         f"init_cache(, 0)]")
    return Msg(x[0], x[1], x[2], x[3], x[4], bool(x[5]), len(x) == 6)


def _json_msg_list(d: dict) -> list:
    """model/events.py msg_to_json's dict to the format-2 list."""
    out = [d["action"], d["call_id"], d["chunk"], d["epoch"], d["calls"],
           int(bool(d.get("init_cache", False)))]
    if not d.get("valid", True):
        out.append(0)
    return out


def _vec_item(x):
    if isinstance(x, Msg):
        return msg_list(x)
    return _json_msg_list(x) if type(x) is dict else x


# ------------------------------------------------------------------ local variables

def vars_to_json(v) -> dict:
    out = {}
    for f in type(v)._fields:
        x = getattr(v, f)
        if isinstance(x, Msg):
            x = msg_list(x)
        elif isinstance(x, frozenset):
            x = sorted(x)
        elif isinstance(x, tuple):
            x = [msg_list(m) for m in x]
        out[f] = x
    return out


def vars_from_json(role: str, d) -> object:
    """The role's variables from a checkpoint's "v"; ValueError names the field."""
    cls = VARS[role]
    if type(d) is not dict:
        raise ValueError("v: not an object")
    extra = sorted(set(d) - set(cls._fields))
    if extra:
        raise ValueError(f"v.{extra[0]}: not a variable of the {role}")
    vals = []
    for f in cls._fields:
        if f not in d:
            raise ValueError(f"v.{f}: missing")
        x, default = d[f], cls._field_defaults.get(f)
        try:
            if isinstance(default, frozenset):
                if type(x) is not list or not all(type(a) is str for a in x):
                    raise ValueError("not a list of names")
                x = frozenset(x)
            elif isinstance(default, tuple):
                if type(x) is not list:
                    raise ValueError("not a list of messages")
                x = tuple(msg_of_list(m) for m in x)
            elif default is None:
                x = None if x is None else msg_of_list(x)
            elif type(default) is not type(x):
                raise ValueError(f"{x!r} is not a {type(default).__name__}")
        except ValueError as e:
            raise ValueError(f"v.{f}: {e}") from None
        vals.append(x)
    return cls(*vals)


# ------------------------------------------------------------------ the writer's side

class Counters:
    """What a rank's written lines imply next: per thread the step number and control
    state, the chan_i per direction, the gseq per group. The writer keeps one (it is
    the checkpoint's counters) and so does the loader (it fills the omitted fields)."""

    def __init__(self, pcs, i=None, send=0, recv=0, gseq=None):
        self.pcs = list(pcs)
        self.i = list(i) if i is not None else [0] * len(self.pcs)
        self.chan = {"send": send, "recv": recv}
        self.gseq = dict(gseq) if gseq is not None else {g: 0 for g in GROUP_NAMES}

    def as_json(self) -> dict:
        return {"pcs": list(self.pcs), "i": list(self.i), "send": self.chan["send"],
                "recv": self.chan["recv"], "gseq": dict(self.gseq)}


def checkpoint_event(rank: int, role: str, segment: int, t0_ns: int, counters: Counters,
                     v) -> dict:
    return {"ev": CHECKPOINT, "format": FORMAT, "rank": rank, "role": role,
            "segment": segment, "t0_ns": t0_ns, **counters.as_json(),
            "v": vars_to_json(v)}


def shared_labels(table, threads) -> frozenset:
    """(thread, src, label) of the rows that share them with another row (their line
    names its dst). `table`: a Model's compiled table of one rank."""
    out = set()
    for t, by_src in enumerate(table):
        for src, rows in by_src.items():
            labels = [r.label for r in rows]
            out.update((threads[t], src, x) for x in labels if labels.count(x) > 1)
    return frozenset(out)


class StepEncoder:
    """Long step events (model/events.py step_event) to format-2 lines, for one segment
    of one rank. `threads`: the role's thread names, in order; `shared`: shared_labels."""

    def __init__(self, threads, counters: Counters, t0_ns: int, shared=frozenset()):
        self.tindex = {name: k for k, name in enumerate(threads)}
        self.c, self.t0, self.shared = counters, t0_ns, shared
        self.prev_us = 0

    def encode(self, ev: dict) -> dict:
        c, t = self.c, self.tindex[ev["thread"]]
        out = {THREAD_KEYS[ev["thread"]]: ev["label"]}
        if ev["src"] != c.pcs[t]:
            out["s"] = ev["src"]
        if (ev["thread"], ev["src"], ev["label"]) in self.shared:
            out["to"] = ev["dst"]
        if ev["i"] != c.i[t]:
            out["i"] = ev["i"]
        c.pcs[t], c.i[t] = ev["dst"], ev["i"] + 1
        op = ev["op"]
        if op == "send" or op == "recv":
            if ev["chan_i"] != c.chan[op]:
                out["ci"] = ev["chan_i"]
            c.chan[op] = ev["chan_i"] + 1
        elif op == "coll":
            g = ev["group"]
            if ev["gseq"] != c.gseq[g]:
                out["g"] = ev["gseq"]
            c.gseq[g] = ev["gseq"] + 1
        t_us = (ev["t_ns"] - self.t0) // 1000
        out["t"] = t_us - self.prev_us
        self.prev_us = t_us
        out["d"] = ev["dur_ns"] // 1000
        m = ev.get("msg")
        if m is not None and op != "local":
            if isinstance(m, Msg):
                out["m"] = msg_list(m)
            elif type(m) is dict:
                out["m"] = _json_msg_list(m)
            elif isinstance(m, (tuple, list)):
                out["v"] = [_vec_item(x) for x in m]
            else:
                out["v"] = m
        meas = ev.get("meas")
        if meas:
            out["meas"] = {(k[:-3] + "_us" if k.endswith("_ns") and type(x) is int else k):
                           ((x - self.t0) // 1000 if k.endswith("_ns") and type(x) is int
                            else x) for k, x in meas.items()}
        return out


def restore_meas(meas: dict, t0_ns: int) -> dict:
    """A format-2 meas back to the long form (*_us since t0 -> *_ns, monotonic)."""
    return {(k[:-3] + "_ns" if k.endswith("_us") and type(x) is int else k):
            (t0_ns + x * 1000 if k.endswith("_us") and type(x) is int else x)
            for k, x in meas.items()}


def vector_of_json(x) -> Optional[tuple]:
    """A format-2 "v": a list of what the members gave (a count, a flag, or a message:
    a list); ValueError on anything else, which no row's update could take."""
    if type(x) is not list:
        raise ValueError(f"{x!r:.60} is not a list")
    for k, a in enumerate(x):
        if type(a) not in _VECTOR_ITEMS:
            raise ValueError(f"item {k}, {a!r:.40}, is not a count, a flag or a message")
    return tuple(msg_of_list(a) if type(a) is list else a for a in x)


_VECTOR_ITEMS = (int, bool, list)


def long_view(line: dict) -> dict:
    """What a format-2 step line says on its own, in long-form keys (op, group, msg as
    a dict), for readers of a trace's tail that have no checkpoint (the launcher's
    where-was-it line). The op and group are those of the shipped rows with this thread
    and label (every role's: a label names one kind of op)."""
    from .events import msg_to_json, op_class
    from .tables import shipped_tables
    key = "l" if "l" in line else "c"
    label, thread = line.get(key), KEY_THREADS.get(key)
    out = {"label": label, "thread": thread}
    for rows in shipped_tables().rows.values():
        row = next((r for r in rows if r.label == label and r.thread == thread), None)
        if row is not None:
            out["op"] = op_class(row.op)
            out["group"] = getattr(row.op, "group", None)
            break
    m = line.get("m")
    if m is not None:
        try:
            out["msg"] = msg_to_json(msg_of_list(m))
        except ValueError:
            pass
    return out


# ------------------------------------------------------------------ any JSON a run holds

def loads(text):
    """json.loads for every reader of a run's files (traces, run.json, outputs.json,
    launch.json, a reference stream, a cut request, a release flag): a document nested
    deeper than the parser's recursion can follow is a json.JSONDecodeError (the
    ValueError every such reader already turns into an error naming the file, and the
    line where it has one) instead of the RecursionError json raises, which escaped
    them all as a traceback. The error points at the deepest place of the document."""
    try:
        return json.loads(text)
    except RecursionError:
        depth, pos = _deepest(text)
        raise json.JSONDecodeError(f"nested {depth:,} levels deep, deeper than the JSON "
                                   f"parser can follow (the deepest point)",
                                   text, pos) from None


def _deepest(text) -> tuple:
    """(the deepest nesting of arrays and objects in the JSON text, the offset where it
    is first reached), strings skipped."""
    depth = best = at = 0
    in_str = esc = False
    for k, ch in enumerate(text):
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch == "[" or ch == "{":
            depth += 1
            if depth > best:
                best, at = depth, k
        elif ch == "]" or ch == "}":
            depth -= 1
    return best, at
