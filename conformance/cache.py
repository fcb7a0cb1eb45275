"""A load cache: what `load.py` made of a rank's trace files, kept beside them in
`marshal` form, so a second load of the same trace skips parsing and checking.

It never lies. A cache file is used only when its key is the key of the files being
loaded now, the key being a SHA-256 over: each of the rank's trace files' name, size and
content hash (the whole bytes: a changed field anywhere changes the key), the rank, its
role, the world, `last`, the run's Config, the Python and marshal versions, and the
source of the code that decides what a load produces (this package's loader modules and
every module of `lockstep.model`: a changed rule of the loader rebuilds the cache). A
file whose key differs is stale: the rank is parsed and the file rewritten. The payload
carries its own SHA-256: a corrupted file is detected, ignored and rebuilt, never
trusted; marshal is never asked to read bytes that failed that check, and a payload that
checks but does not decode (a foreign writer) is ignored the same way. Writes go to a
temporary file renamed over the old one (atomic: a reader sees the old file or the new
one). Never pickle: marshal holds plain values only (the `Ev` objects are rebuilt from
field tuples, the checkpoints' variables from their JSON form).

Where (the `cache` argument of `load_run`, else the environment variable
LOCKSTEP_TRACE_CACHE):
  * default: `RUN_DIR/.lockstep-cache/`, for traces of at least `MIN_BYTES` (a small
    trace loads faster than the cache pays back, and the committed corpus stays clean);
  * LOCKSTEP_TRACE_CACHE=DIR (or cache=DIR): under DIR, one sub-directory per run
    directory (named by a hash of its absolute path), whatever the size: for run
    directories the user cannot write to;
  * LOCKSTEP_TRACE_CACHE=off (or cache=False): no cache.
A location that cannot be written (a read-only trace directory) means no cache, said in
`Run.cache_note`, the line that always says which of these happened.

Considered and rejected: pickle (executes what it reads); keying on size and mtime only
(an edit within the same second and size would be served stale); one cache file for the
whole run (a suffix load, `last`, and a change to one rank would rebuild every rank).
"""
from __future__ import annotations

import hashlib
import marshal
import os
import sys
import tempfile
from array import array
from pathlib import Path
from typing import Optional

from lockstep.accel import source_file

ENV = "LOCKSTEP_TRACE_CACHE"
SUBDIR = ".lockstep-cache"
MIN_BYTES = 1 << 20          # default location only: smaller traces are not cached
MAGIC = b"lockstep-load-cache 1\n"
_DIGEST = 32
_code_digest: Optional[bytes] = None


def _code() -> bytes:
    """SHA-256 of the source that decides what a load produces."""
    global _code_digest
    if _code_digest is None:
        # The .py files (the truth), wherever the modules were loaded from (accel.py).
        here = source_file(__name__).resolve().parent
        model = source_file("lockstep.model.semantics").resolve().parent
        h = hashlib.sha256()
        for p in [here / "load.py", here / "segments.py", here / "cache.py",
                  *sorted(model.glob("*.py"))]:
            h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
        _code_digest = h.digest()
    return _code_digest


def rank_key(rank: int, role: str, world: int, last: int, cfg_json: str,
             files: list) -> bytes:
    """files: [(name, bytes)] of the rank's segments in load order."""
    h = hashlib.sha256(_code())
    h.update(repr((sys.version_info[:2], marshal.version, rank, role, world, last,
                   cfg_json)).encode())
    for name, data in files:
        h.update(f"\0{name}\0{len(data)}\0".encode())
        h.update(hashlib.sha256(data).digest())
    return h.digest()


class LoadCache:
    """Where one run's rank caches live, and what happened to each (the note)."""

    def __init__(self, where: Optional[Path], why_off: str = ""):
        self.dir, self.why_off = where, why_off
        self.read, self.written, self.stale, self.corrupt = [], [], [], []
        self.unmarshallable = []
        self.failed = ""          # the first write error: nothing more is written

    @classmethod
    def for_run(cls, run_dir: Path, cache, total_bytes: int) -> "LoadCache":
        if cache is None:
            cache = os.environ.get(ENV, "") or None
            if cache is not None and cache.lower() in ("off", "0", "no", "false"):
                return cls(None, f"off ({ENV}={cache})")
        if cache is False:
            return cls(None, "off (cache=False)")
        if cache is None:
            if total_bytes < MIN_BYTES:
                return cls(None, f"not used (traces of {total_bytes:,} bytes, under "
                                 f"{MIN_BYTES:,}; {ENV}=DIR caches any size)")
            return cls(Path(run_dir) / SUBDIR)
        tag = hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:20]
        return cls(Path(cache) / tag)

    def _path(self, rank: int, last: int) -> Path:
        return self.dir / (f"rank{rank}.cache" if not last else
                           f"rank{rank}.last{last}.cache")

    def get(self, rank: int, last: int, key: bytes):
        """The decoded payload stored under `key`, or None (absent, stale, corrupt)."""
        if self.dir is None:
            return None
        try:
            with open(self._path(rank, last), "rb") as f:
                blob = f.read()
        except OSError:
            return None
        head = len(MAGIC) + 2 * _DIGEST
        if len(blob) < head or not blob.startswith(MAGIC):
            self.corrupt.append(rank)
            return None
        if blob[len(MAGIC):len(MAGIC) + _DIGEST] != key:
            self.stale.append(rank)
            return None
        body = memoryview(blob)[head:]
        if hashlib.sha256(body).digest() != blob[head - _DIGEST:head]:
            self.corrupt.append(rank)
            return None
        try:
            return marshal.loads(body)
        except (ValueError, EOFError, TypeError):
            self.corrupt.append(rank)
            return None

    def put(self, rank: int, last: int, key: bytes, payload) -> None:
        if self.dir is None or self.failed:
            return
        try:
            body = marshal.dumps(payload)
        except ValueError:        # a value marshal cannot hold (a NamedTuple such as a
            self.unmarshallable.append(rank)      # gathered vector of Msg): not cached
            return
        blob = MAGIC + key + hashlib.sha256(body).digest() + body
        tmp = None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=f".rank{rank}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, self._path(rank, last))
            self.written.append(rank)
        except OSError as e:
            self.failed = f"{type(e).__name__}: {e}"
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass

    def rejected(self, rank: int) -> None:
        """A payload that passed its checksum but did not decode."""
        self.corrupt.append(rank)

    def note(self) -> str:
        if self.dir is None:
            return f"load cache: {self.why_off}"
        bits = []
        if self.read:
            bits.append(f"read {_ranks(self.read)}")
        if self.written:
            bits.append(f"wrote {_ranks(self.written)}")
        if self.stale:
            bits.append(f"stale, rebuilt from the trace: {_ranks(self.stale)}")
        if self.corrupt:
            bits.append(f"corrupt, ignored and rebuilt: {_ranks(self.corrupt)}")
        if self.unmarshallable:
            bits.append(f"not cached (a value marshal cannot hold): "
                        f"{_ranks(self.unmarshallable)}")
        if self.failed:
            bits.append(f"cannot write there ({self.failed}): what was not read is not "
                        f"cached; set {ENV}=DIR to keep the cache elsewhere")
        return f"load cache {self.dir}: " + ("; ".join(bits) or "nothing to cache")


def _ranks(rs) -> str:
    return ", ".join(f"rank{r}" for r in sorted(set(rs)))


def clear(run_dir, cache=None) -> None:
    """Remove the cache `load_run(run_dir, cache=cache)` would use (a cold load)."""
    d = LoadCache.for_run(Path(run_dir), cache, MIN_BYTES).dir
    if d is not None and d.is_dir():
        for p in d.iterdir():
            p.unlink()
        d.rmdir()


# ---------------------------------------------------------------------- a rank's payload
# The step events column by column: the integer fields as machine-integer arrays (one
# bytes object each: unmarshalling a million small tuples cost more than the rest of a
# cached load), the strings as one index per event into the rank's distinct
# (src, label, dst, op, peer, group), the messages and measurements as lists. The rest of
# an `Ev` (rank, thread, pos, prev, the replayer's links) follows from the rank and the
# order.
VERSION = 2
_INT_COLUMNS = ("t", "i", "t_ns", "dur_ns", "line")
_WIDE = "q"                  # signed 64-bit; a column that does not fit stays a list
_INT_ONLY = {int}


def _ints(values):
    """A column of ints as array bytes, or the list itself when one does not fit (or
    is not exactly an int: a value must come back as the type it was)."""
    if not set(map(type, values)) <= _INT_ONLY:
        return list(values)
    try:
        return array(_WIDE, values).tobytes()
    except (OverflowError, TypeError):
        return list(values)


def _unints(col):
    if type(col) is bytes:
        out = array(_WIDE)
        out.frombytes(col)
        return out
    return col


def rank_payload(rt, warnings: list):
    """What loading `rt` produced, as plain values (marshal refuses anything else)."""
    from lockstep.model import tracefmt as F
    from .load import event_columns
    names = [p.name for p in rt.files]
    steps = rt.steps
    sigs, cols = event_columns(steps, {n: k for k, n in enumerate(names)})
    for f in _INT_COLUMNS + ("sig", "file"):
        cols[f] = _ints(cols[f])
    cps = [(pos, name, dict(d, v=F.vars_to_json(d["v"]))) for pos, name, d in rt.checkpoints]
    return (VERSION, len(steps), sigs, cols, names, rt.start, rt.releases, rt.faults,
            rt.truncated, rt.has_exit, cps, list(rt.next_i), list(warnings))


def restore(rt, payload, warnings: list) -> bool:
    """Fill `rt` from a payload; False (and `rt` untouched) if it does not decode."""
    from lockstep.model import tracefmt as F
    from .load import THREAD_NAMES, events_from_columns
    try:
        (version, n, sigs, cols, names, start, releases, faults, truncated, has_exit, cps,
         next_i, warns) = payload
        if version != VERSION or names != [p.name for p in rt.files]:
            return False
        cps = [(pos, name, dict(d, v=F.vars_from_json(rt.role, d["v"])))
               for pos, name, d in cps]
        columns = [_unints(cols[f]) for f in ("t", "i", "sig", "chan_i", "gseq", "msg",
                                              "has_msg", "t_ns", "dur_ns", "meas", "line",
                                              "file")]
        if any(len(c) != n for c in columns):
            return False
        steps, prev = events_from_columns(rt.rank, THREAD_NAMES[rt.role], names,
                                          [tuple(x) for x in sigs], columns)
    except (ValueError, TypeError, IndexError, KeyError):
        return False
    rt.steps, rt.start, rt.releases, rt.faults = steps, start, releases, faults
    rt.truncated, rt.has_exit, rt.checkpoints = truncated, has_exit, cps
    rt.next_i, rt.prev_of = next_i, prev
    warnings += warns
    return True
