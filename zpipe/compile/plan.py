"""The stage plan: which nodes each stage runs, which tensors cross between stages, and where the gates are.

:func:`make_plan` starts from the automatic partition of :func:`~zpipe.compile.analysis.analyse` and applies, in
this order: the user's chain cuts (``--cut``), the split of every top-level ``If`` on a dynamic condition into a
gate with then/else stages, and merging down to ``max_stages`` (``--stages``). ``whole=True`` keeps the whole model
as one stage (an ``If`` inside then computes both branches, as TVM imports it).

Guarantees: the stage graph is acyclic; every dynamic node runs in exactly one stage (a gated ``If`` in its then
and else stages); stage inputs and outputs are the model's own tensor names; merging never crosses a user cut or
a gate. Stage names are derived from the structure: ``stem``, ``blockK_branchI`` (``blockK`` when one branch is
left), ``chainK``, ``head``; ``gate``/``then_branch``/``else_branch``/``select`` (numbered when several).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, replace
from typing import Sequence

from .analysis import Analysis, Block, Fork, Group, analyse, bits
from .errors import CompileError
from .graph import ModelGraph, TensorInfo, body_macs, outer_reads, subgraphs
from .partition import cut, group_edges, isolate_ifs, merge, toposort

__all__ = ["StagePlan", "GatePlan", "Edge", "Plan", "make_plan", "REQUEST", "SINK"]

REQUEST = "<request>"
SINK = "<sink>"


@dataclass(frozen=True, kw_only=True)
class StagePlan:
    """One compiled stage. ``inputs``/``outputs`` are ONNX tensor names (its TVM ports); for ``then``/``else``
    stages the wire names carry ``@then``/``@else`` (see :meth:`wire`). ``nodes`` are indices into the model's
    top-level node list (the ``If`` node for then/else stages)."""

    name: str
    role: str  # "chain", "branch", "then", "else"
    nodes: tuple[int, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    ops: int
    op_counts: tuple[tuple[str, int], ...]
    macs: int
    gate: str | None = None
    tag: str = ""  # then/else stages: "then"/"else", numbered ("then2") when the model has several gates

    def wire(self, tensor: str) -> str:
        """The topology tensor name of this stage's port ``tensor``: ``<tensor>@<tag>`` behind a gate."""
        return f"{tensor}@{self.tag}" if self.tag else tensor


@dataclass(frozen=True, kw_only=True)
class GatePlan:
    """A top-level ``If`` split into gate → then/else stages → select. ``routed`` lists the tensors the gate
    forwards (its inputs besides ``control``); ``then_inputs``/``else_inputs`` which of them each branch reads."""

    name: str
    select: str
    if_node: str
    if_index: int
    control: str
    routed: tuple[str, ...]
    then_inputs: tuple[str, ...]
    else_inputs: tuple[str, ...]
    then_stage: str
    else_stage: str
    outputs: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class Edge:
    """A tensor travelling from one stage (or the request) to another (or the reply): a cut."""

    producer: str
    consumer: str
    tensor: str
    info: TensorInfo


@dataclass(frozen=True, kw_only=True)
class Plan:
    model: str
    source_sha256: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    stages: tuple[StagePlan, ...]  # topological order
    gates: tuple[GatePlan, ...]
    edges: tuple[Edge, ...]
    chain_cuts: tuple[str, ...]
    forks: tuple[Fork, ...]
    blocks: tuple[Block, ...]
    notes: tuple[str, ...] = ()

    def stage(self, name: str) -> StagePlan:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)


def make_plan(graph: ModelGraph, *, cuts: Sequence[str] = (), max_stages: int | None = None,
              whole: bool = False) -> Plan:
    """Plan the stages of ``graph``; raises CompileError for a ``--cut`` that names no usable tensor."""
    analysis = analyse(graph)
    notes: list[str] = []
    if whole:
        groups = [Group(nodes=(1 << len(graph.nodes)) - 1, role="chain")]
        sticky: set[str] = set()
    else:
        groups = list(analysis.groups)
        sticky = set()
        for tensor in cuts:
            groups, changed = cut(graph, analysis, groups, tensor)
            sticky.add(tensor)
            if not changed:
                notes.append(f"--cut {tensor}: already a stage boundary")
        groups = isolate_ifs(graph, analysis, groups)
        if max_stages is not None:
            groups = merge(graph, groups, max_stages, sticky, notes)
    return _build(graph, analysis, toposort(graph, groups), tuple(notes))


# -- naming and wiring -----------------------------------------------------------------------------------------------
def _build(graph: ModelGraph, analysis: Analysis, groups: list[Group], notes: tuple[str, ...]) -> Plan:
    names = _names(graph, groups)
    stages: list[StagePlan] = []
    gates: list[GatePlan] = []
    for group, name in zip(groups, names):
        positions = bits(group.nodes)
        if group.role == "if":
            gate, then_stage, else_stage = _gate(graph, positions[0], name)
            gates.append(gate)
            stages.extend([then_stage, else_stage])
            continue
        inside = set(positions)
        inputs = [t for p in positions for t in graph.nodes[p].inputs if graph.producer(t) not in inside]
        outputs = [t for p in positions for t in graph.nodes[p].outputs
                   if t in graph.outputs or any(c not in inside for c in graph.consumers(t))]
        ops = Counter(graph.nodes[p].op_type for p in positions)
        stages.append(StagePlan(name=name, role=group.role, nodes=tuple(graph.nodes[p].index for p in positions),
                                inputs=tuple(dict.fromkeys(inputs)), outputs=tuple(outputs),
                                ops=len(positions) + sum(graph.nodes[p].body_ops for p in positions),
                                op_counts=tuple(sorted(ops.items())),
                                macs=sum(graph.nodes[p].macs for p in positions)))
    plan = Plan(model=graph.name, source_sha256=graph.source_sha256, inputs=graph.inputs, outputs=graph.outputs,
                stages=tuple(stages), gates=tuple(gates), edges=(), chain_cuts=analysis.chain_cuts,
                forks=analysis.forks, blocks=analysis.blocks, notes=notes)
    return replace(plan, edges=tuple(_edges(graph, plan)))


def _names(graph: ModelGraph, groups: list[Group]) -> list[str]:
    ifs = sum(1 for g in groups if g.role == "if")
    blocks = list(dict.fromkeys(g.block for g in groups if g.role == "branch"))
    per_block = Counter(g.block for g in groups if g.role == "branch")
    seen_in_block: Counter = Counter()
    edges = group_edges(graph, groups)
    chains = [i for i, g in enumerate(groups) if g.role == "chain"]
    names, gate_number, chain_number = [], 0, 0
    for i, group in enumerate(groups):
        if group.role == "if":
            gate_number += 1
            names.append("gate" if ifs == 1 else f"gate{gate_number}")
        elif group.role == "branch":
            k = blocks.index(group.block) + 1
            names.append(f"block{k}_branch{seen_in_block[group.block]}" if per_block[group.block] > 1
                         else f"block{k}")
            seen_in_block[group.block] += 1
        elif len(groups) == 1:
            names.append("model")
        elif i == chains[0] and not any(d == i for _, d in edges):
            names.append("stem")
        elif i == chains[-1] and not any(s == i for s, _ in edges):
            names.append("head")
        else:
            chain_number += 1
            names.append(f"chain{chain_number}")
    return names


def _gate(graph: ModelGraph, pos: int, name: str) -> tuple[GatePlan, StagePlan, StagePlan]:
    info = graph.nodes[pos]
    node = graph.model.graph.node[info.index]
    control = node.input[0]
    bodies = {a.name: a.g for a in node.attribute if a.name in ("then_branch", "else_branch")}
    dynamic = set(graph.inputs) | {t for n in graph.nodes for t in n.outputs}
    reads = {branch: [t for t in outer_reads(bodies[f"{branch}_branch"]) if t in dynamic and t != control]
             for branch in ("then", "else")}
    routed = list(dict.fromkeys(reads["then"] + reads["else"]))
    if not routed:
        raise CompileError(f"If node {info.name!r}: neither branch reads a tensor from the outer graph, so the gate "
                           "has nothing to route; compile with --whole")
    smallest = min(routed, key=lambda t: graph.tensors[t].nbytes or math.inf)
    outputs = tuple(t for t in info.outputs if t in graph.outputs or graph.consumers(t))
    suffix = name[len("gate"):]
    stage_names = {"then": f"then{suffix}" if suffix else "then_branch",
                   "else": f"else{suffix}" if suffix else "else_branch"}
    stages = []
    for branch in ("then", "else"):
        body = bodies[f"{branch}_branch"]
        ops = Counter(n.op_type for n in body.node)
        stages.append(StagePlan(name=stage_names[branch], role=branch, nodes=(info.index,),
                                inputs=tuple(reads[branch] or [smallest]), outputs=outputs,
                                ops=_count(body), op_counts=tuple(sorted(ops.items())),
                                macs=body_macs(body, graph.tensors), gate=name, tag=f"{branch}{suffix}"))
    gate = GatePlan(name=name, select=f"select{suffix}", if_node=info.name, if_index=info.index, control=control,
                    routed=tuple(routed), then_inputs=stages[0].inputs, else_inputs=stages[1].inputs,
                    then_stage=stages[0].name, else_stage=stages[1].name, outputs=outputs)
    return gate, stages[0], stages[1]


def _count(graph_proto) -> int:
    return sum(1 + sum(_count(g) for g in subgraphs(n)) for n in graph_proto.node)


def _edges(graph: ModelGraph, plan: Plan) -> list[Edge]:
    """Every tensor hop between the request, stages, gates, selects and the reply, in stage order."""
    producer = {t: REQUEST for t in plan.inputs}
    for stage in plan.stages:
        if stage.role not in ("then", "else"):
            producer.update((t, stage.name) for t in stage.outputs)
    for gate in plan.gates:
        producer.update((t, gate.select) for t in gate.outputs)
    hops: list[tuple[str, str, str, str]] = []  # producer, consumer, wire name, ONNX name
    for stage in plan.stages:
        if stage.role in ("then", "else"):
            hops += [(stage.gate, stage.name, stage.wire(t), t) for t in stage.inputs]
        else:
            hops += [(producer[t], stage.name, t, t) for t in stage.inputs]
    for gate in plan.gates:
        hops += [(producer[t], gate.name, t, t) for t in (gate.control, *gate.routed)]
        for branch in (plan.stage(gate.then_stage), plan.stage(gate.else_stage)):
            hops += [(branch.name, gate.select, branch.wire(t), t) for t in gate.outputs]
    hops += [(producer[t], SINK, t, t) for t in plan.outputs]
    order = {REQUEST: -1, **{name: i for i, name in enumerate(_topology_order(plan))}}
    hops.sort(key=lambda hop: order[hop[0]])
    return [Edge(producer=src, consumer=dst, tensor=wire, info=graph.tensors[name]) for src, dst, wire, name in hops]


def _topology_order(plan: Plan) -> list[str]:
    """Compute stages, gates and selects in the order a topology lists them."""
    names: list[str] = []
    gates = {g.then_stage: g.name for g in plan.gates}
    selects = {g.else_stage: g.select for g in plan.gates}
    for stage in plan.stages:
        names += [gates[stage.name]] if stage.name in gates else []
        names.append(stage.name)
        names += [selects[stage.name]] if stage.name in selects else []
    return names
