"""The device side of an edge server: one DEALER connection carrying many requests in flight.

    with RemoteClient("tcp://edge:5555", server_key="edge.key", client_key="me.key_secret") as server:
        outputs = server.infer("resnet", {"x": x})              # blocking
        future = server.submit("resnet", {"x": x})              # Future[Result]; many may be in flight
        for result in server.map("resnet", frames, in_flight=8): # a stream, in order, 8 in flight
            ...
        server.upload("branch_a", "build/branch_a.so")          # needs an authorised key and --allow-upload

One I/O thread owns the socket: callers queue messages and wake it through a pipe, replies are matched to futures
by request id. ``infer`` and ``map`` skip both thread hand-offs when they can: one caller at a time sends on a second
connection and reads the replies on its own thread (others take the queue). That connection's identity is
``<identity>.direct``; the server counts both connections as one client.

Every request ends: with its outputs, with the server's error (``reason`` is its code), with
``PeerTimeout`` at its deadline, or at once when the connection is lost or the server refuses our key (the socket
monitor sees the failed handshake; plain ZeroMQ would hang silently).
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import itertools
import json
import logging
import math
import os
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from pathlib import Path
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from .errors import ArtifactError, FramingError, PeerTimeout, PipelineClosed, RequestFailed, ZpipeError
from .framing import Kind, Message, check_tensor
from .manifest import Manifest, sha256_file
from .pipeline import Result
from .transport import Waker, curve_client, is_loopback, make_socket, new_context, recv_message, send_message

__all__ = ["RemoteClient", "ServerRefused", "Pong"]

log = logging.getLogger(__name__)

_MONITORED = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_DISCONNECTED
              | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)


class ServerRefused(RequestFailed):
    """The server refused this client's Curve key (not on its allowlist), or the handshake failed."""


def _handshake_failure(event: int, endpoint: str) -> str:
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return (f"server {endpoint} refused our Curve key (it is not on the server's allowlist, or the server key is "
                "wrong)")
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return (f"handshake with {endpoint} failed: not a zpipe/ZeroMQ server, or one that needs CurveZMQ keys we "
                "did not configure (or the reverse)")
    # The connection broke off during the handshake: a cut link, a server going down, or a server key that does
    # not match.
    return f"handshake with {endpoint} broke off (link cut, server down, or wrong server key)"


class Pong(NamedTuple):
    """A ping's answer: the round trip, and for a ping that named a model, how busy the server is with it for other
    clients (``backlog`` requests queued or running, a new request would wait ``wait_s`` for them; None from a
    server that does not say)."""

    rtt_s: float
    backlog: int | None = None
    wait_s: float | None = None


def _server_load(meta: dict[str, Any]) -> tuple[int | None, float | None]:
    """A ping answer's load figures, checked (they come from the network): anything odd counts as not said."""
    backlog, wait = meta.get("backlog"), meta.get("wait_s")
    backlog = backlog if isinstance(backlog, int) and not isinstance(backlog, bool) and backlog >= 0 else None
    ok = isinstance(wait, (int, float)) and not isinstance(wait, bool) and 0 <= wait <= 3600
    return backlog, float(wait) if ok else None


class _Pending:
    __slots__ = ("future", "sent", "deadline", "what", "raw")

    def __init__(self, future: Future, sent: float, deadline: float, what: str, raw: bool) -> None:
        self.future, self.sent, self.deadline, self.what = future, sent, deadline, what
        self.raw = raw  # resolve with the reply Message itself (control ops), not a Result


class RemoteClient:
    """A connection to one edge server. Thread-safe; start() or a with-block before use."""

    def __init__(self, endpoint: str, *, server_key: str | Path | None = None, client_key: str | Path | None = None,
                 timeout_s: float = 30.0, heartbeat_s: float = 1.0, identity: str | None = None,
                 hwm: int = 1000) -> None:
        if (server_key is None) != (client_key is None):
            raise ZpipeError("Curve needs both server_key (the server's public key) and client_key (our .key_secret)")
        if server_key is None and not is_loopback(endpoint):
            log.warning("connecting to %s without encryption: configure server_key and client_key", endpoint)
        self.endpoint = endpoint
        self.server_key, self.client_key = server_key, client_key
        self.timeout_s = timeout_s
        self.heartbeat_s = heartbeat_s
        # Unique per connection: a ROUTER silently refuses a second peer with an identity already in use.
        self.identity = identity or f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.hwm = hwm
        self.connected = False
        self.refused: str | None = None
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._deadlines: list[tuple[float, int]] = []
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()  # from callers' threads to the I/O thread
        self._backlog: collections.deque[Message] = collections.deque()  # not yet taken by ZeroMQ
        self._thread: threading.Thread | None = None
        self._stop = False
        self.bytes_sent = 0  # tensor bytes this client sent (the device-side count for the gate's X==0 proof)
        self.requests_sent = 0
        self._direct_lock = threading.Lock()  # held by the one caller using the direct connection
        self._direct: zmq.Socket | None = None  # and its monitor, its poller, whether it is up

    # -- lifecycle -----------------------------------------------------------------------------------------------
    def start(self) -> "RemoteClient":
        if self._thread is not None:
            return self
        self._ctx = new_context()
        self._waker = Waker()
        self._sock, self._monitor = self._connect(self.identity, hwm=self.hwm)
        self._thread = threading.Thread(target=self._io_loop, name="zpipe-client", daemon=True)
        self._thread.start()
        return self

    def _connect(self, identity: str, *, hwm: int) -> tuple[zmq.Socket, zmq.Socket]:
        """A DEALER to the server and the monitor of its connection (created before connecting: no event missed)."""
        sock = make_socket(self._ctx, zmq.DEALER, hwm=hwm, identity=identity.encode())
        # Queue messages only on a completed connection: while there is none (server down, handshake refused),
        # requests wait in our own backlog, where their deadlines can end them and they are never sent late.
        sock.setsockopt(zmq.IMMEDIATE, 1)
        if self.heartbeat_s > 0:  # 0: no keep-alive traffic at all on an idle connection
            ivl_ms = max(1, int(self.heartbeat_s * 1000))
            sock.setsockopt(zmq.HEARTBEAT_IVL, ivl_ms)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * ivl_ms)
        if self.server_key is not None:
            curve_client(sock, self.server_key, self.client_key)
        monitor = sock.get_monitor_socket(_MONITORED)
        sock.connect(self.endpoint)
        return sock, monitor

    def close(self) -> None:
        if self._thread is None:
            return
        self._stop = True
        self._waker.wake()
        self._thread.join(timeout=5.0)
        if self._direct_lock.acquire(timeout=0.5):  # a running stream sees _stop within one poll slice
            if self._direct is not None:
                self._direct.close(linger=0)
                self._direct_monitor.close(linger=0)
                self._direct = None
            self._direct_lock.release()
        else:  # a map() left unfinished holds it; resumed, it raises PipelineClosed before touching the socket
            self._direct = None  # (destroying the context below closes the socket)
        self._fail_all(PipelineClosed, "the client was closed")
        self._ctx.destroy(linger=0)
        self._waker.close()
        self._thread = None

    def __enter__(self) -> "RemoteClient":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- requests ------------------------------------------------------------------------------------------------
    def submit(self, model: str, inputs: Mapping[str, Any], *, version: int | None = None,
               timeout_s: float | None = None, meta: Mapping[str, Any] | None = None) -> Future:
        """Send one inference request; the future resolves to a :class:`~zpipe.Result` or raises.

        Do not change the input arrays until the future is done: tensors from 256 KiB on are sent without copying.
        """
        message, timeout = self._request(model, inputs, version, timeout_s, meta)
        future = self._send(message, timeout, f"model {model!r}")
        self._count(message)
        return future

    def infer(self, model: str, inputs: Mapping[str, Any], *, version: int | None = None,
              timeout_s: float | None = None, meta: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
        """Run one request and wait for its outputs; raises like ``submit(...).result()``."""
        with contextlib.closing(self.map(model, [inputs], in_flight=1, version=version, timeout_s=timeout_s,
                                         meta=meta)) as results:
            return next(results).outputs

    def map(self, model: str, inputs: Iterable[Mapping[str, Any]], *, in_flight: int = 8,
            version: int | None = None, timeout_s: float | None = None, meta: Mapping[str, Any] | None = None,
            return_exceptions: bool = False) -> Iterator[Result]:
        """Run one request per item of ``inputs``, up to ``in_flight`` at a time; yields their Results in order.

        The way to stream many tensors: requests are sent and replies read on the caller's own thread (on the
        direct connection), with no hand-off to the I/O thread. Inputs are read lazily, only when a slot is free;
        each request's timeout runs from then. A failed request (a bad input included) raises its error in its
        place in the order (the requests still in flight are abandoned; their replies are dropped), or is yielded
        as the exception object with ``return_exceptions=True``. Do not change an input's arrays until its result
        is yielded: tensors from 256 KiB on are sent without copying. A stream holds the direct connection until it
        ends; while it does, other calls (other threads, or a stream left unfinished: ``close()`` it) go through
        the I/O thread.
        """
        if in_flight < 1:
            raise ValueError(f"in_flight must be at least 1, not {in_flight}")
        what = f"model {model!r}"

        def prepared() -> Iterator[tuple[Message, float, str] | Exception]:
            for item in inputs:
                try:
                    yield self._request(model, item, version, timeout_s, meta) + (what,)
                except (TypeError, FramingError) as exc:  # a bad input: its error takes its place
                    yield exc

        requests = prepared()
        direct = self._direct_lock.acquire(blocking=False)  # else another caller is on the direct connection
        try:
            outcomes = self._direct_stream(requests, in_flight) if direct else self._future_stream(requests,
                                                                                                    in_flight)
            for outcome in outcomes:
                if isinstance(outcome, Exception) and not return_exceptions:
                    raise outcome
                yield outcome
        finally:
            if direct:
                self._direct_lock.release()

    def _future_stream(self, requests: Iterator[tuple[Message, float, str] | Exception], window: int
                       ) -> Iterator[Result | Exception]:
        """:meth:`_direct_stream` through the I/O thread."""
        futures: collections.deque[Future] = collections.deque()
        for item in requests:
            if len(futures) >= window:
                future = futures.popleft()
                yield future.exception() or future.result()
            if isinstance(item, Exception):
                futures.append(Future())
                futures[-1].set_exception(item)
                continue
            message, timeout_s, what = item
            futures.append(self._send(message, timeout_s, what))
            self._count(message)
        for future in futures:
            yield future.exception() or future.result()

    def _request(self, model: str, inputs: Mapping[str, Any], version: int | None, timeout_s: float | None,
                 meta: Mapping[str, Any] | None) -> tuple[Message, float]:
        if not isinstance(inputs, Mapping):
            raise TypeError(f"the inputs of a request map tensor names to arrays, not a {type(inputs).__name__} "
                            f"(model {model!r})")
        tensors = {name: check_tensor(name, array) for name, array in inputs.items()}
        timeout = self.timeout_s if timeout_s is None else timeout_s
        request_meta = {**(meta or {}), "model": model, "timeout_ms": timeout * 1000}
        if version is not None:
            request_meta["version"] = version
        return Message(kind=Kind.REQUEST, request_id=0, tensors=tensors, meta=request_meta), timeout

    def _count(self, message: Message) -> None:
        with self._lock:
            self.requests_sent += 1
            self.bytes_sent += sum(a.nbytes for a in message.tensors.values())

    def _direct_stream(self, requests: Iterator[tuple[Message, float, str] | Exception], window: int
                       ) -> Iterator[Result | Exception]:
        """Send ``requests`` ((message, timeout_s, what) each, or the error of a bad input) on the direct connection
        with up to ``window`` in flight, and yield each one's outcome (its Result, or the error) in order.

        Runs on the caller's thread, which holds ``_direct_lock``. The connection has its own monitor: a refusal or
        a lost connection ends the waits at once, as on the main one. A reply whose id is not waited for is late
        (its request timed out, or an abandoned stream sent it) and is dropped.
        """
        self._check_started()  # (a refusal is answered per request, below)
        if self._direct is None:
            self._direct, self._direct_monitor = self._connect(f"{self.identity[:200]}.direct", hwm=self.hwm)
            self._direct_up = False
            self._direct_poller = zmq.Poller()
            self._direct_poller.register(self._direct_monitor, zmq.POLLIN)
            self._direct_poller.register(self._direct, zmq.POLLIN)
        sock, poller = self._direct, self._direct_poller
        self._direct_events()  # what happened between calls changes only the state, not these requests
        order: collections.deque[int] = collections.deque()  # ids not yielded yet, in order
        waiting: dict[int, tuple[float, float, str]] = {}  # id -> (start, deadline, what) until its outcome
        outcomes: dict[int, Result | Exception] = {}
        unsent: Message | None = None  # the next request, while ZeroMQ has no room or no connection for it
        more = True
        while True:
            while order and order[0] in outcomes:
                yield outcomes.pop(order.popleft())
            if unsent is None and more and len(order) < window:
                item = next(requests, None)
                if item is None:
                    more = False
                else:
                    rid = next(self._ids)
                    order.append(rid)
                    if isinstance(item, Exception):
                        outcomes[rid] = item
                        continue
                    unsent, timeout_s, what = item
                    unsent.request_id = rid
                    start = time.monotonic()
                    waiting[rid] = (start, start + timeout_s, what)
            if not order:
                return
            self._check_started()
            if self.refused:  # the server refused our key: every request left ends so, in its place
                for rid in waiting:
                    outcomes[rid] = ServerRefused(self.refused, request_id=rid, reason="refused")
                waiting.clear()
                unsent = None
                continue
            if unsent is not None:  # IMMEDIATE: refused (Again) while there is no connection, never queued
                rid = unsent.request_id
                try:
                    send_message(sock, unsent, flags=zmq.NOBLOCK)
                    self._count(unsent)
                    unsent = None
                    continue
                except zmq.Again:
                    pass
                except (zmq.ZMQError, FramingError) as exc:
                    waiting.pop(rid)
                    outcomes[rid] = RequestFailed(f"request {rid} to {self.endpoint}: could not be sent: {exc}",
                                                  request_id=rid, reason="send_error")
                    unsent = None
                    continue
            now = time.monotonic()
            earliest = min(deadline for _, deadline, _ in waiting.values())
            if earliest <= now:
                self._direct_replies(waiting, outcomes)  # a reply already here is not late (a slow consumer)
                for rid, (start, deadline, what) in list(waiting.items()):
                    if deadline <= now:
                        del waiting[rid]
                        unsent = None if unsent is not None and unsent.request_id == rid else unsent
                        state = "connected" if self._direct_up else "no connection established"
                        outcomes[rid] = PeerTimeout(f"server {self.endpoint} did not answer request {rid} ({what}) "
                                                    f"within {deadline - start:.3g}s ({state})", request_id=rid,
                                                    stage=what, reason="timeout")
                continue
            poller.modify(sock, zmq.POLLIN | (zmq.POLLOUT if unsent is not None else 0))
            events = dict(poller.poll(min(earliest - now, 0.05) * 1000))
            if events.get(sock, 0) & zmq.POLLIN:
                self._direct_replies(waiting, outcomes)
            if self._direct_monitor in events:
                broke = self._direct_events()
                if broke:
                    self._direct_replies(waiting, outcomes, limit=len(waiting))  # those that made it first
                    if self.refused:
                        continue  # ended at the top of the loop
                    for rid in list(waiting):  # ZeroMQ lost them with the connection
                        outcomes[rid] = RequestFailed(f"request {rid}: {broke}", request_id=rid,
                                                      reason="disconnected")
                    waiting.clear()
                    unsent = None

    def _direct_replies(self, waiting: dict[int, tuple[float, float, str]],
                        outcomes: dict[int, Result | Exception], limit: int = 0) -> None:
        """Read the replies that arrived on the direct connection into ``outcomes`` (at most 256 more than
        ``limit``: late replies to earlier streams come on this connection too)."""
        for _ in range(limit + 256):
            try:
                _, reply = recv_message(self._direct, flags=zmq.NOBLOCK)
            except zmq.Again:
                break
            except FramingError as exc:
                log.warning("malformed reply from %s: %s", self.endpoint, exc)
                continue
            entry = waiting.pop(reply.request_id, None)
            if entry is not None:
                outcomes[reply.request_id] = self._outcome(reply, entry[2], entry[0])

    def _direct_events(self) -> str:
        """Read the direct connection's monitor; returns why it broke ("" if it did not)."""
        broke = ""
        while self._direct_monitor.poll(0):
            event = recv_monitor_message(self._direct_monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._direct_up = True
            elif event == zmq.EVENT_DISCONNECTED and self._direct_up:
                self._direct_up = False
                broke = f"connection to {self.endpoint} lost"
            elif event != zmq.EVENT_DISCONNECTED:  # a failed handshake
                broke = _handshake_failure(event, self.endpoint)
                if event != zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:  # a definite refusal, as on the main connection
                    self.refused = broke
        return broke

    @property
    def in_flight(self) -> int:
        """Requests (pings and control calls included) sent or queued and not yet answered, failed or expired."""
        return len(self._pending)

    def _check_started(self) -> None:
        if self._thread is None or self._stop:
            raise PipelineClosed("the client is not started (use start() or a with-block)")

    def _check_open(self) -> None:
        self._check_started()
        if self.refused:
            raise ServerRefused(self.refused, reason="refused")

    def health(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """The server's health answer: live, ready, models and their state/version/error."""
        return self._control({"op": "health"}, timeout_s)

    def ping(self, timeout_s: float = 5.0, *, model: str | None = None) -> Future:
        """Send a heartbeat, which the server's loop answers at once: a Future of a :class:`Pong`, the round trip
        in seconds and, naming ``model``, how busy the server is with it for other clients (or a PeerTimeout after
        ``timeout_s``). It measures the link's delay now, without running a model or moving tensors; the remote
        stand-in pings while a gate's policy needs that (``ping_s``)."""
        sent = time.monotonic()
        reply = self._send(Message(kind=Kind.HEARTBEAT, request_id=0, meta={"model": model} if model else {}),
                           timeout_s, "ping", raw=True)
        rtt: Future = Future()
        rtt.set_running_or_notify_cancel()

        def done(f: Future) -> None:  # on the I/O thread, as the reply is read
            if f.exception() is not None:
                rtt.set_exception(f.exception())
            else:
                rtt.set_result(Pong(time.monotonic() - sent, *_server_load(f.result().meta)))

        reply.add_done_callback(done)
        return rtt

    def stats(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """The server's per-client request and byte counters."""
        return self._control({"op": "stats"}, timeout_s)

    def upload(self, model: str, library: str | Path, *, manifest: str | Path | None = None,
               timeout_s: float = 120.0) -> int:
        """Send a compiled stage (library + manifest) to the server; returns the version it was stored as."""
        library = Path(library)
        manifest_path = Path(manifest) if manifest else library.with_suffix(".json")
        parsed = Manifest.load(manifest_path)
        if not library.is_file():
            raise ArtifactError(f"library {str(library)!r} does not exist")
        if parsed.library_sha256 and parsed.library_sha256 != sha256_file(library):
            raise ArtifactError(f"library {str(library)!r} does not match its manifest (sha256 differs)")
        doc = json.loads(manifest_path.read_text())
        doc["library"] = library.name
        doc["library_sha256"] = sha256_file(library)
        payload = np.frombuffer(library.read_bytes(), dtype=np.uint8)
        reply = self._send(Message(kind=Kind.CONTROL, request_id=0, tensors={"library": payload},
                                   meta={"op": "upload", "model": model, "manifest": json.dumps(doc)}),
                           timeout_s, f"upload of {model!r}", raw=True).result()
        return int(reply.meta["version"])

    def _control(self, meta: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        reply = self._send(Message(kind=Kind.CONTROL, request_id=0, meta=meta), timeout_s, meta["op"],
                           raw=True).result()
        return dict(reply.meta)

    def _send(self, message: Message, timeout_s: float, what: str, *, raw: bool = False) -> Future:
        self._check_open()
        future: Future = Future()
        future.set_running_or_notify_cancel()
        rid = next(self._ids)
        message.request_id = rid
        now = time.monotonic()
        with self._lock:
            self._pending[rid] = _Pending(future, now, now + timeout_s, what, raw)
            heapq.heappush(self._deadlines, (now + timeout_s, rid))
        self._outbox.put(message)
        self._waker.wake()
        return future

    # -- the I/O loop --------------------------------------------------------------------------------------------
    def _io_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        poller.register(self._waker.fd, zmq.POLLIN)
        while not self._stop:
            try:
                poller.modify(self._sock, zmq.POLLIN | (zmq.POLLOUT if self._backlog else 0))
                events = dict(poller.poll(self._until_next_deadline_ms()))
                if self._waker.fd in events:
                    self._waker.clear()
                self._flush_outbox()
                if self._monitor in events:
                    self._on_monitor()
                if self._sock in events:
                    for _ in range(256):
                        if not self._receive_one():
                            break
                self._expire()
            except Exception:
                log.exception("error in the client I/O loop")

    def _flush_outbox(self) -> None:
        """Hand queued messages to ZeroMQ without ever blocking this thread (it also runs the deadlines)."""
        while True:
            try:
                self._backlog.append(self._outbox.get_nowait())
            except queue.Empty:
                break
        while self._backlog:
            message = self._backlog[0]
            with self._lock:
                alive = message.request_id in self._pending
            if not alive:  # ended already (deadline, refusal): never send it late
                self._backlog.popleft()
                continue
            try:
                send_message(self._sock, message, flags=zmq.NOBLOCK)
            except zmq.Again:
                return  # no connection, or the server's queue is full: backpressure; retried on POLLOUT
            except (zmq.ZMQError, FramingError) as exc:
                self._finish(message.request_id, exc=RequestFailed(
                    f"request {message.request_id} to {self.endpoint}: could not be sent: {exc}",
                    request_id=message.request_id, reason="send_error"))
            self._backlog.popleft()

    def _receive_one(self) -> bool:
        try:
            _, msg = recv_message(self._sock, flags=zmq.NOBLOCK)
        except zmq.Again:
            return False
        except FramingError as exc:
            log.warning("malformed reply from %s: %s", self.endpoint, exc)
            return True
        with self._lock:
            pending = self._pending.get(msg.request_id)
        if pending is None:
            return True  # a late reply for a request that already ended
        outcome = self._outcome(msg, pending.what, pending.sent)
        if isinstance(outcome, Exception):
            self._finish(msg.request_id, exc=outcome)
        else:
            self._finish(msg.request_id, result=outcome, reply=msg)
        return True

    def _outcome(self, msg: Message, what: str, sent: float) -> Result | RequestFailed:
        if msg.kind == Kind.ERROR:
            code, text = msg.meta.get("error", "error"), msg.meta.get("message", "")
            cls = PeerTimeout if code == "timeout" else RequestFailed
            return cls(f"{self.endpoint} ({what}): {code}: {text}", request_id=msg.request_id, stage=what,
                       reason=code)
        return Result(request_id=msg.request_id, outputs=msg.tensors, latency_s=time.monotonic() - sent,
                      meta=dict(msg.meta))

    def _on_monitor(self) -> None:
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.connected = True
                self.refused = None
            elif event in (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
                self.refused = _handshake_failure(event, self.endpoint)
                self._fail_all(ServerRefused, self.refused, reason="refused")
            elif event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                # Not a definite refusal: ZeroMQ keeps retrying.
                self._fail_all(RequestFailed, _handshake_failure(event, self.endpoint), reason="disconnected")
            elif event == zmq.EVENT_DISCONNECTED and self.connected:
                self.connected = False
                # ZeroMQ silently loses what was in flight on a broken connection: fail it now, with a reason.
                self._fail_all(RequestFailed, f"connection to {self.endpoint} lost", reason="disconnected")

    def _until_next_deadline_ms(self) -> int:
        """How long the I/O loop may wait for a message: until the earliest deadline (an ended request's too: its
        entry leaves the heap when due), at most 1 s. An idle loop used to wake every 50 ms (a device's CPU)."""
        with self._lock:
            wait_s = self._deadlines[0][0] - time.monotonic() if self._deadlines else 1.0
        return max(0, min(1000, math.ceil(wait_s * 1000)))

    def _expire(self) -> None:
        now = time.monotonic()
        while True:
            with self._lock:
                if not self._deadlines or self._deadlines[0][0] > now:
                    return
                _, rid = heapq.heappop(self._deadlines)
                pending = self._pending.get(rid)
            if pending is not None:
                state = "connected" if self.connected else "no connection established"
                self._finish(rid, exc=PeerTimeout(
                    f"server {self.endpoint} did not answer request {rid} ({pending.what}) within "
                    f"{pending.deadline - pending.sent:.3g}s ({state})", request_id=rid, stage=pending.what,
                    reason="timeout"))

    def _fail_all(self, cls: type, text: str, *, reason: str = "closed") -> None:
        with self._lock:
            rids = list(self._pending)
        for rid in rids:
            exc = cls(text) if cls is PipelineClosed else cls(f"request {rid}: {text}", request_id=rid, reason=reason)
            self._finish(rid, exc=exc)

    def _finish(self, rid: int, *, result: Any = None, exc: Exception | None = None,
                reply: Message | None = None) -> None:
        with self._lock:
            pending = self._pending.pop(rid, None)
        if pending is None:
            return
        if exc is not None:
            pending.future.set_exception(exc)
        else:
            pending.future.set_result(reply if pending.raw else result)
