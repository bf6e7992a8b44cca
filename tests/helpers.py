"""Stage functions for tests, importable by dotted path from topology files (tests/ is on sys.path)."""

from __future__ import annotations

import time

import numpy as np


def double(inputs):
    return inputs["x"] * 2


def timed_sleep(inputs):
    """Sleeps 0.2 s and returns its own start/end times (monotonic), so overlap is shown by the stage itself."""
    start = time.monotonic()
    time.sleep(0.2)
    return {"out": inputs["x"], "span": np.array([start, time.monotonic()])}
