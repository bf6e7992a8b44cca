"""A pipeline's Prometheus metrics (Pipeline.serve_metrics): scraped over HTTP from a real pipeline whose gate sends
requests to a real edge server process, and parsed with prometheus-client's own parser."""

from __future__ import annotations

import signal
import time
import urllib.request

import numpy as np
import pytest

pytest.importorskip("tvm")

from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from server_models import SHAPE  # noqa: E402
from test_policy import affine, affine_server, gated_auto  # noqa: E402,F401  (fixtures)
from test_server import serve  # noqa: E402,F401  (fixture)

from zpipe import Pipeline  # noqa: E402
from zpipe.errors import ZpipeError  # noqa: E402


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics as {(sample name, sorted labels): value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def until(port: int, check, timeout_s: float = 5.0):
    """Scrape until ``check(samples)`` holds (board entries follow within 100-200 ms); the last scrape either way."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape(port)
        if check(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def gated(endpoint: str):
    """X from meta "offload" when the request gives it, else from the latency policy."""
    return gated_auto([endpoint], local_s=0.02, meta_key="offload")


def test_the_metrics_count_each_request_where_it_ran_and_show_a_dead_server(affine_server):
    server = affine_server
    x = np.ones(SHAPE, np.float32)
    with Pipeline(gated(server.endpoint)) as pipe:
        port = pipe.serve_metrics(0)
        with pytest.raises(ZpipeError, match=f"already serves its metrics on port {port}"):
            pipe.serve_metrics(0)
        for offload in (1, 1, 1, 1, 0, 0, 0):
            np.testing.assert_allclose(pipe.infer({"x": x}, meta={"offload": offload})["y"], x * 2 + 1)
        m = until(port, lambda m: m.get(("zpipe_stage_requests_total", (("outcome", "processed"), ("stage", "gate"))))
                  == 7 and m.get(("zpipe_remote_pings_sent_total", (("stage", "remote"),)), 0) > 0)
        assert m[("zpipe_pipeline_requests_total", (("outcome", "ok"),))] == 7
        assert m[("zpipe_pipeline_requests_total", (("outcome", "failed"),))] == 0
        assert m[("zpipe_pipeline_in_flight", ())] == 0
        # X given per request: 4 to the server, tensor bytes and all; 3 on the device; the policy decided none
        assert m[("zpipe_remote_requests_sent_total", (("stage", "remote"),))] == 4, m
        assert m[("zpipe_remote_tensor_bytes_sent_total", (("stage", "remote"),))] == 4 * x.nbytes
        assert m[("zpipe_stage_requests_total", (("outcome", "processed"), ("stage", "local")))] == 3
        assert m[("zpipe_stage_requests_total", (("outcome", "processed"), ("stage", "gate")))] == 7
        assert sum(v for (name, _), v in m.items() if name == "zpipe_gate_decisions_total") == 0
        assert m[("zpipe_remote_up", (("stage", "remote"),))] == 1
        assert m[("zpipe_remote_servers_down", (("stage", "remote"),))] == 0
        assert m[("zpipe_remote_pings_sent_total", (("stage", "remote"),))] > 0  # a policy gate: pings on
        assert 0 < m[("zpipe_remote_ping_seconds", (("stage", "remote"),))] < 1.0
        assert 0.015 < m[("zpipe_stage_service_seconds", (("stage", "local"),))] < 0.5

        for _ in range(5):  # X from the policy: each request one decision for a side
            np.testing.assert_allclose(pipe.infer({"x": x})["y"], x * 2 + 1)

        def decided(m):
            return {d: m.get(("zpipe_gate_decisions_total", (("decision", d), ("stage", "gate"))), 0)
                    for d in ("remote", "local")}

        m = until(port, lambda m: sum(decided(m).values()) == 5)
        assert sum(decided(m).values()) == 5, decided(m)
        assert m[("zpipe_pipeline_requests_total", (("outcome", "ok"),))] == 12

        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(timeout=10)
        m = until(port, lambda m: m.get(("zpipe_remote_up", (("stage", "remote"),))) == 0)
        assert m[("zpipe_remote_up", (("stage", "remote"),))] == 0, "the breaker did not open on a dead server"
        assert m[("zpipe_remote_servers_down", (("stage", "remote"),))] == 1
    with pytest.raises(OSError):  # closed with the pipeline
        scrape(port)


def test_an_application_registers_the_collector_in_its_own_registry(affine_server):
    with Pipeline(gated(affine_server.endpoint)) as pipe:
        registry = CollectorRegistry()
        registry.register(pipe.metrics_collector())
        pipe.infer({"x": np.ones(SHAPE, np.float32)}, meta={"offload": 0})
        text = generate_latest(registry).decode()
    assert 'zpipe_pipeline_requests_total{outcome="ok"} 1.0' in text, text
    assert 'zpipe_pipeline_requests_total{outcome="submitted"} 1.0' in text
