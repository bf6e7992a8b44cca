"""The ``merge`` stage kind: join the outputs of parallel branches (zpipe joins them by request id first)."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from zpipe.errors import StageError, TopologyError
from zpipe.stage import Stage

__all__ = ["MergeStage"]

_OPS = ("concat", "add", "stack", "pass", "select")


class MergeStage(Stage):
    """Combine every input (in the order the topology lists them) into its output.

    ``op``: ``concat`` / ``stack`` along ``axis``, ``add`` (element-wise sum), ``pass`` (each input goes to the
    output port at the same position: a pure join), or ``select``, which joins the two branches behind a gate:
    inputs are ``[then_1..then_n, else_1..else_n]``, outputs ``[out_1..out_n]``, and output *i* is whichever of
    ``then_i``/``else_i`` ran. ``timeout_s`` bounds how long the stage waits for the other branches once the
    first one arrived (default: the topology's ``join_timeout_s``).
    """

    light = True

    def __init__(self, *, op: str = "concat", axis: int = 1, timeout_s: float | None = None) -> None:
        if op not in _OPS:
            raise TopologyError(f"merge op {op!r} is not one of {list(_OPS)}")
        if timeout_s is not None and not (isinstance(timeout_s, (int, float)) and 0 < timeout_s < float("inf")):
            raise TopologyError(f"merge timeout_s must be a positive finite number, got {timeout_s!r}")
        self.op = op
        self.axis = axis
        self.join_timeout_s = timeout_s
        self.accepts_skipped = op == "select"

    def runnable(self, arrived) -> bool:
        """``select`` runs as soon as one branch delivered all its tensors: when a gate hedges a request (a policy
        probe runs on both sides), the first answer wins and the later one is dropped."""
        states = list(arrived.values())
        if self.op != "select":
            return all(v is not None for v in states)
        n = len(states) // 2
        return all(v is not None for v in states) or all(v is True for v in states[:n]) or \
            all(v is True for v in states[n:])

    def check_wiring(self, name, inputs, outputs) -> None:
        if self.op == "select" and len(inputs) != 2 * len(outputs):
            raise TopologyError(f"merge {name!r} op 'select' needs two inputs per output (then_i, else_i), got "
                                f"{len(inputs)} inputs for {len(outputs)} outputs")
        if self.op == "pass" and len(inputs) != len(outputs):
            raise TopologyError(f"merge {name!r} op 'pass' needs one output per input, got {len(inputs)} inputs "
                                f"and {len(outputs)} outputs")
        if self.op in ("concat", "add", "stack") and len(outputs) != 1:
            raise TopologyError(f"merge {name!r} op {self.op!r} has exactly one output, got {len(outputs)}")

    def process(self, inputs: Mapping[str, np.ndarray]):
        arrays = list(inputs.values())
        if self.op == "select":
            return self._select(inputs)
        try:
            if self.op == "pass":
                return tuple(arrays)
            if self.op == "add":
                total = np.add(arrays[0], arrays[1]) if len(arrays) > 1 else arrays[0].copy()
                for extra in arrays[2:]:
                    np.add(total, extra, out=total)
                return total
            if self.op == "stack":
                return np.stack(arrays, axis=self.axis)
            return np.concatenate(arrays, axis=self.axis)
        except ValueError as exc:  # shape mismatch between branches
            shapes = {name: a.shape for name, a in inputs.items()}
            raise StageError(f"merge {self.op!r} cannot combine inputs of shapes {shapes}: {exc}") from exc

    @staticmethod
    def _select(inputs: Mapping[str, np.ndarray | None]) -> tuple:
        ports, arrays = list(inputs), list(inputs.values())
        n = len(arrays) // 2
        complete = [side for side in (arrays[:n], arrays[n:]) if all(a is not None for a in side)]
        if len(complete) == 1:  # one branch answered whole (a hedged request may hold parts of the other)
            return tuple(complete[0])
        chosen = []
        for i in range(n):
            then, other = arrays[i], arrays[n + i]
            if (then is None) == (other is None):
                state = "both arrived" if then is not None else "both were skipped"
                raise StageError(f"merge 'select': {ports[i]!r} and {ports[n + i]!r} {state}; exactly one branch "
                                 "of a gate runs per request")
            chosen.append(then if then is not None else other)
        return tuple(chosen)
