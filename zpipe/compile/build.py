"""Compile one stage into ``OUT/<name>.so`` plus ``OUT/<name>.json`` (its manifest).

:func:`export_stage` takes a Relax IRModule (the demo builds its stages this way); :func:`build_onnx_stage` takes a
cut ONNX stage, imports it with TVM's ONNX frontend, applies tuning records when given a database, and writes a
manifest whose tensor names are the ONNX names. Manifests may carry extra keys (``source_sha256``,
``onnx_sha256``, ``tuning``): :meth:`zpipe.Manifest.load` reads only the keys it knows.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

from ..errors import ZpipeError
from ..manifest import Manifest, TensorSpec, sha256_file
from ..tvm_runtime import import_tvm
from .errors import CompileError
from .lowering import compile_relax

__all__ = ["export_stage", "struct_info_specs", "build_onnx_stage", "StageBuild", "unsupported_nodes",
           "write_manifest"]

# Handled by TVM's ONNX importer outside its converter table.
_DIRECT_OPS = frozenset({"If", "Constant"})


@dataclass(frozen=True, kw_only=True)
class StageBuild:
    """One compiled stage: its manifest and library, and how long import + compile + export took."""

    name: str
    manifest: Path
    library: Path
    compile_s: float


def struct_info_specs(mod: Any, function: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Input and output tensor specs of ``mod[function]``, from its Relax types (static shapes only).

    TVM 0.27 keeps a Relax expression's type in ``.ty`` (a ``relax.TensorType`` with ``.shape``/``.dtype``) and a
    function's result type in ``.ret_ty`` (``TupleType`` with ``.fields`` for several outputs).
    """
    tvm = import_tvm()
    func = mod[function]
    num_input = int(func.attrs["num_input"]) if func.attrs is not None and "num_input" in func.attrs else None
    params = list(func.params)[:num_input] if num_input is not None else list(func.params)
    inputs = [_spec(p.name, p.ty, tvm) for p in params]
    ret = func.ret_ty
    fields = list(ret.fields) if isinstance(ret, tvm.ir.TupleType) else [ret]
    outputs = [_spec(f"output{i}" if len(fields) > 1 else "output", ty, tvm) for i, ty in enumerate(fields)]
    return inputs, outputs


def _spec(name: str, ty: Any, tvm: Any) -> TensorSpec:
    shape_expr = getattr(ty, "shape", None) if isinstance(ty, tvm.relax.TensorType) else None
    if shape_expr is None:
        raise ZpipeError(f"tensor {name!r} has type {ty}; stages take and return tensors of static shape")
    try:
        shape = tuple(int(d) for d in shape_expr.values)
    except (TypeError, AttributeError) as exc:
        raise ZpipeError(f"tensor {name!r} has a symbolic shape {shape_expr}; stages need static shapes") from exc
    return TensorSpec(name=name, dtype=str(ty.dtype), shape=shape)


def _rename(specs: list[TensorSpec], names: list[str] | None, stage: str, what: str) -> list[TensorSpec]:
    if names is None:
        return specs
    if len(names) != len(specs):
        raise ZpipeError(f"stage {stage!r}: {len(names)} {what} names given for {len(specs)} {what}s")
    return [TensorSpec(name=n, dtype=s.dtype, shape=s.shape) for n, s in zip(names, specs)]


def write_manifest(manifest: Manifest, path: Path, extra: Mapping[str, Any] | None = None) -> None:
    """Write ``manifest`` as JSON, with ``extra`` keys after the standard ones (loaders ignore them)."""
    doc = asdict(manifest)
    doc.update(extra or {})
    path.write_text(json.dumps(doc, indent=2) + "\n")


def export_stage(mod: Any, *, name: str, out_dir: str | Path, function: str = "main", target: Any = "llvm",
                 input_names: list[str] | None = None, output_names: list[str] | None = None) -> Path:
    """Compile ``mod``, export ``out_dir/<name>.so`` and write its manifest; returns the manifest path.

    ``input_names``/``output_names`` rename the ports (default: the Relax parameter names, ``output``/``outputN``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs, outputs = struct_info_specs(mod, function)
    inputs = _rename(inputs, input_names, name, "input")
    outputs = _rename(outputs, output_names, name, "output")
    executable = compile_relax(mod, target)
    library = out_dir / f"{name}.so"
    executable.export_library(str(library))
    manifest = Manifest(name=name, library=library.name, function=function, inputs=tuple(inputs),
                        outputs=tuple(outputs), target=str(target), library_sha256=sha256_file(library))
    path = out_dir / f"{name}.json"
    write_manifest(manifest, path)
    return path


def unsupported_nodes(model: Any) -> list[tuple[str, str, str]]:
    """(node name, op type, where) of every node, bodies included, that TVM's ONNX frontend cannot import."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    from .graph import subgraphs

    known = set(_get_convert_map()) | _DIRECT_OPS
    found = []

    def walk(graph: Any, where: str) -> None:
        for index, node in enumerate(graph.node):
            if node.op_type not in known or node.domain not in ("", "ai.onnx"):
                found.append((node.name or f"{node.op_type}_{index}", node.op_type, where))
            for body in subgraphs(node):
                walk(body, f"body {body.name!r} of node {node.name or node.op_type!r}")

    walk(model.graph, "top level")
    return found


def build_onnx_stage(model: Any, *, name: str, out_dir: Path, target: Any, fcompile: Any = None,
                     database: Any = None, extra: Mapping[str, Any] | None = None) -> StageBuild:
    """Import the ONNX stage ``model`` into TVM, compile it for ``target`` and export ``out_dir/<name>.so`` with its
    manifest. With a MetaSchedule ``database``, tuned schedules from it replace the default ones.

    Raises CompileError naming the stage (and the node, for ops TVM cannot import).
    """
    import_tvm()
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    started = time.perf_counter()
    for node, op, where in unsupported_nodes(model):
        raise CompileError(f"stage {name!r}: node {node!r} (op {op!r}, {where}) cannot be imported by TVM's ONNX "
                           "frontend; replace the op in the model, or export it with a different opset")
    inputs = [_onnx_spec(vi) for vi in model.graph.input]
    outputs = [_onnx_spec(vi) for vi in model.graph.output]
    try:
        with warnings.catch_warnings():  # "Renaming name input.1 to input_1": zpipe keeps the ONNX names itself
            warnings.filterwarnings("ignore", message="Renaming name", category=UserWarning)
            mod = from_onnx(model, shape_dict={s.name: list(s.shape) for s in inputs},
                            dtype_dict={s.name: s.dtype for s in inputs})
        compiled_in, compiled_out = struct_info_specs(mod, "main")
        if database is not None:
            mod = relax.get_pipeline("zero")(mod)
            with target, database:
                mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
        executable = compile_relax(mod, target)
    except ZpipeError:
        raise
    except Exception as exc:  # TVM raises its own error types (TVMError, OpNotImplemented, ValueError, ...)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        raise CompileError(f"stage {name!r}: TVM failed to import or compile it: {type(exc).__name__}: "
                           f"{first}") from exc
    for want, got in ((inputs, compiled_in), (outputs, compiled_out)):
        for spec, built in zip(want, got):
            if (spec.dtype, spec.shape) != (built.dtype, built.shape):
                raise CompileError(f"stage {name!r}: tensor {spec.name!r} is {spec.dtype}{list(spec.shape)} in ONNX "
                                   f"but {built.dtype}{list(built.shape)} after TVM import")
    out_dir.mkdir(parents=True, exist_ok=True)
    library = out_dir / f"{name}.so"
    try:
        if fcompile is None:
            executable.export_library(str(library))
        else:
            executable.export_library(str(library), fcompile=fcompile)
    except Exception as exc:  # the C++ compiler's or linker's failure, as TVM reports it
        raise CompileError(f"stage {name!r}: linking {str(library)!r} failed: {str(exc).strip()[:400]}") from exc
    manifest = Manifest(name=name, library=library.name, inputs=tuple(inputs), outputs=tuple(outputs),
                        target=str(target), library_sha256=sha256_file(library))
    path = out_dir / f"{name}.json"
    write_manifest(manifest, path, extra)
    return StageBuild(name=name, manifest=path, library=library, compile_s=time.perf_counter() - started)


def _onnx_spec(vi: Any) -> TensorSpec:
    from .graph import np_dtype

    tt = vi.type.tensor_type
    return TensorSpec(name=vi.name, dtype=np_dtype(tt.elem_type), shape=tuple(d.dim_value for d in tt.shape.dim))
