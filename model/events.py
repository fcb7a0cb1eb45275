"""The trace event schema: an event is one model transition executed by one thread of one
rank, plus measurements. It belongs to the model side so that conformance checking
needs neither torch nor the runtime; the runtime writes it (runtime/trace.py), the
conformance checker reads it (conformance/).

One JSON object per line, per rank one file per segment (`rank{R}.jsonl` the newest,
`rank{R}.{N:06d}.jsonl` older ones), flushed per event. No tensors: ids, shapes,
digests and timings only. The runtime writes format 2 (model/tracefmt.py): each
segment begins with a checkpoint and a step line holds only what its row and the
counters do not imply; the long form below is what an event means, what the loader
rebuilds from either format, and what format 1 traces (traces/, conformance/testdata/)
hold line for line.

Transition events (`"ev": "step"`):
  rank, role, thread      who (role in rank0/leader/worker; thread main/comms)
  i                       per-(rank, thread) sequence number, from 0, no gaps
  src, label, dst         the table row executed ((thread, src, label) is unique but for
                          the rows a guard tells apart: last_generator_call)
  op                      "local" | "exit" | "send" | "recv" | "coll"
  peer                    send/recv: the peer role ("rank0" / "leader")
  chan_i                  send/recv: index of this message on its directed channel
  group, gseq             coll: group name and the group's collective sequence number
  msg                     the message summary sent/received/broadcast (Msg fields), or
                          the gathered vector of an all_gather (a list)
  t_ns                    time.monotonic_ns() at the end of the step (per rank clock;
                          never compared across ranks)
  dur_ns                  how long the step took
  meas                    optional measurements (queue depths, stage times, bytes, shapes)
Other events:
  {"ev": "start", ...}    config, world size, backend, pid, parity dict digest
  {"ev": "release", "reason": ..., "cause": {...}, "via": ...}   the rank was released
                          (abort flag, a lost heartbeat, an echo) or failed outside its
                          table; `cause` is the root cause (model/release.py), `via` its
                          own path ("own": it is the root cause); written before os._exit
  {"ev": "fault", "what": ...}       a fault-injection switch fired here
"""
from __future__ import annotations

from typing import Optional

from .guards import Msg, Rank0Vars

SCHEMA_VERSION = 1
STEP, START, RELEASE, FAULT = "step", "start", "release", "fault"
OPS = ("local", "exit", "send", "recv", "coll")


def op_class(op) -> str:
    return _OP_CLASS[type(op)]


def _op_classes() -> dict:
    from .ops import Coll, Exit, Local, Recv, Send
    return {Send: "send", Recv: "recv", Coll: "coll", Exit: "exit", Local: "local"}


_OP_CLASS = _op_classes()   # one per written step: built once, not per call


def msg_to_json(m) -> Optional[object]:
    if m is None:
        return None
    if isinstance(m, Msg):
        return {"action": int(m.action), "call_id": m.call_id, "chunk": m.chunk,
                "epoch": m.epoch, "calls": m.calls, "init_cache": bool(m.init_cache),
                **({} if m.valid else {"valid": False})}
    if isinstance(m, tuple):
        return [msg_to_json(x) for x in m]
    return m


def msg_from_json(d) -> object:
    if d is None:
        return None
    if isinstance(d, dict):
        return Msg(d["action"], d["call_id"], d["chunk"], d["epoch"], d["calls"],
                   d.get("init_cache", False), d.get("valid", True))
    if isinstance(d, list):
        return tuple(msg_from_json(x) for x in d)
    return d


def step_event(rank: int, role: str, thread: str, i: int, row, *, peer=None,
               chan_i=None, group=None, gseq=None, msg=None, t_ns=0, dur_ns=0,
               meas=None) -> dict:
    ev = {"ev": STEP, "rank": rank, "role": role, "thread": thread, "i": i,
          "src": row.src, "label": row.label, "dst": row.dst, "op": op_class(row.op),
          "t_ns": t_ns, "dur_ns": dur_ns}
    if peer is not None:
        ev["peer"], ev["chan_i"] = peer, chan_i
    if group is not None:
        ev["group"], ev["gseq"] = group, gseq
    if msg is not None:
        ev["msg"] = msg_to_json(msg)
    if meas:
        ev["meas"] = meas
    return ev


def local_subject(v, v2):
    """The message a rank0 local step moves through a queue, or None (pure). The
    runtime records it as the `msg` of rank0's local steps (which envelope was queued,
    which result decoded), so a duplicated or swapped decode is caught at that step."""
    if type(v) is not Rank0Vars or type(v2) is not Rank0Vars:
        return None
    if v2.epoch != v.epoch:          # a hard cut flushes queues: no single subject
        return None
    dq, dq2 = v.decode_q, v2.decode_q
    if len(dq2) == len(dq) - 1 and dq[1:] == dq2:
        return dq[0]
    if len(dq2) == len(dq) + 1 and dq2[:-1] == dq:
        return dq2[-1]
    sq, sq2 = v.send_q, v2.send_q
    if len(sq2) == len(sq) + 1 and sq2[:-1] == sq:
        return sq2[-1]
    if len(sq2) == len(sq) - 1 and sq[1:] == sq2:
        return sq[0]
    return None



# The trace model's one environment rule for what a rank did but never wrote.
UNWRITTEN = ("crashed", "failed", "released", "error_exit")
UNWRITTEN_RULE = """\
Unwritten completion. A rank writes its line after its op completed (runtime/interp.py,
under the process lock). A rank whose trace ends without an exit step (`ended` in
UNWRITTEN: killed by kill -9, possibly with its last line cut; failed or released,
os._exit'ed right after the release line; an untraced error exit) may therefore have
completed, after its last written line, its part of a transition whose other
participants wrote theirs: a rendezvous send or receive, a collective (every member of
a model collective takes part), or in buffered mode a send whose receive the peer wrote.
Conformance replays such a transition with the ended rank's part being the row the
model enables for it at that state; the written parts must match their lines exactly.
On the way to that part the ended rank may also have taken routing steps it never wrote:
a local row with no effect, no choice and no tag that is the only row it has enabled
(e.g. the leader's `expect_payload` between an envelope's header and its payload).
Nothing else is unwritten: a rank that wrote its exit step wrote every line before it,
and no other local step, no exit and no communication no other rank recorded is ever
assumed."""


# The trace model's environment rule for a send the transport completed on its own.
EAGER_SEND_RULE = """\
Eager send to a killed receiver. Under rendezvous p2p the model fires a send only with
its receiver's posted receive. The transport may complete a send before that: gloo
returns from a small frame's send once the bytes are handed to the connection, so the
sender writes its send line while the receiver is still busy elsewhere (before the
leader's comms thread: chaos trial 39, rank0's envelope header while the leader sent its
result; since: rank0's SHUTDOWN header while the leader's comms thread waits for inbox
room, conformance/testdata/kill_leader_after_eager_send). If the receiver is
then killed (its trace ends without an exit step and the replay has crashed it: `ended`
crashed or failed), the frame is never received. Conformance replays such a send, once
its receiver is crashed in the model and no receive of it was recorded, as the model's
buffered `send` transition of the sender's posted row (`eager_sends`): the sender's
guard, message and update are the model's, the frame stays in the channel to the dead
rank. Nothing else completes eagerly: a send to a receiver that is live in the model
(it wrote later lines, an exit, or a release) must pair with a receive."""


def eager_sends(model, s, p) -> list:
    """EAGER_SEND_RULE: the sends live process p has posted (guards true, the model's
    `posted`) to a peer that is crashed in `s`, as `send` transitions carrying the
    message the row makes. Model.step applies them like a buffered send (the sender's
    update, the frame appended to the channel). Pure."""
    from .semantics import CRASHED, LIVE, Tr
    pr = s.procs[p]
    if pr.status != LIVE:
        return []
    out = []
    for part in model.posted(p, pr)[1]:
        row = part[2]
        if s.procs[model.index[row.op.peer]].status == CRASHED:
            out.append(Tr("send", (part,), row.make(pr.v, model.cfg)))
    return out
