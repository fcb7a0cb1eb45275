"""`lockstep prove`: symbolic (z3) obligations the explorer cannot discharge by enumeration.

Three families, each a list of `Obligation(name, ok, detail, counterexample)`:

(a) contract   The PPEnvelope / PPResult schema of model/contract.py as z3 constraints,
               built from its data: every FieldSpec / TensorSpec (type, bounds, choices,
               presence `Rule`) and every CrossRule. The cross-field rules are not retyped:
               their check functions (the ones the validators run) are *executed* on
               symbolic messages by a small concolic executor (`_paths`): integers and
               floats are z3 terms wrapped in `Sym`, finite fields (bools, fields with
               `choices`) and presence are branch points; every time the check converts a
               symbolic comparison to bool, the executor forks, prunes infeasible forks
               with z3, and records the path condition. A rule's formula is the
               disjunction of the path conditions on which the check returns None.
               Obligations: consistency (every action, every regime), no dead field,
               ordered pairs of envelopes, checks never crash on a well-formed message,
               the generator-call count is *fixed* by regime/steps/recompute bits for
               every num_denoise_steps >= 1 (bounds dropped: unbounded Int), it equals
               PROTOCOL.md's regime table, the declared bounds cover the formula, and a
               mutated formula (R0a off by one) or a dropped rule yields a concrete
               envelope, replayed through the real validator.

(b) guards     For every control state where a collective row may be taken, the guards,
               accepts and contributions that decide which row fires are modelled as z3
               formulas (`GUARDS`, `ACCEPTS`, `MAKES`; an unmodelled one raises
               `UnmodelledGuard`, so a new guard cannot be skipped; each builder is
               checked against the Python function on sampled states). Variables are
               classified per control state by a dataflow over the tables: replicated
               (equal initial defaults, or written on a collective row from replicated
               sources: the collective's value, constants, replicated variables; the
               broadcast root's own payload; declassified by an all-equal parity
               all_gather) or per-rank (initialised per rank, derived from
               `Model.initial_state`; written on a local or p2p row, which may run on one
               member only; or computed from a per-rank variable). Then a product of two
               members' tables is explored over their collective decision points: at each
               aligned pair, with every variable replicated at both points equal and
               everything else free, z3 proves both enable the same collective (op, group, root, kind), that
               rows shared by both tables fire alike, and that jointly possible rows lead
               to aligned successors. The argument is about one pair of members and an
               abstract rest of the group (an all_gather's other contributions are one
               uninterpreted predicate shared by both), so it holds for every mesh size:
               pairs leader/worker exist for N >= 2 and worker/worker for N >= 3.

(c) groups     Structural rules on the tables: rank0 never in a mesh collective, Phase B
               (GEN / COND collectives) never on world_pg, every mesh broadcast rooted at
               group rank 0, rank0 <-> leader is the only point-to-point pair, one thread
               per process issues collectives. Each rule is shown to bite: the registry
               mutations that violate it are listed; a rule no registry mutation violates
               is shown to bite with a local probe edit (and reported as a gap).

Limits, stated so nobody reads more into a PASS: (b) over-approximates. Per-rank
variables are free, and pairs of decision points are aligned path-insensitively (the
control states reachable through local / p2p rows after a jointly possible collective),
so a proof covers more than the reachable states, while a counterexample may be
unreachable: it names a dependence on per-rank state, and the explorer (`lockstep check`)
decides reachability. The broadcast root's own choice among rows of one signature may read
private state (the leader's `rejected`); only the collective it enters and the successors
are compared. Updates are modelled by which variables they write from which sources
(`UPDATES`), not by their values.

Designs considered and rejected: retyping the cross-field rules as z3 (two copies drift);
running the whole validator symbolically (its isinstance type checks and per-field
presence branching explode; the field checks are pure data, so they are encoded from the
specs and only the rule code is executed); proving (b) per mesh size by enumeration (the
explorer already does that; the point here is a statement for every N).
"""
from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
import random
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional
from unittest import mock

import z3

from . import contract as C
from . import guards as g
from .config import INJECTABLE, Config
from .ops import COND, GEN, MESH, WORLD, Coll, Exit, Recv, Send, op_text
from .semantics import FINAL, DEAD_THREAD, Model
from .mutations import model_for

TIMEOUT_MS = 20000
# z3 traps SIGINT during each check (its ctrl_c parameter) to cancel that check alone: a
# Ctrl-C of `lockstep prove` or `lockstep demo` was consumed there, the check came back
# unknown and the run went on to the end. Off, the signal reaches Python once the
# check returns (each is short), and the command stops.
z3.set_param("ctrl_c", False)


@dataclass
class Obligation:
    name: str
    ok: bool
    detail: str
    counterexample: Optional[list] = None
    section: str = ""

    def as_dict(self) -> dict:
        return {"name": self.name, "section": self.section, "ok": self.ok,
                "detail": self.detail, "counterexample": self.counterexample}


class UnmodelledGuard(LookupError):
    """A guard, accept, contribution or update that decides a collective has no z3 model."""


def _and(xs):
    xs = list(xs)
    return z3.And(xs) if xs else z3.BoolVal(True)


def _or(xs):
    xs = list(xs)
    return z3.Or(xs) if xs else z3.BoolVal(False)


def _solver(*cons):
    s = z3.Solver()
    s.set("timeout", TIMEOUT_MS)
    for c in cons:
        s.add(c)
    return s


def _sat(*cons):
    r = _solver(*cons).check()
    if r == z3.unknown:
        raise RuntimeError("z3 returned unknown (timeout?)")
    return r == z3.sat


def _model(*cons):
    s = _solver(*cons)
    r = s.check()
    if r == z3.unknown:
        raise RuntimeError("z3 returned unknown (timeout?)")
    return s.model() if r == z3.sat else None


# =======================================================================================
# Concolic execution of Python check code over z3 terms


class _Infeasible(BaseException):
    """Every alternative of a branch is infeasible (BaseException: passes `except`)."""


class _Path:
    """One execution: a prefix of decisions to replay, then the first feasible choice."""

    def __init__(self, solver, prefix):
        self.solver, self.prefix = solver, prefix
        self.taken, self.conds, self.pending = [], [], []

    def choose(self, alternatives) -> int:
        i = len(self.taken)
        if i < len(self.prefix):
            j = self.prefix[i]
        else:
            feasible = [k for k, c in enumerate(alternatives)
                        if self.solver.check(*self.conds, c) != z3.unsat]
            if not feasible:
                raise _Infeasible()
            j = feasible[0]
            self.pending += [self.taken + [k] for k in feasible[1:]]
        self.taken.append(j)
        self.conds.append(alternatives[j])
        return j

    def branch(self, cond) -> bool:
        return self.choose([cond, z3.Not(cond)]) == 0


def _paths(fn, background) -> list:
    """[(path condition, outcome)] for every feasible path of fn(path)."""
    solver = _solver(*background)
    out, todo = [], [[]]
    while todo:
        path = _Path(solver, todo.pop())
        try:
            outcome = fn(path)
        except _Infeasible:
            continue
        except C.ContractError:
            raise
        except Exception as e:  # noqa: BLE001 - a crash of the check code is an outcome
            outcome = ("raises", f"{type(e).__name__}: {e}")
        out.append((_and(path.conds), outcome))
        todo.extend(reversed(path.pending))
    return out


class Sym:
    """A number the check code computes with; comparisons become branch points."""
    __slots__ = ("e", "path")

    def __init__(self, e, path):
        self.e, self.path = e, path

    def _o(self, o):
        if isinstance(o, Sym):
            return o.e
        if isinstance(o, (int, float)) and not isinstance(o, bool):
            return o
        return None

    def _bin(self, o, f):
        x = self._o(o)
        return NotImplemented if x is None else Sym(f(self.e, x), self.path)

    def __add__(self, o): return self._bin(o, lambda a, b: a + b)
    def __radd__(self, o): return self._bin(o, lambda a, b: b + a)
    def __sub__(self, o): return self._bin(o, lambda a, b: a - b)
    def __rsub__(self, o): return self._bin(o, lambda a, b: b - a)
    def __mul__(self, o): return self._bin(o, lambda a, b: a * b)
    def __rmul__(self, o): return self._bin(o, lambda a, b: b * a)
    def __neg__(self): return Sym(-self.e, self.path)

    def _cmp(self, o, f):
        x = self._o(o)
        return NotImplemented if x is None else SymBool(f(self.e, x), self.path)

    def __lt__(self, o): return self._cmp(o, lambda a, b: a < b)
    def __le__(self, o): return self._cmp(o, lambda a, b: a <= b)
    def __gt__(self, o): return self._cmp(o, lambda a, b: a > b)
    def __ge__(self, o): return self._cmp(o, lambda a, b: a >= b)
    def __eq__(self, o): return self._cmp(o, lambda a, b: a == b)
    def __ne__(self, o): return self._cmp(o, lambda a, b: a != b)
    __hash__ = object.__hash__

    def __bool__(self):
        return self.path.branch(self.e != 0)

    def __format__(self, spec):
        return format(str(self.e), spec.rstrip("rsd") if spec else "")

    def __str__(self):
        return str(self.e)

    __repr__ = __str__


class SymBool:
    __slots__ = ("e", "path")

    def __init__(self, e, path):
        self.e, self.path = e, path

    def __bool__(self):
        return self.path.branch(self.e)


# =======================================================================================
# (a) the contract as z3


def _var(prefix, spec):
    name = f"{prefix}.{spec.name}"
    if spec.type == "int":
        return z3.Int(name)
    if spec.type == "bool":
        return z3.Bool(name)
    if spec.type == "float":
        return z3.Real(name)
    if spec.type == "str":
        if not spec.choices:
            raise NotImplementedError(f"str field {spec.name!r} without choices: extend "
                                      "model/prove.py to encode free strings")
        return z3.Int(name)       # index into choices
    raise NotImplementedError(f"field type {spec.type!r} of {spec.name!r}")


def _enc(spec, value):
    """z3 value of a Python value for `spec`, or None when it can never be equal (the
    contract compares strictly: a bool never equals an int)."""
    if spec.type == "str":
        v = getattr(value, "value", value)
        return z3.IntVal(spec.choices.index(v)) if v in spec.choices else None
    if spec.type == "bool":
        return z3.BoolVal(value) if isinstance(value, bool) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if spec.type == "int":
        return z3.IntVal(int(value)) if value == int(value) else None
    return z3.RealVal(value)


def _domain_values(spec):
    """The finite domain of a field the executor enumerates, or None (symbolic)."""
    if spec.type == "bool":
        return tuple(spec.choices) if spec.choices else (False, True)
    if spec.choices:
        return tuple(spec.choices)
    return None


class SymMessage:
    """z3 variables for one envelope or result: per field presence + value, per tensor
    presence, dtype code, ndim and dims."""

    def __init__(self, prefix: str, kind: str, unbounded=()):
        self.prefix, self.kind = prefix, kind
        env = kind == "envelope"
        self.fields = C.ENVELOPE_FIELDS if env else C.RESULT_FIELDS
        self.tspecs = C.ENVELOPE_TENSORS if env else C.RESULT_TENSORS
        self.rules = C.ENVELOPE_RULES if env else C.RESULT_RULES
        self.checks = C._ENVELOPE_CHECKS if env else C._RESULT_CHECKS
        self.unbounded = set(unbounded)
        self.spec = {s.name: s for s in self.fields}
        self.present = {s.name: z3.Bool(f"{prefix}.{s.name}?") for s in self.fields}
        self.value = {s.name: _var(prefix, s) for s in self.fields}
        self.tspec = {t.name: t for t in self.tspecs}
        self.t_present = {t.name: z3.Bool(f"{prefix}.{t.name}?") for t in self.tspecs}
        self.t_dtype = {t.name: z3.Int(f"{prefix}.{t.name}.dtype") for t in self.tspecs}
        self.t_ndim = {t.name: z3.Int(f"{prefix}.{t.name}.ndim") for t in self.tspecs}
        self.t_dims = {t.name: [z3.Int(f"{prefix}.{t.name}.d{i}")
                                for i in range(C.MAX_NDIM)] for t in self.tspecs}

    # ---- presence rules (data) -----------------------------------------------------
    def atom(self, atom):
        name, op, value = atom
        spec = self.spec.get(name)
        if spec is None:
            return z3.BoolVal(False)
        values = value if op == "in" else (value,)
        encs = [e for e in (_enc(spec, v) for v in values) if e is not None]
        return z3.And(self.present[name], _or(self.value[name] == e for e in encs))

    def rule(self, rule):
        return _and(self.atom(a) for a in rule.atoms)

    def eq(self, name, value):
        e = _enc(self.spec[name], value)
        return z3.And(self.present[name], self.value[name] == e) if e is not None \
            else z3.BoolVal(False)

    def payload(self):
        return _or(self.eq("action", a) for a in C.PAYLOAD_ACTIONS) \
            if "action" in self.spec else z3.BoolVal(False)

    # ---- what the field and tensor checks accept --------------------------------------
    def well_formed(self, where: str) -> list:
        """[(label, constraint)] of `_check_message` at `where`, from the specs."""
        out = []
        for s in self.fields:
            p, x = self.present[s.name], self.value[s.name]
            typed = []
            lo_hi = s.bounds
            if s.type == "int":
                typed.append(z3.And(x >= C.INT64_MIN, x <= C.INT64_MAX)
                             if s.name not in self.unbounded else z3.BoolVal(True))
            if s.type == "str":
                typed.append(z3.And(x >= 0, x < len(s.choices)))
            elif s.choices is not None:
                typed.append(_or(x == e for e in (_enc(s, c) for c in s.choices)
                                 if e is not None))
            if lo_hi is not None:
                typed.append(x >= lo_hi[0])
                if s.name not in self.unbounded:
                    typed.append(x <= lo_hi[1])
            cons = [z3.Implies(p, _and(typed))]
            if where in s.validated_at:
                need = self.rule(s.required_when)
                cons.append(z3.Implies(p, need))
                if not s.optional:
                    cons.append(z3.Implies(need, p))
            out.append((f"field:{s.name}", _and(cons)))
        payload = self.payload()
        for t in self.tspecs:
            p, n = self.t_present[t.name], t.name
            dims, ndim = self.t_dims[n], self.t_ndim[n]
            cons = [z3.Implies(z3.Not(payload), z3.Not(p)),
                    z3.And(ndim >= 0, ndim <= C.MAX_NDIM)]
            if where in t.validated_at:
                need = self.rule(t.required_when)
                cons += [z3.Implies(p, need), z3.Implies(z3.And(payload, need), p)]
                code = C.WIRE_DTYPES.get(t.dtype, (None,))[0]
                shape = [z3.BoolVal(code is not None)]
                if code is not None:
                    shape.append(self.t_dtype[n] == code)
                if t.shape is not None:
                    shape.append(ndim == len(t.shape))
                    for i, d in enumerate(t.shape):
                        if isinstance(d, str):
                            shape.append(z3.And(self.present[d], dims[i] == self.value[d])
                                         if d in self.spec else z3.BoolVal(False))
                        elif d is not None:
                            shape.append(dims[i] == d)
                else:
                    shape.append(z3.And(ndim >= t.ndim[0], ndim <= t.ndim[1]))
                shape += [z3.Implies(ndim > i, dims[i] >= 1) for i in range(C.MAX_NDIM)]
                cons.append(z3.Implies(p, _and(shape)))
            out.append((f"tensor:{n}", _and(cons)))
        return out

    # ---- concrete values from a z3 model ----------------------------------------------
    def concrete(self, m) -> tuple:
        meta, tensors = {}, {}
        for s in self.fields:
            if not z3.is_true(m.eval(self.present[s.name], model_completion=True)):
                continue
            x = m.eval(self.value[s.name], model_completion=True)
            if s.type == "bool":
                meta[s.name] = z3.is_true(x)
            elif s.type == "int":
                meta[s.name] = x.as_long()
            elif s.type == "float":
                meta[s.name] = float(x.as_fraction())
            else:
                meta[s.name] = s.choices[x.as_long()]
        codes = {v[0]: k for k, v in C.WIRE_DTYPES.items()}
        for t in self.tspecs:
            if not z3.is_true(m.eval(self.t_present[t.name], model_completion=True)):
                continue
            nd = m.eval(self.t_ndim[t.name], model_completion=True).as_long()
            dims = tuple(m.eval(d, model_completion=True).as_long()
                         for d in self.t_dims[t.name][:nd])
            dt = codes.get(m.eval(self.t_dtype[t.name], model_completion=True).as_long(),
                           t.dtype)
            tensors[t.name] = C.TensorDesc(dt, dims)
        return meta, tensors


class _Lazy(Mapping):
    """A message seen by check code: presence and finite values fork the path."""

    def __init__(self, msg: SymMessage, path: _Path, tensors: bool = False):
        self.msg, self.path, self.tensors = msg, path, tensors
        self.names = tuple(msg.tspec if tensors else msg.spec)
        self._p, self._v = {}, {}

    def _present(self, k) -> bool:
        if k not in self._p:
            p = (self.msg.t_present if self.tensors else self.msg.present)[k]
            self._p[k] = self.path.branch(p)
        return self._p[k]

    def __contains__(self, k):
        return k in self.names and self._present(k)

    def __getitem__(self, k):
        if k not in self.names or not self._present(k):
            raise KeyError(k)
        if k not in self._v:
            self._v[k] = _SymTensor(self.msg, k, self.path) if self.tensors \
                else self._value(k)
        return self._v[k]

    def _value(self, k):
        spec, x = self.msg.spec[k], self.msg.value[k]
        dom = _domain_values(spec)
        if dom is None:
            return Sym(x, self.path)
        j = self.path.choose([x == _enc(spec, v) for v in dom])
        v = dom[j]
        return int(v) if spec.type == "int" else v

    def __iter__(self):
        return (k for k in self.names if self._present(k))

    def __len__(self):
        return sum(1 for _ in self)


class _SymTensor:
    def __init__(self, msg, name, path):
        self.msg, self.name, self.path = msg, name, path
        self._shape = self._dtype = None

    @property
    def dtype(self):
        if self._dtype is None:
            names = list(C.WIRE_DTYPES)
            j = self.path.choose([self.msg.t_dtype[self.name] == C.WIRE_DTYPES[n][0]
                                  for n in names])
            self._dtype = names[j]
        return self._dtype

    @property
    def shape(self):
        if self._shape is None:
            nd = list(range(C.MAX_NDIM + 1))
            j = self.path.choose([self.msg.t_ndim[self.name] == n for n in nd])
            self._shape = tuple(Sym(d, self.path) for d in self.msg.t_dims[self.name][:j])
        return self._shape


def _place_groups(kind) -> list:
    """Places whose checks are identical are proved once: [(places, representative)]."""
    msg = SymMessage("_", kind)
    places = C.ENVELOPE_PLACES if kind == "envelope" else C.RESULT_PLACES
    sig = {}
    for w in places:
        key = tuple(s.name for s in (*msg.fields, *msg.tspecs, *msg.rules)
                    if w in s.validated_at)
        sig.setdefault(key, []).append(w)
    return [(tuple(ws), ws[0]) for ws in sig.values()]


@contextmanager
def _contract_mutant(name: Optional[str]):
    """Apply a contract mutation for the duration (formula mutants patch the function
    the check code calls; rule mutants are dropped by `_Contract`)."""
    if name is None:
        yield
        return
    kind, what = CONTRACT_MUTANTS[name][:2]
    if kind == "formula":
        patch = mock.patch.object(C, "expected_generator_calls",
                                  what(C.expected_generator_calls))
    else:
        patch = mock.patch.object(C, "ENVELOPE_RULES", tuple(
            r for r in C.ENVELOPE_RULES if r.name != what))
    with patch:
        yield


def _off_by_one_r0a(f):
    def mutant(regime, num_denoise_steps, *, do_kv_recompute=None):
        extra = 1 if C.Regime(regime) is C.Regime.R0A else 0
        return f(regime, num_denoise_steps, do_kv_recompute=do_kv_recompute) + extra
    return mutant


# name -> (kind, what): "formula" patches contract.expected_generator_calls, "drop_rule"
# removes one CrossRule. Obligation that must catch it, for the sensitivity report.
CONTRACT_MUTANTS = {
    "calls_off_by_one_r0a": ("formula", _off_by_one_r0a, "calls_match_protocol",
                             "expected_generator_calls returns one more in R0a"),
    "no_call_count_rule": ("drop_rule", "call_count", "calls_fixed",
                           "the call_count cross rule is dropped from the envelope rules"),
}

# PROTOCOL.md "Recompute regimes and call counts", read per chunk: the +1 is the recompute
# pass, so it is present exactly on chunks whose envelope schedules the recompute.
# (recompute values allowed, extra calls when recompute, context_frames, latent_anchor)
REGIME_TABLE = {
    "R1": {"recompute": (False,), "extra": 0, "context_frames": "never",
           "latent_anchor": False},
    "R0a": {"recompute": (False, True), "extra": 1, "context_frames": "iff recompute",
            "latent_anchor": False},
    "R0": {"recompute": (False, True), "extra": 1, "context_frames": "never",
           "latent_anchor": True},
}


class _Contract:
    """Formulas for messages under one contract mutant (or none)."""

    def __init__(self, mutant: Optional[str] = None):
        self.mutant = mutant
        self.dropped = {CONTRACT_MUTANTS[mutant][1]} \
            if mutant and CONTRACT_MUTANTS[mutant][0] == "drop_rule" else set()
        self.raises = []   # (rule, where, path condition, message, background)

    def _rules_ok(self, msg: SymMessage, where, background, ctx_fn) -> list:
        """[(label, formula)]: each rule's check returns None on exactly these inputs."""
        out = []
        for rule in msg.rules:
            if where not in rule.validated_at or rule.name in self.dropped:
                continue
            if rule.name not in msg.checks:
                raise UnmodelledGuard(f"contract rule {rule.name!r} has no check function")

            def run(path, rule=rule):
                meta, tensors = _Lazy(msg, path), _Lazy(msg, path, tensors=True)
                C._run_rules((rule,), msg.checks, meta, tensors, ctx_fn(path), where)
                return "ok"

            def guarded(path, run=run):
                try:
                    return run(path)
                except C.ContractError as e:
                    return ("violated", e.field)

            with _contract_mutant(self.mutant):
                paths = _paths(guarded, background + [f for _, f in out])
            ok = _or(c for c, o in paths if o == "ok")
            for c, o in paths:
                if isinstance(o, tuple) and o[0] == "raises":
                    self.raises.append((rule.name, where, c, o[1],
                                        background + [f for _, f in out]))
            out.append((f"rule:{rule.name}", ok))
        return out

    def envelope(self, prefix, where, prev=None, unbounded=()) -> tuple:
        """(SymMessage, [(label, formula)]) of a valid envelope at `where` (after `prev`,
        itself a (SymMessage, labelled formulas) pair, when given)."""
        msg = SymMessage(prefix, "envelope", unbounded)
        wf = msg.well_formed(where)
        bg = [f for _, f in wf]
        if prev is not None:
            bg += [f for _, f in prev[1]]

        def ctx(path):
            return {"prev": _Lazy(prev[0], path) if prev is not None else None}
        return msg, wf + self._rules_ok(msg, where, bg, ctx)

    def result(self, prefix, where, env) -> tuple:
        msg = SymMessage(prefix, "result")
        wf = msg.well_formed(where)
        bg = [f for _, f in wf] + [f for _, f in env[1]]

        def ctx(path):
            return {"env": _Lazy(env[0], path),
                    "env_tensors": _Lazy(env[0], path, tensors=True)}
        return msg, wf + self._rules_ok(msg, where, bg, ctx)


def _all(labelled) -> list:
    return [f for _, f in labelled]


def _core(labelled, extra) -> list:
    """Labels of an unsat core: which specs / rules exclude `extra`."""
    s = _solver()
    s.set("unsat_core", True)
    for i, (lab, f) in enumerate(labelled):
        s.assert_and_track(f, z3.Bool(f"__core{i}__{lab}"))
    for c in extra:
        s.add(c)
    if s.check() != z3.unsat:
        return []
    return sorted(str(b).split("__", 3)[-1] for b in s.unsat_core())


def _fmt_env(meta, tensors) -> str:
    keys = ("action", "regime", "num_denoise_steps", "do_kv_recompute", "latent_anchor",
            "expected_generator_calls")
    bits = [f"{k}={getattr(C.Action(meta[k]), 'name') if k == 'action' else meta[k]}"
            for k in keys if k in meta]
    if tensors:
        bits.append("tensors=" + ",".join(sorted(tensors)))
    return " ".join(bits)


def _replay(meta, tensors, where, mutant) -> str:
    """Run the real validator on a counterexample, under the mutant and shipped."""
    out = []
    for label, mut in (("mutant", mutant), ("shipped", None)):
        with _contract_mutant(mut):
            try:
                C.validate_envelope(meta, tensors, where=where)
                out.append(f"{label} validator accepts it")
            except C.ContractError as e:
                out.append(f"{label} validator rejects it ({e.field}: "
                           f"{e.reason.split(' (rule')[0]})")
    return "; ".join(out)


def contract_obligations(mutant: Optional[str] = None) -> list:
    """Obligations of part (a) under `mutant` (a CONTRACT_MUTANTS name) or shipped."""
    ob = []
    K = _Contract(mutant)

    def add(name, ok, detail, cex=None):
        ob.append(Obligation(f"contract.{name}", ok, detail, cex, "contract"))

    # ---- structure -----------------------------------------------------------------
    problems = []
    for t in (*C.ENVELOPE_TENSORS, *C.RESULT_TENSORS):
        if t.dtype not in C.WIRE_DTYPES:
            problems.append(f"tensor {t.name} dtype {t.dtype} not on the wire allowlist")
    for s in (*C.ENVELOPE_FIELDS, *C.RESULT_FIELDS, *C.ENVELOPE_TENSORS, *C.RESULT_TENSORS):
        if s.name in C.PIPELINE_ALIASES or s.name in C.RETIRED_NAMES:
            problems.append(f"{s.name} is declared and also rejected on the wire")
        if not set(s.validated_at) <= set(C.PLACES):
            problems.append(f"{s.name}: unknown place in {s.validated_at}")
    for rules, fields, checks in ((C.ENVELOPE_RULES, C.ENVELOPE_FIELDS, C._ENVELOPE_CHECKS),
                                  (C.RESULT_RULES, C.RESULT_FIELDS, C._RESULT_CHECKS)):
        names = {f.name for f in fields} | {t.name for t in (*C.ENVELOPE_TENSORS,
                                                              *C.RESULT_TENSORS)}
        for r in rules:
            if r.name not in checks:
                problems.append(f"rule {r.name} has no check function")
            for f in r.fields:
                if f not in names:
                    problems.append(f"rule {r.name} names unknown field {f}")
    add("structure", not problems, "; ".join(problems) or
        "every tensor dtype is on the wire allowlist, no declared name is an alias or "
        "retired name, every rule has a check and names declared fields")

    regime = C.field_spec("envelope", "regime")
    for places, where in _place_groups("envelope"):
        tag = "" if len(places) == len(C.ENVELOPE_PLACES) else f"[{where}]"
        env, F = K.envelope("env", where)
        allf = _all(F)
        # ---- consistency: every action, every regime x recompute -------------------
        rows, bad = [], []
        for a in C.ENVELOPE_ACTIONS:
            combos = [()]
            if a in C.PAYLOAD_ACTIONS:
                combos = [(r, rc) for r in regime.choices for rc in (False, True)]
            for combo in combos:
                extra = [env.eq("action", int(a))]
                if combo:
                    extra += [env.eq("regime", combo[0]), env.eq("do_kv_recompute", combo[1])]
                label = a.name + (f"/{combo[0]}/recompute={combo[1]}" if combo else "")
                if _sat(*allf, *extra):
                    rows.append(f"{label}: satisfiable")
                else:
                    rows.append(f"{label}: excluded by {', '.join(_core(F, extra))}")
        for a in C.ENVELOPE_ACTIONS:
            if not _sat(*allf, env.eq("action", int(a))):
                bad.append(f"action {a.name} has no valid envelope")
        for r in regime.choices:
            if not _sat(*allf, env.eq("action", int(C.Action.INFER)), env.eq("regime", r)):
                bad.append(f"regime {r} has no valid INFER envelope")
        add(f"envelope.consistent{tag}", not bad,
            "; ".join(bad) or "every action and every regime has a valid envelope at "
            + ", ".join(places) + " (" + "; ".join(rows) + ")")
        # ---- no dead field / tensor --------------------------------------------------
        dead = [s.name for s in env.fields if not _sat(*allf, env.present[s.name])]
        dead += [t.name for t in env.tspecs if not _sat(*allf, env.t_present[t.name])]
        add(f"envelope.no_dead_field{tag}", not dead,
            f"never present in a valid envelope: {dead}" if dead else
            f"each of the {len(env.fields)} fields and {len(env.tspecs)} tensors is "
            "present in some valid envelope")
        # ---- ordered pairs ------------------------------------------------------------
        prev_env = K.envelope("prev", where)
        nxt, G = K.envelope("next", where, prev=prev_env)
        pairs_bad = []
        for a, b in itertools.product(C.ENVELOPE_ACTIONS, repeat=2):
            if not _sat(*_all(prev_env[1]), *_all(G), prev_env[0].eq("action", int(a)),
                        nxt.eq("action", int(b))):
                pairs_bad.append(f"{b.name} after {a.name}")
        add(f"envelope.sequences{tag}", not pairs_bad,
            f"no valid envelope: {pairs_bad}" if pairs_bad else
            f"every (previous, next) action pair has valid envelopes under the "
            f"{sum(r.needs_prev for r in C.ENVELOPE_RULES)} ordering rules")
        # ---- the generator-call count is fixed, for every steps >= 1 ------------------
        unb = ("num_denoise_steps", "expected_generator_calls")
        e1, F1 = K.envelope("e1", where, unbounded=unb)
        e2, F2 = K.envelope("e2", where, unbounded=unb)
        for r in regime.choices:
            same = [e1.eq("action", int(C.Action.INFER)), e2.eq("action", int(C.Action.INFER)),
                    e1.eq("regime", r), e2.eq("regime", r),
                    e1.value["num_denoise_steps"] == e2.value["num_denoise_steps"],
                    e1.value["do_kv_recompute"] == e2.value["do_kv_recompute"],
                    e1.value["latent_anchor"] == e2.value["latent_anchor"],
                    e1.t_present["context_frames"] == e2.t_present["context_frames"]]
            differ = e1.value["expected_generator_calls"] != e2.value["expected_generator_calls"]
            m = _model(*_all(F1), *_all(F2), *same, differ)
            if m is None:
                add(f"calls_fixed[{r}]{tag}", True,
                    f"regime {r}: any two valid INFER envelopes with equal num_denoise_steps "
                    "(unbounded Int >= 1), do_kv_recompute, latent_anchor and context_frames "
                    "presence have equal expected_generator_calls")
            else:
                c1, c2 = e1.concrete(m), e2.concrete(m)
                add(f"calls_fixed[{r}]{tag}", False,
                    f"regime {r}: two valid envelopes, same plan bits, different counts",
                    [_fmt_env(*c1), _fmt_env(*c2), _replay(*c1, where, mutant)])
        # ---- ... and equals PROTOCOL.md's regime table ------------------------------
        e, FE = K.envelope("t", where, unbounded=unb)
        steps, calls = e.value["num_denoise_steps"], e.value["expected_generator_calls"]
        rec, cf = e.value["do_kv_recompute"], e.t_present["context_frames"]
        for r in regime.choices:
            spec = REGIME_TABLE[r]
            base = [*_all(FE), e.eq("action", int(C.Action.INFER)), e.eq("regime", r)]
            want = steps + z3.If(rec, spec["extra"], 0)
            m = _model(*base, calls != want)
            cf_want = {"never": z3.BoolVal(False), "iff recompute": rec}[spec["context_frames"]]
            m_cf = _model(*base, cf != cf_want)
            m_anchor = _model(*base, e.value["latent_anchor"] != spec["latent_anchor"])
            m_rec = [_sat(*base, rec == z3.BoolVal(x)) for x in (False, True)]
            rec_ok = tuple(x for x, ok in zip((False, True), m_rec) if ok) == spec["recompute"]
            if m is None and m_cf is None and m_anchor is None and rec_ok:
                add(f"calls_match_protocol[{r}]{tag}", True,
                    f"regime {r}: expected_generator_calls == num_denoise_steps"
                    + (f" + {spec['extra']} when do_kv_recompute" if spec["extra"] else "")
                    + f" for every steps >= 1; do_kv_recompute in {spec['recompute']}; "
                    f"context_frames {spec['context_frames']}; latent_anchor == "
                    f"{spec['latent_anchor']}")
            else:
                mm = m or m_cf or m_anchor
                cex = None
                if mm is not None:
                    meta, tensors = e.concrete(mm)
                    s_ = meta["num_denoise_steps"]
                    table = s_ + (spec["extra"] if meta["do_kv_recompute"] else 0)
                    cex = [_fmt_env(meta, tensors),
                           f"PROTOCOL.md's table gives {table} calls for regime {r}, "
                           f"steps={s_}, do_kv_recompute={meta['do_kv_recompute']}",
                           _replay(meta, tensors, where, mutant)]
                add(f"calls_match_protocol[{r}]{tag}", False,
                    f"regime {r}: the contract admits an envelope PROTOCOL.md's regime table "
                    "does not" + ("" if rec_ok else f" (recompute values differ from "
                                                    f"{spec['recompute']})"), cex)
        # ---- the declared bounds cover the formula ------------------------------------
        eb, FB = K.envelope("b", where, unbounded=("expected_generator_calls",))
        lo, hi = C.field_spec("envelope", "expected_generator_calls").bounds
        sb = C.field_spec("envelope", "num_denoise_steps").bounds
        m = _model(*_all(FB), eb.eq("action", int(C.Action.INFER)),
                   z3.Or(eb.value["expected_generator_calls"] < lo,
                         eb.value["expected_generator_calls"] > hi))
        add(f"bounds_cover_formula{tag}", m is None,
            f"for every num_denoise_steps in {list(sb)} and every regime, the count lies in "
            f"expected_generator_calls bounds {[lo, hi]}" if m is None else
            "a plan within the step bounds has a count outside its bounds",
            None if m is None else [_fmt_env(*eb.concrete(m))])

    # ---- results ----------------------------------------------------------------------
    where_env = C.ENVELOPE_PLACES[0]
    for places, where in _place_groups("result"):
        tag = "" if len(places) == len(C.RESULT_PLACES) else f"[{where}]"
        env_pair = K.envelope("renv", where_env)
        res, R = K.result("res", where, env_pair)
        missing = [a.name for a in C.RESULT_ACTIONS
                   if not _sat(*_all(env_pair[1]), *_all(R), res.eq("action", int(a)))]
        dead = [s.name for s in res.fields
                if not _sat(*_all(env_pair[1]), *_all(R), res.present[s.name])]
        dead += [t.name for t in res.tspecs
                 if not _sat(*_all(env_pair[1]), *_all(R), res.t_present[t.name])]
        pinned = _model(*_all(env_pair[1]), *_all(R), res.eq("action", int(C.Action.INFER)),
                        res.value["observed_generator_calls"]
                        != env_pair[0].value["expected_generator_calls"])
        ok = not missing and not dead and pinned is None
        add(f"result.consistent{tag}", ok,
            f"every result action ({', '.join(a.name for a in C.RESULT_ACTIONS)}) has a "
            "valid result answering a valid envelope, every field can be present, and an "
            "INFER result's observed_generator_calls equals the envelope's "
            "expected_generator_calls" if ok else
            f"no valid result for {missing}; dead {dead}; observed count free: "
            f"{pinned is not None}")

    # ---- check code never crashes on a message that passed the checks before it ------
    crashes = []
    for rule, where, cond, why, bg in K.raises:
        if _sat(*bg, cond):
            crashes.append(f"{rule} at {where}: {why}")
    add("checks_total", not crashes, "; ".join(sorted(set(crashes))) or
        "no cross-rule check raises anything but ContractError on a message whose "
        "fields passed and whose earlier rules held (every path explored)")
    return ob


def contract_sensitivity() -> list:
    """Each contract mutant is caught by the obligation it targets, with an envelope."""
    out = []
    for name, (kind, _, target, summary) in CONTRACT_MUTANTS.items():
        got = [o for o in contract_obligations(name)
               if o.name.startswith(f"contract.{target}") and not o.ok]
        cex = got[0].counterexample if got else None
        out.append(Obligation(
            f"contract.mutant_caught[{name}]", bool(got and cex),
            f"{summary}: caught by {', '.join(o.name for o in got)}" if got else
            f"{summary}: NOT caught by contract.{target}", cex, "contract"))
    return out


# =======================================================================================
# (b) guards: z3 models of the functions that decide collective rows


class _Vec:
    """The value of an all_gather seen from one pair of members: their two
    contributions plus the rest of the group, abstracted by one uninterpreted predicate
    `rest(x)` = "every other member contributed x" (the same vector at both members)."""

    def __init__(self, ca, cb, tag):
        ca, cb = _z(ca), _z(cb)
        self.ca, self.cb = ca, cb
        self.rest = z3.Function(f"rest_{tag}", ca.sort(), z3.BoolSort())

    def all_eq(self, x):
        return z3.And(self.ca == x, self.cb == x, self.rest(_z(x)))

    def all_same(self):
        return z3.And(self.ca == self.cb, self.rest(self.ca))


class _ConcreteVec:
    def __init__(self, items):
        self.items = tuple(items)

    def all_eq(self, x):
        return all(c == x for c in self.items)

    def all_same(self):
        return len(set(self.items)) <= 1


def _z(x):
    if isinstance(x, bool):
        return z3.BoolVal(x)
    if isinstance(x, int):
        return z3.IntVal(x)
    return x


def _has(s, name):
    """`name in v.inject` for a concrete frozenset or a symbolic {name: Bool}."""
    return name in s if isinstance(s, frozenset) else s[name]


def _bool(x) -> bool:
    if isinstance(x, bool):
        return x
    return z3.is_true(z3.simplify(x))


# guard name -> builder(v, cfg) -> Bool. `v` is the role's variables: the real NamedTuple
# (for the differential check) or a symbolic namespace with the same attribute names.
GUARDS: dict = {
    "more_calls": lambda v, cfg: v.calls_done + 1 < v.planned,
    "last_call": lambda v, cfg: z3.And(v.calls_done + 1 == v.planned, z3.Not(_z(v.flag))),
    "last_call_then_cond": lambda v, cfg: z3.And(v.calls_done + 1 == v.planned, _z(v.flag)),
    "wrong_group_requested": lambda v, cfg: _z(_has(v.inject, "wrong_group")),
    "bad_result_armed": lambda v, cfg: _z(_has(v.inject, "leader_bad_result")),
    "rejected_by_leader": lambda v, cfg: z3.And(v.env.action == int(C.Action.ERROR),
                                                _z(v.rejected)),
    "error_from_rank0": lambda v, cfg: z3.And(v.env.action == int(C.Action.ERROR),
                                              z3.Not(_z(v.rejected))),
    "env_not_infer": lambda v, cfg: v.env.action != int(C.Action.INFER),
}
# accept name -> builder(v, cfg, value) -> Bool
ACCEPTS: dict = {
    "parity_agrees": lambda v, cfg, vec: _z(vec.all_same()),
    "parity_differs": lambda v, cfg, vec: z3.Not(_z(vec.all_same())),
    "counts_agree": lambda v, cfg, vec: _z(vec.all_eq(v.env.calls)),
    "counts_differ": lambda v, cfg, vec: z3.Not(_z(vec.all_eq(v.env.calls))),
}
for _a in C.Action:
    GUARDS[f"env_is_{_a.name}"] = (lambda a: lambda v, cfg: v.env.action == a)(int(_a))
    ACCEPTS[f"msg_is_{_a.name}"] = (lambda a: lambda v, cfg, m: m.action == a)(int(_a))
# make name -> (builder(v, cfg) -> value, variables it reads, variable it returns or None)
MAKES: dict = {
    "current_envelope": (lambda v, cfg: v.env, ("env",), "env"),
    "plan_calls": (lambda v, cfg: v.env.calls + v.plan_delta, ("env", "plan_delta"), None),
    "parity_key": (lambda v, cfg: v.flag, ("flag",), "flag"),
    "contribution": (lambda v, cfg: 0, (), None),
}
# accepts that hold only when every member contributed the same value: after such a row
# the variable a single-variable make returns is equal on every member (parity check).
ALL_EQUAL_ACCEPTS = {"parity_agrees"}
# update name -> (kind of msg it reads, {variable written: sources}). A source is a
# variable, "msg" (the row's value: equal on every member iff the row is a collective),
# "const" or "cfg". Checked against the code on sampled states (`_check_models`).
UPDATES: dict = {
    "got_envelope_header": ("msg", {"env_in": ("msg",),
                                    "terminal_in": ("terminal_in", "msg"),
                                    "seen_call": ("seen_call", "msg"),
                                    "seen_chunk": ("seen_chunk", "msg")}),
    "store_envelope": ("msg", {"env": ("msg",)}),
    "reject_envelope": (None, {"env": ("env",), "rejected": ("const",),
                               "inject": ("inject",)}),
    "start_phase_b": ("vector", {"planned": ("msg",), "calls_done": ("const",)}),
    "start_phase_b_own": (None, {"planned": ("env", "plan_delta"), "calls_done": ("const",)}),
    "start_phase_b_inferred": (None, {"planned": ("cfg", "plan_delta"),
                                      "calls_done": ("const",)}),
    "call_done": (None, {"calls_done": ("calls_done",)}),
    "spoil_result": (None, {"bad_result": ("const",), "inject": ("inject",)}),
    # the leader's main thread and its queues (the comms thread issues no collective)
    "take_envelope_in": (None, {"env": ("inbox",), "inbox": ("inbox",),
                                "rejected": ("const",)}),
    "queue_result": (None, {"outbox": ("outbox", "env", "calls_done", "bad_result")}),
    "queue_error_result": (None, {"outbox": ("outbox", "env"), "inbox": ("const",),
                                  "results_done": ("const",)}),
    "queue_error_result_first": (None, {"outbox": ("outbox", "env"), "inbox": ("const",),
                                        "results_done": ("const",)}),
    "finish_results": (None, {"results_done": ("const",)}),
}
# Variables the semantics initialises per rank (from that rank's faults / flags). The
# dataflow starts from these plus whatever `_per_rank_init` finds differing across mesh
# ranks in `Model.initial_state`; a difference not listed here fails an obligation.
PER_RANK_INIT = ("flag", "plan_delta", "inject")
# Domain facts of the symbolic variables (the semantics never makes these negative).
NONNEG = ("planned", "calls_done", "plan_delta", "env.calls")


def _fname(fn) -> Optional[str]:
    return None if fn is None else fn.__name__


class _NS:
    """Symbolic variables of one member: attribute access like the NamedTuples."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def _sym_msg(prefix):
    sample = g.Msg(0, 0, 0, 0, 0)
    kw = {}
    for f, x in zip(g.Msg._fields, sample):
        kw[f] = z3.Bool(f"{prefix}.{f}") if isinstance(x, bool) else z3.Int(f"{prefix}.{f}")
    return _NS(**kw)


def _sym_vars(cls, prefix):
    """Symbolic namespace for a role's variable class (MeshVars / Rank0Vars): ints,
    bools, Optional[Msg] and fault sets get z3 variables; other fields are opaque."""
    kw, kinds = {}, {}
    for f, x in zip(cls._fields, cls()):
        if isinstance(x, bool):
            kw[f], kinds[f] = z3.Bool(f"{prefix}.{f}"), "scalar"
        elif isinstance(x, int):
            kw[f], kinds[f] = z3.Int(f"{prefix}.{f}"), "scalar"
        elif x is None and f in ("env", "env_out", "res_in"):
            kw[f], kinds[f] = _sym_msg(f"{prefix}.{f}"), "msg"
        elif isinstance(x, frozenset):
            kw[f] = {n: z3.Bool(f"{prefix}.{f}.{n}") for n in INJECTABLE}
            kinds[f] = "set"
    ns = _NS(**kw)
    ns._kinds = kinds
    return ns


def _var_eq(a, b, name):
    x, y = getattr(a, name), getattr(b, name)
    kind = a._kinds[name]
    if kind == "scalar":
        return x == y
    if kind == "msg":
        return _and(getattr(x, f) == getattr(y, f) for f in g.Msg._fields)
    return _and(x[n] == y[n] for n in INJECTABLE)


def _domain(v) -> list:
    out = []
    for name, kind in v._kinds.items():
        if kind == "msg":
            m = getattr(v, name)
            out.append(_or(m.action == int(a) for a in C.Action))
    for path in NONNEG:
        obj = v
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is not None and z3.is_int(obj):
            out.append(obj >= 0)
    return out


def _nice(v) -> list:
    """Preferences for readable counterexamples (tried first, dropped if unsat)."""
    out = []
    for name, kind in v._kinds.items():
        x = getattr(v, name)
        if kind == "msg":
            out += [x.action == int(C.Action.INFER), x.calls >= 1, x.call_id >= 0,
                    x.chunk >= 0, x.epoch >= 0]
        elif kind == "set":
            out += [z3.Not(b) for b in x.values()]
    for name, want in (("calls_done", 0), ("flag", False), ("rejected", False)):
        if name in v._kinds:
            out.append(getattr(v, name) == want)
    if "planned" in v._kinds:
        out.append(v.planned >= 1)
    return out


def _cex_model(base, cond, nice):
    """A model of base & cond, satisfying as many readability preferences as it can."""
    if not _sat(*base, cond):
        return None
    opt = z3.Optimize()
    opt.set("timeout", TIMEOUT_MS)
    opt.add(*base, cond)
    for c in nice:
        opt.add_soft(c)
    return opt.model() if opt.check() == z3.sat else _model(*base, cond)


def _msg_value(v, name, m):
    x = getattr(v, name)
    if v._kinds[name] == "msg":
        return "(" + " ".join(f"{f}={m.eval(getattr(x, f), model_completion=True)}"
                              for f in g.Msg._fields) + ")"
    if v._kinds[name] == "set":
        on = [n for n in INJECTABLE if z3.is_true(m.eval(x[n], model_completion=True))]
        return "{" + ",".join(on) + "}"
    return str(m.eval(x, model_completion=True))


def _guard_text(r) -> str:
    return "/".join(x for x in (_fname(r.guard), _fname(r.accept)) if x) or "always"


def _sig(op) -> tuple:
    return (op.op, op.group, op.root, op.kind)


def _sig_text(s) -> str:
    root = f", root={s[2]}" if s[2] is not None else ""
    return f"{s[0]}({s[1]}{root}, {s[3]})"


class _Variant:
    """One kind of process: its role, rows per thread, the thread that issues
    collectives, its start control state and the groups it is a member of."""

    def __init__(self, name, role, table, start, groups):
        self.name, self.role, self.groups = name, role, groups
        threads = [t for t, rows in enumerate(table)
                   if any(isinstance(r.op, Coll) for rs in rows.values() for r in rs)]
        self.coll_threads = threads
        self.t = threads[0] if threads else 0
        self.rows = table[self.t]
        self.start = start[self.t]
        self.vars_cls = g.Rank0Vars if role == "rank0" else g.MeshVars


def _variants(cfg: Config) -> tuple:
    """(model, [variants]) for cfg: rank0, leader, worker and the worker a fault or
    mutation singles out (when its rows differ)."""
    model = model_for(cfg.with_(mesh=max(cfg.mesh, 3)))
    init = model.initial_state()
    out, seen = [], {}
    for p, role in enumerate(model.roles):
        groups = tuple(gr for gr, mem in model.members.items() if p in mem)
        sig = tuple(tuple((pc, tuple(id(r) for r in rs)) for pc, rs in sorted(t.items()))
                    for t in model.tables[p])
        if (role, sig) in seen:
            continue
        name = role if role not in [v.role for v in out] else f"{role}*"
        seen[(role, sig)] = name
        out.append(_Variant(name, role, model.tables[p], init.procs[p].pcs, groups))
    return model, out


def _pairs(variants) -> list:
    """Pairs of distinct ranks: a singled-out variant (name*) is one rank; the leader
    and rank0 are one rank each; plain workers can pair with each other (N >= 3)."""
    out = []
    for i, a in enumerate(variants):
        for b in variants[i:]:
            if a is b and (a.role != "worker" or a.name.endswith("*")):
                continue
            if {a.role, b.role} == {"leader"}:
                continue
            out.append((a, b))
    return out


def _per_rank_init(cfg: Config) -> set:
    """MeshVars fields whose initial value differs across mesh ranks in some config."""
    out = set()
    for inject in [frozenset()] + [frozenset({f}) for f in INJECTABLE]:
        st = model_for(cfg.with_(mesh=3, inject=inject, mutation="")).initial_state()
        vs = [pr.v for pr in st.procs[1:]]
        for f in g.MeshVars._fields:
            if len({repr(getattr(v, f)) for v in vs}) > 1:
                out.add(f)
    return out


def _replicated(model, var: _Variant, per_rank: set) -> dict:
    """pc -> variables equal on every member of the group whenever this role is at pc
    (a must-dataflow: intersection over incoming rows). rank0's variables are its own."""
    if var.role == "rank0":
        return {pc: frozenset() for pc in var.rows}
    allv = frozenset(f for f in g.MeshVars._fields)
    R = {var.start: allv - per_rank}
    work = [var.start]
    root_of = {gr: model.roles[model.members[gr][0]] for gr in model.members}
    while work:
        pc = work.pop()
        for row in var.rows.get(pc, ()):
            if isinstance(row.op, Exit):
                continue
            s = set(R[pc])
            coll = isinstance(row.op, Coll)
            if row.update is not None:
                name = _fname(row.update)
                if name not in UPDATES:
                    raise UnmodelledGuard(f"update {name} ({var.name} row {row.label}) has "
                                          "no dependency model in model/prove.py UPDATES")
                for x, srcs in UPDATES[name][1].items():
                    # Equal on every member only when written at a collective (all members
                    # take it at the same instance) from equal sources; a local row may
                    # run on one member only (e.g. the leader's rejection of an envelope).
                    ok = coll and all(src in ("const", "cfg", "msg") or src in R[pc]
                                      for src in srcs)
                    (s.add if ok else s.discard)(x)
            if coll and row.make is not None:
                mk = _fname(row.make)
                if mk not in MAKES:
                    raise UnmodelledGuard(f"contribution {mk} ({var.name} row {row.label})"
                                          " has no z3 model in model/prove.py MAKES")
                _, reads, returns = MAKES[mk]
                if row.op.op == "broadcast" and returns and \
                        root_of[row.op.group] == var.role and row.op.root == 0:
                    s.add(returns)      # the root now holds exactly what everyone received
                if _fname(row.accept) in ALL_EQUAL_ACCEPTS and returns:
                    s.add(returns)      # every member contributed the same value
            new = frozenset(s)
            if row.dst not in R:
                R[row.dst] = new
                work.append(row.dst)
            elif not R[row.dst] <= new:
                R[row.dst] = R[row.dst] & new
                work.append(row.dst)
    return R


def _is_dp(var: _Variant, pc, shared) -> bool:
    return any(isinstance(r.op, Coll) and r.op.group in shared for r in var.rows.get(pc, ()))


def _closure(var: _Variant, pc, shared) -> tuple:
    """Decision points (pcs with a collective on a shared group) and ends reachable from
    pc through other rows (local, p2p, exits, collectives on unshared groups)."""
    out, seen, stack = set(), set(), [pc]
    while stack:
        q = stack.pop()
        if q in seen:
            continue
        seen.add(q)
        if q in (FINAL, DEAD_THREAD) or q not in var.rows:
            out.add(("end", q))
            continue
        if _is_dp(var, q, shared):
            out.add(("dp", q))
            continue
        for r in var.rows[q]:
            if isinstance(r.op, Exit):
                out.add(("exit", r.op.how))
            else:
                stack.append(r.dst)
    return tuple(sorted(out))


def _need(table, fn, what, var, row):
    if fn is None:
        return None
    name = _fname(fn)
    if name not in table:
        raise UnmodelledGuard(f"{what} {name} ({var.name} row {row.label}) decides a "
                              f"collective but has no z3 model in model/prove.py")
    return table[name]


class _PairProof:
    """Product of two members' tables over their collective decision points."""

    def __init__(self, model, a: _Variant, b: _Variant, per_rank, cfg):
        self.model, self.a, self.b, self.cfg = model, a, b, cfg
        self.shared = tuple(gr for gr in a.groups if gr in b.groups)
        self.Ra = _replicated(model, a, per_rank)
        self.Rb = _replicated(model, b, per_rank)
        self.root_of = {gr: model.roles[model.members[gr][0]] for gr in model.members}
        self.failures, self.notes, self.checked = [], [], 0

    def run(self):
        a, b = self.a, self.b
        start = [(x, y) for x in _closure(a, a.start, self.shared)
                 for y in _closure(b, b.start, self.shared)]
        parent = {p: None for p in start}
        work = list(start)
        while work:
            pair = work.pop(0)
            succ = self._pair(pair, parent)
            for s in succ:
                if s not in parent:
                    parent[s] = pair
                    work.append(s)
        return self

    def _path(self, pair, parent) -> str:
        chain = []
        while pair is not None:
            chain.append("/".join(q if k == "dp" else f"{k}:{q}" for k, q in pair))
            pair = parent[pair]
        return " -> ".join(reversed(chain))

    def _pair(self, pair, parent) -> list:
        (ka, pa), (kb, pb) = pair
        if ka != "dp" and kb != "dp":
            return []
        if ka != "dp" or kb != "dp":
            waiting, gone = (self.a, pa) if ka == "dp" else (self.b, pb), \
                (self.b, kb, pb) if ka == "dp" else (self.a, ka, pa)
            sigs = sorted({_sig_text(_sig(r.op)) for r in waiting[0].rows[waiting[1]]
                           if isinstance(r.op, Coll) and r.op.group in self.shared})
            how = gone[2]
            if gone[1] == "exit" and how in ("error", "abort"):
                self.notes.append(f"{gone[0].name} exits ({how}) while {waiting[0].name} "
                                  f"waits in {', '.join(sigs)}: released by the "
                                  f"{'abort flag' if how == 'abort' else 'watchdog'}")
            else:
                self.failures.append((
                    f"{gone[0].name} leaves ({gone[1]} {how}) while {waiting[0].name} "
                    f"waits in {', '.join(sigs)}", [f"path {self._path(pair, parent)}"]))
            return []
        return self._decide(pair, pa, pb, parent)

    def _row_split(self, ctx, m, ra, rb, ta, cb, ca, value, taken, va, vb, nxt, cex,
                   an, bn):
        """A row both tables share fires on one member only: say what each does."""
        a, b = self.a, self.b
        on_a = z3.is_true(m.eval(ta, model_completion=True))
        first, second = (a, b) if on_a else (b, a)
        fname, sname = (an, bn) if on_a else (bn, an)
        row_first = ra if on_a else rb
        lines = [f"{fname} takes {row_first.label} [{_guard_text(row_first)}] -> "
                 f"{row_first.dst}; next: {nxt(first, row_first)}"]
        for x in (cb if on_a else ca):
            val = value(ra, x) if on_a else value(x, rb)
            t = taken(second, vb if on_a else va, x, val)
            if z3.is_true(m.eval(t, model_completion=True)):
                lines.append(f"{sname} takes {x.label} [{_guard_text(x)}] -> "
                             f"{x.dst}; next: {nxt(second, x)}")
        return (f"{ctx}: row {ra.label} [{_guard_text(ra)}] fires on {fname} only, "
                "so the two ranks go on to different collectives", cex(m, lines))

    def _decide(self, pair, pa, pb, parent) -> list:
        a, b, cfg = self.a, self.b, self.cfg
        va, vb = _sym_vars(a.vars_cls, f"{a.name}"), _sym_vars(b.vars_cls, f"{b.name}'")
        an, bn = a.name, (b.name + "'" if b.name == a.name else b.name)
        repl = sorted(set(self.Ra.get(pa, ())) & set(self.Rb.get(pb, ()))
                      & set(va._kinds) & set(vb._kinds))
        base = _domain(va) + _domain(vb) + [_var_eq(va, vb, x) for x in repl]
        nice = _nice(va) + _nice(vb)
        rows_a, rows_b = a.rows[pa], b.rows[pb]
        ca = [r for r in rows_a if isinstance(r.op, Coll) and r.op.group in self.shared]
        cb = [r for r in rows_b if isinstance(r.op, Coll) and r.op.group in self.shared]

        def en(var, v, r):
            f = _need(GUARDS, r.guard, "guard", var, r)
            return _z(f(v, cfg)) if f is not None else z3.BoolVal(True)

        def value(ra, rb):
            op = ra.op
            if op.op == "broadcast":
                root = self.root_of[op.group] if op.root == 0 else \
                    self.model.roles[self.model.members[op.group][op.root]]
                for var, v, r in ((a, va, ra), (b, vb, rb)):
                    if var.role == root and r.make is not None:
                        return _need(MAKES, r.make, "contribution", var, r)[0](v, cfg)
                return _sym_msg(f"bcast.{op.group}.{op.kind}")
            if op.op == "all_gather":
                fa = _need(MAKES, ra.make, "contribution", a, ra)
                fb = _need(MAKES, rb.make, "contribution", b, rb)
                xa = fa[0](va, cfg) if fa else z3.IntVal(0)
                xb = fb[0](vb, cfg) if fb else z3.IntVal(0)
                return _Vec(xa, xb, f"{op.group}_{op.kind}")
            return None

        def taken(var, v, r, val):
            f = _need(ACCEPTS, r.accept, "accept", var, r)
            acc = _z(f(v, cfg, val)) if f is not None else z3.BoolVal(True)
            return z3.And(en(var, v, r), acc)

        ctx = f"{an}@{pa} / {bn}@{pb}"
        path = self._path(pair, parent)

        def cex(m, lines):
            per = []
            for x in sorted(va._kinds):
                if x in repl:
                    continue
                sa = _msg_value(va, x, m)
                sb = _msg_value(vb, x, m) if x in vb._kinds else "-"
                if sa != sb:
                    per.append(f"{x}: {an}={sa} {bn}={sb}")
            rep = [f"{x}={_msg_value(va, x, m)}" for x in repl]
            same = [f"{x}={_msg_value(va, x, m)}" for x in sorted(va._kinds)
                    if x not in repl and x in vb._kinds
                    and _msg_value(va, x, m) == _msg_value(vb, x, m)]
            return [f"path {path}",
                    f"replicated, equal on both: {', '.join(rep) or '(none)'}",
                    f"per-rank (free in the proof), differing: {'; '.join(per) or '(none)'}",
                    f"per-rank, equal in this example: {', '.join(same) or '(none)'}"] + lines

        def nxt(var, r):
            ends = _closure(var, r.dst, self.shared)
            out = set()
            for k, q in ends:
                if k == "dp":
                    out |= {_sig_text(_sig(x.op)) for x in var.rows[q]
                            if isinstance(x.op, Coll) and x.op.group in self.shared}
                else:
                    out.add(f"{k} {q}")
            return ", ".join(sorted(out))

        self.checked += 1
        # O2: a row both tables share fires on both members or on neither (checked
        # first: it names the row, which reads better than the collectives it leads to).
        for ra in ca:
            for rb in cb:
                same_row = _sig(ra.op) == _sig(rb.op) and ra.label == rb.label \
                    and ra.guard is rb.guard and ra.accept is rb.accept
                if not same_row:
                    continue
                val = value(ra, rb)
                ta, tb = taken(a, va, ra, val), taken(b, vb, rb, val)
                m = _cex_model(base, ta != tb, nice)
                if m is not None:
                    self.failures.append(self._row_split(ctx, m, ra, rb, ta, cb, ca, value,
                                                         taken, va, vb, nxt, cex, an, bn))
                    return []
        # O1: the same collective (op, group, root, kind), or none, on both members.
        sigs = sorted({_sig(r.op) for r in ca + cb}, key=repr)
        en_a = {s: _or(en(a, va, r) for r in ca if _sig(r.op) == s) for s in sigs}
        en_b = {s: _or(en(b, vb, r) for r in cb if _sig(r.op) == s) for s in sigs}
        for s in sigs:
            m = _cex_model(base, en_a[s] != en_b[s], nice)
            if m is not None:
                on_a = z3.is_true(m.eval(en_a[s], model_completion=True))
                who, other, other_en = (an, bn, en_b) if on_a else (bn, an, en_a)
                alt = [_sig_text(t) for t in sigs
                       if z3.is_true(m.eval(other_en[t], model_completion=True))]
                self.failures.append((
                    f"{ctx}: different collectives: {who} enters {_sig_text(s)}, "
                    f"{other} enters {', '.join(alt) or 'no collective'}", cex(m, [])))
                return []
        for name, E in ((an, en_a), (bn, en_b)):
            for s1, s2 in itertools.combinations(sigs, 2):
                m = _cex_model(base, z3.And(E[s1], E[s2]), nice)
                if m is not None:
                    self.failures.append((f"{ctx}: {name} enables both {_sig_text(s1)}"
                                          f" and {_sig_text(s2)}", cex(m, [])))
                    return []
        # escapes: a non-collective row enabled at a decision point skips the collective.
        for var, name, v, rows, other, ov, orows in (
                (a, an, va, rows_a, b, vb, rows_b), (b, bn, vb, rows_b, a, va, rows_a)):
            for r in rows:
                if r in ca or r in cb:
                    continue
                if isinstance(r.op, Exit) and r.op.how == "abort":
                    self.notes.append(f"{var.name}@{r.src} may take {r.label} "
                                      f"(exit abort) instead of the collective: the abort "
                                      "flag releases every member")
                    continue
                twin = [x for x in orows if x.label == r.label and x.guard is r.guard]
                if not twin:
                    self.failures.append((f"{ctx}: {name} may leave the collective "
                                          f"through {r.label} ({op_text(r.op)})",
                                          [f"path {path}"]))
                    return []
                m = _cex_model(base, en(var, v, r) != en(other, ov, twin[0]), nice)
                if m is not None:
                    self.failures.append((f"{ctx}: {r.label} enabled on one member only",
                                          cex(m, [])))
                    return []
        # jointly possible rows (same collective) lead to the next aligned pairs.
        succ = []
        for ra in ca:
            for rb in cb:
                if _sig(ra.op) != _sig(rb.op):
                    continue
                val = value(ra, rb)
                if _sat(*base, taken(a, va, ra, val), taken(b, vb, rb, val)):
                    for x in _closure(a, ra.dst, self.shared):
                        for y in _closure(b, rb.dst, self.shared):
                            succ.append((x, y))
        return sorted(set(succ))


def guard_obligations(mutation: Optional[str] = None, cfg: Optional[Config] = None) -> list:
    """Part (b) on the shipped tables or a registry mutation's."""
    from .mutations import mutation_config
    base = cfg or Config(mesh=3, chunks=2)
    cfg = mutation_config(base, mutation) if mutation else base
    tag = f"[{mutation}]" if mutation else ""
    model, variants = _variants(cfg)
    ob = []
    derived = _per_rank_init(base)
    unknown = sorted(derived - set(PER_RANK_INIT))
    ob.append(Obligation(
        f"guards.per_rank_init{tag}", not unknown,
        f"initial_state sets these per rank but PER_RANK_INIT omits them: {unknown}"
        if unknown else f"per-rank at start: {', '.join(PER_RANK_INIT)} (initial_state "
        f"differs across mesh ranks in: {', '.join(sorted(derived)) or 'none'})",
        section="guards"))
    per_rank = set(PER_RANK_INIT) | derived
    for a, b in _pairs(variants):
        proof = _PairProof(model, a, b, per_rank, cfg).run()
        n = f"{a.name}/{b.name}"
        mesh_n = "N >= 3" if a.role == b.role == "worker" else \
            "N >= 2" if "rank0" not in (a.role, b.role) and a.role != b.role else "N >= 1"
        if proof.failures:
            head, lines = proof.failures[0]
            ob.append(Obligation(
                f"guards.same_collectives[{n}]{tag}", False,
                f"two ranks with the same replicated state issue different collectives: "
                f"{head}" + (f" (+{len(proof.failures) - 1} more)"
                             if len(proof.failures) > 1 else ""),
                lines, "guards"))
        else:
            notes = sorted(set(proof.notes))
            ob.append(Obligation(
                f"guards.same_collectives[{n}]{tag}", True,
                f"{a.name} and {b.name} ({mesh_n}; shared groups "
                f"{', '.join(proof.shared)}): at each of {proof.checked} aligned decision "
                "points, equal replicated state gives the same collective and the same "
                "rows; the argument is per pair of members, so it holds for every mesh "
                "size" + (f". Notes: {'; '.join(notes)}" if notes else ""),
                None, "guards"))
    return ob


def _samples(n=150, seed=0) -> list:
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        env = g.Msg(rnd.choice(list(C.Action)), rnd.randint(-1, 3), rnd.randint(-1, 3),
                    rnd.randint(0, 2), rnd.randint(0, 3), rnd.random() < .5)
        inj = frozenset(f for f in INJECTABLE if rnd.random() < .3)
        msgs = [g.Msg(rnd.choice(list(C.Action)), rnd.randint(0, 3), rnd.randint(-1, 3),
                      rnd.randint(0, 2), rnd.randint(0, 3), rnd.random() < .5)
                for _ in range(4)]
        out.append(g.MeshVars(env=env, planned=rnd.randint(0, 3),
                              calls_done=rnd.randint(0, 3), seen_call=rnd.randint(-1, 3),
                              seen_chunk=rnd.randint(-1, 3), rejected=rnd.random() < .5,
                              flag=rnd.random() < .5, plan_delta=rnd.randint(0, 1),
                              inject=inj, inbox=tuple(msgs[:rnd.randint(1, 2)]),
                              outbox=tuple(msgs[2:2 + rnd.randint(0, 2)]),
                              bad_result=rnd.random() < .5,
                              results_done=rnd.random() < .5))
    return out


def check_models(cfg: Optional[Config] = None) -> Obligation:
    """Every z3 builder agrees with the Python function it models on sampled states;
    every update touches only the variables its model names, from the sources named."""
    cfg = cfg or Config(mesh=3, chunks=2)
    fns = {f.__name__: f for f in vars(g).values() if callable(f)
           and getattr(f, "__module__", None) == g.__name__}
    from .mutations import MUTATIONS, build_tables, mutation_config
    tables = [build_tables(cfg)] + [build_tables(mutation_config(cfg, m)) for m in MUTATIONS]
    for t in tables:
        for rows in t.values():
            for r in rows:
                for f in (r.guard, r.accept, r.make, r.update):
                    if f is not None:
                        fns[f.__name__] = f
    bad = []
    rnd = random.Random(1)
    samples = _samples()
    n = 0
    for name, build in sorted(GUARDS.items()):
        fn = fns.get(name)
        for v in samples:
            if fn is not None and bool(fn(v, cfg)) != _bool(build(v, cfg)):
                bad.append(f"guard {name} on {v}")
                break
            n += 1
    for name, build in sorted(ACCEPTS.items()):
        fn = fns.get(name)
        for v in samples:
            if name.startswith("msg_is"):
                val, cval = v.env, v.env
            else:
                items = tuple(rnd.choice([v.env.calls, v.env.calls + 1, True, False][
                    :2 if "counts" in name else 4]) for _ in range(rnd.randint(1, 4)))
                val, cval = items, _ConcreteVec(items)
            if fn is not None and bool(fn(v, cfg, val)) != _bool(build(v, cfg, cval)):
                bad.append(f"accept {name} on {v} / {val}")
                break
            n += 1
    for name, (build, reads, returns) in sorted(MAKES.items()):
        fn = fns.get(name)
        for v in samples:
            if fn is not None and fn(v, cfg) != build(v, cfg):
                bad.append(f"make {name} on {v}")
                break
            n += 1
    for name, (mkind, deps) in sorted(UPDATES.items()):
        fn = fns.get(name)
        if fn is None:
            continue
        for v in samples:
            msg = v.env._replace(call_id=rnd.randint(-1, 5)) if mkind == "msg" else \
                tuple(rnd.randint(0, 3) for _ in range(3)) if mkind == "vector" else None
            out = fn(v, cfg, msg)
            for f in g.MeshVars._fields:
                if f not in deps and getattr(out, f) != getattr(v, f):
                    bad.append(f"update {name} writes {f}, not in its model")
            for x, srcs in deps.items():
                for f in g.MeshVars._fields:
                    if f in srcs:
                        continue
                    other = _samples(1, seed=rnd.randint(0, 10**6))[0]
                    v2 = v._replace(**{f: getattr(other, f)})
                    if getattr(fn(v2, cfg, msg), x) != getattr(out, x):
                        bad.append(f"update {name}: {x} depends on {f}, not in its model")
                        break
                if "msg" not in srcs and mkind is not None:
                    msg2 = v.env._replace(call_id=99, chunk=99) if mkind == "msg" else (7,) * 3
                    if getattr(fn(v, cfg, msg2), x) != getattr(out, x):
                        bad.append(f"update {name}: {x} depends on msg, not in its model")
            n += 1
    missing = sorted(k for k in (*GUARDS, *ACCEPTS, *MAKES, *UPDATES) if k not in fns)
    bad += [f"{k} models no function in the tables or model.guards" for k in missing]
    bad = sorted(set(bad))
    return Obligation("guards.models_match_code", not bad,
                      "; ".join(bad[:5]) or f"{len(GUARDS)} guards, {len(ACCEPTS)} accepts, "
                      f"{len(MAKES)} contributions and {len(UPDATES)} updates agree with "
                      f"their Python functions on {n} sampled evaluations", None, "guards")


GUARD_MUTANTS = ("conditional_collective_no_parity", "extra_generator_call")


def guard_sensitivity() -> list:
    out = []
    for name in GUARD_MUTANTS:
        fails = [o for o in guard_obligations(name) if not o.ok]
        out.append(Obligation(
            f"guards.mutant_caught[{name}]", bool(fails and fails[0].counterexample),
            (f"{fails[0].name}: {fails[0].detail}" if fails else
             f"mutation {name}: no pair of ranks diverges"),
            fails[0].counterexample if fails else None, "guards"))
    return out


# =======================================================================================
# (c) group rules on the tables


def _rows(tables):
    for role, rows in tables.items():
        for r in rows:
            yield role.rstrip("*"), role, r


def _rule_rank0_not_in_mesh(tables):
    return [f"{key} {r.thread}:{r.src} --{r.label}: {op_text(r.op)}"
            for role, key, r in _rows(tables)
            if role == "rank0" and isinstance(r.op, Coll) and r.op.group == MESH]


def _rule_phase_b_not_on_world(tables):
    return [f"{key} {r.src} --{r.label}: {op_text(r.op)}"
            for role, key, r in _rows(tables)
            if isinstance(r.op, Coll) and r.op.kind in (GEN, COND) and r.op.group == WORLD]


def _rule_mesh_bcast_root0(tables):
    out = []
    for role, key, r in _rows(tables):
        if isinstance(r.op, Coll) and r.op.group == MESH:
            if r.op.op == "broadcast" and r.op.root != 0:
                out.append(f"{key} {r.src} --{r.label}: {op_text(r.op)} (root must be "
                           "group rank 0 = the leader)")
            if r.op.op == "broadcast" and role == "leader" and r.make is None:
                out.append(f"{key} {r.src} --{r.label}: the leader (group rank 0) roots "
                           "this broadcast but contributes nothing")
            if r.op.op == "broadcast" and role != "leader" and r.make is not None:
                out.append(f"{key} {r.src} --{r.label}: a non-root rank contributes")
            if r.op.op != "broadcast" and r.op.root is not None:
                out.append(f"{key} {r.src} --{r.label}: {r.op.op} with a root")
    return out


def _rule_p2p_pair(tables):
    peer = {"rank0": "leader", "leader": "rank0"}
    return [f"{key} {r.src} --{r.label}: {op_text(r.op)}"
            for role, key, r in _rows(tables)
            if isinstance(r.op, (Send, Recv)) and peer.get(role) != r.op.peer]


def _rule_one_collective_thread(tables):
    out = []
    for key, rows in tables.items():
        threads = sorted({r.thread for r in rows if isinstance(r.op, Coll)})
        if len(threads) > 1:
            out.append(f"{key}: collectives from threads {threads}")
    return out


def _probe_root(rows, cfg):
    rows = dict(rows)
    rows["worker"] = [r._replace(op=r.op._replace(root=1))
                      if isinstance(r.op, Coll) and r.op.op == "broadcast" else r
                      for r in rows["worker"]]
    return rows


def _probe_worker_p2p(rows, cfg):
    rows = dict(rows)
    rows["worker"] = rows["worker"] + [r for r in rows["leader"]
                                       if isinstance(r.op, Send)][:1]
    return rows


def _probe_two_threads(rows, cfg):
    rows = dict(rows)
    rows["rank0"] = rows["rank0"] + [r._replace(thread="comms", src="idle/idle",
                                                dst="idle/idle")
                                     for r in rows["rank0"] if isinstance(r.op, Coll)][:1]
    return rows


# name -> (statement, check, probe edit used only when no registry mutation violates it)
GROUP_RULES = {
    "rank0_never_in_mesh_collective": (
        "rank0 never issues a collective on mesh_pg", _rule_rank0_not_in_mesh, None),
    "phase_b_never_on_world": (
        "Phase B collectives (generator calls, conditional collectives) are on mesh_pg, "
        "never world_pg", _rule_phase_b_not_on_world, None),
    "mesh_broadcast_rooted_at_group_rank0": (
        "every mesh_pg broadcast has root = group rank 0 (the leader, global rank 1), and "
        "only the leader contributes its value", _rule_mesh_bcast_root0, _probe_root),
    "p2p_only_rank0_leader": (
        "point-to-point traffic only between rank0 and the leader",
        _rule_p2p_pair, _probe_worker_p2p),
    "one_collective_thread_per_process": (
        "one thread per process issues collectives", _rule_one_collective_thread,
        _probe_two_threads),
}


def group_obligations(mutation: Optional[str] = None) -> list:
    from .mutations import build_tables, mutation_config
    base = Config(mesh=3, chunks=2)
    cfg = mutation_config(base, mutation) if mutation else base
    tables = build_tables(cfg)
    tag = f"[{mutation}]" if mutation else ""
    out = []
    for name, (statement, check, _) in GROUP_RULES.items():
        v = check(tables)
        out.append(Obligation(f"groups.{name}{tag}", not v,
                              f"{statement}: " + ("holds" if not v else
                                                  f"violated by {len(v)} row(s)"),
                              v or None, "groups"))
    return out


def group_rule_violators() -> dict:
    """rule -> registry mutations whose tables violate it."""
    from .mutations import MUTATIONS, build_tables, mutation_config
    base = Config(mesh=3, chunks=2)
    out = {name: [] for name in GROUP_RULES}
    for m in MUTATIONS:
        tables = build_tables(mutation_config(base, m))
        for name, (_, check, _) in GROUP_RULES.items():
            if check(tables):
                out[name].append(m)
    return out


def group_sensitivity() -> list:
    from .mutations import build_tables
    base = Config(mesh=3, chunks=2)
    out = []
    for name, muts in group_rule_violators().items():
        statement, check, probe = GROUP_RULES[name]
        if muts:
            out.append(Obligation(f"groups.rule_bites[{name}]", True,
                                  f"violated by mutation(s) {', '.join(muts)}",
                                  check(_mut_tables(muts[0])), "groups"))
        elif probe is not None:
            v = check(probe(build_tables(base), base))
            out.append(Obligation(
                f"groups.rule_bites[{name}]", bool(v),
                f"no registry mutation violates it (gap: add one to model/mutations.py); "
                f"the probe edit {probe.__name__} does", v or None, "groups"))
        else:
            out.append(Obligation(f"groups.rule_bites[{name}]", False,
                                  "nothing shows this rule can fail", None, "groups"))
    return out


def _mut_tables(name):
    from .mutations import build_tables, mutation_config
    return build_tables(mutation_config(Config(mesh=3, chunks=2), name))


# =======================================================================================
# entry points


def prove_all(mutation: Optional[str] = None) -> list:
    """Every obligation. `mutation`: None (shipped protocol, plus the sensitivity
    obligations: each mutant caught), a registry mutation (model.mutations: the guard and
    group obligations run on its tables) or a contract mutant (CONTRACT_MUTANTS)."""
    from .mutations import MUTATIONS
    if mutation is not None and mutation not in MUTATIONS and mutation not in CONTRACT_MUTANTS:
        raise ValueError(f"unknown mutation {mutation!r}; known: "
                         f"{', '.join([*MUTATIONS, *CONTRACT_MUTANTS])}")
    table_mut = mutation if mutation in MUTATIONS else None
    contract_mut = mutation if mutation in CONTRACT_MUTANTS else None
    ob = contract_obligations(contract_mut)
    ob.append(check_models())
    ob += guard_obligations(table_mut)
    ob += group_obligations(table_mut)
    if mutation is None:
        ob += contract_sensitivity() + guard_sensitivity() + group_sensitivity()
    return ob


def format_obligations(obs) -> str:
    lines = []
    for o in obs:
        lines.append(f"{'PASS' if o.ok else 'FAIL'}  {o.name}: {o.detail}")
        for c in o.counterexample or ():
            lines.append(f"        {c}")
    failed = sum(not o.ok for o in obs)
    lines.append("")
    lines.append(f"{len(obs)} obligations, {failed} failed" if failed else
                 f"{len(obs)} obligations, all proved")
    return "\n".join(lines)


def cli_prove(mutation: Optional[str] = None, as_json: bool = False) -> int:
    """`lockstep prove [--mutation NAME] [--json]`: 0 iff every obligation holds."""
    try:
        obs = prove_all(mutation or None)
    except ValueError as e:
        print(f"lockstep prove: {e}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps({"mutation": mutation or None, "ok": all(o.ok for o in obs),
                          "obligations": [o.as_dict() for o in obs]}, indent=1))
    else:
        print(format_obligations(obs))
    return 0 if all(o.ok for o in obs) else 1


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="lockstep prove", description=__doc__.split("\n")[0])
    ap.add_argument("--mutation", default="")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    return cli_prove(a.mutation or None, a.json)


if __name__ == "__main__":
    sys.exit(main())
