"""The crash > hang side channel: an abort flag, heartbeats and clean-exit marks on a c10d
TCPStore, plus the per-rank ``Watchdog`` thread that turns any of them into ``os._exit``.

Why a side channel at all (FACTS.md): nothing called from another thread releases a blocked
gloo recv/broadcast -- ``destroy_process_group``, ``abort()``, ``shutdown()`` all return and
the call stays blocked. A live peer that never sends blocks a recv until the backend
timeout. So a rank that fails must tell everyone out of band, and every rank needs a thread
that can end its own process from outside the blocked call: ``os._exit``.

Layout (all keys under ``lockstep/<run_id>/``):
  ``abort``     "" until someone fails; then the one-line reason of the FIRST setter
                (``compare_set("", reason)``: the root cause wins, echoes never overwrite it)
  ``hb/<r>``    rank r's heartbeat counter (``add(key, 1)`` every ``heartbeat_s``)
  ``clean/<r>`` set when rank r exits on purpose: a silent heartbeat is then not a fault
  ``ready``     set by the store host after creating the keys above

Rank 0 hosts the store (``is_master=True``). If rank 0 dies the store dies, every store call
fails within milliseconds, and the watchdogs treat "store unreachable" as a release reason.
Consequence for clean shutdown: rank 0 must outlive the others' use of the store, so it calls
``wait_all_clean()`` before exiting, and every rank stops its watchdog BEFORE marking clean
(``Watchdog.stop(); side.mark_clean_exit()``), after which it no longer reacts to anything.

Threads: a TCPStore client must not be shared between threads (a ``set`` waits behind another
thread's ``wait``), so ``client()`` makes a NEW connection; ``SideChannel`` methods called
from any thread use that thread's own client (thread-local).

Why the watchdog polls instead of blocking in ``store.wait([abort], timeout)``: a timed-out
``wait`` logs two C++ warnings to stderr per timeout (20/s at a 50 ms beat), which would bury
the one-line exit reason, and ``wait`` cannot wake on "any of" several keys. One tick is
``add`` (own beat) + ``multi_get`` (abort flag and all peers' beats, one round trip, ~30 us on
loopback), then ``Event.wait(heartbeat_s)``: abort-to-release latency <= one beat (50 ms),
peer-loss latency ~``lost_after_s``, CPU ~0 on a 2-core box. Considered and rejected: a second
thread parked in ``wait([abort])`` for ~0.3 ms release (another connection per rank, an
unstoppable thread, and 50 ms is already 20x inside the 1 s budget).

Liveness is judged on the observer's own monotonic clock (did the counter change in the last
``lost_after_s``?), so no clock sync is needed. A peer is judged only after its first beat;
one that never beats within ``startup_s`` is reported as never started.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from datetime import timedelta
from typing import Callable

from lockstep.runtime.worker_main import EXIT_RELEASED, exit_line, get_role, one_line

_ACTIVE: "SideChannel | None" = None  # the process's side channel, for worker_main's error path


def abort_active(reason: str, grace_s: float = 0.1, limit_s: float = 0.3) -> str | None:
    """Best effort, for a process that is exiting on an error: stop this process's
    watchdogs (the caller writes the one exit line), set the abort flag on its side channel
    (if any) with at most ``limit_s`` of waiting, and return the reason now in force: ours,
    or an EARLIER one (the root cause, e.g. the peer whose exit broke our gloo op) --
    put that in the exit line. On the store host, linger ``grace_s`` so peers can read the
    flag before the store dies with this process. Uses the calling thread's existing
    client: a new connection to a dead store would retry for the whole store timeout."""
    sc = _ACTIVE
    if sc is None:
        return None
    for wd in list(sc.watchdogs):
        wd._stop_ev.set()
    store = sc._store()
    box: list = []
    t = threading.Thread(target=lambda: box.append(sc.set_abort_with(store, reason)),
                         daemon=True)
    t.start()
    t.join(limit_s)
    if sc.is_master and grace_s > 0:
        time.sleep(grace_s)
    return box[0] if box else None


class SideChannel:
    """One rank's handle on the run's side channel. The store host (``is_master=True``,
    rank 0) creates the keys; the others connect and wait for ``ready`` (a TCPStore client
    retries the connection for ``timeout``, so start order does not matter). Methods use the
    calling thread's own client; threads that block (the watchdog) take ``client()``."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, run_id: str,
                 is_master: bool, timeout: float = 30.0):
        from torch.distributed import TCPStore  # imported here: model/ side never needs torch
        self.host, self.port, self.rank, self.world_size = host, port, rank, world_size
        self.run_id, self.is_master = run_id, is_master
        self.timeout = timedelta(seconds=timeout)
        self._TCPStore = TCPStore
        self._local = threading.local()
        p = f"lockstep/{run_id}/"
        self.k_abort, self.k_ready = p + "abort", p + "ready"
        self.k_hb = [f"{p}hb/{r}" for r in range(world_size)]
        self.k_clean = [f"{p}clean/{r}" for r in range(world_size)]
        if is_master:
            store = TCPStore(host, port, world_size, True, timeout=self.timeout,
                             wait_for_workers=False)
            store.set(self.k_abort, "")
            for k in self.k_hb:
                store.set(k, "0")
            store.set(self.k_ready, "1")
        else:
            store = self.client()
            store.wait([self.k_ready])
        self._local.store = store
        self._master_store = store if is_master else None  # keeps the server alive
        self.watchdogs: list[Watchdog] = []
        global _ACTIVE
        _ACTIVE = self

    # -- clients -------------------------------------------------------------------------
    def client(self, timeout: float | None = None):
        """A NEW TCPStore client connection (one per thread, never shared)."""
        t = self.timeout if timeout is None else timedelta(seconds=timeout)
        return self._TCPStore(self.host, self.port, None, False, timeout=t)

    def _store(self):
        s = getattr(self._local, "store", None)
        if s is None:
            s = self._local.store = self.client()
        return s

    # -- abort flag ----------------------------------------------------------------------
    def set_abort(self, reason: str) -> str:
        """Set the abort flag unless already set; returns the reason that is in force."""
        return self.set_abort_with(self._store(), reason)

    def set_abort_with(self, store, reason: str) -> str:
        """``set_abort`` through an explicit client (the watchdog uses its own)."""
        return store.compare_set(self.k_abort, "", self.abort_text(reason)).decode(
            errors="replace")

    def abort_text(self, reason: str) -> str:
        """The flag's value for a reason set by this rank: ``rank=R role=ROLE: reason``."""
        return one_line(f"rank={self.rank} role={get_role()}: {reason}")

    def abort_reason(self) -> str | None:
        v = self._store().get(self.k_abort)
        return v.decode(errors="replace") if v else None

    # -- clean exit ----------------------------------------------------------------------
    def mark_clean_exit(self) -> None:
        self._store().set(self.k_clean[self.rank], "1")

    def wait_all_clean(self, timeout: float, ranks=None) -> list[int]:
        """Wait (polling, <= ``timeout``) until ``ranks`` (default: all others) have marked a
        clean exit or the abort flag is set; returns the ranks that did not. The store host
        calls this before exiting so it does not pull the store from under the others."""
        ranks = [r for r in range(self.world_size) if r != self.rank] if ranks is None else ranks
        s, end = self._store(), time.monotonic() + timeout
        while True:
            missing = [r for r in ranks if not s.check([self.k_clean[r]])]
            if not missing or self.abort_reason() or time.monotonic() >= end:
                return missing
            time.sleep(0.01)


class Watchdog(threading.Thread):
    """Per-rank release thread. Beats ``hb/<rank>`` every ``heartbeat_s`` with its own
    client and releases the process (``on_release(reason)`` then ``os._exit(exit_code)``)
    when: the abort flag is set; a peer's beat has not advanced for ``lost_after_s`` and the
    peer has no clean-exit mark (the watchdog first sets the abort flag naming that peer, so
    every survivor reports the same root cause); or the store is unreachable.

    ``poll()`` returns the release reason once decided (cheap, local): pass it as
    ``GuardedComm(abort_poll=...)``. ``exit_code=None`` disables the ``os._exit`` (tests,
    or an NCCL runtime that prefers an in-process abort); ``on_release`` still runs.
    A ``release_grace_s`` timer forces the exit if ``on_release`` itself blocks.

    ``lost_after_s`` must exceed the longest time this process can hold the GIL in one
    stretch (the beat runs in a Python thread): pure Python switches every 5 ms and torch
    ops release the GIL, so 0.5 s has margin; measured kill -9 -> all released ~0.55-0.6 s
    on 2 cores when the heartbeat is the only path (no gloo pair to the dead rank).
    """

    def __init__(self, side: SideChannel, on_release: Callable[[str], None] | None = None, *,
                 heartbeat_s: float = 0.05, lost_after_s: float = 0.5, startup_s: float = 60.0,
                 exit_code: int | None = EXIT_RELEASED, release_grace_s: float = 0.5,
                 watch: list[int] | None = None, host_grace_s: float | None = None):
        super().__init__(daemon=True, name=f"lockstep-watchdog-{side.rank}")
        self.side = side
        self.on_release = on_release
        self.heartbeat_s, self.lost_after_s, self.startup_s = heartbeat_s, lost_after_s, startup_s
        self.exit_code, self.release_grace_s = exit_code, release_grace_s
        self.host_grace_s = 2 * heartbeat_s if host_grace_s is None else host_grace_s
        self.peers = [r for r in (range(side.world_size) if watch is None else watch)
                      if r != side.rank]
        self._stop_ev = threading.Event()
        self._reason: str | None = None
        self.ticks = 0
        self.started_at = 0.0
        # The client is made here (caller's thread) so a dead store fails loudly at start.
        # It is used only by the watchdog thread from then on.
        self._client = side.client(timeout=max(1.0, 4 * lost_after_s))
        self._client.add(side.k_hb[side.rank], 1)
        side.watchdogs.append(self)

    def poll(self) -> str | None:
        return self._reason

    def stop(self, timeout: float = 2.0) -> None:
        """Normal shutdown: stop beating and watching. Call before ``mark_clean_exit``."""
        self._stop_ev.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)

    def run(self) -> None:
        self.started_at = time.monotonic()
        s, sc = self._client, self.side
        keys = [sc.k_abort] + [sc.k_hb[p] for p in self.peers]
        last = {p: None for p in self.peers}     # last counter value seen
        changed = {p: self.started_at for p in self.peers}
        gone: set[int] = set()                    # peers with a clean-exit mark
        try:
            while not self._stop_ev.is_set():
                s.add(sc.k_hb[sc.rank], 1)
                vals = s.multi_get(keys)
                if self._stop_ev.is_set():
                    return
                if vals[0]:
                    return self._release(f"abort flag: {vals[0].decode(errors='replace')}")
                now = time.monotonic()
                for p, v in zip(self.peers, vals[1:]):
                    if p in gone:
                        continue
                    if v != last[p]:
                        last[p], changed[p] = v, now
                        continue
                    started = v not in (b"0", b"")
                    limit = self.lost_after_s if started else self.startup_s
                    if now - changed[p] > limit:
                        if s.check([sc.k_clean[p]]):
                            gone.add(p)
                            continue
                        what = (f"heartbeat of rank {p} stalled {now - changed[p]:.2f}s "
                                f"(> lost_after_s={self.lost_after_s})" if started else
                                f"rank {p} never started its watchdog within {self.startup_s}s")
                        reason = f"peer lost: {what}"
                        try:
                            first = sc.set_abort_with(s, reason)
                            if first != sc.abort_text(reason):  # someone else was first
                                reason = f"abort flag: {first}"
                            if sc.is_master:  # let peers read the flag before the store dies
                                time.sleep(self.host_grace_s)
                        except Exception:
                            pass
                        return self._release(reason)
                self.ticks += 1
                self._stop_ev.wait(self.heartbeat_s)
        except Exception as e:  # noqa: BLE001 - store gone (host died) or broken
            if self._stop_ev.is_set():
                return
            self._release(f"side-channel store {sc.host}:{sc.port} unreachable "
                          f"(store host rank 0 gone?): {type(e).__name__}: {one_line(e, 160)}")

    def _release(self, reason: str) -> None:
        self._reason = reason
        if self.exit_code is not None:
            killer = threading.Timer(self.release_grace_s, os._exit, args=(self.exit_code,))
            killer.daemon = True
            killer.start()
        try:
            if self.on_release is not None:
                self.on_release(reason)
            else:
                sys.stderr.write(exit_line("released", reason, self.side.rank) + "\n")
        except Exception:
            pass
        if self.exit_code is not None:
            for f in (sys.stdout, sys.stderr):
                try:
                    f.flush()
                except Exception:
                    pass
            os._exit(self.exit_code)

