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

from lockstep.model.config import Config, config_from_dict, config_to_dict
from lockstep.model import tracefmt as F
from lockstep.model.events import FAULT, OPS, RELEASE, START, STEP
from lockstep.model.tables import THREADS, shipped_tables

from . import cache as C
from . import segments as S

try:                      # a fast parser when installed (pyproject: orjson); same JSON
    from orjson import loads as _fast_loads
except ImportError:       # pragma: no cover
    _fast_loads = None
_SCAN = json.decoder.JSONDecoder().scan_once
_SIGS: dict = {}
_new_ev = object.__new__
THREAD_NAMES = {role: tuple(ts) for role, ts in THREADS.items()}
RANK_FILE = re.compile(r"^rank(\d+)(?:\.(\d{6}))?\.jsonl$")   # newest, or segment N
MSG_FIELDS = ("action", "call_id", "chunk", "epoch", "calls")
P2P_PEERS = ("rank0", "leader")
GROUP_NAMES = ("world_pg", "mesh_pg")


class TraceError(Exception):
    """A malformed run directory: file, line (1-based, 0 = whole file), field."""

    def __init__(self, file, line: int, field: str, detail: str):
        self.file, self.line, self.field, self.detail = str(file), line, field, detail
        where = f"{Path(self.file).name}" + (f" line {line}" if line else "")
        super().__init__(f"{where}: field '{field}': {detail}")


class RunDirError(TraceError):
    """Not a run directory, or its run.json unreadable: there is no run to judge (the
    CLI exits 2 naming the path, not 1 as for a run that does not conform)."""


class Ev:
    """One step event. `rank`/`t` (thread index)/`i` identify it; `pos` is its position
    in the rank's file order; `line` its line number. The replayer adds links."""
    __slots__ = ("rank", "t", "thread", "i", "src", "label", "dst", "op", "peer", "chan_i",
                 "group", "gseq", "msg", "has_msg", "t_ns", "dur_ns", "meas", "line",
                 "pos", "done", "deps", "prev", "partner", "inst", "dup", "lane", "sends",
                 "file")

    def __init__(self):
        self.done = False
        self.partner = self.inst = self.dup = self.prev = None
        self.deps = ()
        self.lane = None

    def where(self) -> str:
        return f"{self.file} line {self.line}"

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
        self.files = [path]         # its segments, oldest first (conformance/segments.py)
        self.checkpoints = []       # (pos of the segment's first step, file, line dict)

    @property
    def first_segment(self) -> int:
        """The number of its oldest retained segment (0: the trace is whole)."""
        return self.checkpoints[0][2]["segment"] if self.checkpoints else 0

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
        self.start = None       # a suffix: where its replay starts (conformance/suffix.py)
        self.cache_note = ""    # what the load cache did (conformance/cache.py)

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

def open_run_dir(run_dir) -> tuple:
    """(Config, run.json's dict) of a run directory; RunDirError if it is not one."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(run_dir, 0, "run_dir", "not a directory")
    return load_config(run_dir)


def load_config(run_dir: Path) -> tuple:
    p = Path(run_dir) / "run.json"
    try:
        meta = F.loads(p.read_text())
    except FileNotFoundError:
        raise RunDirError(p, 0, "run.json", "missing: the run directory needs the model "
                          "configuration (model.config.config_to_dict)") from None
    except (ValueError, OSError) as e:      # not UTF-8 / JSON; a directory, unreadable
        raise RunDirError(p, 0, "run.json", f"not readable JSON: {e}") from None
    if not isinstance(meta, dict):
        raise RunDirError(p, 0, "run.json", "not a JSON object")
    d = meta.get("config", meta)
    if not isinstance(d, dict):
        raise RunDirError(p, 0, "config", "not a JSON object")
    try:
        cfg = config_from_dict(d)
    except (TypeError, ValueError) as e:
        raise RunDirError(p, 0, "config", f"not a model Config: {e}") from None
    return cfg, meta


# ------------------------------------------------------------------ rank files

def load_run(run_dir, cfg: Optional[Config] = None, last: int = 0, cache=None) -> Run:
    """Load and check a run directory; raises TraceError on malformed input. `last`:
    read only each rank's newest `last` segments (a suffix, as a flight recorder keeps
    it). A suffix (some rank's oldest segment is not segment 0) gets `run.start`, the
    replay's first state (conformance/suffix.py). `cache`: where the load cache lives
    (None: the default or LOCKSTEP_TRACE_CACHE; a directory; False: none), see
    conformance/cache.py; `run.cache_note` says what it did."""
    run_dir = Path(run_dir)
    meta = {}
    if cfg is None:
        cfg, meta = open_run_dir(run_dir)
    elif not run_dir.is_dir():
        raise RunDirError(run_dir, 0, "run_dir", "not a directory")
    from lockstep.model.semantics import Model
    model = Model(cfg, shipped_tables())
    world = model.n
    files = {}
    for p in run_dir.iterdir():
        mt = RANK_FILE.match(p.name)
        if mt:
            files.setdefault(int(mt.group(1)), []).append(p)
    extra = sorted(r for r in files if r >= world)
    if extra:
        raise TraceError(files[extra[0]][0], 0, "rank", f"rank {extra[0]} is outside the "
                         f"configured world of {world} (1 + mesh {cfg.mesh})")
    warnings, ranks = [], []
    lc = C.LoadCache.for_run(run_dir, cache, sum(p.stat().st_size for ps in files.values()
                                                  for p in ps))
    gc_was = gc.isenabled()
    gc.disable()      # many small acyclic objects: generational passes only cost time
    try:
        _load_all(run_dir, model, files, world, warnings, ranks, last, lc)
        if not last:
            opts = meta.get("opts")
            keep = opts.get("trace_keep") if isinstance(opts, dict) else None
            for rt in ranks:
                S.check_head_kept(rt, run_dir, keep if type(keep) is int else None)
        run = Run(run_dir, cfg, meta, ranks, warnings)
        run.cache_note = lc.note()
        from . import suffix      # it reads Run and TraceError from here
        suffix.check_checkpoints(run, model)
        if suffix.is_suffix(run):
            run.start = suffix.suffix_start(run, model)
    finally:
        if gc_was:
            gc.enable()
    return run


def _load_all(run_dir, model, files, world, warnings, ranks, last, lc):
    cfg_json = json.dumps(config_to_dict(model.cfg), sort_keys=True)
    for r in range(world):
        path = run_dir / f"rank{r}.jsonl"
        rt = RankTrace(r, path, model.roles[r])
        if r not in files:
            rt.missing = True
            warnings.append(f"rank{r}.jsonl: missing (the rank died before tracing "
                            f"started); treated as a crash")
        else:
            rt.files = S.ordered(files[r])[-last:] if last else S.ordered(files[r])
            datas = [seg.read_bytes() for seg in rt.files]
            key = C.rank_key(r, rt.role, world, last, cfg_json,
                             [(seg.name, data) for seg, data in zip(rt.files, datas)]) \
                if lc.dir is not None else b""
            hit = lc.get(r, last, key) if key else None
            if hit is not None and C.restore(rt, hit, warnings):
                lc.read.append(r)
            else:
                if hit is not None:
                    lc.rejected(r)
                mine = []
                reader = S.SegmentReader(rt, model)
                for k, (seg, data) in enumerate(zip(rt.files, datas)):
                    _load_rank(rt, seg, data, mine, world, reader,
                               last=k == len(rt.files) - 1)
                warnings += mine
                if key:
                    lc.put(r, last, key, C.rank_payload(rt, mine))
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


def _load_rank(rt: RankTrace, path: Path, data: bytes, warnings: list, world: int,
               reader, last: bool = True) -> None:
    text = data.decode("utf-8", errors="replace")
    lines = text.split("\n")
    complete_end = text.endswith("\n") or text == ""
    if complete_end:
        lines.pop()        # the empty string after the final newline
    rank, role = rt.rank, rt.role
    threads = THREADS[role]
    tindex = {name: k for k, name in enumerate(threads)}
    if not rt.checkpoints and not rt.steps:
        rt.prev_of = [None] * len(threads)
        rt.next_i = [0] * len(threads)
    next_i, prev_of = rt.next_i, rt.prev_of
    steps = rt.steps
    fname = path.name
    compact = False
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
                except (StopIteration, RecursionError):   # F.loads says which
                    end = -1
                if end != len(line):
                    d = F.loads(line)
        except ValueError as e:
            if ln == nlines and not complete_end and last:
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
        if ln == 1 and kind == S.CHECKPOINT:
            reader.checkpoint(d, path, len(steps))
            compact = True
            continue
        if ln == 1 and (rt.checkpoints or len(rt.files) > 1):
            raise TraceError(path, ln, "ev", "a trace segment begins with its checkpoint "
                             f"(found {kind!r})")
        if kind is None and compact:
            ev = reader.step(d, path, ln)
        elif kind == STEP and not compact:
            ev = _step(d, path, ln, rank, role, tindex)
        else:
            ev = None
        if ev is not None:
            ev.file = fname
            t = ev.t
            if ev.i != next_i[t]:
                what = "skips" if ev.i > next_i[t] else "repeats or goes back"
                raise TraceError(path, ln, "i", f"thread {ev.thread}: i={ev.i} {what} "
                                 f"(expected i={next_i[t]}: per-thread numbering from 0, "
                                 f"no gaps)")
            next_i[t] += 1
            ev.prev = prev_of[t]
            prev_of[t] = ev
            ev.pos = len(steps)
            steps.append(ev)
            if ev.op == "exit":
                rt.has_exit = True
        elif kind == STEP or kind is None:
            raise TraceError(path, ln, "ev", "a long-form step in a format-2 segment, or "
                             "a format-2 step in a long-form trace" if kind == STEP else
                             "a format-2 step (no 'ev') in a trace without a checkpoint")
        elif kind == RELEASE or kind == FAULT or kind == START:
            # type(): a JSON false is a Python 0, and would pass for rank 0.
            if "rank" in d and (type(d["rank"]) is not int or d["rank"] != rank):
                raise TraceError(path, ln, "rank", f"rank {d['rank']!r:.40} in "
                                 f"rank{rank}.jsonl")
            if "t_ns" in d and type(d["t_ns"]) is not int:
                raise TraceError(path, ln, "t_ns", "not an integer")
            d["_line"] = ln
            d["_file"] = fname
            if kind == RELEASE:
                if not isinstance(d.get("reason"), str):
                    raise TraceError(path, ln, "reason", "a release event needs a "
                                     "string reason")
                _check_release(d, path, ln)
                rt.releases.append(d)
            elif kind == FAULT:
                if not isinstance(d.get("what"), str):
                    raise TraceError(path, ln, "what", "a fault event needs a string "
                                     "'what'")
                rt.faults.append(d)
            else:
                if rt.start is not None:
                    raise TraceError(path, ln, "ev", "a second start event")
                if "world" in d and (type(d["world"]) is not int or d["world"] != world):
                    raise TraceError(path, ln, "world", f"{d['world']!r}: run.json "
                                     f"configures a world of {world}")
                if not isinstance(d.get("backend", ""), str):
                    raise TraceError(path, ln, "backend", f"{d['backend']!r:.40} is not a "
                                     "backend name (a string)")
                rt.start = d
        else:
            raise TraceError(path, ln, "ev", f"unknown event kind {kind!r} (expected "
                             f"one of {STEP}, {START}, {RELEASE}, {FAULT}; "
                             f"{S.CHECKPOINT} on line 1 only)")


def _check_release(d: dict, path, ln: int) -> None:
    """A release event's `via` and structured `cause` (model/events.py), where present,
    have the types their readers take (conformance/report.py judges them). A cause that
    is absent or null is an older trace's release: not judged, not an error."""
    if not isinstance(d.get("via", ""), str):
        raise TraceError(path, ln, "via", f"{d['via']!r:.40} is not a string")
    c = d.get("cause")
    if c is None:
        return
    if type(c) is not dict:
        raise TraceError(path, ln, "cause", f"{c!r:.40} is not an object")
    if "rank" in c and type(c["rank"]) is not int:
        raise TraceError(path, ln, "cause.rank", f"{c['rank']!r:.40} is not an integer")
    for f in ("kind", "detail", "role"):
        if not isinstance(c.get(f, ""), str):
            raise TraceError(path, ln, f"cause.{f}", f"{c[f]!r:.40} is not a string")


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
    t = tindex.get(thread) if type(thread) is str else None
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
        if type(d.get("msg")) is not dict:
            raise TraceError(path, ln, "msg", f"{'missing' if 'msg' not in d else 'not an object'}:"
                             f" a {op} records its message")
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
        raise TraceError(path, ln, "op", f"{op!r:.40}: one of {', '.join(OPS)}")
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


def event_columns(steps: list, file_index: dict) -> tuple:
    """The load cache's columns of a rank's events (conformance/cache.py), the inverse of
    `events_from_columns`: (the distinct (src, label, dst, op, peer, group), a dict of
    one list per field, `sig` and `file` as indexes)."""
    sigs, sig_of, codes = [], {}, []
    t, i, t_ns, dur, line, files = [], [], [], [], [], []
    chan_i, gseq, msg, has_msg, meas = [], [], [], [], []
    for e in steps:
        sig = (e.src, e.label, e.dst, e.op, e.peer, e.group)
        j = sig_of.get(sig)
        if j is None:
            j = sig_of[sig] = len(sigs)
            sigs.append(sig)
        codes.append(j)
        t.append(e.t)
        i.append(e.i)
        t_ns.append(e.t_ns)
        dur.append(e.dur_ns)
        line.append(e.line)
        files.append(file_index[e.file])
        chan_i.append(e.chan_i)
        gseq.append(e.gseq)
        msg.append(e.msg)
        has_msg.append(e.has_msg)
        meas.append(e.meas)
    return sigs, {"t": t, "i": i, "t_ns": t_ns, "dur_ns": dur, "line": line, "sig": codes,
                  "file": files, "chan_i": chan_i, "gseq": gseq, "msg": msg,
                  "has_msg": has_msg, "meas": meas}


def events_from_columns(rank: int, threads: tuple, names: list, sigs: list, columns):
    """A rank's `Ev` list rebuilt from the load cache's columns (conformance/cache.py:
    t, i, index into `sigs`, chan_i, gseq, msg, has_msg, t_ns, dur_ns, meas, line, index
    into `names`), with each event's `prev` on its thread; (steps, last per thread).
    Here rather than in cache.py because this module is compiled (lockstep/accel.py):
    the loop is most of a cached load."""
    new = _new_ev
    prev = [None] * len(threads)
    steps = []
    append = steps.append
    pos = 0
    for (t, i, j, ci, gseq, msg, has_msg, t_ns, dur, meas, line, k) in zip(*columns):
        ev = new(Ev)
        ev.src, ev.label, ev.dst, ev.op, ev.peer, ev.group = sigs[j]
        ev.rank, ev.t, ev.thread, ev.i, ev.chan_i, ev.gseq = rank, t, threads[t], i, ci, gseq
        ev.msg, ev.has_msg, ev.t_ns, ev.dur_ns, ev.meas, ev.line = \
            msg, has_msg, t_ns, dur, meas, line
        ev.file, ev.pos, ev.prev = names[k], pos, prev[t]
        ev.done = False
        ev.partner = ev.inst = ev.dup = ev.lane = None
        ev.deps = ()
        prev[t] = ev
        append(ev)
        pos += 1
    return steps, prev


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
        return tuple(parse_msg(x, path, ln, f"{field}[{k}]") if type(x) is dict
                     else _item(x, path, ln, f"{field}[{k}]") for k, x in enumerate(m))
    raise TraceError(path, ln, field, f"{m!r:.40} is not a message (an object) or a "
                     "gathered vector (a list)")


def _item(x, path, ln, field):
    """A gathered vector's item that is not a message: a count or a flag (what the
    model's all_gather rows gather, model/tracefmt.py vector_of_json)."""
    if type(x) is int or type(x) is bool:
        return x
    raise TraceError(path, ln, field, f"{x!r:.40} is not a count, a flag or a message")


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


def step_views(run_dir, rank: int) -> list:
    """A rank's step events in the long form of model/events.py (label, src, dst, op,
    thread, i, msg, meas, t_ns, dur_ns, peer/chan_i, group/gseq), whatever the file
    format: for tests and scripts that read what a run did. A format-2 local step's
    queue subject is implied, not written (model/tracefmt.py): it is recomputed here as
    the runtime computed it, `local_subject` of the row's update applied to the rank's
    state (from its oldest checkpoint, by conformance/suffix.py `apply_line`)."""
    from lockstep.model.events import local_subject, msg_to_json
    from lockstep.model.messages import Msg
    from lockstep.model.semantics import LIVE, Model, Proc
    from .suffix import _row, apply_line
    run = load_run(run_dir)
    rt = run.ranks[rank]
    model = Model(run.cfg, shipped_tables())
    if rt.checkpoints:
        d0 = rt.checkpoints[0][2]
        proc = Proc(LIVE, tuple(d0["pcs"]), d0["v"])
    else:
        proc = model.initial_state().procs[rank]

    def as_json(m):
        if type(m) is tuple and len(m) == 7 and not isinstance(m[0], (tuple, bool)):
            return msg_to_json(Msg(*m))
        return [as_json(x) for x in m] if type(m) is tuple else m
    out = []
    for ev in rt.steps:
        d = {"ev": STEP, "rank": ev.rank, "role": run.ranks[rank].role, "thread": ev.thread,
             "i": ev.i, "src": ev.src, "label": ev.label, "dst": ev.dst, "op": ev.op,
             "t_ns": ev.t_ns, "dur_ns": ev.dur_ns}
        if ev.peer is not None:
            d["peer"], d["chan_i"] = ev.peer, ev.chan_i
        if ev.group is not None:
            d["group"], d["gseq"] = ev.group, ev.gseq
        if proc is not None and proc.pcs[ev.t] != ev.src:
            proc = None     # an emits-only trace: its lines are not contiguous
        if proc is not None:
            before = proc.v
            proc = apply_line(model, proc, ev, _row(model, ev))
            if not ev.has_msg and ev.op == "local" and proc.v is not None:
                subj = local_subject(before, proc.v)
                if subj is not None:
                    d["msg"] = msg_to_json(subj)
        if ev.has_msg:
            d["msg"] = as_json(ev.msg)
        if ev.meas:
            d["meas"] = ev.meas
        out.append(d)
    return out
