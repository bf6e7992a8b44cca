"""zpipe: split deep-learning inference across an edge device and an edge server.

Stages (TVM-compiled model pieces, Python functions, merges) run in their own processes and pass tensors over
ZeroMQ with a zero-copy framing layer; topologies wire them by tensor name. See docs/ for the guide.
"""

from .errors import (
    ArtifactError,
    Busy,
    FramingError,
    PeerTimeout,
    PipelineClosed,
    RequestFailed,
    StageError,
    TopologyError,
    ZpipeError,
)
from .framing import Kind, Limits, Message
from .manifest import Manifest, TensorSpec
from .pipeline import Pipeline, Result
from .stage import Stage
from .topology import HostSpec, StageSpec, Topology

__version__ = "0.1.0"

__all__ = [
    "ArtifactError",
    "Busy",
    "FramingError",
    "HostSpec",
    "Kind",
    "Limits",
    "Manifest",
    "Message",
    "PeerTimeout",
    "Pipeline",
    "PipelineClosed",
    "PythonStage",
    "MergeStage",
    "TvmStage",
    "RequestFailed",
    "Result",
    "Stage",
    "StageError",
    "StageSpec",
    "TensorSpec",
    "Topology",
    "TopologyError",
    "ZpipeError",
    "__version__",
]


def __getattr__(name: str):
    # The built-in kinds live in zpipe.stages, which imports zpipe: load them on first use, not at import.
    if name in ("PythonStage", "MergeStage", "TvmStage"):
        from .stage import BUILTIN_KINDS, import_object

        return import_object(BUILTIN_KINDS[{"PythonStage": "python", "MergeStage": "merge",
                                            "TvmStage": "tvm"}[name]])
    raise AttributeError(f"module 'zpipe' has no attribute {name!r}")
