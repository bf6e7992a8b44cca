"""Reading, comparing and plotting ``zpipe bench`` reports (the JSON written by ``--json``, and PNG plots)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from .loadtest import PERCENTILES, SCHEMA

if TYPE_CHECKING:
    from .loadtest import BenchReport

__all__ = ["load_report", "compare_reports", "plot_report"]


def load_report(path: str | Path) -> dict[str, Any]:
    """A report written by ``--json``; ValueError names the file when it is not one (or another schema)."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {str(path)!r} as a zpipe bench JSON report: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        found = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(f"{str(path)!r} has schema {found!r}, expected {SCHEMA!r}")
    return doc


_COMPARED = (("throughput req/s", ("throughput_rps",)), *((f"{k.replace('_', '.')} ms", ("latency_ms", k)) for k in
             (*PERCENTILES, "max")), ("error rate", ("error_rate",)))


def _figure(step: Mapping[str, Any], path: tuple[str, ...]) -> float | None:
    if path == ("error_rate",):
        return (step["failed"] + step["timed_out"]) / step["sent"] if step["sent"] else None
    value: Any = step
    for key in path:
        value = value.get(key) if isinstance(value, Mapping) else None
    return value


def compare_reports(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows ``{step, load_a, load_b, metric, a, b, ratio}`` (ratio = b / a, None when a is 0 or missing) for the
    steps both reports have, matched by position."""
    rows = []
    for i, (sa, sb) in enumerate(zip(a["steps"], b["steps"])):
        for label, path in _COMPARED:
            va, vb = _figure(sa, path), _figure(sb, path)
            ratio = vb / va if va and vb is not None else None
            rows.append({"step": i, "load_a": sa["level"], "load_b": sb["level"], "metric": label, "a": va,
                         "b": vb, "ratio": ratio})
    return rows


def plot_report(report: BenchReport, path: str | Path) -> None:
    """A PNG: latency of every request over the run (warm-up grey, failures red) and each step's latency CDF."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax_t, ax_c = fig.subplots(1, 2)
    unit = "req/s" if report.config["mode"] == "open" else "in flight"
    for step in report.steps:
        label = f"{step.level:g} {unit}"
        data = np.array([(t, lat) for t, lat, _, _ in step.samples]).reshape(-1, 2)
        ok = np.array([k == "ok" for _, _, k, _ in step.samples], dtype=bool)
        warm = np.array([w for _, _, _, w in step.samples], dtype=bool)
        line = ax_t.scatter(*data[ok & ~warm].T, s=4, label=label)
        ax_t.scatter(*data[ok & warm].T, s=4, color="0.7")
        ax_t.scatter(*data[~ok].T, s=12, marker="x", color="red")
        lat = np.sort(data[ok & ~warm, 1])
        if lat.size:
            ax_c.step(lat, (np.arange(lat.size) + 0.5) / lat.size, where="post", color=line.get_facecolor()[0],
                      label=f"{label}: p99 {step.latency_ms['p99']:g} ms")
    ax_t.set(xlabel="intended send time (s)" if unit == "req/s" else "send time (s)", ylabel="latency (ms)",
             title="latency over time (grey: warm-up, red x: failed)")
    ax_c.set_yscale("logit")  # stretches the tail: 90 %, 99 % and 99.9 % get equal room
    ticks = [t for t in (0.01, 0.1, 0.5, 0.9, 0.99, 0.999, 0.9999) if ax_c.has_data()]
    ax_c.set_yticks(ticks, [f"{100 * t:g} %" for t in ticks], minor=False)
    ax_c.set_yticks([], minor=True)
    ax_c.set(xlabel="latency (ms)", ylabel="requests with latency ≤ x", title="latency CDF (logit scale)")
    ax_c.grid(True, alpha=0.3)
    for ax in (ax_t, ax_c):
        if ax.has_data():
            ax.legend(loc="best", fontsize="small")
    fig.savefig(path, dpi=100)
