"""Compile the demo CNN (ONNX, cut by zpipe compile), run its stages as a pipeline from Python, compare with the
whole model.

    python examples/run_demo_topology.py [OUT_DIR]
"""

import sys
import tempfile

import numpy as np

from zpipe import Pipeline, Topology
from zpipe.demo import DEMO_INPUT_SHAPE, TOLERANCE, build_demo, load_whole


def main(out_dir: str) -> None:
    topology_path = build_demo(out_dir)
    whole = load_whole(out_dir)
    x = np.random.default_rng(1).standard_normal(DEMO_INPUT_SHAPE).astype("float32")
    expected = whole(x)
    with Pipeline(Topology.from_file(topology_path)) as pipe:
        result = pipe.submit({"x": x}).result()
    error = float(np.abs(result.outputs["y"] - expected).max())
    assert error <= TOLERANCE, error
    print(f"y = {result.outputs['y'][0]}")
    print(f"max |pipeline - whole model| = {error:.2e}; latency {result.latency_s * 1000:.2f} ms")
    for stage, (start, end) in sorted(result.stage_times.items(), key=lambda kv: kv[1][0]):
        print(f"  {stage:<9} {(end - start) * 1000:7.3f} ms")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="zpipe-example-"))
