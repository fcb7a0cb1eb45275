"""The checker checked: the tables export to Promela, and SPIN returns lockstep's verdicts.

The export tests need nothing but Python; the SPIN tests are skipped when `spin` or a C
compiler is missing (CI installs spin with apt). pan is compiled with -O0 here: the
verdict does not depend on the optimisation level and -O0 compiles ~10x faster.
"""
import shutil
import subprocess

import pytest

from lockstep.model import promela
from lockstep.model.config import Config
from lockstep.model.crosscheck import compare, run_spin, spin_available
from lockstep.model.explore import explore
from lockstep.model.guards import MeshVars
from lockstep.model.mutations import MUTATIONS, build_tables, model_for, mutation_config
from lockstep.model.ops import Local, Row
from lockstep.model.promela import (PromelaExportError, export_promela, export_with_rows,
                           proctype_names)
from lockstep.model.tables import THREADS

BASE = Config(mesh=2, chunks=2)
needs_spin = pytest.mark.skipif(not spin_available(), reason="spin / gcc not installed")


def _all_configs():
    return [Config(mesh=1, chunks=2), Config(mesh=3, chunks=2, hard_cut=True, faults=1),
            Config(mesh=2, chunks=2, p2p="buffered", noops=1)] + \
        [mutation_config(BASE, n) for n in MUTATIONS if n not in promela.UNEXPORTABLE]


@pytest.mark.parametrize("name", sorted(promela.UNEXPORTABLE))
def test_an_unexportable_mutation_is_refused_loudly(name):
    with pytest.raises(promela.PromelaExportError, match="collectives from two threads"):
        export_promela(mutation_config(BASE, name))


@pytest.mark.parametrize("cfg", _all_configs(), ids=lambda c: c.mutation or c.describe())
def test_export_has_a_proctype_per_thread_and_every_row(cfg):
    text = export_promela(cfg)
    m = model_for(cfg)
    names = proctype_names(cfg)
    for p, role in enumerate(m.roles):
        for thread in THREADS[role]:
            assert f"{m.names[p]}_{thread}" in names
    for name in names:
        assert f"proctype {name}()" in text
    for role in ("rank0", "leader") + (("worker",) if cfg.mesh > 1 else ()):
        assert f"proctype {role}" in text
    for table in m.tables:
        for rows_at in table:
            for rows in rows_at.values():
                for r in rows:
                    assert f"{r.label}: {r.src} -> {r.dst}" in text, r.label


def test_row_markers_cover_every_row_that_can_fire():
    text, rows = export_with_rows(BASE)
    m = model_for(BASE)
    expected = {(m.names[p], THREADS[m.roles[p]][t], r.src, r.label)
                for p, table in enumerate(m.tables) for t, at in enumerate(table)
                for rs in at.values() for r in rs}
    assert set(rows) == expected
    lines = text.split("\n")
    for key, nums in rows.items():
        assert all("@row" in lines[n - 1] for n in nums), key


def _strange_guard(v, cfg):
    return True


def test_a_guard_without_a_promela_mapping_fails_loudly():
    tables = build_tables(BASE)
    tables["leader"] = tables["leader"] + [
        Row("main", "validate", "new_check", Local("validate"), "bcast_hdr",
            guard=_strange_guard)]
    with pytest.raises(PromelaExportError, match="_strange_guard"):
        export_promela(BASE, tables=tables)
    tables["leader"][-1] = tables["leader"][-1]._replace(guard=lambda v, cfg: True)
    with pytest.raises(PromelaExportError, match="no Promela mapping"):
        export_promela(BASE, tables=tables)


def test_an_unknown_tag_fails_loudly():
    tables = build_tables(BASE)
    tables["leader"] = [r._replace(tags=r.tags | {"new_property"})
                        if r.label == "envelope_valid" else r for r in tables["leader"]]
    with pytest.raises(PromelaExportError, match="unknown tags"):
        export_promela(BASE, tables=tables)


def test_a_changed_guard_fails_loudly(monkeypatch):
    promela.check_fingerprints()          # the translation matches today's guards
    monkeypatch.setitem(promela.FINGERPRINTS, "guards.decode_room", "0000000000")
    with pytest.raises(PromelaExportError, match="decode_room"):
        export_promela(BASE)


def test_a_new_local_variable_fails_loudly(monkeypatch):
    monkeypatch.setattr(promela, "MESH_LAYOUT",
                        {k: v for k, v in promela.MESH_LAYOUT.items() if k != "planned"})
    with pytest.raises(PromelaExportError, match="planned"):
        export_promela(BASE)
    assert "planned" in MeshVars._fields


@pytest.mark.skipif(shutil.which("spin") is None, reason="spin not installed")
@pytest.mark.parametrize("cfg", _all_configs() + [Config(mesh=2, chunks=1)],
                         ids=lambda c: c.mutation or c.describe())
@pytest.mark.parametrize("collectives", ["split", "joint"])
def test_spin_accepts_every_export(cfg, collectives, tmp_path):
    (tmp_path / "m.pml").write_text(export_promela(cfg, collectives))
    p = subprocess.run(["spin", "-a", "m.pml"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0 and (tmp_path / "pan.c").exists(), p.stdout + p.stderr


# ------------------------------------------------------------------ SPIN verdicts

AGREE = [("shipped", BASE), ("shipped buffered", BASE.with_(p2p="buffered")),
         ("shipped cut+fault", Config(mesh=2, chunks=2, hard_cut=True, faults=1))] + \
    [(n, mutation_config(BASE, n)) for n in ("blocking_send_then_recv", "no_epoch_filter",
                                             "phase_b_on_world", "leader_throw_no_terminal",
                                             "second_thread_transport", "no_watchdog")]


@needs_spin
@pytest.mark.parametrize("name,cfg", AGREE, ids=[a for a, _ in AGREE])
def test_spin_agrees_with_lockstep(name, cfg):
    row = compare(name, cfg, cc_opt="-O0")
    assert row.spin.verdict == row.lock.verdict, row.spin.log[-2000:]
    if cfg.mutation:
        assert row.lock.verdict == MUTATIONS[cfg.mutation].expected
    else:
        # not vacuous: SPIN executes exactly the rows lockstep's search executes
        assert row.spin.rows_reached == row.rows_lock, row.coverage_diff()


@needs_spin
def test_the_crosscheck_can_fail(monkeypatch):
    """A wrong translation is caught: drop the decode-queue bound on the Promela side
    only, and SPIN finds a queue_bound violation the tables do not have."""
    cfg = Config(mesh=1, chunks=2, d_in=2, d_out=1)
    assert explore(model_for(cfg)).verdict == "clean"
    monkeypatch.setitem(promela.GUARDS, "decode_room", ("r0", lambda c: "1"))
    assert run_spin(cfg, cc_opt="-O0").verdict == "queue_bound"


@needs_spin
def test_a_smaller_fault_budget_exposes_hangs_a_crash_would_release():
    """model.semantics always offers a crash while budget is left, so a hang is never a
    terminal state there; with fault_budget="upto" SPIN also tries the smaller budgets."""
    cfg = mutation_config(BASE.with_(faults=1), "blocking_send_then_recv")
    # lockstep judges a state whose only moves are crashes as stuck, which is what
    # SPIN's "upto" budget does; SPIN's "exact" budget hides the hang.
    assert explore(model_for(cfg)).verdict == "deadlock"
    assert run_spin(cfg, cc_opt="-O0", fault_budget="upto").verdict == "deadlock"
    assert run_spin(cfg, cc_opt="-O0", fault_budget="exact").verdict == "clean"



def test_a_spin_step_past_its_limit_names_the_command(tmp_path):
    from lockstep.model import crosscheck as X
    with pytest.raises(X.SpinTimeout, match=r"`sleep 5` did not finish within 0.2 s"):
        X._run(["sleep", "5"], tmp_path, 0.2)


@needs_spin
def test_a_configuration_spin_cannot_finish_is_reported_not_a_traceback(monkeypatch,
                                                                         capsys):
    """pp1_full with split collectives outgrew SPIN (over 600 s, 4.5 GB): the other
    configurations are still compared, the one not finished is named with its reason,
    and the cross-check exits 1 (a configuration not compared is not an agreement)."""
    from lockstep.model import crosscheck as X
    slow = dict(X.shipped_configs())["inject_cond_flag"]
    real = X.run_spin

    def run_spin(cfg, **kw):
        if cfg == slow:
            raise X.SpinTimeout("`./pan -m1000000 -w22` did not finish within 600 s")
        return real(cfg, **kw)

    monkeypatch.setattr(X, "run_spin", run_spin)
    rc = X.main(["--only", "inject_c", "--no-coverage", "--cc-opt=-O0"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "inject_count_mismatch" in out and "yes" in out          # still compared
    assert "1 configuration(s) not compared (SPIN did not finish):" in out
    assert "inject_cond_flag: not compared: `./pan -m1000000 -w22` did not finish" in out
