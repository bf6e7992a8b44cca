"""A model cut into 46 stages, run in a few worker processes (stage groups), checked against onnxruntime.

    python examples/many_stages.py [OUT_DIR]

Builds an Inception-style ONNX net in code (9 four-way blocks), lets `zpipe compile` cut it at every branch point
and compile each stage with TVM, then runs the topology it wrote. `zpipe compile` groups the stages into one worker
process per CPU core (chains share a process, parallel branches are spread over the processes), so the pipeline
starts in about the time of one `import tvm`, not 46 of them. Prints the grouping and the time to the first result.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from zpipe import Pipeline, Topology
from zpipe.compile import CompileOptions, compile_model
from zpipe.compile.models import inception_net


def main(out: Path) -> None:
    onnx.save(inception_net(blocks=9, branches=4), out / "inception.onnx")
    report = compile_model(out / "inception.onnx", out / "build", CompileOptions(force=True))
    topology = Topology.from_file(report.topology)
    print(topology.grouping().explain(topology))

    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    started = time.monotonic()
    with Pipeline(topology) as pipe:
        y = pipe.infer({"x": x})["y"]
        print(f"{len(topology.stages)} stages: first result {time.monotonic() - started:.2f} s after start")
        latencies = [pipe.submit({"x": x}).result().latency_s for _ in range(20)]
    print(f"one request at a time: p50 {np.median(latencies) * 1000:.1f} ms")

    import onnxruntime

    session = onnxruntime.InferenceSession(str(out / "inception.onnx"), providers=["CPUExecutionProvider"])
    (expected,) = session.run(None, {"x": x})
    error = float(np.max(np.abs(y - expected)))
    print(f"max |zpipe - onnxruntime| = {error:.2e}")
    if error > 1e-4:
        raise SystemExit("the pipeline's output differs from onnxruntime's")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory(prefix="zpipe-many-stages-") as tmp:
            main(Path(tmp))
