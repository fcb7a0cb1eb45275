"""Rendering: state diagrams and sequence charts are generated from the tables and the
counterexamples, so they cannot drift from them. DOT-source checks need no graphviz
binary; image checks are skipped without `dot` (CI installs graphviz)."""
import re
from pathlib import Path

import pytest

from lockstep.model import render
from lockstep.model.config import Config
from lockstep.model.explore import explore
from lockstep.model.mutations import MUTATIONS, build_tables, model_for, mutation_config
from lockstep.model.tables import shipped_rows

needs_dot = pytest.mark.skipif(not render.have_dot(), reason="graphviz `dot` not installed")
DOCS = Path(__file__).resolve().parent.parent / "docs" / "diagrams"
MSC_CASES = ["no_epoch_filter", "blocking_send_then_recv", "drop_results_after_shutdown",
             "no_watchdog", "second_thread_transport", "header_before_preflight"]


def _thread_rows(role, thread, tables=None):
    return [r for r in (tables or shipped_rows())[role] if r.thread == thread]


def _commit_edges(src: str) -> int:
    return sum(1 for line in src.splitlines()
               if "->" in line and f'color="{render.COMMIT}"' in line)


@pytest.mark.parametrize("role,thread,name", render.diagram_names())
def test_state_diagram_has_every_row_and_marks_commit_points(role, thread, name):
    src = render.state_diagram(role, thread).source
    rows = _thread_rows(role, thread)
    assert rows
    for r in rows:
        assert r.label in src, f"{name}: row {r.label} missing from the diagram"
        if r.guard is not None:
            assert f"[{r.guard.__name__}]" in src
    commits = [r for r in rows if "commit" in r.tags and r.src != r.dst]
    assert _commit_edges(src) == len(commits)
    assert "legend" in src


def test_every_role_thread_has_a_diagram():
    names = {n for _, _, n in render.diagram_names()}
    assert names == {"rank0.main", "rank0.comms", "leader.main", "leader.comms", "worker"}


def test_comms_grid_pins_every_product_state():
    g = render.state_diagram("rank0", "comms")
    assert g.engine == "neato"          # the grid layout, not the dot fallback
    for s in ("idle", "hdr", "pay"):
        for r in ("idle", "pay", "put"):
            assert re.search(rf'"{s}/{r}" \[.*pos=', g.source)


@pytest.mark.parametrize("name", ["header_before_preflight", "blocking_send_then_recv",
                                  "no_epoch_filter", "phase_b_on_world"])
def test_mutated_diagram_shows_the_mutated_rows(name):
    cfg = mutation_config(Config(), name)
    tables = build_tables(cfg)
    for role, thread, _ in render.diagram_names():
        rows = [r for r in tables.get(role + "*", tables[role]) if r.thread == thread]
        src = render.state_diagram(role, thread, tables, mutation=name).source
        for r in rows:
            assert r.label in src
        assert f"mutation {name}" in src


@pytest.mark.parametrize("name", MSC_CASES)
def test_msc_of_a_counterexample_has_every_lifeline_and_the_violation(name):
    cfg = mutation_config(Config(), name)
    model = model_for(cfg)
    res = explore(model)
    assert res.violation is not None
    trace, _, unmatched = render.counterexample_trace(model, res)
    assert unmatched is None and len(trace) == len(res.steps) - 1
    src = render.msc(model, res, f"mutation {name}").source
    for p, role in enumerate(model.roles):
        for t in range(len(render.THREADS[role])):
            assert f"<b>{model._who(p, t)}</b>" in src
    assert res.violation.prop in src
    assert "\u2716" in src      # the violation banner
    for k in range(1, len(trace) + 1):   # every step numbered as in the text
        assert f"<b>{k}</b>" in src


def test_msc_refuses_a_clean_result():
    model = model_for(Config(mesh=1, chunks=1))
    res = explore(model)
    assert res.verdict == "clean"
    with pytest.raises(ValueError):
        render.msc(model, res)


def test_dot_source_is_deterministic():
    a = [render.state_diagram(r, t).source for r, t, _ in render.diagram_names()]
    b = [render.state_diagram(r, t).source for r, t, _ in render.diagram_names()]
    assert a == b
    g1, _ = render.mutation_msc("no_epoch_filter")
    g2, _ = render.mutation_msc("no_epoch_filter")
    assert g1.source == g2.source
    assert not re.search(r"0x[0-9a-f]{6,}", "".join(a) + g1.source)   # no addresses


@needs_dot
def test_images_are_deterministic(tmp_path):
    g, _ = render.mutation_msc("blocking_send_then_recv")
    for graph, stem in ((render.state_diagram("rank0", "comms"), "comms"),
                        (render.state_diagram("leader"), "leader"), (g, "msc")):
        first = [p.read_bytes() for p in render.write(graph, tmp_path / "a", stem)]
        again = [p.read_bytes() for p in render.write(graph, tmp_path / "b", stem)]
        assert first == again
        assert first[0].lstrip().startswith(b"<?xml") and first[1][:4] == b"\x89PNG"


@needs_dot
def test_cli_render(tmp_path, capsys):
    assert render.cli_render(tmp_path / "all") == 0
    made = sorted(p.name for p in (tmp_path / "all").iterdir())
    expected = sorted(f"{n}.{ext}" for n in
                      [n for _, _, n in render.diagram_names()]
                      + [f"msc_{m}" for m in render.DEFAULT_MSCS]
                      for ext in ("svg", "png"))
    assert made == expected
    assert render.cli_render(tmp_path / "one", mutation="header_before_preflight") == 0
    one = {p.name for p in (tmp_path / "one").iterdir()}
    assert {"msc_header_before_preflight.png",
            "header_before_preflight.rank0.comms.svg"} <= one
    assert render.cli_render(tmp_path / "bad", mutation="no_such_mutation") == 2


@pytest.mark.parametrize("role,thread,name", render.diagram_names())
def test_committed_diagrams_match_the_tables(role, thread, name):
    """docs/diagrams is generated; a table row missing from it means someone changed
    the tables without `lockstep render` (text check: independent of graphviz's
    version)."""
    svg = DOCS / f"{name}.svg"
    assert svg.exists(), f"run `lockstep render` to generate {svg}"
    text = svg.read_text()
    for r in _thread_rows(role, thread):
        assert r.label in text, f"{svg.name} lacks row {r.label}: regenerate it"
    assert (DOCS / f"{name}.png").exists()


def test_every_mutation_has_a_chartable_counterexample():
    for name in MUTATIONS:
        model = model_for(mutation_config(Config(), name))
        res = explore(model)
        trace, final, unmatched = render.counterexample_trace(model, res)
        assert unmatched is None, name
        assert "<b>1</b>" in render.msc(model, res).source or not trace
