"""Pictures of the tables and of counterexamples, generated from the model itself.

Two kinds of picture, both graphviz (the `graphviz` package builds DOT source; the
`dot`/`neato` binaries render it to SVG and PNG):

  state diagram   one per role thread (rank0.main, rank0.comms, leader, worker): nodes
                  are control states, every row is an edge labelled with its label,
                  its guard in [brackets] and its comm op (model.ops.op_text).
                  Commitment points (tag "commit") are bold red; exit rows end in a
                  terminal node styled by how the process leaves (ok / error / abort).
                  For a mutation the rows it changed are drawn dashed orange and the
                  rows it removed are listed under the title.
  sequence chart  (MSC) of a counterexample: one lifeline per rank thread, time
                  flowing down, one band per counterexample step, numbered like the
                  text steps of `lockstep check`. p2p messages are arrows (diagonal
                  under buffered p2p: sent in one step, received in a later one),
                  collectives a bar across the group with op, group and sequence
                  number, local steps a box on the lifeline, exits / crashes / aborts
                  end a lifeline with a marker, what every survivor still waits for
                  is noted at the bottom, and the violation closes the chart.

Why graphviz for the chart too, with every node pinned (`neato -n2`): the chart is a
grid whose geometry is known in advance, so nothing needs laying out, and graphviz
gives both SVG and PNG from one source with no other dependency (no cairosvg, no
matplotlib). Considered and rejected: a `dot` layout with rank=same rows (flat edges
with labels insert extra ranks and bend arrows that skip a lifeline) and an HTML table
(arrows become text art).

The counterexample is replayed from its text steps through the semantics (a step is
the enabled transition whose `Model.describe` is that line), so this module needs
nothing from the explorer beyond `Result.steps`; if `Result` carries a structured
`trace` of (state, Tr) pairs it is used instead.

Determinism: DOT source is built in table order and trace order, with no timestamps;
graphviz output is a function of the source and the graphviz version, so regenerating
`docs/diagrams/` with the same graphviz changes nothing.
"""
from __future__ import annotations

import html
import re
import shutil
import sys
import textwrap
from pathlib import Path
from typing import Optional

import graphviz

from .config import Config
from .ops import Coll, Exit, Recv, Send, op_text
from .semantics import DEAD_THREAD, FINAL, GROUPS, LIVE, Model
from .mutations import model_for
from .tables import INITIAL, THREADS, Tables, shipped_rows

FONT = "Helvetica"
MONO = "Courier"
COMMIT = "#c00000"
MUTATED = "#e07000"
OP_COLOR = "#1f3f8f"
GUARD_COLOR = "#555555"
GROUP_COLOR = {"world_pg": "#7b3fa0", "mesh_pg": "#1b7f7a"}
EXIT_STYLE = {  # how -> (node label, shape, fill, border)
    "ok": ("exit ok", "doublecircle", "#d8f0d8", "#2e7d32"),
    "error": ("exit error", "doubleoctagon", "#fbe0e0", "#b71c1c"),
    "abort": ("exit abort\n(abort flag)", "doubleoctagon", "#ffe6c7", "#e65100"),
    "vanish": ("vanishes\n(no terminal)", "octagon", "#eeeeee", "#616161"),
    "thread_die": ("thread dies", "octagon", "#eeeeee", "#616161"),
}
DEFAULT_MSCS = ("no_epoch_filter", "blocking_send_then_recv")


# ============================================================================ helpers

def _esc(text: str) -> str:
    return html.escape(str(text), quote=False)


def _wrap(text: str, width: int) -> list:
    """Wrap on spaces; a word longer than `width` stays whole."""
    return textwrap.wrap(str(text), width, break_long_words=False,
                         break_on_hyphens=False) or [""]


def _html(*lines) -> str:
    """An HTML-like graphviz label from (text, style) lines; style keys: color, face,
    size, bold, italic. Lines are centred."""
    out = []
    for line in lines:
        if isinstance(line, str):
            line = (line, {})
        text, st = line
        s = _esc(text)
        if st.get("bold"):
            s = f"<b>{s}</b>"
        if st.get("italic"):
            s = f"<i>{s}</i>"
        attrs = []
        if "color" in st:
            attrs.append(f'color="{st["color"]}"')
        if "face" in st:
            attrs.append(f'face="{st["face"]}"')
        if "size" in st:
            attrs.append(f'point-size="{st["size"]}"')
        if attrs:
            s = f"<font {' '.join(attrs)}>{s}</font>"
        out.append(s)
    return "<" + "<br/>".join(out) + ">"


def _fname(fn) -> str:
    """A guard's name; never a repr (it would carry a memory address into the docs)."""
    name = getattr(fn, "__name__", None) or getattr(getattr(fn, "func", None),
                                                    "__name__", None)
    return name or type(fn).__name__


def diagram_names() -> list:
    """[(role, thread, name)] for every state diagram, in table order."""
    out = []
    for role, rows in shipped_rows().items():
        threads = THREADS[role]
        for t in threads:
            out.append((role, t, role if len(threads) == 1 else f"{role}.{t}"))
    return out


# ============================================================================ state diagrams

def _row_key(r) -> tuple:
    return (r.thread, r.src, r.label, r.op, r.dst, _fname(r.guard) if r.guard else None,
            _fname(r.accept) if r.accept else None,
            _fname(r.update) if r.update else None, r.tags)


def _label_lines(row, color=None) -> list:
    """(text, style) lines of a row's label: label, [guard], [msg: accept], op."""
    commit = "commit" in row.tags
    head = {"bold": True}
    if commit:
        head["color"] = COMMIT
    elif color:
        head["color"] = color
    lines = [(row.label + ("  \u25c6 commit" if commit else ""), head)]
    if row.guard is not None:
        lines.append((f"[{_fname(row.guard)}]", {"color": GUARD_COLOR, "size": "9"}))
    if row.accept is not None:
        lines.append((f"[msg: {_fname(row.accept)}]", {"color": GUARD_COLOR, "size": "9"}))
    op = row.op
    if isinstance(op, Exit):
        lines.append((f"exit({op.how})", {"color": OP_COLOR, "face": MONO, "size": "9"}))
        for w in _wrap(op.reason, 34):
            lines.append((w, {"color": GUARD_COLOR, "italic": True, "size": "9"}))
    else:
        for w in _wrap(op_text(op), 36):
            lines.append((w, {"color": OP_COLOR, "face": MONO, "size": "9"}))
    return lines


def _padded(label: str) -> str:
    """An HTML label in a borderless cell, so dot keeps edges a few points off it."""
    return ('<<table border="0" cellborder="0" cellspacing="0" cellpadding="3"><tr><td>'
            + label[1:-1] + "</td></tr></table>>")


def _text_size(lines) -> tuple:
    """Estimated (width, height) in points of _html lines (Helvetica / Courier)."""
    w = 0.0
    for text, st in lines:
        size = float(st.get("size", 10))
        per = 0.6 if st.get("face") == MONO else (0.6 if st.get("bold") else 0.55)
        w = max(w, len(text) * size * per)
    return w + 6, 12.5 * len(lines) + 4


def _legend(mutation: bool, loops: bool, ends=("ok", "error", "abort")) -> str:
    def row(sample, text):
        return f"<tr><td>{sample}</td><td align=\"left\">{_esc(text)}</td></tr>"

    def box(text, fill, border):
        return (f'<table border="1" cellborder="0" cellpadding="1" color="{border}" '
                f'bgcolor="{fill}"><tr><td><font color="{border}" point-size="9">'
                f'{text}</font></td></tr></table>')
    cells = [
        row('\u2500\u2500\u2500\u25b6', "row: label, [guard], [msg: accept], comm op"),
        row(f'<font color="{COMMIT}"><b>\u2501\u2501\u2501\u25b6</b></font>',
            "commitment point (tag commit): the peer now expects what follows"),
    ]
    if loops:
        cells.append(row(box("state | row", "#f4f7fb", "#34495e"),
                         "rows listed inside a state keep the thread in that state"))
    meaning = {
        "ok": "clean exit: marks itself clean, no watchdog fires",
        "error": "exit with a one-line reason (peers released by a terminal message)",
        "abort": "sets the abort flag: releases ranks blocked in a collective",
        "vanish": "leaves as if clean without telling anyone (a bug)",
        "thread_die": "only this thread ends; the process lives on (a bug)"}
    for how in [h for h in EXIT_STYLE if h in ends]:
        label, _, fill, border = EXIT_STYLE[how]
        cells.append(row(box(_esc(label.split(chr(10))[0]), fill, border), meaning[how]))
    cells.append(row("\u25cf\u2500\u25b6", "initial state"))
    if mutation:
        cells.append(row(f'<font color="{MUTATED}"><b>- - -\u25b6</b></font>',
                         "row added or changed by the mutation"))
    return ('<<table border="1" cellborder="0" cellspacing="1" cellpadding="2" '
            'color="#999999"><tr><td colspan="2"><b>legend</b></td></tr>'
            + "".join(cells) + "</table>>")


def _initial_pc(role, thread, rows) -> str:
    """The thread's initial control state. The semantics starts a thread whose
    handshake a mutation removed where the handshake would lead: ask it, so the
    picture cannot disagree with the explorer."""
    start = INITIAL[role][THREADS[role].index(thread)]
    if any(r.src == start for r in rows):
        return start
    tables = shipped_rows()
    tables[role] = rows + [r for r in tables[role] if r.thread != thread]
    model = Model(Config(mesh=2), Tables(tables))
    p = model.roles.index(role)
    return model._start_pcs(p, INITIAL[role])[THREADS[role].index(thread)]


class _Diagram:
    """What every state diagram needs: the rows, which are changed, the title."""

    def __init__(self, role, thread, tables, mutation):
        from .mutations import MUTATIONS
        shipped = shipped_rows()
        tables = tables if tables is not None else shipped
        rows_all = tables.get(role + "*", tables[role]) if mutation else tables[role]
        self.role, self.thread, self.mutation = role, thread, mutation
        self.rows = [r for r in rows_all if r.thread == thread]
        threads = THREADS[role]
        self.name = role if len(threads) == 1 else f"{role}.{thread}"
        base_rows = [r for r in shipped[role] if r.thread == thread]
        base_keys = {_row_key(r) for r in base_rows}
        self.changed, removed = set(), []
        if mutation:
            self.changed = {i for i, r in enumerate(self.rows)
                            if _row_key(r) not in base_keys}
            now = {(r.src, r.label) for r in self.rows}
            gone = [r.label for r in base_rows if (r.src, r.label) not in now]
            removed = [lb if gone.count(lb) == 1 else f"{lb} (from {gone.count(lb)} "
                       f"states)" for lb in sorted(set(gone))]
        title = [(self.name, {"bold": True, "size": "18"})]
        if mutation:
            mut = MUTATIONS[mutation]
            title.append((f"mutation {mutation} ({mut.failure_mode})",
                          {"color": MUTATED, "size": "12"}))
            for w in _wrap(mut.summary, 70):
                title.append((w, {"size": "11", "color": GUARD_COLOR}))
            if role + "*" in tables:
                title.append(("(the table of the one targeted rank)",
                              {"size": "11", "color": GUARD_COLOR}))
            if removed:
                for w in _wrap("rows removed: " + ", ".join(removed), 90):
                    title.append((w, {"size": "11", "color": MUTATED}))
            if not self.changed and not removed:
                title.append(("(this thread is unchanged)",
                              {"size": "11", "color": GUARD_COLOR}))
        else:
            title.append(("shipped transition table (model/tables.py)",
                          {"size": "11", "color": GUARD_COLOR}))
        if role == "rank0" and thread == "comms":
            title.append(("control state S/R = send side S / receive side R",
                          {"size": "11", "color": GUARD_COLOR}))
        self.title = _html(*title)
        self.init = _initial_pc(role, thread, self.rows)
        self.ends = []
        for r in self.rows:
            if isinstance(r.op, Exit) and r.op.how not in self.ends:
                self.ends.append(r.op.how)

    def dst(self, r) -> str:
        return f"__exit_{r.op.how}" if isinstance(r.op, Exit) else r.dst

    def edge_attrs(self, i, r) -> dict:
        attrs = {}
        if isinstance(r.op, Exit):
            attrs["color"] = EXIT_STYLE[r.op.how][3]
        if "commit" in r.tags:
            attrs.update(color=COMMIT, penwidth="2.8")
        if i in self.changed:
            attrs.update(color=MUTATED, style="dashed", penwidth="2.2")
        return attrs

    def lines(self, i, r) -> list:
        return _label_lines(r, MUTATED if i in self.changed else None)

    def terminal(self, g, how, **pos):
        label, shape, fill, border = EXIT_STYLE[how]
        g.node(f"__exit_{how}", label=label.replace("\n", "\\n"), shape=shape,
               style="filled", fillcolor=fill, color=border, fontcolor=border,
               fontsize="11", penwidth="1.6", **pos)

    def state_attrs(self, pc) -> dict:
        if pc == FINAL:
            return dict(shape="doublecircle", fillcolor="#d8f0d8", color="#2e7d32",
                        label=_html(("done", {"bold": True}),
                                    ("thread ends", {"size": "9"})))
        if pc == DEAD_THREAD:
            return dict(shape="octagon", fillcolor="#eeeeee", color="#616161")
        return {}


def state_diagram(role: str, thread: str = "main", tables: Optional[dict] = None,
                  mutation: str = "") -> graphviz.Digraph:
    """The state diagram of one role thread, from `tables` (role -> rows; the shipped
    tables by default). With `mutation`, rows differing from the shipped table are
    highlighted and removed rows listed. A mutation that edits only the targeted
    rank's copy ("worker*" / "leader*") is drawn from that copy.

    rank0.comms is drawn as a grid (send side x receive side) with pinned positions
    when its rows have the shipped shape; anything else is laid out by `dot`."""
    d = _Diagram(role, thread, tables, mutation)
    if role == "rank0" and thread == "comms":
        g = _grid_diagram(d)
        if g is not None:
            return g
    return _dot_diagram(d)


def _dot_diagram(d: _Diagram) -> graphviz.Digraph:
    """Layered layout. Self-loops are listed inside their state (the UML compartment
    of internal transitions): drawn as loops, five of them on `run` stack their labels
    on top of each other."""
    g = graphviz.Digraph(name=d.name.replace(".", "_"))
    g.attr("graph", label=d.title, labelloc="t", fontname=FONT, rankdir="TB",
           splines="true", nodesep="0.35", ranksep="0.4", outputorder="edgesfirst",
           pad="0.3")
    g.attr("node", fontname=FONT, fontsize="12", shape="box", style="rounded,filled",
           fillcolor="#f4f7fb", color="#34495e", penwidth="1.3")
    g.attr("edge", fontname=FONT, fontsize="10", color="#34495e", arrowsize="0.8")
    rows = d.rows
    order, loops = [], {}
    for i, r in enumerate(rows):
        for pc in (r.src, None if isinstance(r.op, Exit) else r.dst):
            if pc is not None and pc not in order:
                order.append(pc)
        if not isinstance(r.op, Exit) and r.src == r.dst:
            loops.setdefault(r.src, []).append(i)
    g.node("__init", label="", shape="point", width="0.16", style="filled",
           fillcolor="black")
    for pc in order:
        attrs = d.state_attrs(pc)
        if pc in loops:
            attrs["label"] = _compartment(d, pc, loops[pc])
            attrs["margin"] = "0.05"
        g.node(pc, **attrs)
    for how in d.ends:
        d.terminal(g, how)
    g.edge("__init", d.init, penwidth="1.5")
    for i, r in enumerate(rows):
        if not isinstance(r.op, Exit) and r.src == r.dst:
            continue
        g.edge(r.src, d.dst(r), label=_padded(_html(*d.lines(i, r))),
               **d.edge_attrs(i, r))
    g.node("__legend", label=_legend(bool(d.mutation), bool(loops), d.ends),
           shape="plaintext",
           style="", fontsize="10")
    # below everything: hang it off every terminal (a disconnected node is packed on
    # its own, outside the ranking)
    for how in d.ends:
        g.edge(f"__exit_{how}", "__legend", style="invis")
    if not d.ends:
        g.edge(order[-1], "__legend", style="invis")
    return g


def _compartment(d: _Diagram, pc, idx) -> str:
    """State name over its self-loop rows, one row per self-loop."""
    cells = [f'<tr><td><b>{_esc(pc)}</b></td></tr>']
    for i in idx:
        r = d.rows[i]
        lines = d.lines(i, r)
        head = lines[0]
        rest = lines[1:]
        color = COMMIT if "commit" in r.tags else (MUTATED if i in d.changed else None)
        name = f"<b>{_esc(head[0])}</b>"
        if color:
            name = f'<font color="{color}">{name}</font>'
        guard = " ".join(_esc(t) for t, st in rest if t.startswith("["))
        ops = " ".join(_esc(t) for t, st in rest if not t.startswith("["))
        cell = (f'{name} <font point-size="9" color="{GUARD_COLOR}">{guard}</font>'
                f'<br align="left"/><font point-size="9" face="{MONO}" color="{OP_COLOR}">'
                f'&#160;&#160;/ {ops}</font><br align="left"/>')
        cells.append(f'<tr><td align="left" balign="left">{cell}</td></tr>')
    border = f' color="{MUTATED}"' if any(i in d.changed for i in idx) else ""
    return ('<<table border="0" cellborder="0" cellspacing="1" cellpadding="2"'
            f'{border}>' + "<hr/>".join(cells) + "</table>>")


# ---------------------------------------------------------------- rank0.comms as a grid

_SEND = ("idle", "hdr", "pay")
_RECV = ("idle", "pay", "put", "err")   # err: an ERROR received, a payload owed


def _grid_diagram(d: _Diagram) -> Optional[graphviz.Digraph]:
    """rank0.comms' product states on a grid, columns = send side, rows = receive side,
    every position and edge route computed here and pinned (neato -n2). Each cycle has
    one edge back across the grid: send_envelope_payload arcs under its row,
    queue_result to the left of its column. Labels sit where no other label can be:
    send-side labels between columns at their row's height, receive-side labels right
    of their column between rows. Returns None when the rows have another shape (a
    mutation), so the caller falls back to dot."""
    W, H = 440.0, 300.0
    NW, NH = 92.0, 34.0                       # node box, points
    TW, DR = 48.0, 40.0                       # half width of terminals, radius of done
    X = {s: 260 + i * W for i, s in enumerate(_SEND)}
    Y = {s: 300 + i * H for i, s in enumerate(_RECV)}
    nodes, edges, labels = {}, [], []
    exit_pos = (X["hdr"], Y["idle"] - 220)
    term_pos = (X["pay"], Y["idle"] - 220)
    done_pos = (X["idle"] - 215, Y["idle"])
    side_pos = (X["pay"] + 380, Y["pay"])     # an exit taken from the send=pay column
    term_at = {}                              # terminal node -> its position

    def at(pc):
        if pc == "exit":
            return exit_pos
        if pc == FINAL:
            return done_pos
        if pc.startswith("__exit_"):
            return term_at[pc]
        s, r = pc.split("/")
        return X[s], Y[r]

    def bez(p0, p3, bx=0.0, by=0.0):
        """Cubic from p0 to p3 whose middle is offset by (bx, by)."""
        k = 4.0 / 3.0
        p1 = (p0[0] + (p3[0] - p0[0]) / 3 + k * bx, p0[1] + (p3[1] - p0[1]) / 3 + k * by)
        p2 = (p0[0] + 2 * (p3[0] - p0[0]) / 3 + k * bx,
              p0[1] + 2 * (p3[1] - p0[1]) / 3 + k * by)
        return [p0, p1, p2, p3]

    def label_at(lines, cx, cy, anchor):
        """anchor: 'c' centre, 'n' top edge at cy, 's' bottom edge at cy, 'w' left edge
        at cx, 'e' right edge at cx."""
        w, h = _text_size(lines)
        if anchor == "n":
            cy += h / 2
        elif anchor == "s":
            cy -= h / 2
        elif anchor == "w":
            cx += w / 2
        elif anchor == "e":
            cx -= w / 2
        labels.append((cx, cy, lines))

    hw, hh = NW / 2, NH / 2
    for i, r in enumerate(d.rows):
        lines = d.lines(i, r)
        src, dst = r.src, d.dst(r)
        if src not in ("exit",) and "/" not in src:
            return None
        if isinstance(r.op, Exit):
            if src == "exit":
                place = term_pos
            elif src.split("/")[0] == "pay":
                place = side_pos
            else:
                return None
            if term_at.setdefault(dst, place) != place:
                return None
            (x0, y0), (x1, y1) = at(src), at(dst)
            if src == "exit":
                pts = [(x0 + hw, y0), (x0 + hw + 60, y0), (x1 - TW - 60, y1),
                       (x1 - TW, y1)]
                label_at(lines, (x0 + x1) / 2, y0 - 10, "s")
            else:   # right, then bend toward the terminal; label on the open side
                pts = [(x0 + hw, y0), (x0 + 200, y0), (x0 + 200, y1), (x1 - TW, y1)]
                if y0 < y1:     # from above: right of the descending curve
                    label_at(lines, x0 + 215, y0 + 70, "w")
                else:           # level: above the edge; from below: under it
                    label_at(lines, x0 + hw + 8, y0 + (6 if y0 > y1 else -6),
                             "n" if y0 > y1 else "s")
                    labels[-1] = (labels[-1][0] + _text_size(lines)[0] / 2,
                                  labels[-1][1], labels[-1][2])
        elif dst == FINAL:
            (x0, y0), (x1, y1) = at(src), at(dst)
            pts = [(x0 - hw, y0), (x0 - hw - 40, y0), (x1 + DR + 40, y1), (x1 + DR, y1)]
            label_at(lines, (x0 + x1) / 2 - 10, y0 - 8, "s")
        elif dst == "exit" and src == "pay/err":   # the payload owed, then the exit
            (x0, y0), (x1, y1) = at(src), at(dst)
            pts = [(x0 + hw, y0), (x0 + hw + 170, y0), (x1 + 60, y1 - hh - 60),
                   (x1 + hw, y1)]
            label_at(lines, x0 + hw + 12, y0 - 8, "w")
        elif dst == "exit":
            s, rv = src.split("/")
            if rv != "idle":
                return None
            (x0, y0), (x1, y1) = at(src), at(dst)
            dx = {"idle": -30, "hdr": 0, "pay": 30}[s]
            pts = [(x0, y0 - hh), (x0, y0 - hh - 110), (x1 + dx, y1 + hh + 70),
                   (x1 + dx, y1 + hh)]
            # beside the vertical start of the edge, on the side away from the
            # send-side label of the same row
            if s == "hdr":
                label_at(lines, x0 - 10, y0 - hh - 45, "e")
            else:
                label_at(lines, x0 + 10, y0 - hh - 45, "w")
        else:
            if "/" not in dst:
                return None
            (s0, r0), (s1, r1) = src.split("/"), dst.split("/")
            (x0, y0), (x1, y1) = at(src), at(dst)
            if r0 == r1 and (s0, s1) == ("idle", "hdr"):
                pts = bez((x0 + hw, y0 - 6), (x1 - hw, y1 - 6), by=-16)
                label_at(lines, (x0 + x1) / 2, y0 - 28, "s")
            elif r0 == r1 and (s0, s1) == ("hdr", "idle"):
                pts = bez((x0 - hw, y0 + 6), (x1 + hw, y1 + 6), by=16)
                label_at(lines, (x0 + x1) / 2, y0 + 24, "n")
            elif r0 == r1 and (s0, s1) == ("hdr", "pay"):
                pts = [(x0 + hw, y0), (x0 + hw + 60, y0), (x1 - hw - 60, y1),
                       (x1 - hw, y1)]
                label_at(lines, (x0 + x1) / 2, y0 - 10, "s")
            elif r0 == r1 and (s0, s1) == ("pay", "idle"):
                pts = bez((x0 - hw + 10, y0 + hh), (x1 + hw - 10, y1 + hh), by=84)
                label_at(lines, (x0 + X["hdr"]) / 2 + 20, y0 + hh + 0.75 * 84 + 6, "n")
            elif s0 == s1 and (r0, r1) in (("idle", "pay"), ("pay", "put")):
                pts = [(x0, y0 + hh), (x0, y0 + hh + 60), (x1, y1 - hh - 60),
                       (x1, y1 - hh)]
                label_at(lines, x0 + 10, (y0 + y1) / 2, "w")
            elif s0 == s1 and (r0, r1) == ("idle", "err"):   # right of the column
                pts = [(x0 + hw, y0 + 8), (x0 + hw + 110, y0 + 8), (x1 + hw + 110, y1),
                       (x1 + hw, y1)]
                label_at(lines, x0 + hw + 120, (Y["put"] + Y["err"]) / 2, "w")
            elif s0 == s1 and (r0, r1) == ("put", "idle"):
                pts = bez((x0 - hw, y0 - 8), (x1 - hw, y1 + 8), bx=-70)
                label_at(lines, x0 - hw - 62, (Y["pay"] + Y["put"]) / 2 + 10, "e")
            else:
                return None
        edges.append((i, r, src, dst, pts))
        for pc in (src, dst):
            nodes.setdefault(pc, at(pc))

    if not edges:
        return None
    bottom = max(y for _, y in nodes.values()) + 150
    legend = _legend(bool(d.mutation), False, d.ends)

    def flip(y):
        return f"{bottom + 200 - y:.1f}"

    g = graphviz.Digraph(name=d.name.replace(".", "_"), engine="neato")
    g.attr("graph", label=d.title, labelloc="t", fontname=FONT, splines="true",
           outputorder="edgesfirst", pad="0.3")
    g.attr("node", fontname=FONT, fontsize="12", shape="box", style="rounded,filled",
           fillcolor="#f4f7fb", color="#34495e", penwidth="1.3")
    g.attr("edge", fontname=FONT, fontsize="10", color="#34495e", arrowsize="0.8")
    ix, iy = X["idle"] - 110, Y["idle"] - 110
    g.node("__init", label="", shape="point", width="0.16", style="filled",
           fillcolor="black", pos=f"{ix:.1f},{flip(iy)}!")
    g.node("__init_to", label="", shape="point", width="0", style="invis",
           pos=f"{X['idle'] - hw:.1f},{flip(Y['idle'] - hh)}!")
    g.edge("__init", "__init_to", penwidth="1.5",
           pos=f"e,{X['idle'] - hw:.1f},{flip(Y['idle'] - hh)} {ix:.1f},{flip(iy)} "
               f"{ix + 20:.1f},{flip(iy + 20)} {ix + 40:.1f},{flip(iy + 40)} "
               f"{X['idle'] - hw - 6:.1f},{flip(Y['idle'] - hh - 6)}")
    for pc, (x, y) in nodes.items():
        pos = f"{x:.1f},{flip(y)}!"
        if pc.startswith("__exit_"):
            d.terminal(g, pc[len("__exit_"):], pos=pos, width=f"{2 * TW / 72:.3f}",
                       height="0.55", fixedsize="true")
        elif pc == FINAL:
            g.node(pc, pos=pos, width=f"{2 * DR / 72:.3f}", fixedsize="true",
                   **d.state_attrs(pc))
        else:
            g.node(pc, pos=pos, width=f"{NW / 72:.3f}", height=f"{NH / 72:.3f}",
                   fixedsize="true", **d.state_attrs(pc))
    for i, r, src, dst, pts in edges:
        end = pts[-1]
        # the arrowhead runs from the last control point to `end`: pull the spline
        # back by the arrow length along its last segment
        (ax, ay), (bx, by) = pts[-2], end
        ln = max(1e-6, ((bx - ax) ** 2 + (by - ay) ** 2) ** 0.5)
        cut = 9.0
        last = (bx - (bx - ax) * cut / ln, by - (by - ay) * cut / ln)
        spline = pts[:-1] + [last]
        pos = f"e,{end[0]:.1f},{flip(end[1])} " + " ".join(
            f"{x:.1f},{flip(y)}" for x, y in spline)
        g.edge(src, dst, pos=pos, **d.edge_attrs(i, r))
    for k, (x, y, lines) in enumerate(labels):
        g.node(f"__label{k}", label=_html(*lines), shape="plaintext", style="",
               margin="0", pos=f"{x:.1f},{flip(y)}!")
    g.node("__legend", label=legend, shape="plaintext", style="", fontsize="10",
           fontname=FONT, pos=f"{X['hdr']:.1f},{flip(bottom + 60)}!")
    # room between the title and the topmost label
    g.node("__top", label="", shape="point", style="invis", width="0",
           pos=f"{X['hdr']:.1f},{flip(exit_pos[1] - 100)}!")
    return g


# ============================================================================ counterexamples

_NUM = re.compile(r"^\s*\d+\.\s")


def counterexample_trace(model: Model, result) -> tuple:
    """([(state, Tr)], final_state, unmatched_text_or_None) of `result`'s counterexample.

    Uses `result.trace` when the explorer provides one; otherwise replays the numbered
    text steps: each is the enabled transition whose `describe` is that line. A last
    step the replay cannot place (the explorer describes it from a canonical state) is
    returned as text."""
    trace = getattr(result, "trace", None)
    if trace:
        trace = list(trace)
        s, tr = trace[-1]
        return trace, (s if tr.kind == "violation" else model.step(s, tr)), None
    s, out = model.initial_state(), []
    lines = [_NUM.sub("", ln, count=1) for ln in result.steps]
    lines = [ln for ln in lines if not ln.startswith("=> ")]
    for i, text in enumerate(lines):
        for tr in model.enabled(s):
            if model.describe(s, tr) == text:
                break
        else:
            if i == len(lines) - 1:
                return out, s, text
            raise ValueError(f"counterexample step {i + 1} does not replay: {text}")
        out.append((s, tr))
        if tr.kind != "violation":
            s = model.step(s, tr)
    return out, s, None


def _short_msg(m) -> str:
    from .contract import Action
    from .guards import Msg
    if isinstance(m, Msg):
        name = Action(m.action).name
        if m.chunk < 0:
            return f"{name} call_id={m.call_id} epoch={m.epoch}"
        return f"{name} call_id={m.call_id} chunk={m.chunk} epoch={m.epoch}"
    if isinstance(m, tuple):
        return "values " + ", ".join(map(str, m))
    return repr(m)


class _Chart:
    """Accumulates pinned nodes and edges with y growing downward; emits neato -n2."""
    COL = 250          # points between lifelines
    X0 = 80            # right edge of the step-number gutter
    LINE = 13          # points per 10-pt text line

    def __init__(self, model: Model):
        self.model = model
        self.lanes = []            # (proc, thread) per lifeline
        for p, role in enumerate(model.roles):
            for t in range(len(THREADS[role])):
                self.lanes.append((p, t))
        self.nodes, self.edges = [], []
        self.y = 0.0
        self.ended = {}            # lane index -> y where its lifeline ends
        self.n = 0

    def lane(self, p, t) -> int:
        return self.lanes.index((p, t))

    def x(self, lane: int) -> float:
        return self.X0 + 90 + lane * self.COL

    def name(self, lane: int) -> str:
        p, t = self.lanes[lane]
        return self.model._who(p, t)

    def node(self, x, y, **attrs) -> str:
        self.n += 1
        nid = f"n{self.n}"
        self.nodes.append((nid, x, y, attrs))
        return nid

    def point(self, x, y, size=0.0, color="black") -> str:
        return self.node(x, y, shape="point", width=str(size), height=str(size),
                         color=color, fillcolor=color, style="filled")

    def text(self, x, y, label, **attrs) -> str:
        """Text on a white ground, so lines crossing it do not cut through words."""
        attrs.setdefault("shape", "plaintext")
        attrs.setdefault("margin", "0.02")
        attrs.setdefault("style", "filled")
        attrs.setdefault("fillcolor", "white")
        attrs.setdefault("width", "0")     # no 0.75 x 0.5 in minimum around the text
        attrs.setdefault("height", "0")
        return self.node(x, y, label=label, **attrs)

    def edge(self, a, b, **attrs):
        self.edges.append((a, b, attrs))

    def lane_ends(self, lanes, y):
        for ln in lanes:
            self.ended.setdefault(ln, y)

    def proc_lanes(self, p) -> list:
        return [i for i, (q, _) in enumerate(self.lanes) if q == p]

    def emit(self, title: list) -> graphviz.Digraph:
        height = self.y + 30
        g = graphviz.Digraph(name="msc", engine="neato")
        g.attr("graph", label=_html(*title), labelloc="t", fontname=FONT,
               splines="line", outputorder="edgesfirst", pad="0.3")
        g.attr("node", fontname=FONT, fontsize="10")
        g.attr("edge", fontname=FONT, fontsize="10")
        for nid, x, y, attrs in self.nodes:
            g.node(nid, pos=f"{x:.1f},{height - y:.1f}!", **attrs)
        for a, b, attrs in self.edges:
            g.edge(a, b, **attrs)
        return g


def msc(model: Model, result, title: Optional[str] = None) -> graphviz.Digraph:
    """A message sequence chart of `result`'s counterexample on `model` (neato -n2)."""
    if result.violation is None:
        raise ValueError("the result has no counterexample to chart (verdict clean)")
    trace, final, unmatched = counterexample_trace(model, result)
    c = _Chart(model)
    L = c.LINE
    gap = c.COL - 24                       # usable width between two lifelines
    chars = int(gap / 5.6)                 # ~10-pt Helvetica characters per gap

    # lifeline heads
    heads = []
    for i, (p, t) in enumerate(c.lanes):
        start = model.initial_state().procs[p].pcs[t]
        heads.append(c.node(c.x(i), 0, shape="box", style="filled,rounded",
                            fillcolor="#e8eef7", color="#34495e", penwidth="1.4",
                            label=_html((c.name(i), {"bold": True, "size": "12"}),
                                        (f"at {start}", {"size": "9",
                                                         "color": GUARD_COLOR}))))
    c.y = 40
    pending = {}                          # (src proc, dst proc) -> [(point, row, msg)]

    def band(lines_above, lines_below=0):
        """Reserve the next step's band; return the y of its arrow / box."""
        mid = c.y + 8 + lines_above * L
        c.y = mid + 10 + lines_below * L
        return mid

    def stepno(k, mid):
        c.text(c.X0 - 40, mid, _html((f"{k}", {"bold": True, "color": GUARD_COLOR})))

    def small(label, x, y, color=GUARD_COLOR, d=0):
        """A small label at (x, y); with d = +1 / -1 its near edge sits just right /
        left of the lifeline at x."""
        line = (label, {"size": "8", "color": color})
        if d:
            x += d * (6 + _text_size([line])[0] / 2)
        return c.text(x, y, _html(line))

    culprit = _culprit_step(model, trace, result.violation)
    for k, (s, tr) in enumerate(trace, 1):
        kind = tr.kind
        bad = k == culprit
        if kind == "local":
            p, t, row = tr.parts[0]
            ln = c.lane(p, t)
            mid = band(0.5, 1.5)
            stepno(k, mid)
            tags = " \u25c6 commit" if "commit" in row.tags else ""
            head = (("\u2716 " if bad else "") + row.label + tags,
                    {"bold": True, "color": "#b71c1c"} if bad else {"bold": True})
            c.node(c.x(ln), mid, shape="box", style="filled,bold" if bad else "filled",
                   fillcolor="#fdecea" if bad else "#fffbe6",
                   color="#b71c1c" if bad else "#9e8a2e", margin="0.06,0.03",
                   label=_html(head, (f"{row.src} \u2192 {row.dst}",
                                      {"size": "8", "color": GUARD_COLOR})))
        elif kind == "exit":
            p, t, row = tr.parts[0]
            ln = c.lane(p, t)
            mid = band(0.5, 2.5)
            stepno(k, mid)
            how = row.op.how
            _, _, fill, border = EXIT_STYLE[how]
            if how == "thread_die":
                lines = [(f"{row.label}: thread dies", {"bold": True, "color": border})]
                c.lane_ends([ln], mid)
            else:
                lines = [(f"{row.label}: exit {how}", {"bold": True, "color": border})]
                c.lane_ends(c.proc_lanes(p), mid)
            lines += [(w, {"size": "8", "color": border}) for w in _wrap(row.op.reason,
                                                                           chars - 4)]
            if bad:
                lines[0] = ("\u2716 " + lines[0][0], {"bold": True, "color": "#b71c1c"})
                border = "#b71c1c"
            c.node(c.x(ln), mid, shape="box", style="filled,bold", fillcolor=fill,
                   color=border, label=_html(*lines))
        elif kind in ("p2p", "send"):
            (p, t, row) = tr.parts[0]
            a = c.lane(p, t)
            commit = "commit" in row.tags
            color = COMMIT if commit else "black"
            head = f"{row.op.kind}" + ("  \u25c6 commit" if commit else "")
            if bad:
                head, color = f"\u2716 {head}", "#b71c1c"
            msg = _short_msg(tr.msg)
            mid = band(2.2, 1.2)
            stepno(k, mid)
            pa = c.point(c.x(a), mid, 0.07, color)
            if kind == "p2p":
                q, u, rrow = tr.parts[1]
                b = c.lane(q, u)
                pb = c.point(c.x(b), mid, 0.07, color)
                c.edge(pa, pb, color=color, penwidth="2.2" if commit else "1.3")
                cx = (c.x(a) + c.x(b)) / 2
                c.text(cx, mid - 1.25 * L, _html((head, {"bold": True, "color": color}),
                                                 (msg, {"size": "9"})))
                d = 1 if b > a else -1
                small(row.label, c.x(a), mid + 0.8 * L, d=d)
                small(rrow.label, c.x(b), mid + 0.8 * L, d=-d)
            else:   # buffered send: the arrow is drawn when (if) it is received
                q = model.index[row.op.peer]
                pending.setdefault((p, q), []).append((pa, row, tr.msg, mid))
                d = 1 if c.lane(q, 0) > a else -1
                c.text(c.x(a) + d * gap / 2, mid - 1.25 * L,
                       _html((head + "  (buffered)", {"bold": True, "color": color}),
                             (msg, {"size": "9"})))
                small(row.label, c.x(a), mid + 0.8 * L, d=d)
        elif kind == "recv":
            q, u, rrow = tr.parts[0]
            b = c.lane(q, u)
            src = model.index[rrow.op.peer]
            mid = band(0.6, 1.2)
            stepno(k, mid)
            pb = c.point(c.x(b), mid, 0.07)
            fifo = pending.get((src, q), [])
            if fifo:
                pa, srow, smsg, _ = fifo.pop(0)
                commit = "commit" in srow.tags
                c.edge(pa, pb, color=COMMIT if commit else "black",
                       penwidth="2.2" if commit else "1.3")
            d = 1 if c.lane(src, 0) > b else -1
            small(f"{rrow.label}: {'|'.join(rrow.op.kinds)}", c.x(b), mid + 0.8 * L,
                  "black", d=d)
        elif kind == "coll":
            op = tr.parts[0][2].op
            grp = op.group
            seq = s.seq[GROUPS.index(grp)]
            color = GROUP_COLOR.get(grp, "#444444")
            members = sorted((c.lane(p, t), row) for p, t, row in tr.parts)
            lo, hi = members[0][0], members[-1][0]
            mid = band(2.5, 1.2)
            stepno(k, mid)
            root = f", root={op.root}" if op.root is not None else ""
            commit = any("commit" in row.tags for _, row in members)
            if bad:
                color = "#b71c1c"
            pts = [c.point(c.x(ln), mid, 0.13, color) for ln, _ in members]
            if len(pts) > 1:
                c.edge(pts[0], pts[-1], color=color, penwidth="6", arrowhead="none")
            cx = (c.x(lo) + c.x(hi)) / 2
            c.text(cx, mid - 1.65 * L, _html(
                (f"{op.op}({grp}{root}, {op.kind})  seq {seq}"
                 + ("  \u25c6 commit" if commit else ""),
                 {"bold": True, "color": COMMIT if commit else color}),
                (_short_msg(tr.msg), {"size": "9"})), style="filled", fillcolor="white",
                   color="white")
            for ln, row in members:
                small(row.label, c.x(ln), mid + 0.9 * L)
        elif kind == "crash":
            p = tr.parts[0][0]
            mid = band(0.5, 1.5)
            stepno(k, mid)
            for ln in c.proc_lanes(p):
                if ln in c.ended:
                    continue
                c.text(c.x(ln), mid, _html(("\u2716 CRASH", {"bold": True,
                                                           "color": "#b71c1c",
                                                           "size": "12"}),
                                           ("kill -9", {"size": "8",
                                                        "color": "#b71c1c"})),
                       style="filled", fillcolor="#fbe0e0", shape="box", color="#b71c1c")
            c.lane_ends(c.proc_lanes(p), mid)
        elif kind == "watchdog":
            mid = band(0.5, 1.5)
            stepno(k, mid)
            _banner(c, mid, f"watchdog: {tr.info}; abort flag set", "#e65100", "#ffe6c7",
                    chars)
        elif kind == "abort":
            mid = band(0.5, 1.5)
            stepno(k, mid)
            for p, pr in enumerate(s.procs):
                if pr.status != LIVE:
                    continue
                lanes = [ln for ln in c.proc_lanes(p) if ln not in c.ended]
                for ln in lanes:
                    c.node(c.x(ln), mid, shape="box", style="filled", fillcolor="#ffe6c7",
                           color="#e65100", label=_html(("aborted", {"bold": True,
                                                                     "color": "#e65100"}),
                                                        ("released by the abort flag",
                                                         {"size": "8"})))
                c.lane_ends(c.proc_lanes(p), mid)
        elif kind == "violation":
            mid = band(2.2, 1.2)
            stepno(k, mid)
            _violation_step(c, tr, mid, gap)
    for (p, q), fifo in pending.items():     # sent, never received
        for pa, row, msg, y in fifo:
            dst = _receiving_lane(c, model, q, model.roles[p])
            xa = next(x for nid, x, yy, _ in c.nodes if nid == pa)
            d = 1 if c.x(dst) > xa else -1
            end = c.point(c.x(dst) - d * 14, y, 0.0)
            c.edge(pa, end, style="dashed", color="#777777", arrowhead="open",
                   penwidth="1.2")
            small("never received", c.x(dst) - d * 14, y + 0.8 * L, "#777777", d=-d)
    if unmatched:
        mid = band(0.5, 1.5)
        stepno(len(trace) + 1, mid)
        _banner(c, mid, unmatched, "#444444", "#eeeeee", chars)

    _survivors(c, model, final, gap, chars)

    # lifelines
    for i, h in enumerate(heads):
        end = c.point(c.x(i), c.ended.get(i, c.y), 0.0)
        c.edge(h, end, style="dashed", color="#8a9bb0", arrowhead="none", penwidth="1.2")

    # the violation
    v = result.violation
    c.y += 14
    left, right = c.x(0) - c.COL / 2 + 10, c.x(len(c.lanes) - 1) + c.COL / 2 - 10
    width_chars = int((right - left) / 6.2)
    lines = [(f"\u2716 {v.prop}", {"bold": True, "color": "#b71c1c", "size": "13"})]
    lines += [(w, {"color": "#b71c1c"}) for w in _wrap(v.detail, width_chars)]
    c.y += (len(lines) * L) / 2 + 6
    c.node((left + right) / 2, c.y, shape="box", style="filled,bold", fillcolor="#fdecea",
           color="#b71c1c", margin="0.15,0.08", label=_html(*lines))
    c.y += (len(lines) * L) / 2 + 12

    head = [(title or "counterexample", {"bold": True, "size": "16"}),
            (model.cfg.describe(), {"size": "10", "color": GUARD_COLOR}),
            (f"{len(trace)} step{'s' if len(trace) != 1 else ''}, shortest "
             f"(numbered as in `lockstep check`)",
             {"size": "10", "color": GUARD_COLOR})]
    return c.emit(head)


def _culprit_step(model, trace, violation) -> int:
    """The 1-based step that violates a transition property (its box is drawn red), or
    0 when the violation is a state the run reached (deadlock, stranding...)."""
    from .properties import check_progress_at_exit, check_state, check_transition
    if not trace or violation is None:
        return 0
    s, tr = trace[-1]
    if tr.kind == "violation":
        return 0
    s2 = model.step(s, tr)
    v = check_transition(model, s, tr, s2) or check_state(model, s2) \
        or check_progress_at_exit(model, s, tr)
    return len(trace) if v and v.prop == violation.prop else 0


def _survivors(c, model, final, gap, chars):
    """Where every thread still running stands at the end. A thread with no enabled
    transition is blocked: its pending comm ops are listed and a blocked send is drawn
    as a dashed arrow toward the peer that never posts the receive."""
    L = c.LINE
    active = set()
    for tr in model.enabled(final):
        if tr.kind != "violation":
            active.update((p, t) for p, t, _ in tr.parts if t is not None)
    blocked_sends = []
    notes = []
    for ln, (p, t) in enumerate(c.lanes):
        pr = final.procs[p]
        if ln in c.ended or pr.status != LIVE:
            continue
        pc = pr.pcs[t]
        if pc in (FINAL, DEAD_THREAD):
            notes.append((ln, [("thread done" if pc == FINAL else "thread dead",
                                {"size": "9", "color": GUARD_COLOR})], "rounded"))
            continue
        lines = [(f"at {pc}", {"bold": True, "size": "9"})]
        if (p, t) not in active:
            ops = []
            for r in model.tables[p][t].get(pc, ()):
                if isinstance(r.op, (Send, Recv, Coll)) and op_text(r.op) not in ops:
                    ops.append(op_text(r.op))
                    if isinstance(r.op, Send):
                        blocked_sends.append((ln, r))
            if ops:
                lines.append(("blocked in", {"size": "8", "color": GUARD_COLOR}))
                for o in ops:
                    lines += [(w, {"size": "8", "face": MONO, "color": OP_COLOR})
                              for w in _wrap(o, chars - 6)]
            else:
                lines.append(("no row enabled", {"size": "8", "color": GUARD_COLOR}))
        notes.append((ln, lines, "dashed"))
    c.y += 10
    red = "#b71c1c"
    for ln, row in blocked_sends:
        q = model.index[row.op.peer]
        peer = _receiving_lane(c, model, q, model.roles[c.lanes[ln][0]])
        c.y += 2.2 * L
        pa = c.point(c.x(ln), c.y, 0.07, red)
        pb = c.point(c.x(peer), c.y, 0.0, red)
        c.edge(pa, pb, color=red, style="dashed", penwidth="1.6", arrowhead="open")
        cx = (c.x(ln) + c.x(peer)) / 2
        c.text(cx, c.y - 0.8 * L, _html((f"blocked: {op_text(row.op)}, no receive posted",
                                         {"size": "9", "color": red})))
    if notes:
        tall = max(len(lines) for _, lines, _ in notes)
        c.y += 1.5 * L + tall * L / 2
        for ln, lines, style in notes:
            c.node(c.x(ln), c.y, shape="box", style=f"filled,{style}", fillcolor="#f3f3f3",
                   color="#777777", label=_html(*lines))
            c.ended[ln] = c.y
        c.y += tall * L / 2 + 6


def _receiving_lane(c, model, q, sender_role) -> int:
    """The lane of process q whose thread receives from `sender_role`."""
    lanes = c.proc_lanes(q)
    for ln in lanes:
        t = c.lanes[ln][1]
        for rows in model.tables[q][t].values():
            if any(isinstance(r.op, Recv) and r.op.peer == sender_role for r in rows):
                return ln
    return lanes[0]


def _banner(c, y, text, color, fill, chars):
    lines = [(w, {"bold": True, "color": color})
             for w in _wrap(text, chars * max(1, len(c.lanes) - 1))]
    cx = (c.x(0) + c.x(len(c.lanes) - 1)) / 2
    c.node(cx, y, shape="box", style="filled", fillcolor=fill, color=color,
           label=_html(*lines))


def _violation_step(c, tr, mid, gap):
    """A transition of kind "violation": the attempted op(s) drawn dashed red."""
    red = "#b71c1c"
    parts = [(c.lane(p, t), row) for p, t, row in tr.parts]
    pts = [c.point(c.x(ln), mid, 0.1, red) for ln, _ in parts]
    if len(parts) == 2 and isinstance(parts[0][1].op, Send):
        c.edge(pts[0], pts[1], color=red, style="dashed", penwidth="2")
    elif len(parts) > 1:
        order = sorted(range(len(parts)), key=lambda i: parts[i][0])
        c.edge(pts[order[0]], pts[order[-1]], color=red, style="dashed", penwidth="4",
               arrowhead="none")
    lo = min(ln for ln, _ in parts)
    hi = max(ln for ln, _ in parts)
    lines = [(f"\u2716 {tr.info.prop}", {"bold": True, "color": red}),
             (f"{parts[0][1].label}: {op_text(parts[0][1].op)}", {"size": "9"})]
    if lo == hi:    # one thread: the text goes right of its lifeline
        cx = c.x(lo) + 10 + _text_size(lines)[0] / 2
    else:
        cx = (c.x(lo) + c.x(hi)) / 2
    c.text(cx, mid - 1.25 * c.LINE, _html(*lines))
    for ln, row in parts[1:]:
        c.text(c.x(ln), mid + 0.9 * c.LINE,
               _html((f"posted {op_text(row.op)}", {"size": "8", "color": red})))


def mutation_msc(name: str, base: Optional[Config] = None):
    """(graph, result) of mutation `name`'s shortest counterexample on `base` widened
    as the mutation needs (model.mutations.mutation_config)."""
    from .explore import explore
    from .mutations import MUTATIONS, mutation_config
    cfg = mutation_config(base or Config(), name)
    model = model_for(cfg)
    res = explore(model)
    if res.violation is None:
        return None, res
    mut = MUTATIONS[name]
    title = f"mutation {name}: {res.verdict}  ({mut.failure_mode})"
    return msc(model, res, title), res


# ============================================================================ output

def have_dot() -> bool:
    return shutil.which("dot") is not None


def write(graph: graphviz.Digraph, out_dir, stem: str) -> list:
    """Write `stem`.svg and `stem`.png under `out_dir`; return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in ("svg", "png"):
        kw = {"neato_no_op": 2} if graph.engine == "neato" else {}
        data = graph.pipe(format=fmt, **kw)
        path = out / f"{stem}.{fmt}"
        path.write_bytes(data)
        paths.append(path)
    return paths


def render_all(out_dir="docs/diagrams", mutations=DEFAULT_MSCS,
               base: Optional[Config] = None) -> list:
    """Every role thread's state diagram plus the MSC of each of `mutations`."""
    paths = []
    for role, thread, name in diagram_names():
        paths += write(state_diagram(role, thread), out_dir, name)
    for name in mutations:
        g, res = mutation_msc(name, base)
        if g is not None:
            paths += write(g, out_dir, f"msc_{name}")
    return paths


def render_mutation(name: str, out_dir, base: Optional[Config] = None) -> list:
    """The state diagrams of every thread `name` changes, and its MSC."""
    from .mutations import build_tables, mutation_config
    cfg = mutation_config(base or Config(), name)
    tables = build_tables(cfg)
    shipped = shipped_rows()
    paths = []
    for role, thread, dname in diagram_names():
        rows = tables.get(role + "*", tables[role])
        mine = {_row_key(r) for r in rows if r.thread == thread}
        orig = {_row_key(r) for r in shipped[role] if r.thread == thread}
        if mine != orig:
            paths += write(state_diagram(role, thread, tables, mutation=name), out_dir,
                           f"{name}.{dname}")
    g, res = mutation_msc(name, base)
    if g is not None:
        paths += write(g, out_dir, f"msc_{name}")
    return paths


def cli_render(out_dir="docs/diagrams", mutation: Optional[str] = None,
               config: Optional[Config] = None) -> int:
    """`lockstep render`: without a mutation, every state diagram plus the default
    MSCs; with one, the diagrams of the threads it changes and its MSC. `config` is the
    base configuration (widened per mutation). Returns an exit status."""
    from .mutations import MUTATIONS
    if not have_dot():
        print("lockstep render: the graphviz `dot` binary is not installed "
              "(apt-get install graphviz)", file=sys.stderr)
        return 2
    if mutation:
        if mutation not in MUTATIONS:
            print(f"lockstep: unknown mutation {mutation!r}; known: "
                  f"{', '.join(MUTATIONS)}", file=sys.stderr)
            return 2
        paths = render_mutation(mutation, out_dir, config)
        if not any(p.name.startswith("msc_") for p in paths):
            print(f"mutation {mutation}: no counterexample on this configuration, "
                  f"no MSC drawn", file=sys.stderr)
    else:
        paths = render_all(out_dir, base=config)
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(cli_render(sys.argv[1] if len(sys.argv) > 1 else "docs/diagrams"))
