"""Real TVM: the demo model cut by `zpipe compile` and run as a pipeline, checked against the whole model and
onnxruntime."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("tvm")

from zpipe import ArtifactError, Pipeline, RequestFailed, Topology  # noqa: E402
from zpipe.demo import DEMO_INPUT_SHAPE, TOLERANCE, build_demo, load_whole, run_demo  # noqa: E402

pytestmark = pytest.mark.tvm


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    build_demo(out)
    return out


def test_demo_pipeline_matches_whole_model_and_onnxruntime(demo_dir):
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(demo_dir / "demo.onnx"), providers=["CPUExecutionProvider"])
    whole = load_whole(demo_dir)
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal(DEMO_INPUT_SHAPE).astype("float32") for _ in range(6)]
    with Pipeline(Topology.from_file(demo_dir / "model" / "topology.toml")) as pipe:
        futures = [pipe.submit({"x": x}) for x in xs]
        outputs = [f.result(timeout=60).outputs["y"] for f in futures]
    for x, y in zip(xs, outputs):
        assert y.shape == (1, 10) and y.dtype == np.float32
        np.testing.assert_allclose(y, session.run(None, {"x": x})[0], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(y, whole(x), atol=TOLERANCE)


def test_run_demo_report(tmp_path):
    report = run_demo(tmp_path, requests=8)
    assert report.max_abs_error <= TOLERANCE
    assert report.outputs.shape == (1, 10)
    assert len(report.latencies_s) == 8 and report.throughput_rps > 0
    assert (tmp_path / "repo" / "block1_branch0" / "1").is_dir() and (tmp_path / "repo" / "whole" / "1").is_dir()


def test_wrong_input_shape_names_stage_and_input(demo_dir):
    with Pipeline(Topology.from_file(demo_dir / "model" / "topology.toml")) as pipe:
        with pytest.raises(RequestFailed, match=r"stage 'stem'.*input 'x' expects float32\[1, 3, 32, 32\], "
                                                 r"got float64\[1, 3, 32, 32\]"):
            pipe.infer({"x": np.zeros(DEMO_INPUT_SHAPE)})
        with pytest.raises(RequestFailed, match=r"expects float32\[1, 3, 32, 32\], got float32\[2, 3\]"):
            pipe.infer({"x": np.zeros((2, 3), np.float32)})
        y = pipe.infer({"x": np.zeros(DEMO_INPUT_SHAPE, np.float32)})["y"]  # still serving
        assert y.shape == (1, 10)


def test_library_that_does_not_match_its_manifest_is_refused(demo_dir, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(demo_dir / "model", copy)
    (copy / "stages" / "stem.so").write_bytes((demo_dir / "model" / "stages" / "head.so").read_bytes())
    with pytest.raises(ArtifactError, match="does not match its manifest"):
        Topology.from_file(copy / "topology.toml")


def test_zpipe_demo_command(tmp_path):
    for _ in range(2):  # a second run into the same folder replaces the first build
        proc = subprocess.run([sys.executable, "-m", "zpipe", "demo", "--out", str(tmp_path), "--requests", "8"],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert "matches the whole model run in one process" in proc.stdout
    assert (tmp_path / "model" / "topology.toml").exists() and (tmp_path / "demo.onnx").exists()


def _export(tmp_path, name, forward):
    from tvm.relax.frontend import nn

    from zpipe.compile import export_stage

    module = type(name, (nn.Module,), {"forward": lambda self, x: forward(x)})
    mod, _ = module().export_tvm({"forward": {"x": nn.spec.Tensor((1, 4096), "float32")}})
    export_stage(mod, name=name, out_dir=tmp_path / name, function="forward", input_names=["x"], output_names=["y"])
    return tmp_path / name / f"{name}.so"


def test_tvm_stage_outputs_are_read_only_views_and_never_alias_the_next_input(tmp_path):
    from stages.tvm import TvmStage

    affine = TvmStage(library=str(_export(tmp_path, "affine", lambda x: x * 2.0 + 1.0)))
    identity = TvmStage(library=str(_export(tmp_path, "identity", lambda x: x)))
    for stage in (affine, identity):
        stage.setup()
    ones, twos = np.ones((1, 4096), np.float32), np.full((1, 4096), 2, np.float32)

    y = affine.process({"x": ones})["y"]
    assert not y.flags.writeable and not y.flags.owndata  # the VM's own tensor, not a copy
    affine.process({"x": twos})
    assert np.array_equal(y, np.full((1, 4096), 3, np.float32))  # a later request left it alone

    # A model that returns its input returns the stage's staging buffer: that one must be copied.
    first = identity.process({"x": ones})["y"]
    identity.process({"x": twos})
    assert np.array_equal(first, ones)
