"""Compile the demo CNN from ONNX with `zpipe compile`, run the stages as a pipeline, check against onnxruntime.

    python examples/compile_onnx.py [OUT_DIR]

Builds two ONNX models in code (zpipe.compile.models): the branchy demo CNN and its gated variant (an `If` on the
input `offload`), cuts and compiles each into OUT_DIR/<model>/, runs the generated topology, and asserts that every
output matches onnxruntime on the whole model (|diff| <= 1e-5 + 1e-5·|ref|). Needs onnxruntime (pip install
onnxruntime).
"""

import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from zpipe import Pipeline, Topology
from zpipe.compile import compile_model
from zpipe.compile.models import DEMO_INPUT_SHAPE, demo_model, gated_demo_model
from zpipe.compile.report import format_bytes


def check(model_path: Path, out_dir: Path, feeds_list: list[dict]) -> None:
    report = compile_model(model_path, out_dir)
    plan = report.plan
    hops = sum(e.info.nbytes or 0 for e in plan.edges if not e.producer.startswith("<")
               and not e.consumer.startswith("<"))
    print(f"{model_path.name}: {len(plan.stages)} stages {[s.name for s in plan.stages]}, "
          f"{len(plan.gates)} gates, {format_bytes(hops)} over all hops; compiled in {report.seconds:.1f} s")
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    with Pipeline(Topology.from_file(report.topology)) as pipe:
        for feeds in feeds_list:
            result = pipe.submit(feeds).result(timeout=60)
            expected = session.run(None, feeds)[0]
            np.testing.assert_allclose(result.outputs["y"], expected, rtol=1e-5, atol=1e-5)
            error = float(np.abs(result.outputs["y"] - expected).max())
            label = f"offload={int(feeds['offload'])}" if "offload" in feeds else "request"
            ran = " ".join(f"{name} {1000 * (end - start):.2f} ms"
                           for name, (start, end) in sorted(result.stage_times.items(), key=lambda kv: kv[1][0]))
            print(f"  {label}: max |pipeline - onnxruntime| = {error:.1e}; ran: {ran}")


def main(out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(DEMO_INPUT_SHAPE).astype(np.float32)
    onnx.save(demo_model(), out / "demo.onnx")
    onnx.save(gated_demo_model(), out / "gated_demo.onnx")
    check(out / "demo.onnx", out / "demo", [{"x": x}])
    check(out / "gated_demo.onnx", out / "gated_demo",
          [{"x": x, "offload": np.array(True)}, {"x": x, "offload": np.array(False)}])
    print(f"ok: both models match onnxruntime; run one again with: zpipe run {out / 'demo' / 'topology.toml'} "
          "--inputs IN.npz")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="zpipe-compile-example-"))
