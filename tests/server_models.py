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
