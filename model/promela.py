"""Export the transition tables to Promela, so that SPIN can check the checker.

`export_promela(cfg)` walks the rows of `model_for(cfg).tables` (the shipped tables, or a
mutation's: a mutation is just other tables) and writes one Promela model for the
configuration. Nothing about the protocol is written by hand here: every row becomes an
alternative of its thread's `do` loop, and its guard / make / accept / update is translated
through the small mapping tables below (function name -> Promela text). A row whose guard,
update, make or accept has no mapping, an unknown tag, a local-variable field without a
layout, or a shape of row the encoding below does not cover raises `PromelaExportError`: a
new guard can never be skipped silently.

The encoding (the rules of model.semantics, re-implemented in Promela, not copied)
  processes    one proctype per thread: rank0_main and rank0_comms share rank0's local
               variables (global `r0`), the leader and every worker have `mv[p]`. `status[p]`
               is ST_LIVE / OK / ERROR / CRASHED / ABORTED; `pc[thread]` the control state
               (0 once the process is gone). Msg fields are small ints (typedef Msg).
  p2p          rendezvous = a channel of size 0, buffered = a channel of size `eager`. A
               rendezvous sender fires only when the receiver is *posted* (its thread sits in
               a state with a guard-true receive from this sender): Promela's own `ch!` would
               commit a thread to one alternative, while a table thread that both sends and
               receives (rank0's comms) must keep both offers open. The receiver takes any
               kind and dispatches on (state, kind, accept); nothing matching is a framing
               error, exactly as the semantics' "posted receive of another kind".
  collectives  a per-group arrival counter and a per-member op signature: each member
               arrives on its own step (committing to the collective), the last arrival
               checks every signature (mismatch -> assert) and publishes the value, then
               every member departs on its own step, dispatching on accept. So SPIN stores
               intermediate states the semantics' single joint transition does not have.
  faults       a crash alternative in every live thread while `faults_left > 0`; the
               watchdog proctype sets `abort` once a process crashed or exited with an error
               while another lives; with `abort` set the only thing a thread can do is be
               released (ABORTED).
  properties   a hang (no statement executable, a live process blocked) is an *invalid end
               state*: only a finished thread, the watchdog and the monitor's wait sit at a
               valid end. Before SPIN reports it, the monitor (`timeout`) names it the way
               model.properties does (collective_mismatch, crash_hang, deadlock, stranding)
               with a printf that a trail replay shows. Transition properties are asserts on
               never-set bits `V_<property>`, so pan's "assertion violated V_call_count" names
               the property. Every process gone is a clean end (model.properties'
               _check_end; rank0's progress is checked on its `end` row).
  canonical    a dead process's variables, a consumed message, a departed collective's
               value are zeroed, so that two states the semantics equates are one SPIN state.
  d_step       deterministic bookkeeping (updates, checks, zeroing) is one d_step: the same
               states, a pan.c that gcc -O2 compiles ~4x faster. Never around a dispatch
               `if` (a d_step would resolve its nondeterminism by taking the first branch).

Drift: a mapped guard/update/make/accept whose source changed (docstrings aside) makes the
export raise (FINGERPRINTS); a change in model.semantics / model.properties warns
(SemanticsDrift), and the SPIN agreement tests say whether the encoding still holds.

    python -m lockstep.model.promela [--mesh N --chunks N ... --mutation NAME] > model.pml
    python -m lockstep.model.promela --fingerprints

Designs considered and rejected: a collective as one atomic step of an engine proctype
(it would mirror the semantics too closely to be an independent check, and the arrival
counter is how a real backend sees it); Promela's `ch!` as the guard of a send (commits
the comms thread to sending, a deadlock the protocol does not have).
Differences from the semantics that do not change verdicts are listed in docs/crosscheck.md.
"""
from __future__ import annotations

import ast
import hashlib
import re
import textwrap
import warnings
from typing import NamedTuple, Optional

from lockstep.accel import definition_source

from .config import INJECTABLE, Config
from .contract import Action
from .guards import MeshVars, Rank0Vars
from .ops import Coll, Exit, Local, Recv, Send, op_text
from .semantics import DEAD_THREAD, GROUPS, Model
from .mutations import mutated_tables
from .tables import FINAL, THREADS, Tables


class PromelaExportError(Exception):
    """A table uses something the Promela export does not know how to translate."""


# ------------------------------------------------------------------ codes

ST = {"live": 1, "ok": 2, "error": 3, "crashed": 4, "aborted": 5}
PROPERTIES = ("deadlock", "stranding", "collective_mismatch", "framing_error",
              "queue_bound", "send_after_terminal", "stale_epoch_decode", "call_count", "id_monotonic",
              "output_order", "progress", "crash_hang", "export_capacity")
KNOWN_TAGS = {"emit", "wire_ids", "phase_b_done", "end", "join_comms", "commit",
              "phase_a", "fault", "cut", "enqueue", "outgoing"}
FAILURES = ("", "preflight failed", "result rejected")
# Mutations the export refuses, and why (the explorer and the proofs still check them).
UNEXPORTABLE = {"comms_broadcasts_header": "two leader threads issue collectives; the "
                "collective arrival encoding has one collective thread per process"}
MSG_FIELDS = ("action", "call_id", "chunk", "epoch", "calls", "initc", "ok")


def _viol(prop: str) -> str:
    return f"assert(V_{prop})"


def _when(cond: str, prop: str) -> str:
    return f"if :: ({cond}) -> {_viol(prop)} :: else fi"


# ------------------------------------------------------------------ variable layouts
# Every field of a role's NamedTuple must have a layout; a new field raises.

R0_LAYOUT = {
    "epoch": "byte", "next_chunk": "byte", "next_call": "byte", "cuts": "byte",
    "init_cache": "bit", "inflight": "short", "send_q": "queue", "decode_q": "queue",
    "env_out": "optmsg", "res_in": "optmsg", "awaiting": "short",
    "terminal_queued": "bit", "terminal_sent": "bit", "built": "byte", "emitted": "byte",
    "last_emitted": "short", "noops_left": "byte", "flag": "bit", "inject": "inject",
    "failure": "failure"}
MESH_LAYOUT = {
    "env": "optmsg", "planned": "byte", "calls_done": "byte", "seen_call": "short",
    "seen_chunk": "short", "rejected": "bit", "flag": "bit", "plan_delta": "byte",
    "bad_result": "bit", "inject": "inject", "inbox": "queue", "outbox": "queue",
    "env_in": "optmsg", "res_out": "optmsg", "terminal_in": "bit", "terminal_sent": "bit",
    "results_done": "bit"}


class Ctx(NamedTuple):
    """What a mapping entry may refer to.

    v    the role's variables ("r0" or "mv[2]")   kind  "r0" | "mesh"
    m    the message (a Msg lvalue) for accept / update, "" if none
    gv   the gathered vector (an array name) for all_gather accepts / updates
    gn   the group size (entries of gv)           cfg   the configuration
    caps queue capacities {"send_q": n, "decode_q": n}
    """
    v: str
    kind: str
    cfg: Config
    caps: dict
    m: str = ""
    gv: str = ""
    gn: int = 0


# ------------------------------------------------------------------ Promela helpers

def _push(c: Ctx, q: str, *fields) -> str:
    cap = c.caps[q]
    slot = f"{c.v}.{q}[{c.v}.{q}_n]"
    setter = "msg_set7" if len(fields) == len(MSG_FIELDS) else "msg_set"
    return (f"if :: {c.v}.{q}_n < {cap} -> {setter}({slot}, {', '.join(map(str, fields))}); "
            f"{c.v}.{q}_n++ :: else -> {_viol('export_capacity')} fi")


def _push_cp(c: Ctx, q: str, src: str) -> str:
    return _push(c, q, *(f"{src}.{f}" for f in MSG_FIELDS))


def _pop(c: Ctx, q: str) -> str:
    cap = c.caps[q]
    out = [f"msg_cp({c.v}.{q}[{i}], {c.v}.{q}[{i + 1}])" for i in range(cap - 1)]
    out.append(f"msg_zero({c.v}.{q}[{cap - 1}])")
    out.append(f"{c.v}.{q}_n--")
    return "; ".join(out)


def _clear(c: Ctx, q: str) -> str:
    return "; ".join([f"msg_zero({c.v}.{q}[{i}])" for i in range(c.caps[q])] +
                     [f"{c.v}.{q}_n = 0"])


def _queue_terminal(c: Ctx, action: int) -> str:
    return "; ".join([_push(c, "send_q", action, f"{c.v}.next_call", -1, f"{c.v}.epoch", 0, 0),
                      f"{c.v}.next_call++", f"{c.v}.terminal_queued = 1"])


def _count_infer(c: Ctx, q: str) -> str:
    return " + ".join(f"(({c.v}.{q}_n > {i} && {c.v}.{q}[{i}].action == INFER) -> 1 : 0)"
                      for i in range(c.caps[q]))


def _hard_cut(c: Ctx) -> str:
    v = c.v
    return "; ".join([f"{v}.epoch++", f"{v}.cuts++", f"{v}.init_cache = 1",
                      f"{v}.inflight = {v}.inflight - ({_count_infer(c, 'send_q')})",
                      _clear(c, "send_q"), _clear(c, "decode_q"),
                      f"{v}.built = 0", f"{v}.emitted = 0"])


def _can_build(c: Ctx) -> str:
    v, cfg = c.v, c.cfg
    parts = [f"!{v}.terminal_queued", f"{v}.next_chunk < {cfg.chunks}",
             f"{v}.inflight < {cfg.d_in}", f"{v}.decode_q_n < {cfg.d_out}"]
    if cfg.regime == "R0a":
        parts.append(f"({v}.built == 0 || {v}.last_emitted == {v}.next_chunk - 1)")
    return "(" + " && ".join(parts) + ")"


def _all(c: Ctx, fmt: str) -> str:
    return "(" + " && ".join(fmt.format(x=f"{c.gv}[{i}]") for i in range(c.gn)) + ")"


def _store_env(c: Ctx) -> str:
    return f"msg_cp({c.v}.env, {c.m}); {c.v}.env_has = 1"


def _got_envelope_header(c: Ctx) -> str:
    v, m = c.v, c.m
    return (f"if :: {m}.call_id > {v}.seen_call -> {v}.seen_call = {m}.call_id :: else fi; "
            f"if :: {m}.action == INFER && {m}.chunk > {v}.seen_chunk -> "
            f"{v}.seen_chunk = {m}.chunk :: else fi; "
            f"msg_cp({v}.env_in, {m}); {v}.env_in_has = 1; "
            f"if :: {m}.action == SHUTDOWN || {m}.action == ERROR -> {v}.terminal_in = 1 "
            f":: else fi")


def _error_result_fields(c: Ctx) -> tuple:
    v = c.v
    return ("ERROR", f"{v}.env.call_id", f"{v}.env.chunk", f"{v}.env.epoch",
            f"{v}.calls_done", 0)


def _queue_error_result(c: Ctx) -> str:
    return "; ".join([_push(c, "outbox", *_error_result_fields(c)), _clear(c, "inbox"),
                      f"{c.v}.results_done = 1"])


def _rotate_last_first(c: Ctx, q: str) -> str:
    """The queue's last element moved to its head (the mutation error_result_first)."""
    v, cap = c.v, c.caps[q]
    branches = []
    for n in range(2, cap + 1):
        body = [f"msg_cp(tmp_rot, {v}.{q}[{n - 1}])"] + \
            [f"msg_cp({v}.{q}[{i}], {v}.{q}[{i - 1}])" for i in range(n - 1, 0, -1)] + \
            [f"msg_cp({v}.{q}[0], tmp_rot)", "msg_zero(tmp_rot)"]
        branches.append(f":: {v}.{q}_n == {n} -> " + "; ".join(body))
    return "if " + " ".join(branches) + " :: else fi"


# ------------------------------------------------------------------ the mapping tables
# name -> (which variables it reads: "r0" | "mesh" | "any", Promela text builder).
# Guards give an expression over the role's variables.

GUARDS: dict = {
    "can_build": ("r0", _can_build),
    "can_build_ok": ("r0", _can_build),
    "can_build_preflight_fails": ("r0", _can_build),
    "can_cut": ("r0", lambda c: f"({c.v}.cuts < {c.cfg.hard_cut} && "
                                f"!{c.v}.terminal_queued && {c.v}.next_chunk >= 1)"),
    "can_cut_in_drain": ("r0", lambda c: f"({c.v}.cuts < {c.cfg.hard_cut})"),
    "head_current": ("r0", lambda c: f"({c.v}.decode_q_n > 0 && {c.v}.decode_q[0].epoch == "
                                     f"{c.v}.epoch && {c.v}.decode_q[0].ok && "
                                     f"{c.v}.decode_q[0].calls == {c.cfg.calls})"),
    "head_stale": ("r0", lambda c: f"({c.v}.decode_q_n > 0 && {c.v}.decode_q[0].epoch != "
                                   f"{c.v}.epoch)"),
    "head_rejected": ("r0", lambda c: f"({c.v}.decode_q_n > 0 && {c.v}.decode_q[0].epoch "
                                      f"== {c.v}.epoch && (!{c.v}.decode_q[0].ok || "
                                      f"{c.v}.decode_q[0].calls != {c.cfg.calls}))"),
    "can_build_bad": ("r0", lambda c: f"({c.v}.inj_rank0_bad_envelope && {_can_build(c)})"),
    "bad_result_armed": ("mesh", lambda c: f"({c.v}.inj_leader_bad_result)"),
    "has_result": ("r0", lambda c: f"({c.v}.decode_q_n > 0)"),
    "can_heartbeat": ("r0", lambda c: f"({c.v}.noops_left > 0 && !{c.v}.terminal_queued)"),
    "all_built": ("r0", lambda c: f"({c.v}.next_chunk >= {c.cfg.chunks} && "
                                  f"!{c.v}.terminal_queued)"),
    "can_take": ("r0", lambda c: f"({c.v}.send_q_n > 0 && !{c.v}.terminal_sent)"),
    "out_has_payload": ("r0", lambda c: f"({c.v}.env_out.action == INFER)"),
    "out_header_only": ("r0", lambda c: f"({c.v}.env_out.action != INFER)"),
    "expecting_result": ("r0", lambda c: f"({c.v}.awaiting > 0)"),
    "decode_room": ("r0", lambda c: f"({c.v}.decode_q_n < {c.cfg.d_out})"),
    "comms_finished": ("r0", lambda c: f"({c.v}.terminal_sent && {c.v}.awaiting == 0 && "
                                       f"!{c.v}.env_out_has && !{c.v}.res_in_has)"),
    "drained": ("r0", lambda c: f"({c.v}.inflight == 0 && {c.v}.decode_q_n == 0)"),
    "envelope_valid": ("mesh", lambda c: f"({c.v}.env.ok && {c.v}.env.calls == "
                                         f"{c.cfg.calls})"),
    "envelope_invalid": ("mesh", lambda c: f"!({c.v}.env.ok && {c.v}.env.calls == "
                                           f"{c.cfg.calls})"),
    "env_not_infer": ("mesh", lambda c: f"({c.v}.env.action != INFER)"),
    "rejected_by_leader": ("mesh", lambda c: f"({c.v}.env.action == ERROR && "
                                             f"{c.v}.rejected)"),
    "error_from_rank0": ("mesh", lambda c: f"({c.v}.env.action == ERROR && "
                                           f"!{c.v}.rejected)"),
    "more_calls": ("mesh", lambda c: f"({c.v}.calls_done + 1 < {c.v}.planned)"),
    "last_call": ("mesh", lambda c: f"({c.v}.calls_done + 1 == {c.v}.planned && "
                                    f"!{c.v}.flag)"),
    "last_call_then_cond": ("mesh", lambda c: f"({c.v}.calls_done + 1 == {c.v}.planned && "
                                              f"{c.v}.flag)"),
    "wrong_group_requested": ("mesh", lambda c: f"({c.v}.inj_wrong_group)"),
    "receiving": ("mesh", lambda c: f"(!{c.v}.terminal_in)"),
    "inbox_room": ("mesh", lambda c: f"({c.v}.inbox_n < {c.cfg.leader_in} && "
                                     f"!{c.v}.results_done)"),
    "results_over": ("mesh", lambda c: f"({c.v}.results_done)"),
    "can_take_result": ("mesh", lambda c: f"({c.v}.outbox_n > 0 && !{c.v}.terminal_sent)"),
    "out_is_result": ("mesh", lambda c: f"({c.v}.res_out.action == INFER)"),
    "out_is_error": ("mesh", lambda c: f"({c.v}.res_out.action == ERROR)"),
    "leader_comms_finished": ("mesh", lambda c: f"({c.v}.results_done && "
                                                f"{c.v}.outbox_n == 0 && !{c.v}.res_out_has "
                                                f"&& !{c.v}.env_in_has)"),
    "inbox_has_infer": ("mesh", lambda c: f"({c.v}.inbox_n > 0 && "
                                          f"{c.v}.inbox[0].action == INFER)"),
    "inbox_has_header_only": ("mesh", lambda c: f"({c.v}.inbox_n > 0 && "
                                                f"{c.v}.inbox[0].action != INFER)"),
    "outbox_room": ("mesh", lambda c: f"({c.v}.outbox_n < {c.cfg.leader_out})"),
    "outbox_nonempty": ("mesh", lambda c: f"({c.v}.outbox_n > 0)"),
    # mutation-only guards
    "late_preflight_ok": ("r0", lambda c: f"(!{c.v}.inj_rank0_preflight)"),
    "late_preflight_raises": ("r0", lambda c: f"({c.v}.inj_rank0_preflight)"),
    "expecting_result_before_terminal": ("r0", lambda c: f"({c.v}.awaiting > 0 && "
                                                         f"!{c.v}.terminal_sent)"),
    "terminal_was_sent": ("r0", lambda c: f"({c.v}.terminal_sent && !{c.v}.env_out_has && "
                                          f"!{c.v}.res_in_has)"),
    "decode_queue_empty": ("r0", lambda c: f"({c.v}.decode_q_n == 0)"),
}
for _a in Action:
    GUARDS[f"env_is_{_a.name}"] = ("mesh", lambda c, a=_a.name: f"({c.v}.env.action == {a})")

# Accepts: an expression over the variables and the message. "msg": a p2p message or a
# broadcast value (c.m); "vec": an all_gather vector (c.gv, c.gn).
ACCEPTS: dict = {
    "is_error": ("any", "msg", lambda c: f"({c.m}.action == ERROR)"),
    "is_infer": ("any", "msg", lambda c: f"({c.m}.action == INFER)"),
    "is_header_only": ("any", "msg", lambda c: f"({c.m}.action != INFER)"),
    "parity_agrees": ("any", "vec", lambda c: _all(c, "{x} == " + f"{c.gv}[0]")),
    "parity_differs": ("any", "vec", lambda c: "!" + _all(c, "{x} == " + f"{c.gv}[0]")),
    "counts_agree": ("mesh", "vec", lambda c: _all(c, "{x} == " + f"{c.v}.env.calls")),
    "counts_differ": ("mesh", "vec", lambda c: "!" + _all(c, "{x} == " + f"{c.v}.env.calls")),
}
for _a in Action:
    ACCEPTS[f"msg_is_{_a.name}"] = ("any", "msg",
                                    lambda c, a=_a.name: f"({c.m}.action == {a})")

# Makes: "msg" -> statements filling the Msg lvalue `d`; "int" -> an expression.
MAKES: dict = {
    "outgoing": ("r0", "msg", lambda c, d: f"msg_cp({d}, {c.v}.env_out)"),
    "direct_noop": ("r0", "msg", lambda c, d: f"msg_set({d}, NOOP, {c.v}.next_call, -1, "
                                              f"{c.v}.epoch, 0, 0)"),
    # the envelope a Phase-A row builds (its update enqueues the same message): made
    # for the runtime's effect on a local row, never exchanged, so the export needs it
    # only to exist; its fields are enqueue_envelope's
    "new_envelope": ("r0", "msg", lambda c, d: f"msg_set({d}, INFER, {c.v}.next_call, "
                                               f"{c.v}.next_chunk, {c.v}.epoch, "
                                               f"{c.cfg.calls}, {c.v}.init_cache)"),
    "current_envelope": ("mesh", "msg", lambda c, d: f"msg_cp({d}, {c.v}.env)"),
    "result": ("mesh", "msg", lambda c, d: f"msg_set7({d}, INFER, {c.v}.env.call_id, "
                                           f"{c.v}.env.chunk, {c.v}.env.epoch, "
                                           f"{c.v}.calls_done, 0, !{c.v}.bad_result)"),
    "new_bad_envelope": ("r0", "msg", lambda c, d: f"msg_set7({d}, INFER, {c.v}.next_call, "
                                                   f"{c.v}.next_chunk, {c.v}.epoch, "
                                                   f"{c.cfg.calls}, {c.v}.init_cache, 0)"),
    "error_result": ("mesh", "msg", lambda c, d: f"msg_set({d}, ERROR, {c.v}.env.call_id, "
                                                 f"{c.v}.env.chunk, {c.v}.env.epoch, 0, 0)"),
    "outgoing_result": ("mesh", "msg", lambda c, d: f"msg_cp({d}, {c.v}.res_out)"),
    "envelope_in": ("mesh", "msg", lambda c, d: f"msg_cp({d}, {c.v}.env_in)"),
    "parity_key": ("any", "int", lambda c: f"{c.v}.flag"),
    "plan_calls": ("mesh", "int", lambda c: f"({c.v}.env.calls + {c.v}.plan_delta)"),
    "contribution": ("any", "int", lambda c: "0"),
}

# Updates: statements; the second field says which message they read (None, "msg", "vec").
UPDATES: dict = {
    "enqueue_envelope": ("r0", None, lambda c: "; ".join([
        _push(c, "send_q", "INFER", f"{c.v}.next_call", f"{c.v}.next_chunk", f"{c.v}.epoch",
              c.cfg.calls, f"{c.v}.init_cache"),
        f"{c.v}.next_call++", f"{c.v}.next_chunk++", f"{c.v}.inflight++",
        f"{c.v}.init_cache = 0", f"{c.v}.built++"])),
    "enqueue_bad_envelope": ("r0", None, lambda c: "; ".join([
        f"{c.v}.inj_rank0_bad_envelope = 0",
        _push(c, "send_q", "INFER", f"{c.v}.next_call", f"{c.v}.next_chunk", f"{c.v}.epoch",
              c.cfg.calls, f"{c.v}.init_cache", 0),
        f"{c.v}.next_call++", f"{c.v}.next_chunk++", f"{c.v}.inflight++",
        f"{c.v}.init_cache = 0", f"{c.v}.built++"])),
    "spoil_result": ("mesh", None, lambda c: f"{c.v}.bad_result = 1; "
                                             f"{c.v}.inj_leader_bad_result = 0"),
    "fail_preflight": ("r0", None, lambda c: "; ".join([
        f"{c.v}.inj_rank0_preflight = 0",
        f"{c.v}.failure = {FAILURES.index('preflight failed')}",
        _queue_terminal(c, "ERROR")])),
    "hard_cut": ("r0", None, _hard_cut),
    "hard_cut_in_drain": ("r0", None, lambda c: "; ".join([
        f"{c.v}.epoch++", f"{c.v}.cuts++", f"{c.v}.init_cache = 1", _clear(c, "decode_q"),
        f"{c.v}.built = 0", f"{c.v}.emitted = 0"])),
    "hard_cut_resetting_chunks": ("r0", None, lambda c: _hard_cut(c) +
                                  f"; {c.v}.next_chunk = 0"),
    "decode_head": ("r0", None, lambda c: "; ".join([
        f"{c.v}.emitted++", f"{c.v}.last_emitted = {c.v}.decode_q[0].chunk",
        _pop(c, "decode_q")])),
    "drop_head": ("r0", None, lambda c: _pop(c, "decode_q")),
    "reject_head": ("r0", None, lambda c: "; ".join([
        _pop(c, "decode_q"),
        f"{c.v}.failure = {FAILURES.index('result rejected')}",
        _queue_terminal(c, "ERROR")])),
    "reject_head_in_drain": ("r0", None, lambda c: "; ".join([
        _pop(c, "decode_q"), f"{c.v}.failure = {FAILURES.index('result rejected')}"])),
    "queue_noop": ("r0", None, lambda c: "; ".join([
        _push(c, "send_q", "NOOP", f"{c.v}.next_call", -1, f"{c.v}.epoch", 0, 0),
        f"{c.v}.next_call++", f"{c.v}.noops_left--"])),
    "spend_noop": ("r0", None, lambda c: f"{c.v}.next_call++; {c.v}.noops_left--"),
    "queue_shutdown": ("r0", None, lambda c: _queue_terminal(c, "SHUTDOWN")),
    "take_envelope": ("r0", None, lambda c: "; ".join([
        f"msg_cp({c.v}.env_out, {c.v}.send_q[0])", f"{c.v}.env_out_has = 1",
        _pop(c, "send_q")])),
    "header_only_sent": ("r0", None, lambda c: "; ".join([
        f"if :: {c.v}.env_out.action == SHUTDOWN || {c.v}.env_out.action == ERROR -> "
        f"{c.v}.terminal_sent = 1 :: else fi",
        f"msg_zero({c.v}.env_out)", f"{c.v}.env_out_has = 0"])),
    "payload_sent": ("r0", None, lambda c: f"msg_zero({c.v}.env_out); {c.v}.env_out_has = 0; "
                                           f"{c.v}.awaiting++"),
    "got_result_header": ("r0", "msg", lambda c: f"msg_cp({c.v}.res_in, {c.m}); "
                                                 f"{c.v}.res_in_has = 1"),
    "got_result_payload": ("r0", "msg", lambda c: f"msg_cp({c.v}.res_in, {c.m}); "
                                                  f"{c.v}.res_in_has = 1; {c.v}.awaiting--; "
                                                  f"{c.v}.inflight--"),
    "put_result": ("r0", None, lambda c: "; ".join([
        _push_cp(c, "decode_q", f"{c.v}.res_in"), f"msg_zero({c.v}.res_in)",
        f"{c.v}.res_in_has = 0"])),
    "got_envelope_header": ("mesh", "msg", _got_envelope_header),
    "reject_envelope": ("mesh", None, lambda c: "; ".join([
        f"msg_set({c.v}.env, ERROR, {c.v}.env.call_id, {c.v}.env.chunk, {c.v}.env.epoch, "
        f"0, 0)", f"{c.v}.rejected = 1", f"{c.v}.inj_leader_reject = 0"])),
    "store_envelope": ("mesh", "msg", _store_env),
    "start_phase_b": ("mesh", "vec", lambda c: f"{c.v}.planned = {c.gv}[0]; "
                                               f"{c.v}.calls_done = 0"),
    "start_phase_b_own": ("mesh", None, lambda c: f"{c.v}.planned = {c.v}.env.calls + "
                                                  f"{c.v}.plan_delta; {c.v}.calls_done = 0"),
    "start_phase_b_inferred": ("mesh", None, lambda c: f"{c.v}.planned = {c.cfg.steps} + "
                                                       f"{c.v}.plan_delta; "
                                                       f"{c.v}.calls_done = 0"),
    "call_done": ("mesh", None, lambda c: f"{c.v}.calls_done++"),
    "store_envelope_in": ("mesh", "msg", lambda c: f"msg_cp({c.v}.env_in, {c.m}); "
                                                   f"{c.v}.env_in_has = 1"),
    "queue_envelope": ("mesh", None, lambda c: "; ".join([
        _push_cp(c, "inbox", f"{c.v}.env_in"), f"msg_zero({c.v}.env_in)",
        f"{c.v}.env_in_has = 0"])),
    "take_result": ("mesh", None, lambda c: "; ".join([
        f"msg_cp({c.v}.res_out, {c.v}.outbox[0])", f"{c.v}.res_out_has = 1",
        _pop(c, "outbox")])),
    "drop_envelope_in": ("mesh", None, lambda c: f"msg_zero({c.v}.env_in); "
                                                 f"{c.v}.env_in_has = 0"),
    "result_sent": ("mesh", None, lambda c: f"msg_zero({c.v}.res_out); "
                                            f"{c.v}.res_out_has = 0"),
    "error_result_sent": ("mesh", None, lambda c: f"msg_zero({c.v}.res_out); "
                                                  f"{c.v}.res_out_has = 0; "
                                                  f"{c.v}.terminal_sent = 1"),
    "finish_results": ("mesh", "msg", lambda c: f"{c.v}.results_done = 1"),
    "take_envelope_in": ("mesh", None, lambda c: "; ".join([
        f"msg_cp({c.v}.env, {c.v}.inbox[0])", f"{c.v}.env_has = 1", _pop(c, "inbox"),
        f"{c.v}.rejected = 0"])),
    "queue_result": ("mesh", None, lambda c: _push(
        c, "outbox", "INFER", f"{c.v}.env.call_id", f"{c.v}.env.chunk", f"{c.v}.env.epoch",
        f"{c.v}.calls_done", 0, f"!{c.v}.bad_result")),
    "queue_error_result": ("mesh", None, _queue_error_result),
    "queue_error_result_first": ("mesh", None, lambda c: _queue_error_result(c) + "; " +
                                 _rotate_last_first(c, "outbox")),
}

# Property predicates that model.properties evaluates with guard functions.
PROPERTY_EXPR = {
    # not ids_valid(v, cfg, msg)
    "id_monotonic": lambda c: (f"({c.m}.call_id <= {c.v}.seen_call || ({c.m}.action == "
                               f"INFER && {c.m}.chunk <= {c.v}.seen_chunk))"),
}


def _if(branches, otherwise: str, indent: str = "\t\t") -> str:
    """A Promela `if` whose branches are (condition, [statements]), one per line."""
    out = ["if"]
    for cond, body in branches:
        out.append(f"{indent}:: {cond} ->")
        out.append(f"{indent}\t" + f";\n{indent}\t".join(body))
    out.append(f"{indent}:: else -> {otherwise}")
    out.append(f"{indent}fi")
    return "\n".join(out)


def _lookup(table: dict, fn, what: str, row, kind: str):
    if fn is None:
        return None
    name = getattr(fn, "__name__", repr(fn))
    if getattr(fn, "__module__", None) != "lockstep.model.guards" or name not in table:
        raise PromelaExportError(
            f"row {row.thread}:{row.src} --{row.label}--> uses {what} {name!r} "
            f"({getattr(fn, '__module__', '?')}) which has no Promela mapping; add one to "
            f"model/promela.py {what.upper()}S")
    entry = table[name]
    if entry[0] not in ("any", kind):
        raise PromelaExportError(f"{what} {name!r} reads {entry[0]} variables but row "
                                 f"{row.label} belongs to a {kind} role")
    return entry


# ------------------------------------------------------------------ the exporter

class _Export:
    def __init__(self, cfg: Config, collectives: str = "split",
                 fault_budget: str = "exact", tables: Optional[dict] = None,
                 dstep: bool = True):
        if collectives not in ("split", "joint"):
            raise ValueError("collectives must be 'split' or 'joint'")
        if fault_budget not in ("exact", "upto"):
            raise ValueError("fault_budget must be 'exact' or 'upto'")
        self.fault_budget = fault_budget
        self.dstep = dstep
        check_fingerprints()
        self.cfg = cfg
        self.collectives = collectives
        self.m = m = Model(cfg, mutated_tables(cfg) if tables is None
                                else Tables(tables, cfg.mutation))
        self.n = m.n
        self.init = m.initial_state()
        self.threads = []          # (p, t) flattened; index = thread id
        for p in range(self.n):
            for t in range(len(THREADS[m.roles[p]])):
                self.threads.append((p, t))
        self.tid = {pt: i for i, pt in enumerate(self.threads)}
        self.caps = {"send_q": cfg.d_in + cfg.noops + 2, "decode_q": cfg.d_out + 1,
                     "inbox": cfg.leader_in + 1, "outbox": cfg.leader_out + 1}
        self.kinds = {}
        self.sigs = {}
        self.reasons = {"": 0}
        self.pcs = {}              # tid -> {name: code}
        self.out = []
        self._check_tables()

    # ---------------------------------------------------------------- checks & codes
    def _rows(self, p, t):
        for pc, rows in self.m.tables[p][t].items():
            for r in rows:
                yield pc, r

    def _check_tables(self):
        m = self.m
        for p in range(self.n):
            kind = self._kind(p)
            for t in range(len(m.tables[p])):
                tid = self.tid[(p, t)]
                names = {}
                for pc in [self.init.procs[p].pcs[t], FINAL, DEAD_THREAD]:
                    names.setdefault(pc, len(names) + 1)
                coll_at = {}
                for pc, r in self._rows(p, t):
                    if pc in (FINAL, DEAD_THREAD):
                        raise PromelaExportError(f"row {r.label} leaves reserved state {pc}")
                    names.setdefault(pc, len(names) + 1)
                    names.setdefault(r.dst, len(names) + 1)
                    bad = set(r.tags) - KNOWN_TAGS
                    if bad:
                        raise PromelaExportError(f"row {r.label} has unknown tags {bad}: "
                                                 "a property the export does not check")
                    self._translate_row_parts(r, kind)   # raises on unmapped functions
                    op = r.op
                    if isinstance(op, (Send, Recv)):
                        if op.peer not in m.index or m.roles[p] == "worker":
                            raise PromelaExportError(f"p2p row {r.label}: only rank0 <-> "
                                                     "leader channels are modelled")
                        for k in ((op.kind,) if isinstance(op, Send) else op.kinds):
                            self.kinds.setdefault(k, len(self.kinds) + 1)
                    elif isinstance(op, Coll):
                        key = (op.group, op.op, op.root, op.kind)
                        self.sigs.setdefault(key, len(self.sigs) + 1)
                        prev = coll_at.setdefault(pc, key)
                        if prev != key:
                            raise PromelaExportError(
                                f"{m.names[p]} state {pc} offers two different collectives "
                                f"{prev} and {key}; the arrival encoding needs one")
                    elif isinstance(op, Exit):
                        self.reasons.setdefault(op.reason, len(self.reasons))
                    elif not isinstance(op, Local):
                        raise PromelaExportError(f"row {r.label}: unknown op {op!r}")
                self.pcs[tid] = names
                idents = {self._pcname(tid, n) for n in names}
                if len(idents) != len(names):
                    raise PromelaExportError(f"state names of {m.names[p]} collide in Promela")
            colls = {t for t in range(len(m.tables[p])) for _, r in self._rows(p, t)
                     if isinstance(r.op, Coll)}
            if len(colls) > 1:
                raise PromelaExportError(f"{m.names[p]}: collectives from two threads")
        for role, recv_threads in self._recv_threads().items():
            if len(recv_threads) > 1:
                raise PromelaExportError(f"{role}: two threads receive from one peer")
        for why in ("killed (crash fault)", "released by abort flag"):
            self.reasons.setdefault(why, len(self.reasons))
        if set(Rank0Vars._fields) != set(R0_LAYOUT):
            raise PromelaExportError(f"Rank0Vars fields without a Promela layout: "
                                     f"{set(Rank0Vars._fields) ^ set(R0_LAYOUT)}")
        if set(MeshVars._fields) != set(MESH_LAYOUT):
            raise PromelaExportError(f"MeshVars fields without a Promela layout: "
                                     f"{set(MeshVars._fields) ^ set(MESH_LAYOUT)}")

    def _recv_threads(self):
        out = {}
        for p in range(self.n):
            for t in range(len(self.m.tables[p])):
                for _, r in self._rows(p, t):
                    if isinstance(r.op, Recv):
                        out.setdefault((p, r.op.peer), set()).add(t)
        return out

    def _kind(self, p):
        return "r0" if self.m.roles[p] == "rank0" else "mesh"

    def _var(self, p):
        return "r0" if p == 0 else f"mv[{p}]"

    def _ctx(self, p, **kw):
        return Ctx(self._var(p), self._kind(p), self.cfg, self.caps, **kw)

    def _translate_row_parts(self, r, kind):
        _lookup(GUARDS, r.guard, "guard", r, kind)
        _lookup(UPDATES, r.update, "update", r, kind)
        _lookup(MAKES, r.make, "make", r, kind)
        _lookup(ACCEPTS, r.accept, "accept", r, kind)

    def _pcname(self, tid, name):
        p, t = self.threads[tid]
        s = re.sub(r"[^A-Za-z0-9]", "_", name)
        return f"PC_{self.m.names[p]}_{THREADS[self.m.roles[p]][t]}_{s}"

    def _pc(self, tid, name):
        return self._pcname(tid, name)

    def _proc_name(self, tid):
        p, t = self.threads[tid]
        return f"{self.m.names[p]}_{THREADS[self.m.roles[p]][t]}"

    # ---------------------------------------------------------------- row pieces
    def guard(self, p, r):
        e = _lookup(GUARDS, r.guard, "guard", r, self._kind(p))
        return "1" if e is None else e[1](self._ctx(p))

    def accept(self, p, r, msgref=None, vec=None, gn=0):
        e = _lookup(ACCEPTS, r.accept, "accept", r, self._kind(p))
        if e is None:
            return "1"
        if e[1] == "msg" and msgref is None or e[1] == "vec" and vec is None:
            raise PromelaExportError(f"accept {r.accept.__name__} of row {r.label} needs a "
                                     f"{e[1]} value, the op delivers another")
        return e[2](self._ctx(p, m=msgref or "", gv=vec or "", gn=gn))

    def update(self, p, r, msgref=None, vec=None, gn=0):
        e = _lookup(UPDATES, r.update, "update", r, self._kind(p))
        if e is None:
            return ""
        if e[1] == "msg" and msgref is None or e[1] == "vec" and vec is None:
            raise PromelaExportError(f"update {r.update.__name__} of row {r.label} needs a "
                                     f"{e[1]} value, the op delivers another")
        return e[2](self._ctx(p, m=msgref or "", gv=vec or "", gn=gn))

    def make_msg(self, p, r, dst):
        e = _lookup(MAKES, r.make, "make", r, self._kind(p))
        if e is None or e[1] != "msg":
            raise PromelaExportError(f"row {r.label} must make a message")
        return e[2](self._ctx(p), dst)

    def make_int(self, p, r):
        e = _lookup(MAKES, r.make, "make", r, self._kind(p))
        if e is None or e[1] != "int":
            raise PromelaExportError(f"row {r.label} must make an int for a gather/reduce")
        return e[2](self._ctx(p))

    def pre_checks(self, p, r, msgref=None):
        """Transition properties on the state before the row (model.properties)."""
        out = []
        c = self._ctx(p, m=msgref or "")
        if "emit" in r.tags:
            if c.kind != "r0":
                raise PromelaExportError("emit tag outside rank0")
            h = f"{c.v}.decode_q[0]"
            out += [_when(f"{h}.epoch != {c.v}.epoch", "stale_epoch_decode"),
                    _when(f"{h}.calls != {self.cfg.calls}", "call_count"),
                    _when(f"{h}.chunk <= {c.v}.last_emitted", "output_order")]
        if "wire_ids" in r.tags:
            if c.kind != "mesh" or msgref is None:
                raise PromelaExportError("wire_ids tag needs a mesh receive")
            out.append(_when(PROPERTY_EXPR["id_monotonic"](c), "id_monotonic"))
        if "end" in r.tags:
            if c.kind != "r0":
                raise PromelaExportError("end tag outside rank0")
            out.append(_when(f"{c.v}.emitted != {c.v}.built", "progress"))
        if "outgoing" in r.tags:
            if c.kind != "mesh":
                raise PromelaExportError("outgoing tag outside a mesh rank")
            out.append(_when(f"{c.v}.terminal_sent", "send_after_terminal"))
        return out

    def post_checks(self, p, r):
        out = []
        c = self._ctx(p)
        if "phase_b_done" in r.tags:
            if c.kind != "mesh":
                raise PromelaExportError("phase_b_done tag outside a mesh rank")
            out.append(_when(f"{c.v}.calls_done != {c.v}.env.calls", "call_count"))
        if p == 0 and not isinstance(r.op, Exit):
            out.append(_when(f"r0.decode_q_n > {self.cfg.d_out} || "
                             f"r0.inflight > {self.cfg.d_in}", "queue_bound"))
        if "enqueue" in r.tags:
            if c.kind != "mesh":
                raise PromelaExportError("enqueue tag outside a mesh rank")
            out.append(_when(f"{c.v}.inbox_n > {self.cfg.leader_in} || "
                             f"{c.v}.outbox_n > {self.cfg.leader_out}", "queue_bound"))
        return out

    def live(self, p):
        return f"status[{p}] == ST_LIVE && !abort"

    def kill(self, p, status, reason):
        return f"kill_{p}({status}, {self.reasons[reason]})"

    def finish(self, tid, r, pre, body):
        """The tail of a row: checks, update, then the next state or the exit."""
        p, t = self.threads[tid]
        stmts = list(pre) + [s for s in [body] if s]
        op = r.op
        mark = f" /* @row {tid}|{r.src}|{r.label} */"
        if isinstance(op, Exit):
            if op.how == "thread_die":
                stmts += [f"pc[{tid}] = {self._pc(tid, DEAD_THREAD)}{mark}", "break"]
            else:
                st = "ST_OK" if op.how in ("ok", "vanish") else "ST_ERROR"
                stmts.append(f"pc[{tid}] = 0{mark}")
                if op.how == "abort":
                    stmts.append("abort = 1")
                stmts += [self.kill(p, st, op.reason), "break"]
            return stmts
        stmts.append(f"pc[{tid}] = {self._pc(tid, r.dst)}{mark}")
        stmts += self.post_checks(p, r)
        if r.dst == FINAL:
            stmts.append("break")
        return stmts

    # ---------------------------------------------------------------- posted receives
    def posted_recv(self, q, sender_role):
        """q has a thread posted at a guard-true receive from sender_role."""
        terms = []
        for t in range(len(self.m.tables[q])):
            tid = self.tid[(q, t)]
            for pc, rows in self.m.tables[q][t].items():
                gs = [self.guard(q, r) for r in rows
                      if isinstance(r.op, Recv) and r.op.peer == sender_role]
                if gs:
                    terms.append(f"(pc[{tid}] == {self._pc(tid, pc)} && ({' || '.join(gs)}))")
        return "(" + (" || ".join(terms) or "0") + ")"

    def chan(self, p, q):
        return f"ch_{p}_{q}"

    # ---------------------------------------------------------------- alternatives
    def alternatives(self, tid):
        p, t = self.threads[tid]
        m, cfg = self.m, self.cfg
        alts = []
        pcs = m.tables[p][t]
        role = m.roles[p]
        others = [self.tid[(p, u)] for u in range(len(m.tables[p])) if u != t]
        coll_tid = any(isinstance(r.op, Coll) for rows in pcs.values() for r in rows)
        for pc, rows in pcs.items():
            at = f"pc[{tid}] == {self._pc(tid, pc)}"
            free = f" && inc[{p}] == 0" if coll_tid else ""
            recv_rows = [r for r in rows if isinstance(r.op, Recv)]
            for r in rows:
                op = r.op
                cmt = f"/* {r.label}: {r.src} -> {r.dst}  [{op_text(op)}] */"
                g = self.guard(p, r)
                if isinstance(op, (Local, Exit)):
                    cond = f"{at} && {self.live(p)}{free} && {g}"
                    if "join_comms" in r.tags:
                        cond += "".join(f" && (pc[{o}] == {self._pc(o, FINAL)} || pc[{o}] == "
                                        f"{self._pc(o, DEAD_THREAD)})" for o in others)
                    body = self.finish(tid, r, self.pre_checks(p, r), self.update(p, r))
                    alts.append((cmt, cond, body, True))
                elif isinstance(op, Send):
                    q = m.index[op.peer]
                    ch, sm = self.chan(p, q), f"sm_{p}_{q}"
                    send = f"{ch}!{self.kinds[op.kind]}," + ",".join(
                        f"{sm}.{f}" for f in MSG_FIELDS)
                    if cfg.p2p == "rendezvous":
                        cond = (f"{at} && {self.live(p)}{free} && {g} && status[{q}] == ST_LIVE "
                                f"&& {self.posted_recv(q, role)}")
                        body = [self.make_msg(p, r, sm)] + self.finish(
                            tid, r, self.pre_checks(p, r), self.update(p, r))
                        body.append(send)     # last: the receiver zeroes sm
                    else:
                        cond = f"{at} && {self.live(p)}{free} && {g} && len({ch}) < {cfg.eager}"
                        body = [self.make_msg(p, r, sm)] + self.finish(
                            tid, r, self.pre_checks(p, r), self.update(p, r))
                        body += [send, f"msg_zero({sm})"]
                    if body[-1] == "break" or "break" in body[:-1]:
                        raise PromelaExportError(f"send row {r.label} cannot exit")
                    alts.append((cmt, cond, body, True))
                elif isinstance(op, Coll):
                    continue      # arrivals below, one per state
            if cfg.p2p == "buffered" and recv_rows:
                for peer in sorted({r.op.peer for r in recv_rows}):
                    q = m.index[peer]
                    rs = [r for r in recv_rows if r.op.peer == peer]
                    posted = " || ".join(self.guard(p, r) for r in rs)
                    ch = self.chan(q, p)
                    cmt = "/* " + "; ".join(f"{r.label}: {r.src} -> {r.dst}  [{op_text(r.op)}]"
                                            for r in rs) + " */"
                    cond = (f"{at} && {self.live(p)}{free} && len({ch}) > 0 && ({posted})")
                    body = [self.receive(q, p)] + [self.dispatch_recv(tid, q, [(pc, rs)])] + \
                        [f"msg_zero(rm_{q}_{p})", f"rk_{q}_{p} = 0"]
                    alts.append((cmt, cond, body, False))
            alts += self.coll_alternatives(tid, pc, rows, at)
        if cfg.p2p == "rendezvous":
            by_peer = {}
            for pc, rows in pcs.items():
                for r in rows:
                    if isinstance(r.op, Recv):
                        by_peer.setdefault(r.op.peer, []).append(pc)
            for peer, pcl in sorted(by_peer.items()):
                q = m.index[peer]
                groups = []
                for pc in dict.fromkeys(pcl):
                    groups.append((pc, [r for r in pcs[pc] if isinstance(r.op, Recv)
                                        and r.op.peer == peer]))
                labels = "; ".join(f"{r.label}: {r.src} -> {r.dst}" for _, rs in groups
                                   for r in rs)
                cmt = f"/* rendezvous receive from {peer}: {labels} */"
                body = [self.dispatch_recv(tid, q, groups), f"msg_zero(rm_{q}_{p})",
                        f"rk_{q}_{p} = 0", f"msg_zero(sm_{q}_{p})"]
                alts.append((cmt, self.receive(q, p), body, False))
        # release, crash, and noticing that another thread ended the process
        alts.append(("/* released by the abort flag */", f"abort && status[{p}] == ST_LIVE",
                     [self.kill(p, "ST_ABORTED", "released by abort flag"), "break"], True))
        if cfg.faults:
            alts.append(("/* crash fault (kill -9) */",
                         f"faults_left > 0 && {self.live(p)}",
                         ["faults_left--", self.kill(p, "ST_CRASHED", "killed (crash fault)"),
                          "break"], True))
        if len(m.tables[p]) > 1:
            alts.append(("/* another thread of this process ended it */",
                         f"status[{p}] != ST_LIVE", ["break"], True))
        return alts

    def receive(self, q, p):
        rm = f"rm_{q}_{p}"
        return f"{self.chan(q, p)}?rk_{q}_{p}," + ",".join(f"{rm}.{f}" for f in MSG_FIELDS)

    def dispatch_recv(self, tid, q, groups):
        p, t = self.threads[tid]
        rm, rk = f"rm_{q}_{p}", f"rk_{q}_{p}"
        branches = []
        for pc, rows in groups:
            for r in rows:
                kinds = " || ".join(f"{rk} == {self.kinds[k]}" for k in r.op.kinds)
                cond = (f"pc[{tid}] == {self._pc(tid, pc)} && {self.guard(p, r)} && ({kinds}) "
                        f"&& {self.accept(p, r, msgref=rm)}")
                body = self.finish(tid, r, self.pre_checks(p, r, msgref=rm),
                                   self.update(p, r, msgref=rm))
                if "break" in body:
                    # exit rows are never receives in the semantics' shape; keep it simple
                    raise PromelaExportError(f"receive row {r.label} cannot exit directly")
                branches.append((f"/* {r.label} */ {cond}", body))
        return _if(branches, _viol("framing_error"))

    # ---------------------------------------------------------------- collectives
    def coll_alternatives(self, tid, pc, rows, at):
        p, t = self.threads[tid]
        m = self.m
        crows = [r for r in rows if isinstance(r.op, Coll)]
        if not crows:
            return []
        op = crows[0].op
        grp = op.group
        gi = GROUPS.index(grp)
        sig = self.sigs[(grp, op.op, op.root, op.kind)]
        labels = "; ".join(f"{r.label}: {r.src} -> {r.dst}" for r in crows)
        guards = [self.guard(p, r) for r in crows]
        anyg = "(" + " || ".join(guards) + ")"
        base = f"{at} && {self.live(p)} && inc[{p}] == 0"
        if p not in m.group_rank[grp]:
            return [(f"/* {op_text(op)}: {labels}; not a member of {grp} */",
                     f"{base} && {anyg}", [_viol("collective_mismatch")], True)]
        members = m.members[grp]
        root = members[op.root] if op.op == "broadcast" else None
        arrive = [f"inc[{p}] = 1", f"cgrp[{p}] = {gi}", f"csig[{p}] = {sig}",
                  f"carr[{gi}]++",
                  f"if :: carr[{gi}] == {len(members)} -> complete_{gi}_{op.op}() "
                  f":: else fi"]
        alts = []
        det = self.collectives == "split"    # a joint completion dispatches: may branch
        if p == root:
            for i, (r, g) in enumerate(zip(crows, guards)):
                alts.append((f"/* arrive in {op_text(op)} as root: {r.label} */",
                             f"{base} && {g}",
                             [f"crow[{p}] = {i + 1}", self.make_msg(p, r, f"cmsg[{p}]")]
                             + arrive, det))
        else:
            val = "0"
            if op.op != "broadcast":
                for r, g in reversed(list(zip(crows, guards))):
                    val = f"({g} -> {self.make_int(p, r)} : {val})"
            alts.append((f"/* arrive in {op_text(op)}: {labels} */", f"{base} && {anyg}",
                         [f"cint[{p}] = {val}"] + arrive, det))
        if self.collectives == "split":
            alts.append((f"/* depart {op_text(op)}: {labels} */",
                         f"{at} && {self.live(p)} && inc[{p}] == 2",
                         [_if(self.coll_branches(tid, pc, crows), _viol("framing_error")),
                          f"depart({p}, {gi})"], False))
        return alts

    def coll_branches(self, tid, pc, crows, with_pc=False):
        """How a member leaves a completed collective: the root by the row it arrived
        with, every other member by a guard-true row that accepts the value."""
        p, t = self.threads[tid]
        op = crows[0].op
        gi = GROUPS.index(op.group)
        members = self.m.members[op.group]
        root = members[op.root] if op.op == "broadcast" else None
        at = f"pc[{tid}] == {self._pc(tid, pc)} && " if with_pc else ""
        out = []
        for i, r in enumerate(crows):
            g = self.guard(p, r)
            if p == root:
                cond = f"crow[{p}] == {i + 1}"
                kw = {"msgref": f"gmsg[{gi}]"}
            elif op.op == "broadcast":
                kw = {"msgref": f"gmsg[{gi}]"}
                cond = f"{g} && {self.accept(p, r, **kw)}"
            else:
                kw = {"vec": f"gvec[{gi}].x", "gn": len(members)}
                cond = f"{g} && {self.accept(p, r, **kw)}"
            body = self.finish(tid, r, self.pre_checks(p, r), self.update(p, r, **kw))
            if "break" in body:
                raise PromelaExportError(f"collective row {r.label} cannot exit directly")
            out.append((f"/* {r.label} */ {at}{cond}", body))
        return out

    def complete_inlines(self):
        out = []
        m = self.m
        for gi, grp in enumerate(GROUPS):
            members = m.members[grp]
            for opname in ("broadcast", "all_reduce", "all_gather"):
                if not any(k[0] == grp and k[1] == opname for k in self.sigs):
                    continue
                same = " && ".join(f"csig[{x}] == csig[{members[0]}]" for x in members)
                lines = [f"if :: !({same}) -> {_viol('collective_mismatch')} :: else fi"]
                if opname == "broadcast":
                    roots = {k[2] for k in self.sigs if k[0] == grp and k[1] == opname}
                    # the root is named by the signature, which every member shares now
                    for root in sorted(roots):
                        code = [self.sigs[k] for k in self.sigs
                                if k[0] == grp and k[1] == opname and k[2] == root]
                        c = " || ".join(f"csig[{members[0]}] == {s}" for s in code)
                        lines.append(f"if :: {c} -> msg_cp(gmsg[{gi}], "
                                     f"cmsg[{members[root]}]) :: else fi")
                else:
                    for i, x in enumerate(members):
                        lines.append(f"gvec[{gi}].x[{i}] = cint[{x}]")
                for x in members:
                    lines += [f"cint[{x}] = 0", f"msg_zero(cmsg[{x}])"]
                lines += [f"carr[{gi}] = 0", f"cseq[{gi}]++"]
                if self.collectives == "split":
                    lines += [f"inc[{x}] = 2" for x in members]
                    lines.append(f"cdep[{gi}] = {len(members)}")
                else:
                    # joint: the last arrival moves every member on, in this one step
                    for x in members:
                        branches = []
                        for t in range(len(m.tables[x])):
                            tid = self.tid[(x, t)]
                            for pc, rows in m.tables[x][t].items():
                                crows = [r for r in rows if isinstance(r.op, Coll)
                                         and r.op.group == grp and r.op.op == opname]
                                if crows:
                                    branches += self.coll_branches(tid, pc, crows, True)
                        if branches:
                            lines.append(_if(branches, _viol("framing_error"), "\t"))
                        lines += [f"inc[{x}] = 0", f"cgrp[{x}] = 0", f"csig[{x}] = 0",
                                  f"crow[{x}] = 0"]
                    lines += [f"msg_zero(gmsg[{gi}])"] + \
                        [f"gvec[{gi}].x[{i}] = 0" for i in range(len(members))]
                text = self._block(lines) if self.collectives == "split" else \
                    ";\n\t".join(lines)
                out.append(f"inline complete_{gi}_{opname}() {{\n\t" + text + "\n}")
        return out
    # ---------------------------------------------------------------- classification
    def posted_coll_group(self, tid):
        """Group code (1 + index in GROUPS) of the first guard-true collective row of the
        thread's state, 0 if none: `colls[0].op.group` of model.properties."""
        p, t = self.threads[tid]
        expr = "0"
        items = []
        for pc, rows in self.m.tables[p][t].items():
            for r in rows:
                if isinstance(r.op, Coll):
                    items.append((pc, r))
        for pc, r in reversed(items):
            expr = (f"((pc[{tid}] == {self._pc(tid, pc)} && {self.guard(p, r)}) -> "
                    f"{GROUPS.index(r.op.group) + 1} : {expr})")
        return expr

    def send_only(self, tid, q):
        """The thread is posted at a send to q and at no receive (model.properties)."""
        p, t = self.threads[tid]
        terms = []
        for pc, rows in self.m.tables[p][t].items():
            sends = [r for r in rows if isinstance(r.op, Send)]
            if not sends:
                continue
            recvs = [self.guard(p, r) for r in rows if isinstance(r.op, Recv)]
            # the first guard-true send names the peer
            first = "0"
            for r in reversed(sends):
                to = 1 if self.m.index[r.op.peer] == q else 0
                first = f"({self.guard(p, r)} -> {to} : {first})"
            norecv = f" && !({' || '.join(recvs)})" if recvs else ""
            terms.append(f"(pc[{tid}] == {self._pc(tid, pc)} && {first}{norecv})")
        return "(" + (" || ".join(terms) or "0") + ")"

    def monitor(self):
        m = self.m
        anylive = " || ".join(f"status[{p}] == ST_LIVE" for p in range(self.n))
        gone = " || ".join(f"status[{p}] == ST_CRASHED || status[{p}] == ST_ERROR"
                           for p in range(self.n))
        cm = []
        for gi, grp in enumerate(GROUPS):
            tids = [self.tid[(p, t)] for p in m.members[grp]
                    for t in range(len(m.tables[p]))]
            here = " || ".join(f"cg[{x}] == {gi + 1}" for x in tids)
            there = " || ".join(f"(cg[{x}] != 0 && cg[{x}] != {gi + 1})" for x in tids)
            cm.append(f"(({here}) && ({there}))")
        cyc = []
        for a in range(len(self.threads)):
            for b in range(len(self.threads)):
                pa, pb = self.threads[a][0], self.threads[b][0]
                if pa != pb:
                    cyc.append(f"(so[{a}] == {pb + 1} && so[{b}] == {pa + 1})")
        nt = len(self.threads)
        lines = [
            "active proctype monitor() {",
            f"\tbyte cg[{nt}]; byte so[{nt}];",
            "end_wait:",
            "\ttimeout;",
            "\tatomic {",
            f"\tif",
            f"\t:: !({anylive}) -> skip   /* every process gone: a clean end */",
            f"\t:: else ->",
        ]
        for x in range(nt):
            p = self.threads[x][0]
            lines.append(f"\t\tcg[{x}] = (status[{p}] == ST_LIVE -> {self.posted_coll_group(x)}"
                         f" : 0);")
            so = "0"
            for q in range(self.n):
                if q != p:
                    so = f"({self.send_only(x, q)} -> {q + 1} : {so})"
            lines.append(f"\t\tso[{x}] = (status[{p}] == ST_LIVE -> {so} : 0);")
        lines += [
            "\t\tif",
            f"\t\t:: {' || '.join(cm)} -> printf(\"VERDICT collective_mismatch\\n\")",
            f"\t\t:: else -> if",
            f"\t\t\t:: {gone} -> printf(\"VERDICT crash_hang\\n\")",
            f"\t\t\t:: else -> if",
            f"\t\t\t\t:: {' || '.join(cyc) or '0'} -> printf(\"VERDICT deadlock\\n\")",
            f"\t\t\t\t:: else -> printf(\"VERDICT stranding\\n\")",
            "\t\t\t\tfi",
            "\t\t\tfi",
            "\t\tfi;",
            "\t\t/* a live process is blocked: stop here, not at an end label */",
            "\t\tfalse",
            "\tfi",
            "\t}",
            "}",
        ]
        return "\n".join(lines)

    # ---------------------------------------------------------------- assembly
    def typedefs(self):
        out = ["typedef Msg { byte action; byte call_id; short chunk; byte epoch; "
               "byte calls; bit initc; bit ok }",
               f"typedef Vec {{ short x[{self.n}] }}"]
        for name, layout in (("R0V", R0_LAYOUT), ("MV", MESH_LAYOUT)):
            fields = []
            for f, kind in layout.items():
                if kind == "queue":
                    fields += [f"Msg {f}[{self.caps[f]}]", f"byte {f}_n"]
                elif kind == "optmsg":
                    fields += [f"Msg {f}", f"bit {f}_has"]
                elif kind == "inject":
                    fields += [f"bit inj_{x}" for x in INJECTABLE]
                elif kind == "failure":
                    fields.append(f"byte {f}")
                else:
                    fields.append(f"{kind} {f}")
            out.append(f"typedef {name} {{\n\t" + ";\n\t".join(fields) + "\n}")
        return out

    def init_vars(self, p):
        v = self.init.procs[p].v
        ref = self._var(p)
        layout = R0_LAYOUT if p == 0 else MESH_LAYOUT
        out = []
        for f, kind in layout.items():
            val = getattr(v, f)
            if kind == "queue":
                if val:
                    raise PromelaExportError(f"initial {f} must be empty")
            elif kind == "optmsg":
                if val is not None:
                    raise PromelaExportError(f"initial {f} must be None")
            elif kind == "inject":
                bad = set(val) - set(INJECTABLE)
                if bad:
                    raise PromelaExportError(f"unknown injected faults {bad}")
                out += [f"{ref}.inj_{x} = 1" for x in sorted(val)]
            elif kind == "failure":
                if val not in FAILURES:
                    raise PromelaExportError(f"failure {val!r} has no code")
                if val:
                    out.append(f"{ref}.{f} = {FAILURES.index(val)}")
            elif int(val) != 0:
                out.append(f"{ref}.{f} = {int(val)}")
        return out

    def kill_inlines(self):
        out = []
        for p in range(self.n):
            ref = self._var(p)
            layout = R0_LAYOUT if p == 0 else MESH_LAYOUT
            z = []
            for f, kind in layout.items():
                if kind == "queue":
                    z += [f"msg_zero({ref}.{f}[{i}])" for i in range(self.caps[f])]
                    z.append(f"{ref}.{f}_n = 0")
                elif kind == "optmsg":
                    z += [f"msg_zero({ref}.{f})", f"{ref}.{f}_has = 0"]
                elif kind == "inject":
                    z += [f"{ref}.inj_{x} = 0" for x in INJECTABLE]
                else:
                    z.append(f"{ref}.{f} = 0")
            pcs = [f"pc[{self.tid[(p, t)]}] = 0" for t in range(len(self.m.tables[p]))]
            coll = [f"if :: inc[{p}] == 1 -> carr[cgrp[{p}]]-- "
                    f":: inc[{p}] == 2 -> depart_book({p}, cgrp[{p}]) :: else fi",
                    f"inc[{p}] = 0", f"cgrp[{p}] = 0", f"csig[{p}] = 0", f"crow[{p}] = 0",
                    f"cint[{p}] = 0", f"msg_zero(cmsg[{p}])"]
            body = [f"status[{p}] = st", f"rsn[{p}] = why"] + pcs + z + coll
            out.append(f"inline kill_{p}(st, why) {{\n\t" + self._block(body) + "\n}")
        return out

    def build(self) -> str:
        m, cfg = self.m, self.cfg
        o = self.out
        o.append(f"/* lockstep tables exported to Promela by model/promela.py\n"
                 f"   config: {cfg.describe()}\n"
                 f"   collectives: {self.collectives}\n"
                 f"   processes: {', '.join(m.names)}\n"
                 f"   generated: do not edit; regenerate with export_promela(cfg) */")
        o.append("\n".join(
            ["/* actions (model.contract.Action), process status, message kinds */"] +
            [f"#define {a.name} {int(a)}" for a in Action] +
            [f"#define ST_{name.upper()} {code}" for name, code in ST.items()] +
            [f"#define K_{k} {code}" for k, code in self.kinds.items()]))
        o.append("\n".join(
            [f"/* collective signature {code}: {opn}({grp}, root={root}, {kind}) */"
             for (grp, opn, root, kind), code in self.sigs.items()] +
            [f"/* exit reason {code}: {why or '-'} */" for why, code in self.reasons.items()]))
        for tid in range(len(self.threads)):
            o.append("\n".join([f"/* control states of {self._proc_name(tid)} */"] + [
                f"#define {self._pcname(tid, name)} {code}"
                for name, code in self.pcs[tid].items()]))
        o += self.typedefs()
        n, nt, ng = self.n, len(self.threads), len(GROUPS)
        o += [
            "/* Msg helpers are macros: Promela inlines cannot take a structure */",
            "#define msg_set7(d, a, ci, ch, ep, k, ic, okv) d.action = a; d.call_id = ci; "
            "d.chunk = ch; d.epoch = ep; d.calls = k; d.initc = ic; d.ok = okv",
            "/* ok: the receiver's contract verdict (model.messages.Msg.valid) */",
            "#define msg_set(d, a, ci, ch, ep, k, ic) msg_set7(d, a, ci, ch, ep, k, ic, 1)",
            "#define msg_cp(d, s) msg_set7(d, s.action, s.call_id, s.chunk, s.epoch, "
            "s.calls, s.initc, s.ok)",
            "#define msg_zero(d) msg_set(d, 0, 0, 0, 0, 0, 0)",
            "/* never set: `assert(V_x)` fails exactly when property x is violated */",
            "bit " + ", ".join(f"V_{x}" for x in PROPERTIES) + ";",
            f"byte status[{n}]; byte rsn[{n}]; byte pc[{nt}];",
            "bit abort;",
            f"byte faults_left = {cfg.faults};",
            "R0V r0;",
            f"MV mv[{n}];",
            "/* collectives: arrival state per process, counters and value per group */",
            f"byte inc[{n}]; byte cgrp[{n}]; byte csig[{n}]; byte crow[{n}]; short cint[{n}];",
            f"Msg cmsg[{n}];",
            f"byte carr[{ng}]; byte cdep[{ng}]; byte cseq[{ng}];",
            f"Msg gmsg[{ng}]; Vec gvec[{ng}];",
        ]
        cap = 0 if cfg.p2p == "rendezvous" else cfg.eager
        for (p, q) in ((0, 1), (1, 0)):
            o.append(f"chan ch_{p}_{q} = [{cap}] of {{ byte, byte, byte, short, byte, byte, "
                     f"bit, bit }};")
            o.append(f"Msg sm_{p}_{q}; Msg rm_{p}_{q}; byte rk_{p}_{q};")
        o.append("Msg tmp_rot;   /* scratch of a queue rotation, zero between steps */")
        clr = "; ".join(f"gvec[g].x[{i}] = 0" for i in range(n))
        o.append("inline depart_book(p, g) {\n\tcdep[g]--;\n\tif :: cdep[g] == 0 -> "
                 f"msg_zero(gmsg[g]); {clr} :: else fi\n}}")
        o.append("inline depart(p, g) {\n\tinc[p] = 0; cgrp[p] = 0; csig[p] = 0; "
                 "crow[p] = 0;\n\tdepart_book(p, g)\n}")
        o += self.kill_inlines()
        o += self.complete_inlines()
        for tid in range(nt):
            o.append(self.proctype(tid))
        if m.watchdog_enabled():
            gone = " || ".join(f"status[{p}] == ST_CRASHED || status[{p}] == ST_ERROR"
                               for p in range(n))
            live = " || ".join(f"status[{p}] == ST_LIVE" for p in range(n))
            o.append("active proctype watchdog() {\nend_watch:\n\tdo\n"
                     f"\t:: atomic {{ !abort && ({gone}) && ({live}) -> abort = 1 }}\n"
                     "\tod\n}")
        else:
            o.append("/* no watchdog (mutation no_watchdog) */")
        o.append(self.monitor())
        init = []
        for p in range(n):
            init.append(f"status[{p}] = ST_LIVE")
            for t, pcname in enumerate(self.init.procs[p].pcs):
                tid = self.tid[(p, t)]
                init.append(f"pc[{tid}] = {self._pc(tid, pcname)}")
            init += self.init_vars(p)
        if self.fault_budget == "upto" and cfg.faults:
            # any budget up to cfg.faults: a hang the crash budget would otherwise hide
            # (the crash is always an enabled way out) is reached with a smaller budget
            init.append("if " + " ".join(f":: faults_left = {b}"
                                         for b in range(cfg.faults + 1)) + " fi")
        init += [f"run {self._proc_name(tid)}()" for tid in range(nt)]
        o.append("init {\n\tatomic {\n\t\t" + ";\n\t\t".join(init) + "\n\t}\n}")
        return "\n\n".join(o) + "\n"

    def _block(self, stmts) -> str:
        """Deterministic statements, as one d_step when allowed."""
        if self.dstep:
            return "d_step {\n\t\t" + ";\n\t\t".join(stmts) + "\n\t}"
        return ";\n\t".join(stmts)

    def proctype(self, tid):
        p, t = self.threads[tid]
        lines = [f"proctype {self._proc_name(tid)}() {{", "\tdo"]
        for cmt, cond, body, det in self.alternatives(tid):
            lines.append(f"\t{cmt}")
            if det and self.dstep:
                # deterministic bookkeeping as one d_step (no jumps or i/o inside it)
                k = len(body)
                while k and (body[k - 1] == "break" or body[k - 1].startswith("ch_")):
                    k -= 1
                if k:
                    body = ["d_step {\n\t\t\t" + ";\n\t\t\t".join(body[:k]) + "\n\t\t}"] + \
                        body[k:]
            lines.append(f"\t:: atomic {{ {cond} ->\n\t\t" + ";\n\t\t".join(body) + "\n\t}")
        lines += ["\tod", "}"]
        return "\n".join(lines)


def export_promela(cfg: Config, collectives: str = "split",
                   fault_budget: str = "exact", tables: Optional[dict] = None) -> str:
    """A Promela model of `cfg` (its mutation included), generated from the tables.

    collectives="split": every member arrives and departs on its own step (default, the
    most independent encoding); "joint": members arrive on their own steps and the last
    arrival moves every member on at once (fewer states, closer to the semantics).
    fault_budget="exact": up to cfg.faults crashes, as model.semantics; "upto": the run
    first picks a budget 0..cfg.faults (see docs/crosscheck.md, "a shared blind spot").
    tables: role -> rows instead of the configuration's (named as cfg.mutation)."""
    return _Export(cfg, collectives, fault_budget, tables).build()


def export_with_rows(cfg: Config, collectives: str = "split", fault_budget: str = "exact",
                     dstep: bool = False):
    """(Promela text, {(process, thread, src, label): line}) where `line` holds the
    statement that only that row executes, for comparing row coverage with pan's
    "unreached" report (so no d_step by default: it would hide the statements)."""
    e = _Export(cfg, collectives, fault_budget, dstep=dstep)
    text = e.build()
    rows = {}
    for i, line in enumerate(text.split("\n"), 1):
        mk = re.search(r"/\* @row (\d+)\|(.*?)\|(.*?) \*/", line)
        if mk:
            p, t = e.threads[int(mk.group(1))]
            key = (e.m.names[p], THREADS[e.m.roles[p]][t], mk.group(2), mk.group(3))
            rows.setdefault(key, []).append(i)
    return text, rows


def proctype_names(cfg: Config) -> list:
    e = _Export(cfg)
    return [e._proc_name(tid) for tid in range(len(e.threads))]


# ------------------------------------------------------------------ fingerprints
# The mapping tables above and the encoding of the semantics were written against these
# functions. A change to any of them (docstrings and comments aside) makes the export
# refuse until someone re-reads the Promela side: `python -m lockstep.model.promela --fingerprints`
# prints the new values to paste below once the translation is updated.

def _fingerprint(obj) -> str:
    # Read from the .py file: semantics runs compiled where a build exists (accel.py).
    src = textwrap.dedent(definition_source(obj))
    tree = ast.parse(src)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and \
                isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha1(ast.dump(tree).encode()).hexdigest()[:10]


def _watched():
    """name -> object for everything the Promela encoding re-implements or translates."""
    from . import guards, properties, semantics
    out = {}
    for table in (GUARDS, ACCEPTS, MAKES, UPDATES):
        for name in table:
            out[f"guards.{name}"] = getattr(guards, name) if hasattr(guards, name) else \
                _by_name(guards, name)
    out["guards.ids_valid"] = guards.ids_valid
    out["guards._queue_terminal"] = guards._queue_terminal
    out["guards.new_envelope"] = guards.new_envelope
    out["guards.infer_calls_locally"] = guards.infer_calls_locally
    for meth in ("initial_state", "enabled", "posted", "_rendezvous", "_buffered",
                 "_collective", "step", "_apply", "_start_pcs", "_compile",
                 "watchdog_enabled"):
        out[f"semantics.Model.{meth}"] = getattr(semantics.Model, meth)
    for fn in ("check_transition", "check_state", "check_rank0", "check_terminal",
               "_check_end",
               "check_progress_at_exit", "blocked_ops", "_group_mismatch", "_send_cycle"):
        out[f"properties.{fn}"] = getattr(properties, fn)
    return out


def _by_name(mod, name):
    for obj in vars(mod).values():
        if callable(obj) and getattr(obj, "__name__", None) == name:
            return obj
    raise PromelaExportError(f"{name} is mapped but model.guards has no such function")


def current_fingerprints() -> dict:
    return {k: _fingerprint(v) for k, v in sorted(_watched().items())}


class SemanticsDrift(UserWarning):
    """model.semantics / model.properties changed since the Promela encoding was
    reviewed against them; the SPIN cross-check is what tells whether it still holds."""


def check_fingerprints() -> None:
    """A mapped guard/update/make/accept that changed raises: its Promela text would be
    silently stale. A change in the semantics or the properties warns (SemanticsDrift):
    refactors there are frequent and the SPIN agreement tests catch a real divergence."""
    now = current_fingerprints()
    changed = sorted(k for k in now if FINGERPRINTS.get(k) != now[k])
    how = ("Update model/promela.py (or confirm it still holds), then refresh FINGERPRINTS "
           "with `python -m lockstep.model.promela --fingerprints`.")
    hard = [k for k in changed if k.startswith("guards.")]
    if hard:
        raise PromelaExportError("changed since the Promela translation was written: " +
                                 ", ".join(hard) + ". " + how)
    if changed:
        warnings.warn("changed since the Promela encoding was reviewed: " +
                      ", ".join(changed) + ". " + how, SemanticsDrift, stacklevel=3)


FINGERPRINTS: dict = {
    'guards._queue_terminal': 'be77975d1c',
    'guards.all_built': 'd56ebcf078',
    'guards.bad_result_armed': 'cebff675b8',
    'guards.call_done': '9ad47b6216',
    'guards.can_build': '901595cb30',
    'guards.can_build_bad': '27ad75bf13',
    'guards.can_build_ok': 'bada501799',
    'guards.can_build_preflight_fails': '7c28b34c66',
    'guards.can_cut': 'b1eef1b4bd',
    'guards.can_cut_in_drain': '88256e144c',
    'guards.can_heartbeat': '2e34ab62bc',
    'guards.can_take': '5b34c3f0b1',
    'guards.can_take_result': 'b10bace112',
    'guards.comms_finished': 'ab12643a3b',
    'guards.contribution': '39291dfab7',
    'guards.counts_agree': '895d901771',
    'guards.counts_differ': 'c9af822a28',
    'guards.current_envelope': '645cba0cf5',
    'guards.decode_head': '7fc0100246',
    'guards.decode_queue_empty': 'c67dbcfc41',
    'guards.decode_room': 'd63637157f',
    'guards.direct_noop': 'bf4c7074b9',
    'guards.drained': '19cdffd6ae',
    'guards.drop_envelope_in': 'aabc5f425e',
    'guards.drop_head': 'f8c745f6c4',
    'guards.enqueue_bad_envelope': 'f275743197',
    'guards.enqueue_envelope': '651ae41d80',
    'guards.env_is_ERROR': '1fcf34d0ba',
    'guards.env_is_INFER': '1fcf34d0ba',
    'guards.env_is_NOOP': '1fcf34d0ba',
    'guards.env_is_SHUTDOWN': '1fcf34d0ba',
    'guards.env_not_infer': '9bf117ef24',
    'guards.envelope_in': '955a2b3ac1',
    'guards.envelope_invalid': '687432a812',
    'guards.envelope_valid': 'ba0a0f8a04',
    'guards.error_from_rank0': '3374f2ecb2',
    'guards.error_result': '883ebbf453',
    'guards.error_result_sent': 'be82ccfb15',
    'guards.expecting_result': '27f2e71c9e',
    'guards.expecting_result_before_terminal': 'e0bef188dc',
    'guards.fail_preflight': '3b54c1e0e7',
    'guards.finish_results': '52981ff1d9',
    'guards.got_envelope_header': '2ba00dc74a',
    'guards.got_result_header': 'ca6a0e9e30',
    'guards.got_result_payload': 'bd6c593404',
    'guards.hard_cut': 'bf1eb1fb0f',
    'guards.hard_cut_in_drain': '5ce2810c9d',
    'guards.hard_cut_resetting_chunks': 'ab7702640f',
    'guards.has_result': '4e762e92a3',
    'guards.head_current': '68ae61e8df',
    'guards.head_rejected': 'd7b5d82e7e',
    'guards.head_stale': '63aff7b4b2',
    'guards.header_only_sent': 'd054a064bf',
    'guards.ids_valid': '2b55ee8674',
    'guards.inbox_has_header_only': '7855a83f55',
    'guards.inbox_has_infer': 'd9264dc59e',
    'guards.inbox_room': '10186bf0fd',
    'guards.infer_calls_locally': '5ab5ce0ab5',
    'guards.is_error': '9fbf435882',
    'guards.is_header_only': 'fb04530267',
    'guards.is_infer': 'e94cf6bbad',
    'guards.last_call': 'a4e7194c9a',
    'guards.last_call_then_cond': 'e525c035a5',
    'guards.late_preflight_ok': 'ff3d11c4e8',
    'guards.late_preflight_raises': '45212f1628',
    'guards.leader_comms_finished': '152b964c3c',
    'guards.more_calls': 'ce739e420b',
    'guards.msg_is_ERROR': '33b7b6c2af',
    'guards.msg_is_INFER': '33b7b6c2af',
    'guards.msg_is_NOOP': '33b7b6c2af',
    'guards.msg_is_SHUTDOWN': '33b7b6c2af',
    'guards.new_bad_envelope': '9338cfb6ea',
    'guards.new_envelope': 'a4943e5492',
    'guards.out_has_payload': '3fe6a64078',
    'guards.out_header_only': 'ab23605c53',
    'guards.out_is_error': '0683b45335',
    'guards.out_is_result': '9c79cf3eb2',
    'guards.outbox_nonempty': '70a4543360',
    'guards.outbox_room': '71cf551cf4',
    'guards.outgoing': '11783aa430',
    'guards.outgoing_result': '929b0eab02',
    'guards.parity_agrees': '41d7705979',
    'guards.parity_differs': '0f6c682c9d',
    'guards.parity_key': 'c54c6dd184',
    'guards.payload_sent': '7a35d4fa9b',
    'guards.plan_calls': '11a76641e3',
    'guards.put_result': 'e37c4056b3',
    'guards.queue_envelope': 'b9189818a3',
    'guards.queue_error_result': '2cc8d85d57',
    'guards.queue_error_result_first': '8af7d32484',
    'guards.queue_noop': 'f7246a28ff',
    'guards.queue_result': '6a669bf3cd',
    'guards.queue_shutdown': '243450022d',
    'guards.receiving': '6621b151f5',
    'guards.reject_envelope': '91ad1c21d5',
    'guards.reject_head': '4fbce05e58',
    'guards.reject_head_in_drain': '885f65d2fb',
    'guards.rejected_by_leader': 'd88d0bc40a',
    'guards.result': '45923b357a',
    'guards.result_sent': '7d45e0c964',
    'guards.results_over': 'e3a4c3cf3d',
    'guards.spend_noop': '882901b3d1',
    'guards.spoil_result': '03f58c7d24',
    'guards.start_phase_b': '36bef2eec0',
    'guards.start_phase_b_inferred': 'bc1f1edeee',
    'guards.start_phase_b_own': '4dcb929c63',
    'guards.store_envelope': '76c82cc3e7',
    'guards.store_envelope_in': 'ee00f00ea5',
    'guards.take_envelope': 'ce670d6c74',
    'guards.take_envelope_in': '3ab2aa9e7b',
    'guards.take_result': '192d9acc24',
    'guards.terminal_was_sent': 'dc9edd6138',
    'guards.wrong_group_requested': '1546db5180',
    'properties._check_end': '235d95aea1',
    'properties._group_mismatch': 'b4291e4a4b',
    'properties._send_cycle': 'aa8ece83d4',
    'properties.blocked_ops': '6d15b8ba9c',
    'properties.check_progress_at_exit': '71af807a7b',
    'properties.check_rank0': '6d1de7135c',
    'properties.check_state': '3839daab2e',
    'properties.check_terminal': '570a11a71c',
    'properties.check_transition': 'bc1fafa124',
    'semantics.Model._apply': '8726f9bf94',
    'semantics.Model._buffered': '85e9058544',
    'semantics.Model._collective': '09f1aef87f',
    'semantics.Model._compile': '18b412d84a',
    'semantics.Model._rendezvous': '4c1784bc96',
    'semantics.Model._start_pcs': 'aad3bfd363',
    'semantics.Model.enabled': '4581e9f948',
    'semantics.Model.initial_state': 'b94b04dfc1',
    'semantics.Model.posted': 'e651e607c2',
    'semantics.Model.step': '4ddfb1cb28',
    'semantics.Model.watchdog_enabled': 'd6706b61f2',
}


def main(argv=None) -> int:
    import argparse
    import sys
    from .mutations import mutation_config
    ap = argparse.ArgumentParser(prog="python -m lockstep.model.promela",
                                 description="print the Promela model of a configuration")
    ap.add_argument("--fingerprints", action="store_true",
                    help="print FINGERPRINTS for the current model sources")
    ap.add_argument("--mesh", type=int, default=2)
    ap.add_argument("--depth", type=int, default=2, help="D_in = D_out")
    ap.add_argument("--chunks", type=int, default=2)
    ap.add_argument("--hard-cut", action="store_true")
    ap.add_argument("--faults", type=int, default=0)
    ap.add_argument("--p2p", choices=("rendezvous", "buffered"), default="rendezvous")
    ap.add_argument("--mutation", default="")
    ap.add_argument("--collectives", choices=("split", "joint"), default="split")
    ap.add_argument("--fault-budget", choices=("exact", "upto"), default="exact")
    a = ap.parse_args(argv)
    if a.fingerprints:
        print("FINGERPRINTS: dict = {")
        for k, v in current_fingerprints().items():
            print(f"    {k!r}: {v!r},")
        print("}")
        return 0
    cfg = Config(mesh=a.mesh, d_in=a.depth, d_out=a.depth, chunks=a.chunks,
                 hard_cut=a.hard_cut, faults=a.faults, p2p=a.p2p)
    if a.mutation:
        cfg = mutation_config(cfg, a.mutation)
    sys.stdout.write(export_promela(cfg, a.collectives, a.fault_budget))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
