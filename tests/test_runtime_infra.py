"""Runtime infrastructure: launcher, side channel + watchdog, groups + the transport.

Every multi-process test runs under ``spawn_local``/``start_local`` with a hard deadline
well under 60 s, on 127.0.0.1 only, and kills its children; no test waits on a torch
default timeout. Release times are printed (run with ``-s`` to see them) and only loosely
asserted: TARGETS.md figures are measured by benchmark commands, not by timed unit tests.
The child functions live in ``runtime/_selftest.py``.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from lockstep.runtime.launch import (EXIT_ERROR, EXIT_RELEASED, LaunchResult, dist_env, kill_rank,
                            spawn_local, start_local)

DEADLINE_S = 40.0     # hard per-run deadline (spawning 3 torch processes takes ~2-4 s)
LOOSE_RELEASE_S = 3.0  # "fast": far below any torch timeout; the figure itself is printed


def _results(res: LaunchResult) -> dict[int, dict]:
    out = {}
    for r in res.ranks:
        for line in Path(r.stdout_path).read_text().splitlines():
            if line.startswith("RESULT "):
                out[r.rank] = json.loads(line[len("RESULT "):])
    return out


def _one_reason_line(res: LaunchResult, rank: int) -> str:
    lines = [ln for ln in res.ranks[rank].stderr_text().splitlines()
             if ln.startswith("lockstep: ")]
    assert len(lines) == 1, f"rank {rank} wrote {len(lines)} reason lines:\n{res.summary()}"
    return lines[0]


def _dead(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# --------------------------------------------------------------------------- no processes

def test_dist_env_reads_torchrun_and_lockstep_vars():
    tr = dist_env({"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "MASTER_ADDR": "10.0.0.1",
                   "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "abc"})
    assert (tr.rank, tr.world_size, tr.local_rank, tr.master_addr, tr.master_port) == \
        (2, 4, 2, "10.0.0.1", 29500)
    # torchrun without the agent store: the rank-0 fallback on MASTER_PORT+1
    assert (tr.side_port, tr.run_id, tr.launcher, tr.side_host) == \
        (29501, "abc", "torchrun", "rank0")
    ag = dist_env({"RANK": "1", "WORLD_SIZE": "3", "MASTER_ADDR": "10.0.0.1",
                   "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "abc",
                   "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RESTART_COUNT": "2"})
    assert (ag.side_addr, ag.side_port, ag.side_host, ag.side_prefix) == \
        ("10.0.0.1", 29500, "agent", "abc/attempt_2")     # the agent's own store
    ls = dist_env({"RANK": "0", "WORLD_SIZE": "3", "MASTER_PORT": "5000",
                   "LOCKSTEP_SIDE_PORT": "6000", "LOCKSTEP_RUN_ID": "r1"})
    assert (ls.side_port, ls.run_id, ls.launcher, ls.master_addr, ls.side_host) == \
        (6000, "r1", "lockstep", "127.0.0.1", "launcher")
    with pytest.raises(RuntimeError):
        dist_env({})


# --------------------------------------------------------------------------- launcher

def test_launcher_deadline_kills_a_rank_that_sleeps_forever(tmp_path):
    # The deadline is counted from the moment the ranks are started (res.start_time: the
    # side store is up, the Popens follow), not from the call: starting the store costs
    # the parent its first torch import (seconds on a loaded 2-core box), which is set-up,
    # not the waiting the deadline bounds.
    t0 = time.monotonic()
    res = spawn_local(2, "lockstep.runtime._selftest:sleep_forever", {}, deadline_s=3.0,
                      run_dir=tmp_path)
    setup, took = res.start_time - t0, res.end_time - res.start_time
    assert res.deadline_hit and res.alive_at_deadline == [1]
    assert res.ranks[0].returncode == 0 and not res.ranks[0].killed_at_deadline
    assert res.ranks[1].returncode == -signal.SIGKILL and res.ranks[1].killed_at_deadline
    assert all(_dead(r.pid) for r in res.ranks)
    # killed AT the deadline: not before it, and not later than reaping takes
    assert 3.0 <= took < 3.0 + 2.0, took
    print(f"\n[deadline] hard deadline 3.0 s -> returned {took:.2f} s after the ranks "
          f"started (store set-up {setup:.2f} s), alive_at_deadline={res.alive_at_deadline}")


def test_no_child_survives_an_exception_in_the_parent(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with start_local(2, "lockstep.runtime._selftest:sleep_forever", {}, run_dir=tmp_path) as run:
            pids = [r.pid for r in run.result.ranks]
            raise KeyboardInterrupt
    assert all(_dead(p) for p in pids)


# --------------------------------------------------------------------------- happy path

@pytest.fixture(scope="module")
def basic_run(tmp_path_factory):
    res = spawn_local(3, "lockstep.runtime._selftest:basic", {"pingpong": 50}, deadline_s=DEADLINE_S,
                      run_dir=tmp_path_factory.mktemp("basic"))
    assert res.ok, res.summary()
    return res


def test_mesh_broadcast_and_rank0_leader_p2p(basic_run):
    r = _results(basic_run)
    assert r[0]["pong"] == [50 + i for i in range(8)]       # 50 round trips, +1 each
    for k in (1, 2):
        assert r[k]["bcast"] == [7.0] * 4                   # root: mesh group rank 0 = leader
        assert r[k]["allreduce"] == [3.0, 3.0]
        assert r[k]["allgather"] == [1.0, 2.0]
        assert r[k]["allgather_into"] == [10.0, 20.0]
        assert r[k]["mesh_group_rank"] == k - 1
    assert r[1]["seq"] == {"world_pg": 100, "mesh_pg": 4}
    assert all(rr.reason_line() is None for rr in basic_run.ranks)  # clean: no exit lines
    print(f"\n[basic] guarded 8 x int64 ping-pong rank0<->leader on gloo: "
          f"{r[0]['pingpong_us']:.0f} us per round trip")


def test_non_member_collective_raises(basic_run):
    msg = _results(basic_run)[0]["non_member"]
    assert msg.startswith("GroupMembershipError:") and "mesh_pg" in msg


def test_a_send_completes_while_a_receive_stays_posted(tmp_path):
    """The comms thread's pattern: whichever op finishes first is taken (no head-of-line
    blocking behind the posted receive), and the completer reuses its threads."""
    res = spawn_local(2, "lockstep.runtime._selftest:two_in_flight",
                      {"delay_s": 0.3, "rounds": 3}, deadline_s=DEADLINE_S, run_dir=tmp_path)
    assert res.ok, res.summary()
    r = _results(res)[0]
    assert r["first"] == ["send"] * 3, r
    assert all(s < 0.25 for s in r["send_s"]), r     # not held until the answer at 0.3 s
    assert r["echoed"] and r["completer_threads"] == 2, r


# --------------------------------------------------------------------------- crash > hang

def test_check_rejection_raises_before_backend_and_releases_peers(tmp_path):
    res = spawn_local(3, "lockstep.runtime._selftest:check_reject", {}, deadline_s=DEADLINE_S,
                      run_dir=tmp_path)
    assert not res.deadline_hit, res.summary()
    assert res.ranks[1].returncode == EXIT_ERROR
    leader = _one_reason_line(res, 1)
    assert "exit=error via=own root=1/leader/table_refused" in leader, leader
    assert "TableRefused" in leader and "world_pg" in leader
    assert "backend all_reduce calls=0" in Path(res.ranks[1].stdout_path).read_text()
    assert res.cause["kind"] == "table_refused" and res.cause["rank"] == 1
    for k in (0, 2):
        # Released by the flag (watchdog) or by the closed pair (an echo, which waits for
        # the flag): either way the ONE root cause, which outlives the leader's process.
        line = _one_reason_line(res, k)
        assert res.ranks[k].returncode == EXIT_RELEASED, res.summary()
        assert " exit=released " in line and " root=1/leader/table_refused " in line, line
        assert "TableRefused: state=PHASE_B" in line, line
    dt = res.all_exited_after(res.ranks[1].exit_time)
    print(f"\n[check-reject] leader refused a world_pg all_reduce; all peers exited "
          f"{dt * 1e3:.0f} ms after the leader\n{res.summary()}")
    assert dt is not None and dt < LOOSE_RELEASE_S


@pytest.mark.parametrize("victim", [2, 0, 1], ids=["worker", "rank0", "leader"])
def test_kill9_mid_recv_releases_every_other_rank(tmp_path, victim):
    with start_local(3, "lockstep.runtime._selftest:block_for_kill", {}, run_dir=tmp_path) as run:
        end = time.monotonic() + 30.0
        while not all((tmp_path / f"ready.rank{r}").exists() for r in range(3)):
            assert time.monotonic() < end and len(run.alive()) == 3, run.result.summary()
            time.sleep(0.02)
        time.sleep(0.2)                   # every rank is now inside its blocking op
        t_fault = kill_rank(run, victim, signal.SIGKILL)
        res = run.wait(DEADLINE_S)
    survivors = [r for r in range(3) if r != victim]
    assert not res.deadline_hit, res.summary()
    assert res.ranks[victim].returncode == -signal.SIGKILL
    role = ["rank0", "leader", "worker"][victim]
    assert res.cause["kind"] == "killed" and res.cause["rank"] == victim, res.cause
    for k in survivors:   # every survivor names the killed rank, whatever released it
        assert res.ranks[k].returncode == EXIT_RELEASED, res.summary()
        line = _one_reason_line(res, k)
        assert f" root={victim}/{role}/killed " in line and "SIGKILL" in line, line
    dt = res.all_exited_after(t_fault, survivors)
    print(f"\n[kill-9 {['rank0', 'leader', 'worker'][victim]}] all survivors exited "
          f"{dt * 1e3:.0f} ms after the kill\n{res.summary()}")
    assert dt is not None and dt < LOOSE_RELEASE_S


def test_op_deadline_turns_a_silent_live_peer_into_an_error(tmp_path):
    res = spawn_local(2, "lockstep.runtime._selftest:op_deadline", {"deadline_s": 0.5},
                      deadline_s=DEADLINE_S, run_dir=tmp_path)
    assert not res.deadline_hit, res.summary()
    line = _one_reason_line(res, 1)
    assert res.ranks[1].returncode == EXIT_ERROR
    assert "OpDeadline: rank 1: recv group=world_pg peer=0 made no progress" in line, line
    assert " exit=error via=own root=1/leader/deadline " in line, line
    assert res.ranks[0].returncode == EXIT_RELEASED
    line0 = _one_reason_line(res, 0)
    assert " exit=released via=abort_flag root=1/leader/deadline " in line0, line0
    print(f"\n[op-deadline] rank 0 released "
          f"{(res.ranks[0].exit_time - res.ranks[1].exit_time) * 1e3:.0f} ms after rank 1")



def test_a_rank_killed_at_the_deadline_says_where_it_was(tmp_path):
    """Killed ranks write no exit line: the summary reads the tail of each trace (format
    2, a cut last line skipped) and says where it was, or that it never got going."""
    from lockstep.runtime.launch import RankResult
    (tmp_path / "rank1.jsonl").write_text(
        '{"c":"recv_envelope_payload","d":1521,"m":[1,51,51,0,2,0],"t":1609}\n'
        '{"d":22903,"l":"generator_call","t":20036}\n{"d":12,"l":"gen')
    res = LaunchResult(world_size=2, run_dir=str(tmp_path), run_id="x", master_port=0,
                       side_port=0, start_time=0.0, end_time=8.1, deadline_hit=True,
                       ranks=[RankResult(r, 0, -9, 8.1, True, "", str(tmp_path / "none"))
                              for r in range(2)])
    lines = res.summary().splitlines()
    assert "no exit line and no step traced (killed while starting up)" in lines[0]
    assert "no exit line; last step main.generator_call group=mesh_pg call_id=51" \
        in lines[1], lines[1]
    assert lines[2].startswith("hard deadline hit after 8.1 s")


def test_a_local_nccl_run_without_a_gpu_per_rank_is_refused_before_any_rank(
        tmp_path, monkeypatch):
    import torch
    from lockstep.model.config import Config
    from lockstep.runtime.run import run_local
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"'nccl' on one host needs 3 GPU\(s\).*1 visible"):
        run_local(Config(mesh=2), {"backend": "nccl"}, tmp_path)
    assert not list(tmp_path.glob("rank*"))
    (tmp_path / "afile").write_text("")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        run_local(Config(mesh=2), {}, tmp_path / "afile")


def test_init_world_on_nccl_without_cuda_names_the_cause(monkeypatch):
    import torch
    from lockstep.runtime.groups import init_world
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs CUDA and this torch .* sees no GPU"):
        init_world("nccl", 0, 2, "127.0.0.1", 1, 1.0)
