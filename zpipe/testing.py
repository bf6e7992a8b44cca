"""Toy stages and helpers for tests, examples and benchmarks. Usable from topology files by dotted path
(``kind = "zpipe.testing:Sleep"``) and from Python.
"""

from __future__ import annotations

import os
import time
from typing import Mapping

import numpy as np

from .errors import StageError
from .stage import Stage

__all__ = ["Scale", "Sleep", "FailOn", "Pid", "Exit", "Affine"]


class Scale(Stage):
    """``out = x * factor + offset`` for its single input; output port ``out``."""

    input_names = ("x",)
    output_names = ("out",)

    def __init__(self, *, factor: float = 1.0, offset: float = 0.0) -> None:
        self.factor = factor
        self.offset = offset

    def process(self, inputs: Mapping[str, np.ndarray]):
        x = inputs["x"]
        return {"out": (x * np.asarray(self.factor, dtype=x.dtype) + np.asarray(self.offset, dtype=x.dtype))}


class Sleep(Stage):
    """Sleeps ``seconds`` (a known service time), then passes its input through; output port ``out``."""

    input_names = ("x",)
    output_names = ("out",)

    def __init__(self, *, seconds: float) -> None:
        self.seconds = seconds

    def process(self, inputs: Mapping[str, np.ndarray]):
        time.sleep(self.seconds)
        return {"out": inputs["x"]}


class FailOn(Stage):
    """Passes ``x`` through, but raises when ``x.flat[0] == value``: a stage that fails some requests."""

    input_names = ("x",)
    output_names = ("out",)

    def __init__(self, *, value: float) -> None:
        self.value = value

    def process(self, inputs: Mapping[str, np.ndarray]):
        x = inputs["x"]
        if x.size and x.flat[0] == self.value:
            raise StageError(f"refusing input starting with {self.value!r} (as configured)")
        return {"out": x}


class Pid(Stage):
    """Returns its process id as ``pid`` next to the passed-through ``out``; shows which process ran a stage."""

    input_names = ("x",)
    output_names = ("out", "pid")

    def process(self, inputs: Mapping[str, np.ndarray]):
        return {"out": inputs["x"], "pid": np.array(os.getpid(), dtype=np.int64)}


class Nice(Stage):
    """Returns the nice value of the thread running it as ``nice``, next to the passed-through ``out``."""

    input_names = ("x",)
    output_names = ("out", "nice")

    def process(self, inputs: Mapping[str, np.ndarray]):
        return {"out": inputs["x"], "nice": np.array(os.getpriority(os.PRIO_PROCESS, 0), dtype=np.int64)}


class Exit(Stage):
    """Kills its own process (``os._exit``) when ``x.flat[0] == value``: a worker crash on cue."""

    input_names = ("x",)
    output_names = ("out",)

    def __init__(self, *, value: float, code: int = 3) -> None:
        self.value = value
        self.code = code

    def process(self, inputs: Mapping[str, np.ndarray]):
        x = inputs["x"]
        if x.size and x.flat[0] == self.value:
            os._exit(self.code)
        return {"out": x}


class Affine(Stage):
    """``y = x * scale + offset`` after sleeping ``seconds``: the local twin of a remote affine model, with a
    known service time (tests of offload policies)."""

    input_names = ("x",)
    output_names = ("y",)

    def __init__(self, *, scale: float = 2.0, offset: float = 1.0, seconds: float = 0.0) -> None:
        self.scale, self.offset, self.seconds = scale, offset, seconds

    def process(self, inputs: Mapping[str, np.ndarray]):
        if self.seconds:
            time.sleep(self.seconds)
        x = inputs["x"]
        return {"y": x * np.asarray(self.scale, x.dtype) + np.asarray(self.offset, x.dtype)}
