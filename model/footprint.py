"""Read and write sets of rows, derived from the source of their guard, make, accept and
update functions: what the thread-level partial-order reduction (model.reduction) asks
when it lets one thread of a process move ahead of another.

A row's footprint is over its process's local variables (the fields of Rank0Vars or
MeshVars) and its threads' control states:
  reads   the fields its guard, make (the message it sends), accept (the message it
          takes) and update read, the fields its tags make a property read
          (properties.TAG_READS), and its own thread's control state;
  writes  the fields its update may change (every keyword of a `_replace` call in the
          update or in a function it calls), and its own thread's control state.
An exit row (other than a thread's own end) ends the whole process: it writes
everything. A `join_comms` row waits for the other threads to finish: it reads every
thread's control state.

Derivation, and why it over-approximates: the functions are parsed (ast); every
attribute read on the function's first parameter is a read, every `_replace` keyword a
write; a call that passes the parameter to another module-level function is followed
into that function (with the parameter it lands in). Anything else the variables could
escape through (passed to a function that cannot be read, used other than by
attribute, a function whose source is unavailable) makes the footprint "everything",
so the reduction treats the row as dependent on every other. tests/test_footprint.py
runs every guard, make, accept and update of the reachable states of several
configurations on recording proxies and checks that what they read and what changed
lies inside the derived sets.
"""
from __future__ import annotations

import ast
import inspect
import textwrap
from functools import lru_cache

from .ops import Exit
from .properties import TAG_READS

EVERYTHING = frozenset({"*"})


def row_footprint(row, fields: tuple, thread: int, threads: int) -> tuple:
    """(reads, writes) of `row` as bit masks: bit i is fields[i], bit len(fields) + u
    is thread u's control state. Every bit set: the row touches everything."""
    nf = len(fields)
    every = (1 << (nf + threads)) - 1
    own_pc = 1 << (nf + thread)
    if type(row.op) is Exit and row.op.how != "thread_die":
        return every, every
    reads, writes = set(), set()
    for fn in (row.guard, row.make, row.accept):
        reads |= reads_of(fn)
    if row.update is not None:
        r, w = _touches(row.update)
        reads |= r
        writes |= w
    for tag in row.tags:
        reads |= set(TAG_READS.get(tag, ()))
    r = field_mask(reads, fields, every) | own_pc
    w = field_mask(writes, fields, every) | own_pc
    if "join_comms" in row.tags:
        r |= every & ~((1 << nf) - 1)
    return r, w


def field_mask(names: set, fields: tuple, every: int) -> int:
    """The bits of `names` among `fields`; `every` for "*" or a name that is not a field
    (the derivation lost track: count it as touching everything)."""
    if "*" in names or not names <= set(fields):
        return every
    return sum(1 << fields.index(n) for n in names)


def reads_of(fn) -> frozenset:
    """The fields fn (a guard, make or accept; None: no function) reads."""
    return _touches(fn)[0] if fn is not None else frozenset()


@lru_cache(maxsize=None)
def _touches(fn) -> tuple:
    """(fields read, fields written) through fn's first parameter."""
    return _analyse(fn, 0, frozenset())


def _analyse(fn, index: int, seen: frozenset) -> tuple:
    key = (fn, index)
    if key in seen:
        return frozenset(), frozenset()
    seen = seen | {key}
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return EVERYTHING, EVERYTHING
    fdef = next((n for n in ast.walk(tree)
                 if isinstance(n, (ast.FunctionDef, ast.Lambda))), None)
    params = [a.arg for a in fdef.args.args] if fdef is not None else []
    if index >= len(params):
        return frozenset(), frozenset()
    name = params[index]
    reads, writes = set(), set()
    uses = {id(n) for n in ast.walk(fdef) if isinstance(n, ast.Name) and n.id == name}
    accounted = set()
    for node in ast.walk(fdef):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr == "_replace":
            # Whatever it is called on (v, or a v derived from v), these fields change.
            for kw in node.keywords:
                if kw.arg is None:
                    return EVERYTHING, EVERYTHING
                writes.add(kw.arg)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                node.value.id == name:
            accounted.add(id(node.value))
            if node.attr != "_replace":
                reads.add(node.attr)
        if isinstance(node, ast.Call):
            if any(_derived(kw.value, name, fn) for kw in node.keywords):
                return EVERYTHING, EVERYTHING
            for i, arg in enumerate(node.args):
                if _derived(arg, name, fn):
                    if isinstance(arg, ast.Name):
                        accounted.add(id(arg))
                    callee = _resolve(fn, node.func)
                    if callee is None:
                        return EVERYTHING, EVERYTHING
                    r, w = _analyse(callee, i, seen)
                    reads |= r
                    writes |= w
        if isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Name) and t.id == name:
                    accounted.add(id(t))   # v = f(v, ...): f was followed above
    if uses - accounted:
        return EVERYTHING, EVERYTHING      # v escapes some other way
    return frozenset(reads), frozenset(writes)


def _derived(expr, name: str, fn) -> bool:
    """Whether expr is the variables themselves or a copy of them: `v`,
    `<derived>._replace(...)`, or a call handed a derived value by a function that
    writes (an update returns the copy it made; one that writes nothing, such as a
    message constructor, returns something else): such an argument is followed into
    the function that receives it. What it reads through v is counted either way."""
    if isinstance(expr, ast.Name):
        return expr.id == name
    if isinstance(expr, ast.Call):
        if isinstance(expr.func, ast.Attribute) and expr.func.attr == "_replace":
            return _derived(expr.func.value, name, fn)
        for i, a in enumerate(expr.args):
            if _derived(a, name, fn):
                callee = _resolve(fn, expr.func)
                return callee is None or bool(_analyse(callee, i, frozenset())[1])
    return False


def _resolve(fn, func):
    """The module-level function a call names, or None."""
    if isinstance(func, ast.Name):
        target = fn.__globals__.get(func.id)
        if target is None and fn.__closure__:
            cells = dict(zip(fn.__code__.co_freevars, fn.__closure__))
            cell = cells.get(func.id)
            target = cell.cell_contents if cell is not None else None
        return target if inspect.isfunction(target) else None
    return None
