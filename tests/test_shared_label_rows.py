"""Two rows of one thread with one label at one control state (cond_flag_all's
`last_generator_call` at `gen`, to the conditional collective or not, told apart by
their guards): the replayer judges the row the recorded event took, by its dst."""
import json

from lockstep.conformance.load import load_run
from lockstep.conformance.replay import Replayer
from lockstep.conformance.report import conform, format_report
from lockstep.conformance.simulate import simulate
from lockstep.model.config import Config

LABEL = "last_generator_call"


def _flag_run(tmp_path, flag=True):
    d = tmp_path / "run"
    simulate(Config(mesh=2, chunks=3, cond_flag_all=flag, steps=2), d, seed=1)
    return d


class _Watch(Replayer):
    """Records, for every shared-label event it commits, the row `_row_at` names."""

    def _commit(self, tr, evs, s, unw=()):
        for e in evs:
            if e.label == LABEL:
                self.seen.append((e.dst, self._row_at(e, s)))
        return super()._commit(tr, evs, s, unw)


def test_the_second_row_of_a_shared_label_is_the_one_judged(tmp_path):
    d = _flag_run(tmp_path)
    rep = conform(d)
    assert rep.ok, format_report(rep)
    w = _Watch(load_run(d))
    w.seen = []
    assert w.replay().ok
    taken = [(dst, row) for dst, row in w.seen]
    assert taken and all(dst == "cond" for dst, _ in taken)
    # the first row with this label at `gen` goes elsewhere; the one named is the one
    # taken: its guard holds where the first row's does not
    for dst, row in taken:
        assert row.dst == "cond" and row.guard.__name__ == "last_call_then_cond"


def test_a_recorded_dst_of_the_other_row_is_rejected(tmp_path):
    d = _flag_run(tmp_path, flag=False)   # no flag: the row to `cond` is never enabled
    p = d / "rank2.jsonl"
    evs = [json.loads(x) for x in p.read_text().splitlines()]
    k = next(k for k, e in enumerate(evs) if e.get("label") == LABEL)
    evs[k]["dst"] = "cond"
    p.write_text("".join(json.dumps(e) + "\n" for e in evs))
    rep = conform(d)
    assert not rep.ok, format_report(rep)
    div = rep.result.divergence
    assert div.rank == 2 and div.event.line == k + 1, div.text()
    assert "worker1's row 'last_generator_call' at 'gen' leads to 'wait_hdr', not to " \
        "the recorded 'cond'" in div.reason, div.text()
