"""Stages placed on an edge server: a device pipeline talking to a real `zpipe serve` process."""

from __future__ import annotations

import textwrap
import time

import numpy as np
import pytest

pytest.importorskip("tvm")

from server_models import SHAPE, add_version, build_affine  # noqa: E402
from test_server import ServerProcess, keys, serve  # noqa: E402,F401  (fixtures)

from zpipe import Pipeline, RequestFailed, StageError, Topology  # noqa: E402

pytestmark = pytest.mark.tvm


@pytest.fixture(scope="module")
def affine(tmp_path_factory):
    return build_affine(tmp_path_factory.mktemp("remote"), "affine", scale=2.0)


def topology(endpoint: str, library, extra_host: str = "", extra_stage: str = "") -> Topology:
    text = f"""
    [pipeline]
    inputs = ["x"]
    outputs = ["z", "w"]
    timeout_s = 20

    [hosts.edge]
    endpoint = "{endpoint}"
    {extra_host}

    [stages.pre]
    kind = "zpipe.testing:Scale"
    offset = 1.0
    inputs = ["x"]
    outputs = {{ out = "h" }}

    [stages.offloaded]
    kind = "tvm"
    library = "{library}"
    host = "edge"
    model = "affine"
    {extra_stage}
    inputs = {{ x = "h" }}
    outputs = {{ y = "r" }}

    [stages.local]
    kind = "zpipe.testing:Scale"
    factor = -1.0
    inputs = {{ x = "h" }}
    outputs = {{ out = "l" }}

    [stages.post]
    kind = "zpipe.testing:Scale"
    inputs = {{ x = "r" }}
    outputs = {{ out = "z" }}

    [stages.post_local]
    kind = "zpipe.testing:Scale"
    inputs = {{ x = "l" }}
    outputs = {{ out = "w" }}
    """
    return Topology.from_toml(textwrap.dedent(text))


def test_stage_on_an_edge_server_from_its_repository(affine, tmp_path, serve):
    repo = tmp_path / "repo"
    add_version(repo, "affine", 1, affine)
    server = serve(repo)
    with Pipeline(topology(server.endpoint, affine)) as pipe:
        xs = [np.full(SHAPE, float(i), np.float32) for i in range(100)]
        futures = [pipe.submit({"x": x}) for x in xs]  # many in flight through the remote stand-in
        for x, f in zip(xs, futures):
            out = f.result(timeout=30).outputs
            np.testing.assert_allclose(out["z"], (x + 1) * 2 + 1)
            np.testing.assert_allclose(out["w"], -(x + 1))
    from zpipe.client import RemoteClient

    with RemoteClient(server.endpoint) as c:
        assert c.stats()["requests"] == 100


def test_model_missing_on_the_server_is_a_clear_error(affine, tmp_path, serve):
    repo = tmp_path / "repo"
    repo.mkdir()
    server = serve(repo)
    with pytest.raises(StageError, match=r"model 'affine' \(any version\) is not on server 'edge'"):
        Pipeline(topology(server.endpoint, affine)).start()


def test_upload_then_serve_with_curve(affine, tmp_path, serve, keys):
    repo = tmp_path / "repo"
    repo.mkdir()
    server = serve(repo, "--server-key", str(keys["server_secret"]), "--clients", str(keys["allowed"]),
                   "--allow-upload")
    topo = topology(server.endpoint, affine, extra_host=f'server_key = "{keys["server_public"]}"\n'
                    f'client_key = "{keys["device"]}"', extra_stage="upload = true")
    with Pipeline(topo) as pipe:
        x = np.full(SHAPE, 3.0, np.float32)
        np.testing.assert_allclose(pipe.infer({"x": x})["z"], (x + 1) * 2 + 1)
    assert (repo / "affine" / "1" / "affine.so").exists()


def test_dead_server_fails_requests_clearly(affine, tmp_path, serve):
    repo = tmp_path / "repo"
    add_version(repo, "affine", 1, affine)
    server = serve(repo)
    with Pipeline(topology(server.endpoint, affine, extra_host="timeout_s = 3\nheartbeat_s = 0.2")) as pipe:
        x = np.zeros(SHAPE, np.float32)
        pipe.infer({"x": x})
        server.proc.kill()
        server.proc.wait()
        started = time.monotonic()
        with pytest.raises(RequestFailed, match="offloaded.*(connection to .* lost|connection lost|did not answer)"):
            pipe.infer({"x": x})
        assert time.monotonic() - started < 5


def test_remote_kind_needs_a_host():
    with pytest.raises(Exception, match="needs a host"):
        Topology.from_toml(textwrap.dedent("""
        [pipeline]
        inputs = ["x"]
        outputs = ["y"]
        [stages.r]
        kind = "remote"
        inputs = ["x"]
        outputs = ["y"]
        """))


