"""The ``remote`` stage kind: the device-side stand-in for a stage that runs on one or more edge servers.

A stage placed on a host from the topology's ``[hosts]`` runs through this stand-in (zpipe builds it; a topology
may also name ``kind = "remote"``). Requests go to a server over one connection each, many in flight (the worker
keeps taking work while replies are pending, up to ``max_in_flight``); each carries its remaining deadline.

* Several endpoints: each request goes to the reachable server with the fewest requests in flight.
* Circuit breaker per server: a lost connection, or ``breaker_failures`` failures in a row, marks it down (a lost
  connection within ``probe_s`` also while no request goes there: the board, the policy and the metrics show it);
  a background probe (a health call every ``probe_s``) marks it up again when it answers. No request is spent on
  probing.
* Fallback: with a ``fallback`` stage (the same stage, run here), a request whose server failed (connection lost,
  deadline, refused, busy, draining, model missing) is re-run on the device within its deadline, and so is every
  request while all servers are down. A late reply from the server for a request that already fell back is
  dropped: each request has exactly one outcome.
* Upload: with ``upload_library`` the library is sent to each server during setup (``--allow-upload`` there).
* It publishes its round trip (and its pieces, below), errors and breaker state on the signal board, for the
  gate's offload policy, and records where each request ran (``at:<stage>`` in ``Result.meta``). The round trip
  of a gate's hedged probe is counted as a range: the device computed the same request meanwhile (the gate's
  notes ``overlap_s:<gate>``, ``overlap_after_s:<gate>``), which can delay its handling of the reply.
* Pings, slow spells and fresh connections (``ping_s`` > 0; zpipe turns pings on when a gate in the topology has a
  policy): see stages/remote_link.py. The published round trip is then the link's delay now plus the rest of a
  request's time as last measured, and a link that recovers from a slow spell moves to a fresh connection.

A request the gate routes elsewhere never reaches this stage, so nothing is sent to any server for it.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import threading
import time
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from typing import Any, Mapping

import numpy as np

from zpipe.board import CpuLoad, Ewma
from zpipe.errors import ArtifactError, PeerTimeout, StageError
from zpipe.policy import device_stalls_left_out, expected_rtt, link_delay
from zpipe.stage import Outcome, Stage

from .remote_link import Link, LinkKeeper

__all__ = ["RemoteStage"]

log = logging.getLogger(__name__)

# Server answers after which running the stage here instead is the right thing (the server could not run it).
_FALLBACK_REASONS = {"disconnected", "timeout", "refused", "send_error", "busy", "shutting_down", "not_found",
                     "closed", "unreachable"}
_TRANSPORT_REASONS = {"disconnected", "timeout", "refused", "send_error"}
# With a fallback, a request whose reply is this overdue also starts locally; the first answer wins ("the tail at
# scale" hedging): a link that degrades mid-request costs that request the local time, not the slow round trip.
_HEDGE_FACTOR = 3.0  # x the smoothed round trip
_HEDGE_SIGMAS = 4.0  # or the round trip plus this many standard deviations, whichever is later
_HEDGE_MIN_S = 0.02


class RemoteStage(LinkKeeper, Stage):
    path_params = ("server_key", "client_key", "upload_library")
    asynchronous = True

    def __init__(self, *, endpoint: str | list[str] | None = None, model: str | None = None,
                 version: int | None = None, server_key: str | None = None, client_key: str | None = None,
                 upload_library: str | None = None, timeout_s: float = 30.0, heartbeat_s: float = 1.0,
                 max_in_flight: int = 64, input_names: list[str] | None = None,
                 output_names: list[str] | None = None, host: str | None = None, fallback: Stage | None = None,
                 breaker_failures: int = 3, probe_s: float = 0.5, ping_s: float = 0.0) -> None:
        self.endpoints = [endpoint] if isinstance(endpoint, str) else list(endpoint or [])
        self.endpoint = self.endpoints[0] if self.endpoints else None
        self.model = model
        self.version = version
        self.server_key, self.client_key = server_key, client_key
        self.upload_library = upload_library
        self.timeout_s = timeout_s
        self.heartbeat_s = heartbeat_s
        self.max_in_flight = max_in_flight
        self.input_names = tuple(input_names) if input_names else None
        self.output_names = tuple(output_names) if output_names else None
        self.host = host or (self.endpoint or "?")
        self.fallback = fallback
        self.breaker_failures = breaker_failures
        self.probe_s = probe_s
        if isinstance(ping_s, bool) or not isinstance(ping_s, (int, float)) or not 0 <= ping_s < math.inf:
            raise StageError(f"ping_s must be a number of seconds >= 0 (0: no pings), got {ping_s!r}")
        self.ping_s = ping_s

    # -- lifecycle -----------------------------------------------------------------------------------------------
    def setup(self) -> None:
        from zpipe.client import RemoteClient

        if not self.endpoints or not self.model:
            raise StageError("a remote stage needs an endpoint and a model: place it on a host from [hosts] "
                             "(host = \"edge\") or give endpoint and model")
        self._lock = threading.Lock()
        self._cpu = CpuLoad()  # a ping answered while the device had no CPU says little about the link
        self._stalled_pings = 0
        self._pings_sent = 0
        self._fresh_connections = 0
        self._rtt_stale = False  # the round trip was measured on a connection since replaced (see _swapped)
        self._retiring: list = []  # clients left for a fresh connection, closed when their requests are done
        self._retired_counts = [0, 0]  # requests and bytes that closed clients sent
        self._movers: list[threading.Thread] = []  # _reconnect and _look threads (teardown waits for them)
        self._rtt = Ewma(0.2)
        self._beyond_ping = Ewma(0.2)  # a request's round trip minus the ping of its link at the time
        self._errors = Ewma(0.1)
        self._measured_at: float | None = None
        self._bounds_only = False  # the round trip estimate comes from hedged probes only (see _succeeded)
        self._support = 0  # samples the round trip estimate rests on since it started afresh (see _succeeded)
        self._ping_then: float | None = None  # the link's smoothed ping when the round trip was last measured
        self._fallbacks = 0
        self._stop = threading.Event()
        self._links = [Link(RemoteClient(e, server_key=self.server_key, client_key=self.client_key,
                                          timeout_s=self.timeout_s, heartbeat_s=self.heartbeat_s).start(), e)
                       for e in self.endpoints]
        self._hedges: list = []  # heap of (when, seq, inputs, outer, after): start locally if unanswered by then
        self._hedge_cv = threading.Condition()
        self._hedge_seq = itertools.count()
        self._sent_at: dict[int, float] = {}  # requests in flight to a server: when each was sent
        self._newest_done = -math.inf  # when the newest request that has finished was sent
        self._send_seq = itertools.count()
        self._connection_seq = itertools.count(1)  # fresh connections' identities: <identity>~<n>, never reused
        if self.fallback is not None:
            self.fallback.setup()
            self._local = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zpipe-fallback")
            threading.Thread(target=self._hedge_loop, name="zpipe-hedge", daemon=True).start()
        problems = []
        for link in self._links:
            try:
                self._prepare(link)
            except Exception as exc:
                if self.fallback is None and len(self._links) == 1:
                    raise
                problems.append(f"{link.endpoint}: {exc}")
                self._mark_down(link, str(exc))
        if problems and len(problems) == len(self._links) and self.fallback is None:
            raise StageError(f"no server for model {self.model!r} is usable: {'; '.join(problems)}")
        self._prober = threading.Thread(target=self._probe_loop, name="zpipe-probe", daemon=True)
        self._prober.start()
        self._pinger = threading.Thread(target=self._ping_loop, name="zpipe-ping", daemon=True)
        if self.ping_s:
            self._pinger.start()

    def _prepare(self, link: Link) -> None:
        if self.upload_library:
            version = link.client.upload(self.model, self.upload_library)
            deadline = time.monotonic() + self.timeout_s
            while (self._served_version(link) or 0) < version:  # the server loads it in the background
                if time.monotonic() > deadline:
                    raise ArtifactError(f"server {self.host!r} ({link.endpoint}) stored model {self.model!r} "
                                        f"version {version} but did not load it within {self.timeout_s:g}s")
                time.sleep(0.05)
            link.version = version
            return
        link.version = self.version
        served = self._served_version(link)
        if served is None or (self.version is not None and served != self.version):
            wanted = f"version {self.version}" if self.version is not None else "any version"
            health = link.client.health()
            detail = health.get(f"error:{self.model}")
            raise ArtifactError(f"model {self.model!r} ({wanted}) is not on server {self.host!r} ({link.endpoint}); "
                                f"it serves {health.get('models')}" + (f"; {detail}" if detail else "")
                                + ". Put it in the server's repository, or set upload = true")

    def _served_version(self, link: Link) -> int | None:
        return link.client.health(timeout_s=self.timeout_s).get(f"version:{self.model}")

    def teardown(self) -> None:
        self._stop.set()
        with self._hedge_cv:
            self._hedge_cv.notify()
        for thread in (self._pinger, self._prober):  # neither may use a client once it is closed
            if thread.is_alive():
                thread.join(timeout=self.probe_s + 5.0)
        with self._lock:
            movers = list(self._movers)
        for thread in movers:  # each sends the requests that waited for it before it ends
            thread.join(timeout=self.timeout_s + 5.0)
        with self._lock:
            retiring, self._retiring = self._retiring, []
        for client in [link.client for link in self._links] + retiring:
            client.close()
        if self.fallback is not None:
            self._local.shutdown(wait=True, cancel_futures=True)
            self.fallback.teardown()

    def __getstate__(self) -> dict:
        private = ("_links", "_retiring", "_movers", "_lock", "_rtt", "_beyond_ping", "_errors", "_local", "_prober",
                   "_pinger", "_stop", "_hedges", "_hedge_cv", "_hedge_seq", "_sent_at", "_send_seq",
                   "_connection_seq")
        return {k: v for k, v in self.__dict__.items() if k not in private}

    # -- requests ------------------------------------------------------------------------------------------------
    def handle(self, inputs: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> Future:
        outer: Future = Future()
        deadline = time.monotonic() + self.timeout_s
        if isinstance(meta.get("deadline"), (int, float)):  # the request's own deadline, if it is sooner
            deadline = min(deadline, meta["deadline"])
        # A request a gate already sent down both branches (a hedged probe) is being computed on the device: a
        # straggler hedge would compute it there a second time. (Any gate's note counts: with two gates in a row,
        # a probe of the first also goes without this hedge in the second's branch.)
        hedged_by_gate = any(key.startswith("hedge:") for key in meta)
        overlap = _overlap(meta) if hedged_by_gate else (0.0, 0.0)
        self._attempt(inputs, deadline, outer, tried=set(), why="", hedge=not hedged_by_gate, overlap=overlap)
        return outer

    def _attempt(self, inputs: Mapping[str, np.ndarray], deadline: float, outer: Future, tried: set[str],
                 why: str, hedge: bool = True, overlap: tuple[float, float] = (0.0, 0.0)) -> None:
        if outer.done():  # a hedge answered already: no retry elsewhere
            return
        remaining = deadline - time.monotonic()
        link = self._pick(tried)
        if remaining <= 0:
            _settle(outer, exc=PeerTimeout(f"model {self.model!r} on {self.host!r}: the request's deadline passed"
                                           + (f" ({why})" if why else ""), reason="timeout"))
            return
        if link is None:
            return self._run_locally(inputs, outer, why or self._down_summary())
        key = next(self._send_seq)
        sent = time.monotonic()
        with self._lock:
            if link.moving is not None:  # the old connection is paced as the slow spell taught it: wait for the new
                link.moving.append((inputs, deadline, outer, tried, why, hedge, overlap))
                return
            link.inflight += 1
            self._sent_at[key] = sent
            client, waits = link.client, link.server_wait
        tried.add(link.endpoint)
        try:
            inner = client.submit(self.model, inputs, version=link.version, timeout_s=remaining)
        except Exception as exc:  # refused before sending, or closed
            with self._lock:
                link.inflight -= 1
                del self._sent_at[key]
            self._failed(link, getattr(exc, "reason", "send_error"), str(exc))
            return self._attempt(inputs, deadline, outer, tried, f"{link.endpoint}: {exc}", hedge, overlap)

        def done(f: Future) -> None:
            try:
                with self._lock:
                    link.inflight -= 1
                    del self._sent_at[key]
                    self._newest_done = max(self._newest_done, sent)
                exc = f.exception()
                if exc is None:
                    rtt = time.monotonic() - sent
                    seconds, after = overlap  # the device computed the same request from `after` on, so long
                    self._succeeded(link, rtt, overlap_s=min(seconds, max(0.0, rtt - after)),
                                    measured=client is link.client, server_wait_s=waits)
                    _settle(outer, Outcome(f.result().outputs, {"at": f"{self.host} ({link.endpoint})"}))
                    return
                reason = getattr(exc, "reason", "error")
                if client is link.client:  # (a connection since replaced says nothing about the link now)
                    self._failed(link, reason, str(exc))
                if reason in _FALLBACK_REASONS:
                    self._attempt(inputs, deadline, outer, tried, f"{reason}: {exc}", hedge, overlap)
                else:
                    _settle(outer, exc=exc)
            except Exception as exc:  # never leave the request without an outcome
                _settle(outer, exc=exc)

        inner.add_done_callback(done)
        if hedge:
            self._arm_hedge(inputs, outer)

    def _arm_hedge(self, inputs: Mapping[str, np.ndarray], outer: Future) -> None:
        """With a fallback: start this request locally too if its reply is overdue (see _HEDGE_*)."""
        if self.fallback is None:
            return
        with self._lock:
            mean, std = self._rtt.mean, self._rtt.var ** 0.5
        if mean is None:
            return
        after = max(_HEDGE_FACTOR * mean, mean + _HEDGE_SIGMAS * std, _HEDGE_MIN_S)
        entry = (time.monotonic() + after, next(self._hedge_seq), inputs, outer, after)
        with self._hedge_cv:
            heapq.heappush(self._hedges, entry)
            if self._hedges[0] is entry:  # only an earlier wake-up than the one already planned needs a notify
                self._hedge_cv.notify()

    def _hedge_loop(self) -> None:
        while not self._stop.is_set():
            with self._hedge_cv:
                if not self._hedges:
                    self._hedge_cv.wait(0.5)
                    continue
                when, _, inputs, outer, after = self._hedges[0]
                if outer.done():
                    heapq.heappop(self._hedges)
                    continue
                if when > time.monotonic():
                    self._hedge_cv.wait(when - time.monotonic())
                    continue
                heapq.heappop(self._hedges)
            self._run_locally(inputs, outer, f"hedged: no reply from {self.host!r} after {after * 1000:.0f} ms")

    def _run_locally(self, inputs: Mapping[str, np.ndarray], outer: Future, reason: str) -> None:
        if self.fallback is None:
            _settle(outer, exc=StageError(f"model {self.model!r} on {self.host!r}: {reason}; no local fallback "
                                          "configured (fallback = true)"))
            return
        with self._lock:
            self._fallbacks += 1

        def run() -> None:
            if outer.done():  # the server answered while this waited for the local thread
                return
            try:
                outputs = self.fallback.process(inputs)
                _settle(outer, Outcome(outputs, {"at": f"device (fallback: {reason})"}))
            except Exception as exc:
                _settle(outer, exc=exc)

        self._local.submit(run)

    def process(self, inputs: Mapping[str, np.ndarray]) -> Any:
        return self.handle(inputs, {}).result().outputs

    # -- links and the breaker -----------------------------------------------------------------------------------
    def _down_summary(self) -> str:
        with self._lock:
            return "all servers down (" + "; ".join(f"{link.endpoint}: {link.down_reason}"
                                                    for link in self._links if not link.up) + ")"

    def _pick(self, tried: set[str]) -> Link | None:
        with self._lock:
            self._drop_lost()
            usable = [link for link in self._links if link.up and link.endpoint not in tried]
            if not usable:
                return None
            link = min(usable, key=lambda link: (link.inflight, link.last_used))  # ties: round robin
            link.last_used = time.monotonic()
            return link

    def _drop_lost(self) -> None:
        """Mark down each server whose connection dropped (ZeroMQ heartbeats, a RST). Call with the lock held."""
        for link in self._links:
            if link.up and not link.client.connected:
                link.up, link.down_reason = False, "connection lost"
                self._signals_changed()  # (it only wakes the worker: safe with the lock held)

    def _succeeded(self, link: Link, rtt: float, *, overlap_s: float = 0.0, measured: bool = True,
                   server_wait_s: float = 0.0) -> None:
        """Count a round trip. With ``overlap_s`` (a gate's hedged probe: the device computed the same request for
        about that long meanwhile, which on a small device slows its handling of this reply) the clean round trip
        lies between ``rtt - overlap_s`` and ``rtt``: an estimate above that range drops to the sample, one below it
        moves towards the range's low end (smoothed, or at once if the estimate is stale), one inside stays.
        (Counted as it is, a remote side probed so would look worse than it is, every time.) A request sent on a
        connection since replaced (``measured`` false) measured that connection: it counts as a success only.
        ``server_wait_s``: the wait for other clients' requests the server said when this one was sent, left out of
        the rest beyond the ping (the server's wait now goes in its place, see signals)."""
        with self._lock:
            link.failures = 0
            self._errors.add(0.0)
            if not measured:
                return
            stale = self._rtt_stale or (self._measured_at is not None and time.monotonic() - self._measured_at > 1.0)
            self._rtt_stale = False
            if overlap_s and self._rtt.mean is not None:
                if rtt < self._rtt.mean:
                    self._rtt.cap(rtt)
                    if stale:  # the bound is all there is: the next clean sample replaces it
                        self._support, self._bounds_only = 1, True
                    else:
                        self._support += 1
                    if link.ping.mean is not None and self._beyond_ping.mean is not None:
                        self._beyond_ping.cap(max(0.0, rtt - link.ping.mean))  # (a bound: nothing taken out)
                elif 0 < rtt - overlap_s <= self._rtt.mean:
                    self._support += 1  # a range with a low end (not just an upper bound) agrees with the estimate
                if rtt - overlap_s <= self._rtt.mean:
                    self._measured_at, self._ping_then = time.monotonic(), link.ping.mean
                    return
                rtt -= overlap_s  # slower than thought by at least this
            beyond_before = self._beyond_ping.mean
            if stale or (self._bounds_only and not overlap_s):
                # stale (requests went elsewhere, e.g. a probe), or made of bounds only: the new sample rules
                self._rtt, self._beyond_ping, self._support = Ewma(0.2), Ewma(0.2), 0
                beyond_before = None
            self._bounds_only = bool(overlap_s) and (self._bounds_only or self._rtt.mean is None)
            self._support += 1
            self._rtt.add(rtt)
            if link.ping.mean is not None:
                self._beyond_ping.add(_beyond(rtt - link.ping.mean, server_wait_s, beyond_before))
            self._measured_at, self._ping_then = time.monotonic(), link.ping.mean

    def _failed(self, link: Link, reason: str, text: str) -> None:
        with self._lock:
            self._errors.add(1.0)
            if reason not in _TRANSPORT_REASONS:
                return
            link.failures += 1
            trip = reason in ("disconnected", "refused") or link.failures >= self.breaker_failures
        if trip:
            self._mark_down(link, f"{reason}: {text}")

    def _mark_down(self, link: Link, why: str) -> None:
        with self._lock:
            link.up, link.down_reason = False, why
        self._signals_changed()

    def _probe_loop(self) -> None:
        """Every probe_s: a server whose connection dropped is down (as a request would find it); one that is down
        is asked for health, and is up again when it answers ready."""
        while not self._stop.wait(self.probe_s):
            with self._lock:
                self._drop_lost()
            for link in self._links:
                if link.up:
                    continue
                try:
                    health = link.client.health(timeout_s=max(self.probe_s, 0.5))
                    ok = health.get(f"version:{self.model}") is not None
                except Exception:
                    ok = False
                if ok:
                    with self._lock:
                        link.up, link.failures, link.down_reason = True, 0, ""
                        # what it measured before it went down says nothing now
                        link.ping, link.late_answer = Ewma(0.5), 0.0
                        link.server_wait, link.server_backlog = 0.0, None
                    self._signals_changed()

    def _signals_changed(self) -> None:
        """A ping went out or came back, or a link went down or up: the worker publishes within a few ms, so the
        gate can age a ping still out up to its decision (its answer would have been published)."""
        if self.context is not None:
            self.context.signals_changed()

    def signals(self) -> dict[str, Any]:
        """What this stage publishes on the signal board (read by the gate's offload policy)."""
        # The stall clock matters only to a ping still out (read outside the lock: a cgroup file).
        clock = self._cpu.stall_clock() if any(link.ping_out is not None for link in self._links) else None
        with self._lock:
            now = time.monotonic()
            pings = self._pings()
            pairs = device_stalls_left_out(pings, clock)
            # rtt_s: the round trip a request would see now (see expected_rtt). Its pieces go along, so that the
            # gate works it out at its decision: a ping still out when this was published is older by then.
            wait, backlog = self._server_load()
            return {"rtt_s": expected_rtt(pairs, self._beyond_ping.mean, self._rtt.mean, now, wait),
                    # the spread of the round trips, and of the pings (a link whose delay just jumped is uncertain)
                    "rtt_std_s": (self._rtt.var + self._ping_var()) ** 0.5,
                    "rtt_measured_s": self._rtt.mean, "rtt_support": self._support, "ping_s": link_delay(pairs, now),
                    "pings": pings, "beyond_ping_s": self._beyond_ping.mean,
                    "server_wait_s": wait, "server_backlog": backlog,
                    "ping_best_s": min((l.best_ping for l in self._links if math.isfinite(l.best_ping)), default=None),
                    "late_answer_s": self._late_answer(),
                    "measured_at": self._measured_at, "ping_then_s": self._ping_then,
                    "inflight": sum(link.inflight for link in self._links),
                    # Requests sent before one that already finished are stragglers (a lost reply, a retransmit),
                    # not news about the link: newer ones came back.
                    "oldest_sent_at": min((t for t in self._sent_at.values() if t > self._newest_done),
                                          default=None), "error_rate": self._errors.mean or 0.0,
                    "up": any(link.up for link in self._links), "fallbacks": self._fallbacks,
                    "moving": self._all_moving(),
                    "stalled_pings": self._stalled_pings, "pings_sent": self._pings_sent,
                    "fresh_connections": self._fresh_connections,
                    "requests_sent": self._retired_counts[0] + sum(c.requests_sent for c in self._clients()),
                    "bytes_sent": self._retired_counts[1] + sum(c.bytes_sent for c in self._clients()),
                    "down": [f"{link.endpoint}: {link.down_reason}" for link in self._links if not link.up]}


    def _resume(self, link: Link) -> None:
        """Send the requests that waited for ``link``'s move (each to its deadline, as any request)."""
        with self._lock:
            waiting, link.moving = link.moving or [], None
        self._signals_changed()  # (the gate probes a link again once it is not moving)
        for args in waiting:
            try:
                self._attempt(*args)
            except Exception as exc:  # never leave a request without an outcome (e.g. a fallback pool shut down)
                _settle(args[2], exc=exc)

    def _clients(self) -> list[Any]:
        """Every open client: the links' and those left for a fresh connection. Call with the lock held."""
        return [link.client for link in self._links] + self._retiring


def _beyond(rest: float, server_wait_s: float, mean: float | None) -> float:
    """A round trip's part beyond the ping (``rest``) less the wait for other clients the server said when it was
    sent: at least half the part as smoothed so far (``mean``; none yet: nothing kept). The said wait is up to a
    ping interval old and counts a running request's whole compute time, so it can exceed what the request met:
    taken out in full, a draining queue would make the sample (nearly) zero and the remote side look as fast as its
    ping."""
    if not server_wait_s:
        return max(0.0, rest)
    return max(0.0, rest - server_wait_s, min(rest, 0.5 * mean) if mean is not None else 0.0)


def _overlap(meta: Mapping[str, Any]) -> tuple[float, float]:
    """(how long, from when on) the device computes a gate's hedged probe alongside its remote copy, from the gate's
    notes ``overlap_s:<gate>`` and ``overlap_after_s:<gate>``; without a note, for any time from the start."""
    def note(name: str) -> float | None:
        values = [v for key, v in meta.items() if key.startswith(name + ":") and isinstance(v, (int, float))]
        return max(values) if values else None

    seconds = note("overlap_s")
    return (math.inf if seconds is None else seconds, note("overlap_after_s") or 0.0)


def _settle(outer: Future, result: Any = None, *, exc: BaseException | None = None) -> None:
    """Give the request its outcome unless another attempt (a hedge, or the server) already did."""
    try:
        if exc is not None:
            outer.set_exception(exc)
        else:
            outer.set_result(result)
    except InvalidStateError:
        pass
