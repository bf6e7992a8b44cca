"""A signal board: stages on one host publish small measurements that other stages read (the gate's policy).

Each stage owns one JSON file ``<run dir>/board/<stage>.json``, replaced atomically (write + rename); writers decide
how often (the worker: within 2 ms of a change, at least every 50 ms). Readers get the last complete snapshot,
cached for ``interval_s`` (2 ms). Files rather than sockets keep
the data plane free of control chatter and let a person ``cat`` what the policy saw. Pure stdlib; local only.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

__all__ = ["Board", "Ewma", "cpu_load"]


class Board:
    def __init__(self, directory: str | Path, *, interval_s: float = 0.002) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.interval_s = interval_s
        self._last_write: dict[str, float] = {}  # for writers that want to know when they last published
        self._cache: dict[str, tuple[float, dict[str, Any] | None]] = {}

    def publish(self, stage: str, values: dict[str, Any]) -> None:
        now = time.monotonic()
        self._last_write[stage] = now
        path = self.dir / f"{stage}.json"
        tmp = path.with_name(f".{stage}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**values, "published": now}))
        os.replace(tmp, path)

    def read(self, stage: str) -> dict[str, Any] | None:
        now = time.monotonic()
        cached = self._cache.get(stage)
        if cached is not None and now - cached[0] < self.interval_s:
            return cached[1]
        try:
            values = json.loads((self.dir / f"{stage}.json").read_text())
        except (OSError, ValueError):
            values = None
        self._cache[stage] = (now, values)
        return values


class Ewma:
    """Exponentially weighted mean and variance (``alpha`` = weight of the newest sample)."""

    __slots__ = ("alpha", "mean", "var", "count")

    def __init__(self, alpha: float = 0.2) -> None:
        self.alpha = alpha
        self.mean: float | None = None
        self.var = 0.0
        self.count = 0

    def add(self, x: float) -> None:
        self.count += 1
        if self.mean is None:
            self.mean = x
            return
        delta = x - self.mean
        self.mean += self.alpha * delta
        self.var = (1 - self.alpha) * (self.var + self.alpha * delta * delta)

    def cap(self, x: float) -> None:
        """An upper bound of the quantity: the mean drops to ``x`` if it is above it (and the spread of the samples
        before, which described the old mean, starts afresh); with no mean yet, ``x`` becomes it (not counted as a
        sample); else nothing changes."""
        if self.mean is None or x < self.mean:
            self.mean, self.var = x, 0.0


def cpu_load() -> float:
    """This host's CPU use since the previous call, 0..1 (psutil; the first call returns 0)."""
    import psutil

    return psutil.cpu_percent(interval=None) / 100
