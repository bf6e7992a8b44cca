"""`zpipe serve`: the edge model server. One ROUTER front door, a repository of versioned models, worker pools.

Protocol (zpipe framing on a DEALER→ROUTER connection; many requests in flight per connection, matched by id):

    REQUEST  meta {"model": name, "version"?: int, "timeout_ms"?: number}, tensors = the model's inputs
             -> REPLY  meta {"model", "version"}, tensors = the model's outputs
             -> ERROR  meta {"error": code, "message": text}; codes: malformed, bad_request, not_found, busy,
                       timeout, stage_error, shutting_down, upload_refused
    CONTROL  {"op": "health"}  -> CONTROL {"live", "ready", "models": [...], "state:<m>", "version:<m>", "error:<m>"}
    CONTROL  {"op": "stats"}   -> CONTROL {"requests": n, "request_bytes": n, "requests:<client>": n, ...}
    CONTROL  {"op": "upload", "model": name, "manifest": json text}, tensor "library" (uint8 bytes of the .so)
             -> CONTROL {"op": "upload", "model", "version"} once the new version is stored (it loads next scan)
    HEARTBEAT meta {"model"?: name} -> HEARTBEAT (application-level ping, answered at once); naming a model, the
             answer says how busy the server is with it for *other* clients: meta {"backlog": requests of other
             clients queued or running, "wait_s": how long a new request would wait for them}

One thread runs the loop and owns the socket. Model workers answer through futures; their callbacks hand results
back through a queue and a self-pipe, so only the loop thread ever touches the socket. Requests wait in a bounded
queue per model when the workers are saturated, and expire there (answered ``timeout``, never run) when their
deadline passes. No message on this socket is ever unpickled.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from .board import Ewma
from .errors import ArtifactError, Busy, FramingError, PipelineClosed, ZpipeError
from .framing import DEFAULT_LIMITS, Kind, Limits, Message
from .manifest import Manifest, sha256_file
from .repository import Repository
from .server_metrics import ServerMetrics
from .transport import Waker, curve_server, is_loopback, make_socket, new_context, recv_message, send_message

__all__ = ["ServerConfig", "Server"]

log = logging.getLogger(__name__)

_MAX_FRAME_BYTES = 64 << 20  # the largest request frame (tensor) a server takes
_LOOP_ROUNDS = 4  # the loop runs fast models itself for at most this many x inline_ms per round


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """How a server runs. ``server_key`` (a ``.key_secret`` file) turns CurveZMQ on; ``clients`` is then the
    folder of allowed client public keys. ``allow_upload`` needs both: uploads are native code."""

    repo: Path
    bind: str = "tcp://127.0.0.1:5555"
    workers: int = 1
    isolation: str = "process"  # "thread": run models in the server process (faster, no crash isolation)
    inline_ms: float = 1.0  # thread isolation: a model this fast runs on the loop while no thread is busy (0: never)
    max_queue: int = 1024
    max_in_flight: int = 64
    default_timeout_s: float = 30.0
    allow_upload: bool = False
    max_upload_bytes: int = 256 << 20
    server_key: Path | None = None
    clients: Path | None = None
    insecure: bool = False
    poll_s: float = 2.0
    drain_timeout_s: float = 30.0
    metrics_port: int | None = None
    limits: Limits = DEFAULT_LIMITS

    def __post_init__(self) -> None:
        if (self.server_key is None) != (self.clients is None):
            raise ZpipeError("Curve needs both --server-key (this server's .key_secret) and --clients (a folder of "
                             "allowed client public keys)")
        if self.allow_upload and self.server_key is None:
            raise ZpipeError("--allow-upload accepts native code from clients: it needs --server-key and --clients "
                             "so that only allow-listed clients can connect")
        if self.clients is not None and Path(self.clients).name == "*":
            raise ZpipeError("--clients '*' would allow any client key; give a folder of allowed public keys")
        if self.server_key is None and not is_loopback(self.bind) and not self.insecure:
            raise ZpipeError(f"refusing to serve {self.bind!r} without encryption: it is reachable from other hosts. "
                             "Configure keys (zpipe keygen; --server-key, --clients) or pass --insecure")
        if self.workers < 1 or self.max_queue < 1:
            raise ZpipeError("workers and max_queue must be >= 1")
        if not self.inline_ms >= 0:
            raise ZpipeError(f"inline_ms must be >= 0, got {self.inline_ms!r}")


@dataclass
class _Queued:
    envelope: list[bytes]
    message: Message
    model: str
    version: int | None
    received: float
    deadline: float


class Server:
    """An edge model server. ``start()`` binds and loads; ``run()`` serves until ``stop()`` (from any thread)."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.repository = Repository(config.repo, workers=config.workers, max_in_flight=config.max_in_flight,
                                     poll_s=config.poll_s, drain_timeout_s=config.drain_timeout_s,
                                     isolation=config.isolation)
        self.metrics = ServerMetrics()
        self._queues: dict[str, collections.deque[_Queued]] = collections.defaultdict(collections.deque)
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._replies: queue.SimpleQueue = queue.SimpleQueue()  # (envelope, Message) from background threads
        self._upload_lock = threading.Lock()
        self._waker = Waker()
        self._in_flight = 0
        self._running: dict[int, _Queued] = {}  # dispatched, not yet answered
        self._compute: dict[str, Ewma] = {}  # model -> smoothed compute time of one request (answered ones only)
        self._stopping = False
        self._stop_requested = False
        self._client_names: dict[bytes, str] = {}  # ROUTER identity -> the client's name in stats and metrics
        self._loop_budget_end = 0.0  # until when this round of the loop may run models itself
        self.endpoint: str | None = None

    # -- lifecycle -----------------------------------------------------------------------------------------------
    def start(self) -> "Server":
        self.repository.start(wait=True)
        self._ctx = new_context()
        self._auth = None
        # A peer sending a bigger frame is disconnected by ZeroMQ before anything is read into memory. Uploads
        # (a whole library in one frame) raise the bound only when they are allowed.
        largest = max(self.config.max_upload_bytes if self.config.allow_upload else 0, _MAX_FRAME_BYTES)
        self.socket = make_socket(self._ctx, zmq.ROUTER, hwm=10_000, max_message_bytes=largest + (1 << 20))
        if self.config.server_key is not None:
            from zmq.auth.thread import ThreadAuthenticator

            self._auth = ThreadAuthenticator(self._ctx)
            self._auth.start()
            self._auth.configure_curve(domain="*", location=str(self.config.clients))
            curve_server(self.socket, self.config.server_key)
        try:
            self.socket.bind(self.config.bind)
        except zmq.ZMQError as exc:
            self.close()
            raise ZpipeError(f"cannot bind {self.config.bind!r}: {exc}") from exc
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        if self.config.metrics_port is not None:
            self.metrics.serve(self.config.metrics_port)
        log.info("serving %s on %s (curve %s, upload %s)", self.config.repo, self.endpoint,
                 "on" if self._auth else "off", "on" if self.config.allow_upload else "off")
        return self

    def stop(self) -> None:
        """Ask the loop to drain and return (safe from signal handlers and other threads)."""
        self._stop_requested = True
        self._waker.wake()

    def close(self) -> None:
        self.repository.close()
        if self._auth is not None:
            self._auth.stop()
        self._ctx.destroy(linger=0)
        self._waker.close()

    def run(self) -> None:
        """Serve until stop(); then stop accepting, finish what is queued and in flight, and close."""
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(self._waker.fd, zmq.POLLIN)
        drain_deadline = None
        try:
            while True:
                if self._stop_requested and not self._stopping:
                    self._stopping = True
                    drain_deadline = time.monotonic() + self.config.drain_timeout_s
                    log.info("draining: %d queued, %d in flight", self._queued(), self._in_flight)
                if self._stopping and (self._in_flight == 0 and self._queued() == 0
                                       or time.monotonic() > drain_deadline):
                    while self._receive_one():  # what already arrived is refused with a reason, not dropped
                        pass
                    return
                events = dict(poller.poll(50))
                self._loop_budget_end = time.monotonic() + _LOOP_ROUNDS * self.config.inline_ms / 1000
                if self._waker.fd in events:
                    self._waker.clear()
                self._collect_done()
                if self.socket in events:
                    for _ in range(256):
                        if not self._receive_one():
                            break
                self._dispatch()
        finally:
            self._fail_queued("shutting_down", "the server stopped before the request ran")
            for item in list(self._running.values()):  # the drain deadline passed while these ran
                self._reply_error(item.envelope, item.message.request_id, "shutting_down",
                                  "the server stopped before the request finished")
            self.close()

    # -- receiving -----------------------------------------------------------------------------------------------
    def _receive_one(self) -> bool:
        try:
            envelope, msg = recv_message(self.socket, envelope_frames=1, flags=zmq.NOBLOCK,
                                         limits=self.config.limits)
        except zmq.Again:
            return False
        except FramingError as exc:
            envelope = getattr(exc, "envelope", [])
            self.metrics.malformed += 1
            log.warning("malformed message from %s: %s", _client_name(envelope), exc)
            if envelope:
                self._reply_error(envelope, 0, "malformed", str(exc))
            return True
        try:
            self._handle(envelope, msg)
        except Exception as exc:  # one bad request never takes the loop down
            log.exception("error handling request %d", msg.request_id)
            self._reply_error(envelope, msg.request_id, "bad_request", f"{type(exc).__name__}: {exc}")
        return True

    def _handle(self, envelope: list[bytes], msg: Message) -> None:
        client = self._client_names.get(envelope[0])
        if client is None:
            if len(self._client_names) >= 4096:  # identities come from the network: bound what is remembered
                self._client_names.clear()
            # A RemoteClient's two connections count as one client.
            client = self._client_names[envelope[0]] = client_family(envelope)
        nbytes = sum(a.nbytes for a in msg.tensors.values())
        self.metrics.received(client, msg.kind.name.lower(), nbytes)
        if msg.kind == Kind.HEARTBEAT:
            model = msg.meta.get("model")
            self._send(envelope, Message(kind=Kind.HEARTBEAT, request_id=msg.request_id,
                                         meta=self._load_for(model, client) if isinstance(model, str) else {}))
        elif msg.kind == Kind.CONTROL:
            self._control(envelope, msg)
        elif msg.kind != Kind.REQUEST:
            self._reply_error(envelope, msg.request_id, "bad_request", f"unexpected message kind {msg.kind.name}")
        elif self._stopping:
            self._reply_error(envelope, msg.request_id, "shutting_down", "the server is draining; retry elsewhere")
        else:
            self._enqueue(envelope, msg)

    def _enqueue(self, envelope: list[bytes], msg: Message) -> None:
        model, version = msg.meta.get("model"), msg.meta.get("version")
        if not isinstance(model, str) or not model:
            return self._reply_error(envelope, msg.request_id, "bad_request", "meta 'model' (a name) is required")
        if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
            return self._reply_error(envelope, msg.request_id, "bad_request", f"meta 'version' {version!r} is "
                                     "not an integer")
        timeout_ms = msg.meta.get("timeout_ms", self.config.default_timeout_s * 1000)
        if not isinstance(timeout_ms, (int, float)) or isinstance(timeout_ms, bool) or not 0 < timeout_ms < 1e9:
            return self._reply_error(envelope, msg.request_id, "bad_request", f"timeout_ms {timeout_ms!r} is not "
                                     "a positive number")
        try:
            mv = self.repository.get(model, version)
        except Busy as exc:
            return self._reply_error(envelope, msg.request_id, "busy", str(exc))
        except ArtifactError as exc:
            return self._reply_error(envelope, msg.request_id, "not_found", str(exc))
        problem = _check_inputs(mv.manifest, msg.tensors)
        if problem:
            return self._reply_error(envelope, msg.request_id, "bad_request", f"model {model!r}: {problem}")
        now = time.monotonic()
        item = _Queued(envelope, msg, model, version, now, now + timeout_ms / 1000)
        q = self._queues[model]
        if not q and self._start(item, mv):  # nothing waits before it: no need to queue it
            return
        if len(q) >= self.config.max_queue:
            self.metrics.finished(model, "busy", 0.0)
            return self._reply_error(envelope, msg.request_id, "busy", f"model {model!r} has {len(q)} requests "
                                     "queued; retry later")
        q.append(item)
        self.metrics.set_queue_depth(model, len(q))

    # -- dispatching ---------------------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        now = time.monotonic()
        for model, q in self._queues.items():
            if not q:
                continue
            while q:
                item = q[0]
                if item.deadline <= now:
                    q.popleft()
                    self.metrics.finished(model, "timeout", now - item.received)
                    self._reply_error(item.envelope, item.message.request_id, "timeout",
                                      f"request waited {(now - item.received) * 1000:.0f} ms in the queue of "
                                      f"model {model!r}, past its deadline; not run")
                    continue
                try:
                    mv = self.repository.get(model, item.version)
                except Busy:
                    break
                except ArtifactError as exc:  # no such version (any more)
                    q.popleft()
                    self._reply_error(item.envelope, item.message.request_id, "not_found", str(exc))
                    continue
                if not self._start(item, mv):
                    break  # saturated, or a swap closed this version in between: keep the queue, retry soon
                q.popleft()
            self.metrics.set_queue_depth(model, len(q))

    def _start(self, item: _Queued, mv) -> bool:
        """Run ``item`` on this loop (and answer it) if :meth:`_may_run_here`, else hand it to a model thread.
        False when the model is saturated or its version is closing: the caller keeps the request for later."""
        try:
            result = mv.threads.run_here(item.message.tensors, item.deadline) \
                if self._may_run_here(mv) else None  # None: hand it to a model thread
            if result is None:
                future = mv.submit(item.message.tensors, timeout_s=item.deadline - time.monotonic())
        except (Busy, PipelineClosed):
            return False
        except ArtifactError as exc:  # the version cannot run (every worker died): a client may fall back
            self._reply_error(item.envelope, item.message.request_id, "not_found", str(exc))
            return True
        except Exception as exc:  # a failed run, or anything else: answer, never crash
            self._answer(item, None, exc=exc)
            return True
        if result is not None:
            self.metrics.ran_on_loop(item.model)
            self._answer(item, mv.version, result=result)
            return True
        self._in_flight += 1
        self._running[id(item)] = item
        future.add_done_callback(lambda f, item=item, v=mv.version: self._completed(item, v, f))
        return True

    def _may_run_here(self, mv) -> bool:
        """Run on this loop instead of a model thread: a fast in-process model (``inline_ms``) while no model
        thread is busy, for at most ``_LOOP_ROUNDS`` x ``inline_ms`` per round of the loop (the rest of the queue
        goes to the threads, so receiving and health answers never wait longer)."""
        run_s = mv.threads.run_s if mv.threads is not None else None
        return (self.config.inline_ms > 0 and run_s is not None and run_s * 1000 <= self.config.inline_ms
                and self._in_flight == 0 and time.monotonic() < self._loop_budget_end)

    def _completed(self, item: _Queued, version: int, future) -> None:
        """Runs on a pipeline's I/O thread: hand the result to the loop thread."""
        self._done.put((item, version, future))
        self._waker.wake()

    def _collect_done(self) -> None:
        while True:  # replies prepared by other threads (uploads)
            try:
                envelope, reply = self._replies.get_nowait()
            except queue.Empty:
                break
            self._in_flight -= 1
            self._send(envelope, reply)
        while True:
            try:
                item, version, future = self._done.get_nowait()
            except queue.Empty:
                return
            self._in_flight -= 1
            self._running.pop(id(item), None)
            exc = future.exception()
            self._answer(item, version, result=None if exc else future.result(), exc=exc)

    def _answer(self, item: _Queued, version: int | None, *, result=None, exc: BaseException | None = None) -> None:
        elapsed = time.monotonic() - item.received
        rid = item.message.request_id
        if exc is None:
            self.metrics.finished(item.model, "ok", elapsed)
            self._send(item.envelope, Message(kind=Kind.REPLY, request_id=rid, tensors=result.outputs,
                                              meta={"model": item.model, "version": version}))
            try:
                self._compute.setdefault(item.model, Ewma(0.2)).add(_compute_s(result))
            except Exception:  # (not expected) a figure for pings is not worth the loop
                log.exception("model %r: no compute time from its result", item.model)
        else:
            code = "timeout" if getattr(exc, "reason", "") == "timeout" else "stage_error"
            self.metrics.finished(item.model, code, elapsed)
            self._reply_error(item.envelope, rid, code, str(exc))

    # -- control -------------------------------------------------------------------------------------------------
    def _control(self, envelope: list[bytes], msg: Message) -> None:
        op = msg.meta.get("op")
        if op == "health":
            reply: dict[str, Any] = {"op": "health", "live": True, "ready": self.repository.ready(),
                                     "draining": self._stopping}
            status = self.repository.status()
            reply["models"] = sorted(status)
            for name, st in status.items():
                reply[f"state:{name}"], reply[f"version:{name}"], reply[f"error:{name}"] = st.state, st.version, \
                    st.error[:500]
            self._send(envelope, Message(kind=Kind.CONTROL, request_id=msg.request_id, meta=reply))
        elif op == "stats":
            self._send(envelope, Message(kind=Kind.CONTROL, request_id=msg.request_id,
                                         meta={"op": "stats", **self.metrics.per_client()}))
        elif op == "upload":
            self._upload(envelope, msg)
        else:
            self._reply_error(envelope, msg.request_id, "bad_request", f"unknown control op {op!r}")

    def _upload(self, envelope: list[bytes], msg: Message) -> None:
        rid = msg.request_id
        if not self.config.allow_upload:
            return self._reply_error(envelope, rid, "upload_refused", "this server does not accept model uploads "
                                     "(start it with --allow-upload, keys and a client allowlist)")
        model, manifest_text, library = msg.meta.get("model"), msg.meta.get("manifest"), msg.tensors.get("library")
        if not (isinstance(model, str) and model.replace("_", "").replace("-", "").isalnum()):
            return self._reply_error(envelope, rid, "upload_refused", f"model name {model!r} must be letters, "
                                     "digits, '_' or '-'")
        if not isinstance(manifest_text, str) or library is None or library.dtype != np.uint8 or library.ndim != 1:
            return self._reply_error(envelope, rid, "upload_refused", "an upload needs meta 'manifest' (JSON text) "
                                     "and a uint8 tensor 'library'")
        if library.nbytes > self.config.max_upload_bytes:
            return self._reply_error(envelope, rid, "upload_refused", f"library is {library.nbytes} bytes, limit "
                                     f"is {self.config.max_upload_bytes}")
        # Writing and hashing up to max_upload_bytes happens off this loop, so other models keep being served.
        self._in_flight += 1  # a drain waits for it like for any request
        threading.Thread(target=self._store_in_background, args=(envelope, rid, model, manifest_text, library),
                         name="zpipe-upload", daemon=True).start()

    def _store_in_background(self, envelope: list[bytes], rid: int, model: str, manifest_text: str,
                             library: np.ndarray) -> None:
        try:
            with self._upload_lock:  # one at a time: version numbers are taken from what is on disk
                version = self._store_upload(model, manifest_text, library)
        except Exception as exc:  # a bad upload is refused with the reason, never a crash
            text = str(exc) if isinstance(exc, ZpipeError) else f"{type(exc).__name__}: {exc}"
            reply = Message(kind=Kind.ERROR, request_id=rid, meta={"error": "upload_refused",
                                                                    "message": text[:4000]})
        else:
            log.info("client %s uploaded model %r version %d (%d bytes)", _client_name(envelope), model, version,
                     library.nbytes)
            self.repository.request_scan()  # load it now rather than at the next poll
            reply = Message(kind=Kind.CONTROL, request_id=rid, meta={"op": "upload", "model": model,
                                                                      "version": version})
        self._replies.put((envelope, reply))
        self._waker.wake()

    def _store_upload(self, model: str, manifest_text: str, library: np.ndarray) -> int:
        staging = Path(tempfile.mkdtemp(prefix=".upload-", dir=self.config.repo))
        try:
            doc = json.loads(manifest_text)
            if not isinstance(doc, dict):
                raise ArtifactError("the manifest is not a JSON object")
            lib_name = Path(str(doc.get("library", ""))).name
            if not lib_name.endswith(".so"):
                raise ArtifactError(f"manifest 'library' must name a .so file, got {doc.get('library')!r}")
            doc["library"] = lib_name
            (staging / lib_name).write_bytes(library.tobytes())
            (staging / "manifest.json").write_text(json.dumps(doc))
            manifest = Manifest.load(staging / "manifest.json")
            if not manifest.library_sha256 or sha256_file(staging / lib_name) != manifest.library_sha256:
                raise ArtifactError("the library's sha256 does not match the manifest's library_sha256")
            model_dir = self.config.repo / model
            model_dir.mkdir(exist_ok=True)
            existing = [int(p.name) for p in model_dir.iterdir() if p.name.isdigit()]
            version = max(existing, default=0) + 1
            os.rename(staging, model_dir / str(version))  # atomic: the loader never sees a half-written version
            return version
        except ValueError as exc:
            raise ArtifactError(f"the manifest is not valid JSON: {exc}") from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    # -- replies -------------------------------------------------------------------------------------------------
    def _reply_error(self, envelope: list[bytes], rid: int, code: str, text: str) -> None:
        self._send(envelope, Message(kind=Kind.ERROR, request_id=rid, meta={"error": code, "message": text[:4000]}))

    def _send(self, envelope: list[bytes], message: Message) -> None:
        try:
            send_message(self.socket, message, envelope=envelope, flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # the client is gone (ROUTER_MANDATORY) or its queue is full
            self.metrics.undeliverable += 1
            log.warning("reply %d to %s dropped: %s", message.request_id, _client_name(envelope), exc)
        except FramingError as exc:  # an output that cannot travel: tell the client instead
            self._reply_error(envelope, message.request_id, "stage_error", f"reply could not be encoded: {exc}")

    def _load_for(self, model: str, client: str) -> dict[str, Any]:
        """How busy ``model`` is with requests of clients other than ``client`` (a ping's answer): how many are
        queued or running, and how long a new request would wait for them (each of the model's workers takes one
        at a time, at its smoothed compute time). The asking client's own requests are its own business (it knows
        them: counted, its new request's wait would flip with whether a ping caught one of them running)."""
        others = sum(1 for item in (*self._queues.get(model, ()), *self._running.values())
                     if item.model == model and client_family(item.envelope) != client)
        compute = self._compute.get(model)
        workers = max(1, self.repository.workers)
        wait = max(0, others - workers + 1) * compute.mean / workers if compute is not None and others else 0.0
        return {"backlog": others, "wait_s": round(wait, 6)}

    def _queued(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def _fail_queued(self, code: str, text: str) -> None:
        for q in self._queues.values():
            while q:
                item = q.popleft()
                self._reply_error(item.envelope, item.message.request_id, code, text)


def _check_inputs(manifest: Manifest, tensors: dict[str, np.ndarray]) -> str:
    expected = {t.name: t for t in manifest.inputs}
    if set(tensors) != set(expected):
        return f"takes inputs {sorted(expected)}, got {sorted(tensors)}"
    for name, spec in expected.items():
        array = tensors[name]
        if array.dtype != np.dtype(spec.dtype) or tuple(array.shape) != spec.shape:
            return f"input {name!r} expects {spec.dtype}{list(spec.shape)}, got {array.dtype}{list(array.shape)}"
    return ""


def _compute_s(result: Any) -> float:
    """How long a request computed: its stages' time in a worker process, or its time on a thread."""
    times = getattr(result, "stage_times", None)
    return sum(end - start for start, end in times.values()) if times else result.latency_s


def client_family(envelope: list[bytes]) -> str:
    """Which client a connection belongs to, by its identity: a RemoteClient's direct connection is
    ``<identity>.direct``, and a remote stand-in's fresh connections are ``<identity>~<n>``: all one client in the
    stats and in the load figures of ping answers."""
    return _client_name(envelope).removesuffix(".direct").partition("~")[0]


def _client_name(envelope: list[bytes]) -> str:
    if not envelope:
        return "?"
    ident = envelope[0]
    return ident.decode() if ident.isascii() and ident.decode(errors="replace").isprintable() else ident.hex()

