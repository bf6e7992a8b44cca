"""Where a model can be cut: chain cuts, fork tensors and their joins, and the parallel blocks between them.

Definitions (over the dynamic nodes of a :class:`~zpipe.compile.graph.ModelGraph`; the model's inputs come from a
virtual source that precedes every node):

* a **chain cut** is a tensor ``T`` such that, with ``A`` = the producer of ``T`` and all its ancestors, ``T`` is
  the only tensor crossing from ``A`` (or from the model inputs) to the rest of the graph; chain cuts are nested,
  so they split the graph into consecutive *segments*;
* a **fork** is a tensor read by more than one node; its **join** is the first node (in topological order) that
  two of those readers both reach;
* inside a segment, nodes that every later node of the segment depends on form its *prefix*; the *first nodes*
  are the others whose inputs all come from outside the segment or from the prefix. A node reached from exactly
  one first node belongs to that first node's **branch**; a node reached from several belongs to the **join
  region**. A branch made only of data-movement ops (Identity, Reshape, ...) is an *empty path*.
* a segment with two or more non-empty branches is a **parallel block**: its branches become parallel stages, its
  prefix ends the stage before and its join region starts the stage after. A segment with one non-empty branch
  (a plain chain, or a residual block whose other path is empty) stays whole.
"""

from __future__ import annotations

from dataclasses import dataclass

from .graph import ModelGraph

__all__ = ["Fork", "Block", "Group", "Analysis", "analyse", "ancestors", "bits"]

# Ops that only move or relabel data: a branch made of these is an "empty path" (a residual shortcut).
_PASS_THROUGH = frozenset({"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast", "Dropout", "Expand"})


@dataclass(frozen=True, kw_only=True)
class Fork:
    """A tensor read by several nodes (names), and the first node where two of their paths meet (None: never)."""

    tensor: str
    readers: tuple[str, ...]
    join: str | None


@dataclass(frozen=True, kw_only=True)
class Block:
    """A segment with several first nodes. ``branches`` holds node names per branch; ``split`` says whether its
    branches became parallel stages, ``reason`` why not."""

    entry: tuple[str, ...]
    branches: tuple[tuple[str, ...], ...]
    join: str | None
    split: bool
    reason: str = ""


@dataclass(frozen=True, kw_only=True)
class Group:
    """A set of node positions that becomes one stage. ``role``: ``chain``, ``branch`` (of parallel ``block``),
    or ``if`` (a gated ``If`` node, later expanded into gate, then, else and select)."""

    nodes: int  # bitmask over positions in ModelGraph.nodes
    role: str
    block: int | None = None


@dataclass(frozen=True, kw_only=True)
class Analysis:
    chain_cuts: tuple[str, ...]
    forks: tuple[Fork, ...]
    blocks: tuple[Block, ...]
    groups: tuple[Group, ...]  # the automatic partition, in topological order of segments
    ancestors: tuple[int, ...]  # per node position: bitmask of itself and its ancestors


def bits(mask: int) -> list[int]:
    """Positions of the set bits of ``mask``, ascending."""
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out


def ancestors(graph: ModelGraph) -> list[int]:
    """Per node position, the bitmask of the node and all its ancestors."""
    anc: list[int] = []
    for pos, node in enumerate(graph.nodes):
        mask = 1 << pos
        for tensor in node.inputs:
            producer = graph.producer(tensor)
            if producer is not None:
                mask |= anc[producer]
        anc.append(mask)
    return anc


def analyse(graph: ModelGraph) -> Analysis:
    """Chain cuts, forks, blocks and the automatic partition of ``graph`` into groups."""
    anc = ancestors(graph)
    full = (1 << len(graph.nodes)) - 1
    cuts = _chain_cuts(graph, anc, full)
    segments, before = [], 0
    for pos, _ in cuts:
        segments.append(anc[pos] & ~before)
        before = anc[pos]
    segments.append(full & ~before)
    groups: list[Group] = []
    blocks: list[Block] = []
    chain = 0
    for mask in segments:
        prefix, branches, join, block = _segment(graph, anc, mask)
        if block is not None:
            blocks.append(block)
        if block is None or not block.split:
            chain |= mask
            continue
        chain |= prefix
        if chain:
            groups.append(Group(nodes=chain, role="chain"))
        number = sum(1 for b in blocks if b.split)
        groups.extend(Group(nodes=b, role="branch", block=number) for b in branches)
        chain = join
    if chain:
        groups.append(Group(nodes=chain, role="chain"))
    return Analysis(chain_cuts=tuple(t for _, t in cuts), forks=tuple(_forks(graph, anc)), blocks=tuple(blocks),
                    groups=tuple(groups), ancestors=tuple(anc))


def _chain_cuts(graph: ModelGraph, anc: list[int], full: int) -> list[tuple[int, str]]:
    """(producer position, tensor) of every chain cut, in topological order.

    ``reach[p]`` is the union of the consumers of every tensor produced by ``p`` or its ancestors; a candidate
    ``T`` of node ``p`` is a cut when nothing produced in ``A = anc[p]`` except ``T`` is read outside ``A``, no
    model output other than ``T`` is produced in ``A``, and every node reading a model input is in ``A``.
    """
    consumers: dict[str, int] = {}
    for pos, node in enumerate(graph.nodes):
        for tensor in node.inputs:
            consumers[tensor] = consumers.get(tensor, 0) | (1 << pos)
    outputs = set(graph.outputs)
    input_readers = 0
    for tensor in graph.inputs:
        input_readers |= consumers.get(tensor, 0)
    reach: list[int] = []  # consumers of everything produced in anc[p]
    emits: list[int] = []  # nodes in anc[p] producing a model output
    cuts = []
    for pos, node in enumerate(graph.nodes):
        upstream, up_emits = 0, 0
        for tensor in node.inputs:
            producer = graph.producer(tensor)
            if producer is not None:
                upstream |= reach[producer]
                up_emits |= emits[producer]
        own = [consumers.get(t, 0) for t in node.outputs]
        reach.append(upstream | _or_all(own))
        emits.append(up_emits | ((1 << pos) if outputs & set(node.outputs) else 0))
        inside = anc[pos]
        if inside == full or input_readers & ~inside or up_emits:
            continue
        for k, candidate in enumerate(node.outputs):
            if not own[k] and candidate not in outputs:
                continue
            others = _or_all(own[:k] + own[k + 1:])
            other_outputs = any(t in outputs for t in node.outputs if t != candidate)
            if not ((upstream | others) & ~inside) and not other_outputs:
                cuts.append((pos, candidate))
    return cuts


def _or_all(masks: list[int]) -> int:
    out = 0
    for mask in masks:
        out |= mask
    return out


def _segment(graph: ModelGraph, anc: list[int], mask: int):
    """Split one segment into (prefix mask, branch masks, join mask, Block or None)."""
    positions = bits(mask)
    prefix = 0
    for pos in positions:
        rest = mask & ~prefix & ~(1 << pos)
        inputs_ok = all(_outside(graph, t, mask & ~prefix) for t in graph.nodes[pos].inputs)
        if not (inputs_ok and all(anc[q] >> pos & 1 for q in bits(rest))):
            break
        prefix |= 1 << pos
    rest = mask & ~prefix
    first = [q for q in bits(rest) if all(_outside(graph, t, rest) for t in graph.nodes[q].inputs)]
    groups = {f: 0 for f in first}
    join = 0
    for q in bits(rest):
        origins = [f for f in first if anc[q] >> f & 1]
        if len(origins) == 1:
            groups[origins[0]] |= 1 << q
        else:
            join |= 1 << q
    branches = [g for g in groups.values() if not all(graph.nodes[q].op_type in _PASS_THROUGH for q in bits(g))]
    if len(branches) >= 2:
        join |= rest & ~sum(branches)
        entry = tuple(dict.fromkeys(t for f in first for t in graph.nodes[f].inputs))
        joins = [q for q in bits(join) if sum(1 for f in first if anc[q] >> f & 1) >= 2]
        return prefix, branches, join, Block(
            entry=entry, branches=tuple(tuple(graph.nodes[q].name for q in bits(g)) for g in branches),
            join=graph.nodes[joins[0]].name if joins else None, split=True)
    return prefix, [], 0, _residual(graph, anc, mask)


def _residual(graph: ModelGraph, anc: list[int], mask: int) -> Block | None:
    """A segment kept whole whose entry tensor is read twice (a shortcut around the rest), or None."""
    readers: dict[str, int] = {}
    for q in bits(mask):
        for t in graph.nodes[q].inputs:
            if _outside(graph, t, mask):
                readers[t] = readers.get(t, 0) | 1 << q
    for tensor, reader_mask in readers.items():
        if bin(reader_mask).count("1") < 2:
            continue
        join = next((q for q in bits(mask) if bin(anc[q] & reader_mask).count("1") >= 2), None)
        if join is not None:
            return Block(entry=(tensor,), branches=(tuple(graph.nodes[q].name for q in bits(mask)),),
                         join=graph.nodes[join].name, split=False, reason="residual: the other path is empty")
    return None


def _outside(graph: ModelGraph, tensor: str, mask: int) -> bool:
    producer = graph.producer(tensor)
    return producer is None or not mask >> producer & 1


def _forks(graph: ModelGraph, anc: list[int]) -> list[Fork]:
    forks = []
    for tensor in [*graph.inputs, *(t for n in graph.nodes for t in n.outputs)]:
        readers = graph.consumers(tensor)
        if len(readers) < 2:
            continue
        reader_mask = sum(1 << r for r in set(readers))
        join = next((m for m in range(len(graph.nodes)) if bin(anc[m] & reader_mask).count("1") >= 2), None)
        forks.append(Fork(tensor=tensor, readers=tuple(graph.nodes[r].name for r in readers),
                          join=graph.nodes[join].name if join is not None else None))
    return forks
