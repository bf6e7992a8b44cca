"""The edge server's metrics: Prometheus series (prometheus-client) and per-client counters for the stats op.

The per-client counters are what proves the gate's promise: a client whose requests all took the local branch
shows zero requests and zero tensor bytes here. Each server has its own registry, so several servers (tests) can
live in one process.
"""

from __future__ import annotations

import collections
import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["ServerMetrics"]

_MAX_CLIENTS = 256  # distinct client labels kept; the stats reply must stay under the 64 KiB header limit
_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("zpipe_server_requests", "Requests finished, by model and outcome",
                                ["model", "outcome"], registry=self.registry)
        self.latency = Histogram("zpipe_server_request_seconds", "Time from arrival to reply, by model",
                                 ["model"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("zpipe_server_queue_depth", "Requests waiting for a worker, by model", ["model"],
                                 registry=self.registry)
        self.messages = Counter("zpipe_server_received_messages", "Messages received, by client and kind",
                                ["client", "kind"], registry=self.registry)
        self.tensor_bytes = Counter("zpipe_server_received_tensor_bytes", "Tensor bytes received, by client",
                                    ["client"], registry=self.registry)
        self.malformed = Counter("zpipe_server_malformed_messages", "Messages that broke the wire format",
                                 registry=self.registry)
        self.undeliverable = Counter("zpipe_server_undeliverable_replies", "Replies to clients that were gone",
                                     registry=self.registry)
        self.on_loop = Counter("zpipe_server_run_on_loop", "Requests the server's loop ran itself (a fast "
                               "in-process model while no model thread was busy), by model", ["model"],
                               registry=self.registry)
        self._lock = threading.Lock()
        self._per_client: collections.Counter[str] = collections.Counter()
        self._clients: set[str] = set()
        self._children: dict[tuple, object] = {}  # (metric, labels) -> its child: .labels() costs ~4 µs a call

    def child(self, metric, *labels: str):
        """``metric.labels(*labels)``, remembered (label values are bounded: models, outcomes, _MAX_CLIENTS)."""
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def received(self, client: str, kind: str, nbytes: int) -> None:
        client = self._bounded(client)
        self.child(self.messages, client, kind).inc()
        with self._lock:
            self._per_client[f"messages:{client}"] += 1
            if kind == "request":
                self.child(self.tensor_bytes, client).inc(nbytes)
                self._per_client["requests"] += 1
                self._per_client["request_bytes"] += nbytes
                self._per_client[f"requests:{client}"] += 1
                self._per_client[f"request_bytes:{client}"] += nbytes

    def _bounded(self, client: str) -> str:
        """Client names come from the network: past _MAX_CLIENTS distinct ones, the rest share one label."""
        with self._lock:
            if client in self._clients or len(self._clients) < _MAX_CLIENTS:
                self._clients.add(client)
                return client
        return "other"

    def ran_on_loop(self, model: str) -> None:
        self.child(self.on_loop, model).inc()
        with self._lock:
            self._per_client["run_on_loop"] += 1

    def finished(self, model: str, outcome: str, seconds: float) -> None:
        self.child(self.requests, model, outcome).inc()
        if outcome == "ok":
            self.child(self.latency, model).observe(seconds)

    def per_client(self) -> dict[str, int]:
        with self._lock:
            counts = dict(self._per_client)
        counts.setdefault("requests", 0)
        counts.setdefault("request_bytes", 0)
        counts.setdefault("run_on_loop", 0)
        return counts

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        """Expose /metrics over HTTP (loopback by default; put a proxy in front to publish it)."""
        start_http_server(port, addr=addr, registry=self.registry)
