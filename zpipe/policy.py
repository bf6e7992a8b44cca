"""Offload policies: decide X (offload or not) per request from measured signals. Pure: no sockets, no clocks read.

The gate gathers :class:`Signals` (its own counts, what the branches publish on the board, the device's CPU use)
and asks a policy for a :class:`Decision`. Two policies:

* :class:`LatencyPolicy` (default): estimate the local time (service time × (backlog + 1)) and the remote time
  (smoothed round trip, which already includes transfer and server queueing; with pings, queueing as the server
  reports it now: see expected_rtt), each plus ``risk`` standard
  deviations of its own samples: a side whose last sample jumped looks slower at once, and a steady side is not
  favoured over a noisy one by accident. Each estimate is at least the age of that side's oldest request still in
  flight, which shows a slower link (or a device that just got busy) before any reply does. Then
  pick the smaller, switching only when the other side is better by ``hysteresis`` and the last switch is at least
  ``min_dwell_s`` old (a side more than twice as fast wins at once); a request whose side is not better than the
  other by the hysteresis runs on both sides (hedged). Where the gate's process can withdraw a held copy
  (``Signals.spare_copies``), a remote request's local copy is a *spare*: it leaves only when the remote answer is
  overdue (a close call: the estimate plus one more spread; a clear choice: 1.5x the estimate), and is dropped
  unsent if the answer came first (zpipe.stage.Outcome.spare); one that comes due while the link's figures still
  say the answer is due waits up to one local service time more, and one that comes due on a device at its CPU
  quota is held further, going out only if the remote side then fails (spare_wanted). A ping out clearly longer
  than usual (a link that just slowed, or a device slow to handle the answer) counts in the choice only up to the
  age at which it is late; the rest counts against remote in that hedging test, as does how much later than late
  the newest ping came back, until the next one. Pings 1.5x slower than at the last remote answer (a link that
  changed) make a remote request's local copy start at once too: the part of a round trip beyond the ping (the
  transfer, retransmits) was measured on the old link. Under a CPU quota, the time the device's quota was used up (no
  thread of it ran) is left out of a ping's time (see device_stalls_left_out). A switch by less than that
  clear margin to a side last measured over 0.5 s ago is looked at first: one hedged probe of it, and the switch
  waits for its sample (see ``_confirm``); so is a switch to local by any margin on a local estimate measured
  before the device reached its CPU quota. A side that has not been measured for
  ``probe_interval_s`` gets one request (a probe), so estimates never go stale; ``probe_interval_s = 0`` turns
  probing off. With ``hedge = true`` (the default) a probe may run on *both* sides, the first answer winning, so
  exploring costs the probed request little latency (the probe's branch still reports its timing). A local probe
  always is hedged (its estimate is the old one): when local looks worse (or about as fast on a link as it was),
  its local copy starts when the remote answer is in or overdue (1.5x on a link as it was; at once with a ping
  late or a link that changed), so that it does not
  slow the device's handling of that answer, and when it looks better (or about as fast, on a link that got
  slower since remote was measured, or without pings) the request is
  local's, with a remote copy in case the device got busy. On a device at its CPU
  quota local's old estimate is at best a lower bound: no local probe there (one is due when the load drops). A
  remote probe is
  hedged when remote looks worse by more than the hysteresis, rests on a single sample or a ping is late (a
  remote side about as fast is probed on its own: the same request computing on the device would slow its reply
  and mis-measure it). Pings that show a link 1.5× faster than at the last remote sample make a remote probe due
  at once; where copies can be spares, that probe is the remote side's, with a spare local copy due when a local
  answer would be in. Probes of the local side
  cost the device's CPU, the scarce thing when offloading: while local keeps measuring more than
  1.2× the remote time, its probe interval doubles (up to 8×), and is back to normal as soon as local is within
  1.2× of the remote estimate again (the link slowed). Remote probes never back off, so a link that
  recovers is noticed within ``probe_interval_s``. While the link moves to a fresh connection (after a slow
  spell: ``Signals.remote_moving``), a request sent there would wait for the move: from local, no remote probe,
  switch or copy until it is done.
* :class:`ThresholdPolicy`: offload while the device is busy (CPU use or backlog above a high mark, until it falls
  below a low mark) unless the link is slow (RTT above ``max_rtt_s``) or failing.

Both stay local at once when the server is down (the remote stand-in's circuit breaker is open) or failing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .errors import TopologyError, did_you_mean

__all__ = ["Signals", "Decision", "LatencyPolicy", "ThresholdPolicy", "make_policy", "expected_rtt", "link_delay",
           "late_by", "late_after", "device_stalls_left_out", "stalled", "spare_wanted"]


@dataclass(frozen=True, kw_only=True)
class Signals:
    now: float  # time.monotonic() of the decision
    local_service_s: float | None = None  # smoothed compute time of the local branch (None: never measured)
    local_service_std_s: float = 0.0  # and its standard deviation
    local_service_support: int | None = None  # samples behind local_service_s since it started afresh (None: unknown)
    local_measured_at: float | None = None
    local_load_then: float | None = None  # the device load when local_service_s was last measured (None: unknown)
    local_backlog: int = 0  # requests sent to the local branch and not finished
    local_oldest_age_s: float = 0.0  # how long the oldest of those has been out
    device_load: float = 0.0  # CPU use of this device, 0..1 (of its CPU quota if it has one: see board.CpuLoad)
    remote_rtt_s: float | None = None  # smoothed round trip of the remote branch (None: never measured)
    remote_ping_s: float | None = None  # the link's delay from pings (None: no pings; see stages/remote.py)
    remote_ping_late_s: float = 0.0  # how long pings have been out past late, left out of remote_rtt_s (late_by),
    # plus how much later than late the newest ones came back (a warning until the next: the smoothing moves half way)
    remote_ping_then_s: float | None = None  # the smoothed ping when the remote round trip was last measured
    remote_ping_best_s: float | None = None  # the lowest smoothed ping seen (None: unknown)
    remote_rtt_std_s: float = 0.0
    remote_rtt_support: int | None = None  # samples behind remote_rtt_s since it started afresh (None: unknown)
    remote_measured_at: float | None = None
    remote_backlog: int = 0
    remote_oldest_age_s: float = 0.0  # how long the oldest request still in flight to the server has been out
    remote_error_rate: float = 0.0  # smoothed share of remote requests that failed
    remote_up: bool = True  # connected, and the circuit breaker is closed
    remote_server_wait_s: float = 0.0  # how long the server said a request would wait for other clients' requests
    # (in remote_rtt_s already: this is for the reason)
    remote_moving: bool = False  # the link is moving to a fresh connection (stages/remote_link.py): a request sent
    # now waits for the move (the handshake and a ping: ~4 round trips)
    spare_copies: bool = False  # a held local copy can be withdrawn once the remote answer is in (stage.Outcome.spare)


_LATE_FACTOR, _LATE_MARGIN_S = 1.5, 0.005  # a ping out longer than this is late (see late_by)


def late_after(mean: float) -> float:
    """How long a ping to a link with smoothed ping ``mean`` may be out before it is late (not a late thread on a
    busy device)."""
    return _LATE_FACTOR * mean + _LATE_MARGIN_S


def spare_wanted(s: Signals, due_s: float, waited_s: float) -> tuple[bool | float, str]:
    """Whether a spare local copy (Decision.spare), due ``due_s`` after its decision and overdue by ``waited_s``,
    should leave now: True; not yet (a number of seconds to wait before asking again); never (False: it goes out
    only if the remote side fails).
    - Never from a device at its CPU quota. There the answer is likely late because the device is (it has no CPU to
      handle it), and a local copy would be later still and slow the requests after it (session 10, runs 6-10: the
      first request after a CPU hog started sent its spare, and it and the next two took 200-300 ms against
      always-remote's 100-190).
    - Not yet while the link's figures still have the answer due before ``due_s`` (no ping late, the round trip
      with the link's delay now below it), up to one local service time: the answer is late for another reason
      (a hiccup of the server or the device: always-remote has a few requests of 120-180 ms in a phase whose p50
      is ~67), and a local copy starting now answers later than that and slows the handling of the remote answer
      on a device with little CPU (session 10: seven baseline requests of 179-274 ms in 26 runs). Asked again every
      _SPARE_RECHECK_S, so a ping that shows the link slowed sends it then. Without pings nothing tells: it
      leaves.
    With the answer, a short reason for the gate's counts and debug log (what comes before " (" names the case)."""
    if s.device_load >= _SATURATED_LOAD:
        return False, f"called off (device load {s.device_load:.0%})"
    if s.remote_ping_s is None or s.remote_rtt_s is None:
        return True, "sent: no pings"
    if s.remote_ping_late_s:
        return True, "sent: ping late"
    if s.remote_rtt_s >= due_s:
        return True, "sent: link slower"
    left = (s.local_service_s or 0.0) - waited_s
    return (min(_SPARE_RECHECK_S, left), "held: link as it was") if left > 0 else (True, "sent: held out")


def stalled(then: Sequence[float] | None, now: Sequence[float] | None) -> float:
    """How long the device's CPU quota was used up between two readings of zpipe.board.CpuLoad.stall_clock (0.0 if
    either is None): the smaller of the two counts' growth."""
    if then is None or now is None:
        return 0.0
    return max(0.0, min(now[0] - then[0], now[1] - then[1]))


def device_stalls_left_out(pings: Sequence[Sequence[Any]], stall_clock: Sequence[float] | None) -> list[tuple]:
    """A stand-in's published pings, (smoothed ping, when the ping still out was sent or None, the device's stall
    clock then or None), as (smoothed ping, sent) pairs for link_delay and late_by: a ping still out counts as sent
    later by the time the device's CPU quota has been used up since (``stall_clock`` is now's; see
    zpipe.board.CpuLoad.stall_clock). Its answer may be in, waiting for a thread of the device to run."""
    pairs = []
    for mean, out, *then in pings:
        if out is not None and then:
            out += stalled(then[0], stall_clock)
        pairs.append((mean, out))
    return pairs


def link_delay(pings: Sequence[Sequence[float | None]], now: float) -> float | None:
    """The links' mean delay at ``now`` from their pings, (smoothed ping, when the ping still out was sent or None)
    each: a link's smoothed ping, or the age of its ping still out if that is longer (its answer has not come: the
    stand-in publishes within a few ms of one), up to the age at which the ping is late (see late_by)."""
    if not pings:
        return None
    return sum(mean if out is None else min(max(mean, now - out), late_after(mean))
               for mean, out in pings) / len(pings)


def late_by(pings: Sequence[Sequence[float | None]], now: float) -> float:
    """How much longer than late (1.5x their link's smoothed ping plus 5 ms) pings still out have been out, over
    the links (the part of their age that link_delay leaves out); 0.0 when none is late. A late ping is a warning,
    not a measurement: see LatencyPolicy.decide."""
    if not pings:
        return 0.0
    return sum(max(0.0, now - out - late_after(mean)) for mean, out in pings if out is not None) / len(pings)


def expected_rtt(pings: Sequence[Sequence[float | None]], beyond_ping_s: float | None, rtt_s: float | None,
                 now: float, server_wait_s: float = 0.0) -> float | None:
    """The round trip a request to the remote side would see at ``now``: the links' delay now (see link_delay) plus
    the rest of a request's time as last measured (its round trip minus the ping and the server's wait for other
    clients at the time) plus the server's wait for other clients now; without pings (or before the first was
    answered) the smoothed round trip ``rtt_s`` as measured (whatever wait it met is in it)."""
    delay = link_delay(pings, now)
    if delay is None or beyond_ping_s is None:
        return rtt_s
    return delay + beyond_ping_s + server_wait_s


@dataclass(frozen=True)
class Decision:
    offload: bool
    reason: str
    hedge: bool = False  # run on both sides, the first answer wins (a probe, or a request the policy is unsure of)
    defer_s: float = 0.0  # a hedged request: the copy on the side other than X's starts this much later
    spare: bool = False  # the deferred copy only guards: withdrawn, never run, if the other side answers first


class _Hysteresis:
    """Current side, when it was chosen, and how many switches happened (flapping shows up there)."""

    def __init__(self, min_dwell_s: float) -> None:
        self.min_dwell_s = min_dwell_s
        self.offload = False
        self.since = -math.inf
        self.switches = 0

    def choose(self, offload: bool, now: float, reason: str, *, forced: bool = False) -> Decision:
        if offload != self.offload:
            if not forced and now - self.since < self.min_dwell_s:
                return Decision(self.offload, f"dwell ({reason})")
            self.offload, self.since = offload, now
            self.switches += 1
        return Decision(offload, reason)


_WARM_PROBES = 3
_WARM_INTERVAL_S = 0.2
_BACKOFF_RATIO = 1.2  # local probes back off while local measures more than this times the remote time
_MAX_BACKOFF = 8
_FASTER_LINK, _FASTER_MARGIN_S = 1.5, 0.005  # pings this much faster than at the last remote sample make it stale
_NEAR_BEST, _NEAR_BEST_MARGIN_S = 1.5, 0.005  # pings within this of their best: the link is as good as it gets
_SLOWER_LINK = 1.2  # pings this much slower (plus _FASTER_MARGIN_S) than at the last remote sample: a slower link
_CHANGED_LINK = 1.5  # this much slower: a changed link, whose round trip beyond the ping is not known (see decide)
_SATURATED_LOAD = 0.9  # a device this busy gets no local copies of remote requests (see LatencyPolicy.decide)
_LOCAL_AGE_CAP = 4  # the local age raises the local estimate at most this many times
_SPARE_LATE = 1.5  # a clear remote choice's spare local copy leaves when the answer is this much later than expected
_SPARE_RECHECK_S = 0.025  # a spare held on past its due time (see spare_wanted) is asked about again this often
_CONFIRM_AGE_S = 0.5  # a switch to a side last measured longer ago than this (and not clearly better) probes it first


def _pings_slower(s: Signals, factor: float) -> bool:
    """The pings are more than ``factor`` times (plus _FASTER_MARGIN_S) what they were when the remote side was last
    measured."""
    return s.remote_ping_s is not None and s.remote_ping_then_s is not None \
        and s.remote_ping_s > factor * s.remote_ping_then_s + _FASTER_MARGIN_S


def _link_unsure(s: Signals) -> bool:
    """A ping is late, or the pings are 1.5x those at the last remote answer (a link that changed): the remote
    answer may be late by any amount, so a local copy (a remote request's, a local probe's) starts at once."""
    return s.remote_ping_late_s > 0 or _pings_slower(s, _CHANGED_LINK)


class LatencyPolicy:
    def __init__(self, *, hysteresis: float = 0.15, min_dwell_s: float = 1.0, probe_interval_s: float = 2.0,
                 max_error_rate: float = 0.2, risk: float = 1.0, hedge: bool = True) -> None:
        if not 0 <= hysteresis < 1 or min_dwell_s < 0 or probe_interval_s < 0 or risk < 0:
            raise TopologyError("latency policy: need 0 <= hysteresis < 1, min_dwell_s >= 0, probe_interval_s >= 0, "
                                "risk >= 0")
        self.hysteresis = hysteresis
        self.probe_interval_s = probe_interval_s
        self.max_error_rate = max_error_rate
        self.risk = risk
        self.hedge = bool(hedge)
        self.state = _Hysteresis(min_dwell_s)
        self._probed: dict[str, float] = {}
        self._probes: dict[str, int] = {}  # probes sent per side: the first few come faster (see _probe_due)
        self._local_backoff = 1  # multiplies the local probe interval while local is clearly worse
        self._local_seen: float | None = None  # the local sample the back-off last looked at
        self._confirmed: dict[str, float] = {}  # side -> when a probe last confirmed it before a switch

    @property
    def switches(self) -> int:
        return self.state.switches

    def decide(self, s: Signals) -> Decision:
        if not s.remote_up:
            return self.state.choose(False, s.now, "server down", forced=True)
        if s.remote_error_rate > self.max_error_rate:
            # Errors only fade with new samples: probe now and then, or one bad spell would keep it local forever.
            if self._probe_due("remote", s.now):
                return self._probe("remote", f"errors {s.remote_error_rate:.0%}")
            return self.state.choose(False, s.now, f"remote errors {s.remote_error_rate:.0%}", forced=True)
        if s.remote_rtt_s is None or s.local_service_s is None:
            side = "remote" if s.remote_rtt_s is None else "local"
            if self._probe_due(side, s.now):
                return self._probe(side, "never measured")
            return Decision(side != "remote", f"waiting for the first {side} measurement")
        # A request out for longer than a side's estimate shows that side got slower (a busier device, a slower
        # link or server) before its smoothed figures can: no side is faster than its oldest unfinished request.
        # (The local age is capped: the gate infers it from counts, and a request lost from them must not make the
        # device look slower and slower.)
        local_by_count = s.local_service_s * (s.local_backlog + 1) + self.risk * s.local_service_std_s
        local = max(local_by_count, min(s.local_oldest_age_s, _LOCAL_AGE_CAP * local_by_count))
        # A late ping is a warning, not a measurement: the link got slower by at least its age, maybe by much more
        # (the first request after a link degrades would go into it), or the device was slow to handle the answer
        # (a false alarm). remote_rtt_s counts its age only up to late; the rest only decides hedging (see the
        # end). Its answers, or the ping's, tell which it was.
        remote_by_rtt = s.remote_rtt_s + self.risk * s.remote_rtt_std_s
        remote = max(remote_by_rtt, s.remote_oldest_age_s)
        # The side in use is measured by every request: it needs no quick first probes later (see _interval).
        current = "remote" if self.state.offload else "local"
        if (s.remote_measured_at if self.state.offload else s.local_measured_at) is not None:
            self._probes[current] = max(self._probes.get(current, 0), _WARM_PROBES)
        # Local probes back off while local is clearly worse: doubling at each new local sample (a probe), back to
        # the normal pace as soon as it is not (also when the remote side got slower: local is worth a look again).
        if not local > _BACKOFF_RATIO * remote:
            self._local_backoff = 1
        elif self.state.offload and s.local_measured_at != self._local_seen:
            self._local_backoff = min(self._local_backoff * 2, _MAX_BACKOFF)
        if self.state.offload:
            self._local_seen = s.local_measured_at
        if self.probe_interval_s:
            stale_remote = s.remote_measured_at is None or s.now - s.remote_measured_at > self._interval("remote")
            # Pings that show a link much faster than when the remote side was last measured (a link that
            # recovered) make its round trip, measured on the slow link, stale at once: a probe now, not up to
            # probe_interval_s later (policy runs 45-46: back to remote 1.6-3.6 s after the link recovered).
            faster = (s.remote_ping_s is not None and s.remote_ping_then_s is not None
                      and s.remote_ping_s * _FASTER_LINK < s.remote_ping_then_s - _FASTER_MARGIN_S)
            stale_local = s.local_measured_at is None or s.now - s.local_measured_at > self._interval("local")
            # A local probe is hedged: the local estimate is the old one, and a device that got busy since would
            # make an unhedged probe cost the request several times its latency. When local looks worse, its copy
            # starts when the remote answer is in, or clearly overdue (1.5x its estimate, as a spare), so that on a
            # device with little CPU it does not slow the handling of that answer (a late answer still has the local
            # copy coming; due at the estimate itself, it started as the answer came in about half the time:
            # session 12, 12 of ~190 such probes in baseline phases took 87-149 ms against ~67, most of them their
            # phase's slowest request); when it looks better (or
            # about as fast: below), the request is local's, with a remote copy in case the device got busy.
            # On a device at its CPU quota the local side is the slower one whatever its estimate says (that is at
            # best a lower bound: in session 11's runs 1 and 4, one local sample there put it at 240-490 ms against
            # ~120 before), and a probe's compute slows the remote requests around it (run 59: a local-led probe 2 s
            # into the CPU hog took 410 ms; session 11, runs 1 and 4: the two requests after a deferred one took
            # 200-230 ms against always-remote's p99 of 214-222). So no local probe there; the device's load says
            # when it has CPU again (readings over local compute are left out, see the gate), and the probe is due
            # then. A remote side clearly slower than even that lower bound is a switch, which looks at local first
            # (_confirm).
            # A local side about as fast leads its probe only when the link got slower since the remote side was
            # measured (a ping late, or the pings slower than then), or without pings: else the remote figure stands
            # and remote leads, as for a local side that looks worse (session 12: right after the CPU hog, the
            # remote figure still had the hog's slow handling in it, local looked about as fast, and the local
            # copy's compute slowed the remote answer: 78-111 ms against ~67, in 8 of 34 runs the first request of
            # the phase after).
            saturated = s.device_load >= _SATURATED_LOAD
            if self.state.offload and stale_local and not saturated and self._probe_due("local", s.now):
                link_slower = s.remote_ping_s is None or s.remote_ping_late_s > 0 or _pings_slower(s, _SLOWER_LINK)
                if local > (1 + self.hysteresis) * remote or (not local < (1 - self.hysteresis) * remote
                                                              and not link_slower):
                    # (at the estimate itself on a link that got slower: there the remote answer may be late by
                    # any amount, and the local copy is the hedge; session 12, run 21.2: the first request into
                    # the slowed link, its copy at 1.5x, took 284 ms. At once with a ping late or pings 1.5x those
                    # at the last remote answer, as a remote request's copy: session 16, a local probe due 0.11 s
                    # into the bad link, its copy at the estimate, 104 ms, took 231.)
                    return self._probe("local", defer_s=0.0 if _link_unsure(s) else (
                        1.0 if link_slower else _SPARE_LATE) * remote)
                return self._probe("local", lead=True)
            # A remote probe is hedged when remote looks worse by more than the hysteresis. A remote side that
            # looks better or about as fast is probed alone: the same request computing on the device would slow
            # its reply and make it look worse than it is, and a remote side measured so would stay a little worse
            # than local for good. Unless that look rests on a single sample: on a lossy link one lucky round trip
            # among slow ones would send the next probe alone into it.
            # A probe because the link recovered (pings faster than at the last sample, and back near their best)
            # leads on the remote side, its local copy a spare due when a local answer would be in: the remote
            # figure, measured on the slow link, says nothing now, and a local copy computing alongside would slow
            # the reply's handling on a device with little CPU and mis-measure the link that recovered (session 11,
            # runs 13, 21, 23: 135-205 ms, and the switch back took 1.1-1.6 s). A reply slower than local would not
            # switch anyway, and then the request costs up to twice local, so not on pings that are merely lower
            # than at the last sample: on a lossy link that sample may have met a retransmit (session 12, run 1:
            # three such probes into the lossy link, 250-270 ms).
            # No remote probe while the link moves to a fresh connection (after a slow spell): it would wait for
            # the move, and then pay the fresh connection's slow start (session 16: the first request after the
            # bad link, a probe 0.11 s after the restore, took 168-224 ms against local's ~115; on the test bed
            # a move takes ~80 ms, and the first request on a fresh connection ~100 against ~72).
            if not self.state.offload and not s.remote_moving and (
                    stale_remote and self._probe_due("remote", s.now)
                    or faster and self._probe_due("remote", s.now, _WARM_INTERVAL_S)):
                recovered = faster and s.remote_ping_best_s is not None \
                    and s.remote_ping_s <= _NEAR_BEST * s.remote_ping_best_s + _NEAR_BEST_MARGIN_S
                if recovered and self.hedge and s.spare_copies and not s.remote_ping_late_s and not saturated:
                    return Decision(True, f"probe remote (link faster, spare local copy after {local * 1000:.0f} "
                                          "ms)", hedge=True, defer_s=local, spare=True)
                one_sample = s.remote_rtt_support is not None and s.remote_rtt_support < 2
                worse = remote > (1 + self.hysteresis) * local
                faster_why = "link faster" + ("" if recovered else ", pings not near their best") \
                    + (", ping late" if s.remote_ping_late_s else "") + (", device at its quota" if saturated else "") \
                    + ("" if s.spare_copies else ", no spare copies here")
                return self._probe("remote", faster_why if faster else "",
                                   hedge=one_sample or worse or bool(s.remote_ping_late_s))
        why = f"local {local * 1000:.1f} ms vs remote {remote * 1000:.1f} ms"
        aged = [side for side, by_age in (("remote", remote > remote_by_rtt), ("local", local > local_by_count))
                 if by_age]
        if aged:
            why += f" (oldest in flight: {', '.join(aged)})"
        if s.remote_ping_late_s:
            why += f" (ping late by {s.remote_ping_late_s * 1000:.0f} ms)"
        if s.remote_server_wait_s:
            why += f" (server busy: {s.remote_server_wait_s * 1000:.0f} ms wait for other clients)"
        # A side twice as fast wins at once: the dwell time damps flapping, it must not hold a clearly bad choice.
        clear = max(local, remote) > 2 * min(local, remote)
        if self.state.offload:
            offload = not local < remote * (1 - self.hysteresis)
        else:
            offload = remote < local * (1 - self.hysteresis)
        # A link moving to a fresh connection takes requests only once it is there: from local, the switch (and
        # any remote copy, which would measure the wait) waits for the move (~4 round trips).
        moving = s.remote_moving and not self.state.offload
        if moving:
            offload = False
            why += " (link moving to a fresh connection)"
        # A local estimate measured before the device reached its CPU quota says nothing about local now, however
        # clear the margin: a switch to local on it waits for a look at local under this load (run 68, session 7's
        # code: a switch 2 s into the CPU hog on a local figure from before it, 650 ms).
        unproven = not offload and self._local_unproven(s)
        if unproven and not clear and self.state.offload:
            # There that figure is at best a lower bound, and a look at local (a confirming probe) computes on a
            # device with no CPU to spare, slowing the remote requests around it (session 9, runs 9-11: 190-340
            # ms after each against a forced-remote p50 of 140): worth it only when remote is slower than twice it.
            offload = True
            why += f" (device load {s.device_load:.0%}: local measured before)"
        if offload != self.state.offload and (not clear or unproven) \
                and s.now - self.state.since >= self.state.min_dwell_s:
            confirm = self._confirm("remote" if offload else "local", s, why, remote if offload else local, remote)
            if confirm is not None:
                return confirm
        else:
            self._confirmed.clear()  # no switch waits for a look: a later one takes its own
        decision = self.state.choose(offload, s.now, why, forced=clear and not unproven)
        if moving:  # (no remote copy either: it would wait for the move, and measure the wait)
            return decision
        # A request whose side is not better than the other by the hysteresis (a close call, or a side the dwell
        # time holds) runs on both sides: the estimates cannot tell which answers first, and the first answer wins.
        # - The chosen side counts one spread more here than in the choice: the hedge is for its unlucky draws (a
        #   link whose pings just jumped has a wide spread: run 45, remote 105 ms against local 142 at the first
        #   request after the link slowed, which took 354 ms).
        # - A request sent local on a local estimate resting on a single sample is hedged too: it has no spread yet
        #   (run 44: a busy device's one fresh sample said 183 ms, the request took 370). Not so for remote: a
        #   hedged remote sample whose range reaches zero adds no sample, and at the start of run 48 remote
        #   requests were hedged over and over.
        # - So is one sent remote while a ping is late, unless local is twice as slow even against the ping's age:
        #   the link got slower by at least that age, by how much more nobody knows yet (run 41: a ping 37 ms
        #   late, and the request took 371 ms).
        # - Never a local copy on a device that uses up its CPU (a container at its quota): it slows the handling
        #   of the remote answer and is the slower one anyway, and a late ping is likely the device's own doing.
        # - Likewise while the pings are clearly slower than when the remote side was last measured (a link that
        #   changed: its answer has come back, so no ping is late): the remote estimate is the link's delay now plus
        #   the rest of a round trip as measured on the old link, and the rest (the tensor's transfer at the
        #   link's rate now, retransmits on a lossy link) may have grown by any amount. Until a remote answer
        #   measures it, a remote request's local copy starts at once (session 16, run 1.1: the second request
        #   into the bad link, 50 ms and 5 % loss, estimated at 129 ms against local's 157, held its spare to 161
        #   ms and took 289; always-remote's p50 there was 494).
        late = s.remote_ping_late_s
        changed = _pings_slower(s, _CHANGED_LINK)
        spread = self.risk * (s.remote_rtt_std_s if decision.offload else s.local_service_std_s)
        chosen, other = (remote + late + spread, local) if decision.offload else (local + spread, remote)
        local_one_sample = (not decision.offload and s.local_service_support is not None
                            and s.local_service_support < 2)
        unsure = _link_unsure(s)
        doubtful = local_one_sample or (decision.offload and unsure and local < 2 * chosen)
        # - A remote request's local copy, unless a ping is late or local looks faster (the dwell time holds
        #   remote), is a spare where the gate's process can withdraw it: it starts only when the remote answer is
        #   overdue (its estimate plus one more spread), and is dropped unsent if the answer came first. So a close
        #   call costs the device nothing when remote answers on time; a local copy computing alongside slowed the
        #   handling of that answer on a device with little CPU (session 9: run 12, 123 ms against always-remote's
        #   p99 of 74). With a late ping the link may have slowed by any amount: the copy starts at once.
        if self.hedge and (doubtful or not chosen < other * (1 - self.hysteresis)):
            if decision.offload and s.device_load >= _SATURATED_LOAD:
                return Decision(True, f"{decision.reason} (device load {s.device_load:.0%}: not hedged)")
            if decision.offload and s.spare_copies and not unsure and local >= remote:
                return Decision(True, f"{decision.reason}: hedged, spare local copy after {chosen * 1000:.0f} ms",
                                hedge=True, defer_s=chosen, spare=True)
            if decision.offload and changed and not late:
                return Decision(True, f"{decision.reason} (link changed: pings {s.remote_ping_s * 1000:.0f} ms, "
                                      f"{s.remote_ping_then_s * 1000:.0f} at the last remote answer): hedged",
                                hedge=True)
            return Decision(decision.offload, f"{decision.reason}: hedged", hedge=True)
        # A clear remote choice gets a spare local copy too, due when its answer is clearly overdue (1.5x the
        # estimate, at least the close call's due time): it costs nothing while remote answers on time and starts
        # the local copy early for the first request into a link that just slowed, which no ping had shown yet
        # (session 10, runs 1-2: 294-329 ms 110 ms after the link slowed, against always-local's p99 of 150-167).
        if self.hedge and decision.offload and s.spare_copies and s.device_load < _SATURATED_LOAD:
            due = max(chosen, _SPARE_LATE * remote)
            return Decision(True, f"{decision.reason} (spare local copy after {due * 1000:.0f} ms)", hedge=True,
                            defer_s=due, spare=True)
        return decision

    def _confirm(self, side: str, s: Signals, why: str, estimate: float, remote: float) -> Decision | None:
        """Before switching to ``side`` by less than a clear margin on an estimate older than _CONFIRM_AGE_S (or to
        local by a clear margin on an estimate from before the device reached its CPU quota, whatever its age; by
        less, decide() does not switch at all):
        a hedged probe of it (the request costs no latency if the estimate was wrong), and no switch until a sample
        newer than that probe is in, however long the next request takes to come. Without one after 3x the side's
        estimate (at least _CONFIRM_AGE_S), another probe. On a device at its CPU quota, the local copy of a local
        one starts when the ``remote`` answer is due.

        Nothing refreshes the local estimate between probes, and a device that just got busy makes the remote round
        trip look slower too (it handles the reply): switching on the old local figure would send requests to a
        device that is now the slower side. The remote estimate is fresh while pings come in."""
        if not self.probe_interval_s or (side == "remote" and s.remote_ping_s is not None):
            return None
        measured = s.local_measured_at if side == "local" else s.remote_measured_at
        probed = self._confirmed.get(side)
        if measured is not None and probed is not None and measured >= probed:
            del self._confirmed[side]  # the probe's sample (or a newer one) is in: decide on it
            return None
        fresh = measured is not None and s.now - measured <= _CONFIRM_AGE_S
        if fresh and not (side == "local" and self._local_unproven(s)):
            return None
        if probed is None or s.now - probed >= max(_CONFIRM_AGE_S, 3 * estimate):
            self._confirmed[side] = s.now
            if side == "local" and s.device_load >= _SATURATED_LOAD:
                return self._probe(side, f"confirm before switching: {why}, device load {s.device_load:.0%}",
                                   defer_s=remote)
            return self._probe(side, f"confirm before switching: {why}", hedge=True)
        return Decision(self.state.offload, f"waiting for a fresh {side} sample before switching ({why})")

    @staticmethod
    def _local_unproven(s: Signals) -> bool:
        """The device is at its CPU quota, and the local estimate was measured while it was not."""
        return s.device_load >= _SATURATED_LOAD and s.local_load_then is not None \
            and s.local_load_then < _SATURATED_LOAD

    def _probe(self, side: str, why: str = "", *, hedge: bool = True, defer_s: float = 0.0,
               lead: bool = False) -> Decision:
        """A probe of ``side``: hedged (both sides run, the first answer wins) unless told not to or hedging is
        off. The request's X stays the current side's, or is ``side``'s if it ``lead``s; with ``defer_s``, the
        copy on the other side than X starts that much later."""
        hedge = hedge and self.hedge
        hedged = f"hedged, {side} copy after {defer_s * 1000:.0f} ms" if defer_s > 0 else "hedged"
        notes = ", ".join(n for n in (why, hedged if hedge else "") if n)
        reason = f"probe {side}" + (f" ({notes})" if notes else "")
        if hedge:
            return Decision(side == "remote" if lead else self.state.offload, reason, hedge=True, defer_s=defer_s)
        return Decision(side == "remote", reason)

    def _interval(self, side: str) -> float:
        """How often ``side`` is probed. Its first samples are often cold (a connection's first transfers, a model's
        first call), so its first ``_WARM_PROBES`` probes come every ``_WARM_INTERVAL_S`` at most, unless it has
        been the side in use (then its requests measured it)."""
        if not self.probe_interval_s:
            return math.inf  # probing off: one probe of a side never measured, then none
        if self._probes.get(side, 0) < _WARM_PROBES:
            return min(self.probe_interval_s, _WARM_INTERVAL_S)
        return self.probe_interval_s * (self._local_backoff if side == "local" else 1)

    def _probe_due(self, side: str, now: float, interval_s: float | None = None) -> bool:
        """At most one probe per side per probe interval, or per ``interval_s`` (a probe is one request, not every
        request until the measurement arrives)."""
        if now - self._probed.get(side, -math.inf) < (self._interval(side) if interval_s is None else interval_s):
            return False
        self._probed[side] = now
        self._probes[side] = self._probes.get(side, 0) + 1
        return True


class ThresholdPolicy:
    def __init__(self, *, load_high: float = 0.8, load_low: float = 0.6, backlog_high: int = 4,
                 backlog_low: int = 1, max_rtt_s: float = 0.1, max_error_rate: float = 0.2,
                 min_dwell_s: float = 1.0) -> None:
        if not 0 <= load_low <= load_high or backlog_low > backlog_high or max_rtt_s <= 0:
            raise TopologyError("threshold policy: need load_low <= load_high, backlog_low <= backlog_high, "
                                "max_rtt_s > 0")
        self.load_high, self.load_low = load_high, load_low
        self.backlog_high, self.backlog_low = backlog_high, backlog_low
        self.max_rtt_s, self.max_error_rate = max_rtt_s, max_error_rate
        self.state = _Hysteresis(min_dwell_s)

    @property
    def switches(self) -> int:
        return self.state.switches

    def decide(self, s: Signals) -> Decision:
        if not s.remote_up:
            return self.state.choose(False, s.now, "server down", forced=True)
        if s.remote_error_rate > self.max_error_rate:
            return self.state.choose(False, s.now, f"remote errors {s.remote_error_rate:.0%}", forced=True)
        if s.remote_rtt_s is not None and s.remote_rtt_s > self.max_rtt_s:
            return self.state.choose(False, s.now, f"slow link: rtt {s.remote_rtt_s * 1000:.0f} ms")
        if s.remote_oldest_age_s > self.max_rtt_s:
            return self.state.choose(False, s.now, f"slow link: a request out for {s.remote_oldest_age_s * 1000:.0f} "
                                                   "ms")
        busy = s.device_load >= self.load_high or s.local_backlog >= self.backlog_high
        idle = s.device_load <= self.load_low and s.local_backlog <= self.backlog_low
        why = f"load {s.device_load:.0%}, backlog {s.local_backlog}"
        if self.state.offload:
            return self.state.choose(not idle, s.now, why)
        return self.state.choose(busy, s.now, why)


_POLICIES = {"latency": LatencyPolicy, "threshold": ThresholdPolicy}


def make_policy(name: str, options: Mapping[str, Any] | None = None) -> LatencyPolicy | ThresholdPolicy:
    """Build a policy by name from topology options, with precise errors for unknown names and keys."""
    if name not in _POLICIES:
        raise TopologyError(f"unknown offload policy {name!r}; choose one of {sorted(_POLICIES)}"
                            f"{did_you_mean(name, _POLICIES)}")
    cls = _POLICIES[name]
    import inspect

    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    for key in options or {}:
        if key not in accepted:
            raise TopologyError(f"{name} policy: unknown option {key!r}{did_you_mean(key, accepted)}; "
                                f"options are {accepted}")
    return cls(**dict(options or {}))
