"""The ``gate`` stage kind: send each request down exactly one of two branches, chosen by a control value X.

X == 1 → the ``then`` branch (in offload topologies: the edge server); X == 0 → the ``else`` branch (the device).
The branch not taken receives a skip notice instead of tensors: its stages do not run, and a remote stage sends
nothing to its server for that request. Wiring::

    [stages.gate]
    kind = "gate"
    control = "x"                                   # the port holding X: a one-element bool or integer tensor
    inputs = { x = "x", h = "h" }                   # the control port plus the tensors to route
    outputs = { "then.h" = "h@then", "else.h" = "h@else" }

X may instead come with the request (``pipe.submit(inputs, meta={"x": 1})``) when ``meta_key`` names it; a
request that carries the key uses it, others read the control port. A request whose X is neither 0 nor 1 fails.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from zpipe.errors import StageError, TopologyError
from zpipe.stage import Stage

__all__ = ["GateStage"]

_BRANCHES = ("then", "else")


class GateStage(Stage):
    may_skip_outputs = True

    def __init__(self, *, control: str = "x", meta_key: str | None = None) -> None:
        if not isinstance(control, str) or not control:
            raise TopologyError(f"gate control must be a port name, got {control!r}")
        self.control = control
        self.meta_key = meta_key

    def check_wiring(self, name: str, inputs: Sequence[tuple[str, str]], outputs: Sequence[tuple[str, str]]) -> None:
        ports = [p for p, _ in inputs]
        if self.control not in ports and self.meta_key is None:
            raise TopologyError(f"gate {name!r}: control port {self.control!r} is not among its inputs {ports}; "
                                "wire it, or set meta_key to take X from the request")
        routed = [p for p in ports if p != self.control]
        if not routed:
            raise TopologyError(f"gate {name!r} has no tensors to route: add inputs besides {self.control!r}")
        for port, _ in outputs:
            branch, _, tensor = port.partition(".")
            if branch not in _BRANCHES or tensor not in routed:
                raise TopologyError(f"gate {name!r} output port {port!r} must be 'then.<input>' or 'else.<input>' "
                                    f"with <input> one of {routed}")
        for branch in _BRANCHES:
            if not any(p.startswith(branch + ".") for p, _ in outputs):
                raise TopologyError(f"gate {name!r} routes nothing to its {branch!r} branch; add a "
                                    f"'{branch}.<input>' output")

    def decide(self, inputs: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> bool:
        """True for the then-branch (X == 1), False for the else-branch (X == 0)."""
        if self.meta_key is not None and self.meta_key in meta:
            value, where = meta[self.meta_key], f"meta {self.meta_key!r}"
        elif self.control in inputs:
            array, where = inputs[self.control], f"control input {self.control!r}"
            if array.size != 1 or array.dtype.kind not in "biu":
                raise StageError(f"gate {where} must hold one bool or integer value, got {array.dtype}"
                                 f"{list(array.shape)}")
            value = array.reshape(-1)[0].item()
        else:
            raise StageError(f"gate: the request carries no meta {self.meta_key!r} and no control input")
        if isinstance(value, bool) or value in (0, 1):
            return bool(value)
        raise StageError(f"gate {where} is {value!r}; X must be 0 (local branch) or 1 (remote branch)")

    def handle(self, inputs: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> dict[str, np.ndarray]:
        branch = "then" if self.decide(inputs, meta) else "else"
        return {f"{branch}.{port}": array for port, array in inputs.items() if port != self.control}

    def process(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.handle(inputs, {})
