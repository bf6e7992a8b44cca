"""Stage groups: many stages per worker process (zpipe.grouping, zpipe.worker).

Real worker processes, real TVM compiles. A 46-stage Inception-style model runs in two processes and matches
onnxruntime; explicit groups are honoured; a failing or crashing stage inside a group is named; branches in
different groups overlap; stages in one group share arrays without copying.
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import onnx
import psutil
import pytest
from click.testing import CliRunner

from zpipe import Pipeline, PythonStage, RequestFailed, StageSpec, Topology, TopologyError
from zpipe.cli import cli
from zpipe.compile import CompileOptions, compile_model
from zpipe.compile.models import inception_net
from zpipe.testing import Exit, FailOn, Nice, Pid, Scale, Sleep

ort = pytest.importorskip("onnxruntime")


def address(inputs):
    """Passes x on and returns the address of the array it received (in-memory hand-off shares buffers)."""
    x = inputs["x"]
    return {"out": x, "addr": np.array([x.__array_interface__["data"][0]], np.int64)}


def scribble(inputs):
    inputs["x"][...] = 0  # consumers must not write into arrays other stages may share
    return inputs["x"]


def stages(*specs) -> list[StageSpec]:
    return [StageSpec(name=n, stage=s, inputs=i, outputs=o, **extra) for n, s, i, o, extra in specs]


# -- the grouping rules (no processes) -------------------------------------------------------------------------------
def fork3(**pipeline) -> Topology:
    """x -> stem -> three branches (a: a1 -> a2 chain, b, c) -> merge m -> y."""
    return Topology(inputs=["x"], outputs=["y"], **pipeline, stages=stages(
        ("stem", Scale(), {"x": "x"}, {"out": "h"}, {}),
        ("a1", Scale(), {"x": "h"}, {"out": "a1"}, {}),
        ("a2", Scale(), {"x": "a1"}, {"out": "a"}, {}),
        ("b", Scale(), {"x": "h"}, {"out": "b"}, {}),
        ("c", Scale(), {"x": "h"}, {"out": "c"}, {}),
        ("m", _merge(), ["a", "b", "c"], {"out": "y"}, {}),
    ))


def _merge():
    from zpipe.stage import resolve_kind

    return resolve_kind("merge")(op="add")


def test_chains_fuse_and_branches_spread_over_lanes():
    grouping = fork3(max_groups=2).grouping()
    # a1 -> a2 is the heaviest branch (2 stages): it stays with the stem; b and c (1 each) balance it on the other lane
    assert grouping.groups == {"auto0": ("stem", "a1", "a2", "m"), "auto1": ("b", "c")}
    assert grouping.group_of("a1") == grouping.group_of("a2") == grouping.group_of("stem")


def test_lanes_are_capped_by_max_groups_and_a_chain_uses_one_process():
    assert len(fork3(max_groups=3).grouping().groups) == 3
    assert len(fork3(max_groups=8).grouping().groups) == 3  # never more than the widest fork
    assert list(fork3(max_groups=1).grouping().groups) == ["auto0"]
    chain = Topology(inputs=["x"], outputs=["y"], stages=stages(
        ("s1", Scale(), {"x": "x"}, {"out": "h"}, {}), ("s2", Scale(), {"x": "h"}, {"out": "y"}, {})))
    assert chain.grouping(max_groups=4).groups == {"auto0": ("s1", "s2")}


def test_measured_costs_balance_the_lanes():
    grouping = fork3().grouping(max_groups=2, costs={"a1": 1, "a2": 1, "b": 10, "c": 1})
    assert grouping.group_of("b") == grouping.group_of("stem")  # heaviest first, on the fork's own lane
    assert grouping.group_of("a1") == grouping.group_of("c") != grouping.group_of("b")


def test_per_stage_and_explicit_groups():
    assert fork3(groups="per-stage").grouping().groups == {n: (n,) for n in ("stem", "a1", "a2", "b", "c", "m")}
    topo = Topology(inputs=["x"], outputs=["y"], stages=stages(
        ("s1", Scale(), {"x": "x"}, {"out": "h"}, {"group": "front"}),
        ("s2", Scale(), {"x": "h"}, {"out": "i"}, {"group": "back"}),
        ("s3", Scale(), {"x": "i"}, {"out": "y"}, {"group": "front"})))
    assert topo.grouping().groups == {"front": ("s1", "s3"), "back": ("s2",)}
    with pytest.raises(TopologyError, match="group names \\['s2'\\]"):
        Topology(inputs=["x"], outputs=["y"], groups="per-stage", stages=stages(
            ("s1", Scale(), {"x": "x"}, {"out": "h"}, {"group": "s2"}),
            ("s2", Scale(), {"x": "h"}, {"out": "y"}, {}))).grouping()


def test_bad_grouping_keys_are_refused_by_name():
    with pytest.raises(TopologyError, match="groups must be 'auto' or 'per-stage', got 'bogus'"):
        fork3(groups="bogus")
    with pytest.raises(TopologyError, match="max_groups must be a positive"):
        fork3(max_groups=0)
    with pytest.raises(TopologyError, match="stage 's1': group 'no spaces' must be a name"):
        StageSpec(name="s1", stage=Scale(), inputs={"x": "x"}, outputs={"out": "y"}, group="no spaces")
    with pytest.raises(TopologyError, match="stage 's1': nice must be an integer from 0 .* got -5"):
        StageSpec(name="s1", stage=Scale(), inputs={"x": "x"}, outputs={"out": "y"}, nice=-5)
    with pytest.raises(TopologyError, match="stage 's1': nice applies to stages that compute on this device"):
        StageSpec(name="s1", stage=Scale(), inputs={"x": "x"}, outputs={"out": "y"}, host="edge", nice=5)
    with pytest.raises(TopologyError, match="unknown key 'grop'.*did you mean 'group'"):
        Topology.from_toml('[pipeline]\ninputs = ["x"]\noutputs = ["y"]\n[stages.s]\nkind = "zpipe.testing:Scale"\n'
                           'inputs = { x = "x" }\noutputs = { out = "y" }\ngrop = "g"\n')


def test_a_gates_compute_branch_runs_outside_the_gates_process():
    """So the gate keeps routing while the local branch computes, and sees that branch's backlog."""
    from zpipe.stage import resolve_kind

    topo = Topology(inputs=["x", "X"], outputs=["y"], stages=stages(
        ("gate", resolve_kind("gate")(control="X"), {"X": "X", "x": "x"},
         {"then.x": "x@then", "else.x": "x@else"}, {}),
        ("then", Scale(), {"x": "x@then"}, {"out": "y@then"}, {}),
        ("else", Scale(), {"x": "x@else"}, {"out": "y@else"}, {}),
        ("select", resolve_kind("merge")(op="select"), ["y@then", "y@else"], {"out": "y"}, {})))
    grouping = topo.grouping(max_groups=2)
    assert grouping.group_of("else") != grouping.group_of("gate")
    assert topo.grouping(max_groups=1).groups == {"auto0": ("gate", "then", "else", "select")}


# -- running groups -----------------------------------------------------------------------------------------------------
def test_explicit_groups_are_honoured_at_run_time():
    topo = Topology(inputs=["x"], outputs=["p1", "p2", "p3"], stages=stages(
        ("s1", Pid(), ["x"], {"out": "h", "pid": "p1"}, {"group": "front"}),
        ("s2", Pid(), {"x": "h"}, {"out": "i", "pid": "p2"}, {"group": "back"}),
        ("s3", Pid(), {"x": "i"}, {"pid": "p3"}, {"group": "front"})))
    with Pipeline(topo) as pipe:
        out = pipe.infer({"x": np.zeros(1)})
        assert pipe.signals("s1")["group"] == pipe.signals("s3")["group"] == "front"
    assert int(out["p1"]) == int(out["p3"]) != int(out["p2"])


def test_nice_lowers_the_priority_of_the_process_hosting_the_stage(caplog):
    """A group runs at the highest nice of its stages (and says so when they differ); other groups keep the
    pipeline's own priority."""
    base = os.getpriority(os.PRIO_PROCESS, 0)
    topo = Topology(inputs=["x"], outputs=["n1", "n2", "n3"], stages=stages(
        ("s1", Nice(), ["x"], {"out": "h", "nice": "n1"}, {"group": "heavy", "nice": 7}),
        ("s2", Nice(), {"x": "h"}, {"out": "i", "nice": "n2"}, {"group": "heavy", "nice": 3}),
        ("s3", Nice(), {"x": "i"}, {"nice": "n3"}, {"group": "light"})))
    with Pipeline(topo) as pipe:
        out = pipe.infer({"x": np.zeros(1)})
    assert (int(out["n1"]), int(out["n2"]), int(out["n3"])) == (min(base + 7, 19), min(base + 7, 19), base)
    assert "group 'heavy' hosts stages asking for different nice values {'s1': 7, 's2': 3}: it runs at 7" in caplog.text
    assert Topology.from_toml('[pipeline]\ninputs = ["x"]\noutputs = ["y"]\n[stages.s]\nkind = "zpipe.testing:Scale"\n'
                              'inputs = { x = "x" }\noutputs = { out = "y" }\nnice = 5\n').stage("s").nice == 5


def test_stages_in_one_group_share_arrays_and_cannot_write_them():
    topo = Topology(inputs=["x"], outputs=["a1", "a2", "y"], stages=stages(
        ("first", PythonStage(function=address), ["x"], {"out": "h", "addr": "a1"},
         {}),
        ("second", PythonStage(function=address), {"x": "h"},
         {"out": "y", "addr": "a2"}, {})))
    with Pipeline(topo) as pipe:
        assert len(pipe._supervisor.grouping.groups) == 1
        out = pipe.infer({"x": np.arange(1 << 16, dtype=np.float32)})
    assert int(out["a1"][0]) == int(out["a2"][0])  # the same buffer: handed over, not serialized or copied
    np.testing.assert_array_equal(out["y"], np.arange(1 << 16, dtype=np.float32))

    writer = Topology(inputs=["x"], outputs=["y"], stages=stages(
        ("first", Scale(factor=2.0), ["x"], {"out": "h"}, {}),
        ("writer", PythonStage(function=scribble), {"x": "h"}, {"out": "y"}, {})))
    with Pipeline(writer) as pipe:
        with pytest.raises(RequestFailed, match="stage 'writer'.*read-only") as info:
            pipe.infer({"x": np.ones(4)})
        assert info.value.stage == "writer"


def test_a_failing_stage_inside_a_group_fails_only_its_requests_and_names_itself():
    topo = Topology(inputs=["x"], outputs=["y"], stages=stages(
        ("pre", Scale(factor=1.0), ["x"], {"out": "h"}, {}),
        ("picky", FailOn(value=3.0), {"x": "h"}, {"out": "i"}, {}),
        ("post", Scale(factor=2.0), {"x": "i"}, {"out": "y"}, {})))
    with Pipeline(topo) as pipe:
        assert len(pipe._supervisor.grouping.groups) == 1
        pid = pipe._supervisor.pid_of("picky")
        futures = [pipe.submit({"x": np.full(2, float(i % 5))}) for i in range(50)]
        for i, future in enumerate(futures):
            if i % 5 == 3:
                with pytest.raises(RequestFailed, match="stage 'picky'") as info:
                    future.result(timeout=30)
                assert info.value.stage == "picky"
            else:
                np.testing.assert_array_equal(future.result(timeout=30).outputs["y"], np.full(2, 2.0 * (i % 5)))
        assert pipe._supervisor.pid_of("picky") == pid  # the group's process lived on
        assert pipe.stats()["ok"] == 40 and pipe.stats()["failed"] == 10


def test_a_crash_inside_a_group_names_the_stage_that_was_running():
    topo = Topology(inputs=["x"], outputs=["y"], stages=stages(
        ("pre", Scale(), ["x"], {"out": "h"}, {}),
        ("bomb", Exit(value=7.0), {"x": "h"}, {"out": "i"}, {}),
        ("post", Scale(), {"x": "i"}, {"out": "y"}, {})))
    with Pipeline(topo) as pipe:
        with pytest.raises(RequestFailed, match="group 'auto0' \\(stages pre, bomb, post\\).*while running stage "
                                                "'bomb'") as info:
            pipe.infer({"x": np.full(1, 7.0)}, timeout_s=20)
        assert info.value.stage == "bomb" and info.value.reason == "worker_died"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # restarted: the group serves again
            try:
                assert pipe.infer({"x": np.ones(1)}, timeout_s=5)["y"][0] == 1.0
                break
            except RequestFailed:
                time.sleep(0.2)
        else:
            pytest.fail("the group was not restarted")


@pytest.mark.parametrize("explicit", [False, True])
def test_parallel_branches_in_different_groups_overlap(explicit):
    a = {"group": "left"} if explicit else {}
    b = {"group": "right"} if explicit else {}
    topo = Topology(inputs=["x"], outputs=["y"], max_groups=2, stages=stages(
        ("left", Sleep(seconds=0.3), {"x": "x"}, {"out": "l"}, a),
        ("right", Sleep(seconds=0.3), {"x": "x"}, {"out": "r"}, b),
        ("join", _merge(), ["l", "r"], {"out": "y"}, a)))
    with Pipeline(topo) as pipe:
        groups = pipe._supervisor.grouping
        assert groups.group_of("left") != groups.group_of("right")
        pipe.infer({"x": np.ones(2)})  # warm-up: links between the groups are connected lazily
        result = pipe.submit({"x": np.ones(2)}).result(timeout=30)
    (s1, e1), (s2, e2) = result.stage_times["left"], result.stage_times["right"]
    assert s1 < e2 and s2 < e1, result.stage_times  # the two sleeps ran at the same time
    assert result.latency_s < 0.55
    np.testing.assert_array_equal(result.outputs["y"], np.full(2, 2.0))


# -- a model cut into dozens of stages ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inception46(tmp_path_factory):
    out = tmp_path_factory.mktemp("inception46")
    model = inception_net(blocks=9, branches=4)
    onnx.save(model, out / "model.onnx")
    report = compile_model(out / "model.onnx", out / "build", CompileOptions(max_groups=2))
    return out, report


def test_a_46_stage_model_runs_in_two_processes_and_matches_onnxruntime(inception46):
    out, report = inception46
    assert len(report.builds) == 46
    topo = Topology.from_file(report.topology)
    assert {s.group for s in topo.stages} == {"auto0", "auto1"}  # compile wrote the groups
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((1, 3, 16, 16)).astype(np.float32) for _ in range(8)]
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    with Pipeline(topo) as pipe:
        workers = psutil.Process().children(recursive=True)
        assert len(workers) == 2, [w.cmdline() for w in workers]
        pids = {pipe.signals(name).get("pid") for name in topo.order()} - {None}
        futures = [pipe.submit({"x": x}) for x in inputs]
        for x, future in zip(inputs, futures):
            (expected,) = session.run(None, {"x": x})
            np.testing.assert_allclose(future.result(timeout=60).outputs["y"], expected, rtol=1e-5, atol=1e-5)
        pids |= {pipe.signals(name)["pid"] for name in topo.order()}
        rss = sum(w.memory_info().rss for w in workers)
    assert pids == {w.pid for w in workers}
    assert rss < 1 << 30, f"{rss / 2**20:.0f} MiB"


def test_run_explain_and_validate_print_the_grouping(inception46):
    _, report = inception46
    result = CliRunner().invoke(cli, ["run", str(report.topology), "--explain"])
    assert result.exit_code == 0, result.output
    assert "2 worker processes on device for 46 stages" in result.output
    assert "auto0: stem, " in result.output and "auto1: " in result.output
    validated = CliRunner().invoke(cli, ["validate", str(report.topology)])
    assert validated.exit_code == 0 and "[auto1]" in validated.output
    missing = CliRunner().invoke(cli, ["run", str(report.topology)])
    assert missing.exit_code == 2 and "--inputs" in missing.output


def test_per_stage_grouping_still_runs_the_same_model(inception46):
    """The old layout, one process per stage, stays available (most isolation); outputs are identical."""
    out, report = inception46
    topo = Topology.from_file(report.topology)
    topo = dataclasses.replace(topo, groups="per-stage",
                               stages=tuple(dataclasses.replace(s, group=None) for s in topo.stages[:6]) +
                               topo.stages[6:])
    x = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)
    with Pipeline(topo) as pipe:
        assert len(psutil.Process().children(recursive=True)) == 6 + 2  # 6 alone, the rest in their two groups
        y = pipe.infer({"x": x})["y"]
    with Pipeline(Topology.from_file(report.topology)) as pipe:
        np.testing.assert_array_equal(pipe.infer({"x": x})["y"], y)


def test_groups_feeding_each_other_both_ways_do_not_deadlock_when_links_fill():
    """The fork's process sends to a branch in the other process, whose output comes back to the join in the first:
    with tiny link queues and many requests in flight, blocking sends would deadlock the two processes."""
    topo = Topology(inputs=["x"], outputs=["y"], hwm=1, max_in_flight=64, max_groups=2, timeout_s=60, stages=stages(
        ("stem", Scale(), {"x": "x"}, {"out": "h"}, {}),
        ("fast", Scale(factor=2.0), {"x": "h"}, {"out": "a"}, {}),
        ("slow", Sleep(seconds=0.002), {"x": "h"}, {"out": "b"}, {}),
        ("join", _merge(), ["a", "b"], {"out": "j"}, {}),
        ("fast2", Scale(factor=2.0), {"x": "j"}, {"out": "c"}, {}),
        ("slow2", Sleep(seconds=0.002), {"x": "j"}, {"out": "d"}, {}),
        ("join2", _merge(), ["c", "d"], {"out": "y"}, {})))
    with Pipeline(topo) as pipe:
        groups = pipe._supervisor.grouping
        assert groups.group_of("slow") != groups.group_of("join") == groups.group_of("stem")
        x = np.ones(1 << 14, np.float32)  # 64 KiB: the kernel's socket buffers hold only a few
        futures = [pipe.submit({"x": x}) for _ in range(300)]
        for future in futures:
            np.testing.assert_array_equal(future.result(timeout=60).outputs["y"], x * 9)


def test_a_remote_stand_in_never_takes_a_lane_even_with_costs():
    from zpipe.topology import HostSpec

    topo = Topology(inputs=["x"], outputs=["y"], hosts=[HostSpec(name="edge", endpoint="tcp://127.0.0.1:9")],
                    stages=stages(
                        ("stem", Scale(), {"x": "x"}, {"out": "h"}, {}),
                        ("b0", Scale(), {"x": "h"}, {"out": "a"}, {}),
                        ("b1", Scale(), {"x": "h"}, {"out": "b"}, {"host": "edge"}),
                        ("b2", Scale(), {"x": "h"}, {"out": "c"}, {}),
                        ("m", _merge(), ["a", "b", "c"], {"out": "y"}, {})))
    grouping = topo.grouping(max_groups=2, costs={"stem": 1, "b0": 5, "b1": 100, "b2": 5, "m": 1})
    assert grouping.group_of("b1") == grouping.group_of("stem")  # it only forwards and waits
    assert grouping.group_of("b0") != grouping.group_of("b2")
