"""The scheduling policy: which enabled row a driver takes. Shared by the runtime's
interpreter (runtime/interp.py) and the trace simulator (conformance/simulate.py).

Not part of the spec: the tables say what is *allowed*; a driver still has to pick
one allowed row, and every pick is a behaviour the model allows (the checker explores
them all). The policy reads only row attributes (`choice`, `effect`, `Exit` ops) and the
table order, never a label:

* a row with `choice="fault"` is taken only where the run's fault-injection switch
  says: its `effect` names the injectable fault (model.config.INJECTABLE), at the chunk
  the switch gives (rank0: the chunk it would build next; a mesh rank: the chunk of
  the envelope it holds), on the rank it names (default: every rank that has the row);
* a row with `choice="env"` is an environment choice. A hard cut fires while rank0 has
  taken fewer cuts (`cuts`, a model variable) than are *due*: the scheduled cuts whose
  chunk index has been reached (`cuts` = a sorted tuple of k: once k chunks are built,
  before chunk k; k = `chunks` is after the last one, while SHUTDOWN drains; a k
  repeated is back-to-back cuts) plus the cuts asked for from outside through rank0's
  control interface (`requested`, a count the driver passes in: runtime/control.py).
  So the decision is a pure function of the model state and two counts, and a cut that
  cannot fire yet (its guard is false) stays due until it can. A heartbeat fires once
  idle `heartbeat_ms` (NOOP heartbeats are a user policy, off when unset);
* among what remains, a choice row that fires goes first (it is the event the run was
  asked for), then an exit, then the first row in table order: the tables list a
  state's local rows in the order a pipeline wants them (build envelope k+1 before
  decoding result k, which is what keeps both stages busy).

Rejected: a priority list of labels in each driver (what interp.py and simulate.py
each had): two copies of one decision, and a renamed row silently changed both.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

from .ops import Exit


class Policy(NamedTuple):
    fault: Optional[dict] = None        # {"name", "at_chunk", "rank"?} or None
    cuts: tuple = ()                    # scheduled cuts: sorted chunk indices
    heartbeat_ms: Optional[float] = None
    chunks: Optional[int] = None        # the stream's length: a cut at it is a drain cut

    @classmethod
    def from_opts(cls, opts, chunks: Optional[int] = None) -> "Policy":
        """From a run's options in their JSON form (RunOptions.to_dict(), run.json;
        the one-cut `hard_cut_at` of older run.json files is read too)."""
        from .runopts import RunOptions
        hb = opts.get("heartbeat_ms")
        sched = RunOptions.from_dict({k: opts[k] for k in ("cuts", "hard_cut_at")
                                      if k in opts}).cuts
        return cls(opts.get("fault") or None,
                   sched.chunks_at(chunks if chunks is not None else max(sched.at, default=0)),
                   None if hb is None else float(hb), chunks)


def cuts_due(v, policy: Policy, requested: int = 0) -> int:
    """How many hard cuts rank0 should have taken by now: the scheduled ones reached
    (a cut at `chunks` only once SHUTDOWN is queued) plus those requested from outside."""
    at, drain = subject_chunk(v), bool(getattr(v, "terminal_queued", False))
    due = sum(1 for k in policy.cuts
              if k <= at and (policy.chunks is None or k < policy.chunks or drain))
    return due + requested


def subject_chunk(v) -> int:
    """The chunk a fault switch is aimed at, from the local variables: rank0's next
    chunk, a mesh rank's current envelope's chunk (-1 when it holds none)."""
    if hasattr(v, "next_chunk"):
        return v.next_chunk
    env = getattr(v, "env", None)
    return env.chunk if env is not None else -1


def fires(row, v, rank: int, policy: Policy, idle_ms: float = 0.0,
          requested: int = 0) -> bool:
    """May a driver take `row` now? Always for protocol rows; for choice rows, only
    where the run's policy says (`requested`: hard cuts asked for from outside so far)."""
    if not row.choice:
        return True
    if row.choice == "fault":
        f = policy.fault
        return bool(f) and f.get("name") == row.effect and \
            f.get("rank") in (None, rank) and subject_chunk(v) == f.get("at_chunk", 0)
    if row.effect == "hard_cut":
        return v.cuts < cuts_due(v, policy, requested)
    if row.effect == "heartbeat":
        return policy.heartbeat_ms is not None and idle_ms >= policy.heartbeat_ms
    return False


def local_key(row, order: int) -> tuple:
    """Sort key among enabled local rows of one thread (`order`: position in its
    table state)."""
    return (0 if row.choice else 1, 0 if type(row.op) is Exit else 1, order)


def choose_local(rows):
    """The local row to take among enabled, firing rows (in table order)."""
    return min(enumerate(rows), key=lambda ir: local_key(ir[1], ir[0]))[1]
