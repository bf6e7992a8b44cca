"""Cut a planned stage out of the model as a valid ONNX model of its own, keeping the model's tensor names.

Chain and branch stages are cut with ``onnx.utils.Extractor`` (on the shape-inferred model), extended to follow
reads from inside ``If``/``Loop`` bodies: the stock Extractor only follows explicit node inputs, so it drops
weights and constants used only inside a body and the cut model is invalid. Then/else stages are built from the
``If`` node's body: the body's outer-scope reads become the stage's inputs (activations) or initializers
(weights, constants), a read of the ``If``'s own condition becomes a constant (true in then, false in else), and
each body output is renamed to the ``If`` output it feeds.

Guarantee: every model returned passed ``onnx.checker.check_model(full_check=True)``; its inputs and outputs are
exactly the stage's, in the plan's order, with the model's names, dtypes and static shapes.
"""

from __future__ import annotations

from typing import Any

from .errors import CompileError
from .graph import ModelGraph, outer_reads, subgraphs
from .plan import StagePlan

__all__ = ["stage_model"]


def stage_model(graph: ModelGraph, stage: StagePlan) -> Any:
    """The ONNX model (ModelProto) of one planned stage of ``graph``."""
    import onnx

    if stage.role in ("then", "else"):
        model = _branch_model(graph, stage)
    else:
        unknown = [t for t in (*stage.inputs, *stage.outputs)
                   if t not in graph.tensors or graph.tensors[t].shape is None]
        if unknown:
            raise CompileError(f"stage {stage.name!r}: shape inference left the shape of {unknown} unknown, so they "
                               "cannot cross between stages; give static input shapes (--shape), or cut elsewhere")
        model = _extractor(graph.model).extract_model(list(stage.inputs), list(stage.outputs))
        want = {t for i in stage.nodes for t in graph.model.graph.node[i].output if t}
        got = {t for n in model.graph.node for t in n.output if t} - graph.constants
        if got != want:
            raise CompileError(f"stage {stage.name!r}: the cut model computes {sorted(got ^ want)} differently from "
                               "the plan (a zpipe bug: please report it with the model)")
    model.graph.name = stage.name
    model.producer_name = "zpipe compile"
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise CompileError(f"stage {stage.name!r}: the cut ONNX model is invalid: {first}") from exc
    return model


def _extractor(model: Any):
    import onnx.utils

    class OuterScopeExtractor(onnx.utils.Extractor):
        """Extractor that also follows the outer-scope reads of If/Loop bodies."""

        def _dfs_search_reachable_nodes(self, node_output_name, graph_input_names, reachable):
            stack = [node_output_name]
            while stack:
                name = stack.pop()
                if name in graph_input_names or name not in self.outmap:
                    continue
                index = self.outmap[name]
                if index in reachable:
                    continue
                reachable.add(index)
                node = self.graph.node[index]
                stack += [i for i in node.input if i] + [r for g in subgraphs(node) for r in outer_reads(g)]

        def _collect_reachable_tensors(self, nodes):
            initializer, value_info = super()._collect_reachable_tensors(nodes)
            have = {t.name for t in initializer}
            inner = {r for n in nodes for g in subgraphs(n) for r in outer_reads(g)}
            initializer += [t for name, t in self.initializers.items() if name in inner and name not in have]
            return initializer, value_info

    return OuterScopeExtractor(model)


def _value_infos(model: Any) -> dict[str, Any]:
    graph = model.graph
    return {vi.name: vi for vi in [*graph.value_info, *graph.input, *graph.output]}


def _branch_model(graph: ModelGraph, stage: StagePlan) -> Any:
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = graph.model
    node = model.graph.node[stage.nodes[0]]
    body = next(a.g for a in node.attribute if a.name == f"{stage.role}_branch")
    control = node.input[0]
    infos = _value_infos(model)
    reads = outer_reads(body)
    const_nodes, const_inits = _constant_closure(model, [r for r in reads if r in graph.constants])
    prologue = list(const_nodes)
    if control in reads:
        info = graph.tensors[control]
        value = np.full(info.shape or (), stage.role == "then", dtype=info.dtype)
        prologue.append(helper.make_node("Constant", [], [control], name=f"{control}@{stage.role}",
                                         value=numpy_helper.from_array(value)))
    epilogue = [helper.make_node("Identity", [out.name], [name], name=f"{name}@{stage.role}")
                for out, name in zip(body.output, node.output) if name in stage.outputs]
    outputs = []
    for out, name in zip(body.output, node.output):
        if name in stage.outputs:
            vi = onnx.ValueInfoProto()
            vi.CopyFrom(infos.get(name, out))
            if not vi.type.tensor_type.HasField("shape") or not _static(vi):
                vi.type.CopyFrom(out.type)
            outputs.append(vi)
    new_graph = helper.make_graph(
        [*prologue, *body.node, *epilogue], stage.name, [infos[t] for t in stage.inputs], outputs,
        initializer=[*const_inits, *body.initializer])
    branch = helper.make_model(new_graph, opset_imports=model.opset_import, ir_version=model.ir_version,
                               functions=model.functions)
    try:
        branch = onnx.shape_inference.infer_shapes(branch, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, RuntimeError) as exc:
        raise CompileError(f"stage {stage.name!r} ({stage.role} branch of If node {node.name!r}): shape inference "
                           f"failed: {str(exc).strip().splitlines()[0]}") from exc
    for vi in branch.graph.output:
        if not _static(vi):
            raise CompileError(f"If node {node.name!r}: output {vi.name!r} of its {stage.role} branch has no static "
                               "shape; both branches must produce tensors of one fixed shape to be gated")
    return branch


def _static(vi: Any) -> bool:
    tt = vi.type.tensor_type
    return tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim)


def _constant_closure(model: Any, names: list[str]) -> tuple[list[Any], list[Any]]:
    """Top-level constant nodes (in graph order) and initializers needed to compute ``names``."""
    producer = {o: i for i, n in enumerate(model.graph.node) for o in n.output if o}
    inits = {t.name: t for t in model.graph.initializer}
    needed_nodes: set[int] = set()
    needed_inits: dict[str, Any] = {}
    stack = list(names)
    while stack:
        name = stack.pop()
        if name in inits:
            needed_inits[name] = inits[name]
        elif name in producer and producer[name] not in needed_nodes:
            needed_nodes.add(producer[name])
            node = model.graph.node[producer[name]]
            stack += [i for i in node.input if i] + [r for g in subgraphs(node) for r in outer_reads(g)]
    return [model.graph.node[i] for i in sorted(needed_nodes)], list(needed_inits.values())
