"""Process groups and the guarded communication wrapper: every blocking op can end.

Groups. ``world_pg`` holds every rank; ``mesh_pg = new_group([1..N])`` holds the mesh; an
optional ``pp_pg = new_group([0, 1])`` is the PROTOCOL.md variant for rank0 <-> leader.
``new_group`` is collective over the WORLD, so ``make_groups`` runs on every rank including
rank 0, and it passes ``timeout=`` explicitly because ``new_group`` does not inherit the
``init_process_group`` timeout (FACTS.md: it silently falls back to 30 minutes). Group names
are the model's (``"world_pg"``, ``"mesh_pg"``, ``"pp_pg"``), and membership / rank
translation is computed from the member lists, not from torch, so it also answers on a
non-member (where torch returns a sentinel). The mesh leader is global rank 1 = mesh group
rank 0.

Backends: ``"gloo"`` (CPU); ``"nccl"`` (one GPU per rank, eager init with ``device_id``);
``"cpu:gloo,cuda:nccl"`` (FACTS.md 2-GPU variant: lazy NCCL init, no ``device_id``, CPU
tensors ride gloo, pass ``mesh_backend="nccl"``). Only gloo is exercised by the CPU tests.

GuardedComm. Stock torch turns three failure classes into hangs or silence; each op here
turns them into a one-line exception raised in the calling rank:

1. *Wrong op / wrong group* (PP-FM-WRONG-GROUP, FM-01..03): before touching the backend each
   op calls ``check(op, group_name, peer_or_root)``, supplied by the table interpreter, which
   raises if the current table state does not allow it. A mismatched collective never
   reaches gloo/NCCL, so it cannot hang.
2. *Non-member call*: torch only warns and returns None; here ``GroupMembershipError``.
3. *Blocked forever* (silent live peer, stranded rank): ops are issued async
   (``isend``/``irecv``/``async_op=True``) and never waited on without a bound. Collectives
   (and every NCCL op) poll ``work.is_completed()``: a 50 us spin, then a sleep doubling
   from 20 us to 1 ms (~1k wakeups/s worst case, fine on 2 cores), checking ``abort_poll()``
   (the watchdog's local flag) and a per-op deadline. On abort or deadline it raises
   ``CommAborted`` / ``OpDeadline`` and ABANDONS the work; later ops on this object refuse,
   and the caller must exit the process (FACTS.md: gloo pairs are not reusable after an
   abandoned or timed-out op, and nothing releases it in-process).

   MEASURED (torch 2.13 and 2.11): a gloo send/recv Work never reports ``is_completed()``
   until ``wait()`` is called, so polling cannot work for gloo point-to-point. ``wait_mode``
   picks the substitute for CPU send/recv:
   ``"direct"`` (what ``"auto"`` uses): ``work.wait(timeout=deadline)`` in the caller's
   thread. Raw gloo speed (8 x int64 ping-pong ~80-100 us, same as unguarded); the deadline
   is enforced by gloo (pair closed: fine, we exit) and raised as ``OpDeadline``; the abort
   flag is NOT seen mid-op: the watchdog's ``os._exit`` is the release, which on gloo is the
   only release anyway. ``"thread"``: a completer thread calls ``wait()`` and the caller
   waits on an Event in 5 ms slices, so ``CommAborted`` is raised in-process (needed only
   with a watchdog built with ``exit_code=None``); costs a thread hand-off, 3-6x the raw
   round trip on 2 loaded cores (~250-600 us).

Rejected: blocking calls + watchdog ``os._exit`` only (works, but gives no per-op deadline
and no typed exception naming the op, group and peer); ``get_future()`` callbacks (not
implemented for gloo send/recv Work).

Addressing: every peer / root argument is a rank IN THE NAMED GROUP (for ``world_pg`` that
is the global rank); it is passed to torch as ``group_src`` / ``group_dst``, never mixed with
global ranks. On NCCL, polling ``is_completed`` waits for the GPU to finish the op (a CPU
sync per op); that is the price of a bounded wait on the control path.
"""

from __future__ import annotations

import os
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from lockstep.runtime.worker_main import one_line

WORLD = "world_pg"
MESH = "mesh_pg"
PP = "pp_pg"


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
    """Base of the guarded-comm failures; ``str(e)`` is one line."""


class GroupMembershipError(CommError):
    pass


class CommAborted(CommError):
    def __init__(self, op: str, group: str, peer, reason: str):
        self.op, self.group, self.peer, self.reason = op, group, peer, reason
        super().__init__(one_line(f"{op} group={group} peer={_fmt(peer)} aborted: {reason}"))


class OpDeadline(CommError):
    def __init__(self, op: str, group: str, peer, waited_s: float, deadline_s: float):
        self.op, self.group, self.peer = op, group, peer
        self.waited_s, self.deadline_s = waited_s, deadline_s
        super().__init__(f"{op} group={group} peer={_fmt(peer)} made no progress for "
                         f"{waited_s:.3f}s (deadline {deadline_s:g}s)")


def _backend_msg(err: BaseException) -> str:
    """gloo messages carry a source path and advice; keep the fact."""
    m = re.sub(r"\[/[^\]]*\]\s*", "", str(err))
    return m.split(". This is typically")[0]


class CommFailed(CommError):
    """The backend itself raised (e.g. gloo "Connection closed by peer")."""

    def __init__(self, op: str, group: str, peer, err: BaseException):
        self.op, self.group, self.peer = op, group, peer
        super().__init__(one_line(f"{op} group={group} peer={_fmt(peer)} backend error: "
                                  f"{type(err).__name__}: {_backend_msg(err)}", 300))


# --------------------------------------------------------------------------- groups

def init_world(backend: str, rank: int, world_size: int, master_addr: str, master_port: int,
               timeout_s: float, *, device: "torch.device | None" = None) -> None:
    """``init_process_group`` with an explicit short timeout.

    nccl: eager init bound to ``device`` (default cuda:LOCAL_RANK). "cpu:gloo,cuda:nccl":
    lazy NCCL init (no ``device_id``) so no communicator spans a shared GPU. Under torchrun
    with the agent-hosted store, rendezvous goes through env:// so rank 0 does not try to
    host a second store on MASTER_PORT.
    """
    kw = {}
    if "nccl" in backend:
        if device is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank))
                                  % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(device)
        if backend == "nccl":
            kw["device_id"] = device
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
        init_method = "env://"
    else:
        init_method = f"tcp://{master_addr}:{master_port}"
    dist.init_process_group(backend, init_method=init_method, rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=timeout_s), **kw)


@dataclass
class Groups:
    backend: str
    rank: int
    world_size: int
    pgs: dict                      # name -> ProcessGroup (or torch's non-member sentinel)
    members: dict = field(default_factory=dict)  # name -> tuple of global ranks, sorted

    LEADER = 1                     # global rank of the mesh leader (= mesh group rank 0)

    @property
    def world_pg(self):
        return self.pgs[WORLD]

    @property
    def mesh_pg(self):
        return self.pgs[MESH]

    def pg(self, name: str):
        try:
            return self.pgs[name]
        except KeyError:
            raise GroupMembershipError(f"unknown group {name!r} (have {sorted(self.pgs)})")

    def is_member(self, name: str, global_rank: int | None = None) -> bool:
        r = self.rank if global_rank is None else global_rank
        return r in self.members.get(name, ())

    def group_rank(self, name: str, global_rank: int | None = None) -> int:
        r = self.rank if global_rank is None else global_rank
        try:
            return self.members[name].index(r)
        except ValueError:
            raise GroupMembershipError(f"global rank {r} is not in {name} "
                                       f"{list(self.members[name])}") from None

    def global_rank(self, name: str, group_rank: int) -> int:
        m = self.members[name]
        if not 0 <= group_rank < len(m):
            raise GroupMembershipError(f"group rank {group_rank} out of range for {name} "
                                       f"(size {len(m)})")
        return m[group_rank]

    @property
    def is_leader(self) -> bool:
        return self.rank == self.LEADER


def make_groups(world_size: int, backend: str, timeout_s: float, *,
                mesh_backend: str | None = None, with_pp_pg: bool = False) -> Groups:
    """Create ``mesh_pg`` (and optionally ``pp_pg``) on EVERY rank, in the same order."""
    if world_size < 2:
        raise ValueError("lockstep needs rank0 plus at least one mesh rank (world_size >= 2)")
    to = timedelta(seconds=timeout_s)
    mesh = tuple(range(1, world_size))
    pgs = {WORLD: dist.group.WORLD}
    members = {WORLD: tuple(range(world_size))}
    pgs[MESH] = dist.new_group(ranks=list(mesh), timeout=to, backend=mesh_backend,
                               group_desc="mesh_pg")
    members[MESH] = mesh
    if with_pp_pg:
        pgs[PP] = dist.new_group(ranks=[0, 1], timeout=to, group_desc="pp_pg")
        members[PP] = (0, 1)
    return Groups(backend, dist.get_rank(), world_size, pgs, members)


# --------------------------------------------------------------------------- guarded comm

class _Completer(threading.Thread):
    """Calls ``work.wait()`` (GIL released) off the caller's thread, one work at a time,
    and signals an Event: the caller then waits on the Event in slices and can give up.
    Needed because a gloo send/recv Work only completes inside ``wait()``
    (``is_completed()`` stays False until then, measured on torch 2.13). If an op is
    abandoned this thread stays blocked for good; the process is about to exit anyway."""

    class Box:
        __slots__ = ("done", "error")

        def __init__(self):
            self.done, self.error = threading.Event(), None

    def __init__(self, rank: int):
        super().__init__(daemon=True, name=f"lockstep-completer-{rank}")
        self._q: queue.SimpleQueue = queue.SimpleQueue()

    def submit(self, work) -> "_Completer.Box":
        box = _Completer.Box()
        self._q.put((work, box))
        return box

    def run(self) -> None:
        while True:
            work, box = self._q.get()
            try:
                work.wait()
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                box.error = e
            box.done.set()


_ALL_GATHER_INTO = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

CheckFn = Callable[[str, str, object], None]
AbortPollFn = Callable[[], "str | None"]


class GuardedComm:
    """Communication that can only do what the table allows and can always end.

    ``check(op, group_name, peer_or_root)`` raises to refuse an op (called first);
    ``abort_poll()`` returns a reason to abandon a blocked op (or None);
    ``op_deadline_s`` bounds every op unless a call passes ``deadline_s``.
    ``seq[group_name]`` counts ops issued per group (for traces).
    """

    def __init__(self, groups: Groups, rank: int, check: CheckFn | None = None,
                 abort_poll: AbortPollFn | None = None, op_deadline_s: float = 10.0, *,
                 poll_min_s: float = 20e-6, poll_max_s: float = 1e-3, spin_s: float = 50e-6,
                 wait_mode: str = "auto"):
        self.groups, self.rank = groups, rank
        self.check = check or (lambda op, group, peer: None)
        self.abort_poll = abort_poll or (lambda: None)
        self.op_deadline_s = op_deadline_s
        self.poll_min_s, self.poll_max_s = poll_min_s, poll_max_s
        if wait_mode not in ("auto", "thread", "direct"):
            raise ValueError(f"wait_mode must be auto|thread|direct, got {wait_mode!r}")
        self.wait_mode, self.spin_s = wait_mode, spin_s
        self.seq: dict[str, int] = {}
        self.last_wait_s = 0.0
        self._abandoned: str | None = None
        self._completer: _Completer | None = None

    # -- the three guards ----------------------------------------------------------------
    def _enter(self, op: str, group: str, peer):
        if self._abandoned:
            raise CommError(f"{op} group={group} peer={_fmt(peer)} refused: an earlier op was "
                            f"abandoned ({self._abandoned}); exit the process")
        self.check(op, group, peer)                       # (a) table says no -> raise
        reason = self.abort_poll()
        if reason:                                        # never start an op after abort
            raise CommAborted(op, group, peer, reason)
        if not self.groups.is_member(group, self.rank):   # (b) stock torch: warn + None
            raise GroupMembershipError(
                f"{op} on {group}: rank {self.rank} is not a member "
                f"{list(self.groups.members.get(group, ()))}")
        if peer is not None:                              # group-rank range check
            peer = Peer(peer, self.groups.global_rank(group, peer))
        pg = self.groups.pg(group)
        self.seq[group] = self.seq.get(group, 0) + 1
        return pg, peer

    def _wait(self, work, op: str, group: str, peer, deadline_s: float | None,
              tensor: torch.Tensor) -> None:
        # (c) bounded wait: watch the abort flag and the deadline, abandon on either
        if work is None:
            raise GroupMembershipError(f"{op} on {group}: backend returned no work "
                                       f"(rank {self.rank} not in group?)")
        limit = self.op_deadline_s if deadline_s is None else deadline_s
        t0 = time.monotonic()
        try:
            how = self._how(op, tensor)
            if how == "poll":
                self._wait_poll(work, op, group, peer, limit, t0)
            elif how == "thread":
                self._wait_thread(work, op, group, peer, limit, t0)
            else:
                self._wait_direct(work, op, group, peer, limit, t0)
        except (CommAborted, OpDeadline) as e:
            self._abandoned = f"{type(e).__name__}: {e}"
            raise
        except CommError:
            raise
        except Exception as e:  # noqa: BLE001
            raise CommFailed(op, group, peer, e) from e
        finally:
            self.last_wait_s = time.monotonic() - t0

    def _how(self, op: str, tensor: torch.Tensor) -> str:
        gloo_p2p = tensor.device.type == "cpu" and op in ("send", "recv")
        if not gloo_p2p:
            return "poll"
        return "direct" if self.wait_mode == "auto" else self.wait_mode

    def _give_up(self, op, group, peer, limit, t0):
        reason = self.abort_poll()
        if reason:
            raise CommAborted(op, group, peer, reason)
        waited = time.monotonic() - t0
        if waited > limit:
            raise OpDeadline(op, group, peer, waited, limit)
        return limit - waited

    def _wait_poll(self, work, op, group, peer, limit, t0) -> None:
        nap, spin_until = self.poll_min_s, t0 + self.spin_s
        while not work.is_completed():
            if time.monotonic() < spin_until:   # short ops finish inside the spin
                continue
            self._give_up(op, group, peer, limit, t0)
            time.sleep(nap)
            nap = min(nap * 2, self.poll_max_s)
        work.wait()  # surfaces a backend error; on NCCL orders the current stream

    def _wait_direct(self, work, op, group, peer, limit, t0) -> None:
        try:
            work.wait(timedelta(seconds=limit))
        except Exception as e:  # noqa: BLE001
            waited = time.monotonic() - t0
            if waited >= 0.9 * limit:
                raise OpDeadline(op, group, peer, waited, limit) from e
            raise

    def _wait_thread(self, work, op, group, peer, limit, t0) -> None:
        if self._completer is None:
            self._completer = _Completer(self.rank)
            self._completer.start()
        box = self._completer.submit(work)
        while not box.done.wait(self.poll_max_s * 5):
            self._give_up(op, group, peer, limit, t0)
        if box.error is not None:
            raise box.error

    # -- ops -----------------------------------------------------------------------------
    def send(self, tensor: torch.Tensor, dst: int, group_name: str = WORLD, *,
             deadline_s: float | None = None) -> None:
        pg, p = self._enter("send", group_name, dst)
        self._wait(dist.isend(tensor, group=pg, group_dst=int(p)), "send", group_name, p,
                   deadline_s, tensor)

    def recv(self, tensor: torch.Tensor, src: int, group_name: str = WORLD, *,
             deadline_s: float | None = None) -> None:
        pg, p = self._enter("recv", group_name, src)
        self._wait(dist.irecv(tensor, group=pg, group_src=int(p)), "recv", group_name, p,
                   deadline_s, tensor)

    def broadcast(self, tensor: torch.Tensor, group_name: str, root_group_rank: int, *,
                  deadline_s: float | None = None) -> None:
        pg, p = self._enter("broadcast", group_name, root_group_rank)
        self._wait(dist.broadcast(tensor, group=pg, group_src=int(p), async_op=True),
                   "broadcast", group_name, p, deadline_s, tensor)

    def all_reduce(self, tensor: torch.Tensor, group_name: str, op=dist.ReduceOp.SUM, *,
                   deadline_s: float | None = None) -> None:
        pg, _ = self._enter("all_reduce", group_name, None)
        self._wait(dist.all_reduce(tensor, op=op, group=pg, async_op=True), "all_reduce",
                   group_name, None, deadline_s, tensor)

    def all_gather(self, tensor_list_or_out, tensor: torch.Tensor, group_name: str, *,
                   deadline_s: float | None = None) -> None:
        """``tensor_list_or_out``: a list of group-size tensors, or one output tensor of
        group-size x ``tensor`` (all_gather_into_tensor)."""
        pg, _ = self._enter("all_gather", group_name, None)
        if isinstance(tensor_list_or_out, torch.Tensor):
            work = _ALL_GATHER_INTO(tensor_list_or_out, tensor, group=pg, async_op=True)
        else:
            work = dist.all_gather(tensor_list_or_out, tensor, group=pg, async_op=True)
        self._wait(work, "all_gather", group_name, None, deadline_s, tensor)
