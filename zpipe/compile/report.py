"""Plans as text (``zpipe inspect``) and as JSON-ready dicts (``--json``, and the build record of a compile)."""

from __future__ import annotations

from typing import Any

from .plan import REQUEST, SINK, Plan

__all__ = ["plan_dict", "format_plan", "format_bytes"]


def format_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def plan_dict(plan: Plan) -> dict[str, Any]:
    """The plan as plain JSON types: stages, gates, cuts (edges with bytes), forks, blocks, notes."""
    return {
        "model": plan.model, "source_sha256": plan.source_sha256,
        "inputs": list(plan.inputs), "outputs": list(plan.outputs),
        "stages": [{"name": s.name, "role": s.role, "inputs": [s.wire(t) for t in s.inputs],
                    "outputs": [s.wire(t) for t in s.outputs], "ops": s.ops, "op_counts": dict(s.op_counts),
                    "macs": s.macs, **({"gate": s.gate} if s.gate else {})} for s in plan.stages],
        "gates": [{"name": g.name, "if_node": g.if_node, "control": g.control, "routed": list(g.routed),
                   "then": g.then_stage, "else": g.else_stage, "select": g.select, "outputs": list(g.outputs)}
                  for g in plan.gates],
        "cuts": [{"from": e.producer, "to": e.consumer, "tensor": e.tensor, "dtype": e.info.dtype,
                  "shape": list(e.info.shape) if e.info.shape is not None else None, "bytes": e.info.nbytes}
                 for e in plan.edges],
        "chain_cuts": list(plan.chain_cuts),
        "forks": [{"tensor": f.tensor, "readers": list(f.readers), "join": f.join} for f in plan.forks],
        "blocks": [{"entry": list(b.entry), "branches": [list(x) for x in b.branches], "join": b.join,
                    "split": b.split, **({"kept_whole": b.reason} if b.reason else {})} for b in plan.blocks],
        "notes": list(plan.notes),
    }


def format_plan(plan: Plan) -> str:
    """A human-readable stage plan: forks, blocks, stages with op counts, and the bytes crossing every cut."""
    lines = [f"model {plan.model!r} (sha256 {plan.source_sha256[:16]}...): inputs {list(plan.inputs)}, "
             f"outputs {list(plan.outputs)}"]
    for fork in plan.forks:
        lines.append(f"  fork {fork.tensor!r} read by {len(fork.readers)} nodes {list(fork.readers)}, "
                     + (f"joined at {fork.join!r}" if fork.join else "never joined (separate outputs)"))
    for block in plan.blocks:
        what = (f"{len(block.branches)} parallel branches" if block.split
                else f"kept whole ({block.reason})")
        lines.append(f"  block from {list(block.entry)} to {block.join!r}: {what}")
    for gate in plan.gates:
        lines.append(f"  If {gate.if_node!r} on {gate.control!r}: gate {gate.name!r} runs {gate.then_stage!r} when "
                     f"it is 1, {gate.else_stage!r} when 0; {gate.select!r} passes the result on")
    lines.append(f"{len(plan.stages)} compiled stages:")
    lines.append(f"  {'stage':<18} {'role':<7} {'ops':>5} {'MMAC':>8}  inputs -> outputs")
    for s in plan.stages:
        lines.append(f"  {s.name:<18} {s.role:<7} {s.ops:>5} {s.macs / 1e6:>8.2f}  "
                     f"{', '.join(s.wire(t) for t in s.inputs)} -> {', '.join(s.wire(t) for t in s.outputs)}")
        lines.append(f"  {'':<18} {'':<7} {'':>5} {'':>8}  ops: "
                     + ", ".join(f"{op}×{n}" for op, n in s.op_counts))
    lines.append("cuts (bytes per request if that hop crosses the network):")
    total = 0
    for edge in plan.edges:
        if edge.producer == REQUEST or edge.consumer == SINK:
            continue
        total += edge.info.nbytes or 0
        lines.append(f"  {edge.producer:>18} -> {edge.consumer:<18} {edge.tensor:<20} {edge.info.describe():<24} "
                     f"{format_bytes(edge.info.nbytes):>10}")
    lines.append(f"  total over all hops: {format_bytes(total)}"
                 + (" (each request takes one branch of a gate, so less travels per request)" if plan.gates else ""))
    if plan.chain_cuts:
        shown = ", ".join(plan.chain_cuts[:12]) + (" ..." if len(plan.chain_cuts) > 12 else "")
        lines.append(f"chain cut points (for --cut): {shown}")
    lines.extend(f"note: {note}" for note in plan.notes)
    return "\n".join(lines)
