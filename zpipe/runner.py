"""One stage inside a worker process: join its inputs by request id, run it, hand its outputs on, publish figures.

The worker (:mod:`zpipe.worker`) owns the sockets and the loop; it hands each message for a stage to that stage's
:class:`Runner`. A runner joins the parts of a request that come from different producers (with a deadline), runs
the stage when they are complete (or earlier, when the stage says it may: a ``select`` takes the first branch to
answer), and sends each consumer the tensors it reads. A failure travels on as an ERROR message in place of the
request, once per request. Asynchronous stages (a remote stand-in) return a Future: its completion comes back
through the worker's loop (:meth:`Runner.collect`). The runner also publishes the stage's figures on the signal
board (service time, progress, the stage's own signals), which the offload policy reads.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import os
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Hashable, Mapping

import numpy as np

from .board import Ewma
from .errors import FramingError, StageError
from .framing import Kind, Message, check_message
from .stage import Outcome, Stage, StageContext

__all__ = ["Runner", "StageSlot", "normalise_outputs", "read_only", "SKIPPED", "DEADLINE"]

log = logging.getLogger(__name__)

SKIPPED = "skipped"  # meta key: tensors of this message that the gate routed away (sent as names, not data)
DEADLINE = "deadline"  # meta key: time.monotonic() after which the request is not worth running (this host only)
_FAILED_MEMORY = 10_000  # request ids remembered as failed, so their late parts are dropped, not re-joined
_STALE_S = 1.0  # a smoothed figure not updated for this long is replaced by the next sample, not blended


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
    # A policy gate in another process reads this stage's figures from the board's file: changes to its signals
    # are published within ms. (A gate in the same process reads them from memory: zpipe.board.Board.host.)
    watched: bool = True
    # A gate's routes whose skip notice goes straight to the join of its branch (Topology.skip_shortcut):
    # (consumer, join, the join's endpoint, the join's inputs from that branch).
    skip_to: tuple[tuple[str, str, str, tuple[str, ...]], ...] = ()


class _Join:
    __slots__ = ("tensors", "skipped", "meta", "deadline", "lost", "error")

    def __init__(self, deadline: float) -> None:
        self.tensors: dict[str, np.ndarray] = {}
        self.skipped: set[str] = set()  # tensors the gate routed away from this path for this request
        self.meta: dict[str, Any] = {}
        self.deadline = deadline
        self.lost: set[str] = set()  # tensors whose producer failed (held while another branch may still answer)
        self.error: dict[str, Any] | None = None  # that failure, reported if no branch answers


class Runner:
    """One stage in a worker: joins its inputs by request id, runs it, and hands its outputs on."""

    def __init__(self, worker: Any, slot: StageSlot, stage: Stage) -> None:
        # (worker: the zpipe.worker.Worker hosting this stage; not imported here, imports flow one way)
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
        self.skip_to = {consumer: (join, endpoint, tensors) for consumer, join, endpoint, tensors in slot.skip_to}
        self.live = stage.live_signals  # publishes figures that change while idle (see Stage.live_signals)
        if self.live is None:
            self.live = type(stage).signals is not Stage.signals
        self.service = Ewma(0.2)  # smoothed processing time, published on the board
        self.measured_at: float | None = None
        self.published_at, self.published_progress = 0.0, (-1, 0, 0, 0)
        self._changes = itertools.count(1)
        self.signal_changes = 0  # set by the stage's signals_changed(), from any thread

    def signals_changed(self) -> None:
        """The stage's figures changed between requests (a stand-in's ping): publish them within a few ms if a gate
        in another process reads them (readers in this one read them from memory as they are)."""
        if self.slot.watched:
            self.signal_changes = next(self._changes)  # each call a new number (atomic), never the one published
            self.worker.waker.wake()

    def setup(self) -> None:
        joins = {port: self.moot_after[tensor] for port, tensor in self.slot.outputs
                 if self.moot_after.get(tensor) in self.worker.runners}
        self.stage.context = StageContext(name=self.name, consumers=dict(self.slot.consumers),
                                          board=self.worker.board, signals_changed=self.signals_changed,
                                          joins=joins)
        self.stage.setup()
        if self.worker.board is not None:
            self.worker.board.host(self.name, self.figures)

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
            self.worker.held.hurry(self.name, rid)  # a spare copy on its way here is the answer now
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
        self.worker.held.answered(self.name, rid)  # spare copies on their way here are moot now
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
        batch, later, told = [], [], set()
        for consumer, endpoint, tensors in self.slot.routes:
            missing = [t for t in tensors if t not in by_tensor]
            if len(missing) == len(tensors) and consumer in self.skip_to:  # a whole branch skipped: tell its join
                consumer, endpoint, tensors = self.skip_to[consumer]
                if (consumer, tensors) in told:
                    continue
                told.add((consumer, tensors))
                missing = list(tensors)
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
            seq = self.worker.held.later(delay, item)
            if join in self.worker.runners and spare is not None:
                self.worker.held.spare(join, rid, seq, self, spare, item)
            elif join in self.worker.runners:
                self.worker.held.follower(join, rid, seq, item)

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
        reads the age of the oldest request in flight) or in its signals (see StageContext.signals_changed; only
        when a gate in another process reads them); a stage with signals of its own also at least every 50 ms while
        the loop runs (every 200 ms when idle; every 100-200 ms when no gate elsewhere reads it)."""
        now = time.monotonic()
        progress = self._progress()
        since = now - self.published_at
        every = 0.05 if self.slot.watched else 0.1
        if since < 0.002 or (progress == self.published_progress and (since < every or not self.live)):
            return
        self.published_at, self.published_progress = now, progress
        self.worker.board.publish(self.name, self.figures())

    def figures(self) -> dict[str, Any]:
        """What this stage shows on the board: the worker's counts and service time, and the stage's signals."""
        return {"pid": os.getpid(), "group": self.worker.plan.group, "processed": self.counts["processed"],
                "failed": self.counts["failed"], "service_s": self.service.mean,
                "service_std_s": math.sqrt(self.service.var), "service_support": self.service.count,
                "measured_at": self.measured_at, "running": len(self.running), "withdrawn": self.counts["withdrawn"],
                "called_off": self.counts["called_off"], "parked_expired": self.counts["parked_expired"],
                "skipped": self.counts["skipped"], **self.stage.signals()}


def read_only(array: np.ndarray) -> np.ndarray:
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
