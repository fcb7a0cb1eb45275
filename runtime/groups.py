"""Process groups: their names, members and rank translation.

``world_pg`` holds every rank; ``mesh_pg = new_group([1..N])`` holds the mesh; an
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

Every op on these groups goes through runtime/transport.py (the table's check, bounded
completion, group-rank addressing, one error type per cause).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

WORLD = "world_pg"
MESH = "mesh_pg"
PP = "pp_pg"


# --------------------------------------------------------------------------- errors

class GroupMembershipError(RuntimeError):
    """An unknown group, a rank outside a group, or a group rank out of range (stock
    torch only warns and returns None for a non-member's collective)."""


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
        if not torch.cuda.is_available():   # else an AttributeError deep in set_device
            raise RuntimeError(f"backend {backend!r} needs CUDA and this torch "
                               f"({torch.__version__}) sees no GPU "
                               "(torch.cuda.is_available() is False); on CPU use gloo")
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
