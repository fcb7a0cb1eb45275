"""conformance/idle.py: the mesh's idle time per chunk, by the steps it waits on (a
committed one-host trace, and the same trace with rank0's sends made slow by hand)."""
import json
import shutil
from pathlib import Path

import pytest

from lockstep.conformance.idle import idle_breakdown
from lockstep.conformance.load import load_run

TRACE = Path(__file__).resolve().parent.parent / "traces" / "cpu_gloo_depth1"


def _parts(b):
    return {p.what: p for p in b.parts}


def test_the_parts_of_the_leaders_window_add_up_to_its_idle_time():
    b = idle_breakdown(load_run(TRACE))
    assert b.chunks >= 5
    assert sum(p.ms for p in b.parts) == pytest.approx(b.idle_ms, rel=1e-9)
    assert not any(p.what.startswith("rank1.comms") for p in b.parts)   # main's window
    gap = _parts(b)["between rows"]
    who = {w.split()[0] for w, _ in gap.waits_on}
    assert who == {"rank0.main", "rank0.comms", "rank1.comms"}


def test_a_slow_send_of_rank0_is_named_as_what_the_mesh_waits_on(tmp_path):
    """rank0's envelope-header sends made to take 50 ms (each started 50 ms earlier in
    the trace): while the leader's main thread waits for its comms thread to queue the
    envelope, rank0 is inside that send, and the breakdown names that step of that rank."""
    def top(run):
        gap = _parts(idle_breakdown(load_run(run)))["between rows"]
        return gap, max(((w, ms) for w, ms in gap.waits_on if w.startswith("rank0.")),
                        key=lambda w: w[1])

    _, (was, _) = top(TRACE)
    assert was != "rank0.comms send_envelope_header"
    run = tmp_path / "slow_send"
    shutil.copytree(TRACE, run)
    lines = []
    for ln in (run / "rank0.jsonl").read_text().splitlines():
        e = json.loads(ln)
        if e.get("label") == "send_envelope_header":
            e["dur_ns"] += 50_000_000
        lines.append(json.dumps(e, separators=(",", ":"), sort_keys=True))
    (run / "rank0.jsonl").write_text("\n".join(lines) + "\n")
    gap, (what, ms) = top(run)
    assert what == "rank0.comms send_envelope_header"
    assert ms > 0.5 * gap.ms
