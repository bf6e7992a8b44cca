"""Run a topology on this host and submit requests to it: the embedding API, and what `zpipe run` drives.

    with Pipeline(topology) as pipe:          # spawns the workers, waits for READY
        outputs = pipe.infer({"x": x})        # blocking; raises RequestFailed with the stage and reason
        future = pipe.submit({"x": x})        # concurrent.futures.Future[Result]; many may be in flight
        result = await pipe.infer_async({"x": x})

The pipeline is the source and the sink of the graph: it sends each request's inputs to the stages that read them
and joins the outputs by request id. One I/O thread owns the sink socket, the supervisor's control socket and the
deadlines; callers' threads only encode and send (under a lock). Every submitted request ends exactly once: with its
outputs, or with a :class:`~zpipe.errors.RequestFailed` whose ``reason`` is one of ``stage_error``, ``timeout``,
``worker_died`` or ``shutdown``; :meth:`Pipeline.stats` counts them so nothing goes unexplained.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import logging
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import zmq

from .errors import Busy, PeerTimeout, PipelineClosed, RequestFailed, TopologyError, ZpipeError
from .framing import Kind, Message, check_tensor
from .supervisor import Supervisor
from .topology import REQUEST, Topology
from .transport import ipc_endpoint, make_socket, new_context, recv_message, send_message
from .worker import DEADLINE, SKIPPED

__all__ = ["Pipeline", "Result"]

log = logging.getLogger(__name__)


def _run_root() -> str | None:
    """Where a pipeline keeps its ipc sockets and signal board: $ZPIPE_RUNDIR if set, else /dev/shm (memory) where
    there is one, else the temporary directory. The board is rewritten within ms of every change (a stand-in's
    pings: 20 a second); on this machine's ext4 a publish cost ~210 us of CPU, on tmpfs ~45 us (bench/ping_cost.py
    has what that does to a device's idle CPU)."""
    chosen = os.environ.get("ZPIPE_RUNDIR")
    if chosen:
        if not os.path.isdir(chosen) or not os.access(chosen, os.W_OK | os.X_OK):
            raise ZpipeError(f"ZPIPE_RUNDIR={chosen!r} is not a writable directory; create it or unset ZPIPE_RUNDIR")
        return chosen
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK | os.X_OK) else None


_RESERVED_META = frozenset({"stage", "error", "message", "op", SKIPPED, DEADLINE})  # zpipe's own keys in message metadata


@dataclass(frozen=True)
class Result:
    """A finished request: its outputs (read-only arrays), end-to-end latency, and each stage's (start, end).

    Stage times are ``time.monotonic()`` readings taken in the workers: comparable with each other on one host.
    """

    request_id: int
    outputs: dict[str, np.ndarray]
    latency_s: float
    stage_times: dict[str, tuple[float, float]] = field(default_factory=dict)
    meta: dict[str, object] = field(default_factory=dict)  # e.g. the model version an edge server used

    @property
    def placement(self) -> dict[str, str]:
        """Where each stage that ran for this request ran: "device", "<host> (<endpoint>)", or a fallback note."""
        return {stage: str(self.meta.get(f"at:{stage}", "device")) for stage in self.stage_times}


class _Pending:
    __slots__ = ("future", "submitted", "deadline", "outputs", "meta")

    def __init__(self, future: Future, submitted: float, deadline: float) -> None:
        self.future = future
        self.submitted = submitted
        self.deadline = deadline
        self.outputs: dict[str, np.ndarray] = {}
        self.meta: dict[str, Any] = {}


class Pipeline:
    """A running topology on this host. Thread-safe: any thread may submit."""

    def __init__(self, topology: Topology, *, start_timeout_s: float = 120.0, max_restarts: int = 3) -> None:
        self.topology = topology
        self._start_timeout_s = start_timeout_s
        self._max_restarts = max_restarts
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # guards _pending, _counts, _closing
        self._send_lock = threading.Lock()  # guards the source sockets
        self._drained = threading.Condition(self._lock)
        self._pending: dict[int, _Pending] = {}
        self._deadlines: list[tuple[float, int]] = []
        self._counts: collections.Counter[str] = collections.Counter()
        self._slots = threading.BoundedSemaphore(topology.max_in_flight)
        self._closing = False
        self._broken: str | None = None
        self._started = False
        self._thread: threading.Thread | None = None
        self._metrics_server: Any = None

    # -- lifecycle -----------------------------------------------------------------------------------------------
    def start(self) -> "Pipeline":
        if self._started:
            return self
        if self._closing:
            raise PipelineClosed("this pipeline was closed; create a new Pipeline to run the topology again")
        self._rundir = tempfile.mkdtemp(prefix="zpipe-", dir=_run_root())
        self._ctx = new_context()
        try:
            self._sink = make_socket(self._ctx, zmq.PULL, hwm=self.topology.hwm)
            self._sink.bind(ipc_endpoint(self._rundir, "sink"))
            self._supervisor = Supervisor(self.topology, self._ctx, self._rundir,
                                          self._sink.getsockopt_string(zmq.LAST_ENDPOINT),
                                          max_restarts=self._max_restarts)
            self._sources = []
            for consumer, tensors in self.topology.routes(REQUEST).items():
                sock = make_socket(self._ctx, zmq.PUSH, hwm=self.topology.hwm)
                sock.connect(self._supervisor.endpoints[consumer])
                self._sources.append((sock, tensors))
            self._supervisor.start(self._start_timeout_s)
        except BaseException:
            self._ctx.destroy(linger=0)
            shutil.rmtree(self._rundir, ignore_errors=True)
            raise
        self._stop_loop = False
        self._thread = threading.Thread(target=self._io_loop, name="zpipe-io", daemon=True)
        self._thread.start()
        self._started = True
        return self

    def close(self, *, drain_timeout_s: float = 30.0) -> None:
        """Stop taking requests, wait up to ``drain_timeout_s`` for those in flight, fail the rest, stop workers.

        A closed pipeline cannot be started again.
        """
        if not self._started:
            self._stop_metrics()
            return
        with self._lock:
            self._closing = True
            deadline = time.monotonic() + drain_timeout_s
            while self._pending and time.monotonic() < deadline:
                self._drained.wait(timeout=min(0.1, max(0.0, deadline - time.monotonic())))
        self._stop_loop = True  # also makes blocked submit() calls give up within their poll interval
        self._thread.join(timeout=10.0)
        if self._thread.is_alive():
            log.error("the pipeline I/O thread did not stop within 10 s")
        self._fail_all("shutdown", "the pipeline shut down before the request finished")
        self._supervisor.stop()
        with self._send_lock:  # no submit() is inside a send on these sockets any more
            for sock, _ in self._sources:
                sock.close(linger=0)
        self._ctx.destroy(linger=0)
        shutil.rmtree(self._rundir, ignore_errors=True)
        self._started = False
        self._stop_metrics()

    def _stop_metrics(self) -> None:
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None

    def __enter__(self) -> "Pipeline":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- requests ------------------------------------------------------------------------------------------------
    def submit(self, inputs: Mapping[str, Any], *, meta: Mapping[str, Any] | None = None,
               timeout_s: float | None = None, block: bool = True) -> Future:
        """Send one request; returns a Future resolving to a :class:`Result` or raising :class:`RequestFailed`.

        Blocks while ``max_in_flight`` requests are unanswered (backpressure), or raises :class:`Busy` at once
        when ``block`` is False. The request's deadline travels with it, and a stage that receives it too late
        fails it instead of running it. Input arrays are sent without
        copying: do not modify them until the future is done. A submitted request cannot be cancelled. Futures
        are resolved on zpipe's I/O thread, so a done-callback must not call ``submit``/``infer`` itself.
        """
        arrays = self._check_inputs(inputs)
        meta = self._check_meta(meta)
        if threading.current_thread() is self._thread:
            raise RuntimeError("submit()/infer() called from a future's done-callback, which runs on zpipe's I/O "
                               "thread and would deadlock it; submit from another thread or an executor")
        if not self._started or self._closing or self._broken:
            raise PipelineClosed(self._broken or "the pipeline is not running; use start() or a with-block")
        if not self._slots.acquire(blocking=block):
            raise Busy(f"pipeline {self.topology.name!r} has {self.topology.max_in_flight} requests in flight")
        future: Future = Future()
        future.set_running_or_notify_cancel()  # from here on the request cannot be cancelled, only answered
        rid = next(self._ids)
        now = time.monotonic()
        pending = _Pending(future, now, now + (self.topology.timeout_s if timeout_s is None else timeout_s))
        meta[DEADLINE] = pending.deadline
        with self._lock:
            if self._closing or self._broken:
                self._slots.release()
                raise PipelineClosed(self._broken or "the pipeline is shutting down")
            self._pending[rid] = pending
            self._counts["submitted"] += 1
            heapq.heappush(self._deadlines, (pending.deadline, rid))
        try:
            with self._send_lock:
                for sock, tensors in self._sources:
                    self._send(sock, Message(kind=Kind.REQUEST, request_id=rid, meta=meta,
                                             tensors={t: arrays[t] for t in tensors}))
        except BaseException as exc:
            self._finish(rid, exc=RequestFailed(f"request {rid}: could not be sent: {exc!r}", request_id=rid,
                                                reason="send_error"))
            raise
        return future

    def _send(self, sock: zmq.Socket, message: Message) -> None:
        """Send, waiting while the link is full (backpressure), but give up when the pipeline closes."""
        while True:
            try:
                send_message(sock, message, flags=zmq.NOBLOCK)
                return
            except zmq.Again:
                if self._stop_loop or self._broken:
                    raise PipelineClosed(self._broken or "the pipeline shut down while the request waited to be "
                                         "sent") from None
                sock.poll(100, zmq.POLLOUT)

    def infer(self, inputs: Mapping[str, Any], *, meta: Mapping[str, Any] | None = None,
              timeout_s: float | None = None) -> dict[str, np.ndarray]:
        """Run one request and return its outputs; raises :class:`RequestFailed` (stage, reason) on failure."""
        return self.submit(inputs, meta=meta, timeout_s=timeout_s).result().outputs

    async def infer_async(self, inputs: Mapping[str, Any], *, meta: Mapping[str, Any] | None = None,
                          timeout_s: float | None = None) -> Result:
        """Awaitable :meth:`submit` (the blocking part, backpressure, runs in the default executor)."""
        loop = asyncio.get_running_loop()
        future = await loop.run_in_executor(None, lambda: self.submit(inputs, meta=meta, timeout_s=timeout_s))
        return await asyncio.wrap_future(future)

    @property
    def healthy(self) -> bool:
        """Running and taking requests (not closing, and no stage beyond its restart budget)."""
        return self._started and not self._closing and self._broken is None

    def signals(self, stage: str) -> dict[str, Any]:
        """What ``stage`` last published on this host's signal board: its counts and service time, and for a
        remote stand-in its round trip, breaker state and requests/bytes sent to each server."""
        self.topology.stage(stage)  # a clear error for an unknown name
        from .board import Board

        return (Board(f"{self._rundir}/board").read(stage) or {}) if self._started else {}

    def metrics_collector(self) -> Any:
        """A prometheus-client collector of this pipeline's metrics (zpipe.pipeline_metrics lists them), for an
        application's own registry: ``registry.register(pipe.metrics_collector())``."""
        from .pipeline_metrics import PipelineCollector

        return PipelineCollector(self)

    def serve_metrics(self, port: int = 0, addr: str = "127.0.0.1") -> int:
        """Serve this pipeline's metrics at http://ADDR:PORT/metrics (loopback by default; port 0 picks a free one)
        until it closes; returns the port."""
        from prometheus_client import CollectorRegistry, start_http_server

        if self._metrics_server is not None:
            raise ZpipeError(f"this pipeline already serves its metrics on port {self._metrics_server.server_port}")
        registry = CollectorRegistry()
        registry.register(self.metrics_collector())
        try:
            self._metrics_server, _ = start_http_server(port, addr=addr, registry=registry)
        except OSError as exc:
            raise ZpipeError(f"cannot serve metrics on {addr}:{port}: {exc.strerror or exc}") from exc
        return self._metrics_server.server_port

    def stats(self) -> dict[str, int]:
        """Counters: submitted, ok, failed, in_flight, late (replies after their request ended) and per reason."""
        with self._lock:
            counts = dict(self._counts)
            counts["in_flight"] = len(self._pending)
        for key in ("submitted", "ok", "failed", "late"):
            counts.setdefault(key, 0)
        return counts

    @staticmethod
    def _check_meta(meta: Mapping[str, Any] | None) -> dict[str, Any]:
        meta = dict(meta or {})
        for key in meta:
            if not isinstance(key, str) or key.startswith("t:") or key in _RESERVED_META:
                raise ValueError(f"meta key {key!r} is reserved by zpipe (reserved: 't:*', "
                                 f"{sorted(_RESERVED_META)}); choose another name")
        return meta

    def _check_inputs(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        if not isinstance(inputs, Mapping):
            raise TypeError(f"inputs must be a mapping of tensor name to array, got {type(inputs).__name__}")
        expected = set(self.topology.inputs)
        missing = sorted(expected - inputs.keys())
        extra = sorted(inputs.keys() - expected)
        if missing or extra:
            raise TopologyError(f"pipeline {self.topology.name!r} takes inputs {sorted(expected)}; "
                                f"missing {missing}, unexpected {extra}")
        return {name: check_tensor(name, inputs[name]) for name in self.topology.inputs}

    # -- the I/O loop --------------------------------------------------------------------------------------------
    def _io_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sink, zmq.POLLIN)
        poller.register(self._supervisor.control, zmq.POLLIN)
        sentinels: dict[int, str] = {}
        while not self._stop_loop:
            try:
                if not self._broken:
                    for fd, name in self._supervisor.sentinels().items():
                        if fd not in sentinels:
                            sentinels[fd] = name
                            poller.register(fd, zmq.POLLIN)
                events = dict(poller.poll(50))
                if self._sink in events:
                    self._drain_sink()
                if self._supervisor.control in events:
                    self._supervisor.handle_control()
                for fd in [fd for fd in sentinels if fd in events]:
                    poller.unregister(fd)
                    self._on_worker_exit(sentinels.pop(fd))
                if not sentinels and not self._broken:  # no pidfd on this platform: poll the processes
                    for name in self._supervisor.exited():
                        self._on_worker_exit(name)
                self._expire()
            except Exception:  # never let the I/O thread die: that would strand every future
                log.exception("error in the pipeline I/O loop")

    def _drain_sink(self) -> None:
        for _ in range(1000):
            try:
                _, msg = recv_message(self._sink, flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            except Exception as exc:
                log.warning("malformed message at the sink dropped: %s", exc)
                continue
            self._on_sink_message(msg)

    def _on_sink_message(self, msg: Message) -> None:
        rid = msg.request_id
        with self._lock:
            pending = self._pending.get(rid)
            if pending is None:
                self._counts["late"] += 1
                return
        if msg.kind == Kind.ERROR:
            stage, error, text = msg.meta.get("stage"), msg.meta.get("error"), msg.meta.get("message")
            reason = "timeout" if error == "PeerTimeout" else "stage_error"
            self._finish(rid, exc=_failure(reason, f"request {rid} failed in stage {stage!r}: {error}: {text}",
                                           request_id=rid, stage=stage))
            return
        skipped = msg.meta.get(SKIPPED)
        if skipped:
            self._finish(rid, exc=_failure(
                "stage_error", f"request {rid}: pipeline outputs {skipped} were skipped by a gate; join the gated "
                "branches with a merge of op 'select' before the outputs", request_id=rid))
            return
        pending.outputs.update(msg.tensors)
        pending.meta.update(msg.meta)
        if len(pending.outputs) == len(self.topology.outputs):
            times = {k[2:]: (v[0], v[1]) for k, v in pending.meta.items() if k.startswith("t:")}
            notes = {k: v for k, v in pending.meta.items() if not k.startswith("t:") and k != DEADLINE}
            self._finish(rid, result=Result(request_id=rid, outputs=dict(pending.outputs),
                                            latency_s=time.monotonic() - pending.submitted, stage_times=times,
                                            meta=notes))

    def _expire(self) -> None:
        now = time.monotonic()
        while True:
            with self._lock:
                if not self._deadlines or self._deadlines[0][0] > now:
                    return
                _, rid = heapq.heappop(self._deadlines)
                pending = self._pending.get(rid)
            if pending is not None:
                missing = sorted(set(self.topology.outputs) - pending.outputs.keys())
                self._finish(rid, exc=_failure(
                    "timeout", f"request {rid}: no complete reply within {pending.deadline - pending.submitted:g}s "
                    f"(missing outputs {missing})", request_id=rid))

    def _on_worker_exit(self, name: str) -> None:
        """The worker process of group ``name`` ended: restart it (within budget) and fail what was in flight."""
        code = self._supervisor.exitcode(name)
        why = f"the worker of {self._supervisor.describe(name)} died (exit code {code})"
        stage = self._supervisor.culprit(name)
        restarted = False
        try:
            restarted = not self._closing and self._supervisor.on_exit(name)
            if not restarted and not self._closing:
                self._broken = (f"{why} and was restarted {self._supervisor.max_restarts} times already; "
                                "pipeline stopped")
        finally:
            # A local pipeline runs every request through every stage, so all requests in flight are affected.
            self._fail_all("worker_died", why + (", restarted" if restarted else ""), stage=stage)

    def _fail_all(self, reason: str, text: str, *, stage: str | None = None) -> None:
        with self._lock:
            rids = list(self._pending)
        for rid in rids:
            self._finish(rid, exc=_failure(reason, f"request {rid}: {text}", request_id=rid, stage=stage),
                         reason=reason)

    def _finish(self, rid: int, *, result: Result | None = None, exc: Exception | None = None,
                reason: str | None = None) -> None:
        with self._lock:
            pending = self._pending.pop(rid, None)
            if pending is None:
                return
            if exc is None:
                self._counts["ok"] += 1
            else:
                self._counts["failed"] += 1
                self._counts[f"failed:{reason or getattr(exc, 'reason', 'error')}"] += 1
            if not self._pending:
                self._drained.notify_all()
        self._slots.release()
        if exc is None:
            pending.future.set_result(result)
        else:
            pending.future.set_exception(exc)


def _failure(reason: str, text: str, *, request_id: int, stage: str | None = None) -> Exception:
    """The exception a request ends with, by reason."""
    if reason == "shutdown":
        return PipelineClosed(text)
    cls = PeerTimeout if reason == "timeout" else RequestFailed
    return cls(text, request_id=request_id, stage=stage, reason=reason)
