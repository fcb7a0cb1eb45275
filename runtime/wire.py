"""Moving codec frames over torch.distributed without ever blocking blindly.

Every backend call is issued asynchronously and completed by polling `is_completed()`
while checking the abort flag and a per-operation deadline (FACTS.md: nothing called
from another thread releases a blocked gloo call; an abandoned async work does not
block us). Multi-frame messages are generators that yield one `Work` per frame, so the
rank0 comms thread can drive a send and a receive at the same time: it keeps a receive
posted while it sends (PROTOCOL.md, Overlap).
"""
from __future__ import annotations

import threading
import time

import torch
import torch.distributed as dist

from . import codec


class Released(RuntimeError):
    """The abort flag (or a lost peer) released this rank."""


class OpDeadline(RuntimeError):
    pass


class _Pending:
    """A backend work being completed. gloo's point-to-point works never report
    is_completed() (measured, torch 2.13) and have no future, so a daemon thread parks
    in wait() and flags completion; abandoning it on abort is safe because the process
    then leaves with os._exit."""

    __slots__ = ("work", "done", "error", "wake")

    def __init__(self, work, wake=None):
        self.work, self.error, self.wake = work, None, wake
        self.done = threading.Event()
        threading.Thread(target=self._wait, daemon=True).start()

    def _wait(self):
        try:
            self.work.wait()
        except BaseException as e:  # noqa: BLE001 - re-raised in the polling thread
            self.error = e
        self.done.set()
        if self.wake is not None:
            self.wake.set()


def poll(jobs, *, abort_poll, deadline_s: float, what, pending=None, wake=None,
         interrupt=None):
    """Advance generator jobs until one finishes; return (index, value). Each job
    yields torch Works and returns its value via StopIteration. `what` labels a
    deadline error: a string, or a callable formatted only then. `pending`: the caller's
    list of each job's work in flight, kept across calls when a job outlives the call
    (a receive posted while a send completes): resuming it before its work completed
    would read an unfilled buffer. `wake` (an Event) and `interrupt`: the caller's
    thread may get new work while a job is in flight (a result queued while a receive
    is posted); poll waits on `wake` (set by a work's completion or by the caller's
    other threads) and, each time it wakes and no job has finished, asks `interrupt()`:
    if it holds, poll returns (None, None) with the jobs still in flight. A finished job
    is always returned first."""
    t0 = time.monotonic()
    current = [None] * len(jobs) if pending is None else pending
    while True:
        if wake is not None:
            wake.clear()    # a completion or new work after this is caught by the wait
        for i, job in enumerate(jobs):
            if job is None:
                continue
            w = current[i]
            if w is not None:
                if not w.done.is_set():
                    continue
                if w.error is not None:
                    raise w.error
            try:
                current[i] = _Pending(next(job), wake)
            except StopIteration as stop:
                return i, stop.value
            t0 = time.monotonic()
        # completed jobs first: an interrupt before them could starve them (the thread
        # would take its new work and come back here, again and again)
        if wake is not None and interrupt():
            return None, None
        reason = abort_poll()
        if reason:
            raise Released(reason)
        if time.monotonic() - t0 > deadline_s:
            label = what() if callable(what) else what
            raise OpDeadline(f"{label}: no progress for {deadline_s:.1f} s")
        waiting = [w for w in current if w is not None]
        if wake is not None:
            wake.wait(0.05)
        elif len(waiting) == 1:
            waiting[0].done.wait(0.05)
        else:
            time.sleep(0.0002)


def run_one(job, **kw):
    return poll([job], **kw)[1]


# ------------------------------------------------------------------ point-to-point

def send_parts(parts, dst: int, group=None):
    for t in parts:
        if t.numel():
            yield dist.isend(t, dst, group=group)


def recv_header(src: int, expect: str, caps=codec.DEFAULT_CAPS, group=None):
    t = torch.zeros(codec.HEADER_WORDS, dtype=torch.int64)
    yield dist.irecv(t, src, group=group)
    return codec.decode_header(t, caps=caps, expect=expect)


def recv_payload(h, src: int, caps=codec.DEFAULT_CAPS, group=None):
    """The packed payload (meta, manifest, tensors) in one receive, sized by the
    header and capped before allocation."""
    buf = codec.alloc_packed(h)
    if buf.numel():
        yield dist.irecv(buf, src, group=group)
    return codec.unpack_payload(buf, h, caps=caps)


# ------------------------------------------------------------------ mesh broadcast

def bcast_header(frames, root_global: int, group, expect: str, caps=codec.DEFAULT_CAPS):
    """frames on the root, None elsewhere; returns the decoded Header everywhere."""
    t = frames.header if frames is not None else torch.zeros(codec.HEADER_WORDS,
                                                             dtype=torch.int64)
    yield dist.broadcast(t, root_global, group=group, async_op=True)
    return codec.decode_header(t, caps=caps, expect=expect)


def bcast_payload(frames, h, root_global: int, group, caps=codec.DEFAULT_CAPS):
    """Root sends the packed payload; the others allocate it from the header and read
    shapes from the manifest (never inferring them on their own: FM-08)."""
    buf = codec.pack_payload(frames) if frames is not None else codec.alloc_packed(h)
    if buf.numel():
        yield dist.broadcast(buf, root_global, group=group, async_op=True)
    return codec.unpack_payload(buf, h, caps=caps)


def all_gather_ints(values, group, size: int):
    """All-gather a small int64 vector per member; returns a list of tuples."""
    mine = torch.tensor(values, dtype=torch.int64)
    out = [torch.zeros_like(mine) for _ in range(size)]
    yield dist.all_gather(out, mine, group=group, async_op=True)
    return [tuple(int(x) for x in t.tolist()) for t in out]
