"""The run's fork server (runtime/forkserver.py): each rank is still a process of its own,
in its own session, with its own environment, files and exit status; a dead server takes
its ranks down and the run ends at once; a server that cannot start says why. Every run
has a hard deadline and kills its children (spawn_local / start_local)."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from lockstep.runtime.forkserver import ERR_NAME, ForkServer, ForkServerDied
from lockstep.runtime.launch import spawn_local, start_local
from test_runtime_infra import _dead, _results

DEADLINE_S = 40.0


@pytest.mark.parametrize("forked", [True, False], ids=["forked", "own_interpreter"])
def test_each_rank_is_a_process_of_its_own_with_its_own_environment(tmp_path, forked):
    env = {"LOCKSTEP_TEST_MARK": "m1"}
    if not forked:
        env["LOCKSTEP_FORKSERVER"] = "0"
    res = spawn_local(3, "lockstep.runtime._selftest:describe",
                      {"echo_env": ["LOCKSTEP_TEST_MARK"]}, deadline_s=DEADLINE_S,
                      run_dir=tmp_path, env=env)
    assert [r.returncode for r in res.ranks] == [0, 0, 0], res.summary()
    got = _results(res)
    assert sorted(got) == [0, 1, 2]
    run_dir = str(tmp_path.resolve())
    for rank, d in got.items():
        assert d["pid"] == res.ranks[rank].pid
        assert d["pgid"] == d["sid"] == d["pid"]           # a session of its own
        assert d["cwd"] == run_dir and d["path0"] == run_dir
        assert d["main"] == "lockstep.runtime.worker_main"
        assert d["argv"][0].endswith("worker_main.py")
        assert d["argv"][1:3] == ["--target", "lockstep.runtime._selftest:describe"]
        assert d["env"]["RANK"] == str(rank) and d["env"]["WORLD_SIZE"] == "3"
        assert d["env"]["LOCKSTEP_RUN_DIR"] == run_dir
        assert d["env"]["LOCKSTEP_TEST_MARK"] == "m1"
    parents = {d["ppid"] for d in got.values()}
    if forked:   # one parent for all, not this process: the server, gone now
        (server,) = parents
        assert server != os.getpid() and _dead(server)
    else:
        assert parents == {os.getpid()}
    assert not (tmp_path / ERR_NAME).exists()      # an empty server stderr is not kept


def test_a_killed_fork_server_takes_its_ranks_down_and_the_run_ends(tmp_path):
    """kill -9 of the server (an OOM killer's choice, say): its ranks die with it
    (PR_SET_PDEATHSIG), each is reported killed, and wait() returns long before its
    deadline instead of waiting on exits nobody will report."""
    with start_local(3, "lockstep.runtime._selftest:sleep_forever", {},
                     run_dir=tmp_path) as run:
        pids = [r.pid for r in run.result.ranks]
        server = run.server_pid
        os.kill(server, signal.SIGKILL)
        t0 = time.monotonic()
        res = run.wait(DEADLINE_S)
        took = time.monotonic() - t0
        cause = run.abort_cause()       # the root cause names the server, not "reaped"
    assert not res.deadline_hit, res.summary()
    assert took < DEADLINE_S / 2, took
    assert all(r.returncode is not None for r in res.ranks)
    assert [r.returncode for r in res.ranks][1:] == [-signal.SIGKILL] * 2
    assert cause is not None and cause["kind"] == "killed", cause
    assert f"its parent died first: the fork server (pid {server}) exited" in \
        cause["detail"], cause
    deadline = time.monotonic() + 10
    while not all(_dead(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(_dead(p) for p in pids)


@pytest.mark.parametrize("torch_init,said,err_kept", [
    ("raise ImportError('no torch in this site')", "no torch in this site", True),
    ("import time; time.sleep(3600)", "did not fork within 1 s", False),
], ids=["import_fails", "import_hangs"])
def test_a_fork_server_that_cannot_start_says_why(tmp_path, monkeypatch, torch_init, said,
                                                  err_kept):
    """A server whose torch import fails, or never ends: the first rank's spawn raises
    with the server's last stderr line, or names the bound it passed; no hang."""
    from lockstep.runtime import forkserver
    monkeypatch.setattr(forkserver, "START_TIMEOUT_S", 1.0)
    fake = tmp_path / "site" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(torch_init + "\n")
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(tmp_path / "site"), root, os.environ.get("PYTHONPATH", "")]))
    server = ForkServer(env, tmp_path)
    try:
        with pytest.raises(ForkServerDied, match=said):
            server.spawn(env, ["--target", "x:y"], str(tmp_path),
                         str(tmp_path / "r.out"), str(tmp_path / "r.err"))
    finally:
        server.close(kill=True)
    assert (tmp_path / ERR_NAME).exists() == err_kept   # kept when it says something
