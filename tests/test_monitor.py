"""The online monitor: every op of every thread is checked against the current state's
rows before the backend is called (no backend is needed to see it refuse)."""
import pytest
import torch

from lockstep.model.config import Config
from lockstep.model.ops import (COUNTS, ENV_HDR, GEN, MESH, PARITY, RES_HDR, WORLD, Coll,
                                Recv, Send)
from lockstep.model.runopts import RunOptions
from lockstep.model.semantics import Model
from lockstep.model.tables import shipped_tables
from lockstep.runtime.interp import RankInterpreter, TableViolation, WrongGroup


def _interp(p, mesh=2):
    return RankInterpreter(Model(Config(mesh=mesh), shipped_tables()), p, None, None, None,
                           abort_poll=lambda: None, opts=RunOptions(), parity={})


def test_control_plane_ops_are_checked_on_every_thread():
    r0 = _interp(0)
    r0._monitor(0, Coll("all_gather", WORLD, None, PARITY))       # handshake: allowed
    with pytest.raises(TableViolation, match=r"rank0\.comms: send\(leader, env_hdr\) "
                       r"refused in state 'idle/idle'; its rows allow \[\]"):
        r0._monitor(1, Send("leader", ENV_HDR))
    with pytest.raises(TableViolation, match="recv"):
        r0._monitor(1, Recv("leader", (RES_HDR,)))               # nothing awaited yet
    r0.v = r0.v._replace(awaiting=1)
    r0._monitor(1, Recv("leader", (RES_HDR,)))                   # a result is awaited
    lead = _interp(1)
    with pytest.raises(WrongGroup, match="broadcast"):
        lead._monitor(0, Coll("broadcast", MESH, 0, ENV_HDR))     # before the handshake


def test_workload_collectives_on_the_wrong_group_are_refused_before_the_backend():
    w = _interp(2)
    w.pcs[0] = "gen"
    w.v = w.v._replace(planned=2)
    w._tl.where = (0, GEN)
    with pytest.raises(WrongGroup, match=r"all_reduce\(world_pg, gen\) refused in state "
                       r"'gen'; its rows allow \['all_reduce\(mesh_pg, gen\)'"):
        w.guarded_all_reduce(torch.zeros(1), WORLD)
    w._table_check("all_reduce", MESH, None, None)               # the row's group: fine
    with pytest.raises(WrongGroup):                               # right group, wrong kind
        w._monitor(0, Coll("all_gather", MESH, None, COUNTS))


def test_a_control_plane_backend_op_must_be_the_op_of_its_row():
    """A row the monitor allowed performs exactly one backend op, and the transport's
    check confirms it is that row's (op, group, peer or root as a group rank)."""
    r0 = _interp(0)
    send = Send("leader", ENV_HDR)
    r0._table_check("send", WORLD, 1, send)
    with pytest.raises(TableViolation, match=r"send group=world_pg peer=2 is not the "
                       r"backend op of its row send\(leader, env_hdr\)"):
        r0._table_check("send", WORLD, 2, send)                   # another peer
    with pytest.raises(TableViolation):
        r0._table_check("recv", WORLD, 1, send)                   # another op
    lead = _interp(1)
    bcast = Coll("broadcast", MESH, 0, ENV_HDR)
    lead._table_check("broadcast", MESH, 0, bcast)
    with pytest.raises(TableViolation):                           # root as a global rank
        lead._table_check("broadcast", MESH, 1, bcast)
