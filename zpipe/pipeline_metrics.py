"""A running pipeline's metrics for Prometheus: its request counters and what each stage shows on the signal board.

    port = pipe.serve_metrics(9100)                 # /metrics on 127.0.0.1:9100 until the pipeline closes
    registry.register(pipe.metrics_collector())     # or into an application's own registry

Nothing is counted for this on the request path: a scrape copies the pipeline's counters and reads each stage's
board entry (the small JSON file its worker rewrites every 100-200 ms, or within ms of a change), so a pipeline
nobody scrapes pays nothing. The families (``stage``: a stage's name in the topology; counters end in _total):

    zpipe_pipeline_requests{outcome}        counter  submitted, ok, failed, late (a reply after its request ended)
    zpipe_pipeline_failures{reason}         counter  failed requests by reason (timeout, stage_error, ...)
    zpipe_pipeline_in_flight                gauge
    zpipe_stage_requests{stage,outcome}     counter  processed, failed, skipped (a branch the gate did not take)
    zpipe_stage_service_seconds{stage}      gauge    smoothed compute time per request
    zpipe_gate_decisions{stage,decision}    counter  an offload policy's decisions: remote, local, hedged, probes
    zpipe_gate_switches{stage}              counter  times the policy changed sides
    zpipe_gate_spares{stage,outcome}        counter  spare local copies that came due: sent (and why) or called off
    zpipe_remote_up{stage}                  gauge    1 while a server of the stand-in is up (its breaker closed)
    zpipe_remote_servers_down{stage}        gauge    servers of the stand-in whose breaker is open
    zpipe_remote_requests_sent{stage}       counter  requests sent to the server(s): 0 while the gate keeps X = 0
    zpipe_remote_tensor_bytes_sent{stage}   counter
    zpipe_remote_fallbacks{stage}           counter  requests re-run on the device after the server failed them
    zpipe_remote_pings_sent{stage}          counter
    zpipe_remote_rtt_seconds{stage}         gauge    the round trip a request would see now (the policy's figure)
    zpipe_remote_ping_seconds{stage}        gauge    the link's delay now, from the pings
    zpipe_remote_server_wait_seconds{stage} gauge    how long the server says a request waits for other clients

A stage whose board entry cannot be read (not started yet, or its worker restarting) is left out of that scrape.
The reason of each decision is per request (``Result.meta["why:<gate>"]``) and in the worker's debug log: free
text has no place in a label.
"""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .server_metrics import family

__all__ = ["PipelineCollector"]

_OUTCOMES = ("submitted", "ok", "failed", "late")


class PipelineCollector:
    """A prometheus-client collector of one pipeline (see the module docstring); reads it when scraped."""

    def __init__(self, pipeline: Any) -> None:  # a zpipe.Pipeline (which imports this module)
        self.pipeline = pipeline

    def collect(self) -> Iterator[Metric]:
        stats = self.pipeline.stats()
        yield family(CounterMetricFamily, "zpipe_pipeline_requests", "Requests of this pipeline, by outcome",
                     ["outcome"], {k: stats.get(k, 0) for k in _OUTCOMES})
        yield family(CounterMetricFamily, "zpipe_pipeline_failures", "Failed requests, by reason", ["reason"],
                     {k.split(":", 1)[1]: v for k, v in stats.items() if k.startswith("failed:")})
        yield GaugeMetricFamily("zpipe_pipeline_in_flight", "Requests submitted and not finished",
                                value=stats.get("in_flight", 0))
        entries = {}
        for name in self.pipeline.topology.order():
            entry = self.pipeline.signals(name)
            if entry:
                entries[name] = entry
        yield family(CounterMetricFamily, "zpipe_stage_requests", "Requests each stage handled, by outcome",
                     ["stage", "outcome"], {(s, k): e.get(k, 0) for s, e in entries.items()
                                            for k in ("processed", "failed", "skipped")})
        yield family(GaugeMetricFamily, "zpipe_stage_service_seconds", "Smoothed compute time per request",
                     ["stage"], {s: e["service_s"] for s, e in entries.items() if e.get("service_s") is not None})
        gates = {s: e for s, e in entries.items() if "decisions" in e}
        yield family(CounterMetricFamily, "zpipe_gate_decisions", "An offload policy's decisions: remote, local, "
                     "hedged (both branches), probes", ["stage", "decision"],
                     {(s, k): e["decisions"].get(k, 0) for s, e in gates.items()
                      for k in ("remote", "local", "hedged", "probes")})
        yield family(CounterMetricFamily, "zpipe_gate_switches", "Times the policy changed sides", ["stage"],
                     {s: e.get("switches", 0) for s, e in gates.items()})
        yield family(CounterMetricFamily, "zpipe_gate_spares", "Spare local copies that came due, by outcome",
                     ["stage", "outcome"], {(s, k): v for s, e in gates.items()
                                            for k, v in (e.get("spares") or {}).items()})
        remotes = {s: e for s, e in entries.items() if "requests_sent" in e}
        yield from _remote_families(remotes)


def _remote_families(remotes: dict[str, dict[str, Any]]) -> Iterator[Metric]:
    yield family(GaugeMetricFamily, "zpipe_remote_up", "1 while a server of the stand-in is up", ["stage"],
                 {s: int(bool(e.get("up"))) for s, e in remotes.items()})
    yield family(GaugeMetricFamily, "zpipe_remote_servers_down", "Servers of the stand-in whose breaker is open",
                 ["stage"], {s: len(e.get("down") or ()) for s, e in remotes.items()})
    for key, kind, name, doc in (
            ("requests_sent", CounterMetricFamily, "requests_sent", "Requests sent to the server(s)"),
            ("bytes_sent", CounterMetricFamily, "tensor_bytes_sent", "Tensor bytes sent to the server(s)"),
            ("fallbacks", CounterMetricFamily, "fallbacks", "Requests re-run on the device after a server failure"),
            ("pings_sent", CounterMetricFamily, "pings_sent", "Pings sent to the server(s)"),
            ("rtt_s", GaugeMetricFamily, "rtt_seconds", "The round trip a request would see now"),
            ("ping_s", GaugeMetricFamily, "ping_seconds", "The link's delay now, from the pings"),
            ("server_wait_s", GaugeMetricFamily, "server_wait_seconds",
             "How long the server says a request waits for other clients")):
        yield family(kind, f"zpipe_remote_{name}", doc, ["stage"],
                     {s: e[key] for s, e in remotes.items() if e.get(key) is not None})

