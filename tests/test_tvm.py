"""Real TVM: the demo model's stages compiled and run as a pipeline, checked against the whole model and numpy."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("tvm")

from zpipe import ArtifactError, Pipeline, RequestFailed, Topology  # noqa: E402
from zpipe.demo import DEMO_INPUT_SHAPE, TOLERANCE, _weights, build_demo, run_demo  # noqa: E402

pytestmark = pytest.mark.tvm


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    build_demo(out, seed=0)
    return out


def _conv(x, w, b):
    k = w.shape[-1]
    pad = k // 2
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    h, wd = x.shape[2], x.shape[3]
    patches = np.stack([xp[:, :, i:i + h, j:j + wd] for i in range(k) for j in range(k)], axis=-1)
    return np.einsum("ncHWk,ock->noHW", patches, w.reshape(w.shape[0], w.shape[1], k * k)) + b[None, :, None, None]


def numpy_demo(x, p):
    relu = lambda z: np.maximum(z, 0)  # noqa: E731
    h = relu(_conv(x, p["stem.conv.weight"], p["stem.conv.bias"]))
    a = relu(_conv(relu(_conv(h, p["branch_a.conv1.weight"], p["branch_a.conv1.bias"])),
                   p["branch_a.conv2.weight"], p["branch_a.conv2.bias"]))
    b = relu(_conv(h, p["branch_b.conv.weight"], p["branch_b.conv.bias"]))
    z = relu(_conv(np.concatenate([a, b], axis=1), p["head.conv.weight"], p["head.conv.bias"]))
    return z.max(axis=(2, 3)) @ p["head.fc.weight"].T + p["head.fc.bias"]


def test_demo_pipeline_matches_whole_model_and_numpy(demo_dir):
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal(DEMO_INPUT_SHAPE).astype("float32") for _ in range(6)]
    weights = _weights(0)
    with Pipeline(Topology.from_file(demo_dir / "topology.toml")) as pipe:
        futures = [pipe.submit({"x": x}) for x in xs]
        outputs = [f.result(timeout=60).outputs["y"] for f in futures]
    for x, y in zip(xs, outputs):
        assert y.shape == (1, 10) and y.dtype == np.float32
        np.testing.assert_allclose(y, numpy_demo(x.astype(np.float64), weights), atol=1e-4, rtol=1e-4)


def test_run_demo_report(tmp_path):
    report = run_demo(tmp_path, requests=8)
    assert report.max_abs_error <= TOLERANCE
    assert report.outputs.shape == (1, 10)
    assert len(report.latencies_s) == 8 and report.throughput_rps > 0


def test_wrong_input_shape_names_stage_and_input(demo_dir):
    with Pipeline(Topology.from_file(demo_dir / "topology.toml")) as pipe:
        with pytest.raises(RequestFailed, match=r"stage 'stem'.*input 'x' expects float32\[1, 3, 32, 32\], "
                                                 r"got float64\[1, 3, 32, 32\]"):
            pipe.infer({"x": np.zeros(DEMO_INPUT_SHAPE)})
        with pytest.raises(RequestFailed, match=r"expects float32\[1, 3, 32, 32\], got float32\[2, 3\]"):
            pipe.infer({"x": np.zeros((2, 3), np.float32)})
        y = pipe.infer({"x": np.zeros(DEMO_INPUT_SHAPE, np.float32)})["y"]  # still serving
        assert y.shape == (1, 10)


def test_library_that_does_not_match_its_manifest_is_refused(demo_dir, tmp_path):
    (tmp_path / "stem.so").write_bytes((demo_dir / "head.so").read_bytes())
    (tmp_path / "stem.json").write_text((demo_dir / "stem.json").read_text())
    text = (demo_dir / "topology.toml").read_text()
    for name in ("branch_a", "branch_b", "head"):
        text = text.replace(f'"{name}.so"', f'"{demo_dir / (name + ".so")}"')
    (tmp_path / "topology.toml").write_text(text)
    with pytest.raises(ArtifactError, match="does not match its manifest"):
        Topology.from_file(tmp_path / "topology.toml")


def test_zpipe_demo_command(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "zpipe", "demo", "--out", str(tmp_path), "--requests", "8"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "matches the whole model run in one process" in proc.stdout
    assert (tmp_path / "topology.toml").exists() and (tmp_path / "stem.so").exists()
