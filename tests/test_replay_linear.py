"""The replay visits each recorded event a bounded number of times, whatever the trace's
length: a driver step that scans a rank's remaining events (a count of what is left,
asked at every waiting collective) makes the replay quadratic, 12 CPU s per 100k events
instead of 1. Counted deterministically: the replayer's per-rank event lists are
replaced by lists that count every element read by index or slice."""
from lockstep.conformance.bench import generate
from lockstep.conformance.load import load_run
from lockstep.conformance.replay import Replayer


class CountingList(list):
    reads = 0

    def __getitem__(self, i):
        got = list.__getitem__(self, i)
        CountingList.reads += len(got) if isinstance(i, slice) else 1
        return got


def reads_per_event(tmp_path, events: int) -> float:
    generate(events, tmp_path / str(events))
    rep = Replayer(load_run(tmp_path / str(events)))
    rep.events = [CountingList(evs) for evs in rep.events]
    CountingList.reads = 0
    res = rep.replay()
    assert res.ok, res.divergence
    return CountingList.reads / res.events


def test_replay_reads_each_event_a_bounded_number_of_times(tmp_path):
    short, long = reads_per_event(tmp_path, 2_000), reads_per_event(tmp_path, 8_000)
    # linear: the same reads per event at 4x the length (a quadratic replay: ~4x more)
    assert long < 1.25 * short, (short, long)
