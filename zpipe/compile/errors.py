"""The model path's own error: :class:`CompileError`, a :class:`~zpipe.errors.ZpipeError` (exit code 11).

Where it sits in the tree of ``zpipe/errors.py``::

    ZpipeError (1)
    ├── TopologyError (3)
    │   └── ArtifactError (4)      the model file is missing, not ONNX, or invalid; OUT holds another model
    └── CompileError (11)          the model cannot be planned or compiled as asked: an op TVM cannot import,
                                   a dynamic shape without --shape, a --cut/--place/--shape value that names
                                   nothing, a missing CUDA device or cross compiler, a tuning timeout

Messages name the node, tensor, stage or file at fault (``!r``), say what was expected, and suggest a fix.
"""

from __future__ import annotations

from ..errors import ZpipeError

__all__ = ["CompileError"]


class CompileError(ZpipeError):
    """The model cannot be cut or compiled as asked; the message names the node, tensor, stage or option."""

    exit_code = 11
