"""Per-rank JSON-lines trace writer (schema: model/events.py, lines: model/tracefmt.py).

One file per rank and segment, one line per event, each line handed to the OS with one ``write`` on
an append-only descriptor, so a crash loses nothing already written (a kill -9 can at
most cut the last line, which the loader reports rather than rejects). No tensors are
ever written. Lines are encoded with orjson when it is installed (about 10x cheaper
than json's encoder: tracing sits on every row of the critical path), json otherwise;
both give compact, key-sorted JSON.
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from lockstep.model import tracefmt as F
from lockstep.model.events import STEP

try:
    import orjson
except ImportError:    # optional: the bench runs from a bare torch install
    orjson = None


def encode_line(event: dict) -> bytes:
    if orjson is not None:
        try:
            return orjson.dumps(event, option=orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE)
        except TypeError:   # e.g. an int beyond 64 bits: json's encoder takes it
            pass
    return (json.dumps(event, separators=(",", ":"), sort_keys=True) + "\n").encode()


class TraceWriter:
    """One rank's trace, in segments (format 2: model/tracefmt.py).

    ``rank{R}.jsonl`` is always the newest segment. With a segment size
    (``segment_bytes``) or age (``segment_s``), a full segment is closed between two
    steps and renamed ``rank{R}.{N:06d}.jsonl`` (N its number, from 0), and a new
    ``rank{R}.jsonl`` opens with segment N+1's checkpoint; ``keep`` (a flight recorder)
    deletes the numbered segments beyond the newest ``keep`` (the open one counts).
    ``rank{R}.segments`` logs each segment closed and deleted, one readable line each.

    The checkpoint is ``snapshot()``: the interpreter's (pcs, v) under its lock, after
    the last written step; the counters are the writer's own (what its lines imply).
    ``emits_only``: of the step events only the emitting rows' are written (the overlap
    measurements); the others are never built (RunOptions.trace "emits")."""

    def __init__(self, run_dir: Path, rank: int, *, role: str, threads, initial,
                 shared=frozenset(), emits_only: bool = False, segment_bytes: int = 0, segment_s: float = 0,
                 keep: int = 0):
        self.dir, self.rank, self.role = Path(run_dir), rank, role
        self.path = self.dir / f"rank{rank}.jsonl"
        self.threads, self.shared = tuple(threads), shared
        self.snapshot = lambda: initial          # (pcs, v): set by the interpreter
        self.segment_bytes, self.segment_s, self.keep = segment_bytes, segment_s, keep
        self._lock = threading.Lock()   # rank0's two threads share one file
        self.emits_only = emits_only
        self.segment = -1
        self._fd = None
        self.counters = F.Counters(initial[0])
        self._open(initial[1])

    def keeps(self, row) -> bool:
        """Is the step event of this row written?"""
        return not self.emits_only or "emit" in row.tags

    def _open(self, v) -> None:
        self.segment += 1
        self._t0 = time.monotonic_ns()
        self._opened_wall = time.time()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC,
                           0o644)
        self._enc = F.StepEncoder(self.threads, self.counters, self._t0, self.shared)
        line = encode_line(F.checkpoint_event(self.rank, self.role, self.segment, self._t0,
                                              self.counters, v))
        os.write(self._fd, line)
        self._bytes, self._lines = len(line), 1

    def write(self, event: dict) -> None:
        with self._lock:
            if self._fd is None:
                return
            if event.get("ev") == STEP:
                event = self._enc.encode(event)
            line = encode_line(event)
            os.write(self._fd, line)
            self._bytes += len(line)
            self._lines += 1

    def full(self) -> bool:
        """Is the open segment over its size or age? (Checked between steps.)"""
        return (self.segment_bytes and self._bytes >= self.segment_bytes) or \
            (self.segment_s and time.monotonic_ns() - self._t0 >= self.segment_s * 1e9)

    def roll(self) -> None:
        """Close the open segment, open the next with its checkpoint. The caller holds
        the interpreter's lock, so ``snapshot()`` is the state after the last line."""
        pcs, v = self.snapshot()
        with self._lock:
            if self._fd is None:
                return
            os.close(self._fd)
            done = self.dir / f"rank{self.rank}.{self.segment:06d}.jsonl"
            os.replace(self.path, done)
            log = [f"segment {self.segment} {done.name} opened "
                   f"{_utc(self._opened_wall)} closed {_utc(time.time())} "
                   f"lines {self._lines} bytes {self._bytes}"]
            old = self.segment - self.keep + 1
            if self.keep and old >= 0:
                gone = self.dir / f"rank{self.rank}.{old:06d}.jsonl"
                if gone.exists():
                    gone.unlink()
                    log.append(f"segment {old} {gone.name} deleted (keep {self.keep})")
            self.counters.pcs = list(pcs)
            self._open(v)
            with open(self.dir / f"rank{self.rank}.segments", "a") as f:
                f.write("".join(x + "\n" for x in log))

    def close(self) -> None:
        with self._lock:
            if self._fd is None:
                return
            try:
                os.fsync(self._fd)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class OutputLog:
    """rank0's emitted outputs, streamed to outputs.json as they are emitted (a JSON
    list of [chunk, epoch, output], valid once closed), so a long stream keeps none of
    them in memory. Stands in for the list the interpreter appends to. Written as
    outputs.json.partial and renamed on close: a rank0 killed mid-run leaves no
    outputs.json, as before."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._part = self.path.with_name(self.path.name + ".partial")
        self._f = open(self._part, "w", encoding="utf-8")
        self._f.write("[")
        self.n = 0

    def append(self, item) -> None:
        self._f.write(("," if self.n else "") + json.dumps(item, separators=(",", ":")))
        self.n += 1

    def __len__(self) -> int:
        return self.n

    def close(self) -> None:
        if not self._f.closed:
            self._f.write("]")
            self._f.close()
            os.replace(self._part, self.path)
