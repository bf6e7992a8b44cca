"""Which stages share a worker process: stage groups.

A stage is a unit of placement and scheduling; a process is a unit of isolation and parallelism. A model cut at
every branch point has dozens of stages, and a process per stage would pay ``import tvm`` (about 1 s and 200 MB
here) dozens of times. So the device runs its stages in a few worker processes, each hosting a *group*: stages in
one group hand tensors over in memory, stages in different groups use the framing layer (see :mod:`zpipe.worker`).

How stages are grouped:

1. ``group = "name"`` on a stage puts it in that group. Groups are per process on this device; a stage placed on
   an edge server is represented here by its stand-in (which forwards requests and waits), and that is what its
   group hosts.
2. ``[pipeline] groups = "per-stage"`` gives every other stage its own process: the most isolation (a crash takes
   one stage down), the most memory and start-up time.
3. Otherwise (``groups = "auto"``, the default) the other stages are spread over *lanes*, one process each:

   - a stage whose only producer feeds only it continues that producer's lane: chains fuse;
   - the branches leaving a fork are spread over the lanes, heaviest first, each to the lane that has the least
     of that fork's work so far (the fork's own lane wins ties); light branches (merge and gate stages, remote
     stand-ins: no local compute) stay on the fork's lane;
   - the compute branches after a gate run on lanes other than the gate's: the gate then keeps routing while they
     compute, and sees their backlog (its policy's "device busy" signal) instead of a queue in front of itself;
   - a join takes the lowest lane among its producers, except the ``select`` joining a gate's branches, which
     takes the gate's lane (there it can withdraw the gate's spare copies: zpipe.stage.Outcome.spare).

   There are as many lanes as the widest fork has compute branches (plus one after a gate), capped at
   ``max_groups`` (default: this machine's CPU count), because more processes than cores add memory but no speed.
   A chain runs in one process.

A branch's weight is the sum of its stages' costs along its chain. Costs come from ``costs`` when given
(``zpipe compile`` passes each stage's multiply-accumulate count and writes the groups into the topology it emits),
else 1 per compute stage and 0 per light stage.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping

from .errors import TopologyError

if TYPE_CHECKING:
    from .topology import Topology

__all__ = ["Grouping", "plan_groups", "AUTO", "PER_STAGE"]

AUTO = "auto"
PER_STAGE = "per-stage"


@dataclass(frozen=True)
class Grouping:
    """Group name -> its stages (topological order); groups are ordered by their first stage."""

    groups: dict[str, tuple[str, ...]]
    _by_stage: dict[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_stage", {s: g for g, stages in self.groups.items() for s in stages})

    def group_of(self, stage: str) -> str:
        return self._by_stage[stage]

    def describe(self, group: str) -> str:
        """How errors name a group: by its stage when it has one, else by name and stages."""
        stages = self.groups[group]
        if len(stages) == 1:
            return f"stage {stages[0]!r}"
        return f"group {group!r} (stages {', '.join(stages)})"

    def explain(self, topology: "Topology") -> str:
        """A human-readable table: which stage runs in which process, on which host."""
        from .topology import LOCAL_HOST

        lines = [f"{len(self.groups)} worker process{'es' if len(self.groups) != 1 else ''} on {LOCAL_HOST} "
                 f"for {len(topology.stages)} stage{'s' if len(topology.stages) != 1 else ''} "
                 f"(grouping: {topology.groups}):"]
        for group, stages in self.groups.items():
            names = []
            for name in stages:
                spec = topology.stage(name)
                if spec.host != LOCAL_HOST:
                    host = topology.host(spec.host)
                    endpoint = ", ".join(host.endpoint) if isinstance(host.endpoint, tuple) else host.endpoint
                    names.append(f"{name} [runs on {spec.host} {endpoint}; stand-in here]")
                else:
                    names.append(name)
            lines.append(f"  {group}: {', '.join(names)}")
        return "\n".join(lines)


def plan_groups(topology: "Topology", *, max_groups: int | None = None,
                costs: Mapping[str, float] | None = None) -> Grouping:
    """Group ``topology``'s stages into worker processes (see the module doc for the rules)."""
    explicit = {s.name: s.group for s in topology.stages if s.group}
    rest = [name for name in topology.order() if name not in explicit]
    assignment = dict(explicit)
    if topology.groups == PER_STAGE:
        clash = sorted(set(rest) & set(explicit.values()))
        if clash:
            raise TopologyError(f"group names {clash} are also names of stages that run alone (groups = "
                                f"'{PER_STAGE}'); rename the groups")
        assignment.update({name: name for name in rest})
    else:
        cap = max_groups or topology.max_groups or os.cpu_count() or 1
        lanes = _lanes(topology, rest, cap, costs or {})
        assignment.update({name: f"auto{lane}" for name, lane in lanes.items()})
    groups: dict[str, list[str]] = {}
    for name in topology.order():
        groups.setdefault(assignment[name], []).append(name)
    return Grouping({group: tuple(stages) for group, stages in groups.items()})


def _lanes(topology: "Topology", names: list[str], cap: int, costs: Mapping[str, float]) -> dict[str, int]:
    """Lane per stage for ``names`` (topological order), numbered from 0 in order of first use."""
    from .topology import LOCAL_HOST

    inside = set(names)
    producers: dict[str, list[str]] = {}
    for name in names:
        found = [topology.producer(t) for t in topology.stage(name).tensors_in()]
        producers[name] = list(dict.fromkeys(p for p in found if p in inside))
    consumers: dict[str, list[str]] = {name: [] for name in names}
    for name in names:
        for producer in producers[name]:
            consumers[producer].append(name)

    def cost(name: str) -> float:
        spec = topology.stage(name)
        if spec.host != LOCAL_HOST:  # a stand-in: the compute happens on the server
            return 0.0
        if name in costs:
            return float(costs[name])
        return 0.0 if getattr(spec.stage, "light", False) else 1.0

    def branch_cost(name: str) -> float:  # this stage and the chain that continues it
        total = cost(name)
        while len(consumers[name]) == 1 and producers[consumers[name][0]] == [name]:
            name = consumers[name][0]
            total += cost(name)
        return total

    def siblings(parent: str | None) -> list[str]:
        if parent is None:
            return [n for n in names if not producers[n]]
        return [c for c in consumers[parent] if producers[c] == [parent]]

    def is_gate(name: str | None) -> bool:
        return name is not None and bool(getattr(topology.stage(name).stage, "may_skip_outputs", False))

    width = max(sum(1 for c in siblings(parent) if branch_cost(c) > 0) + is_gate(parent)
                for parent in [None, *names])
    count = max(1, min(cap, width))
    lane: dict[str, int] = {}
    # The select joining a gate's branches goes where the gate is: there it can withdraw the gate's spare copies
    # (zpipe.stage.Outcome.spare) when the other branch answers first.
    gate_of = {join: gate for gate in names if is_gate(gate) for t in topology.stage(gate).tensors_out()
               if (join := topology.join_of(t)) in inside}

    def spread(branches: list[str], base: int, *, avoid_base: bool) -> None:
        load = [0.0] * count
        if avoid_base and count > 1:
            load[base] = float("inf")
        for branch in sorted(branches, key=lambda b: -branch_cost(b)):  # stable: ties keep topology order
            weight = branch_cost(branch)
            if weight <= 0:
                lane[branch] = base
                continue
            best = min(range(count), key=lambda i: (load[i], (i - base) % count))
            lane[branch] = best
            load[best] += weight

    for name in names:
        if name in lane:
            continue
        parents = producers[name]
        if name in gate_of and gate_of[name] in lane:
            lane[name] = lane[gate_of[name]]
        elif len(parents) > 1:
            lane[name] = min(lane[p] for p in parents)
        else:
            parent = parents[0] if parents else None
            spread(siblings(parent), lane[parent] if parent else 0, avoid_base=is_gate(parent))
    renumber: dict[int, int] = {}
    return {name: renumber.setdefault(lane[name], len(renumber)) for name in names}
