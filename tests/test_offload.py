"""Partial and dynamic offload over an emulated link: branches overlap, and X == 0 sends nothing to the server."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

pytest.importorskip("tvm")

from server_models import SHAPE, add_version, build_affine  # noqa: E402
from test_server import serve  # noqa: E402,F401  (fixture)

from zpipe import Pipeline, RequestFailed, Topology  # noqa: E402
from zpipe.client import RemoteClient  # noqa: E402
from zpipe.linkemu import LinkEmulator, parse_address  # noqa: E402

pytestmark = pytest.mark.tvm


@pytest.fixture(scope="module")
def affine(tmp_path_factory):
    return build_affine(tmp_path_factory.mktemp("offload"), "affine", scale=2.0)


@pytest.fixture
def edge(affine, tmp_path, serve):
    """A server with model 'affine', behind a link emulator (10 ms each way: a 20 ms RTT, 5G-MEC-like)."""
    repo = tmp_path / "repo"
    add_version(repo, "affine", 1, affine)
    server = serve(repo)
    with LinkEmulator(listen=("127.0.0.1", 0), target=parse_address(server.endpoint), delay_ms=10) as emu:
        yield server, emu


def partial(endpoint: str) -> Topology:
    return Topology.from_toml(textwrap.dedent(f"""
    [pipeline]
    inputs = ["x"]
    outputs = ["r", "l"]
    [hosts.edge]
    endpoint = "{endpoint}"
    [stages.remote]
    kind = "remote"
    host = "edge"
    model = "affine"
    inputs = ["x"]
    outputs = {{ y = "r" }}
    [stages.local]
    kind = "zpipe.testing:Sleep"
    seconds = 0.04
    inputs = ["x"]
    outputs = {{ out = "l" }}
    """))


def test_partial_offload_runs_remote_and_local_branches_at_the_same_time(edge):
    server, emu = edge
    with Pipeline(partial(f"tcp://127.0.0.1:{emu.port}")) as pipe:
        x = np.ones(SHAPE, np.float32)
        pipe.infer({"x": x})
        results = [pipe.submit({"x": x}).result(timeout=30) for _ in range(10)]  # one at a time
    for r in results:
        np.testing.assert_allclose(r.outputs["r"], x * 2 + 1)
        (r0, r1), (l0, l1) = r.stage_times["remote"], r.stage_times["local"]
        assert r0 < l1 and l0 < r1, "the branches did not overlap"
        assert r1 - r0 >= 0.02  # the remote branch includes the 20 ms round trip
    latency = np.median([r.latency_s for r in results])
    # max(remote ≈ 20 ms + ε, local = 40 ms), not their sum (≥ 60 ms)
    assert latency < 0.055, f"median latency {latency * 1000:.1f} ms: the branches did not run in parallel"


def gated(endpoint: str, heartbeat_s: float) -> Topology:
    return Topology.from_toml(textwrap.dedent(f"""
    [pipeline]
    inputs = ["x", "X"]
    outputs = ["y"]
    timeout_s = 10
    [hosts.edge]
    endpoint = "{endpoint}"
    heartbeat_s = {heartbeat_s}
    [stages.gate]
    kind = "gate"
    control = "X"
    inputs = ["X", "x"]
    outputs = {{ "then.x" = "x@edge", "else.x" = "x@local" }}
    [stages.remote]
    kind = "remote"
    host = "edge"
    model = "affine"
    inputs = {{ x = "x@edge" }}
    outputs = {{ y = "y@edge" }}
    [stages.local]
    kind = "zpipe.testing:Scale"
    factor = 2.0
    offset = 1.0
    inputs = {{ x = "x@local" }}
    outputs = {{ out = "y@local" }}
    [stages.select]
    kind = "merge"
    op = "select"
    inputs = ["y@edge", "y@local"]
    outputs = ["y"]
    """))


@pytest.mark.parametrize("heartbeat_s", [0, 0.2])
def test_x0_sends_not_one_byte_to_the_server(edge, heartbeat_s):
    server, emu = edge
    with Pipeline(gated(f"tcp://127.0.0.1:{emu.port}", heartbeat_s)) as pipe, \
            RemoteClient(server.endpoint) as observer:  # a direct connection: not through the emulator
        before_link = emu.stats()["up_bytes"]
        before_server = observer.stats()["requests"]
        started = time.monotonic()
        x = np.ones(SHAPE, np.float32)
        futures = [pipe.submit({"x": x * i, "X": np.array(0)}) for i in range(200)]
        for i, f in enumerate(futures):
            np.testing.assert_allclose(f.result(timeout=30).outputs["y"], x * i * 2 + 1)
        time.sleep(0.5)  # let any stray traffic show up
        idle_s = time.monotonic() - started
        link_bytes = emu.stats()["up_bytes"] - before_link
        assert observer.stats()["requests"] == before_server  # zero request frames at the server
        time.sleep(0.1)
        assert pipe.signals("remote")["requests_sent"] == 0  # and the device's own count agrees
        if heartbeat_s == 0:
            assert link_bytes == 0  # not one byte: the link carried nothing at all
        else:  # only ZeroMQ heartbeats: a PING of ~10 bytes per interval
            assert link_bytes <= (idle_s / heartbeat_s + 2) * 16, link_bytes
        # X == 1: now the requests do go to the server, and both counters see them
        ones = [pipe.submit({"x": x, "X": np.array(1)}) for _ in range(20)]
        for f in ones:
            np.testing.assert_allclose(f.result(timeout=30).outputs["y"], x * 2 + 1)
        assert observer.stats()["requests"] == before_server + 20
        time.sleep(0.1)
        device = pipe.signals("remote")
        assert device["requests_sent"] == 20 and device["bytes_sent"] == 20 * x.nbytes
        assert emu.stats()["up_bytes"] - before_link >= 20 * x.nbytes


def test_pings_track_the_link_both_ways_without_a_request(edge):
    """The stand-in's published round trip follows the link's delay from its pings alone: up when the link
    slows, back down when it recovers, while no request is sent."""
    from zpipe.stages.remote import RemoteStage

    server, emu = edge
    stage = RemoteStage(endpoint=f"tcp://127.0.0.1:{emu.port}", model="affine", ping_s=0.05)
    stage.setup()
    try:
        x = np.ones(SHAPE, np.float32)
        for _ in range(5):
            np.testing.assert_allclose(stage.process({"x": x})["y"], x * 2 + 1)
        time.sleep(0.4)
        before = stage.signals()
        assert 0.015 < before["ping_s"] < 0.1 and before["rtt_s"] >= before["ping_s"], before
        emu.set(delay_ms=60)  # +100 ms round trip
        time.sleep(0.6)
        slow = stage.signals()
        emu.set(delay_ms=10)
        time.sleep(0.8)
        after = stage.signals()
    finally:
        stage.teardown()
    assert slow["requests_sent"] == after["requests_sent"] == before["requests_sent"] == 5
    assert slow["rtt_measured_s"] == before["rtt_measured_s"]  # no request measured anything new...
    assert slow["rtt_s"] - before["rtt_s"] > 0.07, (before, slow)  # ...but the pings saw the slower link
    assert abs(after["rtt_s"] - before["rtt_s"]) < 0.03, (before, after)  # and its recovery


def test_link_outage_fails_requests_clearly_and_recovers(edge):
    server, emu = edge
    text = partial(f"tcp://127.0.0.1:{emu.port}")
    topo = Topology(name=text.name, inputs=text.inputs, outputs=text.outputs, stages=text.stages,
                    hosts=[type(text.hosts[0])(name="edge", endpoint=text.hosts[0].endpoint, timeout_s=1.0,
                                                heartbeat_s=0.2)])
    with Pipeline(topo) as pipe:
        x = np.ones(SHAPE, np.float32)
        pipe.infer({"x": x})
        emu.outage()
        started = time.monotonic()
        with pytest.raises(RequestFailed, match="stage 'remote'.*(lost|did not answer|broke off)"):
            pipe.infer({"x": x})
        assert time.monotonic() - started < 3
        emu.restore()
        deadline = time.monotonic() + 20
        while True:
            try:
                np.testing.assert_allclose(pipe.infer({"x": x})["r"], x * 2 + 1)
                break
            except RequestFailed:
                assert time.monotonic() < deadline, "offload did not resume after the link came back"


def test_demo_gated_topology_gives_the_same_output_either_way(tmp_path, serve):
    from zpipe.demo import DEMO_INPUT_SHAPE, build_demo, load_whole

    build_demo(tmp_path / "build" / "demo")
    server = serve(tmp_path / "build" / "demo" / "repo")
    topo_dir = tmp_path / "topologies"
    topo_dir.mkdir()
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    for name in ("gated.toml", "partial.toml"):
        text = (root / "topologies" / name).read_text().replace("tcp://127.0.0.1:5555", server.endpoint)
        (topo_dir / name).write_text(text)
    whole = load_whole(tmp_path / "build" / "demo")
    rng = np.random.default_rng(4)
    xs = [rng.standard_normal(DEMO_INPUT_SHAPE).astype("float32") for _ in range(12)]
    expect = [whole(v) for v in xs]
    patterns = {"alternating": [i % 2 for i in range(24)], "random": list(rng.integers(0, 2, 24)),
                "all 0": [0] * 24, "all 1": [1] * 24}
    with Pipeline(Topology.from_file(topo_dir / "gated.toml")) as pipe:
        for name, xs_pattern in patterns.items():
            futures = [pipe.submit({"x": xs[i % 12], "offload": np.array(X)}) for i, X in enumerate(xs_pattern)]
            for i, (X, f) in enumerate(zip(xs_pattern, futures)):
                result = f.result(timeout=30)
                np.testing.assert_allclose(result.outputs["y"], expect[i % 12], atol=1e-4, err_msg=name)
                assert ("branch0_edge" in result.stage_times) == bool(X), name
                assert ("branch0_local" in result.stage_times) == (not X), name  # never both
    np.savez(tmp_path / "x.npz", x=xs[0])
    proc = subprocess.run([sys.executable, "-m", "zpipe", "run", str(topo_dir / "partial.toml"), "--inputs",
                           str(tmp_path / "x.npz"), "--requests", "20", "--out", str(tmp_path / "y.npz")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    with np.load(tmp_path / "y.npz") as out:
        np.testing.assert_allclose(out["y"], expect[0], atol=1e-4)
