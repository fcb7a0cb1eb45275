"""python -m lockstep.gpubench as a user meets it without a GPU: the host cost by path
runs on gloo and prints every path, and the GPU bench itself says it needs one."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

PATHS = ("stock dist.all_reduce", "Transport.stream_all_reduce",
         "the interpreter's all_reduce", "window 0 (host sync per op)")


def _bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lockstep.gpubench", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_host_only_prints_every_paths_cost_and_the_table_checks_share():
    got = _bench("--host-only", "--host-ops", "200")
    assert got.returncode == 0, got.stderr
    out = got.stdout
    assert "200 ops of 8 floats" in out
    for path in PATHS:
        m = re.search(rf"{re.escape(path)}\s+CPU\s+([\d.]+) us .* wall\s+([\d.]+) us", out)
        assert m, f"{path!r} missing in:\n{out}"
        assert float(m.group(1)) > 0 and float(m.group(2)) > 0
    assert re.search(r"the table check and the call's count: [+-][\d.]+ us of CPU", out)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU bench runs where a GPU is")
def test_the_gpu_bench_without_a_gpu_says_so_and_exits_2():
    got = _bench("--chunks", "8", "--repeats", "1")
    assert got.returncode == 2
    assert "needs a CUDA device" in got.stderr


def test_a_bad_option_value_is_a_usage_error_naming_it():
    got = _bench("--host-ops", "-1")
    assert got.returncode == 2 and "--host-ops" in got.stderr
