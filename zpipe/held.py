"""Copies a worker holds back before delivering them: deferred outputs, spare copies, and copies that follow an answer.

A stage may ask that some of its outputs leave later (:attr:`Outcome.defer`: a gate's hedged probe sends the copy
for the probed branch when the other branch's answer is due). Such a copy is one of three kinds:

- *plain*: it leaves when due;
- a *spare* (:attr:`Outcome.spare`): withdrawn unsent if the stage joining the branches (a ``select``,
  Topology.join_of) runs for the request first, in this process. When due, its stage may hold it longer or call it
  off (:meth:`Stage.spare_due`). A called-off spare is *parked*: sent after all if the other branch fails
  (:meth:`HeldCopies.hurry`), dropped when the answer comes or at its request's deadline;
- a *follower* (:attr:`Outcome.after_answer`): leaves when due, or as soon as the request is answered if that comes
  first (a probe's copy that measures a side without competing with the answer for the device's CPU).

Everything here runs on the worker's loop thread: :meth:`HeldCopies.release` is called by the loop, and due copies
go out through the worker's ``deliver``. A copy is identified by a sequence number; one withdrawn or sent early
stays in the heap and is skipped when it comes up.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import numbers
import time
from typing import Any, Callable, Hashable

from .framing import Kind, Message
from .runner import DEADLINE, SKIPPED

__all__ = ["HeldCopies"]

log = logging.getLogger(__name__)

Item = tuple[str, str, Message]  # (consumer, endpoint, message): one delivery
Key = tuple[str, int]  # (the stage whose run for the request makes the copy moot, request id)


class HeldCopies:
    """The held copies of one worker. ``producer`` arguments are the worker's runners (``name``, ``stage``,
    ``counts``): the stage that held a spare is asked about it when due and told when it is withdrawn."""

    def __init__(self, deliver: Callable[[list[Item]], None]) -> None:
        self._deliver = deliver
        self._heap: list[tuple[float, int, Item]] = []  # (release time, seq, delivery)
        self._seq = itertools.count()
        self._dropped: set[int] = set()  # seqs withdrawn or sent early: skipped when they come up
        # Spares: key -> their seqs; seq -> (key, the stage that held it, its token, the delivery).
        self._spares: dict[Key, list[int]] = {}
        self._spare_of: dict[int, tuple[Key, Any, Hashable, Item]] = {}
        # Spares called off when due wait here for the answer (dropped then) or the other branch's failure (sent).
        self._parked: dict[Key, list[tuple[Any, Hashable, Item]]] = {}
        # (request deadline, key): a parked spare whose request's deadline passed is dropped (the pipeline failed
        # that request; its other branch may never report, e.g. when the worker it ran in was killed).
        self._parked_until: list[tuple[float, Key]] = []
        self._followers: dict[Key, list[int]] = {}
        self._follower_item: dict[int, tuple[Key, Item]] = {}

    def next_due(self) -> float | None:
        """When :meth:`release` has something to do next (time.monotonic()), or None."""
        times = [heap[0][0] for heap in (self._heap, self._parked_until) if heap]
        return min(times) if times else None

    def later(self, delay_s: float, item: Item) -> int:
        """Deliver ``item`` in ``delay_s`` seconds; returns its seq."""
        seq = next(self._seq)
        heapq.heappush(self._heap, (time.monotonic() + delay_s, seq, item))
        return seq

    def spare(self, join: str, rid: int, seq: int, producer: Any, token: Hashable, item: Item) -> None:
        """Held copy ``seq`` (``item``) of request ``rid`` is a spare: withdrawn if stage ``join`` runs for the
        request first."""
        self._spares.setdefault((join, rid), []).append(seq)
        self._spare_of[seq] = ((join, rid), producer, token, item)

    def follower(self, join: str, rid: int, seq: int, item: Item) -> None:
        """Held copy ``seq`` (``item``) of request ``rid`` leaves as soon as stage ``join`` runs for it, if that
        comes before it is due."""
        self._followers.setdefault((join, rid), []).append(seq)
        self._follower_item[seq] = ((join, rid), item)

    def hurry(self, join: str, rid: int) -> None:
        """Stage ``join`` holds a branch's failure of request ``rid`` while another branch may still answer: the
        copies held for it are that answer now. They leave at once (spares are spares no longer)."""
        for seq in self._spares.pop((join, rid), ()):
            self._send_now(seq, self._spare_of.pop(seq)[3])
        for _, _, item in self._parked.pop((join, rid), ()):
            heapq.heappush(self._heap, (time.monotonic(), next(self._seq), item))
        self._send_followers(join, rid)

    def answered(self, join: str, rid: int) -> None:
        """Stage ``join`` ran for request ``rid`` before all its inputs came: the spare copies held for it are moot.
        Drop them unsent, count them, and tell each stage that held one (once per copy, however many messages).
        Copies that wait for the answer leave now."""
        pairs = []
        for seq in self._spares.pop((join, rid), ()):
            _, producer, token, _ = self._spare_of.pop(seq)
            self._dropped.add(seq)
            pairs.append((producer, token))
        self._tell_withdrawn(pairs)
        self._tell_withdrawn([(producer, token) for producer, token, _ in self._parked.pop((join, rid), ())])
        self._send_followers(join, rid)

    def release(self) -> None:
        """Deliver what is due; ask each due spare's stage whether it goes (see Stage.spare_due); drop parked
        spares whose request's deadline passed."""
        now = time.monotonic()
        while self._parked_until and self._parked_until[0][0] < now:
            key = heapq.heappop(self._parked_until)[1]
            expired = self._parked.pop(key, ())  # (gone already if answered or hurried)
            if expired:
                expired[0][0].counts["parked_expired"] += 1
                self._tell_withdrawn([(producer, token) for producer, token, _ in expired])
        while self._heap and self._heap[0][0] <= now:
            _, seq, item = heapq.heappop(self._heap)
            if seq in self._dropped:
                self._dropped.discard(seq)
                continue
            if seq in self._follower_item:  # due before its request was answered: no longer waits for that
                key = self._follower_item.pop(seq)[0]
                self._followers[key].remove(seq)
                if not self._followers[key]:
                    del self._followers[key]
            if seq in self._spare_of and not self._spare_goes(seq, item, now):
                continue
            self._send(item)

    def _spare_goes(self, seq: int, item: Item, now: float) -> bool:
        """Spare ``seq`` is due: whether it leaves now (with the rest of its copies, as plain held messages), else
        it was held longer or parked."""
        key, producer, token, _ = self._spare_of[seq]
        try:
            wanted = producer.stage.spare_due(token)
        except Exception:
            log.exception("stage %r: spare_due() raised; the copy goes out", producer.name)
            wanted = True
        if not isinstance(wanted, bool) and isinstance(wanted, numbers.Real):
            wait = float(wanted)
            if wait > 0 and math.isfinite(wait):  # asked again then, all of it (within an hour, >= 1 ms)
                self._hold_longer(key, seq, now + min(max(wait, 0.001), 3600.0))
                return False
            wanted = True  # (0, negative, NaN, inf: no hold to wait out)
        seqs = self._spares.pop(key)
        if wanted:
            for other in seqs:
                self._spare_of.pop(other)
            return True
        producer.counts["called_off"] += 1  # parked: sent after all if the other branch fails, else dropped
        kept = []
        for other in seqs:
            _, other_producer, other_token, other_item = self._spare_of.pop(other)
            if other != seq:
                self._dropped.add(other)  # (still in the heap)
            kept.append((other_producer, other_token, other_item))
        self._parked[key] = kept
        deadline = item[2].meta.get(DEADLINE)
        if isinstance(deadline, (int, float)) and math.isfinite(deadline):
            heapq.heappush(self._parked_until, (deadline, key))
        return False

    def _send(self, item: Item) -> None:
        consumer, endpoint, message = item
        try:
            self._deliver([item])
        except Exception as exc:  # (checked when held: not expected) the consumer learns why, nothing hangs
            log.exception("held message for %r failed", consumer)
            tensors = [*message.tensors, *message.meta.get(SKIPPED, [])]
            self._deliver([(consumer, endpoint, Message(kind=Kind.ERROR, request_id=message.request_id, meta={
                "stage": consumer, "error": type(exc).__name__, "message": str(exc)[:4000], "tensors": tensors}))])

    def _send_followers(self, join: str, rid: int) -> None:
        for seq in self._followers.pop((join, rid), ()):
            self._send_now(seq, self._follower_item.pop(seq)[1])

    def _hold_longer(self, key: Key, due: int, until: float) -> None:
        """Spare ``key`` (its copy ``due`` just taken off the heap) waits until ``until``: each of its copies goes
        back on the heap under a new seq (one still on it is skipped when it comes up)."""
        moved = []
        for seq in self._spares[key]:
            entry = self._spare_of.pop(seq)
            if seq != due:
                self._dropped.add(seq)
            moved.append(next(self._seq))
            self._spare_of[moved[-1]] = entry
            heapq.heappush(self._heap, (until, moved[-1], entry[3]))
        self._spares[key] = moved

    def _send_now(self, seq: int, item: Item) -> None:
        self._dropped.add(seq)
        heapq.heappush(self._heap, (time.monotonic(), next(self._seq), item))  # (sent by the next release)

    @staticmethod
    def _tell_withdrawn(pairs: list[tuple[Any, Hashable]]) -> None:
        tokens = {(producer.name, token): producer for producer, token in pairs}
        for (_, token), producer in tokens.items():
            producer.counts["withdrawn"] += 1
            try:
                producer.stage.withdrawn(token)
            except Exception:
                log.exception("stage %r: withdrawn() raised", producer.name)
