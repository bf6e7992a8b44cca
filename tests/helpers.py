"""Stage functions for tests, importable by dotted path from topology files (tests/ is on sys.path)."""

from __future__ import annotations

import time

import numpy as np

from zpipe.stage import Outcome, Stage


def double(inputs):
    return inputs["x"] * 2


def timed_sleep(inputs):
    """Sleeps 0.2 s and returns its own start/end times (monotonic), so overlap is shown by the stage itself."""
    start = time.monotonic()
    time.sleep(0.2)
    return {"out": inputs["x"], "span": np.array([start, time.monotonic()])}



class SpareHedge(Stage):
    """Sends each request down both branches of a select, the else copy ``defer_s`` later as a spare
    (zpipe.stage.Outcome.spare); publishes how many of those it was told were withdrawn and, for each of its ports,
    the stage in its process that would make a held copy moot."""

    may_skip_outputs = True

    def __init__(self, *, defer_s: float, call_off: bool = False, follow: bool = False, hold_s: float = 0.0) -> None:
        self.defer_s = defer_s
        self.call_off = call_off
        self.follow = follow  # not a spare: the else copy leaves once the request is answered (after_answer)
        self.hold_s = hold_s  # a spare due is held this much longer, then sent (spare_due's number)

    def setup(self) -> None:
        self.sent = 0
        self.withdrawals: set[int] = set()
        self.asked: dict[int, int] = {}  # spare -> how often spare_due was asked

    def handle(self, inputs, meta):
        self.sent += 1
        return Outcome({"then.h": inputs["h"], "else.h": inputs["h"]}, {}, {"else.h": self.defer_s},
                       None if self.follow else self.sent, after_answer=self.follow)

    def spare_due(self, spare) -> bool | float:
        self.asked[spare] = self.asked.get(spare, 0) + 1
        if self.hold_s and self.asked[spare] == 1:
            return self.hold_s
        return not self.call_off

    def withdrawn(self, spare) -> None:
        assert spare not in self.withdrawals, f"copy {spare} withdrawn twice"
        self.withdrawals.add(spare)

    def signals(self):
        return {"withdrawals": len(self.withdrawals), "joins": dict(self.context.joins),
                "asked": sum(self.asked.values())}
