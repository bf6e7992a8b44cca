"""The gate: each request runs exactly one of two branches; the other gets a skip notice and computes nothing."""

from __future__ import annotations

import os
import signal
import textwrap
import time

import numpy as np
import pytest

from zpipe import Pipeline, RequestFailed, StageSpec, Topology, TopologyError
from zpipe.testing import Scale

GATED = """
[pipeline]
inputs = ["x", "ctl"]
outputs = ["z"]
timeout_s = 20

[stages.pre]
kind = "zpipe.testing:Scale"
inputs = ["x"]
outputs = { out = "h" }

[stages.gate]
kind = "gate"
control = "ctl"
inputs = { ctl = "ctl", h = "h" }
outputs = { "then.h" = "h@then", "else.h" = "h@else" }

[stages.remote_branch]
kind = "zpipe.testing:Scale"
factor = 10.0
inputs = { x = "h@then" }
outputs = { out = "y@then" }

[stages.local_branch]
kind = "zpipe.testing:Scale"
factor = -1.0
inputs = { x = "h@else" }
outputs = { out = "y@else" }

[stages.select]
kind = "merge"
op = "select"
inputs = ["y@then", "y@else"]
outputs = ["y"]

[stages.post]
kind = "zpipe.testing:Scale"
offset = 0.5
inputs = { x = "y" }
outputs = { out = "z" }
"""


def gated(text: str = GATED) -> Topology:
    return Topology.from_toml(textwrap.dedent(text))


def test_each_request_runs_exactly_the_branch_its_x_chooses():
    with Pipeline(gated()) as pipe:
        xs = [np.full(4, float(i), np.float32) for i in range(40)]
        ctls = [np.array(i % 3 == 0) for i in range(40)]  # bool X
        futures = [pipe.submit({"x": x, "ctl": c}) for x, c in zip(xs, ctls)]
        for x, c, f in zip(xs, ctls, futures):
            result = f.result(timeout=20)
            expected = x * 10 + 0.5 if c else -x + 0.5
            np.testing.assert_allclose(result.outputs["z"], expected)
            ran = set(result.stage_times)
            assert ran == {"pre", "gate", "select", "post", "remote_branch" if c else "local_branch"}, ran


@pytest.mark.parametrize("groups", ["auto", "per-stage"])
def test_a_skipped_branch_costs_its_stages_nothing(groups):
    """The skip notice for the branch X did not choose goes straight to the select: the branch's stages (in the
    gate's process or, per-stage, each in its own) get no message for that request at all."""
    with Pipeline(gated(GATED.replace("timeout_s = 20", f'timeout_s = 20\ngroups = "{groups}"'))) as pipe:
        for i in range(12):
            z = pipe.infer({"x": np.full(4, float(i), np.float32), "ctl": np.array(i % 3 == 0)})["z"]
            np.testing.assert_allclose(z, np.full(4, i * 10 + 0.5 if i % 3 == 0 else -i + 0.5))
        deadline = time.monotonic() + 5
        while pipe.signals("local_branch").get("processed") != 8 and time.monotonic() < deadline:
            time.sleep(0.02)  # (another process's board entry: published within ms)
        then, other = pipe.signals("remote_branch"), pipe.signals("local_branch")
    assert (then["processed"], other["processed"]) == (4, 8)
    assert then["skipped"] == other["skipped"] == 0


def test_integer_x_and_x_from_request_meta():
    text = GATED.replace('control = "ctl"', 'control = "ctl"\nmeta_key = "offload"')
    with Pipeline(gated(text)) as pipe:
        x = np.ones(2, np.float32)
        assert pipe.infer({"x": x, "ctl": np.array([1], np.int64)})["z"][0] == 10.5
        assert pipe.infer({"x": x, "ctl": np.array([1], np.int64)}, meta={"offload": 0})["z"][0] == -0.5
        assert pipe.infer({"x": x, "ctl": np.array(0, np.int8)}, meta={"offload": True})["z"][0] == 10.5


@pytest.mark.parametrize("ctl, match", [
    (np.array(2), "X must be 0 .* or 1"),
    (np.array([0.0]), "one bool or integer value, got float64"),
    (np.array([1, 0]), r"one bool or integer value, got int64\[2\]"),
])
def test_bad_x_fails_the_request_and_names_the_gate(ctl, match):
    with Pipeline(gated()) as pipe:
        with pytest.raises(RequestFailed, match=match) as info:
            pipe.infer({"x": np.ones(2, np.float32), "ctl": ctl})
        assert info.value.stage == "gate"
        assert pipe.infer({"x": np.ones(2, np.float32), "ctl": np.array(True)})["z"][0] == 10.5


def test_missing_x_is_refused_at_submit_and_the_pipeline_keeps_going():
    from zpipe import TopologyError as TE

    with Pipeline(gated()) as pipe:
        with pytest.raises(TE, match=r"missing \['ctl'\]"):
            pipe.submit({"x": np.ones(2, np.float32)})
        assert pipe.infer({"x": np.ones(2, np.float32), "ctl": np.array(False)})["z"][0] == -0.5


def test_a_skipped_tensor_reaching_a_plain_stage_is_an_error():
    text = GATED.replace('kind = "merge"\nop = "select"\ninputs = ["y@then", "y@else"]\noutputs = ["y"]',
                         'kind = "merge"\nop = "add"\ninputs = ["y@then", "y@else"]\noutputs = ["y"]')
    with Pipeline(gated(text)) as pipe:
        with pytest.raises(RequestFailed, match="were skipped by a gate; join gated branches with a merge of op "
                                                "'select'"):
            pipe.infer({"x": np.ones(2, np.float32), "ctl": np.array(True)})


@pytest.mark.parametrize("old, new, match", [
    ('"then.h" = "h@then"', '"maybe.h" = "h@then"', "must be 'then.<input>' or 'else.<input>'"),
    ('"else.h" = "h@else"', '"then.x" = "h@else"', "must be 'then.<input>'"),
    ('control = "ctl"', 'control = "ctrl"', "control port 'ctrl' is not among its inputs"),
    ('inputs = ["y@then", "y@else"]', 'inputs = ["y@then", "y@else", "x"]', "two inputs per output"),
])
def test_gate_wiring_errors(old, new, match):
    with pytest.raises(TopologyError, match=match):
        gated(GATED.replace(old, new))


def test_all_skipped_outputs_reaching_the_pipeline_fail_clearly():
    from zpipe import Topology as T

    from zpipe.stage import resolve_kind

    gate = resolve_kind("gate")(control="c")
    topo = T(inputs=["x", "c"], outputs=["a", "b"], stages=[
        StageSpec(name="g", stage=gate, inputs=["c", "x"], outputs={"then.x": "t", "else.x": "e"}),
        StageSpec(name="ta", stage=Scale(), inputs={"x": "t"}, outputs={"out": "a"}),
        StageSpec(name="eb", stage=Scale(), inputs={"x": "e"}, outputs={"out": "b"}),
    ])
    with Pipeline(topo) as pipe:
        with pytest.raises(RequestFailed, match=r"pipeline outputs \['b'\] were skipped by a gate"):
            pipe.infer({"x": np.ones(1), "c": np.array(True)})


@pytest.mark.parametrize("groups", ["auto", "per-stage"])
def test_a_failing_branch_fails_its_request_at_once_with_its_own_error(groups):
    """The select holds a branch's failure only while the other branch may still answer; here it was skipped."""
    text = GATED.replace('[stages.remote_branch]\nkind = "zpipe.testing:Scale"\nfactor = 10.0',
                         '[stages.remote_branch]\nkind = "zpipe.testing:FailOn"\nvalue = 3.0')
    text = text.replace("timeout_s = 20", f'timeout_s = 20\ngroups = "{groups}"')
    with Pipeline(gated(text)) as pipe:
        started = time.monotonic()
        with pytest.raises(RequestFailed, match="stage 'remote_branch'") as info:
            pipe.infer({"x": np.full(4, 3.0, np.float32), "ctl": np.array(True)})
        assert info.value.reason == "stage_error" and time.monotonic() - started < 5
        z = pipe.infer({"x": np.full(4, 2.0, np.float32), "ctl": np.array(True)})["z"]
        np.testing.assert_allclose(z, np.full(4, 2.5))  # passed through, plus post's offset


def test_select_takes_the_branch_that_answered_whole():
    """A hedged request may hold parts of the losing branch when the other one completes."""
    from zpipe.stage import resolve_kind

    select = resolve_kind("merge")(op="select")
    a1, a2, b1, b2 = (np.full(2, v) for v in (1.0, 2.0, 3.0, 4.0))
    out = select.process({"t1": a1, "t2": None, "e1": b1, "e2": b2})
    assert [o[0] for o in out] == [3.0, 4.0]
    assert select.runnable({"t1": True, "t2": None, "e1": True, "e2": True})
    assert not select.runnable({"t1": True, "t2": None, "e1": True, "e2": None})


SPARE = """
[pipeline]
inputs = ["x"]
outputs = ["y"]
timeout_s = 20
groups = "{groups}"

[stages.hedge]
kind = "helpers:SpareHedge"
defer_s = {defer_s}
call_off = {call_off}
follow = {follow}
hold_s = {hold_s}
{front}
inputs = {{ h = "x" }}
outputs = {{ "then.h" = "h@then", "else.h" = "h@else" }}

[stages.remote_branch]
kind = "{then_kind}"
{then_options}
inputs = {{ x = "h@then" }}
outputs = {{ out = "y@then" }}

[stages.local_branch]
kind = "zpipe.testing:Scale"
factor = -1.0
inputs = {{ x = "h@else" }}
outputs = {{ out = "y@else" }}

[stages.select]
kind = "merge"
op = "select"
inputs = ["y@then", "y@else"]
outputs = ["y"]
{front}
"""


def spare(groups="auto", defer_s=2.0, then_kind="zpipe.testing:FailOn", then_options="value = 3.0",
          call_off=False, follow=False, hold_s=0.0) -> Topology:
    """The hedge and the select share a process (as a gate and its select do when grouped automatically, the
    remote stand-in with them), unless every stage has its own."""
    front = 'group = "front"' if groups == "auto" else ""
    return gated(SPARE.format(groups=groups, defer_s=defer_s, then_kind=then_kind, then_options=then_options,
                              front=front, call_off=str(call_off).lower(), follow=str(follow).lower(),
                              hold_s=hold_s))


def _settle(pipe, stage, key, want, within_s=3.0):
    deadline = time.monotonic() + within_s
    while pipe.signals(stage).get(key, 0) != want and time.monotonic() < deadline:
        time.sleep(0.02)
    return pipe.signals(stage).get(key, 0)


def test_a_spare_copy_is_withdrawn_unsent_when_the_other_branch_answers_first():
    """The local branch never sees a spare whose request the remote branch answered; one it failed gets it at
    once, not when it was due (2 s)."""
    with Pipeline(spare()) as pipe:
        xs = [np.full(4, float(i), np.float32) for i in range(12)]  # x = 3: the remote branch fails it
        results = [f.result(timeout=20) for f in [pipe.submit({"x": x}) for x in xs]]
        for x, result in zip(xs, results):
            np.testing.assert_allclose(result.outputs["y"], -x if x[0] == 3 else x)
            assert ("local_branch" in result.stage_times) == (x[0] == 3)
        assert results[3].latency_s < 1.0, results[3].latency_s
        assert _settle(pipe, "hedge", "withdrawals", 11) == 11
        time.sleep(2.2)  # past every spare's due time: none of the 11 went out late
        assert pipe.signals("local_branch")["processed"] == 1
        assert pipe.signals("hedge")["withdrawn"] == 11
        assert pipe.signals("hedge")["joins"] == {"then.h": "select", "else.h": "select"}
        assert pipe.stats()["ok"] == 12


def test_a_spare_copy_runs_when_it_is_due_before_the_answer():
    topology = spare(defer_s=0.05, then_kind="zpipe.testing:Sleep", then_options="seconds = 0.4")
    with Pipeline(topology) as pipe:
        xs = [np.full(4, float(i), np.float32) for i in range(3)]
        for x in xs:
            result = pipe.submit({"x": x}).result(timeout=20)
            np.testing.assert_allclose(result.outputs["y"], -x)  # the local copy answered first
        assert _settle(pipe, "local_branch", "processed", 3) == 3
        assert pipe.signals("hedge")["withdrawals"] == 0


def test_a_spare_called_off_still_answers_when_the_other_branch_fails_later():
    """Called off when due, the spare waits: the remote branch failing afterwards (x = 3, after 0.3 s) sends it,
    and it answers; answered requests drop it."""
    text = SPARE.replace('kind = "{then_kind}"\n{then_options}\ninputs = {{ x = "h@then" }}\noutputs = {{ out = "y@then" }}',
                         'kind = "zpipe.testing:Sleep"\nseconds = 0.3\ninputs = {{ x = "h@then" }}\n'
                         'outputs = {{ out = "s@then" }}\n\n[stages.remote_check]\nkind = "zpipe.testing:FailOn"\n'
                         'value = 3.0\ninputs = {{ x = "s@then" }}\noutputs = {{ out = "y@then" }}')
    assert text != SPARE
    topology = gated(text.format(groups="auto", defer_s=0.05, call_off="true", follow="false", hold_s=0.0,
                                 front='group = "front"'))
    with Pipeline(topology) as pipe:
        xs = [np.full(4, v, np.float32) for v in (1.0, 3.0, 4.0)]
        for x in xs:
            result = pipe.submit({"x": x}).result(timeout=20)
            np.testing.assert_allclose(result.outputs["y"], -x if x[0] == 3 else x)
        assert _settle(pipe, "hedge", "withdrawals", 2) == 2
        assert pipe.signals("hedge")["called_off"] == 3 and pipe.signals("local_branch")["processed"] == 1


def test_a_held_copy_that_follows_the_answer_leaves_when_the_answer_is_in():
    """Outcome.after_answer: a probe's copy due in 2 s leaves as soon as the other branch answered (it measures
    that branch without competing with the answer), and it is not withdrawn."""
    with Pipeline(spare(follow=True, then_kind="zpipe.testing:Sleep", then_options="seconds = 0.05")) as pipe:
        xs = [np.full(4, float(i), np.float32) for i in range(3)]
        started = time.monotonic()
        for x in xs:
            np.testing.assert_allclose(pipe.submit({"x": x}).result(timeout=20).outputs["y"], x)  # remote answered
        assert _settle(pipe, "local_branch", "processed", 3, within_s=1.5) == 3
        assert time.monotonic() - started < 2.0  # not when they were due (2 s after each request)
        assert pipe.signals("hedge")["withdrawals"] == 0


def test_a_spare_copy_its_stage_calls_off_when_due_never_goes_out():
    """Stage.spare_due says no (the gate: the device is at its CPU quota): the request waits for its remote answer."""
    topology = spare(defer_s=0.05, then_kind="zpipe.testing:Sleep", then_options="seconds = 0.3", call_off=True)
    with Pipeline(topology) as pipe:
        xs = [np.full(4, float(i), np.float32) for i in range(3)]
        for x in xs:
            result = pipe.submit({"x": x}).result(timeout=20)
            np.testing.assert_allclose(result.outputs["y"], x)  # the remote branch's answer
            assert "local_branch" not in result.stage_times
        assert _settle(pipe, "hedge", "withdrawals", 3) == 3
        assert pipe.signals("hedge")["called_off"] == 3 and pipe.signals("local_branch").get("processed", 0) == 0


def test_a_called_off_spare_is_dropped_when_its_request_expires_unanswered():
    """The remote branch's worker is killed with the request in it: the pipeline fails the request at once, but no
    answer and no failure ever reach the select. The spare its stage called off is dropped when the request's
    deadline passes (its stage is told, as for a withdrawal), not kept for good."""
    topology = spare(defer_s=0.05, then_kind="zpipe.testing:Sleep", then_options='seconds = 5.0\ngroup = "far"',
                     call_off=True)
    with Pipeline(topology) as pipe:
        x = np.full(4, 1.0, np.float32)
        future = pipe.submit({"x": x}, timeout_s=3.0)  # (the kill comes well before its deadline)
        assert _settle(pipe, "hedge", "called_off", 1) == 1
        os.kill(pipe.signals("remote_branch")["pid"], signal.SIGKILL)
        with pytest.raises(RequestFailed, match="worker of stage 'remote_branch' died"):
            future.result(timeout=20)
        assert pipe.signals("hedge").get("withdrawals") == 0  # (parked until the deadline)
        assert _settle(pipe, "hedge", "withdrawals", 1, within_s=6) == 1
        assert pipe.signals("hedge")["parked_expired"] == 1
        assert pipe.signals("local_branch").get("processed", 0) == 0


def test_a_spare_copy_its_stage_holds_longer_when_due_is_asked_again():
    """Stage.spare_due returns seconds (the gate: the link's figures still say the answer is due, so it is late for
    another reason): the spare waits that long and is asked again. An answer meanwhile withdraws it unsent."""
    remote = dict(then_kind="zpipe.testing:Sleep", then_options="seconds = 0.3")
    with Pipeline(spare(defer_s=0.05, hold_s=0.6, **remote)) as pipe:  # held to 0.65 s: the answer comes first
        for x in [np.full(4, float(i), np.float32) for i in range(3)]:
            result = pipe.submit({"x": x}).result(timeout=20)
            np.testing.assert_allclose(result.outputs["y"], x)
        assert _settle(pipe, "hedge", "withdrawals", 3) == 3
        time.sleep(0.7)
        assert pipe.signals("local_branch").get("processed", 0) == 0 and pipe.signals("hedge")["asked"] == 3
        assert pipe.signals("hedge").get("called_off", 0) == 0
    with Pipeline(spare(defer_s=0.05, hold_s=0.1, **remote)) as pipe:  # asked again at 0.15 s: it goes then
        for i, x in enumerate([np.full(4, float(i), np.float32) for i in range(3)]):
            result = pipe.submit({"x": x}).result(timeout=20)
            np.testing.assert_allclose(result.outputs["y"], -x)  # the spare answered, before the remote branch
            assert 0.14 < result.latency_s and (i == 0 or result.latency_s < 0.3), result.latency_s  # (0: cold)
        assert _settle(pipe, "hedge", "asked", 6) == 6 and pipe.signals("hedge")["withdrawals"] == 0
    with Pipeline(spare(defer_s=0.05, hold_s=float("inf"), **remote)) as pipe:  # no hold to wait out: it goes
        for x in [np.full(4, float(i), np.float32) for i in range(2)]:
            np.testing.assert_allclose(pipe.submit({"x": x}).result(timeout=20).outputs["y"], -x)
        assert _settle(pipe, "hedge", "asked", 2) == 2


def test_a_spare_copy_goes_out_when_its_select_runs_in_another_process():
    with Pipeline(spare(groups="per-stage", defer_s=0.1)) as pipe:
        xs = [np.full(4, float(i), np.float32) for i in (1, 2, 4)]
        for x in xs:
            np.testing.assert_allclose(pipe.submit({"x": x}).result(timeout=20).outputs["y"], x)
        assert pipe.signals("hedge")["joins"] == {}
        assert _settle(pipe, "local_branch", "processed", 3) == 3  # they ran, late: nothing here could stop them
