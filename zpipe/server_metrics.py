"""The edge server's metrics: Prometheus series (prometheus-client) and per-client counters for the stats op.

The per-client counters are what proves the gate's promise: a client whose requests all took the local branch
shows zero requests and zero tensor bytes here. Each server has its own registry, so several servers (tests) can
live in one process.

Counting is on the request path, so it is kept cheap: the server's loop thread (the only writer) adds to plain
dicts, and a collector turns them into Prometheus families only when ``/metrics`` is scraped. prometheus-client's
own ``Counter`` takes a lock on every ``inc()``; six of those per request cost ~6 µs here.
"""

from __future__ import annotations

import bisect
import collections

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

__all__ = ["ServerMetrics"]

_MAX_CLIENTS = 256  # distinct client labels kept; the stats reply must stay under the 64 KiB header limit
_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


class ServerMetrics:
    """Counters of one server. Call the recording methods from the server's loop thread only."""

    def __init__(self) -> None:
        self.requests: collections.Counter[tuple[str, str]] = collections.Counter()  # (model, outcome)
        self.latency: dict[str, list] = {}  # model -> [count per bucket (last: +Inf)..., sum of seconds]
        self.queue_depth: dict[str, int] = {}
        self.messages: collections.Counter[tuple[str, str]] = collections.Counter()  # (client, kind)
        self.tensor_bytes: collections.Counter[str] = collections.Counter()  # client
        self.on_loop: collections.Counter[str] = collections.Counter()  # model
        self.malformed = 0
        self.undeliverable = 0
        self._per_client: collections.Counter[str] = collections.Counter()
        self._clients: set[str] = set()
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(self))

    def received(self, client: str, kind: str, nbytes: int) -> None:
        client = self._bounded(client)
        self.messages[client, kind] += 1
        counts = self._per_client
        counts["messages:" + client] += 1
        if kind == "request":
            self.tensor_bytes[client] += nbytes
            counts["requests"] += 1
            counts["request_bytes"] += nbytes
            counts["requests:" + client] += 1
            counts["request_bytes:" + client] += nbytes

    def _bounded(self, client: str) -> str:
        """Client names come from the network: past _MAX_CLIENTS distinct ones, the rest share one label."""
        if client in self._clients or len(self._clients) < _MAX_CLIENTS:
            self._clients.add(client)
            return client
        return "other"

    def ran_on_loop(self, model: str) -> None:
        self.on_loop[model] += 1
        self._per_client["run_on_loop"] += 1

    def finished(self, model: str, outcome: str, seconds: float) -> None:
        self.requests[model, outcome] += 1
        if outcome == "ok":
            hist = self.latency.get(model)
            if hist is None:
                hist = self.latency[model] = [0] * (len(_LATENCY_BUCKETS) + 1) + [0.0]
            hist[bisect.bisect_left(_LATENCY_BUCKETS, seconds)] += 1  # le semantics: a value on a bound counts in
            hist[-1] += seconds

    def set_queue_depth(self, model: str, depth: int) -> None:
        self.queue_depth[model] = depth

    def per_client(self) -> dict[str, int]:
        counts = dict(self._per_client)
        counts.setdefault("requests", 0)
        counts.setdefault("request_bytes", 0)
        counts.setdefault("run_on_loop", 0)
        return counts

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        """Expose /metrics over HTTP (loopback by default; put a proxy in front to publish it)."""
        start_http_server(port, addr=addr, registry=self.registry)


class _Collector:
    """Reads a ServerMetrics when scraped (on the HTTP server's thread). Each dict is copied in one step, which
    the GIL makes atomic against the loop thread's updates."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.m = metrics

    def collect(self):
        m = self.m
        yield family(CounterMetricFamily, "zpipe_server_requests", "Requests finished, by model and outcome",
                     ["model", "outcome"], m.requests)
        fam = HistogramMetricFamily("zpipe_server_request_seconds", "Time from arrival to reply, by model",
                                    labels=["model"])
        bounds = [str(b) for b in _LATENCY_BUCKETS] + ["+Inf"]
        for model, hist in sorted(dict(m.latency).items()):
            hist = list(hist)
            cumulative = [sum(hist[:i + 1]) for i in range(len(bounds))]
            fam.add_metric([model], list(zip(bounds, cumulative)), sum_value=hist[-1])
        yield fam
        yield family(GaugeMetricFamily, "zpipe_server_queue_depth", "Requests waiting for a worker, by model",
                     ["model"], m.queue_depth)
        yield family(CounterMetricFamily, "zpipe_server_received_messages", "Messages received, by client and kind",
                     ["client", "kind"], m.messages)
        yield family(CounterMetricFamily, "zpipe_server_received_tensor_bytes", "Tensor bytes received, by client",
                     ["client"], m.tensor_bytes)
        yield CounterMetricFamily("zpipe_server_malformed_messages", "Messages that broke the wire format",
                                  value=m.malformed)
        yield CounterMetricFamily("zpipe_server_undeliverable_replies", "Replies to clients that were gone",
                                  value=m.undeliverable)
        yield family(CounterMetricFamily, "zpipe_server_run_on_loop", "Requests the server's loop ran itself (a fast "
                     "in-process model while no model thread was busy), by model", ["model"], m.on_loop)


def family(cls, name: str, doc: str, labels: list[str], values: dict):
    """A counter or gauge family with one sample per key of ``values`` (a label value, or a tuple of them)."""
    fam = cls(name, doc, labels=labels)
    for key, value in sorted(dict(values).items()):
        fam.add_metric(list(key) if isinstance(key, tuple) else [key], value)
    return fam
