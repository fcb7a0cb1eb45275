"""The same runtime under torchrun (env://): a hard deadline kills the whole tree."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lockstep.conformance.report import conform, format_report
from lockstep.model.check import config_to_dict
from lockstep.model.config import Config
from lockstep.runtime.launch import free_port

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed")
def test_torchrun_env_launch_runs_and_conforms(tmp_path):
    args = tmp_path / "args.json"
    args.write_text(json.dumps({"config": config_to_dict(Config(mesh=2, chunks=4)),
                                "opts": {}}))
    env = dict(os.environ, LOCKSTEP_RUN_DIR=str(tmp_path), GLOO_SOCKET_IFNAME="lo")
    cmd = [TORCHRUN, "--nproc-per-node", "3", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "lockstep.runtime.worker_main",
           "--target", "lockstep.runtime.node:run_rank", "--args-file", str(args)]
    p = subprocess.Popen(cmd, env=env, cwd=Path(__file__).resolve().parent.parent,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         start_new_session=True, text=True)
    try:
        out, _ = p.communicate(timeout=90)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 0, out
    assert [c for c, _, _ in json.loads((tmp_path / "outputs.json").read_text())] == \
        [0, 1, 2, 3]
    rep = conform(tmp_path)
    assert rep.ok, format_report(rep)
    # the side channel is the agent's own store (TORCHELASTIC_USE_AGENT_STORE), no rank's
    starts = [json.loads(ln) for r in range(3)
              for ln in (tmp_path / f"rank{r}.jsonl").read_text().splitlines()
              if '"start"' in ln]
    assert [e["side_store"] for e in starts] == ["agent"] * 3, starts
