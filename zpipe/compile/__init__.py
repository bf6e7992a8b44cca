"""Model path: cut an ONNX model into stages, compile each with TVM (tuned), emit a topology.

Modules: ``graph`` (load and describe an ONNX model), ``analysis`` (chain cuts, forks, parallel blocks), ``plan``
(the stage plan), ``cut`` (stage ONNX models), ``target``, ``build`` (TVM compile and manifests), ``tuning`` and
``tune_child`` (MetaSchedule with a persistent database), ``emit`` (topology files), ``report`` (plans as text or
JSON), ``driver`` (:func:`compile_model`), ``commands`` (the CLI), ``models`` (ONNX models built in code).
onnx and tvm are imported inside functions only.
"""

from .build import export_stage, struct_info_specs
from .driver import CompileOptions, CompileReport, compile_model, plan_model
from .errors import CompileError
from .target import TargetSpec, parse_target
from .tuning import TuningOptions

__all__ = ["export_stage", "struct_info_specs", "CompileOptions", "CompileReport", "compile_model", "plan_model",
           "CompileError", "TargetSpec", "parse_target", "TuningOptions"]
