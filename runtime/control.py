"""rank0's control interface: hard cuts (prompt change, reset) asked for from outside,
at any moment, while the stream runs.

In-process: `CutControl.request_cut(reason)` from any thread. Another process reaches
it through the run directory: `request_cut_file(run_dir, reason)` (what `lockstep cut
RUN_DIR --reason prompt_change` calls) drops `control/cut-*.json` atomically; rank0's
`ControlWatcher` thread polls that folder, hands each request to `request_cut` and
answers it by renaming the file to `.taken` (or `.refused`, with the error inside).

The control interface decides nothing: it only counts requests. The policy
(model/policy.py, `cuts_due`) compares that count plus the scheduled cuts reached with
the cuts rank0 has taken (a model variable), and the env rows `hard_cut` /
`hard_cut_in_drain` fire at rank0's next scheduling point where their guards allow.
A request beyond the run's bound (the model's Config.hard_cut less the scheduled
cuts) is refused here with an error, never silently left pending.

Rejected: a flag the interpreter checks and acts on itself (an ad-hoc branch beside the
tables); the side-channel store (a TCPStore client per thread, and the store dies with
its host: a file needs nothing running to be written, and stays as the run's record).
"""
from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from pathlib import Path

from lockstep.model.runopts import CUT_REASONS
from lockstep.model.tracefmt import loads

CONTROL_DIR = "control"


class CutRefused(RuntimeError):
    """A cut the run's bound does not allow (or an unknown reason)."""


class CutControl:
    def __init__(self, budget: int):
        self.budget = budget          # cuts the control interface may add
        self.requested = 0            # monotonic: read by the policy without the lock
        self._reasons = deque()       # reasons not yet attributed to a taken cut
        self._lock = threading.Lock()
        self._wake = None

    def on_request(self, wake) -> None:
        self._wake = wake

    def request_cut(self, reason: str = "prompt_change") -> int:
        """Ask for one hard cut; returns the number of cuts requested so far."""
        if reason not in CUT_REASONS:
            raise CutRefused(f"unknown cut reason {reason!r}; known: {', '.join(CUT_REASONS)}")
        with self._lock:
            if self.requested >= self.budget:
                raise CutRefused(
                    f"hard cut refused: the run allows {self.budget} cut(s) from the control "
                    f"interface (cuts.control; the model's Config.hard_cut bounds the total) "
                    f"and {self.requested} were requested")
            self._reasons.append(reason)
            self.requested += 1
            n = self.requested
        if self._wake is not None:
            self._wake()
        return n

    def take_reason(self):
        """The reason of the oldest requested cut not yet taken (None: none pending, the
        cut being taken is a scheduled one)."""
        with self._lock:
            return self._reasons.popleft() if self._reasons else None


def request_cut_file(run_dir, reason: str = "prompt_change", *, wait_s: float = 0.0) -> str:
    """Another process's way in: write a request into RUN_DIR/control/. With `wait_s`,
    wait that long for rank0's answer: returns "taken", "refused: ..." or "pending"."""
    if reason not in CUT_REASONS:
        raise CutRefused(f"unknown cut reason {reason!r}; known: {', '.join(CUT_REASONS)}")
    d = Path(run_dir) / CONTROL_DIR
    d.mkdir(parents=True, exist_ok=True)
    name = f"cut-{time.time_ns():020d}-{os.getpid()}-{threading.get_ident()}.json"
    tmp = d / f".{name}.tmp"
    tmp.write_text(json.dumps({"reason": reason, "t": time.time()}))
    os.replace(tmp, d / name)      # atomic: the watcher never sees half a request
    end = time.monotonic() + wait_s
    while True:
        if (d / f"{name}.taken").exists():
            return "taken"
        refused = d / f"{name}.refused"
        if refused.exists():
            return "refused: " + refused.read_text()
        if time.monotonic() >= end:
            return "pending"
        time.sleep(0.01)


def _request_reason(text: str) -> str:
    """The reason of a cut request file's JSON object; CutRefused for anything else (a
    hand-written or foreign file: refused like a bad reason, never the end of the
    watcher, which would leave every later request pending)."""
    req = loads(text)
    reason = req.get("reason", "prompt_change") if isinstance(req, dict) else None
    if not isinstance(reason, str):
        raise CutRefused(f"not a cut request (a JSON object with a string reason): "
                         f"{text[:60]!r}")
    return reason


class ControlWatcher(threading.Thread):
    """rank0's poller of RUN_DIR/control/ (every `poll_s`)."""

    def __init__(self, run_dir, control: CutControl, poll_s: float = 0.02):
        super().__init__(name="lockstep-control", daemon=True)
        self.dir = Path(run_dir) / CONTROL_DIR
        self.control, self.poll_s = control, poll_s
        self._stop_ev = threading.Event()

    def stop(self) -> None:
        self._stop_ev.set()

    def run(self) -> None:
        while not self._stop_ev.wait(self.poll_s):
            self.poll_once()

    def poll_once(self) -> int:
        try:
            names = sorted(e.name for e in os.scandir(self.dir)
                           if e.name.startswith("cut-") and e.name.endswith(".json"))
        except FileNotFoundError:
            return 0
        for name in names:
            path = self.dir / name
            try:
                self.control.request_cut(_request_reason(path.read_text()))
                os.replace(path, self.dir / f"{name}.taken")
            except (CutRefused, ValueError, OSError) as e:
                try:   # atomic, as the request: a requester never reads half an answer
                    tmp = self.dir / f".{name}.refused.tmp"
                    tmp.write_text(str(e))
                    os.replace(tmp, self.dir / f"{name}.refused")
                    path.unlink()
                except OSError:
                    pass
        return len(names)
