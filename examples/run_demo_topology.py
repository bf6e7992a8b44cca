"""Compile the demo CNN's stages with TVM, run them as a pipeline from Python, compare with the whole model.

    python examples/run_demo_topology.py [OUT_DIR]
"""

import sys
import tempfile

import numpy as np

from zpipe import Pipeline, Topology
from zpipe.demo import DEMO_INPUT_SHAPE, TOLERANCE, build_demo
from zpipe.tvm_runtime import import_tvm, load_vm


def main(out_dir: str) -> None:
    topology_path = build_demo(out_dir)
    tvm = import_tvm()
    whole = load_vm(f"{out_dir}/whole.so")
    x = np.random.default_rng(1).standard_normal(DEMO_INPUT_SHAPE).astype("float32")
    expected = whole["forward"](tvm.runtime.tensor(x)).numpy()
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
