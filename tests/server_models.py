"""Tiny TVM models for server tests, compiled in a second or two (no downloads)."""

from __future__ import annotations

from pathlib import Path

SHAPE = (1, 256)


def build_affine(out_dir: Path, name: str, *, scale: float, offset: float = 1.0) -> Path:
    """Compile ``y = x * scale + offset`` on float32[1, 256] into out_dir/<name>.so + .json; returns the .so."""
    from tvm.relax.frontend import nn

    from zpipe.compile import export_stage

    class Affine(nn.Module):
        def forward(self, x):
            return x * scale + offset

    mod, _ = Affine().export_tvm({"forward": {"x": nn.spec.Tensor(SHAPE, "float32")}})
    export_stage(mod, name=name, out_dir=out_dir, function="forward", input_names=["x"], output_names=["y"])
    return Path(out_dir) / f"{name}.so"


def add_version(repo: Path, model: str, version: int, built: Path) -> Path:
    """Copy a built stage (.so + .json) into repo/<model>/<version>/, atomically (rename of a finished dir)."""
    import shutil

    final = repo / model / str(version)
    staging = repo / model / f".tmp-{version}"
    staging.mkdir(parents=True)
    shutil.copy(built, staging / built.name)
    shutil.copy(built.with_suffix(".json"), staging / built.with_suffix(".json").name)
    staging.rename(final)
    return final


def build_busy(out_dir: Path, name: str, *, layers: int = 1) -> Path:
    """``y = x * 2 + 1`` on float32[1, 256] after ``layers`` products of a 256 x 256 matrix made from x, whose
    result is multiplied by zero: the affine model's answer from a model that takes a while (tens of ms on one
    core), for tests of a busy server."""
    from tvm.relax.frontend import nn
    from tvm.relax.frontend.nn import op

    from zpipe.compile import export_stage

    class Busy(nn.Module):
        def forward(self, x):
            h = op.matmul(op.permute_dims(x), x)  # [256, 256]
            for _ in range(layers):
                h = op.tanh(op.matmul(h, h) * (1.0 / 256))
            return x * 2.0 + 1.0 + op.sum(h, axis=[0, 1], keepdims=True) * 0.0

    mod, _ = Busy().export_tvm({"forward": {"x": nn.spec.Tensor(SHAPE, "float32")}})
    export_stage(mod, name=name, out_dir=out_dir, function="forward", input_names=["x"], output_names=["y"])
    return Path(out_dir) / f"{name}.so"
