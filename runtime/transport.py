"""The one transport of a rank: every op, control plane and workload, checked, bounded,
completed without a thread per op, failing with one error type per cause.

Groups are named as in the model (``"world_pg"``, ``"mesh_pg"``, ``"pp_pg"``, see
runtime/groups.py) and every peer / root is a rank IN THE NAMED GROUP (for world_pg that
is the global rank), handed to the ProcessGroup itself (which takes group ranks), never
mixed with global ranks. Error messages name both when they differ.

Each op, before the backend is called:
1. *The table's check* (``check(op, group, peer, row)``, supplied by the interpreter):
   raises if the current rows do not allow it, so a wrong-group collective never reaches
   gloo/NCCL and cannot hang. ``row`` is the table op a control-plane row performs (its
   row was checked by the interpreter's monitor; the check confirms the backend op is that
   row's op), None for the workload's collectives (checked against the rows here).
2. *Membership*: stock torch only warns and returns None for a non-member; here
   ``GroupMembershipError``.
3. *The abort flag*: no op starts after a release.

Completion (an op is issued async and returned as an ``Op``; ``wait`` / ``wait_any``
complete it). What may release a blocked call decides how (FACTS.md):
- *One op in flight in the calling thread, CPU tensors (gloo)*: ``work.wait(timeout)``
  directly in that thread: the cheapest possible completion (no hand-off). A gloo p2p work
  never reports ``is_completed()`` until ``wait()`` is called (measured, torch 2.13), and
  nothing called from another thread releases a blocked gloo call; what releases it is a
  peer's exit (the pair closes: ``CommFailed`` within ~20 ms), the deadline (gloo closes the
  pair: ``OpDeadline``), or the watchdog's ``os._exit`` on the abort flag.
- *Several ops in flight in one thread* (rank0's comms thread keeps a receive posted while
  it sends): each gloo work goes to a persistent completer thread of this rank that calls
  ``wait()`` and posts the op to the submitting thread's completion queue; the caller waits
  on that queue (woken at once by the completion, or every ``slice_s`` to check the abort
  flag and the deadline) and takes whichever op finishes first. The completer grows a
  thread only while every thread it has is blocked in a wait, so it never queues a work
  behind another (head-of-line blocking: one serial waiter blocked on the receive would
  hide the send's completion and deadlock a rendezvous send), and its threads are reused
  op after op: at most as many as ops ever in flight at once (two on rank0).
- *A wait another thread may end early* (``wait_any(..., interrupt=f)``: a comms thread
  whose receive is posted while its process's main thread may queue work for it, a result
  for the leader's comms thread to send): the completer path, even for one op, since a
  direct wait cannot be woken. ``nudge()`` from another thread wakes every such wait of
  the rank; it then returns an op already done first (its completion must be applied, not
  lost behind new work), else ``(None, None)`` if ``f()`` says new work is enabled; ops
  stay in flight for a later call.
- *CUDA tensors (NCCL)*: ``work.wait()`` only orders the stream, so completion is polled
  with ``is_completed()`` (a 50 us spin, then a sleep doubling from 20 us to 1 ms), checking
  the abort flag and the deadline: on NCCL an in-process abort does release, so
  ``Released`` is raised here.
- *The workload's CUDA collectives* (``stream_all_reduce``, a generator call's TP
  all_reduces) are not waited one by one: a host that polls each one to completion
  leaves the GPU idle from the op's end until the host has woken and launched what
  follows, 160 times a forward in the field's DiT. ``work.wait()`` orders the stream and
  the op joins an in-flight window; the host completes the oldest only beyond
  ``cuda_window`` ops (a bounded run-ahead), and ``drain()`` completes the rest at the end
  of the call, bounded like any wait, before its row is applied. A host that blocks
  elsewhere meanwhile (a workload's own ``.item()`` after a collective that never
  completes) is bounded by the watchdog: ``overdue()`` names a collective outstanding past
  the op deadline, and the watchdog releases the rank with it (runtime/sidechannel.py).
  ``cuda_window=0`` completes each op before the workload goes on (the per-op sync;
  ``python -m lockstep.gpubench`` measures both).

Errors, all ``CommError`` (one line each): ``Released`` (the abort flag), ``OpDeadline``
(no completion within the deadline), ``CommFailed`` (the backend raised, e.g. gloo
"Connection closed by peer"); a call on a group the rank is not in raises
``groups.GroupMembershipError`` (an addressing error, like a bad group rank). After a
``Released`` or an ``OpDeadline`` the op is abandoned (its completer thread may stay
blocked: the process is about to exit) and every later op refuses: gloo pairs are not
reusable after an abandoned or timed-out op.

Rejected: a daemon thread parked per op (what runtime/wire.py did: a thread start per
frame, plus a 0.2 ms polling loop while two were in flight; it also counted a send still
in flight when its poll returned the other job complete at the next poll, which made
sends buffered under p2p="rendezvous": docs/runtime-bench.md); one serial completer per
rank (head-of-line blocking, above); ``get_future()`` callbacks (not implemented for gloo
send/recv works); polling ``is_completed()`` on gloo p2p (never true before ``wait()``).
"""
from __future__ import annotations

import queue
import threading
import time
from collections import deque
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from . import codec
from .groups import GroupMembershipError, Groups
from .worker_main import backend_text, one_line


# --------------------------------------------------------------------------- errors

class Peer(int):
    """A group rank that also knows its global rank, so messages name both."""

    def __new__(cls, group_rank: int, global_rank: int):
        obj = super().__new__(cls, group_rank)
        obj.global_rank = global_rank
        return obj


def _fmt(peer) -> str:
    if isinstance(peer, Peer) and int(peer) != peer.global_rank:
        return f"{int(peer)}(global {peer.global_rank})"
    return "-" if peer is None else str(int(peer))


class CommError(RuntimeError):
    """Base of the transport's failures; ``str(e)`` is one line naming rank, op, group
    and peer."""

    def __init__(self, rank: int, op: str, group: str, peer, what: str):
        self.rank, self.op, self.group, self.peer = rank, op, group, peer
        super().__init__(one_line(f"rank {rank}: {op} group={group} peer={_fmt(peer)} {what}",
                                  300))


class Released(CommError):
    """The abort flag released this rank while (or before) the op was in flight."""

    def __init__(self, rank, op, group, peer, reason: str):
        self.reason = reason
        super().__init__(rank, op, group, peer, f"released: {reason}")


class OpDeadline(CommError):
    def __init__(self, rank, op, group, peer, waited_s: float, deadline_s: float):
        self.waited_s, self.deadline_s = waited_s, deadline_s
        super().__init__(rank, op, group, peer, f"made no progress for {waited_s:.3f}s "
                                                f"(deadline {deadline_s:g}s)")


class CommFailed(CommError):
    """The backend itself raised (e.g. gloo "Connection closed by peer")."""

    def __init__(self, rank, op, group, peer, err: BaseException):
        super().__init__(rank, op, group, peer,
                         f"backend error: {type(err).__name__}: {backend_text(err)}")


# --------------------------------------------------------------------------- ops in flight

class Op:
    """A backend work in flight (or, with ``work=None``, an op with nothing to move).
    ``then()`` turns the completed buffers into the op's value, in the waiting thread."""

    __slots__ = ("work", "op", "group", "peer", "cuda", "then", "submitted", "done",
                 "error", "index", "issued")

    def __init__(self, work, op: str, group: str, peer, cuda: bool, then=None,
                 index: int | None = None):
        self.work, self.op, self.group, self.peer, self.cuda = work, op, group, peer, cuda
        self.then = then
        self.index = index              # a collective: its number on its group, from 1
        self.submitted = False          # handed to the completer
        self.done = work is None        # the work has completed (error or not)
        self.error: BaseException | None = None
        self.issued = 0.0               # when a deferred op joined the window (monotonic)

    def value(self):
        return self.then() if self.then is not None else None


class _Completer:
    """Persistent waiter threads of one rank: each takes an op, calls ``work.wait()``
    (GIL released) and posts the op to the queue of the thread that submitted it. A
    thread is started only when none is idle, so no work waits behind another."""

    def __init__(self, rank: int):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        self.threads = 0
        self._rank = rank

    def submit(self, op: Op, reply: queue.SimpleQueue) -> None:
        with self._lock:
            if self._idle:
                self._idle -= 1         # reserved for this job
            else:
                self.threads += 1
                threading.Thread(target=self._run, daemon=True,
                                 name=f"lockstep-completer-{self._rank}-{self.threads}"
                                 ).start()
        op.submitted = True
        self._jobs.put((op, reply))

    def _run(self) -> None:
        while True:
            op, reply = self._jobs.get()
            try:
                op.work.wait()
            except BaseException as e:  # noqa: BLE001 - re-raised in the waiting thread
                op.error = e
            op.done = True
            with self._lock:    # idle before the caller hears: its next op reuses us
                self._idle += 1
            reply.put(op)


_COLLECTIVES = frozenset(("broadcast", "all_reduce", "all_gather"))
CheckFn = Callable[[str, str, object, object], None]
AbortPollFn = Callable[[], "str | None"]


_OPTIONS: dict = {}


def _opts(cls, **kw):
    """Backend options for an async op (``asyncOp`` exists from torch 2.7), made once per
    distinct value: the backend only reads them, and building one costs a few setattr
    calls through pybind on every collective."""
    key = (cls, tuple(sorted(kw.items(), key=lambda kv: kv[0])))
    try:
        return _OPTIONS[key]
    except KeyError:
        pass
    except TypeError:        # an unhashable option value: made per call
        return _make_opts(cls, **kw)
    o = _OPTIONS[key] = _make_opts(cls, **kw)
    return o


def _make_opts(cls, **kw):
    o = cls()
    for k, v in {**kw, "asyncOp": True}.items():
        if k != "asyncOp" or hasattr(o, k):
            setattr(o, k, v)
    return o


# How many of a group's latest collectives a rank remembers by name (stuck_collective).
RECENT = 3


class CallCounts:
    """The workload's collectives per generator call on this rank, kept by the
    interpreter (``begin`` / ``issue`` / ``end``): a rank's own evidence that it issued
    an extra collective or skipped one. A pipeline issues the same collectives in call
    k of every chunk (a DiT: one per block per call), so a call that goes past what
    every earlier call with its index issued, or ends short of it, deviates from this
    rank's own history: what tells the wrong side of a two-member mismatch, where the
    waits alone cannot (sidechannel.collective_mismatch). A call index whose calls
    issued different counts is no evidence either way."""

    def __init__(self):
        self._steady: dict = {}   # call index -> what every completed call issued, or None
        self.current = None       # (call index, issued so far) while a call runs
        self.last = None          # (call index, issued, steady before it) of the last call

    def begin(self, call_index: int) -> None:
        self.current = (call_index, 0)

    def issue(self) -> None:
        """One more collective in the current call (none outside a call: a workload that
        kept its ``all_reduce`` and calls it later is the table check's to refuse)."""
        if self.current is not None:
            c, n = self.current
            self.current = (c, n + 1)

    def end(self) -> None:
        (c, n), self.current = self.current, None
        before = self._steady.get(c, -1)
        self.last = (c, n, None if before == -1 else before)
        self._steady[c] = n if before in (-1, n) else None

    def evidence(self) -> str | None:
        """``"extra C M N"``: in call C, issuing its M-th collective where every earlier
        call C issued N < M; ``"short C M N"``: the last call C issued M < N; else None.
        (The first word is no number: a reader of ``stuck_collective``'s lines that
        knows only "NUMBER NAME" skips it.)"""
        cur, last = self.current, self.last     # read once: the main thread moves them
        if cur is not None:
            want = self._steady.get(cur[0])
            return f"extra {cur[0]} {cur[1]} {want}" if want is not None and \
                cur[1] > want else None
        if last is not None and last[2] is not None and last[1] < last[2]:
            return f"short {last[0]} {last[1]} {last[2]}"
        return None


class Transport:
    """Every op of one rank. ``check(op, group, peer, row)`` refuses an op (called first);
    ``abort_poll()`` returns a release reason (or None); ``op_deadline_s`` bounds every
    wait unless a call passes ``deadline_s``. ``seq[group]`` counts ops issued per group;
    ``colls[group]`` its collectives only, which every member issues in the same order,
    so a collective's number there is the same on every member (``stuck_collective``).
    """

    def __init__(self, groups: Groups, rank: int, check: CheckFn | None = None,
                 abort_poll: AbortPollFn | None = None, op_deadline_s: float = 10.0, *,
                 slice_s: float = 0.05, poll_min_s: float = 20e-6, poll_max_s: float = 1e-3,
                 spin_s: float = 50e-6, cuda_window: int = 16):
        self.groups, self.rank = groups, rank
        self.check = check or (lambda op, group, peer, row: None)
        self.abort_poll = abort_poll or (lambda: None)
        self.op_deadline_s = op_deadline_s
        self.slice_s, self.spin_s = slice_s, spin_s
        self.poll_min_s, self.poll_max_s = poll_min_s, poll_max_s
        self.seq: dict[str, int] = {}
        self.colls: dict[str, int] = {}
        # group -> the names of its last RECENT collectives issued here, by number: a
        # broadcast's receivers complete once the root has sent, so a receiver may be
        # waiting one collective further on while a member is stuck at the one before
        self.recent: dict[str, dict[int, str]] = {}
        self.calls = CallCounts()   # the workload's collectives per generator call
        self.completer = _Completer(rank)
        self._replies = threading.local()
        self._interruptible: dict[int, queue.SimpleQueue] = {}   # thread -> its queue
        self._abandoned: str | None = None
        self._waiting: dict[int, tuple[list, float]] = {}   # thread -> (its ops, since)
        # the workload's CUDA collectives in flight, oldest first (stream_all_reduce)
        self.cuda_window = cuda_window
        self._deferred: deque[Op] = deque()

    # -- issuing -------------------------------------------------------------------------
    def _enter(self, op: str, group: str, peer, row):
        """The checks before a backend call; (process group, peer, the op's number among
        the group's collectives or None for a send / recv)."""
        if self._abandoned:
            raise CommError(self.rank, op, group, peer, f"refused: an earlier op was "
                            f"abandoned ({self._abandoned}); exit the process")
        self.check(op, group, peer, row)                  # the table says no -> raise
        reason = self.abort_poll()
        if reason:                                        # never start an op after abort
            raise Released(self.rank, op, group, peer, reason)
        if not self.groups.is_member(group, self.rank):   # stock torch: warn + None
            raise GroupMembershipError(
                f"{op} on {group}: rank {self.rank} is not a member "
                f"{list(self.groups.members.get(group, ()))}")
        if peer is not None:                              # group-rank range check
            peer = Peer(peer, self.groups.global_rank(group, peer))
        self.seq[group] = self.seq.get(group, 0) + 1
        index = None
        if op in _COLLECTIVES:
            index = self.colls[group] = self.colls.get(group, 0) + 1
        return self.groups.pg(group), peer, index

    def _issue(self, op, group, peer, tensor, start, then, index=None):
        if index is not None:
            names = self.recent.setdefault(group, {})
            names[index] = op
            names.pop(index - RECENT, None)
        try:
            work = start()
        except Exception as e:  # noqa: BLE001
            raise CommFailed(self.rank, op, group, peer, e) from e
        if work is None:
            raise GroupMembershipError(f"{op} on {group}: backend returned no work "
                                       f"(rank {self.rank} not in the group?)")
        return Op(work, op, group, peer, tensor.device.type == "cuda", then, index)

    # The ops call the ProcessGroup itself, which takes group ranks: what torch.distributed's
    # wrappers do after their argument checks (about 25 us of Python per op saved; the
    # checks that matter are the three above).
    def isend(self, tensor: torch.Tensor, dst: int, group: str, *, row=None, then=None) -> Op:
        pg, p, _ = self._enter("send", group, dst, row)
        return self._issue("send", group, p, tensor, lambda: pg.send([tensor], int(p), 0),
                           then)

    def irecv(self, tensor: torch.Tensor, src: int, group: str, *, row=None, then=None) -> Op:
        pg, p, _ = self._enter("recv", group, src, row)
        return self._issue("recv", group, p, tensor, lambda: pg.recv([tensor], int(p), 0),
                           then)

    def ibroadcast(self, tensor: torch.Tensor, group: str, root: int, *, row=None,
                   then=None) -> Op:
        pg, p, k = self._enter("broadcast", group, root, row)
        opts = _opts(c10d.BroadcastOptions, rootRank=int(p), rootTensor=0)
        return self._issue("broadcast", group, p, tensor,
                           lambda: pg.broadcast([tensor], opts), then, k)

    def iall_reduce(self, tensor: torch.Tensor, group: str, op=dist.ReduceOp.SUM, *,
                    row=None, name: str = "all_reduce") -> Op:
        """``name``: how a failure of this op names it (e.g. the workload's "all_reduce
        #2 of generator_call(call_index=1)"); the table checks it as an all_reduce."""
        pg, _, k = self._enter("all_reduce", group, None, row)
        opts = _opts(c10d.AllreduceOptions, reduceOp=op)
        return self._issue(name, group, None, tensor,
                           lambda: pg.allreduce([tensor], opts), None, k)

    def iall_gather(self, out, tensor: torch.Tensor, group: str, *, row=None,
                    then=None) -> Op:
        """``out``: a list of group-size tensors, or one output tensor of group-size x
        ``tensor`` (all_gather_into_tensor)."""
        pg, _, k = self._enter("all_gather", group, None, row)
        opts = _opts(c10d.AllgatherOptions)
        if isinstance(out, torch.Tensor):
            start = lambda: pg._allgather_base(out, tensor, opts)  # noqa: E731,SLF001
        else:
            start = lambda: pg.allgather([out], [tensor], opts)  # noqa: E731
        return self._issue("all_gather", group, None, tensor, start, then, k)

    def nothing(self, op: str, group: str, peer, then=None) -> Op:
        """An op with no bytes to move (an empty payload): already complete."""
        return Op(None, op, group, peer, False, then)

    # -- completing ----------------------------------------------------------------------
    def wait(self, op: Op, deadline_s: float | None = None):
        """Complete one op; return its value."""
        return self.wait_any([op], deadline_s)[1]

    def wait_any(self, ops: list, deadline_s: float | None = None,
                 interrupt: Callable[[], bool] | None = None):
        """Complete whichever of ``ops`` (None entries are skipped) finishes first (of
        several found done together, the first in ``ops``); return (index, value). The
        others stay in flight for a later call. With ``interrupt``, a ``nudge()`` from
        another thread after which ``interrupt()`` is true returns (None, None) unless an
        op is already done."""
        live = [o for o in ops if o is not None]
        limit = self.op_deadline_s if deadline_s is None else deadline_s
        t0 = time.monotonic()
        done = next((o for o in live if o.done), None)
        try:
            if done is None:
                me = threading.get_ident()
                self._waiting[me] = (live, t0)    # what a release names (waiting_text)
                try:
                    if len(live) == 1 and not live[0].submitted and not live[0].cuda \
                            and interrupt is None:
                        done = self._wait_direct(live[0], limit, t0)
                    elif any(o.cuda for o in live):
                        done = self._wait_poll(live, limit, t0)
                    else:
                        done = self._wait_completer(live, limit, t0, interrupt)
                finally:
                    del self._waiting[me]
                if done is None:
                    return None, None
            if done.error is not None:
                raise CommFailed(self.rank, done.op, done.group, done.peer,
                                 done.error) from done.error
        except (Released, OpDeadline) as e:
            self._abandoned = f"{type(e).__name__}: {e}"
            raise
        return ops.index(done), done.value()

    def waiting_text(self) -> str | None:
        """What this rank's threads are blocked in now, e.g. "waiting 3.0s in all_reduce
        #2 of generator_call(call_index=1) group=mesh_pg": the line of a rank released
        by the abort flag (which names the root cause, not where this rank was) says
        where its collectives stood, so the ranks' lines side by side show where they
        parted; None when no thread waits."""
        now = time.monotonic()
        parts = [f"waiting {now - t0:.1f}s in "
                 + " or ".join(f"{o.op} group={o.group} peer={_fmt(o.peer)}" for o in ops)
                 for ops, t0 in self._waits()]
        return f"rank {self.rank}: " + "; ".join(parts) if parts else None

    def stuck_collective(self, after_s: float) -> str | None:
        """``"GROUP NUMBER NAME"`` of a collective a thread of this rank has waited on for
        ``after_s`` or longer (NUMBER: its place among the group's collectives,
        ``colls``), then one line ``"NUMBER NAME"`` for each collective issued on that
        group before it that is still in ``recent``, newest first, and last this rank's
        own evidence of an extra or a skipped collective (``CallCounts.evidence``) when
        it has any; else None. The
        watchdog publishes it: members of one group under different names at one number
        issued different collectives (an extra or a missing one on a rank), which no
        deadline short of the op's own would otherwise end
        (sidechannel.collective_mismatch)."""
        now = time.monotonic()
        for ops, t0 in self._waits():
            if now - t0 >= after_s:
                for o in ops:
                    if o.index is not None and not o.done:
                        names = dict(self.recent.get(o.group) or {})  # a copy: the
                        # op's thread adds to it meanwhile
                        before = [f"{k} {names[k]}" for k in sorted(names, reverse=True)
                                  if k < o.index]
                        mine = self.calls.evidence()
                        return "\n".join([f"{o.group} {o.index} {o.op}"] + before
                                          + ([mine] if mine else []))
        return None

    def settle(self, op: Op, within_s: float) -> bool:
        """Give ``op`` up to ``within_s`` to complete, without raising: True when it
        completed without error. A gloo p2p work completes only once someone waits on it
        (``is_completed()`` stays false until ``wait()``), and ``wait_any`` returns an op
        found done without submitting the others it was given; so an op nobody waits on
        yet goes to the completer here. (Polling ``op.done`` alone left rank0's envelope
        header, which the leader had received, "not landed" for the whole grace: the
        receive of the ERROR result had completed first, and the trace lost the send.)"""
        if not op.done and not op.submitted and not op.cuda:
            self.completer.submit(op, self._reply_queue())
        end = time.monotonic() + within_s
        while not op.done:
            if op.cuda and op.work.is_completed():
                try:
                    op.work.wait()
                except Exception as e:  # noqa: BLE001
                    op.error = e
                op.done = True
                break
            if time.monotonic() >= end:
                break
            time.sleep(0.002)
        return op.done and op.error is None

    def _wait_direct(self, op: Op, limit: float, t0: float) -> Op:
        try:
            op.work.wait(timedelta(seconds=limit))
        except Exception as e:  # noqa: BLE001
            waited = time.monotonic() - t0
            if waited >= 0.9 * limit:
                raise OpDeadline(self.rank, op.op, op.group, op.peer, waited, limit) from e
            op.error = e
        op.done = True
        return op

    def _give_up(self, op: Op, limit: float, t0: float) -> None:
        reason = self.abort_poll()
        if reason:
            raise Released(self.rank, op.op, op.group, op.peer, reason)
        waited = time.monotonic() - t0
        if waited > limit:
            raise OpDeadline(self.rank, op.op, op.group, op.peer, waited, limit)

    def _reply_queue(self) -> queue.SimpleQueue:
        """The calling thread's completion queue (the completer posts finished ops)."""
        reply = getattr(self._replies, "q", None)
        if reply is None:
            reply = self._replies.q = queue.SimpleQueue()
        return reply

    def nudge(self) -> None:
        """Wake every interruptible wait of this rank but the caller's (it queued work)."""
        me = threading.get_ident()
        for ident, reply in list(self._interruptible.items()):
            if ident != me:
                reply.put(None)

    def _wait_completer(self, live: list, limit: float, t0: float,
                        interrupt: Callable[[], bool] | None = None) -> Op | None:
        reply = self._reply_queue()
        for o in live:
            if not o.submitted:
                self.completer.submit(o, reply)
        me = threading.get_ident()
        if interrupt is not None:
            self._interruptible[me] = reply     # registered first: no nudge is missed
            if interrupt():
                self._interruptible.pop(me, None)
                return None
        try:
            return self._take_completed(live, limit, t0, reply, interrupt)
        finally:
            self._interruptible.pop(me, None)

    def _take_completed(self, live, limit, t0, reply, interrupt):
        while True:
            try:
                got = reply.get(timeout=self.slice_s)
            except queue.Empty:
                self._give_up(live[0], limit, t0)
                got = None
            if got is None:     # a nudge: done ops first, then the caller's new work
                done = next((o for o in live if o.done), None)
                if done is not None:
                    return done
                if interrupt is not None and interrupt():
                    return None
                continue
            # Of the ops done by the time this thread runs again, the first in the
            # caller's order (an op of this thread not in this call stays marked done for
            # a later call). gloo p2p is a rendezvous: rank0's envelope send completes
            # when the leader posts its receive, right after rank0 posted the receive of
            # the result payload; taking the send first lets its successor row start
            # before the result's rows hand the process to Phase A/C.
            done = next((o for o in live if o.done), None)
            if done is not None:
                return done

    def _wait_poll(self, live: list, limit: float, t0: float) -> Op:
        reply = self._reply_queue()
        for o in live:      # a CPU op beside CUDA ones: the completer waits on it
            if not o.cuda and not o.submitted and not o.done:
                self.completer.submit(o, reply)
        nap, spin_until = self.poll_min_s, t0 + self.spin_s
        while True:
            for o in live:
                if o.cuda and not o.done and o.work.is_completed():
                    try:
                        o.work.wait()   # surfaces a backend error; orders the stream
                    except Exception as e:  # noqa: BLE001
                        o.error = e
                    o.done = True
                if o.done:
                    return o
            if time.monotonic() < spin_until:   # short ops finish inside the spin
                continue
            self._give_up(live[0], limit, t0)
            time.sleep(nap)
            nap = min(nap * 2, self.poll_max_s)

    # -- blocking conveniences (one op, waited at once) ------------------------------------
    def send(self, tensor, dst: int, group: str, *, deadline_s=None, row=None) -> None:
        self.wait(self.isend(tensor, dst, group, row=row), deadline_s)

    def recv(self, tensor, src: int, group: str, *, deadline_s=None, row=None) -> None:
        self.wait(self.irecv(tensor, src, group, row=row), deadline_s)

    def broadcast(self, tensor, group: str, root: int, *, deadline_s=None, row=None) -> None:
        self.wait(self.ibroadcast(tensor, group, root, row=row), deadline_s)

    def all_reduce(self, tensor, group: str, op=dist.ReduceOp.SUM, *, deadline_s=None,
                   row=None, name: str = "all_reduce") -> None:
        self.wait(self.iall_reduce(tensor, group, op, row=row, name=name), deadline_s)

    def all_gather(self, out, tensor, group: str, *, deadline_s=None, row=None) -> None:
        self.wait(self.iall_gather(out, tensor, group, row=row), deadline_s)

    # -- the workload's collectives: stream-ordered on CUDA (module docstring) ----------
    def stream_all_reduce(self, tensor, group: str, op=dist.ReduceOp.SUM, *,
                          name: str = "all_reduce") -> None:
        """A generator call's all_reduce: on CPU (gloo) completed at once, as ``all_reduce``;
        on CUDA the stream waits for it and the host goes on (``drain`` completes it)."""
        o = self.iall_reduce(tensor, group, op, name=name)
        if not o.cuda or self.cuda_window <= 0:
            self.wait(o)
            return
        try:
            o.work.wait()       # orders the current stream after the op; the host goes on
        except Exception as e:  # noqa: BLE001
            raise CommFailed(self.rank, o.op, o.group, o.peer, e) from e
        o.issued = time.monotonic()
        dq = self._deferred
        dq.append(o)
        while dq and (len(dq) > self.cuda_window or dq[0].work.is_completed()):
            self.wait(dq[0])    # the oldest: done already, or beyond the window
            dq.popleft()

    def drain(self, deadline_s: float | None = None) -> None:
        """Complete every deferred collective, oldest first, each a bounded wait (the end
        of a generator call: its row is applied only once its collectives are done)."""
        dq = self._deferred
        while dq:
            self.wait(dq[0], deadline_s)
            dq.popleft()

    def _pending_deferred(self) -> Op | None:
        """The oldest deferred collective not known complete (any thread may ask)."""
        try:
            o = self._deferred[0]
        except IndexError:
            return None
        return None if o.done or o.work.is_completed() else o

    def overdue(self) -> str | None:
        """A deferred collective outstanding past the op deadline, as the line a deadline
        would write, while no wait of this rank's threads is bounding it (the host blocked
        elsewhere); else None. The watchdog asks every tick and releases on it."""
        o = self._pending_deferred()
        if o is None or any(o in ops for ops, _ in list(self._waiting.values())):
            return None
        waited = time.monotonic() - o.issued
        if waited <= self.op_deadline_s:
            return None
        return str(OpDeadline(self.rank, f"{o.op} (outstanding on the stream; the host "
                              f"went on and is blocked elsewhere)", o.group, o.peer, waited,
                              self.op_deadline_s))

    def _waits(self) -> list:
        """(ops, since) of every wait of this rank's threads, and of the oldest deferred
        collective not complete (waited on since it was issued: the host that went on
        waits for it in effect)."""
        waits = list(self._waiting.values())
        o = self._pending_deferred()
        if o is not None and not any(o in ops for ops, _ in waits):
            waits.append(([o], o.issued))
        return waits


# --------------------------------------------------------------------------- framed ops
# One frame per op: a codec header, or one packed payload (meta, manifest, tensors) sized
# by the header and capped before allocation. A receiver's ``then(decoded, buf)`` makes
# the op's value from the decoded frame and the buffer it arrived in (a relay forwards
# those bytes). A broadcast's root decodes nothing: it holds the message it sends.

def _then(decode, buf, then):
    return decode if then is None else (lambda: then(decode(), buf))


def send_frame(tp: Transport, part: torch.Tensor, dst: int, group: str, *, row=None) -> Op:
    if not part.numel():
        return tp.nothing("send", group, dst)
    return tp.isend(part, dst, group, row=row)


def recv_header(tp: Transport, src: int, group: str, expect: str, *, row=None, then=None,
                caps=codec.DEFAULT_CAPS) -> Op:
    t = torch.zeros(codec.HEADER_WORDS, dtype=torch.int64)
    return tp.irecv(t, src, group, row=row, then=_then(
        lambda: codec.decode_header(t, caps=caps, expect=expect), t, then))


def recv_payload(tp: Transport, h, src: int, group: str, *, row=None, then=None,
                 caps=codec.DEFAULT_CAPS) -> Op:
    buf = codec.alloc_packed(h)
    decode = _then(lambda: codec.unpack_payload(buf, h, caps=caps), buf, then)
    if not buf.numel():
        return tp.nothing("recv", group, src, decode)
    return tp.irecv(buf, src, group, row=row, then=decode)


def bcast_header(tp: Transport, header, group: str, root: int, expect: str, *, row=None,
                 then=None, caps=codec.DEFAULT_CAPS) -> Op:
    """``header`` (the words) on the root, None elsewhere, where it decodes to the Header."""
    if header is not None:
        return tp.ibroadcast(header, group, root, row=row)
    t = torch.zeros(codec.HEADER_WORDS, dtype=torch.int64)
    return tp.ibroadcast(t, group, root, row=row, then=_then(
        lambda: codec.decode_header(t, caps=caps, expect=expect), t, then))


def bcast_payload(tp: Transport, payload, h, group: str, root: int, *, row=None, then=None,
                  caps=codec.DEFAULT_CAPS) -> Op:
    """The root sends the packed ``payload``; the others allocate it from the header and
    read shapes from the manifest (never inferring them on their own: FM-08)."""
    if payload is not None:
        return tp.ibroadcast(payload, group, root, row=row)
    buf = codec.alloc_packed(h)
    decode = _then(lambda: codec.unpack_payload(buf, h, caps=caps), buf, then)
    if not buf.numel():
        return tp.nothing("broadcast", group, root, decode)
    return tp.ibroadcast(buf, group, root, row=row, then=decode)


def all_gather_ints(tp: Transport, values, group: str, *, row=None) -> Op:
    """All-gather a small int64 vector per member; decodes to a list of tuples."""
    mine = torch.tensor(values, dtype=torch.int64)
    out = [torch.zeros_like(mine) for _ in range(len(tp.groups.members[group]))]
    return tp.iall_gather(out, mine, group, row=row,
                          then=lambda: [tuple(int(x) for x in t.tolist()) for t in out])
