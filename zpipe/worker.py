"""One worker process hosting a group of stages: receive, join by request id, process, pass on. Sockets live here.

A group (see :mod:`zpipe.grouping`) is one or more stages of a topology run by one process. Each stage has a
runner that holds its joins and counters. Tensors for a stage in the same group are handed over in memory (the
arrays themselves, as read-only views: no serialization, no copy); a stage fed from another process binds a PULL
socket at its endpoint; outputs for another process (or the pipeline's sink) leave through one PUSH socket per
destination. A DEALER to the supervisor carries the READY handshake and orders.

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
import heapq
import itertools
import logging
import math
import mmap
import numbers
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
from typing import Any, Hashable, Mapping

import cloudpickle
import numpy as np
import zmq

from .board import Board, Ewma
from .errors import FramingError, StageError
from .framing import DEFAULT_LIMITS, Kind, Limits, Message, check_message, encode
from .stage import Outcome, Stage, StageContext
from .transport import Waker, make_socket, new_context, recv_message, send_message

__all__ = ["WorkerPlan", "StageSlot", "main", "run_worker", "normalise_outputs", "running_stage", "SKIPPED",
           "DEADLINE"]

log = logging.getLogger(__name__)

SKIPPED = "skipped"  # meta key: tensors of this message that the gate routed away (sent as names, not data)
DEADLINE = "deadline"  # meta key: time.monotonic() after which the request is not worth running (this host only)
_FAILED_MEMORY = 10_000  # request ids remembered as failed, so their late parts are dropped, not re-joined
_STALE_S = 1.0  # a smoothed figure not updated for this long is replaced by the next sample, not blended
_MARKER_BYTES = 256


@dataclass(frozen=True, kw_only=True)
class StageSlot:
    """One stage of a worker's group, as plain picklable values (endpoints, not sockets)."""

    name: str
    stage_blob: bytes  # cloudpickle of the configured Stage; built by our own parent, never read from a socket
    inputs: tuple[tuple[str, str], ...]  # (port, tensor)
    outputs: tuple[tuple[str, str], ...]
    endpoint: str  # where its PULL binds; "" when every producer is in the same group (inputs arrive in memory)
    routes: tuple[tuple[str, str, tuple[str, ...]], ...]  # (consumer, endpoint, tensors it needs)
    consumers: tuple[tuple[str, tuple[str, ...]], ...] = ()  # output port -> stages reading it
    joins: tuple[tuple[str, str], ...] = ()  # output tensor -> the stage that makes a held copy moot (Topology.join_of)


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
    _Worker(plan, stopping).run()


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


class _Join:
    __slots__ = ("tensors", "skipped", "meta", "deadline", "lost", "error")

    def __init__(self, deadline: float) -> None:
        self.tensors: dict[str, np.ndarray] = {}
        self.skipped: set[str] = set()  # tensors the gate routed away from this path for this request
        self.meta: dict[str, Any] = {}
        self.deadline = deadline
        self.lost: set[str] = set()  # tensors whose producer failed (held while another branch may still answer)
        self.error: dict[str, Any] | None = None  # that failure, reported if no branch answers


class _Worker:
    """The process: sockets, the in-memory hand-off queue, and the loop that drives every runner."""

    def __init__(self, plan: WorkerPlan, stopping: list) -> None:
        self.plan = plan
        self.stopping = stopping
        self.runners: dict[str, _Runner] = {}
        self.local: collections.deque[tuple[_Runner, Message]] = collections.deque()  # in-group hand-offs
        self.pulls: dict[zmq.Socket, _Runner] = {}
        self.pushes: dict[str, zmq.Socket] = {}  # destination endpoint -> socket
        self.outboxes: dict[str, collections.deque] = {}  # destination -> (deadline, frames) its full link refused
        self.board: Board | None = None
        self.marker: _Marker | None = None
        # Asynchronous stages (a remote stand-in) return a Future from handle(); their completions come back
        # through this queue and self-pipe, so only this thread touches the sockets.
        self.done: queue.SimpleQueue = queue.SimpleQueue()
        self.waker = Waker()
        self.held: list[tuple[float, int, tuple[str, str, Message]]] = []  # heap: (release time, seq, delivery)
        self._held_seq = itertools.count()
        # Held spare copies (Outcome.spare) and the stage in this process that makes them moot once it ran for the
        # request: (that stage, request id) -> their seqs; seq -> (that key, the stage that held it, its token, the
        # delivery). Spares their stage called off when due wait in `parked` for the answer (dropped then) or for
        # the other branch's failure (sent then).
        self.spares: dict[tuple[str, int], list[int]] = {}
        self.spare_of: dict[int, tuple[tuple[str, int], _Runner, Hashable, tuple[str, str, Message]]] = {}
        self.parked: dict[tuple[str, int], list[tuple[_Runner, Hashable, tuple[str, str, Message]]]] = {}
        # (request deadline, key): a parked spare whose request's deadline passed is dropped (the pipeline failed
        # that request; its other branch may never report, e.g. when the worker it ran in was killed).
        self.parked_until: list[tuple[float, tuple[str, int]]] = []
        self.dropped: set[int] = set()  # seqs of held copies withdrawn or sent early: skipped when due
        # Held copies that leave as soon as their request is answered (Outcome.after_answer), keyed the same way.
        self.followers: dict[tuple[str, int], list[int]] = {}
        self.follower_item: dict[int, tuple[tuple[str, int], tuple[str, str, Message]]] = {}

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
                self.runners[slot.name] = _Runner(self, slot, cloudpickle.loads(slot.stage_blob))
            for runner in self.runners.values():
                current = runner.name
                if runner.slot.endpoint:
                    sock = make_socket(ctx, zmq.PULL, hwm=plan.hwm)
                    sock.bind(runner.slot.endpoint)
                    self.pulls[sock] = runner
                for consumer, endpoint, _ in runner.slot.routes:
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
                self._release_held()
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
        for heap in (self.held, self.parked_until):
            if heap:
                timeout_ms = max(0, min(timeout_ms, int((heap[0][0] - now) * 1000) + 1))
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

    def _receive(self, sock: zmq.Socket, runner: "_Runner") -> bool:
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

    def async_done(self, runner: "_Runner", rid: int, future: Future) -> None:
        """Runs on whatever thread completed the future: hand it to the worker's loop."""
        self.done.put((runner, rid, future))
        self.waker.wake()

    def deliver_later(self, delay_s: float, item: tuple[str, str, Message]) -> int:
        """:meth:`deliver` ``item`` in ``delay_s`` seconds (from the loop: see _release_held); returns its seq."""
        seq = next(self._held_seq)
        heapq.heappush(self.held, (time.monotonic() + delay_s, seq, item))
        return seq

    def hold_spare(self, join: str, rid: int, seq: int, producer: "_Runner", token: Hashable,
                   item: tuple[str, str, Message]) -> None:
        """Held copy ``seq`` (``item``) of request ``rid`` is a spare: withdrawn if stage ``join`` runs for the
        request first."""
        self.spares.setdefault((join, rid), []).append(seq)
        self.spare_of[seq] = ((join, rid), producer, token, item)

    def hold_follower(self, join: str, rid: int, seq: int, item: tuple[str, str, Message]) -> None:
        """Held copy ``seq`` (``item``) of request ``rid`` leaves as soon as stage ``join`` runs for it, if that
        comes before it is due."""
        self.followers.setdefault((join, rid), []).append(seq)
        self.follower_item[seq] = ((join, rid), item)

    def hurry(self, join: str, rid: int) -> None:
        """Stage ``join`` holds a branch's failure of request ``rid`` while another branch may still answer: the
        copies held for it are that answer now. They leave at once (spares are spares no longer)."""
        for seq in self.spares.pop((join, rid), ()):
            self._send_now(seq, self.spare_of.pop(seq)[3])
        for _, _, item in self.parked.pop((join, rid), ()):
            heapq.heappush(self.held, (time.monotonic(), next(self._held_seq), item))
        self._send_followers(join, rid)

    def answered(self, join: str, rid: int) -> None:
        """Stage ``join`` ran for request ``rid`` before all its inputs came: the spare copies held for it are moot.
        Drop them unsent, count them, and tell each stage that held one (once per copy, however many messages).
        Copies that wait for the answer (Outcome.after_answer) leave now."""
        self._withdraw(self.spares.pop((join, rid), ()))
        self._tell_withdrawn([(producer, token) for producer, token, _ in self.parked.pop((join, rid), ())])
        self._send_followers(join, rid)

    def _send_followers(self, join: str, rid: int) -> None:
        for seq in self.followers.pop((join, rid), ()):
            self._send_now(seq, self.follower_item.pop(seq)[1])

    def _hold_longer(self, key: tuple[str, int], due: int, until: float) -> None:
        """Spare ``key`` (its copy ``due`` just taken off the heap) waits until ``until``: each of its copies goes
        back on the heap under a new seq (one still on it is skipped when it comes up)."""
        moved = []
        for seq in self.spares[key]:
            entry = self.spare_of.pop(seq)
            if seq != due:
                self.dropped.add(seq)
            moved.append(next(self._held_seq))
            self.spare_of[moved[-1]] = entry
            heapq.heappush(self.held, (until, moved[-1], entry[3]))
        self.spares[key] = moved

    def _send_now(self, seq: int, item: tuple[str, str, Message]) -> None:
        self.dropped.add(seq)
        heapq.heappush(self.held, (time.monotonic(), next(self._held_seq), item))  # (see _release_held)

    def _withdraw(self, seqs: list[int]) -> None:
        pairs = []
        for seq in seqs:
            _, producer, token, _ = self.spare_of.pop(seq)
            self.dropped.add(seq)
            pairs.append((producer, token))
        self._tell_withdrawn(pairs)

    def _tell_withdrawn(self, pairs: list[tuple["_Runner", Hashable]]) -> None:
        tokens = {(producer.name, token): producer for producer, token in pairs}
        for (_, token), producer in tokens.items():
            producer.counts["withdrawn"] += 1
            try:
                producer.stage.withdrawn(token)
            except Exception:
                log.exception("stage %r: withdrawn() raised", producer.name)

    def _release_held(self) -> None:
        now = time.monotonic()
        while self.parked_until and self.parked_until[0][0] < now:
            key = heapq.heappop(self.parked_until)[1]
            expired = self.parked.pop(key, ())  # (gone already if answered or hurried)
            if expired:
                expired[0][0].counts["parked_expired"] += 1
                self._tell_withdrawn([(producer, token) for producer, token, _ in expired])
        while self.held and self.held[0][0] <= now:
            _, seq, item = heapq.heappop(self.held)
            if seq in self.dropped:
                self.dropped.discard(seq)
                continue
            if seq in self.follower_item:  # due before its request was answered: no longer waits for that
                key = self.follower_item.pop(seq)[0]
                self.followers[key].remove(seq)
                if not self.followers[key]:
                    del self.followers[key]
            if seq in self.spare_of:  # a spare: its stage may hold it longer or call it off (Stage.spare_due)
                key, producer, token, _ = self.spare_of[seq]
                try:
                    wanted = producer.stage.spare_due(token)
                except Exception:
                    log.exception("stage %r: spare_due() raised; the copy goes out", producer.name)
                    wanted = True
                if not isinstance(wanted, bool) and isinstance(wanted, numbers.Real):
                    wait = float(wanted)
                    if wait > 0 and math.isfinite(wait):  # asked again then, all of it (within an hour, >= 1 ms)
                        self._hold_longer(key, seq, now + min(max(wait, 0.001), 3600.0))
                        continue
                    wanted = True  # (0, negative, NaN, inf: no hold to wait out)
                seqs = self.spares.pop(key)
                if not wanted:  # parked: sent after all if the other branch fails (hurry), else dropped
                    producer.counts["called_off"] += 1
                    kept = []
                    for other in seqs:
                        _, other_producer, other_token, other_item = self.spare_of.pop(other)
                        if other != seq:
                            self.dropped.add(other)  # (still in the heap)
                        kept.append((other_producer, other_token, other_item))
                    self.parked[key] = kept
                    deadline = item[2].meta.get(DEADLINE)
                    if isinstance(deadline, (int, float)) and math.isfinite(deadline):
                        heapq.heappush(self.parked_until, (deadline, key))
                    continue
                for other in seqs:  # the rest of it goes out when due, as plain held messages
                    self.spare_of.pop(other)
            consumer, endpoint, message = item
            try:
                self.deliver([item])
            except Exception as exc:  # (checked when held: not expected) the consumer learns why, nothing hangs
                log.exception("held message for %r failed", consumer)
                tensors = [*message.tensors, *message.meta.get(SKIPPED, [])]
                self.deliver([(consumer, endpoint, Message(kind=Kind.ERROR, request_id=message.request_id, meta={
                    "stage": consumer, "error": type(exc).__name__, "message": str(exc)[:4000], "tensors": tensors}))])

    def deliver(self, batch: list[tuple[str, str, Message]]) -> None:
        """Pass (consumer, endpoint, message) on: in memory within the group, else encoded onto a socket.

        Every message is checked (and encoded) before any is delivered, so a bad output fails the request as a
        whole, whichever way it travels. Stages that answer asynchronously (remote stand-ins) go first, so that
        an offloaded branch is on its way before a local one occupies this process.
        """
        in_memory: list[tuple[_Runner, Message]] = []
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
                                              tensors={n: _read_only(a) for n, a in tensors.items()})))
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


class _Runner:
    """One stage in a worker: joins its inputs by request id, runs it, and hands its outputs on."""

    def __init__(self, worker: _Worker, slot: StageSlot, stage: Stage) -> None:
        self.worker = worker
        self.slot = slot
        self.name = slot.name
        self.stage = stage
        self.needed = frozenset(t for _, t in slot.inputs)
        self.joins: dict[int, _Join] = {}
        self.failed: collections.OrderedDict[int, None] = collections.OrderedDict()
        # A stage that may run before all its inputs arrived (Stage.runnable) remembers those requests, so that
        # their late parts are dropped instead of starting a new join.
        self.early = type(stage).runnable is not Stage.runnable
        self.finished: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.finished_floor = -1  # ids at most this were forgotten from `finished`: request ids only grow, and at
        # most max_in_flight are unanswered, so a part this old belongs to a request that already ran
        self.counts = collections.Counter()
        self.running: dict[int, tuple[dict[str, Any], float]] = {}  # asynchronous runs awaiting their Future
        self.parked: collections.deque[Message] = collections.deque()  # in-memory work waiting for has_room()
        self.is_async = bool(getattr(stage, "asynchronous", False))
        self.moot_after = dict(slot.joins)  # output tensor -> the stage whose early run makes a held copy moot
        self.live = type(stage).signals is not Stage.signals  # publishes figures that change while idle
        self.service = Ewma(0.2)  # smoothed processing time, published on the board
        self.measured_at: float | None = None
        self.published_at, self.published_progress = 0.0, (-1, 0, 0, 0)
        self._changes = itertools.count(1)
        self.signal_changes = 0  # set by the stage's signals_changed(), from any thread

    def signals_changed(self) -> None:
        """The stage's figures changed between requests (a stand-in's ping): publish them within a few ms."""
        self.signal_changes = next(self._changes)  # each call a new number (atomic), never the one published
        self.worker.waker.wake()

    def setup(self) -> None:
        joins = {port: self.moot_after[tensor] for port, tensor in self.slot.outputs
                 if self.moot_after.get(tensor) in self.worker.runners}
        self.stage.context = StageContext(name=self.name, consumers=dict(self.slot.consumers),
                                          board=self.worker.board, signals_changed=self.signals_changed,
                                          joins=joins)
        self.stage.setup()

    def has_room(self) -> bool:
        return len(self.running) < getattr(self.stage, "max_in_flight", 64)

    # -- joining ---------------------------------------------------------------------------------------------------
    def on_message(self, msg: Message) -> None:
        rid = msg.request_id
        if rid in self.finished or rid <= self.finished_floor:  # ran already without this part (Stage.runnable)
            self.counts["late_parts"] += 1
            return
        if msg.kind == Kind.ERROR:
            if self.early and self._hold_error(rid, msg.meta):
                return
            first_news = rid not in self.failed
            self.joins.pop(rid, None)
            if first_news:  # forward each failure once, whichever branch reports it first
                self._forward_error(rid, msg.meta)
            return
        if msg.kind != Kind.REQUEST:
            self.counts["unexpected_kind"] += 1
            log.warning("stage %r, request %d: unexpected message kind %s dropped", self.name, rid, msg.kind.name)
            return
        if rid in self.failed:
            self.counts["dropped_after_failure"] += 1
            return
        try:
            skipped = _skipped(msg.meta)
        except FramingError as exc:
            self.counts["malformed"] += 1
            log.warning("stage %r dropped a malformed message: %s", self.name, exc)
            return
        join = self.joins.get(rid)
        if join is None and self._complete(rid, msg.tensors, skipped):
            self._run(rid, msg.tensors, skipped, msg.meta)
            return
        if join is None:
            join = self.joins[rid] = _Join(time.monotonic() + self._join_timeout_s())
        join.tensors.update(msg.tensors)
        join.skipped |= skipped
        join.meta.update(msg.meta)
        if self._complete(rid, join.tensors, join.skipped):
            del self.joins[rid]
            self._run(rid, join.tensors, join.skipped, join.meta)
        elif join.error is not None and not self._may_answer(join):  # e.g. the other branch was skipped
            del self.joins[rid]
            self._forward_error(rid, join.error)

    def _hold_error(self, rid: int, error: Mapping[str, Any]) -> bool:
        """A stage that may run early (the select of a hedged gate) holds a branch's failure while another branch
        can still answer; True when held. The error names the tensors it stands in for."""
        tensors = error.get("tensors")
        if rid in self.failed or not isinstance(tensors, list):
            return False
        join = self.joins.get(rid)
        if join is None:
            join = self.joins[rid] = _Join(time.monotonic() + self._join_timeout_s())
        join.lost.update(t for t in tensors if isinstance(t, str))
        join.error = join.error or dict(error)
        if self._may_answer(join):
            self.worker.hurry(self.name, rid)  # a spare copy on its way here is the answer now
            return True
        del self.joins[rid]
        return False

    def _may_answer(self, join: _Join) -> bool:
        """Whether the tensors that may still arrive (none lost, none skipped) could make the stage runnable."""
        return self._runnable({port: None if t in join.lost else t not in join.skipped for port, t in self.slot.inputs})

    def _runnable(self, arrived: Mapping[str, bool | None]) -> bool:
        """Stage.runnable; a hook that raises counts as "not yet" (the stage then waits for all its inputs)."""
        try:
            return bool(self.stage.runnable(arrived))
        except Exception:
            log.exception("stage %r: runnable() raised", self.name)
            return False

    def _complete(self, rid: int, tensors: Mapping[str, np.ndarray], skipped: set[str]) -> bool:
        """Whether request ``rid`` can run with what has arrived."""
        if self.needed <= tensors.keys() | skipped:
            return True
        if not self.early or not self._runnable(
                {port: True if t in tensors else False if t in skipped else None for port, t in self.slot.inputs}):
            return False
        self.finished[rid] = None
        if len(self.finished) > _FAILED_MEMORY:
            self.finished_floor = max(self.finished_floor, self.finished.popitem(last=False)[0])
        self.worker.answered(self.name, rid)  # spare copies on their way here are moot now
        return True

    def _join_timeout_s(self) -> float:
        own = getattr(self.stage, "join_timeout_s", None)
        return own if own is not None else self.worker.plan.join_timeout_s

    def expire_joins(self) -> None:
        now = time.monotonic()
        while self.joins:
            rid, join = next(iter(self.joins.items()))
            if join.deadline > now:
                return
            del self.joins[rid]
            if join.error is not None:  # a branch failed and no other answered in time: report that failure
                self._forward_error(rid, join.error)
                continue
            missing = sorted(self.needed - join.tensors.keys())
            self.counts["join_timeouts"] += 1
            self._fail(rid, "PeerTimeout", f"stage {self.name!r} waited {self._join_timeout_s():g}s for tensors "
                       f"{missing} of request {rid} (got {sorted(join.tensors)})")

    # -- running ---------------------------------------------------------------------------------------------------
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
            self._fail(rid, "PeerTimeout", f"request {rid} reached stage {self.name!r} "
                       f"{(start - deadline) * 1000:.1f} ms after its deadline; not run")
            return
        marker = self.worker.marker
        try:
            if skipped_in and not self.stage.accepts_skipped:
                raise StageError(f"stage {self.name!r} got inputs {sorted(self.needed - skipped_in)} but "
                                 f"{sorted(skipped_in)} were skipped by a gate; join gated branches with a "
                                 "merge of op 'select'", stage=self.name)
            inputs = {port: tensors.get(tensor) for port, tensor in self.slot.inputs}
            if marker is not None:
                marker.set(self.name)
            try:
                result = self.stage.handle(inputs, meta)
            finally:
                if marker is not None:
                    marker.clear()
            if isinstance(result, Future):  # finished later, by collect()
                self.running[rid] = (meta, start)
                result.add_done_callback(lambda f, rid=rid: self.worker.async_done(self, rid, f))
                return
            self._finish_run(rid, result, meta, start)
        except Exception as exc:  # the one place a stage's failure is contained
            log.debug("stage %r: request %d failed", self.name, rid, exc_info=True)
            self._fail(rid, type(exc).__name__, str(exc))

    def collect(self, rid: int, future: Future) -> None:
        meta, start = self.running.pop(rid)
        try:
            self._finish_run(rid, future.result(), meta, start)
        except Exception as exc:
            self._fail(rid, type(exc).__name__, str(exc))

    def _finish_run(self, rid: int, result: Any, meta: dict[str, Any], start: float) -> None:
        notes, defer, spare, after_answer = {}, {}, None, False
        if isinstance(result, Outcome):
            notes = {f"{key}:{self.name}": value for key, value in result.notes.items()}
            defer = {tensor: result.defer[port] for port, tensor in self.slot.outputs if port in result.defer}
            spare, after_answer = result.spare, result.after_answer
            result = result.outputs
        outputs = normalise_outputs(self.name, result, [p for p, _ in self.slot.outputs],
                                    allow_missing=self.stage.may_skip_outputs)
        end = time.monotonic()
        meta = {**meta, **notes, f"t:{self.name}": [start, end]}
        self._send_all(rid, {tensor: outputs[port] for port, tensor in self.slot.outputs if port in outputs}, meta,
                       defer, spare, after_answer)
        self.counts["processed"] += 1
        if self.measured_at is not None and end - self.measured_at > _STALE_S:
            self.service = Ewma(0.2)  # the old figure is stale (the policy sent work elsewhere): start afresh
        self.service.add(end - start)
        self.measured_at = end

    def _send_all(self, rid: int, by_tensor: Mapping[str, np.ndarray], meta: Mapping[str, Any],
                  defer: Mapping[str, float] | None = None, spare: Hashable | None = None,
                  after_answer: bool = False) -> None:
        """Send each consumer the tensors it reads; tensors absent from ``by_tensor`` travel as skipped. A consumer
        reading a tensor in ``defer`` gets its message that many seconds later; with ``spare``, those messages are
        withdrawn if the one stage they all lead to (Topology.join_of) runs in this process and runs for the
        request first; with ``after_answer``, they leave then."""
        batch, later = [], []
        for consumer, endpoint, tensors in self.slot.routes:
            missing = [t for t in tensors if t not in by_tensor]
            item = (consumer, endpoint, Message(
                kind=Kind.REQUEST, request_id=rid, meta={**meta, SKIPPED: missing} if missing else dict(meta),
                tensors={t: by_tensor[t] for t in tensors if t in by_tensor}))
            delay = max((defer.get(t, 0.0) for t in tensors), default=0.0) if defer else 0.0
            (later if delay > 0 else batch).append((delay, item))
        for _, (_, _, message) in later:  # checked now: a bad output fails the request as a whole, here
            check_message(message, self.worker.plan.limits)
        self.worker.deliver([item for _, item in batch])
        joins = {self.moot_after.get(t) for _, (_, _, message) in later for t in message.tensors}
        join = joins.pop() if (spare is not None or after_answer) and len(joins) == 1 else None
        for delay, item in later:
            seq = self.worker.deliver_later(delay, item)
            if join in self.worker.runners and spare is not None:
                self.worker.hold_spare(join, rid, seq, self, spare, item)
            elif join in self.worker.runners:
                self.worker.hold_follower(join, rid, seq, item)

    def _fail(self, rid: int, error: str, message: str) -> None:
        # An error carries only what names the failure: bounded, whatever the request's meta held.
        self.counts["failed"] += 1
        self._forward_error(rid, {"stage": self.name, "error": error, "message": message[:4000]})

    def _forward_error(self, rid: int, meta: Mapping[str, Any]) -> None:
        self.failed[rid] = None
        if len(self.failed) > _FAILED_MEMORY:
            self.failed.popitem(last=False)
        error = {k: meta[k] for k in ("stage", "error", "message") if k in meta}
        # Each consumer learns which of its tensors the failure stands in for (a select may wait for another branch).
        self.worker.deliver([(consumer, endpoint, Message(kind=Kind.ERROR, request_id=rid,
                                                          meta={**error, "tensors": list(tensors)}))
                             for consumer, endpoint, tensors in self.slot.routes])

    # -- the signal board ------------------------------------------------------------------------------------------
    def _progress(self) -> tuple[int, int, int, int]:
        return (self.counts["processed"] + self.counts["failed"], len(self.running), self.signal_changes,
                self.counts["withdrawn"])

    def unpublished(self) -> bool:
        return self._progress() != self.published_progress

    def publish(self) -> None:
        """Publish this stage's figures within 2 ms of a change in its counts, in what it has running (a policy
        reads the age of the oldest request in flight) or in its signals (see StageContext.signals_changed); a stage
        with signals of its own also at least every 50 ms while the loop runs (every 200 ms when idle)."""
        now = time.monotonic()
        progress = self._progress()
        since = now - self.published_at
        if since < 0.002 or (progress == self.published_progress and (since < 0.05 or not self.live)):
            return
        self.published_at, self.published_progress = now, progress
        self.worker.board.publish(self.name, {
            "pid": os.getpid(), "group": self.worker.plan.group, "processed": self.counts["processed"],
            "failed": self.counts["failed"], "service_s": self.service.mean,
            "service_std_s": math.sqrt(self.service.var), "service_support": self.service.count,
            "measured_at": self.measured_at,
            "running": len(self.running), "withdrawn": self.counts["withdrawn"],
            "called_off": self.counts["called_off"], "parked_expired": self.counts["parked_expired"],
            **self.stage.signals()})


def _read_only(array: np.ndarray) -> np.ndarray:
    """A view the consumer cannot write through: stages in one group share the producer's arrays."""
    if not array.flags.writeable:
        return array
    view = array.view()
    view.flags.writeable = False
    return view


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
