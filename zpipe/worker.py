"""One worker process hosting a group of stages: receive, join by request id, process, pass on. Sockets live here.

A group (see :mod:`zpipe.grouping`) is one or more stages of a topology run by one process. Each stage has a
runner (:mod:`zpipe.runner`) that joins its inputs, runs it and keeps its counters; outputs a stage holds back
(a gate's deferred or spare copies) wait in :mod:`zpipe.held` until due. Tensors for a stage in the same group
are handed over in memory (the arrays themselves, as read-only views: no serialization, no copy); a stage fed
from another process binds a PULL socket at its endpoint; outputs for another process (or the pipeline's sink)
leave through one PUSH socket per destination. A DEALER to the supervisor carries the READY handshake and orders.

A worker never blocks on a send. Groups can feed each other both ways (a fork's process sends to a branch in
another process, whose output comes back to the join in the first), so two workers each blocked on sending to the
other would deadlock. A message that a full link refuses waits in that destination's outbox, flushed when the
link has room; meanwhile the worker keeps reading. What bounds the queues is the pipeline's ``max_in_flight``,
and a request whose deadline passed while it waited there is dropped (the pipeline has failed it already).

The loop is the one dispatch point: a malformed message or a raising stage costs one request (an ERROR message
travels downstream in its place, naming the stage), never the worker. Before a stage runs, its name is written to
a small shared file, so that when the process dies the supervisor can tell which stage it was running.
"""

from __future__ import annotations

import collections
import logging
import math
import mmap
import os
import pickle
import queue
import signal
import sys
import time
import traceback
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cloudpickle
import zmq

from .board import Board
from .errors import FramingError
from .framing import DEFAULT_LIMITS, Kind, Limits, Message, check_message, encode
from .held import HeldCopies
from .runner import DEADLINE, SKIPPED, Runner, StageSlot, normalise_outputs, read_only
from .transport import Waker, make_socket, new_context, recv_message, send_message

__all__ = ["WorkerPlan", "StageSlot", "Worker", "main", "run_worker", "normalise_outputs", "running_stage",
           "SKIPPED", "DEADLINE"]

log = logging.getLogger(__name__)

_MARKER_BYTES = 256


@dataclass(frozen=True, kw_only=True)
class WorkerPlan:
    """Everything a worker process needs: its group's stages (in topological order) and shared settings."""

    group: str
    stages: tuple[StageSlot, ...]
    control: str  # the supervisor's ROUTER
    hwm: int
    join_timeout_s: float
    sys_path: tuple[str, ...] = ()  # the parent's import path, so dotted paths resolve the same way
    board_dir: str = ""  # this host's signal board (zpipe.board), shared by the pipeline's workers
    parent_pid: int = 0  # the worker exits when this process is gone
    limits: Limits = DEFAULT_LIMITS
    nice: int = 0  # added to the process's nice value before any stage is set up (lower CPU priority)


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
                        format=f"%(asctime)s worker[{plan.group}] %(levelname)s %(message)s")
    if plan.nice:
        os.nice(plan.nice)  # also every thread started from here on (TVM's pool): Linux nice is per thread
    Worker(plan, stopping).run()


def marker_path(board_dir: str, group: str) -> Path:
    return Path(board_dir) / f".running-{group}"


def running_stage(board_dir: str, group: str) -> str | None:
    """The stage a group's worker was running when it last wrote its marker (None: between stages, or unknown)."""
    try:
        name = marker_path(board_dir, group).read_bytes().split(b"\0", 1)[0].decode(errors="replace")
    except OSError:
        return None
    return name or None


class _Marker:
    """Which stage this process is running, in a file the supervisor reads when the process dies (mmap: ~1 us)."""

    def __init__(self, path: Path) -> None:
        with open(path, "wb+") as f:
            f.truncate(_MARKER_BYTES)
            self._map = mmap.mmap(f.fileno(), _MARKER_BYTES)

    def set(self, name: str) -> None:
        data = name.encode()[:_MARKER_BYTES - 1]
        self._map[:len(data) + 1] = data + b"\0"

    def clear(self) -> None:
        self._map[0:1] = b"\0"


class Worker:
    """The process: sockets, the in-memory hand-off queue, and the loop that drives every runner."""

    def __init__(self, plan: WorkerPlan, stopping: list) -> None:
        self.plan = plan
        self.stopping = stopping
        self.runners: dict[str, Runner] = {}
        self.local: collections.deque[tuple[Runner, Message]] = collections.deque()  # in-group hand-offs
        self.pulls: dict[zmq.Socket, Runner] = {}
        self.pushes: dict[str, zmq.Socket] = {}  # destination endpoint -> socket
        self.outboxes: dict[str, collections.deque] = {}  # destination -> (deadline, frames) its full link refused
        self.board: Board | None = None
        self.marker: _Marker | None = None
        # Asynchronous stages (a remote stand-in) return a Future from handle(); their completions come back
        # through this queue and self-pipe, so only this thread touches the sockets.
        self.done: queue.SimpleQueue = queue.SimpleQueue()
        self.waker = Waker()
        self.held = HeldCopies(self.deliver)  # outputs a stage deferred (Outcome.defer): spares, followers

    def run(self) -> None:
        plan = self.plan
        ctx = new_context()
        self.control = make_socket(ctx, zmq.DEALER, hwm=1000, identity=plan.group.encode())
        self.control.connect(plan.control)
        current = None
        try:
            if plan.board_dir:
                self.board = Board(plan.board_dir)
                self.marker = _Marker(marker_path(plan.board_dir, plan.group))
            for slot in plan.stages:
                current = slot.name
                self.runners[slot.name] = Runner(self, slot, cloudpickle.loads(slot.stage_blob))
            for runner in self.runners.values():
                current = runner.name
                if runner.slot.endpoint:
                    sock = make_socket(ctx, zmq.PULL, hwm=plan.hwm)
                    sock.bind(runner.slot.endpoint)
                    self.pulls[sock] = runner
                destinations = [(consumer, endpoint) for consumer, endpoint, _ in runner.slot.routes]
                destinations += [(join, endpoint) for _, join, endpoint, _ in runner.slot.skip_to]
                for consumer, endpoint in destinations:
                    if consumer not in self.runners and endpoint not in self.pushes:
                        sock = make_socket(ctx, zmq.PUSH, hwm=plan.hwm)
                        sock.connect(endpoint)
                        self.pushes[endpoint] = sock
                        self.outboxes[endpoint] = collections.deque()
            for runner in self.runners.values():
                current = runner.name
                if self.marker is not None:
                    self.marker.set(runner.name)  # a native crash in setup() names the stage too
                runner.setup()
            if self.marker is not None:
                self.marker.clear()
        except Exception as exc:
            log.exception("setup of stage %r failed", current)
            self._control("failed", stage=current, error=type(exc).__name__, message=str(exc)[:4000],
                          traceback=traceback.format_exc()[-8000:])
            self.control.close(linger=2000)  # let the report leave before the context goes
            ctx.destroy(linger=0)
            raise SystemExit(2)
        self._control("ready", pid=os.getpid(), stages=list(self.runners))
        try:
            self._loop()
        finally:
            for runner in reversed(self.runners.values()):
                try:
                    runner.stage.teardown()
                except Exception:
                    log.exception("teardown of stage %r failed", runner.name)
            ctx.destroy(linger=0)

    def _loop(self) -> None:
        poller = zmq.Poller()
        reading = dict.fromkeys(self.pulls, True)
        for sock in self.pulls:
            poller.register(sock, zmq.POLLIN)
        poller.register(self.control, zmq.POLLIN)
        poller.register(self.waker.fd, zmq.POLLIN)
        writing = dict.fromkeys(self.pushes, False)
        for sock in self.pushes.values():
            poller.register(sock, 0)
        while not self.stopping:
            for sock, runner in self.pulls.items():  # backpressure: stop taking work while a stage is saturated
                if reading[sock] != runner.has_room():
                    reading[sock] = not reading[sock]
                    poller.modify(sock, zmq.POLLIN if reading[sock] else 0)
            for endpoint, box in self.outboxes.items():  # wait for room only where messages wait
                if writing[endpoint] != bool(box):
                    writing[endpoint] = bool(box)
                    poller.modify(self.pushes[endpoint], zmq.POLLOUT if box else 0)
            if self.plan.parent_pid and os.getppid() != self.plan.parent_pid:  # orphaned
                log.error("parent process %d is gone; exiting", self.plan.parent_pid)
                return
            events = dict(poller.poll(self._timeout_ms()))
            try:  # the one dispatch point: nothing a message or a stage does may end the worker
                if self.control in events and self._on_control():
                    return
                if self.waker.fd in events:
                    self._collect_async()
                for endpoint, sock in self.pushes.items():
                    if sock in events:
                        self._flush(endpoint)
                for sock, runner in self.pulls.items():
                    if sock in events:
                        for _ in range(100):  # drain a burst, but keep serving control and deadlines
                            if not self._receive(sock, runner):
                                break
                            self._drain_local()
                            self._publish()  # a long burst must not leave the board stale
                self.held.release()
                self._drain_local()
                for runner in self.runners.values():
                    runner.expire_joins()
                self._drain_local()
                self._publish()
            except Exception:
                log.exception("error while handling a message; the worker carries on")

    def _timeout_ms(self) -> int:
        if self.local:
            return 0
        timeout_ms = 200
        if self.board is not None:
            if any(r.unpublished() for r in self.runners.values()):
                timeout_ms = 3  # a change waits to be published
        now = time.monotonic()
        due = self.held.next_due()
        if due is not None:
            timeout_ms = max(0, min(timeout_ms, int((due - now) * 1000) + 1))
        for runner in self.runners.values():
            if runner.joins:
                first = next(iter(runner.joins.values()))
                timeout_ms = max(0, min(timeout_ms, int((first.deadline - now) * 1000) + 1))
        return timeout_ms

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

    def _receive(self, sock: zmq.Socket, runner: Runner) -> bool:
        """Handle one message from a stage's socket; False when none was waiting."""
        try:
            _, msg = recv_message(sock, flags=zmq.NOBLOCK, limits=self.plan.limits)
        except zmq.Again:
            return False
        except FramingError as exc:
            runner.counts["malformed"] += 1
            log.warning("stage %r dropped a malformed message: %s", runner.name, exc)
            return True
        runner.on_message(msg)
        return True

    def _drain_local(self) -> None:
        while self.local:
            runner, msg = self.local.popleft()
            if msg.kind == Kind.REQUEST and not runner.has_room():
                runner.parked.append(msg)  # an asynchronous stage at its max_in_flight: released by collect()
                continue
            runner.on_message(msg)

    def _publish(self) -> None:
        if self.board is not None:
            for runner in self.runners.values():
                runner.publish()

    def _collect_async(self) -> None:
        self.waker.clear()
        while True:
            try:
                runner, rid, future = self.done.get_nowait()
            except queue.Empty:
                break
            try:
                runner.collect(rid, future)
                while runner.parked and runner.has_room():
                    runner.on_message(runner.parked.popleft())
            except Exception:
                log.exception("stage %r: error while finishing request %d", runner.name, rid)
        self._drain_local()

    def async_done(self, runner: Runner, rid: int, future: Future) -> None:
        """Runs on whatever thread completed the future: hand it to the worker's loop."""
        self.done.put((runner, rid, future))
        self.waker.wake()

    def deliver(self, batch: list[tuple[str, str, Message]]) -> None:
        """Pass (consumer, endpoint, message) on: in memory within the group, else encoded onto a socket.

        Every message is checked (and encoded) before any is delivered, so a bad output fails the request as a
        whole, whichever way it travels. Stages that answer asynchronously (remote stand-ins) go first, so that
        an offloaded branch is on its way before a local one occupies this process.
        """
        in_memory: list[tuple[Runner, Message]] = []
        outbound: list[tuple[str, tuple[float, list]]] = []
        for consumer, endpoint, message in batch:
            runner = self.runners.get(consumer)
            if runner is None:
                deadline = message.meta.get(DEADLINE)
                deadline = deadline if isinstance(deadline, (int, float)) else math.inf
                outbound.append((endpoint, (deadline, encode(message, self.plan.limits))))
                continue
            tensors = check_message(message, self.plan.limits)
            in_memory.append((runner, Message(kind=message.kind, request_id=message.request_id, meta=message.meta,
                                              tensors={n: read_only(a) for n, a in tensors.items()})))
        in_memory.sort(key=lambda item: not item[0].is_async)  # stable: asynchronous stages first
        self.local.extend(in_memory)
        for endpoint, entry in outbound:
            box = self.outboxes[endpoint]
            if not box:  # nothing waiting: send now, whatever its deadline (the pipeline counts late replies)
                try:
                    self.pushes[endpoint].send_multipart(entry[1], copy=False, flags=zmq.NOBLOCK)
                    continue
                except zmq.Again:
                    pass
            box.append(entry)

    def _flush(self, endpoint: str) -> None:
        """Send what waits for ``endpoint`` until its link is full (never blocks); drop what waited too long."""
        box, sock = self.outboxes[endpoint], self.pushes[endpoint]
        now = time.monotonic()
        while box:
            deadline, frames = box[0]
            if deadline < now:  # waited past its deadline: the pipeline has failed that request already
                box.popleft()
                continue
            try:
                sock.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            box.popleft()

    def _control(self, op: str, **meta: Any) -> None:
        send_message(self.control, Message(kind=Kind.CONTROL, request_id=0,
                                           meta={"op": op, "group": self.plan.group, **meta}))

