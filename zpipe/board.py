"""A signal board: stages on one host publish small measurements that other stages read (the gate's policy).

Each stage owns one JSON file ``<run dir>/board/<stage>.json``, replaced atomically (write + rename); writers decide
how often (the worker: within 2 ms of a change, else every 50-200 ms). Readers get the last complete snapshot,
cached for ``interval_s`` (2 ms). Files rather than sockets keep
the data plane free of control chatter and let a person ``cat`` what the policy saw. Pure stdlib; local only.

A reader in the process that hosts the stage (a gate and its remote stand-in share one: zpipe.grouping) gets the
stage's figures from memory instead (:meth:`Board.host`), as of its read: no file, and no need to publish each
change (a stand-in's pings, 40 events a second) within ms for it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

__all__ = ["Board", "Ewma", "CpuLoad"]

log = logging.getLogger(__name__)


class Board:
    def __init__(self, directory: str | Path, *, interval_s: float = 0.002) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.interval_s = interval_s
        self._last_write: dict[str, float] = {}  # for writers that want to know when they last published
        self._cache: dict[str, tuple[float, dict[str, Any] | None]] = {}
        self._hosted: dict[str, Callable[[], dict[str, Any]]] = {}

    def host(self, stage: str, figures: Callable[[], dict[str, Any]]) -> None:
        """``stage`` runs in this process: :meth:`read` calls ``figures`` (from the thread that reads) instead of
        reading its file."""
        self._hosted[stage] = figures

    def publish(self, stage: str, values: dict[str, Any]) -> None:
        now = time.monotonic()
        self._last_write[stage] = now
        path = self.dir / f"{stage}.json"
        tmp = path.with_name(f".{stage}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**values, "published": now}))
        os.replace(tmp, path)

    def read(self, stage: str) -> dict[str, Any] | None:
        now = time.monotonic()
        figures = self._hosted.get(stage)
        if figures is not None:
            try:
                return {**figures(), "published": now}
            except Exception:  # a stage's signals() failed: as unreadable as a broken file, and said
                log.exception("the figures of stage %r could not be read", stage)
                return None
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


class CpuLoad:
    """This device's CPU use since the previous call, 0..1 (the first call returns 0).

    Under a CPU quota (a container's limit, cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``) the device is its
    quota, not the host: the share of the quota's periods since the last call in which it was used up (a hog in
    the container reads ~1.0 however idle the host is). Without one, the host's CPU use (psutil's CPU times, each
    reader its own window: psutil.cpu_percent keeps one per process, which two readers in one process, a gate and a
    remote stand-in, would cut short for each other)."""

    def __init__(self) -> None:
        self._quota = _quota()
        self._last: tuple[float, int, float] | None = None
        self._host_last: tuple[float, float, float] | None = None  # (when, total CPU seconds, idle CPU seconds)
        self._value = 0.0

    def __call__(self) -> float:
        if self._quota is None:
            return self._host()
        now = self._read()
        if now is None:
            return 0.0
        last = self._last
        if last is not None and now[0] - last[0] < self._quota[1]:
            return self._value  # shorter than one period: the last figure stands, the window keeps growing
        self._last = now
        if last is not None:
            self._value = min(1.0, (now[1] - last[1]) * self._quota[1] / (now[0] - last[0]))
        return self._value

    def _host(self) -> float:
        import psutil

        now = time.monotonic()
        if self._host_last is not None and now - self._host_last[0] < 0.01:
            return self._value  # (a window this short says little)
        times = psutil.cpu_times()
        # As psutil.cpu_percent counts: guest time is in user time already; waiting for I/O is idle.
        total = sum(times) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)
        idle = times.idle + getattr(times, "iowait", 0.0)
        if self._host_last is not None and total > self._host_last[1]:
            _, total_then, idle_then = self._host_last
            self._value = min(1.0, max(0.0, 1.0 - (idle - idle_then) / (total - total_then)))
        self._host_last = (now, total, idle)
        return self._value

    def stall_clock(self) -> tuple[float, float] | None:
        """Two running counts, in seconds, of how long this device's CPU quota has been used up, to subtract from
        a later reading (zpipe.policy.stalled): while it is, no thread of the device runs, whatever it waits for. The
        cgroup's ``throttled_time`` sums it over CPUs (two busy CPUs count it twice), and the throttled periods
        times the period bound it by the clock. None without a quota."""
        now = self._read()
        return None if now is None else (now[2], now[1] * self._quota[1])

    def _read(self) -> tuple[float, int, float] | None:
        """(now, periods in which the quota was used up, seconds it was), or None without a quota."""
        if self._quota is None:
            return None
        try:
            lines = self._quota[0].read_text().splitlines()
            fields = dict(line.split() for line in lines if line.count(" ") == 1)
            throttled = int(fields["throttled_usec"]) / 1e6 if "throttled_usec" in fields \
                else int(fields["throttled_time"]) / 1e9  # v2 counts microseconds, v1 nanoseconds
            return time.monotonic(), int(fields["nr_throttled"]), throttled
        except (OSError, KeyError, ValueError):
            return None


def _quota(root: Path = Path("/sys/fs/cgroup")) -> tuple[Path, float] | None:
    """(the ``cpu.stat`` file, the period in seconds) of this process's cgroup if it has a CPU quota, else None."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2: cpu.max is "<quota or max> <period>"
            candidates = [(root / path.lstrip("/"), "cpu.max", None)]
        elif "cpu" in controllers.split(","):  # cgroup v1, mounted as "cpu" or "cpu,cpuacct"
            candidates = [(root / name / path.lstrip("/"), "cpu.cfs_quota_us", "cpu.cfs_period_us")
                          for name in dict.fromkeys((controllers, "cpu"))]
        else:
            continue
        for directory, quota_file, period_file in candidates:
            try:
                quota, *period = (directory / quota_file).read_text().split()
                if period_file:
                    period = (directory / period_file).read_text().split()
                if quota not in ("max", "-1"):
                    return directory / "cpu.stat", int(period[0]) / 1e6
            except (OSError, IndexError, ValueError):
                continue
    return None
