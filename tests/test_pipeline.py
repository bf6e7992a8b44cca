"""Pipelines of real worker processes over real sockets: pipelining, fan-out/merge, failures, backpressure, drain."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import threading
import time

import numpy as np
import psutil
import pytest

from zpipe import (Pipeline, PipelineClosed, PythonStage, RequestFailed, StageSpec, Topology, TopologyError)
from zpipe.stage import Outcome
from zpipe.testing import Exit, FailOn, Pid, Scale, Sleep


def chain3(**options) -> Topology:
    return Topology(inputs=["x"], outputs=["y"], stages=[
        StageSpec(name="a", stage=Scale(factor=2.0), inputs=["x"], outputs={"out": "h1"}),
        StageSpec(name="b", stage=Scale(offset=1.0), inputs={"x": "h1"}, outputs={"out": "h2"}),
        StageSpec(name="c", stage=Scale(factor=-1.0), inputs={"x": "h2"}, outputs={"out": "y"}),
    ], **options)


def test_three_stage_pipeline_many_requests_in_flight():
    with Pipeline(chain3(max_in_flight=64)) as pipe:
        inputs = [np.full((4, 4), i, dtype=np.float32) for i in range(300)]
        futures = [pipe.submit({"x": x}) for x in inputs]
        for x, future in zip(inputs, futures):
            np.testing.assert_array_equal(future.result(timeout=30).outputs["y"], -(x * 2 + 1))
        stats = pipe.stats()
    assert stats["submitted"] == stats["ok"] == 300 and stats["failed"] == 0 and stats["in_flight"] == 0
    result = futures[-1].result()
    assert set(result.stage_times) == {"a", "b", "c"}


@pytest.mark.parametrize("groups, processes", [("auto", 1), ("per-stage", 2)])
def test_a_chain_shares_one_worker_process_unless_per_stage(groups, processes):
    topo = Topology(inputs=["x"], outputs=["p1", "p2"], groups=groups, stages=[
        StageSpec(name="one", stage=Pid(), inputs=["x"], outputs={"out": "h", "pid": "p1"}),
        StageSpec(name="two", stage=Pid(), inputs={"x": "h"}, outputs={"pid": "p2"}),
    ])
    with Pipeline(topo) as pipe:
        out = pipe.infer({"x": np.zeros(1)})
    pids = {int(out["p1"]), int(out["p2"])}
    assert len(pids) == processes and os.getpid() not in pids


@pytest.mark.parametrize("groups", ["auto", "per-stage"])
def test_an_outcome_may_defer_an_output_while_the_worker_keeps_serving(groups):
    """A stage's Outcome may hold an output port back (a gate's deferred hedge): the consumer gets it that much
    later, in memory within a group or over a socket, and the worker handles other requests meanwhile."""
    topo = Topology(inputs=["x"], outputs=["y"], groups=groups, stages=[
        StageSpec(name="a", stage=PythonStage(function=lambda d: Outcome({"h": d["x"] + 1}, defer={"h": 0.3})),
                  inputs=["x"], outputs=["h"]),
        StageSpec(name="b", stage=Scale(factor=2.0), inputs={"x": "h"}, outputs={"out": "y"}),
    ])
    with Pipeline(topo) as pipe:
        pipe.infer({"x": np.zeros(3, np.float32)})  # started
        t0 = time.monotonic()
        futures = [pipe.submit({"x": np.full(3, i, np.float32)}) for i in range(5)]
        results = [f.result(timeout=30) for f in futures]
        took = time.monotonic() - t0
    for i, r in enumerate(results):
        np.testing.assert_array_equal(r.outputs["y"], np.full(3, (i + 1) * 2, np.float32))
        assert r.stage_times["b"][0] - r.stage_times["a"][1] >= 0.29, r.stage_times
    assert took < 1.0, took  # held side by side, not one after the other (5 x 0.3 s)


def test_a_deferred_output_that_cannot_travel_fails_its_request_at_once():
    """Held outputs are checked when they are held: a bad one fails the request then, not when it is due."""
    topo = Topology(inputs=["x"], outputs=["y"], stages=[
        StageSpec(name="a", stage=PythonStage(function=lambda d: Outcome({"h": np.array([object()])},
                                                                        defer={"h": 5.0})),
                  inputs=["x"], outputs=["h"]),
        StageSpec(name="b", stage=Scale(factor=2.0), inputs={"x": "h"}, outputs={"out": "y"}),
    ])
    with Pipeline(topo) as pipe:
        start = time.monotonic()
        with pytest.raises(RequestFailed, match="stage 'a'") as failed:
            pipe.submit({"x": np.zeros(3, np.float32)}).result(timeout=30)
        took = time.monotonic() - start
    assert took < 2.0, (took, failed.value)


def test_fan_out_and_merge_run_branches_concurrently():
    """The branches record their own start/end times; their intervals must overlap."""
    topo = Topology(inputs=["x"], outputs=["y", "span_a", "span_b"], stages=[
        StageSpec(name="stem", stage=Scale(factor=1.0), inputs=["x"], outputs={"out": "h"}),
        StageSpec(name="a", stage=PythonStage(function="helpers:timed_sleep"), inputs={"x": "h"},
                  outputs={"out": "a", "span": "span_a"}),
        StageSpec(name="b", stage=PythonStage(function="helpers:timed_sleep"), inputs={"x": "h"},
                  outputs={"out": "b", "span": "span_b"}),
        StageSpec(name="merge", stage=_merge("concat", axis=0), inputs=["a", "b"], outputs=["y"]),
    ])
    with Pipeline(topo) as pipe:
        x = np.arange(3, dtype=np.float32)
        pipe.infer({"x": x})  # warm-up
        out = pipe.infer({"x": x})
    np.testing.assert_array_equal(out["y"], np.concatenate([x, x]))
    (a0, a1), (b0, b1) = out["span_a"], out["span_b"]
    assert a0 < b1 and b0 < a1, f"branch intervals did not overlap: a={a0, a1} b={b0, b1}"
    overlap = min(a1, b1) - max(a0, b0)
    assert overlap > 0.1  # both sleep 0.2 s; run one after the other they would not overlap at all


def _merge(op, **kw):
    from zpipe import MergeStage

    return MergeStage(op=op, **kw)


def test_raising_stage_fails_only_its_request_and_keeps_serving():
    topo = Topology(inputs=["x"], outputs=["y"], stages=[
        StageSpec(name="pre", stage=Scale(factor=1.0), inputs=["x"], outputs={"out": "h"}),
        StageSpec(name="picky", stage=FailOn(value=13.0), inputs={"x": "h"}, outputs={"out": "y"}),
    ])
    with Pipeline(topo) as pipe:
        futures = [pipe.submit({"x": np.full(3, float(i))}) for i in range(30)]
        for i, future in enumerate(futures):
            if i == 13:
                with pytest.raises(RequestFailed, match="failed in stage 'picky': StageError: refusing") as info:
                    future.result(timeout=10)
                assert info.value.stage == "picky" and info.value.reason == "stage_error"
                assert info.value.request_id is not None
            else:
                np.testing.assert_array_equal(future.result(timeout=10).outputs["y"], np.full(3, float(i)))
        stats = pipe.stats()
    assert stats["ok"] == 29 and stats["failed"] == 1 and stats["failed:stage_error"] == 1


def test_failure_in_one_branch_reaches_the_caller_once_and_merge_keeps_no_state():
    topo = Topology(inputs=["x"], outputs=["y"], stages=[
        StageSpec(name="a", stage=FailOn(value=5.0), inputs=["x"], outputs={"out": "a"}),
        StageSpec(name="b", stage=Scale(), inputs=["x"], outputs={"out": "b"}),
        StageSpec(name="m", stage=_merge("add"), inputs=["a", "b"], outputs=["y"]),
    ], join_timeout_s=60)
    with Pipeline(topo) as pipe:
        futures = [pipe.submit({"x": np.full(2, float(i))}) for i in range(10)]
        errors = [f.exception(timeout=10) for f in futures]
        assert [i for i, e in enumerate(errors) if e is not None] == [5]
        assert "stage 'a'" in str(errors[5])
        status = pipe._supervisor.children  # the merge worker is still alive and answered the rest
        assert all(c.process.poll() is None for c in status.values())
        stats = pipe.stats()
    assert stats["ok"] == 9 and stats["failed"] == 1 and stats["late"] == 0


def test_python_stage_with_callable_and_wrong_output():
    topo = Topology(inputs=["x"], outputs=["y"], stages=[
        StageSpec(name="lam", stage=PythonStage(function=lambda d: {"wrong": d["x"]}), inputs=["x"], outputs=["y"]),
    ])
    with Pipeline(topo) as pipe:
        with pytest.raises(RequestFailed, match=r"stage 'lam' returned \['wrong'\] but the topology wires outputs"):
            pipe.infer({"x": np.zeros(2)})
        # an output that cannot travel is an error for that request too
    topo2 = Topology(inputs=["x"], outputs=["y"], stages=[
        StageSpec(name="obj", stage=PythonStage(function=lambda d: np.array([object()])), inputs=["x"],
                  outputs=["y"]),
    ])
    with Pipeline(topo2) as pipe:
        with pytest.raises(RequestFailed, match="stage 'obj'.*cannot travel"):
            pipe.infer({"x": np.zeros(2)})
        assert pipe.infer is not None


def test_bad_inputs_are_refused_at_submit():
    with Pipeline(chain3()) as pipe:
        with pytest.raises(TopologyError, match=r"missing \['x'\], unexpected \['z'\]"):
            pipe.submit({"z": np.zeros(1)})
        from zpipe import FramingError

        with pytest.raises(FramingError, match="tensor 'x'.*cannot travel"):
            pipe.submit({"x": np.array(["s"])})
        np.testing.assert_array_equal(pipe.infer({"x": np.ones(1, np.float32)})["y"], [-3.0])


def test_slow_stage_backpressure_bounds_in_flight_and_loses_nothing():
    topo = Topology(inputs=["x"], outputs=["y"], max_in_flight=8, hwm=2, stages=[
        StageSpec(name="fast", stage=Scale(), inputs=["x"], outputs={"out": "h"}),
        StageSpec(name="slow", stage=Sleep(seconds=0.02), inputs={"x": "h"}, outputs={"out": "y"}),
    ])
    with Pipeline(topo) as pipe:
        futures = []
        peak = 0

        def feed():
            for i in range(60):
                futures.append(pipe.submit({"x": np.full(1024, float(i))}))

        feeder = threading.Thread(target=feed)
        feeder.start()
        while feeder.is_alive():
            peak = max(peak, pipe.stats()["in_flight"])
            time.sleep(0.005)
        feeder.join()
        for i, future in enumerate(futures):
            assert future.result(timeout=30).outputs["y"][0] == i
        stats = pipe.stats()
    assert 2 <= peak <= 8, f"peak in flight {peak} exceeded max_in_flight=8"
    assert stats["ok"] == 60 and stats["failed"] == 0


def test_close_drains_requests_in_flight():
    topo = Topology(inputs=["x"], outputs=["y"], stages=[
        StageSpec(name="slow", stage=Sleep(seconds=0.01), inputs=["x"], outputs={"out": "y"})])
    pipe = Pipeline(topo).start()
    futures = [pipe.submit({"x": np.full(1, float(i))}) for i in range(40)]
    pipe.close(drain_timeout_s=30)
    assert [f.result(timeout=0).outputs["y"][0] for f in futures] == list(range(40))
    with pytest.raises(PipelineClosed):
        pipe.submit({"x": np.zeros(1)})


def test_close_with_short_drain_fails_the_rest_with_a_reason():
    topo = Topology(inputs=["x"], outputs=["y"], stages=[
        StageSpec(name="slow", stage=Sleep(seconds=0.1), inputs=["x"], outputs={"out": "y"})])
    pipe = Pipeline(topo).start()
    futures = [pipe.submit({"x": np.full(1, float(i))}) for i in range(20)]
    pipe.close(drain_timeout_s=0.35)
    done = [f for f in futures if f.exception(timeout=0) is None]
    failed = [f.exception(timeout=0) for f in futures if f.exception(timeout=0) is not None]
    assert 1 <= len(done) < 20 and len(done) + len(failed) == 20
    assert all(isinstance(e, PipelineClosed) and "shut down" in str(e) for e in failed)
    stats = pipe.stats()
    assert stats["ok"] == len(done) and stats["failed:shutdown"] == len(failed) and stats["in_flight"] == 0


def test_worker_crash_fails_in_flight_requests_then_restarts():
    topo = Topology(inputs=["x"], outputs=["y"], stages=[
        StageSpec(name="fragile", stage=Exit(value=7.0), inputs=["x"], outputs={"out": "y"})])
    with Pipeline(topo) as pipe:
        assert pipe.infer({"x": np.ones(1)})[ "y"][0] == 1.0
        with pytest.raises(RequestFailed, match=r"worker of stage 'fragile' died \(exit code 3\)") as info:
            pipe.infer({"x": np.full(1, 7.0)}, timeout_s=20)
        assert info.value.reason == "worker_died"
        deadline = time.monotonic() + 30
        while True:  # the restarted worker serves again
            try:
                assert pipe.infer({"x": np.full(1, 2.0)}, timeout_s=5)["y"][0] == 2.0
                break
            except RequestFailed:
                assert time.monotonic() < deadline, "the worker did not come back"
        stats = pipe.stats()
    assert stats["failed:worker_died"] >= 1 and stats["submitted"] == stats["ok"] + stats["failed"]


def test_request_deadline_gives_a_timeout_not_a_hang():
    topo = Topology(inputs=["x"], outputs=["y"], stages=[
        StageSpec(name="slow", stage=Sleep(seconds=1.0), inputs=["x"], outputs={"out": "y"})])
    with Pipeline(topo) as pipe:
        started = time.monotonic()
        with pytest.raises(RequestFailed, match="no complete reply within 0.2s") as info:
            pipe.infer({"x": np.zeros(1)}, timeout_s=0.2)
        assert info.value.reason == "timeout" and time.monotonic() - started < 0.9
        assert pipe.stats()["late"] == 0
        time.sleep(1.2)  # the reply that arrives after the deadline is counted, not delivered
        assert pipe.stats()["late"] == 1


def test_setup_failure_names_the_stage():
    class Broken(Scale):
        def setup(self):
            raise RuntimeError("no accelerator here")

    topo = Topology(inputs=["x"], outputs=["y"], stages=[
        StageSpec(name="broken", stage=Broken(), inputs=["x"], outputs={"out": "y"})])
    with pytest.raises(Exception, match="stage 'broken': setup\\(\\) raised RuntimeError: no accelerator here"):
        Pipeline(topo).start()


def test_async_embedding():
    async def main():
        with Pipeline(chain3()) as pipe:
            results = await asyncio.gather(*[pipe.infer_async({"x": np.full(2, float(i))}) for i in range(20)])
        return [r.outputs["y"][0] for r in results]

    assert asyncio.run(main()) == [-(2 * i + 1) for i in range(20)]


def test_no_worker_outlives_the_pipeline():
    pipe = Pipeline(dataclasses.replace(chain3(), groups="per-stage")).start()
    children = psutil.Process().children(recursive=True)
    assert len(children) >= 3
    pipe.close()
    gone, alive = psutil.wait_procs(children, timeout=5)
    assert not alive


@pytest.mark.skipif(not os.path.isdir("/dev/shm") or bool(os.environ.get("ZPIPE_RUNDIR")),
                    reason="no /dev/shm here, or $ZPIPE_RUNDIR picks the run directory")
def test_the_signal_board_and_sockets_live_in_memory_and_go_with_the_pipeline():
    """The board is rewritten within ms of each change (20 pings a second with a policy): in /dev/shm, not on disk."""
    pipe = Pipeline(chain3()).start()
    try:
        pipe.infer({"x": np.ones((2, 2), np.float32)})
        rundir = pipe._rundir
        assert rundir.startswith("/dev/shm/zpipe-"), rundir
        assert {"a.json", "b.json", "c.json"} <= set(os.listdir(os.path.join(rundir, "board")))
    finally:
        pipe.close()
    assert not os.path.exists(rundir)


def test_a_run_directory_that_is_not_there_is_named(monkeypatch, tmp_path):
    from zpipe.errors import ZpipeError

    monkeypatch.setenv("ZPIPE_RUNDIR", str(tmp_path / "missing"))
    with pytest.raises(ZpipeError, match="ZPIPE_RUNDIR=.*missing.* is not a writable directory"):
        Pipeline(chain3()).start()
    monkeypatch.setenv("ZPIPE_RUNDIR", str(tmp_path))
    with Pipeline(chain3()) as pipe:
        assert pipe._rundir.startswith(str(tmp_path))
        np.testing.assert_array_equal(pipe.infer({"x": np.ones((2, 2), np.float32)})["y"], -np.full((2, 2), 3.0))


def test_sigterm_to_a_worker_is_accounted():
    topo = Topology(inputs=["x"], outputs=["y"], stages=[
        StageSpec(name="victim", stage=Sleep(seconds=0.5), inputs=["x"], outputs={"out": "y"})])
    with Pipeline(topo) as pipe:
        future = pipe.submit({"x": np.zeros(1)})
        time.sleep(0.1)
        os.kill(pipe._supervisor.pid_of("victim"), signal.SIGKILL)
        with pytest.raises(RequestFailed, match="died"):
            future.result(timeout=10)


def test_cancelled_or_callback_futures_do_not_break_the_pipeline():
    with Pipeline(chain3()) as pipe:
        future = pipe.submit({"x": np.ones(2)})
        assert not future.cancel()  # a submitted request is answered, not cancelled
        assert future.result(timeout=10).outputs["y"][0] == -3.0
        errors = []

        def callback(f):
            try:
                pipe.submit({"x": np.ones(2)})
            except RuntimeError as exc:
                errors.append(exc)

        pipe.submit({"x": np.ones(2)}).add_done_callback(callback)
        deadline = time.monotonic() + 10
        while not errors and time.monotonic() < deadline:
            time.sleep(0.01)
        assert errors and "done-callback" in str(errors[0])
        assert pipe.infer({"x": np.zeros(2)})["y"][0] == -1.0


def test_oversized_meta_fails_one_request_and_keeps_the_worker():
    with Pipeline(chain3()) as pipe:
        pids = [c.process.pid for c in pipe._supervisor.children.values()]
        with pytest.raises(RequestFailed, match="header is .* bytes, limit is 65536"):
            pipe.infer({"x": np.ones(2)}, meta={"s": "a" * 65400})
        assert pipe.infer({"x": np.ones(2)})["y"][0] == -3.0
        assert [c.process.pid for c in pipe._supervisor.children.values()] == pids  # no worker died
        with pytest.raises(ValueError, match="reserved"):
            pipe.submit({"x": np.ones(2)}, meta={"t:a": 1})


def test_closed_pipeline_cannot_restart():
    pipe = Pipeline(chain3()).start()
    pipe.close()
    with pytest.raises(PipelineClosed, match="create a new Pipeline"):
        pipe.start()
