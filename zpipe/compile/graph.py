"""Load an ONNX model with static shapes and describe it as a dataflow graph of its *dynamic* nodes. No TVM here.

Guarantees of :func:`load_model`:

* the model parsed, passed ``onnx.checker`` and strict shape inference, and every graph input has a static shape
  (from the file or from ``shapes``); anything else raises :class:`~zpipe.errors.ArtifactError` (not a usable
  ONNX file) or :class:`CompileError` (dynamic shapes, failed inference), naming the file and the tensor;
* ``Shape``/``Size`` of a tensor whose shape is static are replaced by ``Constant`` nodes of the same output name,
  so shape arithmetic never becomes a branch or a wire between stages;
* a node is *dynamic* when it reads (explicitly, or from inside an ``If``/``Loop`` body: outer-scope reads count
  as inputs) a graph input or a dynamic node's output. Other nodes compute constants: they are not placed in any
  stage; whichever stage needs their values copies them (weights and folded shapes). Dynamic nodes that no graph
  output depends on are dropped.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Mapping

from ..errors import ArtifactError, did_you_mean
from .errors import CompileError

__all__ = ["TensorInfo", "NodeInfo", "ModelGraph", "load_model", "outer_reads", "subgraphs", "close_names",
           "np_dtype", "body_macs"]


@dataclass(frozen=True, kw_only=True)
class TensorInfo:
    """A tensor's element type and shape after shape inference; ``shape`` is None when not fully static."""

    name: str
    dtype: str
    shape: tuple[int, ...] | None

    @property
    def nbytes(self) -> int | None:
        if self.shape is None:
            return None
        import numpy as np

        return int(math.prod(self.shape)) * np.dtype(self.dtype).itemsize

    def describe(self) -> str:
        return f"{self.dtype}{list(self.shape) if self.shape is not None else '[?]'}"


@dataclass(frozen=True, kw_only=True)
class NodeInfo:
    """One dynamic top-level node. ``inputs`` lists the dynamic tensors it reads, explicit ones first, then those
    read from inside its bodies; ``body_ops`` counts the nodes inside those bodies; ``macs`` is an estimate of its
    multiply-accumulates (output elements for ops that are not convolutions or matrix products)."""

    index: int
    name: str
    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    body_ops: int = 0
    macs: int = 0


@dataclass(frozen=True, kw_only=True)
class ModelGraph:
    """A loaded model: the shape-inferred ``model``, its dynamic ``nodes`` in topological order, and tensor types.

    ``constants`` holds initializer names and outputs of constant nodes; ``body_tensors`` maps every name defined
    inside an ``If``/``Loop`` body to the top-level node that owns the body.
    """

    path: str
    source_sha256: str
    model: Any = field(repr=False, compare=False)
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    nodes: tuple[NodeInfo, ...]
    tensors: Mapping[str, TensorInfo] = field(repr=False)
    constants: frozenset[str] = field(repr=False)
    body_tensors: Mapping[str, str] = field(repr=False)
    _producer: dict = field(init=False, repr=False, compare=False)
    _consumers: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        producer: dict[str, int] = {}
        consumers: dict[str, list[int]] = {}
        for pos, node in enumerate(self.nodes):
            for name in node.outputs:
                producer[name] = pos
            for name in node.inputs:
                consumers.setdefault(name, []).append(pos)
        object.__setattr__(self, "_producer", producer)
        object.__setattr__(self, "_consumers", {k: tuple(v) for k, v in consumers.items()})

    @property
    def name(self) -> str:
        return Path(self.path).stem

    def producer(self, tensor: str) -> int | None:
        """Position (in ``nodes``) of the node producing ``tensor``; None for graph inputs and constants."""
        return self._producer.get(tensor)

    def consumers(self, tensor: str) -> tuple[int, ...]:
        """Positions of the dynamic nodes reading ``tensor`` (explicitly or from inside a body)."""
        return self._consumers.get(tensor, ())


def load_model(path: str | Path, *, shapes: Mapping[str, Iterable[int]] | None = None) -> ModelGraph:
    """Load ``path``, fix input shapes from ``shapes`` (input name -> dims), infer shapes, and analyse the graph."""
    path = Path(path)
    model, digest = _read(path)
    graph = model.graph
    init_names = {t.name for t in graph.initializer}
    inputs = [vi for vi in graph.input if vi.name not in init_names]
    _apply_shapes(path, graph, inputs, dict(shapes or {}))
    _require_static_inputs(path, inputs)
    model = _infer(path, model)
    if _fold_static_shapes(model):
        model = _infer(path, model)
    graph = model.graph
    tensors = _tensor_infos(model)
    dynamic = {vi.name for vi in inputs}
    constants = set(init_names)
    body_tensors: dict[str, str] = {}
    candidates: list[NodeInfo] = []
    for index, node in enumerate(graph.node):
        name = node.name or f"{node.op_type}_{index}"
        reads = [i for i in node.input if i] + [r for g in subgraphs(node) for r in outer_reads(g)]
        outputs = tuple(o for o in node.output if o)
        for body in subgraphs(node):
            for inner in _defined_names(body):
                body_tensors[inner] = name
        if not any(r in dynamic for r in reads):
            constants.update(outputs)
            continue
        dynamic.update(outputs)
        candidates.append(NodeInfo(index=index, name=name, op_type=node.op_type,
                                   inputs=tuple(dict.fromkeys(r for r in reads if r in dynamic)), outputs=outputs,
                                   body_ops=sum(_count_nodes(g) for g in subgraphs(node)),
                                   macs=_macs(node, _shape_lookup(tensors))))
    outputs = tuple(vi.name for vi in graph.output)
    for name in outputs:
        if name not in dynamic or name in {vi.name for vi in inputs}:
            what = "a model input" if name in {vi.name for vi in inputs} else "a constant"
            raise CompileError(f"model {str(path)!r}: output {name!r} is {what}; zpipe stages compute outputs "
                               "from inputs, so remove it from the model's outputs")
    live = _live(candidates, outputs)
    return ModelGraph(path=str(path), source_sha256=digest, model=model, inputs=tuple(vi.name for vi in inputs),
                      outputs=outputs, nodes=tuple(n for n in candidates if n.index in live),
                      tensors=MappingProxyType(tensors), constants=frozenset(constants),
                      body_tensors=MappingProxyType(body_tensors))


# -- subgraphs ----------------------------------------------------------------------------------------------------
def subgraphs(node: Any) -> list[Any]:
    """The GraphProto bodies of a node (``If`` then/else, ``Loop``/``Scan`` body), in attribute order."""
    import onnx

    found = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            found.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            found.extend(attr.graphs)
    return found


def outer_reads(graph: Any) -> list[str]:
    """Names a body reads from enclosing scopes (its own nested bodies included), in first-use order."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    reads: dict[str, None] = {}
    for node in graph.node:
        for name in [i for i in node.input if i] + [r for g in subgraphs(node) for r in outer_reads(g)]:
            if name not in defined:
                reads[name] = None
        defined.update(o for o in node.output if o)
    for out in graph.output:  # a body may return an outer tensor as is
        if out.name not in defined:
            reads[out.name] = None
    return list(reads)


def _defined_names(graph: Any) -> list[str]:
    names = [i.name for i in graph.input] + [t.name for t in graph.initializer]
    for node in graph.node:
        names.extend(o for o in node.output if o)
        for body in subgraphs(node):
            names.extend(_defined_names(body))
    return names


def _count_nodes(graph: Any) -> int:
    return sum(1 + sum(_count_nodes(g) for g in subgraphs(n)) for n in graph.node)


def close_names(word: str, names: Iterable[str]) -> str:
    """``"; close names: 'a', 'b'"`` for an error message (up to three), or ``""``."""
    import difflib

    close = difflib.get_close_matches(word, list(names), n=3, cutoff=0.5)
    if not close:
        return did_you_mean(word, names)
    return "; close names: " + ", ".join(repr(c) for c in close)


# -- loading steps ------------------------------------------------------------------------------------------------
def _read(path: Path) -> tuple[Any, str]:
    import onnx
    from google.protobuf.message import DecodeError

    if not path.is_file():
        raise ArtifactError(f"model file {str(path)!r} does not exist" if not path.exists()
                            else f"model path {str(path)!r} is not a file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ArtifactError(f"cannot read model file {str(path)!r}: {exc.strerror}") from exc
    digest = hashlib.sha256(data).hexdigest()
    try:
        model = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"{str(path)!r} is not an ONNX model (protobuf parse failed: {exc})") from exc
    if model.ir_version <= 0 or not model.graph.node or not model.graph.output:
        raise ArtifactError(f"{str(path)!r} is not an ONNX model: it has no IR version, nodes or outputs")
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        try:
            onnx.load_external_data_for_model(model, str(path.parent))
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"model {str(path)!r}: cannot load its external weights: {exc}") from exc
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ArtifactError(f"{str(path)!r} is not a valid ONNX model: {first}") from exc
    return model, digest


def _apply_shapes(path: Path, graph: Any, inputs: list[Any], shapes: dict[str, Iterable[int]]) -> None:
    by_name = {vi.name: vi for vi in inputs}
    for name, dims in shapes.items():
        if name not in by_name:
            raise CompileError(f"--shape {name}=...: model {str(path)!r} has no input {name!r}"
                               f"{did_you_mean(name, by_name)}; its inputs are {list(by_name)}")
        dims = [int(d) for d in dims]
        tensor_type = by_name[name].type.tensor_type
        declared = len(tensor_type.shape.dim) if tensor_type.HasField("shape") else None
        if declared is not None and declared != len(dims):
            raise CompileError(f"--shape {name}={','.join(map(str, dims))}: input {name!r} has rank {declared}, "
                               f"got {len(dims)} dimensions")
        tensor_type.shape.ClearField("dim")
        for d in dims:
            tensor_type.shape.dim.add().dim_value = d
    if shapes:  # shapes recorded for the old input shapes would contradict the new ones: infer them afresh
        del graph.value_info[:]
        for vi in graph.output:
            vi.type.tensor_type.ClearField("shape")


def _require_static_inputs(path: Path, inputs: list[Any]) -> None:
    for vi in inputs:
        if not vi.type.HasField("tensor_type"):
            raise CompileError(f"model {str(path)!r}: input {vi.name!r} is not a tensor; zpipe stages exchange "
                               "tensors only")
        tensor_type = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor_type.shape.dim]
        if not tensor_type.HasField("shape") or any(not isinstance(d, int) or d <= 0 for d in dims):
            example = ",".join(str(d) if isinstance(d, int) and d > 0 else "1" for d in dims) or "1,3,224,224"
            raise CompileError(f"model {str(path)!r}: input {vi.name!r} has a dynamic shape "
                               f"{dims if tensor_type.HasField('shape') else '(none)'}; TVM stages need static "
                               f"shapes: pass --shape {vi.name}={example}")


def _infer(path: Path, model: Any) -> Any:
    import onnx

    try:
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise CompileError(f"model {str(path)!r}: shape inference failed: {first}") from exc


def _fold_static_shapes(model: Any) -> bool:
    """Replace top-level Shape/Size nodes of static-shaped tensors by Constants. Returns whether any changed."""
    import numpy as np
    from onnx import helper, numpy_helper

    shapes = _shape_lookup(_tensor_infos(model))
    changed = False
    for index, node in enumerate(model.graph.node):
        if node.op_type not in ("Shape", "Size") or not node.input or shapes(node.input[0]) is None:
            continue
        dims = list(shapes(node.input[0]))
        if node.op_type == "Size":
            value = np.array(math.prod(dims), dtype=np.int64)
        else:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            value = np.array(dims[attrs.get("start", 0):attrs.get("end", len(dims))], dtype=np.int64)
        const = helper.make_node("Constant", [], [node.output[0]], name=node.name,
                                 value=numpy_helper.from_array(value))
        model.graph.node[index].CopyFrom(const)
        changed = True
    return changed


def _tensor_infos(model: Any) -> dict[str, TensorInfo]:
    infos: dict[str, TensorInfo] = {}
    graph = model.graph
    for init in graph.initializer:
        infos[init.name] = TensorInfo(name=init.name, dtype=np_dtype(init.data_type), shape=tuple(init.dims))
    for vi in [*graph.value_info, *graph.input, *graph.output]:
        if not vi.type.HasField("tensor_type") or vi.name in infos:
            continue
        tt = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim)
        shape = dims if tt.HasField("shape") and all(d >= 0 for d in dims) else None
        infos[vi.name] = TensorInfo(name=vi.name, dtype=np_dtype(tt.elem_type), shape=shape)
    return infos


def np_dtype(elem_type: int) -> str:
    """The numpy dtype name of an ONNX element type."""
    import numpy as np
    from onnx import helper

    try:
        return str(np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)))
    except (KeyError, TypeError, ValueError):
        return f"onnx-type-{elem_type}"


def _shape_lookup(tensors: Mapping[str, TensorInfo]):
    def shape_of(name: str) -> tuple[int, ...] | None:
        info = tensors.get(name)
        return info.shape if info is not None else None

    return shape_of


def body_macs(body: Any, tensors: Mapping[str, TensorInfo]) -> int:
    """Rough multiply-accumulate count of one If/Loop body (outer tensors' shapes from ``tensors``)."""
    return _body_macs(body, _shape_lookup(tensors))


def _body_macs(body: Any, shape_of) -> int:
    inner = {vi.name: vi for vi in [*body.value_info, *body.output]}
    weights = {t.name: tuple(t.dims) for t in body.initializer}

    def body_shape(name: str) -> tuple[int, ...] | None:
        if name in weights:
            return weights[name]
        if name in inner:
            tt = inner[name].type.tensor_type
            dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim)
            return dims if all(d >= 0 for d in dims) else None
        return shape_of(name)

    return sum(_macs(n, body_shape) for n in body.node)


def _macs(node: Any, shape_of) -> int:
    """Rough multiply-accumulate count of one node; bodies count their most expensive branch."""
    if node.op_type in ("If", "Loop", "Scan"):
        return max((_body_macs(body, shape_of) for body in subgraphs(node)), default=0)
    out = shape_of(node.output[0]) if node.output and node.output[0] else None
    out_elems = math.prod(out) if out is not None else 0
    if node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 1:
        weight = shape_of(node.input[1])
        if weight is not None:
            if node.op_type == "Conv":
                return out_elems * math.prod(weight[1:])
            x = shape_of(node.input[0])
            return (math.prod(x) if x is not None else 0) * math.prod(weight[1:])
    if node.op_type in ("MatMul", "Gemm") and node.input:
        a = shape_of(node.input[0])
        if a:
            trans_a = any(attr.name == "transA" and attr.i for attr in node.attribute)
            return out_elems * (a[0] if node.op_type == "Gemm" and trans_a else a[-1])
    return out_elems


def _live(nodes: list[NodeInfo], outputs: Iterable[str]) -> set[int]:
    """Indices of the nodes some graph output depends on."""
    producer = {o: n for n in nodes for o in n.outputs}
    live: set[int] = set()
    stack = [producer[o] for o in outputs if o in producer]
    while stack:
        node = stack.pop()
        if node.index in live:
            continue
        live.add(node.index)
        stack.extend(producer[i] for i in node.inputs if i in producer)
    return live
