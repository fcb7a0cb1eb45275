"""conformance/idle.py: the mesh's idle time per chunk, by the steps it waits on, and
conformance/timeline.py: one chunk's steps, every rank, as offsets in the leader's
window (a committed one-host trace, and the same trace with one of rank0's steps made
slow by hand)."""
import json
import shutil
from pathlib import Path

import pytest

from lockstep.conformance.idle import idle_breakdown
from lockstep.conformance.load import load_run
from lockstep.conformance.timeline import chunk_timeline, lines as timeline_lines

TRACE = Path(__file__).resolve().parent.parent / "traces" / "cpu_gloo_depth1"


def _slowed(tmp_path, label, add_ns):
    """The committed trace with rank0's `label` steps made add_ns longer (each started
    that much earlier)."""
    run = tmp_path / f"slow_{label}"
    shutil.copytree(TRACE, run)
    lines = []
    for ln in (run / "rank0.jsonl").read_text().splitlines():
        e = json.loads(ln)
        if e.get("label") == label:
            e["dur_ns"] += add_ns
        lines.append(json.dumps(e, separators=(",", ":"), sort_keys=True))
    (run / "rank0.jsonl").write_text("\n".join(lines) + "\n")
    return run


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
    gap, (what, ms) = top(_slowed(tmp_path, "send_envelope_header", 50_000_000))
    assert what == "rank0.comms send_envelope_header"
    assert ms > 0.5 * gap.ms


def _by_what(entries):
    return {e.what: e for e in entries}


def test_the_depth1_chain_is_in_order():
    tl = _by_what(chunk_timeline(load_run(TRACE)))
    chain = ["rank1.main queue_result", "rank1.comms send_result_header",
             "rank0.comms recv_result_payload", "rank0.main decode_result",
             "rank0.main build_envelope", "rank0.comms send_envelope_header",
             "rank1.comms recv_envelope_payload", "rank1.main bcast_envelope_header",
             "rank2.main recv_envelope_payload", "rank1.main last_generator_call"]
    starts = [tl[w].start_us for w in chain]
    assert starts == sorted(starts)
    assert "rank1.main generator_call" in tl and all(e.end_us >= e.start_us
                                                    for e in tl.values())
    assert len(timeline_lines(list(tl.values()))) > len(chain)


def test_a_slow_step_shows_as_its_own_duration(tmp_path):
    run = _slowed(tmp_path, "decode_result", 40_000_000)
    was = _by_what(chunk_timeline(load_run(TRACE)))["rank0.main decode_result"]
    now = _by_what(chunk_timeline(load_run(run)))["rank0.main decode_result"]
    assert now.end_us - now.start_us >= 40_000 > was.end_us - was.start_us
