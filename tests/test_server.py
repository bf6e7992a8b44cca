"""The edge server as a real process: repository, hot swap, upload and keys, many clients, bad input, drain."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

pytest.importorskip("tvm")

from server_models import SHAPE, add_version, build_affine  # noqa: E402

from zpipe.client import RemoteClient, ServerRefused  # noqa: E402
from zpipe.errors import PeerTimeout, PipelineClosed, RequestFailed, ZpipeError  # noqa: E402
from zpipe.framing import Kind, Message  # noqa: E402
from zpipe.transport import recv_message, send_message  # noqa: E402

pytestmark = pytest.mark.tvm


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Compiled affine models: scale 2 (v1), scale 3 (v2), and a broken library."""
    out = tmp_path_factory.mktemp("built")
    lib2 = build_affine(out / "v1", "affine", scale=2.0)
    lib3 = build_affine(out / "v2", "affine", scale=3.0)
    broken = out / "broken"
    broken.mkdir()
    (broken / "affine.so").write_bytes(b"\x7fELF not really a library")
    manifest = json.loads(lib2.with_suffix(".json").read_text())
    manifest["library_sha256"] = ""
    (broken / "affine.json").write_text(json.dumps(manifest))
    # A real library whose manifest promises another input shape: it loads, and fails when called.
    wrong = out / "wrong_shape"
    wrong.mkdir()
    shutil.copy(lib2, wrong / "affine.so")
    manifest = json.loads(lib2.with_suffix(".json").read_text())
    manifest["inputs"][0]["shape"] = [1, 128]
    (wrong / "affine.json").write_text(json.dumps(manifest))
    return {"v1": lib2, "v2": lib3, "broken": broken / "affine.so", "wrong_shape": wrong / "affine.so"}


class ServerProcess:
    def __init__(self, repo: Path, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "zpipe", "serve", "--repo", str(repo), "--bind",
                                      "tcp://127.0.0.1:*", "--poll-s", "0.2", *args],
                                     stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.log: list[str] = []
        for line in self.proc.stderr:  # worker logs may come first (a broken model's setup failure)
            self.log.append(line)
            if "listening on" in line:
                break
        else:
            self.proc.wait()
            self.proc.stderr.close()
            raise AssertionError("server did not start:\n" + "".join(self.log))
        self.endpoint = line.split("listening on ")[1].split(";")[0]
        self._reader = threading.Thread(target=self._drain_stderr, daemon=True)
        self._reader.start()

    def _drain_stderr(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        finally:
            self._reader.join(timeout=5)
            self.proc.stderr.close()


@pytest.fixture
def serve(tmp_path):
    started = []

    def start(repo: Path, *args: str) -> ServerProcess:
        server = ServerProcess(repo, *args)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def x_of(i: float) -> np.ndarray:
    return np.full(SHAPE, i, dtype=np.float32)


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_repository_load_and_many_clients(built, tmp_path, serve, isolation):
    repo = tmp_path / "repo"
    add_version(repo, "affine", 1, built["v1"])
    server = serve(repo, "--workers", "2", "--isolation", isolation)
    errors = []

    def client(k: int) -> None:
        try:
            with RemoteClient(server.endpoint, timeout_s=30) as c:
                futures = [(i, c.submit("affine", {"x": x_of(k * 1000 + i)})) for i in range(100)]
                for i, f in futures:
                    r = f.result()
                    np.testing.assert_allclose(r.outputs["y"], x_of(k * 1000 + i) * 2 + 1)
                    assert r.meta["version"] == 1
        except Exception as exc:  # reported below, with the client number
            errors.append((k, exc))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    with RemoteClient(server.endpoint) as c:
        stats = c.stats()
    assert stats["requests"] == 800
    if isolation == "thread":  # a fast model runs on the server's loop whenever no model thread is busy
        assert stats["run_on_loop"] > 0


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_hot_swap_under_load_fails_nothing(built, tmp_path, serve, isolation):
    repo = tmp_path / "repo"
    add_version(repo, "affine", 1, built["v1"])
    server = serve(repo, "--isolation", isolation)
    seen = {}
    with RemoteClient(server.endpoint, timeout_s=30) as c:
        deadline = time.monotonic() + 60
        swapped_at = None
        i = 0
        while time.monotonic() < deadline:
            futures = [(i + j, c.submit("affine", {"x": x_of(i + j)})) for j in range(20)]
            for n, f in futures:
                r = f.result()  # any failure raises here: the swap must fail no request
                version = r.meta["version"]
                scale = {1: 2.0, 2: 3.0}[version]
                np.testing.assert_allclose(r.outputs["y"], x_of(n) * scale + 1)
                seen[version] = seen.get(version, 0) + 1
            i += 20
            if i == 200:
                add_version(repo, "affine", 2, built["v2"])
                swapped_at = i
            if seen.get(2, 0) >= 200:
                break
    assert swapped_at is not None and seen[1] >= 200 and seen[2] >= 200, seen


@pytest.mark.parametrize("isolation", ["process", "thread"])
@pytest.mark.parametrize("bad, why", [("broken", "cannot load TVM library"),  # not a library at all
                                      ("wrong_shape", "failed its warm-up run")])  # loads, fails when called
def test_broken_new_version_keeps_the_old_one_serving(built, tmp_path, serve, isolation, bad, why):
    repo = tmp_path / "repo"
    add_version(repo, "affine", 1, built["v1"])
    server = serve(repo, "--isolation", isolation)
    add_version(repo, "affine", 2, built[bad])
    with RemoteClient(server.endpoint) as c:
        deadline = time.monotonic() + 30
        while "version 2" not in c.health()["error:affine"]:
            assert time.monotonic() < deadline, c.health()
            time.sleep(0.1)
        health = c.health()
        assert health["ready"] and health["version:affine"] == 1 and health["state:affine"] == "available"
        assert why in health["error:affine"], health
        np.testing.assert_allclose(c.infer("affine", {"x": x_of(1)})["y"], x_of(3))

def test_health_exit_codes(built, tmp_path, serve):
    repo = tmp_path / "repo"
    add_version(repo, "affine", 1, built["v1"])
    add_version(repo, "broken", 1, built["broken"])
    server = serve(repo)

    def health(*args):
        return subprocess.run([sys.executable, "-m", "zpipe", "health", *args], capture_output=True, text=True,
                              timeout=30)

    not_ready = health(server.endpoint)
    assert not_ready.returncode == 1
    status = json.loads(not_ready.stdout)
    assert status["live"] and not status["ready"] and status["state:broken"] == "failed"
    assert 0 < status["rtt_ms"] < 1000, status  # the median of five pings on loopback
    assert health(server.endpoint, "--live").returncode == 0
    dead = health("tcp://127.0.0.1:9", "--timeout-s", "0.3")
    assert dead.returncode == 1 and "no connection established" in dead.stdout


@contextlib.contextmanager
def raw_dealer(endpoint: str):
    """A bare DEALER socket connected to a server: sends what RemoteClient never would."""
    ctx = zmq.Context()
    raw = ctx.socket(zmq.DEALER)
    raw.linger = 0
    raw.connect(endpoint)
    try:
        yield raw
    finally:
        ctx.destroy(linger=0)


def test_bad_requests_get_precise_errors_and_the_server_keeps_serving(built, tmp_path, serve):
    repo = tmp_path / "repo"
    add_version(repo, "affine", 1, built["v1"])
    server = serve(repo)
    with raw_dealer(server.endpoint) as raw:
        raw.send_multipart([b"garbage", b"\x00\x01"])
        assert raw.poll(10_000)
        _, reply = recv_message(raw)
        assert reply.kind == Kind.ERROR and reply.meta["error"] == "malformed"
        assert "prefix frame" in reply.meta["message"]
        send_message(raw, Message(kind=Kind.REQUEST, request_id=5, tensors={"x": x_of(1)}, meta={}))
        assert raw.poll(10_000)
        _, reply = recv_message(raw)
        assert reply.request_id == 5 and reply.meta["error"] == "bad_request" and "'model'" in reply.meta["message"]
        # a request whose deadline passes while it waits is answered "timeout" and never run
        send_message(raw, Message(kind=Kind.REQUEST, request_id=6, tensors={"x": x_of(1)},
                                  meta={"model": "affine", "timeout_ms": 0.001}))
        assert raw.poll(10_000)
        _, reply = recv_message(raw)
        assert reply.request_id == 6 and reply.meta["error"] == "timeout" and "not run" in reply.meta["message"]
    with RemoteClient(server.endpoint) as c:
        with pytest.raises(RequestFailed, match="not_found: model 'nope' is not available") as info:
            c.infer("nope", {"x": x_of(1)})
        assert info.value.reason == "not_found"
        with pytest.raises(RequestFailed, match=r"input 'x' expects float32\[1, 256\], got float64\[1, 256\]"):
            c.infer("affine", {"x": np.zeros(SHAPE)})
        with pytest.raises(RequestFailed, match="version 7 is not on this server"):
            c.infer("affine", {"x": x_of(1)}, version=7)
        # Our deadline passes first, or (on a busy machine) the server's answer to the same deadline is already in
        with pytest.raises(PeerTimeout, match=r"did not answer request .* within 1e-06s|past its deadline; not run"):
            c.infer("affine", {"x": x_of(1)}, timeout_s=1e-6)
        np.testing.assert_allclose(c.infer("affine", {"x": x_of(2)})["y"], x_of(5))


@pytest.mark.parametrize("inline_ms", ["1", "0"])
def test_a_thread_server_runs_fast_models_on_its_loop(built, tmp_path, serve, inline_ms):
    """Two thread hand-offs cost more than a small model: the server runs it on its own loop while no model thread
    is busy (unless told not to). The first request goes to a model thread, which measures how long it takes."""
    repo = tmp_path / "repo"
    add_version(repo, "affine", 1, built["v1"])
    server = serve(repo, "--isolation", "thread", "--inline-ms", inline_ms)
    with RemoteClient(server.endpoint, identity="cam-1") as c:
        for i in range(30):
            np.testing.assert_allclose(c.infer("affine", {"x": x_of(i)})["y"], x_of(2 * i + 1))
        c.submit("affine", {"x": x_of(0)}).result()
        stats = c.stats()
    assert stats["requests"] == 31
    # The blocking calls use a second connection (cam-1.direct): the server counts both as the one client.
    assert stats["requests:cam-1"] == 31 and not any(".direct" in key for key in stats)
    if inline_ms == "0":
        assert stats["run_on_loop"] == 0
    else:
        assert 10 <= stats["run_on_loop"] <= 30


def test_blocking_infer_never_takes_a_late_reply_and_works_from_many_threads(built, tmp_path, serve):
    """infer() waits on the caller's thread on a connection of its own: a reply that comes after its request's
    deadline must not be taken as the answer to the next request."""
    repo = tmp_path / "repo"
    add_version(repo, "affine", 1, built["v1"])
    server = serve(repo, "--isolation", "thread")
    with RemoteClient(server.endpoint) as c:
        np.testing.assert_allclose(c.infer("affine", {"x": x_of(1)})["y"], x_of(3))
        server.proc.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(PeerTimeout, match="did not answer"):
                c.infer("affine", {"x": x_of(2)}, timeout_s=0.5)
        finally:
            server.proc.send_signal(signal.SIGCONT)
        np.testing.assert_allclose(c.infer("affine", {"x": x_of(3)})["y"], x_of(7))  # not x_of(5), the late one
        outputs: dict[int, np.ndarray] = {}

        def caller(k: int) -> None:
            for i in range(20):
                outputs[k * 100 + i] = c.infer("affine", {"x": x_of(k * 100 + i)})["y"]

        threads = [threading.Thread(target=caller, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert sorted(outputs) == sorted(k * 100 + i for k in range(4) for i in range(20))
        for n, y in outputs.items():
            np.testing.assert_allclose(y, x_of(2 * n + 1))
        assert c.requests_sent == 83


def test_map_streams_in_order_with_a_bounded_window(built, tmp_path, serve):
    """map() keeps exactly in_flight requests out while none is answered, yields results in input order, and works
    next to another thread streaming at the same time (which then goes through the I/O thread)."""
    repo = tmp_path / "repo"
    add_version(repo, "affine", 1, built["v1"])
    server = serve(repo, "--isolation", "thread")
    with RemoteClient(server.endpoint) as c:
        c.infer("affine", {"x": x_of(0)})  # connects the direct connection
        server.proc.send_signal(signal.SIGSTOP)
        got: dict[str, list] = {}

        def stream(name: str, start: int) -> None:
            inputs = ({"x": x_of(start + i)} for i in range(60))
            got[name] = [r.outputs["y"] for r in c.map("affine", inputs, in_flight=4)]

        first = threading.Thread(target=stream, args=("first", 0))
        second = threading.Thread(target=stream, args=("second", 1000))
        try:
            first.start()
            time.sleep(0.5)
            assert c.requests_sent == 1 + 4  # the window is full and nothing came back
            second.start()
            time.sleep(0.3)
            assert c.requests_sent == 1 + 4 + 4
        finally:
            server.proc.send_signal(signal.SIGCONT)
            first.join(timeout=60)
            second.join(timeout=60)
    for name, start in (("first", 0), ("second", 1000)):
        assert len(got[name]) == 60
        for i, y in enumerate(got[name]):
            np.testing.assert_allclose(y, x_of(2 * (start + i) + 1))


def test_map_reports_each_failure_in_its_place(built, tmp_path, serve):
    """A stream's timed-out requests come back as errors in their places; later ones still succeed; with
    return_exceptions=False the first error is raised, and the late replies never answer a later request."""
    repo = tmp_path / "repo"
    add_version(repo, "affine", 1, built["v1"])
    server = serve(repo, "--isolation", "thread")
    with RemoteClient(server.endpoint) as c:
        c.infer("affine", {"x": x_of(0)})
        server.proc.send_signal(signal.SIGSTOP)
        threading.Timer(1.5, server.proc.send_signal, args=(signal.SIGCONT,)).start()  # also if this test fails
        outcomes = list(c.map("affine", [{"x": x_of(i)} for i in range(6)], in_flight=3, timeout_s=1.0,
                              return_exceptions=True))
        assert [type(o).__name__ for o in outcomes] == ["PeerTimeout"] * 3 + ["Result"] * 3
        assert all(o.reason == "timeout" and "did not answer" in str(o) for o in outcomes[:3])
        for i, o in enumerate(outcomes[3:], start=3):
            np.testing.assert_allclose(o.outputs["y"], x_of(2 * i + 1))

        server.proc.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(PeerTimeout, match="did not answer"):
                list(c.map("affine", [{"x": x_of(10 + i)} for i in range(4)], in_flight=2, timeout_s=0.5))
        finally:
            server.proc.send_signal(signal.SIGCONT)
        results = list(c.map("affine", [{"x": x_of(20 + i)} for i in range(4)], in_flight=2))
        for i, r in enumerate(results):
            np.testing.assert_allclose(r.outputs["y"], x_of(2 * (20 + i) + 1))  # not a late one from 10..11
        with pytest.raises(ValueError, match="in_flight"):
            list(c.map("affine", [], in_flight=0))


def test_map_edge_cases_slow_consumer_bad_input_abandoned_stream_and_a_dead_server(built, tmp_path, serve):
    repo = tmp_path / "repo"
    add_version(repo, "affine", 1, built["v1"])
    server = serve(repo, "--isolation", "thread")
    with RemoteClient(server.endpoint, timeout_s=20) as c:
        # A consumer slower than the deadlines: replies that arrived in time are results, not timeouts.
        got = []
        for r in c.map("affine", [{"x": x_of(i)} for i in range(6)], in_flight=4, timeout_s=0.3):
            got.append(r.outputs["y"])
            time.sleep(0.4)
        for i, y in enumerate(got):
            np.testing.assert_allclose(y, x_of(2 * i + 1))
        # A bad input fails in its place (here or at the server); the others are answered.
        inputs = [{"x": x_of(1)}, x_of(2), {"x": np.array([None])}, {"x": np.zeros(3, np.float32)}, {"x": x_of(4)}]
        outcomes = list(c.map("affine", inputs, return_exceptions=True))
        assert [type(o).__name__ for o in outcomes] == ["Result", "TypeError", "FramingError", "RequestFailed",
                                                        "Result"]
        assert "map tensor names to arrays, not a ndarray" in str(outcomes[1])
        assert outcomes[3].reason == "bad_request"
        np.testing.assert_allclose(outcomes[4].outputs["y"], x_of(9))
        # A stream left unfinished keeps the direct connection; other calls go through the I/O thread meanwhile,
        # and close() does not wait for it: resumed, it yields what had already arrived (at most the one other
        # request of its window), then fails.
        stream = c.map("affine", ({"x": x_of(i)} for i in range(100)), in_flight=2)
        np.testing.assert_allclose(next(stream).outputs["y"], x_of(1))
        np.testing.assert_allclose(c.infer("affine", {"x": x_of(5)})["y"], x_of(11))
        other = RemoteClient(server.endpoint).start()
        suspended = other.map("affine", ({"x": x_of(i)} for i in range(100)), in_flight=2)
        np.testing.assert_allclose(next(suspended).outputs["y"], x_of(1))
        started = time.monotonic()
        other.close()
        assert time.monotonic() - started < 2
        late = []
        with pytest.raises(PipelineClosed):
            for result in suspended:
                late.append(result)
        assert len(late) <= 1
        stream.close()
        # The server dies with several requests in flight: each ends 'disconnected' at once, none waits out 20 s.
        server.proc.send_signal(signal.SIGSTOP)
        threading.Timer(0.5, server.proc.kill).start()
        started = time.monotonic()
        outcomes = list(c.map("affine", [{"x": x_of(i)} for i in range(3)], in_flight=3, return_exceptions=True))
    assert [getattr(o, "reason", None) for o in outcomes] == ["disconnected"] * 3
    assert time.monotonic() - started < 5


def test_blocking_infer_fails_at_once_when_the_server_dies_mid_request(built, tmp_path, serve):
    """The blocking path's own connection is watched like the main one: a dead server ends the wait with
    'disconnected' at once, not at the request's deadline."""
    repo = tmp_path / "repo"
    add_version(repo, "affine", 1, built["v1"])
    server = serve(repo, "--isolation", "thread")
    with RemoteClient(server.endpoint, timeout_s=20) as c:
        np.testing.assert_allclose(c.infer("affine", {"x": x_of(1)})["y"], x_of(3))
        server.proc.send_signal(signal.SIGSTOP)  # the next request waits in the server's socket...
        threading.Timer(0.5, server.proc.kill).start()  # ...until the process dies
        started = time.monotonic()
        with pytest.raises(RequestFailed, match="lost") as failed:
            c.infer("affine", {"x": x_of(2)})
    assert failed.value.reason == "disconnected" and time.monotonic() - started < 5


def test_sigterm_drains_requests_in_flight(built, tmp_path, serve):
    repo = tmp_path / "repo"
    add_version(repo, "affine", 1, built["v1"])
    server = serve(repo)
    with RemoteClient(server.endpoint, timeout_s=60) as c:
        c.infer("affine", {"x": x_of(0)})
        futures = [c.submit("affine", {"x": x_of(i)}) for i in range(500)]
        time.sleep(0.01)
        server.proc.send_signal(signal.SIGTERM)
        outcomes = [f.exception(timeout=60) for f in futures]
    ok = [e for e in outcomes if e is None]
    refused = [e for e in outcomes if e is not None]
    # refused by the draining server, or (sent as it exited) failed by the client's connection monitor
    assert all(getattr(e, "reason", "") in ("shutting_down", "disconnected") for e in refused), \
        [e for e in refused if getattr(e, "reason", "") != "shutting_down"][:3]
    assert len(ok) + len(refused) == 500 and len(ok) > 0
    assert server.proc.wait(timeout=30) == 0
    assert any("drained and stopped" in line for line in server.log)


@pytest.fixture
def keys(tmp_path):
    def keygen(name: str, folder: Path) -> None:
        subprocess.run([sys.executable, "-m", "zpipe", "keygen", name, "--dir", str(folder)], check=True,
                       capture_output=True)

    keygen("server", tmp_path / "server")
    keygen("device", tmp_path / "device")
    keygen("stranger", tmp_path / "stranger")
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "device.key").write_text((tmp_path / "device" / "device.key").read_text())
    return {"server_secret": tmp_path / "server" / "server.key_secret", "server_public": tmp_path / "server" /
            "server.key", "device": tmp_path / "device" / "device.key_secret",
            "stranger": tmp_path / "stranger" / "stranger.key_secret", "allowed": allowed}


def test_upload_with_keys_and_refusals(built, tmp_path, serve, keys):
    repo = tmp_path / "repo"
    repo.mkdir()
    secure = ("--server-key", str(keys["server_secret"]), "--clients", str(keys["allowed"]))
    server = serve(repo, *secure, "--allow-upload")
    with RemoteClient(server.endpoint, server_key=keys["server_public"], client_key=keys["device"]) as c:
        version = c.upload("affine", built["v1"])
        assert version == 1
        deadline = time.monotonic() + 30
        while c.health().get("version:affine") != 1:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        np.testing.assert_allclose(c.infer("affine", {"x": x_of(4)})["y"], x_of(9))
        assert (repo / "affine" / "1" / "affine.so").exists()  # stored: survives a restart
    with RemoteClient(server.endpoint, server_key=keys["server_public"], client_key=keys["stranger"],
                      timeout_s=10) as c:
        started = time.monotonic()
        with pytest.raises(ServerRefused, match="refused our Curve key"):
            c.infer("affine", {"x": x_of(4)})
        assert time.monotonic() - started < 5  # a clear error, not a hang until the deadline
    with RemoteClient(server.endpoint, timeout_s=3) as c:  # no key at all against a Curve server
        started = time.monotonic()
        with pytest.raises(RequestFailed, match="handshake|refused"):
            c.infer("affine", {"x": x_of(4)})
        assert time.monotonic() - started < 3.5  # never a hang


def test_upload_disabled_by_default(built, tmp_path, serve, keys):
    repo = tmp_path / "repo"
    repo.mkdir()
    server = serve(repo, "--server-key", str(keys["server_secret"]), "--clients", str(keys["allowed"]))
    with RemoteClient(server.endpoint, server_key=keys["server_public"], client_key=keys["device"]) as c:
        with pytest.raises(RequestFailed, match="upload_refused: this server does not accept model uploads"):
            c.upload("affine", built["v1"])
    assert not (repo / "affine").exists()


def test_without_uploads_a_frame_over_64_mib_is_refused_before_it_is_read(built, tmp_path, serve):
    """ZeroMQ drops a peer whose frame exceeds the server's bound; only --allow-upload raises it to the upload size."""
    repo = tmp_path / "repo"
    add_version(repo, "affine", 1, built["v1"])
    server = serve(repo)
    with raw_dealer(server.endpoint) as raw:
        big = np.zeros(70 << 18, np.float32)  # 70 MiB
        send_message(raw, Message(kind=Kind.REQUEST, request_id=1, tensors={"x": big}, meta={"model": "affine"}))
        assert not raw.poll(2000)  # no reply: the connection was dropped, nothing was read
    with RemoteClient(server.endpoint) as c:  # everyone else is served as before
        np.testing.assert_allclose(c.infer("affine", {"x": x_of(1)})["y"], x_of(3))


def test_insecure_configurations_are_refused(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "zpipe", "serve", "--repo", str(tmp_path), "--bind",
                           "tcp://0.0.0.0:*"], capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and "without encryption" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "zpipe", "serve", "--repo", str(tmp_path), "--allow-upload"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and "--allow-upload accepts native code" in proc.stderr
    with pytest.raises(ZpipeError, match="both server_key"):
        RemoteClient("tcp://127.0.0.1:1", server_key="x")


def test_a_version_that_cannot_run_is_answered_not_found(tmp_path):
    """A model version whose workers all died raises ArtifactError when a request starts: the client gets
    not_found (a reason a remote stand-in falls back on), not a stage error."""
    from zpipe.errors import ArtifactError
    from zpipe.server import Server, ServerConfig, _Queued

    class Dead:  # a version as the repository hands it out once every worker died repeatedly
        version, threads = 3, None

        def submit(self, tensors, *, timeout_s):
            raise ArtifactError("model 'm' version 3: every worker died repeatedly")

    (tmp_path / "repo").mkdir()
    server = Server(ServerConfig(repo=tmp_path / "repo", bind="tcp://127.0.0.1:0")).start()
    ctx = zmq.Context()
    try:
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.IDENTITY, b"dev-1")
        dealer.connect(server.endpoint)
        send_message(dealer, Message(kind=Kind.HEARTBEAT, request_id=1))
        assert server.socket.poll(5000)
        assert server._receive_one()  # the heartbeat: the server now knows the peer
        assert recv_message(dealer)[1].kind == Kind.HEARTBEAT
        now = time.monotonic()
        item = _Queued([b"dev-1"], Message(kind=Kind.REQUEST, request_id=7), "m", None, now, now + 5)
        assert server._start(item, Dead()) is True  # answered, not left queued
        assert dealer.poll(5000)
        _, reply = recv_message(dealer)
        assert reply.kind == Kind.ERROR and reply.request_id == 7 and reply.meta["error"] == "not_found", reply
        assert "died repeatedly" in reply.meta["message"]
    finally:
        ctx.destroy(linger=0)
        server.close()


def test_metrics_histogram_and_counters_render_for_prometheus():
    from prometheus_client import generate_latest

    from zpipe.server_metrics import ServerMetrics

    m = ServerMetrics()
    for seconds in (0.0005, 0.0007, 0.003, 20.0):  # on a bound, inside one, past the last
        m.finished("a", "ok", seconds)
    m.finished("a", "timeout", 1.0)  # not an ok: counted, not timed
    m.received("cam-1", "request", 100)
    m.received("cam-1", "heartbeat", 0)
    m.malformed += 2
    text = generate_latest(m.registry).decode()
    assert 'zpipe_server_request_seconds_bucket{le="0.0005",model="a"} 1.0' in text  # le: a bound counts in
    assert 'zpipe_server_request_seconds_bucket{le="0.001",model="a"} 2.0' in text
    assert 'zpipe_server_request_seconds_bucket{le="0.005",model="a"} 3.0' in text
    assert 'zpipe_server_request_seconds_bucket{le="10.0",model="a"} 3.0' in text
    assert 'zpipe_server_request_seconds_bucket{le="+Inf",model="a"} 4.0' in text
    assert 'zpipe_server_request_seconds_count{model="a"} 4.0' in text
    assert 'zpipe_server_requests_total{model="a",outcome="timeout"} 1.0' in text
    assert 'zpipe_server_received_messages_total{client="cam-1",kind="heartbeat"} 1.0' in text
    assert 'zpipe_server_received_tensor_bytes_total{client="cam-1"} 100.0' in text
    assert "zpipe_server_malformed_messages_total 2.0" in text
    assert m.per_client()["requests:cam-1"] == 1 and m.per_client()["request_bytes"] == 100


def test_prometheus_metrics(built, tmp_path, serve):
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = tmp_path / "repo"
    add_version(repo, "affine", 1, built["v1"])
    server = serve(repo, "--metrics-port", str(port))
    with RemoteClient(server.endpoint) as c:
        for i in range(5):
            c.infer("affine", {"x": x_of(i)})
        with pytest.raises(RequestFailed):
            c.infer("nope", {"x": x_of(1)})
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'zpipe_server_requests_total{model="affine",outcome="ok"} 5.0' in text
    assert 'zpipe_server_request_seconds_count{model="affine"} 5.0' in text
    assert "zpipe_server_queue_depth" in text
    assert "zpipe_server_received_tensor_bytes_total" in text


def test_a_ping_answer_with_odd_load_figures_counts_as_not_said():
    """The load figures of a ping's answer come from the network: only a non-negative integer backlog and a wait of
    0 to 3600 s count; anything else is "not said" (no wait), never an exception or a wild estimate."""
    from zpipe.client import _server_load

    assert _server_load({"backlog": 3, "wait_s": 0.5}) == (3, 0.5)
    assert _server_load({"backlog": 0, "wait_s": 0}) == (0, 0.0)
    for meta in ({}, {"backlog": -1, "wait_s": float("nan")}, {"backlog": True, "wait_s": "1"},
                 {"backlog": 2.5, "wait_s": 1e9}, {"backlog": None, "wait_s": float("inf")}, {"wait_s": -0.1}):
        assert _server_load(meta) == (None, None), meta


def test_a_ping_naming_a_model_learns_the_load_of_other_clients(tmp_path, serve):
    """Requests of other clients queued or running count in a ping's answer, the asker's own do not (nor do they for
    its fresh connection, ``<identity>~<n>``: the remote stand-in's after a slow spell); a ping that names no model
    gets no figures, one naming a model the server has not run gets none waiting."""
    from server_models import build_busy

    repo = tmp_path / "repo"
    add_version(repo, "busy", 1, build_busy(tmp_path / "built", "busy"))
    server = serve(repo)
    with RemoteClient(server.endpoint, timeout_s=60) as asker, RemoteClient(server.endpoint, timeout_s=60) as other, \
            RemoteClient(server.endpoint, identity=f"{asker.identity}~1") as fresh:
        assert asker.ping(model="busy").result()[1:] == (0, 0.0)
        assert asker.ping().result()[1:] == (None, None)
        assert asker.ping(model="no-such-model").result()[1:] == (0, 0.0)
        busy = np.ones(SHAPE, np.float32)
        asker.submit("busy", {"x": busy}).result()  # (its compute time is known from here on)
        futures = [asker.submit("busy", {"x": busy}) for _ in range(10)]
        time.sleep(0.05)  # (they are at the server: its loop reads them at once)
        mine, theirs = asker.ping(model="busy").result(), other.ping(model="busy").result()
        mine_too = fresh.ping(model="busy").result()
        for f in futures:
            np.testing.assert_allclose(f.result().outputs["y"], busy * 2 + 1)
        after = other.ping(model="busy").result()
    assert mine.backlog == 0 and mine.wait_s == 0.0, mine  # its own requests are its own business
    assert mine_too.backlog == 0 and mine_too.wait_s == 0.0, mine_too
    assert theirs.backlog >= 5 and theirs.wait_s > 0, theirs
    assert after.backlog == 0 and after.wait_s == 0.0, after


def test_an_idle_client_sleeps_until_its_next_deadline():
    """The client's I/O loop waits for a message until the earliest deadline (at most 1 s), not in 50 ms slices: an
    idle client costs next to no CPU (a device's), and a request nobody answers still fails at its deadline."""
    ctx = zmq.Context()
    mute = ctx.socket(zmq.ROUTER)  # takes requests, never answers
    port = mute.bind_to_random_port("tcp://127.0.0.1")
    try:
        with RemoteClient(f"tcp://127.0.0.1:{port}", timeout_s=30) as c:
            c.ping(timeout_s=0.2).exception(timeout=5)  # connected, the loop settled
            started = time.process_time()
            time.sleep(1.0)
            idle = time.process_time() - started  # this process: the test sleeps, the client's loop waits
            sent = time.monotonic()
            with pytest.raises(PeerTimeout, match="did not answer"):
                c.ping(timeout_s=0.4).result(timeout=5)
            late = time.monotonic() - sent - 0.4
    finally:
        mute.close(linger=0)
        ctx.term()
    assert idle < 0.0025, idle  # 50 ms slices took ~4 ms a second here; a loop that spins, a whole second
    assert 0 <= late < 0.1, late
