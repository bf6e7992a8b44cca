"""The ``gate`` stage kind: send each request down exactly one of two branches, chosen by a control value X.

X == 1 → the ``then`` branch (in offload topologies: the edge server); X == 0 → the ``else`` branch (the device).
The branch not taken receives a skip notice instead of tensors: its stages do not run, and a remote stage sends
nothing to its server for that request. Wiring::

    [stages.gate]
    kind = "gate"
    control = "x"                                   # the port holding X: a one-element bool or integer tensor
    inputs = { x = "x", h = "h" }                   # the control port plus the tensors to route
    outputs = { "then.h" = "h@then", "else.h" = "h@else" }

X may instead come with the request (``pipe.submit(inputs, meta={"x": 1})``) when ``meta_key`` names it; a
request that carries the key uses it, others read the control port. A request whose X is neither 0 nor 1 fails.

With ``policy = "latency"`` (or ``"threshold"``; options in ``policy_options``, see zpipe.policy), a request that
brings no X is decided by the policy, from what the gate measures itself (how many requests it sent each way),
what its branches publish on the signal board (local service time and progress; the remote stand-in's round trip,
errors and circuit breaker) and the device's CPU use. Each request records the decision and its reason
(``x:<gate>``, ``why:<gate>`` in ``Result.meta``). A policy probe, or a request whose side the policy is unsure of,
may be *hedged*: the gate sends the request down both branches (``hedge:<gate>`` = 1), the ``select`` merge
takes the first answer and drops the later one, and the probed branch still measures itself. The copy for the
probed branch may leave later (``Outcome.defer``: a local probe while offloading starts when the remote answer
is due). The notes ``overlap_s:<gate>`` (the local service time) and ``overlap_after_s:<gate>`` (the deferral)
tell the remote stand-in how long the device computes the request alongside its remote copy. Hedging needs a
``select`` merge joining the two branches (the topologies ``zpipe compile`` writes for gated models have one).
"""

from __future__ import annotations

import collections
import heapq
import logging
import math
import time
from typing import Any, Mapping, Sequence

import numpy as np

from zpipe.board import CpuLoad
from zpipe.errors import StageError, TopologyError
from zpipe.policy import (Decision, Signals, device_stalls_left_out, expected_rtt, late_by, link_delay,
                          make_policy, spare_wanted)
from zpipe.stage import Outcome, Stage

__all__ = ["GateStage"]

log = logging.getLogger(__name__)

_BRANCHES = ("then", "else")
# The device load the policy sees is the highest reading of this long: under a CPU quota a reading is the share of
# the last 0.1 s's quota periods that were used up, which dips below "busy" for a moment now and then while a CPU
# hog runs (session 9, run 17: a local-led probe in such a dip, 6.9 s into the hog, took 436 ms).
_LOAD_HOLD_S = 0.5


class GateStage(Stage):
    light = True
    may_skip_outputs = True
    live_signals = False  # its figures change only as it decides

    def __init__(self, *, control: str = "x", meta_key: str | None = None, policy: str | None = None,
                 policy_options: dict[str, Any] | None = None) -> None:
        if not isinstance(control, str) or not control:
            raise TopologyError(f"gate control must be a port name, got {control!r}")
        self.control = control
        self.meta_key = meta_key
        self.policy_name = policy
        self.policy_options = dict(policy_options or {})
        if policy is not None:
            make_policy(policy, self.policy_options)  # validate now, in the parent
        self._policy = None

    def setup(self) -> None:
        if self.policy_name is not None:
            self._policy = make_policy(self.policy_name, self.policy_options)
            consumers = self.context.consumers if self.context else {}
            self._remote = sorted({c for p, cs in consumers.items() if p.startswith("then.") for c in cs})
            self._local = sorted({c for p, cs in consumers.items() if p.startswith("else.") for c in cs})
            self._sent = {True: 0, False: 0}
            # When each local copy left or leaves (a held one: a deferred probe's, a spare), in the order decided
            self._local_sent_at: collections.deque[float] = collections.deque(maxlen=1024)
            self._epochs: dict[str, tuple[int, int]] = {}  # local stage -> (its pid, its count when we saw it)
            self._load = (0.0, 0.0)  # (measured at, value)
            self._loads: collections.deque[tuple[float, float]] = collections.deque()  # (read at, value), recent
            self._local_seen: tuple[float | None, float | None] = (None, None)  # (local measured at, load then)
            self._load_at_local_send: float | None = None  # the device load when the newest local copy was sent
            self._local_active_at: float | None = None  # the local branch last computed then (now: it is)
            self._cpu_load = CpuLoad()
            self._stall_clock = self._cpu_load.stall_clock  # how long the device's CPU quota has been used up
            self._local_s: float | None = None  # the local service time at the last policy decision
            # A held local copy can be withdrawn once the remote answer is in: the select joining the branches
            # runs in this process (see stage.Outcome.spare)
            joins = self.context.joins if self.context else {}
            targets = {joins.get(p) for p in (self.context.consumers if self.context else {}) if p.startswith("else.")}
            self._spare_copies = len(targets) == 1 and None not in targets
            # What it decided, for the board (signals) and the debug log: X per side, hedged, probes; what became
            # of spare local copies that came due (by spare_wanted's reason); the last decision's reason.
            self._decisions = collections.Counter(remote=0, local=0, hedged=0, probes=0)
            self._spares: collections.Counter[str] = collections.Counter()
            self._last_why = ""

    @property
    def switches(self) -> int:
        return self._policy.switches if self._policy is not None else 0

    def check_wiring(self, name: str, inputs: Sequence[tuple[str, str]], outputs: Sequence[tuple[str, str]]) -> None:
        ports = [p for p, _ in inputs]
        if self.control not in ports and self.meta_key is None and self.policy_name is None:
            raise TopologyError(f"gate {name!r}: control port {self.control!r} is not among its inputs {ports}; "
                                "wire it, set meta_key to take X from the request, or set a policy")
        routed = [p for p in ports if p != self.control]
        if not routed:
            raise TopologyError(f"gate {name!r} has no tensors to route: add inputs besides {self.control!r}")
        for port, _ in outputs:
            branch, _, tensor = port.partition(".")
            if branch not in _BRANCHES or tensor not in routed:
                raise TopologyError(f"gate {name!r} output port {port!r} must be 'then.<input>' or 'else.<input>' "
                                    f"with <input> one of {routed}")
        for branch in _BRANCHES:
            if not any(p.startswith(branch + ".") for p, _ in outputs):
                raise TopologyError(f"gate {name!r} routes nothing to its {branch!r} branch; add a "
                                    f"'{branch}.<input>' output")

    def decide(self, inputs: Mapping[str, np.ndarray], meta: Mapping[str, Any]
               ) -> tuple[bool, str, bool, float, bool]:
        """(offload, why, hedge, defer_s, spare): offload is True for the then-branch (X == 1); hedge (the policy's
        only) sends the request down both branches, the other one's copy ``defer_s`` later, a spare if ``spare``
        (policy.Decision.spare). X the request brings wins over the policy."""
        if self.meta_key is not None and self.meta_key in meta:
            value, where = meta[self.meta_key], f"meta {self.meta_key!r}"
        elif self.control in inputs and inputs[self.control] is not None:
            array, where = inputs[self.control], f"control input {self.control!r}"
            if array.size != 1 or array.dtype.kind not in "biu":
                raise StageError(f"gate {where} must hold one bool or integer value, got {array.dtype}"
                                 f"{list(array.shape)}")
            value = array.reshape(-1)[0].item()
        elif self._policy is not None:
            signals = self._signals()
            self._local_s = signals.local_service_s
            decision = self._policy.decide(signals)
            self._count(decision)
            return decision.offload, f"policy: {decision.reason}", decision.hedge, decision.defer_s, decision.spare
        else:
            raise StageError(f"gate: the request carries no meta {self.meta_key!r} and no control input")
        if isinstance(value, bool) or value in (0, 1):
            return bool(value), f"given by {where}", False, 0.0, False
        raise StageError(f"gate {where} is {value!r}; X must be 0 (local branch) or 1 (remote branch)")

    def handle(self, inputs: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> Outcome:
        offload, why, hedge, defer_s, spare_copy = self.decide(inputs, meta)
        branches = _BRANCHES if hedge else ("then" if offload else "else",)
        later = "else" if offload else "then"  # a hedge's deferred copy: the branch other than X's
        spare = None
        if self._policy is not None:
            for branch in branches:
                self._sent[branch == "then"] += 1
            if "else" in branches:
                sent_at = time.monotonic() + (defer_s if later == "else" else 0.0)
                self._local_sent_at.append(sent_at)
                self._load_at_local_send = self._load[1]  # (read for this decision: before the copy computes)
                if spare_copy and later == "else" and defer_s > 0:
                    spare = _Spare(sent_at, defer_s)  # its token: withdrawn() takes it back out of the counts
        outputs = {f"{branch}.{port}": array for branch in branches
                   for port, array in inputs.items() if port != self.control}
        defer = {port: defer_s for port in outputs if port.startswith(later + ".")} if hedge and defer_s > 0 else {}
        notes = {"x": int(offload), "why": why}
        if hedge:
            notes["hedge"] = 1
            # How long the device computes this request (from when on) while the remote copy travels: its reply
            # may be handled that much later, which the remote stand-in allows for when it counts the round trip.
            if self._local_s is not None:
                notes["overlap_s"] = round(self._local_s, 4)
                if defer:
                    notes["overlap_after_s"] = round(defer_s, 4)
        # A deferred copy that is not a spare is a probe's: it leaves as soon as the answer is in, if that comes
        # first, so that it measures the side without holding up the answer on a device with little CPU (session
        # 10, runs 17 and 19: a probe's local copy, starting when the remote answer was due, took the device's quota
        # just as that answer came: 131 and 159 ms against always-remote's p99 of 78-79).
        return Outcome(outputs, notes, defer, spare, after_answer=bool(defer) and spare is None)

    def _count(self, decision: Decision) -> None:
        self._decisions["remote" if decision.offload else "local"] += 1
        self._decisions["hedged"] += decision.hedge
        self._decisions["probes"] += decision.reason.startswith("probe")
        self._last_why = decision.reason
        if log.isEnabledFor(logging.DEBUG):
            log.debug("gate %r: X=%d%s: %s", self._name(), decision.offload, " hedged" if decision.hedge else "",
                      decision.reason)

    def _name(self) -> str:
        return self.context.name if self.context else "gate"

    def signals(self) -> dict[str, Any]:
        """The policy's decisions so far (``decisions``: X per side, ``hedged``, ``probes``), its ``switches``,
        the last decision's reason (``last_why``), and what became of spare local copies that came due
        (``spares``: sent, and why; called off)."""
        if self._policy is None:
            return {}
        return {"decisions": dict(self._decisions), "switches": self._policy.switches, "last_why": self._last_why,
                "spares": dict(self._spares)}

    def spare_due(self, spare: _Spare) -> bool | float:
        """A spare local copy whose remote answer is overdue leaves, waits longer or is called off: see
        policy.spare_wanted. It is not the local branch's backlog until it leaves: counted as such while deciding,
        the device load reading would be left out as one over local compute (see _device_load), and a CPU hog
        that started since would go unseen (session 11, run 13: the first request after the hog started sent its
        spare, 401 ms against always-remote's p99 of 228). Called off, it stays "not left" until withdrawn."""
        now = time.monotonic()
        self._leaves(spare, math.inf)  # (still a slot of the count: an older, finished copy must not fill it)
        try:
            wanted, why = spare_wanted(self._signals(), spare.due_s, now - spare.due_at)
        except Exception:
            self._leaves(spare, now)  # (the worker sends it)
            raise
        if wanted is not False:
            self._leaves(spare, now if wanted is True else now + wanted)
        if wanted is True or wanted is False:  # (a hold is asked about again: counted and logged when it ends)
            self._spares[why.split(" (")[0]] += 1
            if log.isEnabledFor(logging.DEBUG):
                log.debug("gate %r: a spare local copy %.0f ms overdue: %s", self._name(),
                          (now - spare.due_at) * 1000, why)
        return wanted

    def withdrawn(self, spare: _Spare) -> None:
        """A spare local copy was dropped unsent (the remote answer came first): the local branch never sees it."""
        self._sent[False] = max(0, self._sent[False] - 1)
        try:
            self._local_sent_at.remove(spare.leaves_at)
        except ValueError:  # (fell out of the bounded record already)
            pass

    def _leaves(self, spare: _Spare, at: float) -> None:
        """Spare ``spare`` leaves at ``at`` (math.inf: not yet known), in the record of when local copies leave."""
        try:
            self._local_sent_at[self._local_sent_at.index(spare.leaves_at)] = at
        except ValueError:  # (fell out of the bounded record already)
            pass
        spare.leaves_at = at

    def process(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.handle(inputs, {}).outputs

    def _signals(self) -> Signals:
        board = self.context.board if self.context else None
        now = time.monotonic()
        local = [board.read(n) or {} for n in self._local] if board else []
        remote = [board.read(n) or {} for n in self._remote] if board else []
        local_done = self._local_done(local)
        timed = [v for v in local if v.get("service_s") is not None]
        slowest = max(timed, key=lambda v: v["service_s"], default={})  # the local branch's bottleneck
        local_at = min((v["measured_at"] for v in local if v.get("measured_at") is not None), default=None)
        # The local branch takes its copies in the order they leave: the unfinished ones left last. Those still
        # held here are not its backlog (a spare, most likely, never leaves).
        unfinished = heapq.nlargest(max(0, self._sent[False] - local_done), self._local_sent_at)
        out = [t for t in unfinished if t <= now]
        backlog, oldest = len(out), min(out, default=now)
        last_sample = max((v["measured_at"] for v in local if v.get("measured_at") is not None), default=None)
        self._local_active_at = now if backlog else last_sample
        load = self._device_load(now)
        if local_at != self._local_seen[0]:  # a new local sample: the device load it was measured at, read when
            # its request was sent: read now it would count the sample's own compute (on a device with a
            # quota under one CPU that reads ~100 %, session 9: every local sample then looked measured at the quota)
            then = self._load_at_local_send
            self._local_seen = (local_at, load if then is None else then)
        clock = self._stall_clock()
        remote = [_as_of(v, now, clock) for v in remote]
        rtts = [v for v in remote if v.get("rtt_s") is not None]
        return Signals(
            now=now, local_service_s=slowest.get("service_s"), local_service_std_s=slowest.get("service_std_s", 0.0),
            local_service_support=slowest.get("service_support"),
            local_measured_at=local_at, local_backlog=backlog,
            local_oldest_age_s=now - oldest, device_load=load, local_load_then=self._local_seen[1],
            remote_rtt_s=max((v["rtt_s"] for v in rtts), default=None),
            remote_ping_s=max((v["ping_s"] for v in remote if v.get("ping_s") is not None), default=None),
            remote_ping_late_s=max((v.get("late_s", 0.0) for v in remote), default=0.0),
            remote_ping_best_s=min((v["ping_best_s"] for v in remote if v.get("ping_best_s") is not None),
                                   default=None),
            remote_ping_then_s=max((v["ping_then_s"] for v in remote if v.get("ping_then_s") is not None),
                                   default=None),
            remote_rtt_std_s=max((v.get("rtt_std_s", 0.0) for v in rtts), default=0.0),
            remote_rtt_support=min((v["rtt_support"] for v in rtts if "rtt_support" in v), default=None),
            remote_measured_at=min((v["measured_at"] for v in rtts if v.get("measured_at")), default=None),
            remote_backlog=sum(v.get("inflight", 0) for v in remote),
            remote_oldest_age_s=max((now - v["oldest_sent_at"] for v in remote if v.get("oldest_sent_at")),
                                    default=0.0),
            remote_error_rate=max((v.get("error_rate", 0.0) for v in remote), default=0.0),
            remote_up=all(v.get("up", True) for v in remote),
            remote_server_wait_s=max((v.get("server_wait_s") or 0.0 for v in remote), default=0.0),
            remote_moving=any(v.get("moving", False) for v in remote),
            spare_copies=self._spare_copies)

    def _local_done(self, local: list[dict[str, Any]]) -> int:
        """Requests the local branch finished since this gate counted them: the slowest local stage's count
        (every local stage sees every local request), restarted from zero when a local worker restarts."""
        done = []
        for name, values in zip(self._local, local):
            pid, count = values.get("pid", 0), values.get("processed", 0) + values.get("failed", 0)
            known = self._epochs.get(name)
            if known is None or known[0] != pid:  # first sight, or the worker restarted: a new epoch
                self._epochs[name] = (pid, count)
                self._sent[False] = 0
            done.append(count - self._epochs[name][1])
        return min(done, default=0)

    def _device_load(self, now: float) -> float:
        """The device's CPU load as the policy sees it: the highest reading of the last _LOAD_HOLD_S, leaving out a
        reading over a time the local branch computed (then the last figure stands). On a device whose quota is
        under one CPU, a local request uses the quota up by itself: that is the local service time, already
        counted, not a busy device (session 10, runs 1 and 12: a local copy as the link slowed read 98 %, and the
        policy then treated the local figure as one from before a busy spell: 380-620 ms, three requests)."""
        read_at, value = self._load
        if now - read_at > 0.1:  # (CpuLoad keeps its window open for at least one quota period)
            reading = self._cpu_load()
            local_ran = self._local_active_at is not None and self._local_active_at > read_at
            if not local_ran or reading < value:  # (low despite local compute: others are not using it up)
                self._loads.append((now, reading))
            while self._loads and self._loads[0][0] < now - _LOAD_HOLD_S:
                self._loads.popleft()
            value = max((v for _, v in self._loads), default=value)
            self._load = (now, value)
        return value


class _Spare:
    """A spare local copy's token (stage.Outcome.spare): when it came due (``due_s`` after its decision), and when
    it leaves if it does (later if held longer: its entry in the gate's record of when local copies leave)."""

    __slots__ = ("due_at", "due_s", "leaves_at")

    def __init__(self, due_at: float, due_s: float) -> None:
        self.due_at, self.due_s, self.leaves_at = due_at, due_s, due_at


def _as_of(values: dict[str, Any], now: float, stall_clock: tuple[float, float] | None) -> dict[str, Any]:
    """A remote stand-in's figures as of ``now``. A ping still out is older than when its stage published: its
    delay counts as of now, up to late (how much longer it has been out goes apart, see policy.late_by), less the
    time the device's CPU quota has been used up since it was sent (``stall_clock`` is now's, see
    policy.device_stalls_left_out): its answer may be in, waiting for a thread to run. A ping that came back later
    than late is a warning too, until the next one (``late_answer_s``, added to ``late_s``)."""
    if not values.get("pings"):
        return values
    pings = device_stalls_left_out(values["pings"], stall_clock)
    return {**values, "rtt_s": expected_rtt(pings, values.get("beyond_ping_s"), values.get("rtt_s"), now,
                                            values.get("server_wait_s") or 0.0),
            "ping_s": link_delay(pings, now), "late_s": late_by(pings, now) + values.get("late_answer_s", 0.0)}
