"""`zpipe compile` / `zpipe inspect`: ONNX models built in code, cut at their branch points, compiled with TVM.

onnxruntime on the whole model is the oracle. Tolerance: |zpipe - onnxruntime| <= 1e-5 + 1e-5·|onnxruntime|
(fp32; measured differences are 1e-7..3e-7). Cut ONNX stages chained in onnxruntime must match the whole model
to 1e-6 (same kernels, same order).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

import compile_models as cm
from zpipe import ArtifactError, Manifest, Pipeline, Topology
from zpipe.compile import CompileError, CompileOptions, TuningOptions, compile_model, parse_target, plan_model
from zpipe.compile.cut import stage_model
from zpipe.compile.graph import load_model
from zpipe.compile.plan import make_plan

ort = pytest.importorskip("onnxruntime")

TOL = dict(rtol=1e-5, atol=1e-5)


def save(tmp_path: Path, model, name: str | None = None) -> Path:
    path = tmp_path / f"{name or model.graph.name}.onnx"
    onnx.save(model, path)
    return path


def run_ort(model, feeds: dict) -> dict:
    data = model.SerializeToString() if not isinstance(model, (str, Path)) else str(model)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    wanted = {i.name: feeds[i.name] for i in session.get_inputs()}
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, wanted)))


def chain_stages_in_ort(graph, plan, feeds: dict) -> dict:
    """Run the cut stages one after the other in onnxruntime; a gate picks its branch from the control value."""
    env = dict(feeds)
    gates = {g.then_stage: g for g in plan.gates} | {g.else_stage: g for g in plan.gates}
    for stage in plan.stages:
        gate = gates.get(stage.name)
        if gate is not None and bool(np.asarray(env[gate.control]).reshape(-1)[0]) != (stage.role == "then"):
            continue
        env.update(run_ort(stage_model(graph, stage), env))
    return env


# -- analysis and cutting (no TVM) --------------------------------------------------------------------------------
def test_plan_finds_branches_and_keeps_the_residual_block_whole(tmp_path):
    path = save(tmp_path, cm.inception())
    plan = plan_model(path)
    assert [(s.name, s.role) for s in plan.stages] == [
        ("stem", "chain"), ("block1_branch0", "branch"), ("block1_branch1", "branch"), ("block1_branch2", "branch"),
        ("head", "chain")]
    residual, inception = plan.blocks
    assert not residual.split and residual.reason.startswith("residual") and residual.join == "r.sum"
    names = {n.index: n.name for n in load_model(path).nodes}
    assert set(residual.branches[0]) == {"r1.conv", "r1", "r2", "r.sum"}
    assert set(residual.branches[0]) <= {names[i] for i in plan.stage("stem").nodes}
    assert inception.split and inception.entry == ("r",) and inception.join == "cat"
    assert plan.stage("head").inputs == ("a", "b", "c", "r")  # the residual add reads r from the stem
    forks = {f.tensor: f.join for f in plan.forks}
    assert forks == {"h": "r.sum", "r": "cat"}
    crossing = {(e.producer, e.consumer, e.tensor): e.info.nbytes for e in plan.edges}
    assert crossing[("stem", "block1_branch1", "r")] == 8 * 16 * 16 * 4


@pytest.mark.parametrize("build, options", [
    (cm.chain, dict(cuts=("h1", "p"))),
    (cm.two_branch, {}),
    (cm.inception, {}),
    (cm.inception, dict(max_stages=3)),
    (cm.torch_style, {}),
])
def test_cut_stages_chained_in_onnxruntime_match_the_whole_model(tmp_path, build, options):
    path = save(tmp_path, build())
    graph = load_model(path)
    plan = make_plan(graph, **options)
    (name,), (out,) = graph.inputs, graph.outputs
    feeds = {name: cm.inputs(1)}
    env = chain_stages_in_ort(graph, plan, feeds)
    np.testing.assert_allclose(env[out], run_ort(path, feeds)[out], rtol=1e-6, atol=1e-6)
    for stage in plan.stages:  # each stage is a valid ONNX model keeping the model's tensor names
        model = stage_model(graph, stage)
        assert [i.name for i in model.graph.input] == list(stage.inputs)
        assert [o.name for o in model.graph.output] == list(stage.outputs)
    if "max_stages" in options:
        assert len(plan.stages) == 3


@pytest.mark.parametrize("build", [cm.gated, cm.computed_condition])
@pytest.mark.parametrize("x_seed", [0, 1, 2])
def test_gated_cut_picks_one_branch_and_matches_the_whole_model(tmp_path, build, x_seed):
    path = save(tmp_path, build())
    graph = load_model(path)
    plan = make_plan(graph)
    (gate,) = plan.gates
    assert (gate.name, gate.then_stage, gate.else_stage, gate.select) == ("gate", "then_branch", "else_branch",
                                                                          "select")
    x = cm.inputs(x_seed, shape=graph.tensors["x"].shape)
    for offload in (True, False):
        feeds = {"x": x, "offload": np.array(offload)}
        env = chain_stages_in_ort(graph, plan, feeds)
        np.testing.assert_allclose(env["y"], run_ort(path, feeds)["y"], rtol=1e-6, atol=1e-6)
    if build is cm.computed_condition:  # X is computed in the model: a stage before the gate outputs it
        assert gate.control == "X" and any("X" in s.outputs for s in plan.stages)


def test_whole_keeps_one_stage_with_the_if_and_its_outer_scope_weights(tmp_path):
    path = save(tmp_path, cm.gated())
    graph = load_model(path)
    plan = make_plan(graph, whole=True)
    assert [s.name for s in plan.stages] == ["model"] and not plan.gates
    model = stage_model(graph, plan.stages[0])  # the stock Extractor drops weights read only inside the If body
    names = {t.name for t in model.graph.initializer}
    assert {"a1.w", "heavy.w"} <= names
    for offload in (True, False):
        feeds = {"x": cm.inputs(3, shape=(1, 3, 32, 32)), "offload": np.array(offload)}
        np.testing.assert_allclose(run_ort(model, feeds)["y"], run_ort(path, feeds)["y"], rtol=1e-6, atol=1e-6)


def test_bad_cuts_name_the_tensor_and_suggest_close_names(tmp_path):
    chain = save(tmp_path, cm.chain())
    with pytest.raises(CompileError, match=r"no tensor 'h3'; close names: 'h2', 'h1'"):
        plan_model(chain, CompileOptions(cuts=("h3",)))
    with pytest.raises(CompileError, match="'x' is a model input"):
        plan_model(chain, CompileOptions(cuts=("x",)))
    with pytest.raises(CompileError, match="'h1.w' is a constant"):
        plan_model(chain, CompileOptions(cuts=("h1.w",)))
    with pytest.raises(CompileError, match="inside the body of node 'u'"):
        plan_model(save(tmp_path, cm.gated()), CompileOptions(cuts=("a1",)))
    plan = plan_model(chain, CompileOptions(cuts=("y",)))
    assert "already a stage boundary" in plan.notes[0]


def test_dynamic_shapes_need_a_shape_option(tmp_path):
    path = save(tmp_path, cm.chain(batch_dim="N"))
    with pytest.raises(CompileError, match=r"input 'x' has a dynamic shape \['N', 3, 16, 16\].*--shape x=1,3,16,16"):
        plan_model(path)
    plan = plan_model(path, CompileOptions(shapes={"x": (1, 3, 16, 16)}, cuts=("h2",)))
    assert plan.edges[1].info.shape == (1, 8, 16, 16)
    with pytest.raises(CompileError, match="has no input 'image'"):
        plan_model(path, CompileOptions(shapes={"image": (1, 3, 16, 16)}))


def test_files_that_are_not_onnx_models(tmp_path):
    (tmp_path / "text.onnx").write_text("hello, not a model")
    with pytest.raises(ArtifactError, match="is not an ONNX model"):
        plan_model(tmp_path / "text.onnx")
    with pytest.raises(ArtifactError, match="does not exist"):
        plan_model(tmp_path / "missing.onnx")


def test_inspect_prints_the_plan_without_compiling(tmp_path):
    path = save(tmp_path, cm.two_branch())
    proc = subprocess.run([sys.executable, "-m", "zpipe", "inspect", str(path)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "fork 'h' read by 2 nodes" in proc.stdout and "joined at 'm'" in proc.stdout
    assert "block1_branch0" in proc.stdout and "Conv×2" in proc.stdout
    assert "stem -> block1_branch1" in proc.stdout and "8.0 KiB" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "zpipe", "inspect", str(path), "--json", "--cut", "nope"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == CompileError.exit_code and "no tensor 'nope'" in proc.stderr
    doc = json.loads(subprocess.run([sys.executable, "-m", "zpipe", "inspect", str(path), "--json"],
                                    capture_output=True, text=True, timeout=60, check=True).stdout)
    assert [s["name"] for s in doc["stages"]] == ["stem", "block1_branch0", "block1_branch1", "head"]
    assert {c["bytes"] for c in doc["cuts"] if c["tensor"] == "h"} == {8 * 16 * 16 * 4}


# -- TVM: compiled stages against onnxruntime ----------------------------------------------------------------------
tvm_only = pytest.mark.tvm


def check_stages_alone(report, feeds: dict) -> None:
    """Each compiled stage alone matches onnxruntime on its own ONNX model, fed by onnxruntime's upstream values."""
    from zpipe.tvm_runtime import import_tvm, load_vm

    tvm = import_tvm()
    env = dict(feeds)
    for build in report.builds:
        stage_onnx = build.manifest.with_suffix(".onnx")
        manifest = Manifest.load(build.manifest)
        if not all(t.name in env for t in manifest.inputs):
            continue  # a gate branch that did not run for these inputs
        expected = run_ort(stage_onnx, env)
        vm = load_vm(str(build.library))
        out = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(env[t.name])) for t in manifest.inputs])
        values = [out] if len(manifest.outputs) == 1 else list(out)
        for spec, value in zip(manifest.outputs, values):
            np.testing.assert_allclose(value.numpy(), expected[spec.name], **TOL, err_msg=build.name)
        env.update(expected)


@tvm_only
@pytest.mark.parametrize("build, options, stages", [
    (cm.chain, CompileOptions(cuts=("h1", "p")), ["stem", "chain1", "head"]),
    (cm.two_branch, CompileOptions(), ["stem", "block1_branch0", "block1_branch1", "head"]),
    (cm.inception, CompileOptions(), ["stem", "block1_branch0", "block1_branch1", "block1_branch2", "head"]),
    (cm.torch_style, CompileOptions(), ["stem", "block1_branch0", "block1_branch1", "head"]),
])
def test_compiled_pipeline_matches_onnxruntime(tmp_path, build, options, stages):
    path = save(tmp_path, build())
    report = compile_model(path, tmp_path / "out", options)
    assert [b.name for b in report.builds] == stages
    (name,), (out,) = report.plan.inputs, report.plan.outputs
    xs = [cm.inputs(seed) for seed in range(3)]
    with Pipeline(Topology.from_file(report.topology)) as pipe:
        results = [f.result(timeout=60) for f in [pipe.submit({name: x}) for x in xs]]
    for x, result in zip(xs, results):
        np.testing.assert_allclose(result.outputs[out], run_ort(path, {name: x})[out], **TOL)
    if build is cm.two_branch:  # both branches ran for every request
        assert {"block1_branch0", "block1_branch1"} <= set(results[0].stage_times)
    check_stages_alone(report, {name: xs[0]})
    manifest = json.loads(report.builds[0].manifest.read_text())
    assert manifest["source_sha256"] == report.plan.source_sha256 and len(manifest["onnx_sha256"]) == 64
    assert Manifest.load(report.builds[0].manifest).library_sha256


@tvm_only
@pytest.mark.parametrize("build", [cm.gated, cm.computed_condition])
def test_gated_pipeline_runs_only_the_chosen_branch(tmp_path, build):
    from zpipe.stage import resolve_kind

    path = save(tmp_path, build())
    report = compile_model(path, tmp_path / "out")
    text = report.topology.read_text()
    assert 'kind = "gate"' in text and 'op = "select"' in text and 'inputs = { h = "h@then" }' in text
    try:
        resolve_kind("gate")
    except Exception:  # noqa: BLE001 - any failure means the kind is not there
        pytest.skip("gate kind not landed yet")
    shape = load_model(path).tensors["x"].shape
    gated_input = build is cm.gated
    cases = [(cm.inputs(seed, shape=shape), offload) for seed in (0, 1) for offload in (True, False)]
    with Pipeline(Topology.from_file(report.topology)) as pipe:
        for x, offload in cases:
            if not gated_input:  # X = mean(x) > 0: choose x's sign to pick the branch
                x = np.abs(x) if offload else -np.abs(x)
            feeds = {"x": x, "offload": np.array(offload)} if gated_input else {"x": x}
            result = pipe.submit(feeds).result(timeout=60)
            np.testing.assert_allclose(result.outputs["y"], run_ort(path, feeds)["y"], **TOL)
            ran = set(result.stage_times)
            assert ("then_branch" in ran, "else_branch" in ran) == (offload, not offload), ran
    check_stages_alone(report, {"x": cases[0][0], "offload": np.array(True)} if gated_input else {"x": cases[0][0]})


@tvm_only
def test_cli_compile_then_zpipe_run(tmp_path):
    path = save(tmp_path, cm.two_branch())
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "zpipe", "compile", str(path), "-o", str(out), "--stages", "3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "compiled head" in proc.stdout and f"zpipe run {out / 'topology.toml'}" in proc.stdout
    x = cm.inputs(7)
    np.savez(tmp_path / "in.npz", x=x)
    proc = subprocess.run([sys.executable, "-m", "zpipe", "run", str(out / "topology.toml"), "--inputs",
                           str(tmp_path / "in.npz"), "--out", str(tmp_path / "y.npz")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    with np.load(tmp_path / "y.npz") as got:
        np.testing.assert_allclose(got["y"], run_ort(path, {"x": x})["y"], **TOL)


@tvm_only
def test_failed_compiles_leave_nothing_behind(tmp_path):
    out = tmp_path / "out"
    bad = save(tmp_path, cm.unsupported_op())
    with pytest.raises(CompileError, match=r"stage 'model': node 'celu' \(op 'Celu', top level\) cannot be imported"):
        compile_model(bad, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unsupported.onnx"]  # no OUT, no temporary folder
    chain = save(tmp_path, cm.chain())
    compile_model(chain, out)
    before = {p.name: p.stat().st_mtime_ns for p in (out / "stages").iterdir()}
    with pytest.raises(ArtifactError, match=r"holds the build of another model .*chain\.onnx'.*--force"):
        compile_model(save(tmp_path, cm.two_branch()), out)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "stages").iterdir()} == before
    compile_model(chain, out, CompileOptions(cuts=("h2",)))  # the same model: replaced
    assert sorted(p.name for p in (out / "stages").glob("*.so")) == ["head.so", "stem.so"]
    compile_model(tmp_path / "two_branch.onnx", out, CompileOptions(force=True))
    assert json.loads((out / "build.json").read_text())["plan"]["model"] == "two_branch"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="holds no zpipe build record"):
        compile_model(chain, tmp_path / "mine", CompileOptions(force=True))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@tvm_only
def test_placement_hosts_and_targets(tmp_path):
    path = save(tmp_path, cm.two_branch())
    options = CompileOptions(placements={"block1_branch0": "edge1"}, hosts={"edge1": "tcp://10.0.0.2:5555"})
    report = compile_model(path, tmp_path / "out", options)
    topology = Topology.from_file(report.topology)
    assert topology.stage("block1_branch0").host == "edge1" and topology.stage("head").host == "device"
    assert topology.hosts[0].endpoint == "tcp://10.0.0.2:5555"
    with pytest.raises(CompileError, match=r"no stage 'branch0'"):
        plan_model(path, CompileOptions(placements={"branch0": "device"}))
    with pytest.raises(CompileError, match=r"host 'edge2' .* add --host edge2="):
        plan_model(path, CompileOptions(placements={"head": "edge2"}))
    with pytest.raises(CompileError, match="not 'llvm', 'cuda' or an LLVM target triple"):
        parse_target("gpu!")
    with pytest.raises(CompileError, match=r"needs a C\+\+ cross compiler.*'aarch64-linux-gnu-g\+\+' was not found"):
        parse_target("aarch64-linux-gnu", cc="aarch64-linux-gnu-g++")
    from zpipe.tvm_runtime import import_tvm, load_vm

    # The cross-compiling path, with a "cross" compiler for this very machine, so the library can be checked here.
    chain = save(tmp_path, cm.chain())
    cross = compile_model(chain, tmp_path / "cross", CompileOptions(whole=True, target=parse_target(
        "x86_64-linux-gnu", cc="g++")))
    assert '"mtriple":"x86_64-linux-gnu"' in Manifest.load(cross.builds[0].manifest).target
    x = cm.inputs(4)
    y = load_vm(str(cross.builds[0].library))["main"](import_tvm().runtime.tensor(x)).numpy()
    np.testing.assert_allclose(y, run_ort(chain, {"x": x})["y"], **TOL)
    if not import_tvm().cuda(0).exist:
        with pytest.raises(CompileError, match="no CUDA GPU is present"):
            compile_model(path, tmp_path / "cuda", CompileOptions(target=parse_target("cuda")))
        assert not (tmp_path / "cuda").exists()


@tvm_only
def test_tuning_database_is_reused(tmp_path):
    """Cold: every task is tuned (in a child process). Warm: every task comes from the database, nothing is
    tuned, the tuned schedules are applied, and the compile takes a fraction of the time. Another model sharing
    layer shapes finds those tasks cached. A timeout kills the tuning and leaves no output."""
    path = save(tmp_path, cm.chain())
    events = []
    options = CompileOptions(tuning=TuningOptions(trials=3, database_root=tmp_path / "db", timeout_s=120))
    started = time.monotonic()
    cold = compile_model(path, tmp_path / "cold", options, progress=events.append)
    cold_s = time.monotonic() - started
    (stage,) = cold.tuning
    assert stage.tasks >= 3 and stage.cached == 0 and stage.tuned == stage.tasks and stage.trials >= stage.tasks
    assert stage.applied >= 2  # tasks with a successful measurement (a conv never fails to build)
    assert any(e.startswith("tuning model: ") and "trials" in e for e in events)
    started = time.monotonic()
    warm = compile_model(path, tmp_path / "warm", options)
    warm_s = time.monotonic() - started
    (again,) = warm.tuning
    assert (again.cached, again.tuned, again.trials, again.applied) == (stage.tasks, 0, 0, stage.applied)
    assert warm_s < cold_s / 2, (warm_s, cold_s)
    x = cm.inputs(2)
    with Pipeline(Topology.from_file(warm.topology)) as pipe:
        np.testing.assert_allclose(pipe.infer({"x": x})["y"], run_ort(path, {"x": x})["y"], **TOL)
    # another model with layers of the same shapes (two_branch's stem and a-branch convs are chain's convs)
    from zpipe.compile import tuning

    target = parse_target("llvm").tvm_target()
    directory = tuning.database_dir(tmp_path / "db", target)
    database, ledger = tuning.open_database(directory), tuning.read_ledger(directory)
    other = load_model(save(tmp_path, cm.two_branch()))
    tasks = tuning.stage_tasks(tuning.tuning_module(stage_model(other, make_plan(other, whole=True).stages[0])),
                               target)
    pending = tuning.pending_tasks(tasks, database, ledger, tuning.task_budget(3, len(tasks)))
    assert 2 <= len(tasks) - len(pending) < len(tasks)
    tight = CompileOptions(tuning=TuningOptions(trials=64, database_root=tmp_path / "db2", timeout_s=1))
    with pytest.raises(CompileError, match="did not finish within 1 s"):
        compile_model(path, tmp_path / "late", tight)
    assert not (tmp_path / "late").exists()


@tvm_only
def test_example_compiles_the_demo_models_and_checks_itself(tmp_path):
    example = Path(__file__).resolve().parents[1] / "examples" / "compile_onnx.py"
    proc = subprocess.run([sys.executable, str(example), str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "offload=0" in proc.stdout and "ok: both models match onnxruntime" in proc.stdout
