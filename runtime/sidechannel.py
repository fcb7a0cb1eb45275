"""The crash > hang side channel: an abort flag, heartbeats and clean-exit marks on a c10d
TCPStore, plus the per-rank ``Watchdog`` thread that turns any of them into ``os._exit``.

Why a side channel at all (FACTS.md): nothing called from another thread releases a blocked
gloo recv/broadcast -- ``destroy_process_group``, ``abort()``, ``shutdown()`` all return and
the call stays blocked. A live peer that never sends blocks a recv until the backend
timeout. So a rank that fails must tell everyone out of band, and every rank needs a thread
that can end its own process from outside the blocked call: ``os._exit``.

Layout (all keys under ``lockstep/<run_id>/``):
  ``abort``     "" until someone fails; then the CAUSE of the FIRST setter, canonical JSON
                (model/release.py: kind, origin rank/role, call_id, chunk_index,
                cache_epoch, group, detail), set with ``compare_set("", cause)``: the root
                cause wins, later setters read it back and never overwrite it
  ``hb/<r>``    rank r's heartbeat counter (``add(key, 1)`` every ``heartbeat_s``)
  ``clean/<r>`` set when rank r exits on purpose: a silent heartbeat is then not a fault
  ``role/<r>``  rank r's role, so a cause written by someone else (launcher, a peer's
                watchdog) names it
  ``cause``     the ROOT CAUSE, first-cause-wins like ``abort`` but releasing nobody:
                every setter writes ``cause`` first and then copies what won into
                ``abort`` (``set_abort_with``), so both always agree. A rank that exits
                after sending a terminal message records only ``cause`` (``record_cause``):
                echoes can name it at once, while the flag must not release a peer that
                has not read the message yet (``linger_then_release``)
  ``exit/<r>``  set when rank r enters its exit path (it will read nothing more) and by
                the launcher when it reaps r: a rank that sent a terminal message keeps
                its process, and so its gloo pairs, alive until every peer has one
  ``wait/<r>``  "" or ``GROUP NUMBER NAME``: the collective rank r's threads have waited
                in for ``STUCK_AFTER_S`` or longer, then ``NUMBER NAME`` lines of the
                ones it issued before on that group (``Transport.stuck_collective``);
                members under different names at one number issued different
                collectives: every watchdog compares them (``collective_mismatch``);
                the odd one out (alone in its collective there, every other member in
                one other; with two members, the one whose generator call deviates
                from its own earlier ones: a last ``extra``/``short`` line) names
                itself as the root cause, or the first to see it
                sets the flag once ``ODD_ONE_OUT_S`` has passed (naming the odd one out
                when the waits tell who it is)
  ``owner/<r>`` "pid P on HOST" of the process that holds RANK r (first claim wins): a
                second process started with that RANK fails (``duplicate_rank``), and no
                rank enters a process group before every rank has claimed
Every rank creates the keys idempotently (``compare_set(abort, "", "")``, ``add(hb, 0)``),
so no rank has to come first and no "ready" handshake is needed.

Where the store lives (the side channel outlives every rank, ARCHITECTURE.md):
  * embedded launcher (runtime/launch.py ``LocalRun``): the PARENT hosts the TCPStore
    server before starting the ranks and passes ``LOCKSTEP_SIDE_ADDR``/``LOCKSTEP_SIDE_PORT``;
    it also records a child killed by a signal (kind ``killed``) the moment it reaps it.
  * torchrun with ``TORCHELASTIC_USE_AGENT_STORE=True`` (static and c10d rendezvous, the
    default): the store torchrun's agent already hosts at ``MASTER_ADDR:MASTER_PORT``;
    keys are prefixed ``lockstep/<TORCHELASTIC_RUN_ID>/attempt_<TORCHELASTIC_RESTART_COUNT>/``
    so a restarted attempt starts with a clear flag. The agent records no kills: a
    kill -9 is named by the heartbeat path (kind ``heartbeat_lost``).
  * any other launcher (plain env://): rank 0 hosts on ``LOCKSTEP_SIDE_PORT`` or
    ``MASTER_PORT+1`` (``hosts_store=True``), the one case where a rank's death takes the
    flag down; that rank then waits for the others' clean marks before exiting, and a lost
    store is reported as such (via ``store_lost``), never as a normal release.

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
import socket
import sys
import threading
import time
from datetime import timedelta
from typing import Callable, NamedTuple

from lockstep.model import release as R
from lockstep.runtime.worker_main import (EXIT_ERROR, EXIT_RELEASED, cause_line, claim_exit,
                                          get_role, one_line)

_ACTIVE: "SideChannel | None" = None  # the process's side channel, for worker_main's error path


def abort_active(mine: dict, echo: bool = False, grace_s: float | None = None,
                 limit_s: float = 0.3, release: bool = True) -> tuple[dict | None, str]:
    """For a process exiting on an error: stop this process's watchdogs (the caller writes
    the one exit line) and settle the root cause. Returns ``(cause in force, via)``.

    Not an echo: set the flag to ``mine`` (first-cause-wins); ``via`` is ``own`` if ours won,
    else ``abort_flag`` (someone failed earlier: that is the root cause). An echo (a peer's
    disappearance): wait up to ``grace_s`` (default ``echo_grace_s``) for the flag, then
    ``via=echo``; if still clear, claim it with ``mine`` marked as an echo. Every store call
    is bounded by ``limit_s`` (a thread of its own: a dead store would retry for the whole
    store timeout). ``release=False`` (a table exit after a terminal message) records the
    cause without setting the flag: the caller lingers (``linger_then_release``) and the
    flag is set after the peers have read the message. ``(None, "own")`` without a side
    channel."""
    sc = _ACTIVE
    if sc is None:
        return None, "own"
    for wd in list(sc.watchdogs):
        wd._stop_ev.set()
    grace = sc.echo_grace_s if grace_s is None else grace_s
    box: list = []

    def settle():
        store = sc._store()
        put = sc.set_abort_with if release else (lambda st, c: sc.record_cause(c, st))
        if echo:
            c = sc.wait_cause(grace, store)
            if c is not None:
                box.append((c, "echo"))
                return
            m = dict(mine, detail="echo: " + mine["detail"])
            c = put(store, m)
            box.append((c, "echo" if c != m else "own"))
            return
        c = put(store, mine)
        box.append((c, "own" if c == mine else "abort_flag"))

    t = threading.Thread(target=settle, daemon=True)
    t.start()
    t.join(limit_s + (grace if echo else 0.0))
    if sc.hosts_store:   # env:// fallback only: the store dies with us
        if release:      # every peer reads the flag (its exit mark says so) first
            try:
                sc.wait_peers_left(sc.host_wait_s)
            except Exception:  # noqa: BLE001 - our own store: nothing more to do
                pass
        else:            # the caller lingers (linger_then_release), then waits the same
            time.sleep(0.1)
    return box[0] if box else (None, "store_lost")


def host_wait_s(lost_after_s: float) -> float:
    """How long a rank hosting the side store (plain env://) waits at most for its peers'
    exit marks before it exits and takes the store with it: two heartbeat-loss periods,
    at least 1 s. A peer released by the same flag marks its exit within a heartbeat
    period; one that never marks is dead, and the bound ends the wait for it. Every
    wait of the host (its watchdog's release, an error exit, the linger after a
    terminal message) uses this one bound."""
    return max(1.0, 2 * lost_after_s)


class SideChannel:
    """One rank's handle on the run's side channel: a CLIENT of a store hosted outside the
    ranks (``hosts_store=False``), except under a plain env:// launcher where rank 0 hosts
    it. Methods use the calling thread's own client; threads that block (the watchdog)
    take ``client()``. ``lost_after_s`` is the run's heartbeat-loss period: an echo waits
    ``echo_grace_s`` (that, and 0.1 s) for a root cause, and a rank hosting the store waits
    ``host_wait_s`` at most for its peers' exit marks before it exits."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, run_id: str,
                 hosts_store: bool = False, timeout: float = 30.0,
                 lost_after_s: float = 0.5, connect_s: float | None = None,
                 where: str = "LOCKSTEP_SIDE_ADDR:LOCKSTEP_SIDE_PORT"):
        from torch.distributed import TCPStore  # imported here: model/ side never needs torch
        self.host, self.port, self.rank, self.world_size = host, port, rank, world_size
        self.run_id, self.hosts_store = run_id, hosts_store
        # an echo waits one heartbeat-loss period, and a margin, for the root cause
        self.echo_grace_s = lost_after_s + 0.1
        self.host_wait_s = host_wait_s(lost_after_s)
        self.timeout = timedelta(seconds=timeout)
        self._TCPStore = TCPStore
        self._local = threading.local()
        p = f"lockstep/{run_id}/"
        self.k_abort = p + "abort"
        self.k_cause = p + "cause"
        self.k_exit = [f"{p}exit/{r}" for r in range(world_size)]
        self.k_hb = [f"{p}hb/{r}" for r in range(world_size)]
        self.k_clean = [f"{p}clean/{r}" for r in range(world_size)]
        self._left: set = set()     # ranks known to have an exit or clean mark
        self.k_role = [f"{p}role/{r}" for r in range(world_size)]
        self.k_wait = [f"{p}wait/{r}" for r in range(world_size)]
        self.k_owner = [f"{p}owner/{r}" for r in range(world_size)]
        self.where = where      # the variables that named the store's address, for people
        self.owns_rank = False  # this process holds owner/<rank> (``_claim_rank``)
        store = None
        if hosts_store:
            try:
                store = TCPStore(host, port, world_size, True, timeout=self.timeout,
                                 wait_for_workers=False)
            except Exception as e:  # noqa: BLE001 - the port is taken: by a second rank 0?
                if not _in_use(e):
                    raise
                self.hosts_store = False    # then the owner claim below names it
        if store is None:
            try:
                store = self._first_client(connect_s)
            except Exception as e:  # noqa: BLE001 - named below, or as it was
                if not hosts_store:
                    raise
                # not a second rank 0's store answers there: something else has the port
                raise StoreUnreachable(f"{_port_taken(self.where, host, port)}; dialling "
                                       f"it as a store: {type(e).__name__}: "
                                       f"{one_line(e, 160)}") from None
        init_keys(store, run_id, world_size)
        store.set(self.k_role[rank], get_role())
        self._local.store = store
        self._host_store = store if self.hosts_store else None  # keeps the server alive
        self.watchdogs: list[Watchdog] = []
        global _ACTIVE
        _ACTIVE = self
        self._claim_rank(store, port_taken=hosts_store and not self.hosts_store)

    @classmethod
    def from_env(cls, env, timeout: float = 30.0, lost_after_s: float = 0.5):
        """The side channel a ``DistEnv`` (runtime/launch.py ``dist_env``) points at."""
        return cls(env.side_addr, env.side_port, env.rank, env.world_size, env.side_prefix,
                   hosts_store=env.side_host == "rank0" and env.rank == 0, timeout=timeout,
                   lost_after_s=lost_after_s, connect_s=connect_bound(env),
                   where=_store_names(env))

    def _first_client(self, connect_s: float | None):
        """The first connection, bounded by ``connect_s`` (``connect_bound``): a store
        address that resolves but does not answer fails in one line, not after the whole
        store timeout. Later connections find the store up and use ``timeout``."""
        bound = self.timeout.total_seconds() if connect_s is None else connect_s
        end = time.monotonic() + bound
        # Our own probe every 0.1 s until something listens: torch's client backs off
        # between refused attempts (seen: 5.7 s after the server came up; a rank still
        # dialling missed a whole run of its peers), and its failure is a C++ backtrace
        # on stderr.
        while True:
            try:
                socket.create_connection((self.host, self.port),
                                         timeout=max(0.05, min(1.0, end - time.monotonic()))
                                         ).close()
                break
            except OSError as e:
                if time.monotonic() >= end:
                    raise StoreUnreachable(
                        f"cannot reach {self.where} = {self.host}:{self.port} (the side "
                        f"store) within {bound:g} s ({CONNECT_ENV}): is the rank or "
                        f"launcher that hosts it up, and is the address its own? "
                        f"{type(e).__name__}: {one_line(e, 160)}") from None
            time.sleep(0.1)
        store = self.client(timeout=max(1.0, end - time.monotonic()))
        store.set_timeout(self.timeout)
        return store

    def _claim_rank(self, store, port_taken: bool = False) -> None:
        """Claim ``owner/<rank>`` for this process (first claim wins). A second process
        with the same RANK (a copy-paste error in a launch script) finds it held and raises
        ``DuplicateRank`` naming both processes: it leaves with one line and sets the flag
        to a ``duplicate_rank`` cause (worker_main.error_exit); the holder exits with an
        error naming the same cause (``release.started_twice``) and every other rank is
        released at once. The claim is made before any process group is touched, and no
        rank enters one before every rank has claimed (``wait_all_claimed``): a duplicate
        never reaches torch's rendezvous, where it broke the run in ways that depended on
        timing. The loser writes no key of the rank it does not own (``mark_exit``)."""
        me = f"pid {os.getpid()} on {socket.gethostname()}"
        holder = _text(store.compare_set(self.k_owner[self.rank], "", me))
        self.owns_rank = holder == me
        if holder == me:
            if port_taken:      # no other process claims rank 0: something else has the port
                raise StoreUnreachable(_port_taken(self.where, self.host, self.port))
            return
        # the error path (worker_main.error_exit, kind by classify) sets the flag
        raise DuplicateRank(f"RANK={self.rank} started twice: {holder} holds it, {me} is a "
                            "second one; every rank stops")

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
    def cause(self, kind: str, detail: str, **ids) -> dict:
        """A cause originating in this rank."""
        return R.cause(kind, self.rank, get_role(), detail, **ids)

    def set_abort(self, cause: dict) -> dict:
        """Set the abort flag unless already set; returns the cause in force."""
        return self.set_abort_with(self._store(), cause)

    def set_abort_with(self, store, cause: dict) -> dict:
        """``set_abort`` through an explicit client (the watchdog uses its own): the root
        cause (first in ``cause``) is copied into the flag, so the flag names it."""
        return set_first_cause(store, self.k_cause, self.k_abort, cause)

    def record_cause(self, cause: dict, store=None) -> dict:
        """First-cause-wins on ``cause`` only: names the root cause without releasing
        anyone (the flag stays clear). Returns the cause in force."""
        return R.decode((store or self._store()).compare_set(self.k_cause, "",
                                                             R.encode(cause)))

    def mark_exit(self, store=None) -> None:
        """This rank is in its exit path: it will read nothing more. Only the process that
        owns the rank marks it: a second process started with the same RANK marking it
        told the store's host (rank 0 under env://) that the holder had read the flag, and
        the host closed the store before it had (the holder then ended via store_lost)."""
        if self.owns_rank:
            (store or self._store()).set(self.k_exit[self.rank], "1")

    def wait_all_claimed(self, timeout_s: float) -> bool:
        """Before any process group: wait until every rank of the world has claimed its
        RANK (True), or the flag is set (False: this process's watchdog is releasing it).
        A second process with a taken RANK is then found while every rank is still
        outside torch's rendezvous, where a peer's exit surfaced as an echo of a closed
        connection racing the watchdog's read of the cause. Raises after ``timeout_s``
        (the process group's own rendezvous bound) naming the ranks that never claimed."""
        store, end = self._store(), time.monotonic() + timeout_s
        while not store.check(self.k_owner):
            if self.abort_cause(store) is not None:
                return False
            if time.monotonic() >= end:
                missing = [r for r in range(self.world_size)
                           if not store.check([self.k_owner[r]])]
                raise RuntimeError(f"ranks {missing} did not start within {timeout_s:g} s "
                                   "(pg_timeout_s): no rank enters a process group before "
                                   f"all {self.world_size} have claimed their RANK")
            time.sleep(0.01)
        return True

    def linger_then_release(self, limit_s: float, store=None) -> list[int]:
        """After a terminal message: keep this process (and its gloo pairs) alive until
        every peer has an exit or clean mark, the flag is set by someone else, or
        ``limit_s``; beat meanwhile (the watchdog is stopped, and a silent beat would make
        a peer name this rank as the cause); then copy the root cause into the flag (it
        releases only peers still blocked elsewhere). Returns the peers that had no mark.
        Why: a gloo send completes before the peer has read it, and a process that exits
        closes its pairs, so the peer's receive of the message fails with a reset."""
        store = store or self._store()
        peers = [r for r in range(self.world_size) if r != self.rank]
        end, beat = time.monotonic() + limit_s, 0.0
        while True:
            vals = store.multi_get([self.k_abort] + [self.k_exit[r] for r in peers])
            missing = [r for r, v in zip(peers, vals[1:])
                       if not v and not store.check([self.k_clean[r]])]
            now = time.monotonic()
            if not missing or vals[0] or now >= end:
                break
            if now - beat >= 0.05:
                store.add(self.k_hb[self.rank], 1)
                beat = now
            time.sleep(0.005)
        first = _text(store.get(self.k_cause))
        if first:
            store.compare_set(self.k_abort, "", first)
        if self.hosts_store:     # the flag releases the rest: let them read it
            self.wait_peers_left(limit_s, store)
        return missing

    def wait_peers_left(self, limit_s: float, store=None, until_abort: bool = False) -> list:
        """Wait (polling, <= ``limit_s``) until every peer has an exit mark (it reads
        nothing more from the store; a clean mark alone is not that: the peer may still
        poll for the others' in ``wait_all_clean``), or, with ``until_abort``, the flag
        is set; returns the peers that had none. The rank that hosts the store (env://
        fallback) calls it before it exits, on every path: a peer whose watchdog has not
        yet read the flag, or whose receive failed when our pairs closed (an echo, which
        then waits for the cause), otherwise finds the store gone and ends
        ``via=store_lost`` with no root cause (3 of 6 plain env:// runs whose worker
        failed, before).
        """
        s = store or self._store()
        peers = [r for r in range(self.world_size) if r != self.rank]
        end = time.monotonic() + limit_s
        while True:
            missing = [r for r in peers if not s.check([self.k_exit[r]])]
            if not missing or time.monotonic() >= end or \
                    (until_abort and self.abort_cause(s)):
                return missing
            time.sleep(0.01)

    def abort_cause(self, store=None) -> dict | None:
        return R.decode((store or self._store()).get(self.k_abort))

    def root_cause(self, store=None) -> dict | None:
        """The root cause, released (flag) or only recorded (``cause``)."""
        vals = (store or self._store()).multi_get([self.k_abort, self.k_cause])
        return R.decode(vals[0] or vals[1])

    def wait_cause(self, grace_s: float, store=None) -> dict | None:
        """Poll the flag for up to ``grace_s``; the cause, or None if it stayed clear. Beats
        this rank's heartbeat meanwhile (its watchdog is stopped): a rank waiting for the
        root cause is alive, and a silent beat would make a peer name *it* as the cause."""
        store = store or self._store()
        end, beat = time.monotonic() + grace_s, 0.0
        while True:
            c = self.root_cause(store)
            now = time.monotonic()
            if c is not None or now >= end:
                return c
            if now - beat >= 0.05:
                store.add(self.k_hb[self.rank], 1)
                beat = now
            time.sleep(0.005)

    def peer_left(self, rank: int, store=None) -> bool:
        """``rank`` has an exit or clean mark: it is leaving and sends nothing more. An
        unreachable store counts as left (under the env:// fallback its host is rank0)."""
        if rank in self._left:
            return True
        try:
            s = store or self._store()
            left = s.check([self.k_exit[rank]]) or s.check([self.k_clean[rank]])
        except Exception:  # noqa: BLE001 - the store's host is gone
            left = True
        if left:
            self._left.add(rank)
        return left

    def peer_role(self, rank: int, store=None) -> str:
        return peer_role(store or self._store(), self.k_role[rank], rank)

    # -- clean exit ----------------------------------------------------------------------
    def mark_clean_exit(self) -> None:
        self._store().set(self.k_clean[self.rank], "1")

    def leave(self, timeout: float) -> None:
        """A clean exit's last read of the store is done: mark it (``exit/<r>``). The rank
        that hosts the store (env:// fallback) then keeps it up until every peer has left
        too, the flag is set, or ``timeout``: it used to go as soon as it saw the last
        clean mark, and a peer still polling in its own ``wait_all_clean`` read a closed
        store and ended a clean run as an error (via store_lost, connection reset)."""
        s = self._store()
        s.set(self.k_exit[self.rank], "1")
        if self.hosts_store:
            self.wait_peers_left(timeout, s, until_abort=True)

    def wait_all_clean(self, timeout: float, ranks=None) -> list[int]:
        """Wait (polling, <= ``timeout``) until ``ranks`` (default: all others) have marked a
        clean exit or the abort flag is set; returns the ranks that did not. Only a rank
        that exits cleanly waits for it: its connections (and under the env:// fallback its
        store) must outlive the peers' last reads."""
        ranks = [r for r in range(self.world_size) if r != self.rank] if ranks is None else ranks
        # (an exit mark counts too: that peer reads nothing more)
        s, end = self._store(), time.monotonic() + timeout
        while True:
            missing = [r for r in ranks if not s.check([self.k_clean[r]])
                       and not s.check([self.k_exit[r]])]
            if not missing or self.abort_cause() or time.monotonic() >= end:
                return missing
            time.sleep(0.01)


CONNECT_ENV = "LOCKSTEP_CONNECT_TIMEOUT_S"


def connect_bound(env) -> float:
    """Seconds a rank waits for the side store to answer its first connect
    (``$LOCKSTEP_CONNECT_TIMEOUT_S``). Short (5 s) where the store exists before any rank
    starts: the lockstep launcher's, torchrun's agent store, and rank 0's own. Long
    (30 s) for the other ranks of a plain env:// launch, where rank 0 hosts it: they
    legitimately wait for a rank 0 that starts late (another node's launch script,
    importing torch on a loaded node takes seconds), and a refused connection there looks
    exactly like a rank 0 not up yet."""
    raw = os.environ.get(CONNECT_ENV, "")
    if raw:
        try:
            v = float(raw)
        except ValueError:
            v = -1.0
        if not v > 0:
            raise ValueError(f"{CONNECT_ENV}={raw!r}: not a positive number of seconds")
        return v
    return 30.0 if env.side_host == "rank0" and env.rank != 0 else 5.0


def _store_names(env) -> str:
    """Which variables name the side store's address: what to fix when it is wrong."""
    if env.side_host == "agent":
        return "MASTER_ADDR:MASTER_PORT"
    if env.side_host == "launcher":
        return "LOCKSTEP_SIDE_ADDR:LOCKSTEP_SIDE_PORT"
    port = "MASTER_PORT+1" if env.side_port == env.master_port + 1 else "LOCKSTEP_SIDE_PORT"
    return f"MASTER_ADDR:{port}"


class StoreUnreachable(RuntimeError):
    """The side store did not answer within ``connect_bound``."""


class DuplicateRank(RuntimeError):
    """A second process claimed a RANK another process of the run already holds."""


def _port_taken(where: str, host: str, port: int) -> str:
    return (f"rank 0 cannot host the side store on {where} = {host}:{port}: the port is "
            f"in use by another process (set LOCKSTEP_SIDE_PORT to a free port, the same "
            f"on every rank; the default is MASTER_PORT+1)")


def _in_use(e: BaseException) -> bool:
    return "address already in use" in str(e).lower() or "errno 98" in str(e).lower()


def _text(raw) -> str:
    """A store value as text (a foreign or torn value is text too, never an exception
    out of the watchdog, which would read as the store lost)."""
    if isinstance(raw, (bytes, bytearray)):
        return raw.decode(errors="replace")
    return raw or ""


def set_first_cause(store, k_cause: str, k_abort: str, cause: dict) -> dict:
    """First-cause-wins on ``cause``, then the winner into the flag ``abort`` (which
    releases every watchdog). Returns the root cause in force."""
    first = _text(store.compare_set(k_cause, "", R.encode(cause)))
    return R.decode(store.compare_set(k_abort, "", first))


def init_keys(store, run_id: str, world_size: int) -> None:
    """Create the flag and heartbeat keys if missing (idempotent: any order of callers)."""
    p = f"lockstep/{run_id}/"
    store.compare_set(p + "abort", "", "")
    store.compare_set(p + "cause", "", "")
    for r in range(world_size):
        store.add(f"{p}hb/{r}", 0)
        store.compare_set(f"{p}wait/{r}", "", "")


# A collective waited on this long is published (``wait/<r>``). Only how soon a mismatch
# is seen depends on it, never whether: in a run whose members issue the same collectives,
# no two of them have different names at one number of a group, however long either
# waits. A correct run publishes only its long waits (a slow Phase A): two
# store writes each.
STUCK_AFTER_S = 0.25
# A watchdog that sees a mismatch lets the odd one out name itself (its cause, its ids,
# its exit line via=own), and waits for every member's wait to tell who that is, this
# long at most after it first saw the mismatch; then it sets the flag itself (naming
# the odd one out when it is known, else itself, the one that saw it).
ODD_ONE_OUT_S = 0.5


class Mismatch(NamedTuple):
    """Collectives of one number under different names on one group (``collective_mismatch``).

    ``odd``: the one member that issued, at that number, a collective none of the others
    issued there, every other member having issued the same one (at least two of them):
    the member with the extra collective, or the skipped one; where no member is alone
    (two members, a tie), the one member whose own generator calls deviate from its
    earlier ones (``Transport.CallCounts``). None when neither tells, or some member's
    name there is not known yet. ``complete``: every member's name there is known (only
    with the group's size)."""
    group: str
    words: str
    odd: int | None
    complete: bool


def collective_mismatch(waits: dict, sizes: dict | None = None) -> Mismatch | None:
    """The mismatch among published waits (rank -> ``Transport.stuck_collective``'s text:
    ``"GROUP NUMBER NAME"``, then ``"NUMBER NAME"`` lines of the collectives it issued
    before on that group; or ""), or None. A mismatch is two members of a group under
    different names at one number, one of them waiting there: a rank that issued an
    extra collective, or skipped one, waits in one its peers never issue at that place,
    and they in one it has passed or not reached, each side until its op's deadline (a
    broadcast's receiver may have gone on to the next one: its earlier lines say what it
    issued). ``sizes`` (group -> member count) tells when every member's name at that
    number is known, and so whether one of them is the odd one out. Where no member is
    alone against the others (two members, a tie), a member whose value ends with its
    own evidence (``"extra C M N"`` / ``"short C M N"``: its generator call C went past,
    or ended short of, what each of its earlier calls C issued) is the odd one out, when
    it is the only one. Values that do not parse are ignored (a torn or foreign value is
    no evidence)."""
    named: dict = {}      # (group, number) -> {rank: name}
    at: dict = {}         # rank -> the (group, number) it waits at
    own: dict = {}        # rank -> its own evidence (Transport.CallCounts.evidence)
    for r, text in sorted(waits.items()):
        lines = text.split("\n") if text else ()
        head = lines[0].split(" ", 2) if lines else ()
        if len(head) != 3 or not head[1].isdigit():
            continue
        group = head[0]
        at[r] = (group, int(head[1]))
        named.setdefault(at[r], {})[r] = head[2]
        for line in lines[1:]:
            k, _, name = line.partition(" ")
            if k.isdigit() and name:
                named.setdefault((group, int(k)), {})[r] = name
            elif k in ("extra", "short"):
                nums = name.split(" ")
                if len(nums) == 3 and all(x.isdigit() for x in nums):
                    own[r] = (k, *map(int, nums))
    for key in sorted(set(at.values())):
        group, number = key
        who = sorted(named[key].items())
        names = {name for _, name in who}
        if len(names) < 2:
            continue
        sides = ", ".join(f"rank {r} {'in' if at[r] == key else 'issued'} {name}"
                          for r, name in who)
        complete = sizes is not None and len(who) == sizes.get(group, -1)
        odd = None
        if complete and len(names) == 2 and len(who) >= 3:
            alone = [r for r, name in who if sum(n == name for _, n in who) == 1]
            if len(alone) == 1:
                odd = alone[0]
        deviating = [r for r, _ in who if r in own]
        if odd is None and len(deviating) == 1:
            # no vote (two members, a tie): the one member whose generator calls differ
            # from its own earlier calls with the same index is the wrong side
            odd = deviating[0]
        if odd in own:          # its own counts say what it did, whoever named it
            kind, c, m, n = own[odd]
            why = (f"rank {odd} issued an extra collective: its generator_call"
                   f"(call_index={c}) is at collective #{m}, where each of its earlier "
                   f"calls with that index issued {n}" if kind == "extra" else
                   f"rank {odd} skipped a collective: its last generator_call"
                   f"(call_index={c}) issued {m}, where each of its earlier calls with "
                   f"that index issued {n}")
        elif odd is not None:
            why = (f"rank {odd} issued an extra collective or skipped one: every other "
                   f"member issued the same one")
        else:
            why = "a rank issued an extra collective or skipped one"
        return Mismatch(group, f"collective mismatch on {group} at its collective "
                               f"#{number}: {sides} ({why})", odd, complete)
    return None


def peer_role(store, key: str, rank: int) -> str:
    """A rank's registered role, else the lockstep convention (model/release.py)."""
    try:
        if store.check([key]):
            v = store.get(key).decode(errors="replace")
            if v and v != "?":
                return v
    except Exception:  # noqa: BLE001 - a name is a nicety, never a reason to hang
        pass
    return R.role_of(rank)


class Watchdog(threading.Thread):
    """Per-rank release thread. Beats ``hb/<rank>`` every ``heartbeat_s`` with its own
    client and releases the process (``on_release(cause, via, kind=...)`` then
    ``os._exit(exit_code)``; kind ``error`` and exit 1 instead where the cause names this
    process's RANK as started twice) when: the abort flag is set (``via=abort_flag``); a
    peer's beat has not advanced for ``lost_after_s`` and the peer has no clean-exit mark
    (the watchdog
    first sets the flag to a ``heartbeat_lost`` cause naming the SILENT peer, so every
    survivor reports the same root cause; ``via=heartbeat`` if it won); or the store is
    unreachable (``via=store_lost``: only possible when a rank hosts the store, or the
    launcher itself died, which PR_SET_PDEATHSIG turns into a kill of every rank).

    ``poll()`` returns the release reason text once decided (cheap, local): pass it as
    ``Transport(abort_poll=...)``; ``cause`` holds the structured cause. ``exit_code=None``
    disables the ``os._exit`` (tests, or an NCCL runtime that prefers an in-process abort);
    ``on_release`` still runs. A ``release_grace_s`` timer forces the exit if
    ``on_release`` itself blocks. Only the first of the process's exit paths writes a line
    (``worker_main.claim_exit``).

    ``lost_after_s`` must exceed the longest time this process can hold the GIL in one
    stretch (the beat runs in a Python thread) and the longest time the OS leaves it
    unscheduled: pure Python switches every 5 ms and torch ops release the GIL, but 5 ranks
    on 2 loaded cores were seen stalling 0.5 s, so runs default to 1.0 s (RunOptions).
    Measured kill -9 -> all released ~0.55-0.6 s at 0.5 s when the heartbeat is the only
    path (no launcher record, no gloo pair); with the embedded launcher it never is.
    """

    def __init__(self, side: SideChannel, on_release: Callable[..., None] | None = None,
                 *, heartbeat_s: float = 0.05, lost_after_s: float = 0.5, startup_s: float = 60.0,
                 exit_code: int | None = EXIT_RELEASED, release_grace_s: float = 0.5,
                 watch: list[int] | None = None):
        super().__init__(daemon=True, name=f"lockstep-watchdog-{side.rank}")
        self.side = side
        self.on_release = on_release
        self.heartbeat_s, self.lost_after_s, self.startup_s = heartbeat_s, lost_after_s, startup_s
        self.exit_code, self.release_grace_s = exit_code, release_grace_s
        self.peers = [r for r in (range(side.world_size) if watch is None else watch)
                      if r != side.rank]
        # probe(after_s): this rank's collective waited on that long ("GROUP NUMBER
        # NAME", Transport.stuck_collective) or None; ids(): the cause's ids. Set once
        # the transport exists (runtime/node.py); until then nothing is published.
        self.probe: Callable[[float], str | None] | None = None
        # overdue(): a collective this rank left in flight on the stream and no thread
        # waits on, past the op deadline (Transport.overdue): the host is blocked
        # elsewhere (a workload's implicit sync), so no wait's deadline ever fires there
        self.overdue: Callable[[], str | None] | None = None
        self.ids: Callable[[], dict] = dict
        # group -> member count (the transport's groups): tells when every member's wait
        # is published, so the odd one out of a mismatch is known (collective_mismatch)
        self.group_sizes: dict = {}
        self._stop_ev = threading.Event()
        self._reason: str | None = None
        self.cause: dict | None = None
        self.via: str | None = None
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
        keys = [sc.k_abort] + [sc.k_hb[p] for p in self.peers] + \
            [sc.k_wait[p] for p in self.peers]
        npeers = len(self.peers)
        published = ""                            # our wait/<rank> value
        seen = 0.0                                # when we first saw a mismatch
        last = {p: None for p in self.peers}     # last counter value seen
        changed = {p: self.started_at for p in self.peers}
        gone: set[int] = set()                    # peers with a clean-exit mark
        try:
            while not self._stop_ev.is_set():
                s.add(sc.k_hb[sc.rank], 1)
                late = self.overdue() if self.overdue is not None else None
                if late:
                    return self._overdue(s, late)
                probe = self.probe
                if probe is not None:
                    stuck = probe(STUCK_AFTER_S) or ""
                    if stuck != published:
                        s.set(sc.k_wait[sc.rank], stuck)
                        published = stuck
                vals = s.multi_get(keys)
                if self._stop_ev.is_set():
                    return
                if vals[0]:
                    return self._release(R.decode(vals[0]), "abort_flag")
                if published:
                    waits = {p: _text(v) for p, v in zip(self.peers, vals[1 + npeers:])}
                    waits[sc.rank] = published
                    found = collective_mismatch(waits, self.group_sizes)
                    if found is not None:
                        seen = seen or time.monotonic()
                        late = time.monotonic() - seen >= ODD_ONE_OUT_S
                        known = found.complete or not self.group_sizes
                        if found.odd == sc.rank or late or (found.odd is None and known):
                            return self._mismatch(s, found)
                now = time.monotonic()
                for p, v in zip(self.peers, vals[1:1 + npeers]):
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
                        what = (f"heartbeat stalled {now - changed[p]:.2f}s "
                                f"(> lost_after_s={self.lost_after_s}), no clean-exit mark; "
                                f"seen by rank {sc.rank}" if started else
                                f"never started its watchdog within {self.startup_s}s; "
                                f"seen by rank {sc.rank}")
                        mine = R.cause("heartbeat_lost", p, sc.peer_role(p, s), what)
                        first = sc.set_abort_with(s, mine)
                        return self._release(first, "heartbeat" if first == mine
                                             else "abort_flag")
                self.ticks += 1
                self._stop_ev.wait(self.heartbeat_s)
        except Exception as e:  # noqa: BLE001 - store gone (host died) or broken
            if self._stop_ev.is_set():
                return
            self._release(R.cause("error", -1, "side-channel",
                                  f"store {sc.host}:{sc.port} unreachable: "
                                  f"{type(e).__name__}: {one_line(e, 160)}"), "store_lost")

    def _mismatch(self, s, found: Mismatch) -> None:
        """Set the flag to a ``collective_mismatch`` cause and release: naming the odd
        one out when the waits tell who it is (``via=own`` on that rank), else this rank,
        which saw it."""
        sc = self.side
        ids = {**self.ids(), "group": found.group}
        who = sc.rank if found.odd is None else found.odd
        role = get_role() if who == sc.rank else sc.peer_role(who, s)
        mine = R.cause("collective_mismatch", who, role,
                       f"{found.words}; seen by rank {sc.rank}", **ids)
        first = sc.set_abort_with(s, mine)
        return self._release(first, "own" if first == mine and who == sc.rank
                             else "abort_flag")

    def _overdue(self, s, line: str) -> None:
        """This rank's own deadline, seen by the watchdog (the thread that would have
        raised it is blocked where no deadline reaches): the flag, then the release."""
        sc = self.side
        mine = R.cause("deadline", sc.rank, get_role(), line, **self.ids())
        first = sc.set_abort_with(s, mine)
        return self._release(first, "own" if first == mine else "abort_flag")

    def _release(self, cause: dict, via: str) -> None:
        if self.exit_code is not None and not claim_exit():  # another exit path of this process writes the line
            self._stop_ev.wait()
            return
        self.cause, self.via = cause, via
        self._reason = R.text(cause)
        code, kind = ((EXIT_ERROR, "error") if R.started_twice(cause, self.side.rank)
                      else (self.exit_code, "released"))
        try:
            self.side.mark_exit(self._client)
        except Exception:  # noqa: BLE001 - a mark is a courtesy to peers; exiting is not
            pass
        host = self.side.hosts_store
        if self.exit_code is not None:
            grace = self.release_grace_s + (self.side.host_wait_s if host else 0.0)
            killer = threading.Timer(grace, os._exit, args=(code,))
            killer.daemon = True
            killer.start()
        try:
            if self.on_release is not None:
                self.on_release(cause, via, kind=kind)
            else:
                sys.stderr.write(cause_line(kind, via, cause) + "\n")
        except Exception:
            pass
        if host:
            try:
                self.side.wait_peers_left(self.side.host_wait_s, self._client)
            except Exception:  # noqa: BLE001 - our own store: nothing more to do
                pass
        if self.exit_code is not None:
            for f in (sys.stdout, sys.stderr):
                try:
                    f.flush()
                except Exception:
                    pass
            os._exit(code)
