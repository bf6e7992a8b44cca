"""The embedded default: a small branchy CNN built in code as ONNX, cut by `zpipe compile`, run as a pipeline here.

    x ─ stem ─┬─ block1_branch0 (2× conv3x3+relu) ───────────┐
              ├─ block1_branch1 (conv1x1+relu) ──────────────┼─ head (concat, conv1x1, max pool, gemm) ─ y
              └─ block1_branch2 (maxpool3x3, conv1x1+relu) ──┘

The model is ``zpipe.compile.models.demo_model`` (fixed random weights from a seed; no downloads). :func:`build_demo`
writes it to ``OUT/demo.onnx``, compiles it cut at its branch points (``OUT/model/``: stages and a topology) and
whole (``OUT/whole/``: the reference), and lays the stages out as an edge server's repository (``OUT/repo/``).
:func:`run_demo` runs the topology (its stages grouped into worker processes so that branches run in parallel),
and checks every output against the whole model run in this process.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ZpipeError
from .pipeline import Pipeline
from .topology import Topology
from .tvm_runtime import import_tvm, load_vm

__all__ = ["build_demo", "run_demo", "load_whole", "DemoReport", "DEMO_INPUT_SHAPE", "TOLERANCE", "BRANCHES"]

DEMO_INPUT_SHAPE = (1, 3, 32, 32)
TOLERANCE = 1e-4  # max |pipeline - whole model|, fp32; the stages fuse differently from the whole model
BRANCHES = ("block1_branch0", "block1_branch1", "block1_branch2")


def build_demo(out_dir: str | Path, **model_options: int) -> Path:
    """Compile the demo model into ``out_dir`` (cut and whole) and return the path of its topology file.

    ``model_options`` (width, size, depth) go to :func:`zpipe.compile.models.demo_model`.
    """
    import onnx

    from .compile import CompileOptions, compile_model
    from .compile.models import demo_model

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = out_dir / "demo.onnx"
    onnx.save(demo_model(**model_options), model)
    cut = compile_model(model, out_dir / "model", CompileOptions(force=True))
    whole = compile_model(model, out_dir / "whole", CompileOptions(whole=True, force=True))
    for build in (*cut.builds, *whole.builds):
        name = "whole" if build in whole.builds else build.name
        version_dir = out_dir / "repo" / name / "1"
        if version_dir.exists():
            shutil.rmtree(version_dir)
        version_dir.mkdir(parents=True)
        shutil.copy(build.library, version_dir / build.library.name)
        shutil.copy(build.manifest, version_dir / build.manifest.name)
    return cut.topology


def load_whole(out_dir: str | Path):
    """The whole demo model as a callable ``f(x) -> y`` (TVM, in this process): the reference."""
    tvm = import_tvm()
    vm = load_vm(str(Path(out_dir) / "whole" / "stages" / "model.so"))
    return lambda x: vm["main"](tvm.runtime.tensor(np.ascontiguousarray(x))).numpy()


@dataclass(frozen=True)
class DemoReport:
    outputs: np.ndarray  # the first request's output
    max_abs_error: float  # over all requests, pipeline vs whole model
    latencies_s: list[float]
    branches_overlapped: int  # requests whose branches ran at the same time
    requests: int
    throughput_rps: float
    groups: dict[str, tuple[str, ...]]  # worker process (group) -> its stages


def run_demo(out_dir: str | Path, *, requests: int = 32, seed: int = 0) -> DemoReport:
    """Build the demo into ``out_dir``, run ``requests`` requests through the pipeline and check them."""
    topology_path = build_demo(out_dir)
    whole = load_whole(out_dir)
    rng = np.random.default_rng(seed + 1)
    inputs = [rng.standard_normal(DEMO_INPUT_SHAPE).astype("float32") for _ in range(requests)]
    expected = [whole(x) for x in inputs]
    topology = Topology.from_file(topology_path)
    with Pipeline(topology) as pipe:
        pipe.infer({"x": inputs[0]})  # warm-up: first calls load kernels
        # One request at a time: the latency a single caller sees, with the branches running at once.
        sequential = [pipe.submit({"x": x}).result() for x in inputs]
        # All requests in flight at once: pipelining keeps every stage busy.
        started = time.monotonic()
        futures = [pipe.submit({"x": x}) for x in inputs]
        pipelined = [f.result() for f in futures]
        elapsed = time.monotonic() - started
    errors = [float(np.max(np.abs(r.outputs["y"] - e)))
              for results in (sequential, pipelined) for r, e in zip(results, expected)]
    overlapped = sum(_overlap(r.stage_times[BRANCHES[0]], r.stage_times[BRANCHES[1]]) for r in sequential)
    report = DemoReport(outputs=sequential[0].outputs["y"], max_abs_error=max(errors),
                        latencies_s=[r.latency_s for r in sequential], branches_overlapped=overlapped,
                        requests=requests, throughput_rps=requests / elapsed,
                        groups=dict(topology.grouping().groups))
    if report.max_abs_error > TOLERANCE:
        raise ZpipeError(f"demo pipeline output differs from the whole model by {report.max_abs_error:.3g} "
                         f"(tolerance {TOLERANCE:g})")
    return report


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]
