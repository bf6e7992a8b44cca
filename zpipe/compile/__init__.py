"""Model path: build TVM stage libraries and their manifests. Imports TVM (lazily, through zpipe.tvm_runtime)."""

from .build import export_stage, struct_info_specs

__all__ = ["export_stage", "struct_info_specs"]
