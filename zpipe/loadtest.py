"""Load generation and latency figures for ``zpipe bench``: closed and open loop, HDR percentiles, JSON, plots.

The harness is a client only: it drives any ``submit(inputs, timeout_s) -> Future[Result]`` (a local
:class:`~zpipe.Pipeline`, or a :class:`~zpipe.client.RemoteClient` bound to one model) and never runs inside the
stages it measures. Guarantees, for every step of a run:

* **Exact accounting.** Each request the load starts ends in one bucket: ``ok``, ``failed`` (by kind: the
  request's ``reason``, e.g. ``stage_error``, ``busy``) or ``timed_out`` (kinds ``timeout`` and
  ``timeout_before_send``: an open-loop request whose deadline passed before the target accepted it), so
  ``sent == ok + failed + timed_out``. A request still unanswered when the drain gives up is counted as failed,
  kind ``unfinished``; nothing is dropped.
* **No coordinated omission.** Open-loop requests have intended send times fixed in advance (constant or Poisson
  gaps); latency runs from that time, so waiting for a saturated target counts. The schedule never slows down: a
  held-back sender catches up at once, and how late it sent is reported (``schedule_lag_ms``).
* **Warm-up excluded.** Requests started in a step's first ``warmup_s`` are tallied apart (``warmup``) and kept
  out of every figure.
* **Honest percentiles.** Latencies of successful requests go into an HDR histogram (microseconds, 3 significant
  digits: every figure within 0.1 %); failed requests are counted, not timed.

Done-callbacks run on the target's I/O thread: they only record, and never submit.
"""

from __future__ import annotations

import json
import math
import os
import platform
import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from hdrh.histogram import HdrHistogram

from .errors import Busy, PeerTimeout, PipelineClosed, RequestFailed, TopologyError

__all__ = ["SCHEMA", "PERCENTILES", "TIMED_OUT", "LoadConfig", "Tick", "StepResult", "BenchReport", "run_load",
           "load_npz", "parse_shape", "random_tensor", "random_inputs", "load_report", "compare_reports",
           "plot_report"]

SCHEMA = "zpipe-bench/1"
PERCENTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p99_9": 99.9}
TIMED_OUT = frozenset({"timeout", "timeout_before_send"})
_HDR_HIGHEST_US = 3_600_000_000  # one hour
_HDR_DIGITS = 3

Submit = Callable[[Mapping[str, np.ndarray], float], Future]


@dataclass(frozen=True, kw_only=True)
class LoadConfig:
    """The load of a run, one step per entry of ``levels``. Raises ValueError naming the field when invalid.

    ``mode`` "closed": ``level`` requests in flight, a new one as soon as one ends; "open": ``level`` requests per
    second on a fixed schedule (``arrivals`` "constant" or "poisson"). Each step runs ``warmup_s`` and then
    ``duration_s`` seconds or ``requests`` requests (at most one of the two; 10 s when neither is given).
    """

    mode: str = "closed"
    levels: tuple[float, ...] = (1,)
    arrivals: str = "constant"
    duration_s: float | None = None
    requests: int | None = None
    warmup_s: float = 1.0
    timeout_s: float = 30.0
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "levels", tuple(self.levels))
        if self.mode not in ("closed", "open"):
            raise ValueError(f"mode must be 'closed' or 'open', got {self.mode!r}")
        if self.arrivals not in ("constant", "poisson"):
            raise ValueError(f"arrivals must be 'constant' or 'poisson', got {self.arrivals!r}")
        if not self.levels or not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0
                                      for v in self.levels):
            raise ValueError(f"levels must be positive numbers, got {list(self.levels)!r}")
        if self.mode == "closed" and any(v != int(v) for v in self.levels):
            raise ValueError(f"closed-loop levels are concurrencies (whole numbers), got {list(self.levels)!r}")
        if self.duration_s is not None and self.requests is not None:
            raise ValueError("give duration_s or requests, not both")
        if self.requests is None and self.duration_s is None:
            object.__setattr__(self, "duration_s", 10.0)
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"duration_s must be positive, got {self.duration_s!r}")
        if self.requests is not None and not self.requests >= 1:
            raise ValueError(f"requests must be at least 1, got {self.requests!r}")
        if not self.warmup_s >= 0 or not self.timeout_s > 0:
            raise ValueError(f"warmup_s must be >= 0 and timeout_s > 0, got {self.warmup_s!r}, {self.timeout_s!r}")


@dataclass(frozen=True, kw_only=True)
class Tick:
    """Progress of the running step, for a live display: figures over the last interval (about 0.5 s)."""

    step: int
    steps: int
    level: float
    elapsed_s: float
    fraction: float  # of the step done, 0..1 (warm-up included)
    sent: int
    ok: int
    errors: int
    rps: float
    p99_ms: float | None


@dataclass(frozen=True, kw_only=True)
class StepResult:
    """The figures of one step. Latencies in ms; ``samples`` (not serialized) feed the plot."""

    level: float
    window_s: float
    sent: int
    ok: int
    failed: int
    timed_out: int
    errors: dict[str, int]
    warmup: dict[str, int]
    throughput_rps: float
    offered_rps: float
    latency_ms: dict[str, float | None]
    schedule_lag_ms: dict[str, float] | None
    saturated: bool | None
    stages: dict[str, dict[str, Any]]
    routes: list[dict[str, Any]]
    client_overhead_us: dict[str, float] | None
    interrupted: bool
    hdr: str
    samples: tuple[tuple[float, float, str, bool], ...] = field(default=(), repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "samples"}


@dataclass(frozen=True, kw_only=True)
class BenchReport:
    """A whole run: its configuration, one :class:`StepResult` per level, and where it ran."""

    config: dict[str, Any]
    steps: tuple[StepResult, ...]
    environment: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (schema :data:`SCHEMA`; keys are only ever added within a schema version)."""
        return {"schema": SCHEMA, "config": self.config, "environment": self.environment,
                "harness": {"client_only": True, "clock": "time.monotonic", "histogram_unit": "us",
                            "histogram_significant_digits": _HDR_DIGITS,
                            "latency_origin": "intended send time" if self.config["mode"] == "open"
                            else "submit call"},
                "steps": [s.to_dict() for s in self.steps]}

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


# -- inputs --------------------------------------------------------------------------------------------------------
def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """One request's inputs from an ``.npz`` (one array per pipeline input); ValueError names the file."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {str(path)!r} as .npz: {exc}") from exc


def parse_shape(text: str) -> tuple[str, tuple[int, ...], str]:
    """``"x=1x3x32x32:float32"`` -> ``("x", (1, 3, 32, 32), "float32")``; the dtype defaults to float32."""
    name, sep, rest = text.partition("=")
    dims, _, dtype = rest.partition(":")
    try:
        shape = tuple(int(d) for d in dims.split("x")) if dims else ()
        dtype = str(np.dtype(dtype or "float32"))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{text!r} is not NAME=DIMxDIM[:DTYPE] (e.g. x=1x3x32x32:float32): {exc}") from None
    if not sep or not name or any(d < 0 for d in shape):
        raise ValueError(f"{text!r} is not NAME=DIMxDIM[:DTYPE] (e.g. x=1x3x32x32:float32)")
    return name, shape, dtype


def random_tensor(shape: Sequence[int], dtype: str, rng: np.random.Generator) -> np.ndarray:
    kind = np.dtype(dtype).kind
    if kind == "b":
        return rng.integers(0, 2, size=shape).astype(dtype)
    if kind in "iu":
        return rng.integers(0, 10, size=shape).astype(dtype)
    return rng.standard_normal(size=shape).astype(dtype)


def random_inputs(topology: Any, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tensors for every pipeline input, shaped by the manifests of the stages that read them.

    Raises TopologyError naming the input when no reader declares a spec (a gate's control input, python stages):
    give those inputs in an ``.npz`` instead.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for tensor in topology.inputs:
        specs, readers = set(), []
        for spec in topology.stages:
            for port, t in spec.inputs:
                if t != tensor:
                    continue
                readers.append(spec.name)
                manifest = getattr(spec.stage, "manifest", None)
                for ts in getattr(manifest, "inputs", ()):
                    if ts.name == port:
                        specs.add((tuple(ts.shape), str(ts.dtype)))
        if len(specs) != 1:
            why = "declare no tensor spec" if not specs else f"declare different specs {sorted(specs)}"
            raise TopologyError(f"pipeline input {tensor!r}: its readers {readers} {why}, so random inputs cannot "
                                f"be made; give --inputs FILE.npz (or --shape {tensor}=1x3x32x32:float32)")
        (shape, dtype), = specs
        out[tensor] = random_tensor(shape, dtype, rng)
    return out


# -- running -------------------------------------------------------------------------------------------------------
class _Step:
    """Records of one step. Done-callbacks run on the target's I/O thread, so they only timestamp, append (atomic
    under the GIL) and free a slot: every record is one request, so ``issued - len(records)`` are in flight."""

    def __init__(self) -> None:
        self.records: list[tuple] = []  # (t_intended, t_sent, t_done, kind, (latency_s, stage_times)|None, warm)
        self.issued = [0, 0]  # [measured, warm-up] requests started

    def issue(self, submit: Submit, inputs: Mapping, t_intended: float, timeout_s: float, warm: bool,
              slots: threading.Semaphore | None) -> bool:
        """Send one request; False when the target is closed (the step stops)."""
        t_sent = time.monotonic()
        remaining = timeout_s - (t_sent - t_intended)
        try:
            if remaining <= 0:
                raise PeerTimeout("deadline passed before the target accepted the request", reason="before_send")
            future = submit(inputs, remaining)
        except (RequestFailed, Busy, PipelineClosed) as exc:
            self.issued[warm] += 1
            kind = "timeout_before_send" if getattr(exc, "reason", None) == "before_send" else _kind(exc)
            self._record((t_intended, t_sent, time.monotonic(), kind, None, warm), slots)
            return not isinstance(exc, PipelineClosed)
        except BaseException:  # a configuration error (wrong input names...): not a figure, the run stops
            if slots is not None:
                slots.release()
            raise
        self.issued[warm] += 1
        future.add_done_callback(lambda f: self._done(f, t_intended, t_sent, warm, slots))
        return True

    def _done(self, future: Future, t_intended: float, t_sent: float, warm: bool,
              slots: threading.Semaphore | None) -> None:
        t_done = time.monotonic()
        exc = future.exception()
        if exc is None:
            result = future.result()
            self._record((t_intended, t_sent, t_done, "ok", (result.latency_s, result.stage_times), warm), slots)
        else:
            self._record((t_intended, t_sent, t_done, _kind(exc), None, warm), slots)

    def _record(self, record: tuple, slots: threading.Semaphore | None) -> None:
        self.records.append(record)
        if slots is not None:
            slots.release()

    def drain(self, limit_s: float) -> None:
        deadline = time.monotonic() + limit_s
        while len(self.records) < sum(self.issued) and time.monotonic() < deadline:
            time.sleep(0.002)


def _kind(exc: BaseException) -> str:
    if isinstance(exc, PeerTimeout) or getattr(exc, "reason", None) == "timeout":
        return "timeout"
    if isinstance(exc, PipelineClosed):
        return "shutdown"
    return getattr(exc, "reason", None) or type(exc).__name__


def _closed_loop(step: _Step, submit: Submit, inputs: Sequence[Mapping], n: int, cfg: LoadConfig,
                 stop: threading.Event) -> tuple[float, float]:
    slots = threading.Semaphore(n)
    start = time.monotonic()
    warm_end = start + cfg.warmup_s
    end = warm_end + cfg.duration_s if cfg.duration_s is not None else math.inf
    last, i = warm_end, 0
    while not stop.is_set() and step.issued[False] != cfg.requests:
        if not slots.acquire(timeout=0.05):
            if time.monotonic() >= end:
                break
            continue
        now = time.monotonic()
        if now >= end:
            slots.release()
            break
        if not step.issue(submit, inputs[i % len(inputs)], now, cfg.timeout_s, now < warm_end, slots):
            break
        last, i = now, i + 1
    return warm_end, _window_end(end, last, warm_end, stop)


def _open_loop(step: _Step, submit: Submit, inputs: Sequence[Mapping], rate: float, cfg: LoadConfig,
               stop: threading.Event) -> tuple[float, float]:
    rng = np.random.default_rng(cfg.seed)
    start = time.monotonic()
    warm_end = start + cfg.warmup_s
    end = warm_end + cfg.duration_s if cfg.duration_s is not None else math.inf
    t, last, i = start, warm_end, 0
    while not stop.is_set() and step.issued[False] != cfg.requests and t < end:
        while (wait := t - time.monotonic()) > 0 and not stop.is_set():
            time.sleep(min(wait, 0.05))
        if stop.is_set() or not step.issue(submit, inputs[i % len(inputs)], t, cfg.timeout_s, t < warm_end, None):
            break
        last, i = t, i + 1
        t = start + i / rate if cfg.arrivals == "constant" else t + rng.exponential(1.0 / rate)
    return warm_end, _window_end(end, last, warm_end, stop)


def _window_end(end: float, last: float, warm_end: float, stop: threading.Event) -> float:
    """The measured window closes at the end of the duration (or when stopped), else at the last measured start."""
    if end != math.inf:
        return min(end, time.monotonic()) if stop.is_set() else end
    return max(last, warm_end)


def _ticker(step: _Step, index: int, steps: int, level: float, cfg: LoadConfig, progress: Callable[[Tick], None],
            done: threading.Event) -> None:
    start = last = time.monotonic()
    seen = ok = 0
    total_s = cfg.warmup_s + (cfg.duration_s or 0.0)
    while True:
        finished = done.wait(0.5)
        now = time.monotonic()
        new = step.records[seen:]
        seen += len(new)
        lat = [(r[2] - r[0]) * 1000 for r in new if r[3] == "ok"]
        frac = (now - start) / total_s if cfg.duration_s is not None else step.issued[False] / cfg.requests
        ok += len(lat)
        progress(Tick(step=index, steps=steps, level=level, elapsed_s=now - start,
                      fraction=1.0 if finished else min(1.0, frac),
                      sent=sum(step.issued), ok=ok, errors=seen - ok, rps=len(lat) / (now - last),
                      p99_ms=float(np.percentile(lat, 99)) if lat else None))
        if finished:
            return
        last = now


def run_load(submit: Submit, inputs: Sequence[Mapping[str, np.ndarray]], config: LoadConfig, *,
             target: Mapping[str, Any] | None = None, stage_hosts: Mapping[str, str] | None = None,
             progress: Callable[[Tick], None] | None = None, stop: threading.Event | None = None) -> BenchReport:
    """Apply ``config``'s load through ``submit``, one step per level, and return every figure.

    ``inputs`` are cycled request by request (arrays are never modified). ``target`` describes what was measured
    (copied into the report's config); ``stage_hosts`` maps stage names, in topology order, to their host, for the
    per-stage figures. ``progress`` is called from a helper thread about twice a second; setting ``stop`` ends the
    run early (in-flight requests are drained and accounted; the step is marked ``interrupted``).
    """
    if not inputs:
        raise ValueError("inputs must hold at least one request's tensors")
    stop = stop or threading.Event()
    stage_hosts = dict(stage_hosts or {})
    origin = time.monotonic()
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    steps = []
    for index, level in enumerate(config.levels):
        step = _Step()
        ticking = threading.Event()
        ticker = None
        if progress is not None:
            ticker = threading.Thread(target=_ticker, args=(step, index, len(config.levels), level, config,
                                                            progress, ticking), daemon=True)
            ticker.start()
        try:
            loop = _closed_loop if config.mode == "closed" else _open_loop
            w0, w1 = loop(step, submit, inputs, int(level) if config.mode == "closed" else level, config, stop)
            step.drain(config.timeout_s + 10.0)
        finally:
            ticking.set()
            if ticker is not None:
                ticker.join()
        steps.append(_summarize(step, level, config, w0, w1, origin, stage_hosts, stop.is_set()))
        if stop.is_set():
            break
    return BenchReport(config={"mode": config.mode, "levels": list(config.levels), "arrivals": config.arrivals,
                               "duration_s": config.duration_s, "requests": config.requests,
                               "warmup_s": config.warmup_s, "timeout_s": float(config.timeout_s), "seed": config.seed,
                               "target": dict(target or {})},
                       steps=tuple(steps),
                       environment={"zpipe": _version(), "python": platform.python_version(),
                                    "platform": platform.platform(), "cpus": os.cpu_count(),
                                    "started_at": started_at})


# -- figures -------------------------------------------------------------------------------------------------------
def _hist() -> HdrHistogram:
    return HdrHistogram(1, _HDR_HIGHEST_US, _HDR_DIGITS)


def _us(seconds: float) -> int:
    return min(_HDR_HIGHEST_US, max(1, round(seconds * 1e6)))


def _ms(hist: HdrHistogram) -> dict[str, float | None]:
    if hist.get_total_count() == 0:
        return {k: None for k in (*PERCENTILES, "max", "min", "mean", "stddev")}
    out = {k: hist.get_value_at_percentile(p) / 1000 for k, p in PERCENTILES.items()}
    out.update(max=hist.get_max_value() / 1000, min=hist.get_min_value() / 1000,
               mean=hist.get_mean_value() / 1000, stddev=hist.get_stddev() / 1000)
    return {k: round(v, 3) for k, v in out.items()}


def _summarize(step: _Step, level: float, cfg: LoadConfig, w0: float, w1: float, origin: float,
               hosts: Mapping[str, str], interrupted: bool) -> StepResult:
    records = list(step.records)
    hist, stage_hist = _hist(), {}
    kinds, warm, routes = Counter(), Counter(), Counter()
    lags, overheads, samples = [], [], []
    answered = ok_in_window = 0
    order = {name: i for i, name in enumerate(hosts)}
    for t_int, t_sent, t_done, kind, res, is_warm in records:
        samples.append((t_int - origin, (t_done - t_int) * 1000, kind, is_warm))
        if w0 <= t_done <= w1 and kind not in TIMED_OUT:
            answered += 1
            ok_in_window += kind == "ok"
        (warm if is_warm else kinds)[kind] += 1
        if is_warm:
            continue
        lags.append(t_sent - t_int)
        if res is None:
            continue
        latency_s, stage_times = res
        hist.record_value(_us(t_done - t_int))
        overheads.append((t_done - t_sent - latency_s) * 1e6)
        for name, (a, b) in stage_times.items():
            stage_hist.setdefault(name, _hist()).record_value(_us(b - a))
        if stage_times:
            routes[tuple(sorted(stage_times, key=lambda s: (order.get(s, len(order)), s)))] += 1
    for is_warm, tally in ((True, warm), (False, kinds)):
        missing = step.issued[is_warm] - sum(tally.values())
        if missing:
            tally["unfinished"] += missing
    ok = kinds.pop("ok", 0)
    timed_out = sum(kinds[k] for k in TIMED_OUT)
    sent = step.issued[False]
    window = w1 - w0
    if window > 0 and ok_in_window:
        throughput = ok_in_window / window
    else:  # too short a window (a handful of requests): fall back to the span of the measured requests
        span = max((r[2] for r in records if not r[5]), default=w0) - w0
        throughput = ok / span if span > 0 else 0.0
    stages = {name: {"host": hosts.get(name, "?"), "count": h.get_total_count(),
                     "p50": round(h.get_value_at_percentile(50) / 1000, 3),
                     "p99": round(h.get_value_at_percentile(99) / 1000, 3),
                     "mean": round(h.get_mean_value() / 1000, 3)}
              for name, h in sorted(stage_hist.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0]))}
    is_open = cfg.mode == "open"
    lag_ms = np.array(lags) * 1000 if lags else np.zeros(1)
    return StepResult(
        level=level, window_s=round(window, 6), sent=sent, ok=ok, failed=sent - ok - timed_out, timed_out=timed_out,
        errors=dict(sorted((k, v) for k, v in kinds.items() if v)),
        warmup={"sent": step.issued[True], "ok": warm.pop("ok", 0), **dict(sorted(warm.items()))},
        throughput_rps=round(throughput, 3), offered_rps=round(sent / window, 3) if window > 0 else 0.0,
        latency_ms=_ms(hist),
        schedule_lag_ms={"p50": round(float(np.percentile(lag_ms, 50)), 3),
                         "p99": round(float(np.percentile(lag_ms, 99)), 3),
                         "max": round(float(lag_ms.max()), 3)} if is_open else None,
        saturated=(window > 0 and answered / window < 0.9 * level) if is_open else None,
        stages=stages,
        routes=[{"stages": list(r), "hosts": sorted({hosts.get(s, "?") for s in r}), "count": n}
                for r, n in routes.most_common()],
        client_overhead_us={"p50": round(float(np.percentile(overheads, 50)), 1),
                            "p99": round(float(np.percentile(overheads, 99)), 1),
                            "mean": round(float(np.mean(overheads)), 1)} if overheads else None,
        interrupted=interrupted, hdr=hist.encode().decode("ascii"), samples=tuple(samples))


def _version() -> str:
    from . import __version__

    return __version__


# Reports (JSON, compare, plot) live in their own module; re-exported here for one import path.
from .loadtest_report import compare_reports, load_report, plot_report  # noqa: E402
