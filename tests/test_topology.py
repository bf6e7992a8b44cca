"""Topology files: what loads, and the precise error for each way one can be wrong."""

from __future__ import annotations

import textwrap

import pytest

from zpipe import ArtifactError, StageSpec, Topology, TopologyError
from zpipe.testing import Scale
from zpipe.topology import REQUEST, SINK

GOOD = """
[pipeline]
name = "t"
inputs = ["x"]
outputs = ["y"]

[stages.a]
kind = "zpipe.testing:Scale"
factor = 2.0
inputs = ["x"]
outputs = { out = "h" }

[stages.b]
kind = "zpipe.testing:Scale"
inputs = { x = "h" }
outputs = { out = "b" }

[stages.c]
kind = "zpipe.testing:Scale"
inputs = { x = "h" }
outputs = { out = "c" }

[stages.m]
kind = "merge"
op = "add"
inputs = ["b", "c"]
outputs = ["y"]
"""


def load(text: str, tmp_path=None) -> Topology:
    return Topology.from_toml(textwrap.dedent(text), base_dir=tmp_path or ".")


def test_good_topology_wiring():
    topo = load(GOOD)
    assert topo.order()[0] == "a" and topo.order()[-1] == "m"
    assert topo.routes(REQUEST) == {"a": ("x",)}
    assert topo.routes("a") == {"b": ("h",), "c": ("h",)}
    assert topo.routes("m") == {SINK: ("y",)}
    assert topo.producer("h") == "a"
    assert topo.stage("a").stage.factor == 2.0


@pytest.mark.parametrize("edit, error, match", [
    (lambda t: t.replace('name = "t"', 'nmae = "t"'), TopologyError, r"unknown key 'nmae'; did you mean 'name'"),
    (lambda t: t.replace("factor = 2.0", "facter = 2.0"), TopologyError,
     r"\[stages.a\]: unknown key 'facter' for kind 'zpipe.testing:Scale'; did you mean 'factor'"),
    (lambda t: t + "\n[extra]\n", TopologyError, "top level: unknown key 'extra'"),
    (lambda t: t.replace('kind = "merge"', 'kind = "merj"'), TopologyError,
     r"unknown stage kind 'merj'.*did you mean 'merge'"),
    (lambda t: t.replace('kind = "merge"', 'kind = "nosuch.module:X"'), TopologyError, "cannot import module"),
    (lambda t: t.replace('inputs = ["b", "c"]', 'inputs = ["b", "cc"]'), TopologyError,
     r"stage 'm' input 'cc' reads tensor 'cc', which no stage produces.*did you mean 'c'"),
    (lambda t: t.replace('outputs = ["y"]\n\n[stages.a]', 'outputs = ["z"]\n\n[stages.a]'), TopologyError,
     "pipeline output 'z' is produced by no stage"),
    (lambda t: t.replace('outputs = { out = "c" }', 'outputs = { out = "b" }'), TopologyError,
     "tensor 'b' is produced twice: by stage 'b' and by stage 'c'"),
    (lambda t: t.replace('inputs = { x = "h" }\noutputs = { out = "b" }', 'inputs = { x = "y" }\noutputs = { out = "b" }'),
     TopologyError, "the stages form a cycle: (b -> m -> b|m -> b -> m)"),
    (lambda t: t.replace('inputs = { x = "h" }\noutputs = { out = "c" }', 'inputs = { x = "x" }\noutputs = { out = "c" }')
     .replace('inputs = ["b", "c"]', 'inputs = ["b"]'), TopologyError,
     "output of stage 'c' 'c' is not connected"),
    (lambda t: t.replace('inputs = { x = "h" }\noutputs = { out = "b" }', 'inputs = { q = "h" }\noutputs = { out = "b" }'),
     TopologyError, "stage 'b' has no input port 'q'"),
    (lambda t: t.replace('[stages.m]\nkind = "merge"', '[stages.m]\nkind = "merge"\nhost = "edge"'),
     TopologyError, "host 'edge' is not 'device' and not in \\[hosts\\]"),
    (lambda t: t.replace('op = "add"', 'op = "mul"'), TopologyError, "merge op 'mul' is not one of"),
    (lambda t: t.replace('name = "t"', 'name = "t"\nhwm = 0'), TopologyError, "hwm must be a positive"),
    (lambda t: t.replace("[stages.a]", "[stages.a]\nkind2 = 1"), TopologyError, "unknown key 'kind2'"),
    (lambda t: t.replace("[pipeline]", "[pipeline"), TopologyError, "not valid TOML"),
    (lambda t: t.replace('outputs = ["y"]\n\n[stages.a]', 'outputs = ["y", "y"]\n\n[stages.a]'), TopologyError,
     "outputs repeats a tensor"),
    (lambda t: t.replace('name = "t"', 'name = "t"\ntimeout_s = inf'), TopologyError, "positive finite number"),
    (lambda t: t.replace('name = "t"', 'name = "t"\njoin_timeout_s = nan'), TopologyError, "positive finite"),
    (lambda t: t.replace('kind = "merge"', 'kind = 5'), TopologyError, "'kind' must be a string"),
])
def test_topology_errors_name_the_culprit(edit, error, match):
    with pytest.raises(error, match=match):
        load(edit(textwrap.dedent(GOOD)))


@pytest.mark.parametrize("line, match", [
    ("ping_s = inf", r"\[hosts.edge\]: ping_s must be a non-negative finite number, got inf"),
    ("ping_s = -0.1", "ping_s must be a non-negative finite number"),
    ("heartbeat_s = nan", "heartbeat_s must be a non-negative finite number"),
    ("timeout_s = 0", r"\[hosts.edge\]: timeout_s must be a positive finite number, got 0"),
    ("ping_s = true", "ping_s must be a non-negative finite number, got True"),
])
def test_host_numbers_are_checked(line, match):
    text = f"""
    [pipeline]
    inputs = ["x"]
    outputs = ["y"]
    [hosts.edge]
    endpoint = "tcp://127.0.0.1:5555"
    {line}
    [stages.s]
    kind = "zpipe.testing:Scale"
    inputs = ["x"]
    outputs = {{ out = "y" }}
    """
    with pytest.raises(TopologyError, match=match):
        Topology.from_toml(textwrap.dedent(text))
    assert Topology.from_toml(textwrap.dedent(text.replace(line, "ping_s = 0"))).host("edge").ping_s == 0


def test_missing_artifact(tmp_path):
    text = """
    [pipeline]
    inputs = ["x"]
    outputs = ["y"]
    [stages.model]
    kind = "tvm"
    library = "missing.so"
    inputs = ["x"]
    outputs = ["y"]
    """
    with pytest.raises(ArtifactError, match=r"\[stages.model\]: TVM library '.*missing.so' does not exist"):
        load(text, tmp_path)
    (tmp_path / "missing.so").write_bytes(b"\x7fELF")
    with pytest.raises(ArtifactError, match="manifest '.*missing.json' does not exist"):
        load(text, tmp_path)
    (tmp_path / "missing.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not JSON"):
        load(text, tmp_path)


def test_unreadable_file(tmp_path):
    with pytest.raises(TopologyError, match="cannot read topology file"):
        Topology.from_file(tmp_path / "nope.toml")


def test_in_code_topology_and_port_forms():
    topo = Topology(inputs=["x"], outputs=["y"], stages=[
        StageSpec(name="s", stage=Scale(factor=3.0), inputs={"x": "x"}, outputs={"out": "y"})])
    assert topo.stage("s").inputs == (("x", "x"),)
    with pytest.raises(TopologyError, match="expected a zpipe.Stage instance.*PythonStage"):
        StageSpec(name="s", stage=lambda d: d, inputs=["x"], outputs=["y"])
    with pytest.raises(TopologyError, match="stage name 'bad name'"):
        StageSpec(name="bad name", stage=Scale(), inputs=["x"], outputs={"out": "y"})
    with pytest.raises(TopologyError, match="stage 's' needs at least one entry in 'inputs'"):
        StageSpec(name="s", stage=Scale(), inputs={}, outputs={"out": "y"})


def test_join_of_names_the_select_that_makes_a_held_copy_moot():
    from test_gate import GATED, gated

    topology = gated()
    assert topology.join_of("h@else") == "select" and topology.join_of("h@then") == "select"
    assert topology.join_of("h") is None and topology.join_of("y") is None  # before the gate; after the select
    # A branch that also feeds the pipeline's outputs is not only on its way to the select.
    leaky = GATED.replace('outputs = ["z"]', 'outputs = ["z", "y@else"]')
    assert gated(leaky).join_of("h@else") is None and gated(leaky).join_of("h@then") == "select"
    # Nor one whose stage also reads a tensor from outside the branch (it would wait for it in vain).
    mixed = GATED.replace('kind = "zpipe.testing:Scale"\nfactor = -1.0\ninputs = { x = "h@else" }\noutputs = { out = "y@else" }',
                          'kind = "merge"\nop = "add"\ninputs = ["h@else", "h"]\noutputs = ["y@else"]')
    assert mixed != GATED
    assert gated(mixed).join_of("h@else") is None


def test_a_skipped_branch_is_told_at_its_join():
    """A gate's skip notice for a branch that is its own up to the select goes straight there, naming the select's
    inputs from that branch; a branch that leaks or waits for something else gets the notice the long way."""
    from test_gate import GATED, gated

    assert gated().skip_shortcut(("h@else",)) == ("select", ("y@else",))
    assert gated().skip_shortcut(("h@then",)) == ("select", ("y@then",))
    longer = GATED.replace('inputs = { x = "h@else" }\noutputs = { out = "y@else" }',
                           'inputs = { x = "h@else" }\noutputs = { out = "m@else" }\n\n[stages.more]\n'
                           'kind = "zpipe.testing:Scale"\ninputs = { x = "m@else" }\noutputs = { out = "y@else" }')
    assert longer != GATED
    assert gated(longer).skip_shortcut(("h@else",)) == ("select", ("y@else",))
    leaky = GATED.replace('outputs = ["z"]', 'outputs = ["z", "y@else"]')
    assert gated(leaky).skip_shortcut(("h@else",)) is None
    mixed = GATED.replace('kind = "zpipe.testing:Scale"\nfactor = -1.0\ninputs = { x = "h@else" }\noutputs = { out = "y@else" }',
                          'kind = "merge"\nop = "add"\ninputs = ["h@else", "h"]\noutputs = ["y@else"]')
    assert mixed != GATED
    assert gated(mixed).skip_shortcut(("h@else",)) is None  # it would wait for h@else in vain


def test_join_of_passes_through_a_select_fed_from_within_and_refuses_two_ways_out():
    from test_gate import GATED, gated

    # The local branch holds a second gate with its own select: the first gate's copy leads to the outer select.
    nested = GATED.replace('''[stages.local_branch]
kind = "zpipe.testing:Scale"
factor = -1.0
inputs = { x = "h@else" }
outputs = { out = "y@else" }''', '''[stages.inner]
kind = "gate"
meta_key = "inner_x"
inputs = { h = "h@else" }
outputs = { "then.h" = "g@then", "else.h" = "g@else" }

[stages.inner_a]
kind = "zpipe.testing:Scale"
inputs = { x = "g@then" }
outputs = { out = "k@then" }

[stages.inner_b]
kind = "zpipe.testing:Scale"
factor = -1.0
inputs = { x = "g@else" }
outputs = { out = "k@else" }

[stages.inner_select]
kind = "merge"
op = "select"
inputs = ["k@then", "k@else"]
outputs = ["y@else"]''')
    assert nested != GATED
    topology = gated(nested)
    assert topology.join_of("h@else") == "select" and topology.join_of("g@else") == "inner_select"
    # Not if the inner gate also reads the request's control tensor: it would wait for the withdrawn copy.
    wired = nested.replace('meta_key = "inner_x"\ninputs = { h = "h@else" }',
                           'control = "ctl"\ninputs = { ctl = "ctl", h = "h@else" }')
    assert wired != nested and gated(wired).join_of("h@else") is None
    # A branch whose result also goes past the select (to a stage after it) has two ways out.
    past = GATED.replace('inputs = { x = "y" }\noutputs = { out = "z" }',
                         'inputs = ["y", "y@else"]\noutputs = ["z"]').replace(
        '[stages.post]\nkind = "zpipe.testing:Scale"\noffset = 0.5', '[stages.post]\nkind = "merge"\nop = "add"')
    assert past != GATED and gated(past).join_of("h@else") is None and gated(past).join_of("h@then") == "select"
    assert gated().join_of("z") is None  # a pipeline output leads nowhere


def test_the_select_of_a_gate_runs_in_the_gates_process():
    """Even where its producers' lowest lane is another one: the gate's process withdraws its spare copies when
    the select runs there (zpipe.stage.Outcome.spare)."""
    topology = Topology.from_toml(textwrap.dedent("""
        [pipeline]
        inputs = ["x", "ctl"]
        outputs = ["z"]
        max_groups = 2

        [stages.a]
        kind = "zpipe.testing:Scale"
        inputs = ["x"]
        outputs = { out = "a" }

        [stages.b1]
        kind = "zpipe.testing:Scale"
        inputs = ["x"]
        outputs = { out = "b1" }

        [stages.b2]
        kind = "zpipe.testing:Scale"
        inputs = { x = "b1" }
        outputs = { out = "b2" }

        [stages.gate]
        kind = "gate"
        control = "ctl"
        inputs = { ctl = "ctl", h = "a" }
        outputs = { "then.h" = "h@then", "else.h" = "h@else" }

        [stages.light_branch]
        kind = "merge"
        op = "pass"
        inputs = ["h@then"]
        outputs = ["y@then"]

        [stages.local_branch]
        kind = "zpipe.testing:Scale"
        inputs = { x = "h@else" }
        outputs = { out = "y@else" }

        [stages.select]
        kind = "merge"
        op = "select"
        inputs = ["y@then", "y@else"]
        outputs = ["y"]

        [stages.last]
        kind = "merge"
        op = "add"
        inputs = ["y", "b2"]
        outputs = ["z"]
        """))
    groups = {stage: group for group, stages in topology.grouping().groups.items() for stage in stages}
    assert groups["b1"] != groups["gate"] and groups["local_branch"] != groups["gate"], groups
    assert groups["select"] == groups["gate"] == groups["light_branch"], groups
