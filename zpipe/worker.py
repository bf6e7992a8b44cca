"""One worker process hosting one stage: receive, join by request id, process, send on. Sockets are built here.

The worker binds a PULL socket (its input), connects one PUSH socket per consumer (other stages, or the pipeline's
sink), and a DEALER to the supervisor for the READY handshake and orders. Its loop is the one dispatch point: a
malformed message or a raising stage costs one request (an ERROR message travels downstream in its place, naming
the stage), never the worker.
"""

from __future__ import annotations

import collections
import logging
import os
import pickle
import queue
import signal
import sys
import time
import traceback
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Mapping

import cloudpickle
import numpy as np
import zmq

from .errors import FramingError, StageError
from .framing import DEFAULT_LIMITS, Kind, Limits, Message, encode
from .board import Board, Ewma
from .stage import Outcome, Stage, StageContext
from .transport import Waker, make_socket, new_context, recv_message, send_message

__all__ = ["WorkerPlan", "main", "run_worker", "normalise_outputs", "SKIPPED", "DEADLINE"]

log = logging.getLogger(__name__)

SKIPPED = "skipped"  # meta key: tensors of this message that the gate routed away (sent as names, not data)
DEADLINE = "deadline"  # meta key: time.monotonic() after which the request is not worth running (this host only)
_FAILED_MEMORY = 10_000
_STALE_S = 1.0  # a smoothed figure not updated for this long is replaced by the next sample, not blended  # request ids remembered as failed, so their late parts are dropped, not re-joined


@dataclass(frozen=True, kw_only=True)
class WorkerPlan:
    """Everything a worker needs, as plain picklable values (endpoints, not sockets)."""

    stage_name: str
    stage_blob: bytes  # cloudpickle of the configured Stage; built by our own parent, never read from a socket
    inputs: tuple[tuple[str, str], ...]  # (port, tensor)
    outputs: tuple[tuple[str, str], ...]
    endpoint: str  # where this worker's PULL binds
    routes: tuple[tuple[str, str, tuple[str, ...]], ...]  # (consumer, endpoint, tensors it needs)
    control: str  # the supervisor's ROUTER
    hwm: int
    join_timeout_s: float
    sys_path: tuple[str, ...] = ()  # the parent's import path, so dotted paths resolve the same way
    board_dir: str = ""  # this host's signal board (zpipe.board), shared by the pipeline's workers
    consumers: tuple[tuple[str, tuple[str, ...]], ...] = ()  # output port -> stages reading it
    parent_pid: int = 0  # the worker exits when this process is gone
    limits: Limits = DEFAULT_LIMITS


def main() -> None:
    """Entry point of a worker process: read the pickled plan from stdin (a private pipe from the parent), run it."""
    plan = pickle.loads(sys.stdin.buffer.read())  # our own parent's bytes over a pipe, never from a socket
    for entry in reversed(plan.sys_path):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    run_worker(plan)


def run_worker(plan: WorkerPlan) -> None:
    """Run one worker in this process until told to stop, sent SIGTERM, or orphaned."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which orders an orderly stop
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    logging.basicConfig(level=os.environ.get("ZPIPE_WORKER_LOG", "WARNING"),
                        format=f"%(asctime)s worker[{plan.stage_name}] %(levelname)s %(message)s")
    _Worker(plan, stopping).run()


class _Join:
    __slots__ = ("tensors", "skipped", "meta", "deadline")

    def __init__(self, deadline: float) -> None:
        self.tensors: dict[str, np.ndarray] = {}
        self.skipped: set[str] = set()  # tensors the gate routed away from this path for this request
        self.meta: dict[str, Any] = {}
        self.deadline = deadline


class _Worker:
    def __init__(self, plan: WorkerPlan, stopping: list) -> None:
        self.plan = plan
        self.name = plan.stage_name
        self.stopping = stopping
        self.needed = frozenset(t for _, t in plan.inputs)
        self.joins: dict[int, _Join] = {}
        self.failed: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.counts = collections.Counter()
        # Asynchronous stages (a remote stand-in) return a Future from handle(); their completions come back
        # through this queue and self-pipe, so only this thread touches the sockets.
        self.running: dict[int, tuple[dict[str, Any], float]] = {}
        self.service = Ewma(0.2)  # smoothed processing time, published on the board
        self.measured_at: float | None = None
        self.board: Board | None = None
        self.published_at, self.published_done = 0.0, -1
        self.done: queue.SimpleQueue = queue.SimpleQueue()
        self.waker = Waker()

    def run(self) -> None:
        plan = self.plan
        ctx = new_context()
        self.control = make_socket(ctx, zmq.DEALER, hwm=1000, identity=self.name.encode())
        self.control.connect(plan.control)
        try:
            self.stage: Stage = cloudpickle.loads(plan.stage_blob)
            self.data_in = make_socket(ctx, zmq.PULL, hwm=plan.hwm)
            self.data_in.bind(plan.endpoint)
            self.outs = []
            for consumer, endpoint, tensors in plan.routes:
                sock = make_socket(ctx, zmq.PUSH, hwm=plan.hwm)
                sock.connect(endpoint)
                self.outs.append((consumer, sock, tensors))
            self.board = Board(plan.board_dir) if plan.board_dir else None
            self.stage.context = StageContext(name=self.name, consumers=dict(plan.consumers), board=self.board)
            self.stage.setup()
        except Exception as exc:
            log.exception("setup failed")
            self._control("failed", error=type(exc).__name__, message=str(exc)[:4000],
                          traceback=traceback.format_exc()[-8000:])
            self.control.close(linger=2000)  # let the report leave before the context goes
            ctx.destroy(linger=0)
            raise SystemExit(2)
        self._control("ready", pid=os.getpid())
        try:
            self._loop()
        finally:
            try:
                self.stage.teardown()
            except Exception:
                log.exception("teardown failed")
            ctx.destroy(linger=0)

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.data_in, zmq.POLLIN)
        poller.register(self.control, zmq.POLLIN)
        poller.register(self.waker.fd, zmq.POLLIN)
        reading = True
        limit = getattr(self.stage, "max_in_flight", 64)
        while not self.stopping:
            if reading != (len(self.running) < limit):  # backpressure: stop taking work while saturated
                reading = not reading
                poller.modify(self.data_in, zmq.POLLIN if reading else 0)
            if self.plan.parent_pid and os.getppid() != self.plan.parent_pid:  # orphaned
                log.error("parent process %d is gone; exiting", self.plan.parent_pid)
                return
            timeout_ms = 200
            if self.board is not None and self.counts["processed"] + self.counts["failed"] != self.published_done:
                timeout_ms = 3  # a change waits to be published
            if self.joins:
                first = next(iter(self.joins.values()))
                timeout_ms = max(0, min(timeout_ms, int((first.deadline - time.monotonic()) * 1000) + 1))
            events = dict(poller.poll(timeout_ms))
            try:  # the one dispatch point: nothing a message or a stage does may end the worker
                if self.control in events and self._on_control():
                    return
                if self.waker.fd in events:
                    self._collect_async()
                if self.data_in in events:
                    for _ in range(100):  # drain a burst, but keep serving control and deadlines
                        if not self._on_data():
                            break
                        self._publish()  # a long burst must not leave the board stale
                self._expire_joins()
                self._publish()
            except Exception:
                self.counts["internal_errors"] += 1
                log.exception("error while handling a message; the worker carries on")

    def _on_control(self) -> bool:
        """Handle one order from the supervisor; True means stop."""
        try:
            _, msg = recv_message(self.control, limits=self.plan.limits)
        except FramingError as exc:
            log.warning("malformed control message: %s", exc)
            return False
        op = msg.meta.get("op")
        if op == "stop":
            return True
        log.warning("unknown control op %r", op)  # figures go to the signal board, not over this link
        return False

    def _on_data(self) -> bool:
        """Handle one message from the data socket; False when none was waiting."""
        try:
            _, msg = recv_message(self.data_in, flags=zmq.NOBLOCK, limits=self.plan.limits)
        except zmq.Again:
            return False
        except FramingError as exc:
            self.counts["malformed"] += 1
            log.warning("dropped a malformed message: %s", exc)
            return True
        rid = msg.request_id
        if msg.kind == Kind.ERROR:
            first_news = rid not in self.failed
            self.joins.pop(rid, None)
            if first_news:  # forward each failure once, whichever branch reports it first
                self._forward_error(rid, msg.meta)
            return True
        if msg.kind != Kind.REQUEST:
            self.counts["unexpected_kind"] += 1
            log.warning("request %d: unexpected message kind %s dropped", rid, msg.kind.name)
            return True
        if rid in self.failed:
            self.counts["dropped_after_failure"] += 1
            return True
        skipped = _skipped(msg.meta)
        join = self.joins.get(rid)
        if join is None and self.needed <= msg.tensors.keys() | skipped:
            self._run(rid, msg.tensors, skipped, msg.meta)
            return True
        if join is None:
            join = self.joins[rid] = _Join(time.monotonic() + self._join_timeout_s())
        join.tensors.update(msg.tensors)
        join.skipped |= skipped
        join.meta.update(msg.meta)
        if self.needed <= join.tensors.keys() | join.skipped:
            del self.joins[rid]
            self._run(rid, join.tensors, join.skipped, join.meta)
        return True

    def _join_timeout_s(self) -> float:
        own = getattr(self.stage, "join_timeout_s", None)
        return own if own is not None else self.plan.join_timeout_s

    def _expire_joins(self) -> None:
        now = time.monotonic()
        while self.joins:
            rid, join = next(iter(self.joins.items()))
            if join.deadline > now:
                return
            del self.joins[rid]
            missing = sorted(self.needed - join.tensors.keys())
            self.counts["join_timeouts"] += 1
            self._fail(rid, join.meta, "PeerTimeout",
                       f"stage {self.name!r} waited {self._join_timeout_s():g}s for tensors {missing} of request "
                       f"{rid} (got {sorted(join.tensors)})")

    def _run(self, rid: int, tensors: Mapping[str, np.ndarray], skipped: set[str], meta: dict[str, Any]) -> None:
        meta = {k: v for k, v in meta.items() if k != SKIPPED}
        skipped_in = self.needed & skipped
        if skipped_in == self.needed:  # the gate sent this request the other way: pass the skip on, run nothing
            self._send_all(rid, {}, meta)
            self.counts["skipped"] += 1
            return
        start = time.monotonic()
        deadline = meta.get(DEADLINE)
        if isinstance(deadline, (int, float)) and start > deadline:  # same host: monotonic clocks agree
            self.counts["expired"] += 1
            self._fail(rid, meta, "PeerTimeout", f"request {rid} reached stage {self.name!r} "
                       f"{(start - deadline) * 1000:.1f} ms after its deadline; not run")
            return
        try:
            if skipped_in and not self.stage.accepts_skipped:
                raise StageError(f"stage {self.name!r} got inputs {sorted(self.needed - skipped_in)} but "
                                 f"{sorted(skipped_in)} were skipped by a gate; join gated branches with a "
                                 "merge of op 'select'", stage=self.name)
            inputs = {port: tensors.get(tensor) for port, tensor in self.plan.inputs}
            result = self.stage.handle(inputs, meta)
            if isinstance(result, Future):  # finished later, by _collect_async
                self.running[rid] = (meta, start)
                result.add_done_callback(lambda f, rid=rid: self._async_done(rid, f))
                return
            self._finish_run(rid, result, meta, start)
        except Exception as exc:  # the one place a stage's failure is contained
            log.debug("request %d failed", rid, exc_info=True)
            self._fail(rid, meta, type(exc).__name__, str(exc))

    def _finish_run(self, rid: int, result: Any, meta: dict[str, Any], start: float) -> None:
        notes = {}
        if isinstance(result, Outcome):
            notes = {f"{key}:{self.name}": value for key, value in result.notes.items()}
            result = result.outputs
        outputs = normalise_outputs(self.name, result, [p for p, _ in self.plan.outputs],
                                    allow_missing=self.stage.may_skip_outputs)
        end = time.monotonic()
        meta = {**meta, **notes, f"t:{self.name}": [start, end]}
        self._send_all(rid, {tensor: outputs[port] for port, tensor in self.plan.outputs if port in outputs}, meta)
        self.counts["processed"] += 1
        if self.measured_at is not None and end - self.measured_at > _STALE_S:
            self.service = Ewma(0.2)  # the old figure is stale (the policy sent work elsewhere): start afresh
        self.service.add(end - start)
        self.measured_at = end

    def _publish(self) -> None:
        """Publish this stage's figures: within 2 ms of a change in its counts, and at least every 50 ms."""
        if self.board is None:
            return
        now = time.monotonic()
        done = self.counts["processed"] + self.counts["failed"]
        since = now - self.published_at
        if since < 0.002 or (done == self.published_done and since < 0.05):
            return
        self.published_at, self.published_done = now, done
        self.board.publish(self.name, {"pid": os.getpid(), "processed": self.counts["processed"],
                                       "failed": self.counts["failed"],
                                       "service_s": self.service.mean, "measured_at": self.measured_at,
                                       "running": len(self.running), **self.stage.signals()})

    def _async_done(self, rid: int, future: Future) -> None:
        """Runs on whatever thread completed the future: hand it to the worker's loop."""
        self.done.put((rid, future))
        self.waker.wake()

    def _collect_async(self) -> None:
        self.waker.clear()
        while True:
            try:
                rid, future = self.done.get_nowait()
            except queue.Empty:
                return
            meta, start = self.running.pop(rid)
            try:
                self._finish_run(rid, future.result(), meta, start)
            except Exception as exc:
                self._fail(rid, meta, type(exc).__name__, str(exc))

    def _send_all(self, rid: int, by_tensor: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        """Send each consumer the tensors it reads; tensors absent from ``by_tensor`` travel as skipped.

        Every message is encoded before any is sent, so a bad output fails the request as a whole.
        """
        batches = []
        for _, sock, tensors in self.outs:
            missing = [t for t in tensors if t not in by_tensor]
            message = Message(kind=Kind.REQUEST, request_id=rid,
                              meta={**meta, SKIPPED: missing} if missing else dict(meta),
                              tensors={t: by_tensor[t] for t in tensors if t in by_tensor})
            batches.append((sock, encode(message, self.plan.limits)))
        for sock, frames in batches:
            sock.send_multipart(frames, copy=False)

    def _fail(self, rid: int, meta: Mapping[str, Any], error: str, message: str) -> None:
        del meta  # an error carries only what names the failure: bounded, whatever the request's meta held
        self.counts["failed"] += 1
        self._forward_error(rid, {"stage": self.name, "error": error, "message": message[:4000]})

    def _forward_error(self, rid: int, meta: Mapping[str, Any]) -> None:
        self.failed[rid] = None
        if len(self.failed) > _FAILED_MEMORY:
            self.failed.popitem(last=False)
        error = {k: meta[k] for k in ("stage", "error", "message") if k in meta}
        for _, sock, _ in self.outs:
            send_message(sock, Message(kind=Kind.ERROR, request_id=rid, meta=error), limits=self.plan.limits)

    def _control(self, op: str, **meta: Any) -> None:
        send_message(self.control, Message(kind=Kind.CONTROL, request_id=0,
                                           meta={"op": op, "stage": self.name, **meta}))


def normalise_outputs(stage: str, result: Any, ports: list[str], *, allow_missing: bool = False
                      ) -> dict[str, np.ndarray]:
    """Map what ``Stage.process`` returned onto output ports.

    A mapping is taken by port name; a single array fills the only port; a tuple or list fills ports in order.
    With ``allow_missing`` (routing stages), ports absent from a mapping are left out: they are skipped.
    """
    if isinstance(result, Mapping):
        if allow_missing:
            return {p: result[p] for p in ports if p in result}
        missing = [p for p in ports if p not in result]
        if missing:
            raise StageError(f"stage {stage!r} returned {sorted(result)} but the topology wires outputs {missing}",
                             stage=stage)
        return {p: result[p] for p in ports}
    if isinstance(result, (np.ndarray, np.generic)):
        if len(ports) != 1:
            raise StageError(f"stage {stage!r} returned one array but has {len(ports)} output ports {ports}; "
                             "return a dict", stage=stage)
        return {ports[0]: result}
    if isinstance(result, (tuple, list)):
        if len(result) != len(ports):
            raise StageError(f"stage {stage!r} returned {len(result)} values for {len(ports)} output ports {ports}",
                             stage=stage)
        return dict(zip(ports, result))
    raise StageError(f"stage {stage!r} returned {type(result).__name__}; expected a dict of arrays, an array, "
                     "or a tuple of arrays", stage=stage)


def _skipped(meta: Mapping[str, Any]) -> set[str]:
    value = meta.get(SKIPPED)
    if value is None:
        return set()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise FramingError(f"meta {SKIPPED!r} must be a list of tensor names, got {value!r:.80}")
    return set(value)
