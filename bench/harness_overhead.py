"""What `zpipe bench` itself costs: the harness against a bare loop, both driving a Python echo stage.

    python bench/harness_overhead.py [--requests 3000] [--rounds 3]

Per round and per concurrency (1 and 4 in flight), a bare loop (submit, wait, repeat; or a semaphore keeping N in
flight; no bookkeeping) and the harness (zpipe.loadtest.run_load, closed loop) each send the same number of
requests to one running pipeline, interleaved. Reported: medians over rounds of p50 latency and throughput, their
ratios (harness / bare), and the harness's own per-request figure (its latency minus the latency the pipeline
reports for the same request). The harness is a client only, so its cost lands on the submitting side. Last, the
harness's own CPU time per request, driving a target whose futures are already resolved (no pipeline at all).
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import numpy as np

from concurrent.futures import Future

from zpipe import Pipeline, PythonStage, Result, StageSpec, Topology
from zpipe.loadtest import LoadConfig, run_load

X = {"x": np.zeros(16, dtype=np.float32)}


def echo(inputs):
    return inputs["x"]


def bare(pipe: Pipeline, n: int, concurrency: int) -> tuple[float, float]:
    """(p50 latency ms, throughput req/s) of a loop with no bookkeeping but one timestamp pair per request."""
    slots = threading.Semaphore(concurrency)
    lat = [0.0] * n

    def done(i: int, t0: float):
        def cb(_):
            lat[i] = time.monotonic() - t0
            slots.release()
        return cb

    start = time.monotonic()
    for i in range(n):
        slots.acquire()
        t0 = time.monotonic()
        pipe.submit(X).add_done_callback(done(i, t0))
    for _ in range(concurrency):  # all answered
        slots.acquire()
    elapsed = time.monotonic() - start
    return float(np.median(lat) * 1000), n / elapsed


def harness(pipe: Pipeline, n: int, concurrency: int) -> tuple[float, float, float]:
    submit = lambda inputs, timeout_s: pipe.submit(inputs, timeout_s=timeout_s)  # noqa: E731
    step, = run_load(submit, [X], LoadConfig(mode="closed", levels=(concurrency,), requests=n, warmup_s=0)).steps
    return step.latency_ms["p50"], step.throughput_rps, step.client_overhead_us["p50"]


def harness_cpu_us(n: int = 50_000) -> float:
    """Harness time per request when the target answers instantly (a resolved Future), minus that Future's cost."""
    result = Result(request_id=1, outputs={}, latency_s=0.0)

    def instant(inputs, timeout_s):
        future = Future()
        future.set_running_or_notify_cancel()
        future.set_result(result)
        return future

    start = time.perf_counter()
    for _ in range(n):
        instant(X, 1.0)
    alone = time.perf_counter() - start
    start = time.perf_counter()
    run_load(instant, [X], LoadConfig(mode="closed", levels=(1,), requests=n, warmup_s=0))
    return ((time.perf_counter() - start) - alone) / n * 1e6  # includes the summary (histogram, JSON figures)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    topo = Topology(inputs=["x"], outputs=["y"], stages=[
        StageSpec(name="echo", stage=PythonStage(function=echo), inputs=["x"], outputs=["y"])])
    rows = []
    with Pipeline(topo) as pipe:
        for _ in range(200):
            pipe.infer(X)
        for concurrency in (1, 4):
            b, h = [], []
            for _ in range(args.rounds):
                b.append(bare(pipe, args.requests, concurrency))
                h.append(harness(pipe, args.requests, concurrency))
            med = lambda xs, i: statistics.median(x[i] for x in xs)  # noqa: E731
            rows.append({"concurrency": concurrency,
                         "bare_p50_ms": round(med(b, 0), 3), "harness_p50_ms": round(med(h, 0), 3),
                         "bare_rps": round(med(b, 1)), "harness_rps": round(med(h, 1)),
                         "p50_ratio": round(med(h, 0) / med(b, 0), 3), "rps_ratio": round(med(h, 1) / med(b, 1), 3),
                         "harness_minus_pipeline_p50_us": med(h, 2)})
    for row in rows:
        print(json.dumps(row))
    print(json.dumps({"harness_cpu_per_request_us": round(harness_cpu_us(), 1)}))


if __name__ == "__main__":
    main()
