"""Per-rank JSON-lines trace writer (schema: model/events.py).

One file per rank, one line per event, flushed (and the OS buffer written) per event,
so a crash loses nothing already written; a kill -9 can at most cut the last line,
which the loader reports rather than rejects. No tensors are ever written.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path


class TraceWriter:
    def __init__(self, run_dir: Path, rank: int):
        self.path = Path(run_dir) / f"rank{rank}.jsonl"
        self._f = open(self.path, "a", buffering=1, encoding="utf-8")
        self._lock = threading.Lock()   # rank0's two threads share one file

    def write(self, event: dict) -> None:
        line = json.dumps(event, separators=(",", ":"), sort_keys=True)
        with self._lock:
            if self._f.closed:
                return
            self._f.write(line + "\n")
            self._f.flush()

    def close(self) -> None:
        with self._lock:
            try:
                self._f.flush()
                os.fsync(self._f.fileno())
            except (OSError, ValueError):
                pass
            self._f.close()


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
