"""Flight Recorder ingestion: a dump in the documented format that matches a run's
traces agrees; a stray collective, a wrong group, a missing op or an unfinished op is
reported. (Real NCCL dumps come from GPU runs; these dumps are built by hand.)"""
import json

import pytest

from lockstep.conformance.flight import check_flight, expected_ops
from lockstep.model.config import Config
from lockstep.runtime.run import run_local


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("fr")
    res = run_local(Config(mesh=2, chunks=3), {}, d, deadline_s=60)
    assert res.ok, res.summary()
    return d


def _dump(run_dir, rank):
    want = expected_ops(run_dir, rank)
    entries, i = [], 0
    for group, ops in want["colls"].items():
        desc = {"world_pg": "default_pg", "mesh_pg": "mesh_pg"}[group]
        for seq, op in enumerate(ops):
            entries.append({"record_id": i, "process_group": [str(len(desc)), desc],
                            "collective_seq_id": seq + 1, "p2p_seq_id": 0,
                            "profiling_name": f"nccl:{op}", "is_p2p": False,
                            "state": "completed"})
            i += 1
    for (group, op), n in want["p2p"].items():
        for k in range(n):
            entries.append({"record_id": i, "process_group": ["0", "default_pg"],
                            "collective_seq_id": 0, "p2p_seq_id": k + 1,
                            "profiling_name": f"nccl:{op} 0->1", "is_p2p": True,
                            "state": "completed"})
            i += 1
    return {"version": "2.x", "entries": entries}


def test_matching_dump_agrees(run):
    assert check_flight(run, {r: _dump(run, r) for r in range(3)}) == []


def test_stray_world_collective_is_reported(run):
    d = _dump(run, 2)
    d["entries"].append({"process_group": ["0", "default_pg"], "collective_seq_id": 99,
                         "profiling_name": "nccl:all_reduce", "state": "completed"})
    problems = check_flight(run, {2: d})
    assert any("world_pg" in p and "all_reduce" in p for p in problems), problems


def test_missing_broadcast_and_unfinished_op_are_reported(run):
    d = _dump(run, 1)
    mesh = [e for e in d["entries"] if e["process_group"][1] == "mesh_pg"]
    d["entries"].remove(next(e for e in mesh if e["profiling_name"] == "nccl:broadcast"))
    mesh[-1]["state"] = "started"
    problems = check_flight(run, {1: d})
    assert any("first difference" in p for p in problems), problems
    assert any("not completed" in p for p in problems), problems


def test_real_nccl_flight_recorder_dump_parses_as_one_chunk():
    """A real dump (torch 2.11, NCCL 2.28.9, one H200, conformance/testdata/fr_probe.py):
    the parity all_gather on world_pg, then one chunk's mesh ops with steps=2."""
    from pathlib import Path
    from lockstep.conformance.flight import backend_ops, load_dump
    d = load_dump(Path(__file__).resolve().parent.parent /
                  "conformance/testdata/fr_nccl_h200_rank0.json")
    ops = backend_ops(d)
    assert [op for _, op in ops["colls"]["world_pg"]] == ["all_gather"]
    assert [op for _, op in ops["colls"]["mesh_pg"]] == \
        ["broadcast", "broadcast", "all_gather", "all_reduce", "all_reduce"]
    assert ops["pending"] == []
