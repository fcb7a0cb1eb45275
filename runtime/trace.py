"""Per-rank JSON-lines trace writer (schema: model/events.py).

One file per rank, one line per event, each line handed to the OS with one ``write`` on
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
from pathlib import Path

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
    """``emits_only``: of the step events only the emitting rows' are written (the
    overlap measurements); the others are never built (RunOptions.trace "emits")."""

    def __init__(self, run_dir: Path, rank: int, *, emits_only: bool = False):
        self.path = Path(run_dir) / f"rank{rank}.jsonl"
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._lock = threading.Lock()   # rank0's two threads share one file
        self.emits_only = emits_only

    def keeps(self, row) -> bool:
        """Is the step event of this row written?"""
        return not self.emits_only or "emit" in row.tags

    def write(self, event: dict) -> None:
        line = encode_line(event)
        with self._lock:
            if self._fd is None:
                return
            os.write(self._fd, line)

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
