"""A pipeline of the user's own, plugged in by import path (`--workload pkg.mod:Class`,
docs/plugin.md), and pipelines that misbehave once: each must be a fast, one-line,
actionable failure (rank, role, ids, the method and what was wrong), no rank left
behind, a failed run (`lockstep run` exit 3), and `lockstep conform` saying what
happened. Every run: mesh 2, 3 chunks, gloo on 127.0.0.1, the launcher's hard deadline
kills every child."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lockstep.conformance.report import conform, format_report
from lockstep.model.config import Config
from lockstep.runtime.run import run_local
from lockstep.runtime.workload import WorkloadSpecError, load_workload_class

DEADLINE_S = 60
MODULE = "buggy_plugins"
SOURCE = '"""Pipelines of a user\'s own, each wrong once (tests/test_plugin.py): `Good` is a small\nTP-sharded MLP; every other class is `Good` with one mistake, on rank `ctx.args["rank"]`\n(default: wherever the method runs) at chunk `ctx.args["at"]` (default 1)."""\nimport json\nimport time\n\nimport torch\n\nfrom lockstep.runtime.workload import Workload\n\n\nclass Good(Workload):\n    def __init__(self, ctx):\n        self.ctx, self.args = ctx, ctx.args\n        hidden = self.hidden = ctx.args.get("hidden", 8)\n        g = torch.Generator().manual_seed(0)\n        full = torch.randn(hidden, hidden, generator=g) / hidden ** 0.5\n        shard = hidden // ctx.mesh_size\n        lo = (ctx.mesh_rank or 0) * shard\n        self.rows = slice(lo, lo + shard)\n        self.weight = full[self.rows, :].contiguous()\n        self.state = None\n\n    def here(self, env_or_chunk):\n        chunk = env_or_chunk if isinstance(env_or_chunk, int) else env_or_chunk["chunk_index"]\n        rank = self.args.get("rank")\n        return chunk == self.args.get("at", 1) and rank in (None, self.ctx.rank)\n\n    def build(self, chunk_index, cache_epoch, init_cache, regime, steps):\n        g = torch.Generator().manual_seed(chunk_index)\n        latents = torch.randn(2, self.hidden, generator=g).to(torch.bfloat16)\n        return {"height": 2, "width": self.hidden}, {\n            "conditioning_embeds": torch.zeros(1, self.hidden, dtype=torch.bfloat16),\n            "latents_in": latents,\n            "current_denoising_step_list": torch.arange(steps, dtype=torch.int64)}\n\n    def generator_call(self, call_index, envelope, tensors, all_reduce):\n        if call_index == 0:\n            self.state = tensors["latents_in"].float()\n        partial = self.state[:, self.rows] @ self.weight\n        all_reduce(partial)\n        self.state = torch.tanh(partial)\n\n    def result(self, envelope, tensors):\n        return {"latents_out": self.state.to(torch.bfloat16)}\n\n    def decode(self, result_meta, tensors):\n        return float(tensors["latents_out"].float().sum())\n\n\nclass RaisesInBuild(Good):\n    def build(self, chunk_index, *a):\n        if self.here(chunk_index):\n            raise KeyError("prompt_embeds")\n        return super().build(chunk_index, *a)\n\n\nclass RaisesInGeneratorCall(Good):\n    def generator_call(self, call_index, envelope, tensors, all_reduce):\n        if self.here(envelope) and call_index == 1:\n            raise RuntimeError("CUDA out of memory (pretend)")\n        super().generator_call(call_index, envelope, tensors, all_reduce)\n\n\nclass RaisesInResult(Good):\n    def result(self, envelope, tensors):\n        if self.here(envelope):\n            raise ValueError("no latents kept")\n        return super().result(envelope, tensors)\n\n\nclass RaisesInResultMeta(Good):\n    def result_meta(self, envelope, out):\n        if self.here(envelope):\n            raise ZeroDivisionError("fps")\n        return super().result_meta(envelope, out)\n\n\nclass RaisesInDecode(Good):\n    def decode(self, result_meta, tensors):\n        if self.here(result_meta):\n            raise OSError("vae weights missing")\n        return super().decode(result_meta, tensors)\n\n\nclass WrongDtype(Good):\n    def build(self, chunk_index, *a):\n        meta, t = super().build(chunk_index, *a)\n        if self.here(chunk_index):\n            t["latents_in"] = t["latents_in"].float()\n        return meta, t\n\n\nclass WrongShape(Good):\n    def result(self, envelope, tensors):\n        out = super().result(envelope, tensors)\n        if self.here(envelope):\n            out["latents_out"] = out["latents_out"][:1]\n        return out\n\n\nclass Huge(Good):\n    def build(self, chunk_index, *a):\n        meta, t = super().build(chunk_index, *a)\n        if self.here(chunk_index):   # 2**32 elements, no memory: a zero-stride view\n            t["conditioning_embeds"] = torch.zeros(1, 1, dtype=torch.bfloat16).expand(\n                2 ** 16, 2 ** 16)\n        return meta, t\n\n\nclass MetaNotJson(Good):\n    def build(self, chunk_index, *a):\n        meta, t = super().build(chunk_index, *a)\n        if self.here(chunk_index):\n            meta["fps"] = torch.tensor(24.0)\n        return meta, t\n\n\nclass MetaBreaksContract(Good):\n    def build(self, chunk_index, *a):\n        meta, t = super().build(chunk_index, *a)\n        if self.here(chunk_index):\n            meta["do_kv_recompute"] = True      # a plan bit rank0 owns, R1 says False\n        return meta, t\n\n\nclass ResultMetaNotJson(Good):\n    def result_meta(self, envelope, out):\n        fields = super().result_meta(envelope, out)\n        if self.here(envelope):\n            fields["seen"] = {1, 2}\n        return fields\n\n\nclass ExtraAllReduce(Good):\n    def generator_call(self, call_index, envelope, tensors, all_reduce):\n        super().generator_call(call_index, envelope, tensors, all_reduce)\n        if self.here(envelope) and call_index == 1:\n            all_reduce(torch.zeros(2, self.hidden))\n\n\nclass MissingAllReduce(Good):\n    def generator_call(self, call_index, envelope, tensors, all_reduce):\n        if self.here(envelope) and call_index == 1:\n            return\n        super().generator_call(call_index, envelope, tensors, all_reduce)\n\n\nclass OtherShapeAllReduce(Good):\n    def generator_call(self, call_index, envelope, tensors, all_reduce):\n        if self.here(envelope) and call_index == 1:\n            all_reduce(torch.zeros(3, self.hidden))\n            return\n        super().generator_call(call_index, envelope, tensors, all_reduce)\n\n\nclass Slow(Good):\n    def generator_call(self, call_index, envelope, tensors, all_reduce):\n        if self.here(envelope) and call_index == 1:\n            time.sleep(self.args.get("sleep_s", 3.0))\n        super().generator_call(call_index, envelope, tensors, all_reduce)\n\n\nclass DecodeNotJson(Good):\n    def decode(self, result_meta, tensors):\n        if self.here(result_meta):\n            return tensors["latents_out"]\n        return super().decode(result_meta, tensors)\n\n\nclass RaisesInInit(Good):\n    def __init__(self, ctx):\n        super().__init__(ctx)\n        if ctx.rank == 2:\n            raise ValueError("hidden=8 does not split over 2 ranks evenly (pretend)")\n\n\nclass NotAWorkload:\n    pass\n\n\nnot_a_class = 3\n'


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    """The plugin module in a directory of its own, which is the caller's working
    directory (what `lockstep run --workload buggy_plugins:Good` run there sees)."""
    home = tmp_path / "home"
    home.mkdir()
    (home / f"{MODULE}.py").write_text(SOURCE)
    monkeypatch.chdir(home)
    sys.modules.pop(MODULE, None)
    yield home
    sys.modules.pop(MODULE, None)


def _lockstep(argv, **kw):
    """The CLI as `lockstep ARGS` runs it: `python -m lockstep` with the safe path (the
    working directory not put on sys.path by Python, as the console script does not put
    it there either), whether lockstep is installed in a venv or on PYTHONPATH."""
    return subprocess.run([sys.executable, "-m", "lockstep", *argv],
                          env=dict(os.environ, PYTHONSAFEPATH="1"), capture_output=True,
                          text=True, **kw)


def _run(tmp_path, cls, args=None, mesh=2, **opts):
    out = tmp_path / "run"
    res = run_local(Config(mesh=mesh, chunks=3, steps=2),
                    {"workload": f"{MODULE}:{cls}", "workload_args": args or {},
                     "op_deadline_s": 5.0, "pg_timeout_s": 10.0, **opts},
                    out, deadline_s=DEADLINE_S)
    return res, out


def test_a_plugin_from_the_callers_directory_runs_on_every_rank(plugins, tmp_path):
    res, out = _run(tmp_path, "Good")
    assert res.ok, res.summary()
    assert [c for c, _, _ in json.loads((out / "outputs.json").read_text())] == [0, 1, 2]
    assert conform(out).ok


def test_lockstep_run_takes_the_import_path_from_the_working_directory(plugins, tmp_path):
    p = _lockstep(["run", "--mesh", "2", "--chunks", "2", "--workload", f"{MODULE}:Good",
                   "--workload-args", '{"hidden": 4}', "--out", str(tmp_path / "cli"),
                   "--deadline-s", str(DEADLINE_S)], cwd=plugins, timeout=DEADLINE_S + 30)
    assert p.returncode == 0, p.stdout + p.stderr
    assert json.loads((tmp_path / "cli" / "run.json").read_text())["opts"][
        "workload_args"] == {"hidden": 4}


@pytest.mark.parametrize("spec, says", [
    ("no_such_module:Good", "no module named 'no_such_module'"),
    (f"{MODULE}:Missing", f"module '{MODULE}' has no 'Missing'"),
    (f"{MODULE}:NotAWorkload", "the class NotAWorkload, not a subclass of"),
    (f"{MODULE}:not_a_class", "a int, not a subclass of"),
    ("buggy_plugins.Good", "or an import path 'package.module:Class'"),
])
def test_a_workload_that_cannot_be_loaded_is_a_usage_error_before_any_rank(
        plugins, tmp_path, spec, says):
    p = _lockstep(["run", "--mesh", "2", "--chunks", "2", "--workload", spec,
                   "--out", str(tmp_path / "cli")], cwd=plugins, timeout=60)
    assert p.returncode == 2, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and repr(spec) in lines[0], p.stderr
    assert not list((tmp_path / "cli").glob("rank*")), "no rank started"


def test_importing_a_module_that_raises_names_the_error(plugins, monkeypatch):
    monkeypatch.syspath_prepend(str(plugins))
    (plugins / "broken_plugin.py").write_text("import torch\nraise ImportError('no vae')\n")
    with pytest.raises(WorkloadSpecError, match=r"'broken_plugin:X': importing "
                       r"'broken_plugin' raised ImportError: no vae"):
        load_workload_class("broken_plugin:X")


def _lines(res):
    return {r.rank: r.reason_line() or "" for r in res.ranks}


# (class, args, the root cause's rank, what its line must say)
MISBEHAVING = [
    ("RaisesInInit", {}, 2, "RaisesInInit(ctx) raised ValueError: hidden=8 does not split"),
    ("RaisesInBuild", {}, 0, "build(chunk_index=1, cache_epoch=0, call_id=1) KeyError: "
                             "'prompt_embeds'"),
    ("RaisesInGeneratorCall", {"rank": 2}, 2, "generator_call(call_index=1) RuntimeError: "
                                              "CUDA out of memory"),
    ("RaisesInResult", {}, 1, "workload result ValueError: no latents kept"),
    ("RaisesInResultMeta", {}, 1, "workload result_meta ZeroDivisionError: fps"),
    ("RaisesInDecode", {}, 0, "decode(chunk_index=1, cache_epoch=0, call_id=1) OSError: "
                              "vae weights missing"),
    ("WrongDtype", {}, 0, "field 'latents_in': dtype must be bfloat16, got float32"),
    ("WrongShape", {}, 1, "latents_out shape [1, 8] != latents_in shape [2, 8]"),
    ("Huge", {}, 0, "field 'conditioning_embeds': numel > cap"),
    ("MetaNotJson", {}, 0, "field 'fps'"),
    ("MetaBreaksContract", {}, 0, "do_kv_recompute"),
    ("ResultMetaNotJson", {}, 1, "field 'seen'"),
    ("DecodeNotJson", {}, 0, "decode(chunk_index=1, cache_epoch=0, call_id=1) TypeError: "
                             "returned Tensor, not JSON"),
]


@pytest.mark.parametrize("cls, args, root, says", MISBEHAVING, ids=[m[0] for m in MISBEHAVING])
def test_a_misbehaving_pipeline_is_a_fast_one_line_failure(plugins, tmp_path, cls, args,
                                                           root, says):
    res, out = _run(tmp_path, cls, args)
    assert not res.ok and not res.deadline_hit, res.summary()
    lines = _lines(res)
    assert all(lines.values()), f"every rank wrote its one line: {lines}"
    role = ("rank0", "leader", "worker")[root]
    assert f"exit=error via=own root={root}/{role}/" in lines[root] and says in lines[root]
    for r, line in lines.items():   # the others name the same root cause, or had finished
        assert (f"root={root}/{role}/" in line and says in line) or " exit=ok " in line, \
            (r, line)
    assert res.all_exited_after(res.start_time) < DEADLINE_S
    rep = conform(out)
    text = format_report(rep)
    assert rep.ok, text            # the traces are the model's, to the failure
    assert says.split(":")[0][:20] in text or cls == "RaisesInInit", text


GEN1 = "generator_call(call_index=1)"
# what the wrong rank's own counts say (each earlier call 1 issued one all_reduce)
EVIDENCE = {"ExtraAllReduce": f"issued an extra collective: its {GEN1} is at collective #2",
            "MissingAllReduce": f"skipped a collective: its last {GEN1} issued 0"}


def _assert_names_itself_and_is_named(lines, cls, rank, role):
    """The wrong rank is the root cause on its own line (via=own) and on every other."""
    assert f" via=own root={rank}/{role}/collective_mismatch " in lines[rank], lines[rank]
    for r, line in lines.items():
        assert f"root={rank}/{role}/collective_mismatch reason=" in line, (r, line)
        assert f"rank {rank} {EVIDENCE[cls]}, where each of its earlier calls with that " \
               f"index issued 1" in line, (r, line)


@pytest.mark.parametrize("cls, rank, sides", [
    ("ExtraAllReduce", 2, ("rank 1 in broadcast", f"rank 2 in all_reduce #2 of {GEN1}")),
    ("ExtraAllReduce", 1, (f"rank 1 in all_reduce #2 of {GEN1}", "rank 2 in broadcast")),
    ("MissingAllReduce", 2, (f"rank 1 in all_reduce #1 of {GEN1}", "rank 2 in broadcast"))])
def test_an_extra_or_a_missing_all_reduce_is_caught_where_the_mesh_ranks_parted(
        plugins, tmp_path, cls, rank, sides):
    """One rank issues one all_reduce more (or less) than the other in generator call 1
    of chunk 1: each then waits in a collective the other never joins at that place, and
    no row sees it (the workload's all_reduces are inside one row). The watchdogs compare
    the collective each rank has waited in (its number on mesh_pg and its name), so the
    run fails at once, every rank naming both sides, long before the 20 s op deadline
    (before, the first rank to reach its deadline was the root cause). Of two members
    the waits cannot tell which is wrong; the wrong one's own counts can (each earlier
    call 1 issued one all_reduce): it names itself, and the other names it."""
    res, out = _run(tmp_path, cls, {"rank": rank}, op_deadline_s=20.0, pg_timeout_s=30.0)
    assert not res.ok and not res.deadline_hit, res.summary()
    lines = _lines(res)
    _assert_names_itself_and_is_named(lines, cls, rank, ("rank0", "leader", "worker")[rank])
    for r, line in lines.items():
        assert "/collective_mismatch reason=" in line and "OpDeadline" not in line, (r, line)
        assert all(side in line for side in sides), (r, line)
        assert "collective mismatch on mesh_pg at its collective #" in line, (r, line)
        assert "group=mesh_pg:" in line, (r, line)     # the cause names the group
    assert res.all_exited_after(res.start_time) < DEADLINE_S
    rep = conform(out)
    text = format_report(rep)
    assert rep.ok, text
    mode = next(ln for ln in text.splitlines() if ln.startswith("failure mode"))
    assert "collective_mismatch" in mode and sides[0] in mode, mode


@pytest.mark.parametrize("cls, rank, role", [("ExtraAllReduce", 3, "worker"),
                                             ("ExtraAllReduce", 1, "leader"),
                                             ("MissingAllReduce", 2, "worker")])
def test_in_a_mesh_of_three_the_rank_with_the_extra_or_missing_all_reduce_is_the_root_cause(
        plugins, tmp_path, cls, rank, role):
    """With three members the waits tell which one is wrong: the one alone in its
    collective, every other member in the same one. That rank names itself as the root
    cause (via=own, its own ids) and every other rank names it, saying what its own
    counts say; with two members the wrong one's own counts tell (the test above)."""
    res, out = _run(tmp_path, cls, {"rank": rank, "hidden": 6}, mesh=3,
                    op_deadline_s=20.0, pg_timeout_s=30.0)
    assert not res.ok and not res.deadline_hit, res.summary()
    _assert_names_itself_and_is_named(_lines(res), cls, rank, role)
    assert res.all_exited_after(res.start_time) < DEADLINE_S
    rep = conform(out)
    assert rep.ok, format_report(rep)


def test_an_op_deadline_names_its_own_group_and_where_the_rank_waited(plugins, tmp_path):
    """Rank 2 sleeps in generator call 1 past the leader's op deadline: the leader's own
    line is its OpDeadline in that all_reduce, and each failure's context names its
    op's group (it named the group the rank's other thread used last: the leader's
    deadline in a mesh_pg op said world_pg(p2p)). A slow rank is no mismatch: it waits
    in no collective, so nothing else ends the run first."""
    res, out = _run(tmp_path, "Slow", {"rank": 2, "sleep_s": 6.0}, op_deadline_s=1.5)
    assert not res.ok and not res.deadline_hit, res.summary()
    lines = _lines(res)
    assert f"OpDeadline: rank 1: all_reduce #1 of {GEN1} group=mesh_pg" in lines[1], lines[1]
    import re
    pairs = [m for line in lines.values() for m in re.findall(
        r"group=(\S+): OpDeadline: rank \d+: .*? group=(\S+) ", line)]
    assert pairs and all(c == g or (c, g) == ("world_pg(p2p)", "world_pg")
                         for c, g in pairs), pairs
    assert res.all_exited_after(res.start_time) < DEADLINE_S


def test_an_all_reduce_of_another_shape_names_gloos_own_words(plugins, tmp_path):
    """Rank 2 all_reduces a [3, 8] where rank 1 all_reduces [2, 8]: gloo aborts the
    process that receives the larger buffer (SIGABRT, a C++ check nobody catches), with
    its reason on that rank's stderr only. The root-cause line every other rank prints,
    launch.json and conform's failure mode all quote it: before, they said 'killed by
    SIGABRT' and nothing about a collective mismatch."""
    res, out = _run(tmp_path, "OtherShapeAllReduce", {"rank": 2})
    assert not res.ok and not res.deadline_hit, res.summary()
    aborted = [r.rank for r in res.ranks if r.returncode == -6]
    assert len(aborted) == 1 and aborted[0] in (1, 2), res.summary()
    gloo = "Received data size doesn't match expected size"
    said = json.loads((out / "launch.json").read_text())["last_words"][str(aborted[0])]
    assert gloo in said and "enforce fail" not in said, said
    lines = _lines(res)
    for r, line in lines.items():
        if r != aborted[0]:
            assert "killed by SIGABRT" in line and "its stderr: " in line and gloo in line, \
                (r, line)
    mode = next(ln for ln in format_report(conform(out)).splitlines()
                if ln.startswith("failure mode"))
    assert "died of SIGABRT" in mode and gloo in mode, mode


def test_ranks_running_different_workloads_fail_the_parity_handshake(plugins, tmp_path):
    """Rank 2 runs another class than ranks 0 and 1 (its own args file, as under a
    torchrun whose ranks were given different options): a collective mismatch caught
    by the parity handshake, naming the key and the rank, before any envelope."""
    from lockstep.runtime.launch import spawn_local
    (plugins / "skewed_target.py").write_text(
        "from lockstep.runtime.node import run_rank\n"
        "def run(rank, world, args):\n"
        "    if rank == 2:\n"
        "        args['opts']['workload'] = 'buggy_plugins:RaisesInBuild'\n"
        "    return run_rank(rank, world, args)\n")
    from lockstep.model.config import config_to_dict
    out = tmp_path / "skew"
    out.mkdir()
    opts = {"workload": f"{MODULE}:Good"}
    res = spawn_local(3, "skewed_target:run", {"config": config_to_dict(
        Config(mesh=2, chunks=3)), "opts": opts}, deadline_s=DEADLINE_S, run_dir=out,
        # the caller's PYTHONPATH kept: lockstep itself may be installed on it
        env={"PYTHONPATH": os.pathsep.join(
            [str(plugins)] + [p for p in [os.environ.get("PYTHONPATH")] if p])})
    assert not res.ok and not res.deadline_hit, res.summary()
    lines = _lines(res)
    assert "parity mismatch" in lines[0] and "key=workload differs on ranks [2]" in lines[0], \
        lines


def _doc_blocks(lang):
    import re
    text = (Path(__file__).resolve().parents[1] / "docs" / "plugin.md").read_text()
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def test_the_example_of_docs_plugin_md_runs_as_written(tmp_path):
    """docs/plugin.md's pipeline, saved as its first line says, and its commands, run
    as written from that directory: the run succeeds and conforms."""
    import shlex
    code = next(b for b in _doc_blocks("python") if b.startswith("# my_pipeline.py"))
    (tmp_path / "my_pipeline.py").write_text(code)
    commands = next(b for b in _doc_blocks("bash") if "my_pipeline:TinyLinear" in b)
    for line in commands.strip().splitlines():
        argv = shlex.split(line)
        assert argv[0] == "lockstep"
        p = _lockstep(argv[1:], cwd=tmp_path, timeout=DEADLINE_S + 30)
        assert p.returncode == 0, (line, p.stdout, p.stderr)
    outputs = json.loads((tmp_path / "runs" / "latest" / "outputs.json").read_text())
    assert [(c, e) for c, e, _ in outputs] == [(0, 0), (1, 0), (2, 0), (3, 0)]
    assert all(isinstance(v, float) for _, _, v in outputs)

