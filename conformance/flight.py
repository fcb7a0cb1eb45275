"""PyTorch Flight Recorder ingestion: check the backend-level operation sequence of an
NCCL run against what the lockstep traces (and so the model) say was issued.

The runtime issues exactly one backend operation per model message or collective:
a header or a packed payload is one send/recv or one broadcast; an all_gather is one
all_gather; a Phase-B generator call is the workload's collectives (the demo workload:
one all_reduce). So from the per-rank lockstep traces we know, per process group, the
ordered list of collective ops, and per directed pair, the number of sends. The Flight
Recorder dump (`TORCH_NCCL_TRACE_BUFFER_SIZE=N`, written by the runtime at exit as
`fr_rank{R}.json`, the JSON of `torch._C._distributed_c10d._dump_nccl_trace_json`)
says what the backend actually saw: `entries[]` with `process_group` [name, desc],
`collective_seq_id`, `p2p_seq_id`, `profiling_name` ("nccl:all_reduce",
"nccl:send 0->1", "nccl:recv 1<-0"), `input_sizes`, `state`. Any op the backend saw
that the model did not issue (a stray collective, a wrong group), any op missing, or
any op left "scheduled"/"started" at the end is reported. Group descs map to model
groups: "default_pg" -> world_pg, "mesh_pg" -> mesh_pg (runtime/groups.py sets it).
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from lockstep.model.tracefmt import loads

DESC_TO_GROUP = {"default_pg": "world_pg", "mesh_pg": "mesh_pg"}
# model collective kind -> backend op names issued for it, in order
KIND_TO_BACKEND = {"parity": ["all_gather"], "counts": ["all_gather"],
                   "env_hdr": ["broadcast"], "env_pay": ["broadcast"],
                   "gen": ["all_reduce"], "cond": ["all_reduce"]}


class FlightError(ValueError):
    pass


def load_dump(path) -> dict:
    try:
        d = loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise FlightError(f"{path}: not a Flight Recorder JSON dump ({e})") from None
    if not isinstance(d, dict) or not isinstance(d.get("entries", []), list):
        raise FlightError(f"{path}: missing 'entries' list")
    return d


def _op_name(profiling_name: str) -> str:
    name = profiling_name.split(":", 1)[-1].strip()
    return name.split(" ", 1)[0]          # "send 0->1" -> "send"


def backend_ops(dump: dict) -> dict:
    """group -> [(seq_id, op)] for collectives; ("p2p", op) -> count for send/recv."""
    colls, p2p, pending = defaultdict(list), defaultdict(int), []
    for e in dump.get("entries", []):
        pg = e.get("process_group") or ["?", "?"]
        group = DESC_TO_GROUP.get(pg[1] if len(pg) > 1 else "?", pg[1] if len(pg) > 1
                                  else "?")
        op = _op_name(e.get("profiling_name", ""))
        if e.get("state") not in (None, "completed"):
            pending.append(f"{group} {e.get('profiling_name')} seq "
                           f"{e.get('collective_seq_id')}: {e.get('state')}")
        if e.get("is_p2p") or op in ("send", "recv"):
            p2p[(group, op)] += 1
        else:
            colls[group].append((e.get("collective_seq_id", 0), op))
    for g in colls:
        colls[g].sort()
    return {"colls": colls, "p2p": p2p, "pending": pending}


def expected_ops(run_dir, rank: int) -> dict:
    """What the lockstep trace of `rank` says it issued."""
    from .load import step_views
    colls, p2p = defaultdict(list), defaultdict(int)
    for e in step_views(run_dir, rank):
        if e.get("op") == "coll":
            kind = _kind_of(e)
            colls[e["group"]] += KIND_TO_BACKEND.get(kind, [kind])
        elif e.get("op") in ("send", "recv"):
            p2p[("world_pg", e["op"])] += 1
    return {"colls": colls, "p2p": p2p}


def _kind_of(e) -> str:
    label = e["label"]
    if label.startswith(("parity",)):
        return "parity"
    if label.startswith("counts"):
        return "counts"
    if "generator_call" in label:
        return "gen"
    if label == "conditional_collective":
        return "cond"
    if "payload" in label:
        return "env_pay"
    return "env_hdr"


def check_flight(run_dir, dumps: dict) -> list:
    """dumps: rank -> parsed dump. Returns human-readable problems (empty = agrees)."""
    problems = []
    for rank, dump in sorted(dumps.items()):
        got, want = backend_ops(dump), expected_ops(run_dir, rank)
        for p in got["pending"]:
            problems.append(f"rank {rank}: backend op not completed: {p}")
        for group in sorted(set(got["colls"]) | set(want["colls"])):
            seen = [op for _, op in got["colls"].get(group, [])]
            exp = want["colls"].get(group, [])
            if seen != exp:
                i = next((k for k, (a, b) in enumerate(zip(seen, exp)) if a != b),
                         min(len(seen), len(exp)))
                problems.append(
                    f"rank {rank} {group}: backend saw {len(seen)} collectives, the model "
                    f"issued {len(exp)}; first difference at #{i}: backend "
                    f"{seen[i] if i < len(seen) else '(none)'} vs model "
                    f"{exp[i] if i < len(exp) else '(none)'}")
        # one backend send/recv per model message (header, or packed payload)
        for key in sorted(set(got["p2p"]) | set(want["p2p"])):
            if got["p2p"].get(key, 0) != want["p2p"].get(key, 0):
                problems.append(f"rank {rank} {key[0]} {key[1]}: backend saw "
                                f"{got['p2p'].get(key, 0)}, model steps "
                                f"{want['p2p'].get(key, 0)} messages")
    return problems


def check_run(run_dir) -> list:
    dumps = {int(p.stem.split("rank")[1]): load_dump(p)
             for p in Path(run_dir).glob("fr_rank*.json")}
    if not dumps:
        return ["no fr_rank*.json dumps in the run directory (NCCL runs only)"]
    return check_flight(run_dir, dumps)
