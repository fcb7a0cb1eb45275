"""Load a run directory: `run.json` (the model Config) and one `rank{R}.jsonl` per rank.

Malformed input is rejected with a `TraceError` naming the file, the line and the field
(garbage, a wrong type, a thread that its role does not have, an `i` that skips or
repeats). Two things are *not* errors, because a kill -9 produces them:

  * a last line cut short (no newline, not JSON): reported as a warning and dropped;
  * a rank whose trace ends without an `exit` step and without a `release` event: the
    rank crashed (or died of an uncaught exception, which the runtime does not trace);
    the replayer maps it to the model's crash transition.

Everything semantic (does the model allow this step, does a send have its receive) is
the replayer's job; the loader only guarantees well-formed, per-thread contiguous
events. Events are kept in file order per rank: the runtime writes a rank's events
under the process lock in the order it applied their updates, so file order is the
order of the rank's local-state changes, and the replayer is bound by it
(conformance/replay.py says how, and its one exception for a pair-state thread).

Speed: one `json.loads` per line and a flat type check; the slow diagnosis that names
the bad field runs only on a line that failed the fast check.
"""
from __future__ import annotations

import gc
import json
import re
from operator import itemgetter
from pathlib import Path
from typing import Optional

from lockstep.model.config import Config, config_from_dict
from lockstep.model.events import FAULT, OPS, RELEASE, START, STEP
from lockstep.model.tables import THREADS, shipped_tables

try:                      # a fast parser when installed (pyproject: orjson); same JSON
    from orjson import loads as _fast_loads
except ImportError:       # pragma: no cover
    _fast_loads = None
_SCAN = json.decoder.JSONDecoder().scan_once
_SIGS: dict = {}
_new_ev = object.__new__
THREAD_NAMES = {role: tuple(ts) for role, ts in THREADS.items()}
RANK_FILE = re.compile(r"^rank(\d+)\.jsonl$")
MSG_FIELDS = ("action", "call_id", "chunk", "epoch", "calls")
P2P_PEERS = ("rank0", "leader")
GROUP_NAMES = ("world_pg", "mesh_pg")


class TraceError(Exception):
    """A malformed run directory: file, line (1-based, 0 = whole file), field."""

    def __init__(self, file, line: int, field: str, detail: str):
        self.file, self.line, self.field, self.detail = str(file), line, field, detail
        where = f"{Path(self.file).name}" + (f" line {line}" if line else "")
        super().__init__(f"{where}: field '{field}': {detail}")


class Ev:
    """One step event. `rank`/`t` (thread index)/`i` identify it; `pos` is its position
    in the rank's file order; `line` its line number. The replayer adds links."""
    __slots__ = ("rank", "t", "thread", "i", "src", "label", "dst", "op", "peer", "chan_i",
                 "group", "gseq", "msg", "has_msg", "t_ns", "dur_ns", "meas", "line",
                 "pos", "done", "deps", "prev", "partner", "inst", "dup", "lane", "sends")

    def __init__(self):
        self.done = False
        self.partner = self.inst = self.dup = self.prev = None
        self.deps = ()
        self.lane = None

    def where(self) -> str:
        return f"rank{self.rank}.jsonl line {self.line}"

    def brief(self) -> str:
        """One line: thread, i, transition, comm coordinates, message."""
        s = f"{self.thread}#{self.i} {self.src} --{self.label}--> {self.dst}"
        if self.op in ("send", "recv"):
            s += f" [{self.op} {self.peer} chan_i={self.chan_i}]"
        elif self.op == "coll":
            s += f" [{self.group} seq {self.gseq}]"
        if self.has_msg:
            s += f" {fmt_msg(self.msg)}"
        return s


class RankTrace:
    def __init__(self, rank: int, path: Path, role: str):
        self.rank, self.path, self.role = rank, path, role
        self.steps: list = []
        self.start: Optional[dict] = None
        self.releases: list = []
        self.faults: list = []
        self.truncated = False      # last line cut short (dropped)
        self.missing = False        # no file at all
        self.has_exit = False
        self.err_line = ""          # the rank's one-line exit reason (rank{R}.err), if any

    @property
    def root_cause_is_self(self) -> bool:
        """Its last release event says it is the run's root cause (``via=own``, the cause's
        origin is this rank): it failed outside its table (an uncaught error, a per-op
        deadline, a refused op) and set the abort flag itself (model/release.py)."""
        d = self.releases[-1] if self.releases else {}
        c = d.get("cause")
        return d.get("via") == "own" and isinstance(c, dict) and c.get("rank") == self.rank

    @property
    def ended(self) -> str:
        """exit (an exit step), failed (a release event naming this rank as the root
        cause: replayed as the model's crash of it, the one transition for a process that
        stops without an exit row and without a clean mark, followed by the watchdog),
        released (a release event), error_exit (no exit step or
        release event, but the rank's .err file has its one-line error exit: it died of
        an uncaught exception the runtime did not trace, e.g. a backend error after a
        peer died, and set the abort flag on its way out) or crashed (none: kill -9)."""
        if self.has_exit:
            return "exit"
        if self.releases:
            if self.root_cause_is_self:
                return "failed"
            return "released"
        if self.err_line:
            return "error_exit"
        return "crashed"


class Run:
    def __init__(self, path: Path, cfg: Config, meta: dict, ranks: list, warnings: list):
        self.path, self.cfg, self.meta, self.ranks, self.warnings = path, cfg, meta, ranks, \
            warnings

    @property
    def n_events(self) -> int:
        return sum(len(r.steps) for r in self.ranks)

    @property
    def crashed(self) -> list:
        """Ranks the model ends CRASHED: killed (no exit, no release) or failed outside
        their table (a release event naming themselves as the root cause)."""
        return [r.rank for r in self.ranks if r.ended in ("crashed", "failed")]

    @property
    def killed(self) -> list:
        return [r.rank for r in self.ranks if r.ended == "crashed"]

    @property
    def failed(self) -> list:
        return [r.rank for r in self.ranks if r.ended == "failed"]

    @property
    def released(self) -> list:
        """Ranks a fast path released: a release event, or an untraced error exit."""
        return [r.rank for r in self.ranks if r.ended in ("released", "error_exit")]


def fmt_msg(m) -> str:
    if m is None:
        return "-"
    if isinstance(m, tuple) and len(m) == 7 and not isinstance(m[0], (tuple, bool)):
        from lockstep.model.contract import Action
        try:
            act = Action(m[0]).name
        except ValueError:
            act = str(m[0])
        s = f"{act} call_id={m[1]} chunk={m[2]} epoch={m[3]} calls={m[4]}"
        return s + (" init_cache" if m[5] else "") + ("" if m[6] else " INVALID")
    if isinstance(m, tuple):
        return "[" + ", ".join(fmt_msg(x) if isinstance(x, tuple) else repr(x)
                               for x in m) + "]"
    return repr(m)


# ------------------------------------------------------------------ run.json

def load_config(run_dir: Path) -> tuple:
    p = Path(run_dir) / "run.json"
    try:
        meta = json.loads(p.read_text())
    except FileNotFoundError:
        raise TraceError(p, 0, "run.json", "missing: the run directory needs the model "
                         "configuration (model.config.config_to_dict)") from None
    except ValueError as e:
        raise TraceError(p, 0, "run.json", f"not JSON: {e}") from None
    if not isinstance(meta, dict):
        raise TraceError(p, 0, "run.json", "not a JSON object")
    d = meta.get("config", meta)
    if not isinstance(d, dict):
        raise TraceError(p, 0, "config", "not a JSON object")
    try:
        cfg = config_from_dict(d)
    except (TypeError, ValueError) as e:
        raise TraceError(p, 0, "config", f"not a model Config: {e}") from None
    return cfg, meta


# ------------------------------------------------------------------ rank files

def load_run(run_dir, cfg: Optional[Config] = None) -> Run:
    """Load and check a run directory; raises TraceError on malformed input."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise TraceError(run_dir, 0, "run_dir", "not a directory")
    meta = {}
    if cfg is None:
        cfg, meta = load_config(run_dir)
    from lockstep.model.semantics import Model
    model = Model(cfg, shipped_tables())
    world = model.n
    files = {}
    for p in run_dir.iterdir():
        mt = RANK_FILE.match(p.name)
        if mt:
            files[int(mt.group(1))] = p
    extra = sorted(r for r in files if r >= world)
    if extra:
        raise TraceError(files[extra[0]], 0, "rank", f"rank {extra[0]} is outside the "
                         f"configured world of {world} (1 + mesh {cfg.mesh})")
    warnings, ranks = [], []
    gc_was = gc.isenabled()
    gc.disable()      # many small acyclic objects: generational passes only cost time
    try:
        _load_all(run_dir, model, files, world, warnings, ranks)
    finally:
        if gc_was:
            gc.enable()
    return Run(run_dir, cfg, meta, ranks, warnings)


def _load_all(run_dir, model, files, world, warnings, ranks):
    for r in range(world):
        path = files.get(r, run_dir / f"rank{r}.jsonl")
        rt = RankTrace(r, path, model.roles[r])
        if r not in files:
            rt.missing = True
            warnings.append(f"rank{r}.jsonl: missing (the rank died before tracing "
                            f"started); treated as a crash")
        else:
            _load_rank(rt, path, warnings, world)
        if not rt.has_exit and not rt.releases:
            rt.err_line = _err_line(run_dir / f"rank{r}.err")
            if rt.err_line:
                warnings.append(f"rank{r}.jsonl ends with no exit step or release event, "
                                f"but rank{r}.err has its error exit: {rt.err_line[:160]}")
        ranks.append(rt)


def _err_line(path: Path) -> str:
    """The runtime's one-line error exit (runtime/worker_main.py exit_line), if any."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    for line in reversed(text.splitlines()):
        if line.startswith("lockstep: rank=") and (" exit=error " in line or
                                                   " exit=released " in line):
            return line.strip()
    return ""


def _load_rank(rt: RankTrace, path: Path, warnings: list, world: int) -> None:
    with open(path, "rb") as f:
        data = f.read()
    text = data.decode("utf-8", errors="replace")
    lines = text.split("\n")
    complete_end = text.endswith("\n") or text == ""
    if complete_end:
        lines.pop()        # the empty string after the final newline
    rank, role = rt.rank, rt.role
    threads = THREADS[role]
    tindex = {name: k for k, name in enumerate(threads)}
    next_i = [0] * len(threads)
    last = [None] * len(threads)
    steps = rt.steps
    scan = _SCAN
    nlines = len(lines)
    for ln, line in enumerate(lines, 1):
        try:
            # the C scanner behind json.loads, without its Python wrapper; anything
            # it does not consume whole goes through json.loads for the message
            d = None
            if _fast_loads is not None:
                try:
                    d = _fast_loads(line)
                except ValueError:
                    d = None
            if d is None:
                try:
                    d, end = scan(line, 0)
                except StopIteration:
                    end = -1
                if end != len(line):
                    d = json.loads(line)
        except ValueError as e:
            if ln == nlines and not complete_end:
                rt.truncated = True
                warnings.append(f"{path.name} line {ln}: last line cut short "
                                f"({len(line)} bytes, no newline): dropped (a crash "
                                f"while writing)")
                break
            raise TraceError(path, ln, "json", f"not a JSON object ({e.msg}): "
                             f"{line[:80]!r}") from None
        if type(d) is not dict:
            raise TraceError(path, ln, "json", f"not a JSON object: {line[:80]!r}")
        kind = d.get("ev")
        if kind == STEP:
            ev = _step(d, path, ln, rank, role, tindex)
            t = ev.t
            if ev.i != next_i[t]:
                what = "skips" if ev.i > next_i[t] else "repeats or goes back"
                raise TraceError(path, ln, "i", f"thread {ev.thread}: i={ev.i} {what} "
                                 f"(expected i={next_i[t]}: per-thread numbering from 0, "
                                 f"no gaps)")
            next_i[t] += 1
            ev.prev = last[t]
            last[t] = ev
            ev.pos = len(steps)
            steps.append(ev)
            if ev.op == "exit":
                rt.has_exit = True
        elif kind == RELEASE or kind == FAULT or kind == START:
            if d.get("rank", rank) != rank:
                raise TraceError(path, ln, "rank", f"rank {d.get('rank')!r} in "
                                 f"rank{rank}.jsonl")
            if "t_ns" in d and type(d["t_ns"]) is not int:
                raise TraceError(path, ln, "t_ns", "not an integer")
            d["_line"] = ln
            if kind == RELEASE:
                if not isinstance(d.get("reason"), str):
                    raise TraceError(path, ln, "reason", "a release event needs a "
                                     "string reason")
                rt.releases.append(d)
            elif kind == FAULT:
                if not isinstance(d.get("what"), str):
                    raise TraceError(path, ln, "what", "a fault event needs a string "
                                     "'what'")
                rt.faults.append(d)
            else:
                if rt.start is not None:
                    raise TraceError(path, ln, "ev", "a second start event")
                if "world" in d and d["world"] != world:
                    raise TraceError(path, ln, "world", f"{d['world']!r}: run.json "
                                     f"configures a world of {world}")
                rt.start = d
        else:
            raise TraceError(path, ln, "ev", f"unknown event kind {kind!r} (expected "
                             f"one of {STEP}, {START}, {RELEASE}, {FAULT})")


_GET = itemgetter("rank", "thread", "i", "src", "label", "dst", "op", "t_ns", "role")


def _step(d: dict, path, ln: int, rank: int, role: str, tindex: dict) -> Ev:
    try:
        r, thread, i, src, label, dst, op, t_ns, r_role = _GET(d)
    except KeyError as k:
        raise TraceError(path, ln, k.args[0], "missing") from None
    dur = d.get("dur_ns", 0)
    if not (type(r) is int and type(i) is int and type(src) is str and type(label) is str
            and type(dst) is str and type(t_ns) is int and type(dur) is int and i >= 0):
        _diagnose(d, path, ln)
    if r != rank:
        raise TraceError(path, ln, "rank", f"rank {r} in rank{rank}.jsonl")
    if r_role != role:
        raise TraceError(path, ln, "role", f"{r_role!r}, but rank {rank} is the {role} "
                         f"in this configuration")
    t = tindex.get(thread)
    if t is None:
        raise TraceError(path, ln, "thread", f"{thread!r}: the {role} has threads "
                         f"{sorted(tindex)}")
    meas = d.get("meas")
    if meas is not None and type(meas) is not dict:
        raise TraceError(path, ln, "meas", "not an object")
    if op == "send" or op == "recv":
        peer, ci = d.get("peer"), d.get("chan_i")
        if peer not in P2P_PEERS:
            raise TraceError(path, ln, "peer", f"{peer!r}: a {op} names its peer role "
                             f"({' or '.join(P2P_PEERS)})")
        if type(ci) is not int or ci < 0:
            raise TraceError(path, ln, "chan_i", f"{ci!r}: a {op} needs its index on "
                             f"the channel (int >= 0)")
        group = gseq = None
        if "msg" not in d:
            raise TraceError(path, ln, "msg", f"missing: a {op} records its message")
    elif op == "coll":
        group, gseq = d.get("group"), d.get("gseq")
        if group not in GROUP_NAMES:
            raise TraceError(path, ln, "group", f"{group!r}: not a process group "
                             f"({', '.join(GROUP_NAMES)})")
        if type(gseq) is not int or gseq < 0:
            raise TraceError(path, ln, "gseq", f"{gseq!r}: a collective needs the "
                             f"group's sequence number (int >= 0)")
        peer = ci = None
    elif op == "local" or op == "exit":
        peer = ci = group = gseq = None
    else:
        raise TraceError(path, ln, "op", f"{op!r}: one of {', '.join(OPS)}")
    # the strings are shared through one table (a million events hold a few hundred
    # distinct strings, not millions)
    sig = (src, label, dst, op, peer, group)
    shared = _SIGS.get(sig)
    if shared is None:
        shared = _SIGS[sig] = sig
    ev = _new_ev(Ev)
    ev.src, ev.label, ev.dst, ev.op, ev.peer, ev.group = shared
    ev.rank, ev.t, ev.thread, ev.i, ev.chan_i, ev.gseq = r, t, THREAD_NAMES[role][t], i, \
        ci, gseq
    ev.t_ns, ev.dur_ns, ev.meas, ev.line = t_ns, dur, meas, ln
    m = d.get("msg")
    if m is None:
        ev.msg = None
        ev.has_msg = False
    else:
        ev.msg = parse_msg(m, path, ln)
        ev.has_msg = True
    ev.done = False
    ev.partner = ev.inst = ev.dup = ev.prev = ev.lane = None
    ev.deps = ()
    return ev


def parse_msg(m, path, ln: int, field: str = "msg"):
    """dict -> 7-tuple comparable with model.messages.Msg; list -> tuple of items.
    `init_cache` defaults to False and `valid` (the receiver's contract verdict) to True,
    as model.events.msg_to_json writes them."""
    if type(m) is dict:
        n = len(m)
        if n == 6 or n == 5:
            try:
                a, c, k, e, n_calls = (m["action"], m["call_id"], m["chunk"], m["epoch"],
                                       m["calls"])
                ic = m["init_cache"] if n == 6 else False
            except KeyError:
                pass
            else:
                if type(a) is int and type(c) is int and type(k) is int and \
                        type(e) is int and type(n_calls) is int and type(ic) is bool:
                    return (a, c, k, e, n_calls, ic, True)
        try:
            vals = tuple(m[f] for f in MSG_FIELDS)
        except KeyError as k:
            raise TraceError(path, ln, f"{field}.{k.args[0]}", "missing") from None
        for f, v in zip(MSG_FIELDS, vals):
            if type(v) is not int:
                raise TraceError(path, ln, f"{field}.{f}", f"{v!r} is not an integer")
        flags = []
        for f, default in (("init_cache", False), ("valid", True)):
            b = m.get(f, default)
            if type(b) is not bool:
                raise TraceError(path, ln, f"{field}.{f}", f"{b!r} is not a boolean")
            flags.append(b)
        extra = set(m) - set(MSG_FIELDS) - {"init_cache", "valid"}
        if extra:
            raise TraceError(path, ln, f"{field}.{sorted(extra)[0]}", "unknown message "
                             "field")
        return vals + tuple(flags)
    if type(m) is list:
        return tuple(parse_msg(x, path, ln, f"{field}[{k}]") if type(x) in (dict, list)
                     else _scalar(x, path, ln, f"{field}[{k}]") for k, x in enumerate(m))
    return _scalar(m, path, ln, field)


def _scalar(x, path, ln, field):
    if type(x) in (int, bool, str, float):
        return x
    raise TraceError(path, ln, field, f"{x!r} is not a message value")


def _diagnose(d: dict, path, ln: int):
    for f, ty in (("rank", int), ("i", int), ("src", str), ("label", str), ("dst", str),
                  ("t_ns", int), ("dur_ns", int)):
        v = d.get(f, 0 if ty is int else "")
        if type(v) is not ty:
            what = "an integer" if ty is int else "a string"
            raise TraceError(path, ln, f, f"{v!r} is not {what}")
    if d["i"] < 0:
        raise TraceError(path, ln, "i", f"{d['i']} is negative")
    raise TraceError(path, ln, "?", "malformed step")  # pragma: no cover
