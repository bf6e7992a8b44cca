"""Edits of a partition of a model's dynamic nodes into groups (future stages), keeping the group graph acyclic.

* :func:`cut` splits the group computing a tensor into that tensor's ancestors and the rest (``--cut``);
* :func:`isolate_ifs` gives every top-level ``If`` on a run-time condition a group of its own (a future gate);
* :func:`merge` merges the cheapest neighbouring groups until few enough are left (``--stages``);
* :func:`toposort` orders groups producers first, and :func:`group_edges` lists which group feeds which.

Why splits stay acyclic: the first part of a split holds only ancestors of a node ``v`` and the second part none,
so no path can lead from the second part back into the first. Merges are refused when a path through a third
group joins the pair.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from .analysis import Analysis, Group, bits
from .errors import CompileError
from .graph import ModelGraph, close_names

__all__ = ["cut", "isolate_ifs", "merge", "toposort", "group_edges", "gated_ifs"]


def cut(graph: ModelGraph, analysis: Analysis, groups: list[Group], tensor: str) -> tuple[list[Group], bool]:
    """Split the group computing ``tensor`` after it; returns the groups and whether anything changed.

    Raises CompileError (with close names) when ``tensor`` is unknown, a model input, a constant, or computed
    inside an If/Loop body."""
    where = f"--cut {tensor}"
    if tensor in graph.body_tensors:
        raise CompileError(f"{where}: tensor {tensor!r} is computed inside the body of node "
                           f"{graph.body_tensors[tensor]!r}; cut at that node's inputs or outputs instead")
    if tensor in graph.inputs:
        raise CompileError(f"{where}: {tensor!r} is a model input; stages already start there")
    if tensor in graph.constants:
        raise CompileError(f"{where}: {tensor!r} is a constant (a weight or folded shape), not an activation")
    producer = graph.producer(tensor)
    if producer is None:
        names = [t for n in graph.nodes for t in n.outputs]
        raise CompileError(f"{where}: model {graph.path!r} has no tensor {tensor!r}{close_names(tensor, names)}")
    anc = analysis.ancestors[producer]
    for i, group in enumerate(groups):
        if group.nodes >> producer & 1:
            before, after = group.nodes & anc, group.nodes & ~anc
            if not after:
                return groups, False
            return groups[:i] + [replace(group, nodes=before), replace(group, nodes=after)] + groups[i + 1:], True
    raise AssertionError(f"node of {tensor!r} is in no group")


def gated_ifs(graph: ModelGraph) -> list[int]:
    """Positions of top-level If nodes whose condition is computed at run time (a model input or activation)."""
    found = []
    for pos, node in enumerate(graph.nodes):
        cond = graph.model.graph.node[node.index].input[0] if node.op_type == "If" else None
        if cond is not None and (cond in graph.inputs or graph.producer(cond) is not None):
            found.append(pos)
    return found


def isolate_ifs(graph: ModelGraph, analysis: Analysis, groups: list[Group]) -> list[Group]:
    """Give every gated If (see :func:`gated_ifs`) a group of its own (role ``if``), between its ancestors' part
    of its former group and the rest."""
    for pos in gated_ifs(graph):
        anc = analysis.ancestors[pos]
        for i, group in enumerate(groups):
            if group.nodes >> pos & 1:
                parts = [replace(group, nodes=group.nodes & anc & ~(1 << pos)),
                         Group(nodes=1 << pos, role="if"), replace(group, nodes=group.nodes & ~anc)]
                groups = groups[:i] + [p for p in parts if p.nodes] + groups[i + 1:]
                break
    return groups


def merge(graph: ModelGraph, groups: list[Group], max_stages: int, sticky: set[str],
           notes: list[str]) -> list[Group]:
    """Merge the cheapest neighbouring pair (producer→consumer, or siblings of one block) until at most
    ``max_stages`` compiled stages are left (a gated If counts two), keeping the stage graph acyclic."""

    def count(gs: list[Group]) -> int:
        return sum(2 if g.role == "if" else 1 for g in gs)

    def cost(g: Group) -> int:
        return sum(graph.nodes[p].macs for p in bits(g.nodes))

    while count(groups) > max_stages:
        edges = group_edges(graph, groups)
        reach = _reach(edges, len(groups))
        by_block: dict[int, list[int]] = {}
        for i, g in enumerate(groups):
            if g.role == "branch":
                by_block.setdefault(g.block, []).append(i)
        pairs = {tuple(sorted(e)) for e in edges}
        pairs |= {(a, b) for members in by_block.values() for a in members for b in members if a < b}
        best = None
        for i, j in pairs:
            a, b = groups[i], groups[j]
            if "if" in (a.role, b.role) or _crosses(graph, a, b, sticky) or _detour(edges, reach, i, j):
                continue
            key = (cost(a) + cost(b), i, j)
            best = min(best, key) if best else key
        if best is None:
            notes.append(f"--stages {max_stages}: stopped at {count(groups)} stages (gates, user cuts or the "
                         "graph's shape keep the rest apart)")
            break
        _, i, j = best
        a, b = groups[i], groups[j]
        same_block = a.role == b.role == "branch" and a.block == b.block
        merged = Group(nodes=a.nodes | b.nodes, role="branch" if same_block else "chain",
                       block=a.block if same_block else None)
        groups = [g for k, g in enumerate(groups) if k not in (i, j)]
        groups.insert(i, merged)
    return groups


def _crosses(graph: ModelGraph, a: Group, b: Group, sticky: set[str]) -> bool:
    for tensor in sticky:
        producer = graph.producer(tensor)
        for src, dst in ((a, b), (b, a)):
            if src.nodes >> producer & 1 and any(dst.nodes >> c & 1 for c in graph.consumers(tensor)):
                return True
    return False


def group_edges(graph: ModelGraph, groups: list[Group]) -> set[tuple[int, int]]:
    owner = {p: i for i, g in enumerate(groups) for p in bits(g.nodes)}
    edges = set()
    for pos, node in enumerate(graph.nodes):
        for tensor in node.inputs:
            producer = graph.producer(tensor)
            if producer is not None and owner[producer] != owner[pos]:
                edges.add((owner[producer], owner[pos]))
    return edges


def _reach(edges: set[tuple[int, int]], n: int) -> list[int]:
    """Per group, the bitmask of the groups reachable from it (edges form a DAG)."""
    succ: dict[int, list[int]] = {}
    indegree = [0] * n
    for src, dst in edges:
        succ.setdefault(src, []).append(dst)
        indegree[dst] += 1
    order, ready = [], [i for i in range(n) if not indegree[i]]
    while ready:
        i = ready.pop()
        order.append(i)
        for d in succ.get(i, []):
            indegree[d] -= 1
            if not indegree[d]:
                ready.append(d)
    reach = [0] * n
    for i in reversed(order):
        for d in succ.get(i, []):
            reach[i] |= (1 << d) | reach[d]
    return reach


def _detour(edges: set[tuple[int, int]], reach: list[int], i: int, j: int) -> bool:
    """Whether a path through a third group joins groups i and j (merging them would then form a cycle)."""
    for src, dst in ((i, j), (j, i)):
        if any(reach[k] >> dst & 1 for s, k in edges if s == src and k != dst):
            return True
    return False


def toposort(graph: ModelGraph, groups: list[Group]) -> list[Group]:
    edges = group_edges(graph, groups)
    indegree = Counter(d for _, d in edges)
    ready = sorted((min(bits(g.nodes)), i) for i, g in enumerate(groups) if not indegree[i])
    order = []
    while ready:
        _, i = ready.pop(0)
        order.append(groups[i])
        for s, d in sorted(edges):
            if s == i:
                indegree[d] -= 1
                if not indegree[d]:
                    ready.append((min(bits(groups[d].nodes)), d))
                    ready.sort()
    if len(order) != len(groups):
        raise AssertionError("stage graph has a cycle")
    return order
