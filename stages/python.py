"""The ``python`` stage kind: a user function, given by dotted path in a topology or as an object when embedding."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from zpipe.errors import TopologyError
from zpipe.stage import Stage, import_object

__all__ = ["PythonStage"]


class PythonStage(Stage):
    """Calls ``function(inputs)`` per request, where ``inputs`` maps port name to a read-only array.

    The function returns a dict keyed by output port, a single array (one output port), or a tuple (ports in
    order). ``function`` is a callable (embedding; cloudpickle carries it to the local worker process) or a dotted
    path ``"package.module:name"`` (topology files; imported in the worker).
    """

    def __init__(self, *, function: str | Callable[[Mapping[str, np.ndarray]], Any]) -> None:
        if isinstance(function, str):
            resolved = import_object(function, what="python stage function")  # fail early, in the parent
            if not callable(resolved):
                raise TopologyError(f"python stage function {function!r} is not callable")
        elif not callable(function):
            raise TopologyError(f"python stage function must be callable or a dotted path, got {function!r}")
        self.function = function
        self._fn: Callable | None = None

    def setup(self) -> None:
        fn = self.function
        self._fn = import_object(fn, what="python stage function") if isinstance(fn, str) else fn

    def process(self, inputs: Mapping[str, np.ndarray]) -> Any:
        return self._fn(inputs)

    def __getstate__(self) -> dict:
        return {"function": self.function, "_fn": None}
