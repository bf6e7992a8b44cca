"""Embedding zpipe in an app: build a pipeline in code, submit requests (sync, futures, asyncio), shut down.

    python examples/embed_basic.py

Checks its own results and exits non-zero if anything is off.
"""

import asyncio

import numpy as np

from zpipe import MergeStage, Pipeline, PythonStage, RequestFailed, Stage, StageSpec, Topology


class Normalise(Stage):
    """A user stage: setup() runs once in the worker process; process() per request."""

    input_names = ("x",)
    output_names = ("z",)

    def __init__(self, *, eps: float = 1e-6) -> None:
        self.eps = eps  # configuration only: the constructor runs in the parent

    def setup(self) -> None:
        self.calls = 0  # per-process state lives here

    def process(self, inputs):
        self.calls += 1
        x = inputs["x"]
        return {"z": (x - x.mean()) / (x.std() + self.eps)}


def square(inputs):
    return inputs["z"] ** 2


def negate(inputs):
    return -inputs["z"]


def check_positive(inputs):
    if inputs["x"].min() < 0:
        raise ValueError("negative input")
    return inputs["x"]


topology = Topology(name="embed-demo", inputs=["x"], outputs=["y"], stages=[
    StageSpec(name="check", stage=PythonStage(function=check_positive), inputs=["x"], outputs={"x": "checked"}),
    StageSpec(name="norm", stage=Normalise(), inputs={"x": "checked"}, outputs=["z"]),
    StageSpec(name="square", stage=PythonStage(function=square), inputs=["z"], outputs=["sq"]),
    StageSpec(name="negate", stage=PythonStage(function=negate), inputs=["z"], outputs=["neg"]),
    StageSpec(name="join", stage=MergeStage(op="add"), inputs=["sq", "neg"], outputs=["y"]),
])


def reference(x):
    z = (x - x.mean()) / (x.std() + 1e-6)
    return z ** 2 - z


def main() -> None:
    rng = np.random.default_rng(0)
    xs = [rng.random(16) for _ in range(50)]
    with Pipeline(topology) as pipe:
        # 1. blocking call
        np.testing.assert_allclose(pipe.infer({"x": xs[0]})["y"], reference(xs[0]))
        # 2. many requests in flight: futures
        futures = [pipe.submit({"x": x}) for x in xs]
        for x, future in zip(xs, futures):
            result = future.result()
            np.testing.assert_allclose(result.outputs["y"], reference(x))
        print(f"50 pipelined requests ok; last latency {result.latency_s * 1000:.2f} ms; "
              f"stages ran at {sorted(result.stage_times)}")
        # 3. asyncio
        async def run_async():
            return await asyncio.gather(*(pipe.infer_async({"x": x}) for x in xs[:10]))
        for x, r in zip(xs, asyncio.run(run_async())):
            np.testing.assert_allclose(r.outputs["y"], reference(x))
        # 4. a failing request names the stage, and the pipeline keeps serving
        try:
            pipe.infer({"x": -np.ones(16)})
            raise SystemExit("expected a failure")
        except RequestFailed as exc:
            assert exc.stage == "check", exc
            print(f"failure reported as expected: {exc}")
        np.testing.assert_allclose(pipe.infer({"x": xs[1]})["y"], reference(xs[1]))
        stats = pipe.stats()
    assert stats["submitted"] == stats["ok"] + stats["failed"], stats
    print(f"accounting: {stats}")


if __name__ == "__main__":
    main()
