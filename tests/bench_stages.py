"""Stages with known service-time behaviour for the load-test harness tests (``kind = "bench_stages:..."``)."""

from __future__ import annotations

import time
from typing import Mapping

import numpy as np

from zpipe import Stage

__all__ = ["RandomSleep", "SlowOn", "service_draws"]


def service_draws(*, seed: int, base_s: float, mean_s: float, n: int) -> np.ndarray:
    """The service times RandomSleep(seed, base_s, mean_s) sleeps for its first ``n`` requests, in order."""
    return base_s + np.random.default_rng(seed).exponential(mean_s, size=n)


class RandomSleep(Stage):
    """Sleeps ``base_s + Exp(mean_s)`` per request, drawn in order from a generator seeded with ``seed``: a known
    service-time distribution, and a known sequence (``service_draws``). Passes ``x`` through as ``out``."""

    input_names = ("x",)
    output_names = ("out",)

    def __init__(self, *, seed: int, base_s: float, mean_s: float) -> None:
        self.seed, self.base_s, self.mean_s = seed, base_s, mean_s

    def setup(self) -> None:
        self._rng = np.random.default_rng(self.seed)

    def process(self, inputs: Mapping[str, np.ndarray]):
        time.sleep(self.base_s + self._rng.exponential(self.mean_s))
        return {"out": inputs["x"]}


class SlowOn(Stage):
    """Sleeps ``seconds`` when ``x.flat[0] == value`` (to make that request time out), else passes at once."""

    input_names = ("x",)
    output_names = ("out",)

    def __init__(self, *, value: float, seconds: float) -> None:
        self.value, self.seconds = value, seconds

    def process(self, inputs: Mapping[str, np.ndarray]):
        if inputs["x"].flat[0] == self.value:
            time.sleep(self.seconds)
        return {"out": inputs["x"]}
