"""Compile one Relax IRModule into a stage: ``OUT/<name>.so`` plus ``OUT/<name>.json`` (its manifest)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ZpipeError
from ..manifest import Manifest, TensorSpec, sha256_file
from ..tvm_runtime import import_tvm

__all__ = ["export_stage", "struct_info_specs"]


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


def export_stage(mod: Any, *, name: str, out_dir: str | Path, function: str = "main", target: Any = "llvm",
                 input_names: list[str] | None = None, output_names: list[str] | None = None) -> Path:
    """Compile ``mod``, export ``out_dir/<name>.so`` and write its manifest; returns the manifest path.

    ``input_names``/``output_names`` rename the ports (default: the Relax parameter names, ``output``/``outputN``).
    """
    tvm = import_tvm()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs, outputs = struct_info_specs(mod, function)
    for specs, names, what in ((inputs, input_names, "input"), (outputs, output_names, "output")):
        if names is not None:
            if len(names) != len(specs):
                raise ZpipeError(f"stage {name!r}: {len(names)} {what} names given for {len(specs)} {what}s")
            specs[:] = [TensorSpec(name=n, dtype=s.dtype, shape=s.shape) for n, s in zip(names, specs)]
    executable = tvm.compile(mod, target=target)
    library = out_dir / f"{name}.so"
    executable.export_library(str(library))
    manifest = Manifest(name=name, library=library.name, function=function, inputs=tuple(inputs),
                        outputs=tuple(outputs), target=str(target), library_sha256=sha256_file(library))
    path = out_dir / f"{name}.json"
    manifest.save(path)
    return path
