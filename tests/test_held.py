"""The copies a worker holds back (zpipe.held): deferred, spare, parked and follower copies, on real timers.

The pipeline-level behaviour (a gate's spare withdrawn when the remote answer comes, a called-off spare sent when
the other branch fails) is in test_gate.py; these pin the bookkeeping itself: each copy delivered at most once,
each stage told once per spare, nothing left behind.
"""

from __future__ import annotations

import collections
import time

import numpy as np
import pytest

from zpipe.framing import Kind, Message
from zpipe.held import HeldCopies
from zpipe.runner import DEADLINE
from zpipe.stage import Stage


class _Holder(Stage):
    """Answers spare_due() from a script of answers (True after it runs out) and records what it was told."""

    def __init__(self, answers=()) -> None:
        self.answers = list(answers)
        self.asked: list = []
        self.told: list = []

    def spare_due(self, spare):
        self.asked.append(spare)
        return self.answers.pop(0) if self.answers else True

    def withdrawn(self, spare) -> None:
        self.told.append(spare)


class _Producer:
    """What HeldCopies needs of a worker's runner: a name, its stage, its counters."""

    def __init__(self, stage: Stage) -> None:
        self.name, self.stage, self.counts = "gate", stage, collections.Counter()


def _item(rid: int, consumer: str = "local", **meta):
    return (consumer, "", Message(kind=Kind.REQUEST, request_id=rid, meta=meta,
                                  tensors={"h": np.full(4, rid, np.float32)}))


def _until(held: HeldCopies, sent: list, count: int, timeout_s: float = 2.0) -> None:
    end = time.monotonic() + timeout_s
    while len(sent) < count and time.monotonic() < end:
        held.release()
        time.sleep(0.002)


def _setup(answers=()):
    sent: list = []
    held = HeldCopies(sent.extend)
    producer = _Producer(_Holder(answers))
    return held, sent, producer


def _parked(rid: int, deadline_in_s: float, consumers=("local",)):
    """A spare of request ``rid`` (one copy per consumer) whose stage called it off when it came due."""
    held, sent, producer = _setup(answers=[False])
    items = [_item(rid, consumer, **{DEADLINE: time.monotonic() + deadline_in_s}) for consumer in consumers]
    for item in items:
        held.spare("select", rid, held.later(0.01, item), producer, f"t{rid}", item)
    time.sleep(0.02)
    held.release()
    return held, sent, producer, items[0]


def test_a_deferred_copy_leaves_when_due_and_not_before():
    held, sent, _ = _setup()
    start = time.monotonic()
    held.later(0.3, _item(1))
    assert held.next_due() is not None and held.next_due() >= start + 0.3
    held.release()
    assert sent == []
    _until(held, sent, 1)
    assert time.monotonic() - start >= 0.3
    assert [m.request_id for _, _, m in sent] == [1] and held.next_due() is None


def test_a_spare_answered_first_is_withdrawn_unsent_and_its_stage_told_once():
    held, sent, producer = _setup()
    for consumer in ("local_a", "local_b"):  # one spare, two messages (two consumers)
        item = _item(7, consumer)
        held.spare("select", 7, held.later(0.03, item), producer, "token-7", item)
    held.answered("select", 7)
    time.sleep(0.05)
    held.release()
    assert sent == []
    assert producer.stage.told == ["token-7"] and producer.counts["withdrawn"] == 1
    assert producer.stage.asked == []  # never came due as a spare
    assert held.next_due() is None


def test_a_spare_held_longer_is_asked_again_then_leaves_with_all_its_copies():
    held, sent, producer = _setup(answers=[0.04])
    start = time.monotonic()
    for consumer in ("local_a", "local_b"):
        item = _item(3, consumer)
        held.spare("select", 3, held.later(0.01, item), producer, "t3", item)
    _until(held, sent, 2)
    assert time.monotonic() - start >= 0.05  # 0.01 due, then 0.04 more
    assert sorted(c for c, _, _ in sent) == ["local_a", "local_b"]  # each copy once
    assert producer.stage.asked == ["t3", "t3"]
    held.answered("select", 3)  # an answer after it left withdraws nothing
    assert producer.stage.told == [] and held.next_due() is None


def test_a_called_off_spare_is_parked_and_sent_when_the_other_branch_fails():
    held, sent, producer, _ = _parked(4, 10)
    assert sent == [] and producer.counts["called_off"] == 1
    held.hurry("select", 4)  # the remote branch failed: the parked copy is the answer now
    _until(held, sent, 1)
    assert [m.request_id for _, _, m in sent] == [4]
    held.answered("select", 4)
    assert producer.stage.told == []  # it was sent, not withdrawn


def test_a_parked_spare_is_dropped_at_its_deadline_and_its_stage_told():
    held, sent, producer, item = _parked(5, 0.05)
    assert held.next_due() == item[2].meta[DEADLINE]  # the deadline is a wake-up for the loop
    time.sleep(0.05)
    held.release()
    assert producer.counts["parked_expired"] == 1 and producer.stage.told == ["t5"]
    held.hurry("select", 5)
    time.sleep(0.01)
    held.release()
    assert sent == [] and held.next_due() is None


def test_a_spare_hurried_before_it_is_due_leaves_at_once_each_copy_once():
    held, sent, producer = _setup()
    for consumer in ("local_a", "local_b"):
        item = _item(9, consumer)
        held.spare("select", 9, held.later(0.05, item), producer, "t9", item)
    held.hurry("select", 9)  # the remote branch failed before the spare was due
    held.release()
    assert sorted(c for c, _, _ in sent) == ["local_a", "local_b"]
    time.sleep(0.06)
    held.release()
    assert len(sent) == 2 and producer.stage.asked == []  # the original entries were skipped, never asked about


def test_a_called_off_spare_with_two_copies_is_sent_once_each_when_hurried():
    held, sent, producer, _ = _parked(10, 10, consumers=("local_a", "local_b"))
    assert sent == [] and producer.stage.asked == ["t10"] and producer.counts["called_off"] == 1
    held.hurry("select", 10)
    held.release()
    assert sorted(c for c, _, _ in sent) == ["local_a", "local_b"]


def test_a_parked_spare_answered_is_withdrawn_once_and_does_not_expire_later():
    held, sent, producer, _ = _parked(11, 0.05)
    held.answered("select", 11)
    assert producer.stage.told == ["t11"] and producer.counts["withdrawn"] == 1
    time.sleep(0.05)
    held.release()
    assert producer.counts["parked_expired"] == 0 and producer.stage.told == ["t11"] and sent == []


@pytest.mark.parametrize("answer", [0, -1.0, float("nan"), float("inf"), "raise"])
def test_a_spare_whose_stage_gives_no_usable_wait_is_sent(answer):
    held, sent, producer = _setup()
    if answer == "raise":
        def spare_due(token):
            raise RuntimeError("policy broke")
        producer.stage.spare_due = spare_due
    else:
        producer.stage.answers = [answer]
    item = _item(12)
    held.spare("select", 12, held.later(0.0, item), producer, "t12", item)
    held.release()
    assert [m.request_id for _, _, m in sent] == [12] and held.next_due() is None


def test_a_follower_leaves_when_its_request_is_answered_and_only_once():
    held, sent, _ = _setup()
    item = _item(6)
    held.follower("select", 6, held.later(0.2, item), item)
    held.answered("select", 6)
    held.release()
    assert [m.request_id for _, _, m in sent] == [6]
    time.sleep(0.21)
    held.release()
    assert len(sent) == 1  # the entry that came due was skipped


def test_a_copy_that_fails_to_deliver_becomes_an_error_naming_its_tensors():
    delivered: list = []

    def deliver(batch):
        if batch[0][2].kind == Kind.REQUEST:
            raise ValueError("no route to 'local'")
        delivered.extend(batch)

    held = HeldCopies(deliver)
    held.later(0.0, _item(8, skipped=["g"]))
    held.release()
    [(consumer, _, message)] = delivered
    assert consumer == "local" and message.kind == Kind.ERROR and message.request_id == 8
    assert message.meta["error"] == "ValueError" and "no route" in message.meta["message"]
    assert message.meta["tensors"] == ["h", "g"]
