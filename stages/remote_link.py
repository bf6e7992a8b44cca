"""A remote stand-in's link to each server: its connection and circuit breaker's state, pings and what they show,
and moves to a fresh connection (used by stages/remote.py: RemoteStage keeps its links through LinkKeeper).

* Pings (``ping_s`` > 0; zpipe turns them on when a gate in the topology has a policy): every ``ping_s`` a
  heartbeat goes to each server, which its loop answers at once. The published round trip is then the link's
  delay *now* (the smoothed ping, or the age of a ping still out if that is longer, up to the age at which it is
  late: policy.late_by) plus the rest of a request's time as last measured (transfer and server time: the
  smoothed round trip minus the ping at the time). The pieces are published within a few ms of each ping sent
  or answered, and the gate adds them up when it decides: a ping still out counts with its age then. A link
  that gets slower shows within one ping, before a request is sent into it; with requests going local, so does
  a link that recovers. A ping names the model, and its answer says how long a new request would wait for other
  clients' requests at that server (``server_wait_s``): the published round trip counts that wait now instead of
  the one its requests met. A ping is under 100 bytes each way and no tensor. Under a CPU quota, the time the
  device's quota was used up during a ping (no thread of the device ran: its answer may have waited) is left out
  of it, here and in the gate's ageing (see LinkKeeper._pinged).
* A fresh connection after a slow spell: when a link's pings have been over twice its best and one comes back
  near it, the stand-in opens a new connection to that server; requests for it wait for the new connection's
  first ping answer and go out on it, and the old one closes when its requests have finished
  (``fresh_connections`` on the board). The kernel's congestion control keeps what it learnt on the slow link: on
  the test bed (BBR), a connection that carried the lossy phase went on pacing at the ~1 Mbit/s it had measured
  there for 2-3 s after the link recovered (bench/RESULTS.md, policy session 9). A new connection measures the
  link afresh. A ping stuck in a slow spell (behind a lost segment) makes the stand-in look on a fresh connection
  (LinkKeeper._look).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from concurrent.futures import Future
from typing import Any

from zpipe.board import Ewma
from zpipe.errors import PeerTimeout
from zpipe.policy import late_after, stalled

__all__ = ["Link", "LinkKeeper"]

log = logging.getLogger("zpipe.stages.remote")

# A slow spell: the smoothed ping above this many times the link's best, plus the margin (sub-ms links jitter by
# more than 2x). It is over at a ping within _RECOVERED x best + 2 ms.
_SPELL_FACTOR, _SPELL_MARGIN_S, _RECOVERED = 2.0, 0.005, 1.25
_FRESH_EVERY_S = 5.0  # at most one fresh connection per link this often (a link whose delay swings all the time)
# A ping out this much longer than the spell's own (_STUCK x its smoothed ping, at least _STUCK_MIN_S) is stuck: a
# look on a fresh connection, at most every _LOOK_EVERY_S (see _look).
_STUCK, _STUCK_MIN_S, _LOOK_EVERY_S = 2.0, 0.15, 1.0


class Link:
    """One server: its client, requests in flight, and the circuit breaker."""

    def __init__(self, client: Any, endpoint: str) -> None:
        self.client, self.endpoint = client, endpoint
        self.inflight = 0
        self.version: int | None = None  # pinned per server: each numbers its own uploads
        self.last_used = 0.0
        self.failures = 0
        self.up = True
        self.down_reason = ""
        self.ping = Ewma(0.5)  # heartbeat round trips
        self.late_answer = 0.0  # how much later than late (by the smoothed ping before it) the newest ping came
        self.ping_out: float | None = None  # when the ping still unanswered was sent
        self.ping_stall_clock: tuple[float, float] | None = None  # the device's stall clock then (see board)
        self.best_ping = math.inf  # the lowest smoothed ping seen
        self.spell = False  # the pings are (or were, until one came back near the best) twice the best
        self.moving: list[tuple] | None = None  # while it moves to a fresh connection: the requests waiting for it
        self.spell_peak = 0.0  # the highest smoothed ping of the spell
        self.fresh_at = -math.inf  # when it last moved to a fresh connection
        self.looked_at = -math.inf  # when a stuck ping last made it look at a fresh connection
        # What its newest ping answer said of the server's load from other clients (zpipe.client.Pong): requests
        # queued or running there, and how long a new request would wait for them.
        self.server_backlog: int | None = None
        self.server_wait = 0.0


class LinkKeeper:
    """The pings and connection moves of a remote stand-in's links (a mixin of RemoteStage, whose setup makes the
    state they share: ``_links``, ``_lock``, ``_stop``, ``_cpu``, the movers and retiring connections, the counts on
    its board entry)."""

    def _ping_loop(self) -> None:
        """Every ping_s, a heartbeat to each server that is up and has none out; one whose ping is stuck in a slow
        spell gets a look on a fresh connection (_look). (Every ping_s also while the device uses up its CPU: a
        device computing locally needs its pings to see the link recover; bench/RESULTS.md, policy session 13.)"""
        while not self._stop.wait(self.ping_s):
            for link in self._links:
                clock = self._cpu.stall_clock()
                look = send = False
                with self._lock:
                    if not _usable(link):
                        continue
                    now, client = time.monotonic(), link.client
                    if link.ping_out is None:
                        send, sent = True, now
                        link.ping_out, link.ping_stall_clock = sent, clock
                        self._pings_sent += 1
                    elif link.spell and link.moving is None and not self._stop.is_set() \
                            and now - link.ping_out > max(_STUCK_MIN_S, _STUCK * (link.ping.mean or 0.0)) \
                            and now - link.looked_at >= _LOOK_EVERY_S:
                        look, link.looked_at = True, now
                if look:
                    self._start_mover(self._look, link, client)
                if not send:
                    continue
                try:
                    future = client.ping(timeout_s=max(2.0, 10 * self.ping_s), model=self.model)
                except Exception:  # closed or refused: the breaker deals with the link
                    with self._lock:
                        link.ping_out = None
                    continue
                self._signals_changed()
                future.add_done_callback(lambda f, link=link, sent=sent, client=client:
                                         self._pinged(link, sent, f, client))

    def _pinged(self, link: Link, sent: float, future: Future, client: Any) -> None:
        """A ping's answer (or its timeout). While the device's CPU quota was used up, no thread of it ran, and the
        answer may have waited: the link's delay lies between the round trip less that time and the round trip.
        A ping slower than the link's figure counts by the low end of that range; one whose range reaches the
        figure says nothing new and is left out (``stalled_pings``). Policy run 57: pings took 22 ms on a 20 ms
        link while the device had CPU, 50 ms median and up to 170 ms while it had none. The answer of a ping sent
        on a connection the link has since left says nothing about the one it is on: ignored. A ping that ends a
        slow spell is the link's delay from then on (the smoothing would take several pings to come down)."""
        exc = future.exception()
        now, clock = time.monotonic(), self._cpu.stall_clock()
        with self._lock:
            if client is not link.client:
                return
            device_stall = stalled(link.ping_stall_clock, clock)
            link.ping_out = None
            if exc is None:
                pong = future.result()
                rtt = pong.rtt_s
                link.server_backlog, link.server_wait = pong.backlog, pong.wait_s or 0.0
            elif getattr(exc, "reason", "") == "timeout":  # unanswered: the link was at least that slow
                rtt = now - sent
            else:  # a lost connection or a closed client says nothing about delay: the breaker handles those
                rtt = None
            fresh = False
            if rtt is not None:
                mean = link.ping.mean
                if mean is not None and rtt > mean and rtt - device_stall <= mean:
                    self._stalled_pings += 1
                    link.late_answer = 0.0  # (the link was within its figure: no warning stands)
                else:
                    counted = rtt if mean is None or rtt <= mean else rtt - device_stall
                    # A ping back later than late is a warning like one still out that long (see policy.late_by),
                    # until the next one: its smoothed figure moves half way.
                    link.late_answer = 0.0 if mean is None else max(0.0, counted - late_after(mean))
                    link.ping.add(counted)
                    if _spell_over(link, counted):
                        link.ping = Ewma(0.5)
                        link.ping.add(counted)
                        if link.up and link.moving is None and not self._stop.is_set() \
                                and now - link.fresh_at >= _FRESH_EVERY_S:
                            fresh, link.fresh_at, link.moving = True, now, []
                        else:
                            link.spell_peak = 0.0
        self._signals_changed()
        if fresh and not self._start_mover(self._reconnect, link):
            self._resume(link)  # (no thread: the requests waiting for the move go on the old connection)

    def _start_mover(self, target: Any, *args: Any) -> bool:
        """Run ``target(*args)`` (a move to a fresh connection, or a look) on a thread teardown waits for; False if
        none could start (stopping, or the process is out of threads). Call without the lock (a thread start can
        take ms on a busy device)."""
        thread = threading.Thread(target=target, args=args, name="zpipe-reconnect", daemon=True)
        try:
            thread.start()
        except RuntimeError:
            log.exception("model %r on %r: no thread for a fresh connection", self.model, self.host)
            return False
        with self._lock:
            self._movers = [t for t in self._movers if t.is_alive()] + [thread]
        return True

    def _reconnect(self, link: Link) -> None:
        """Move ``link`` to a fresh connection once that answers a ping (~2 round trips: the handshake, the ping);
        requests for it meanwhile wait and then go on the fresh one (or on the old one, if it does not answer:
        whatever happens here, they are sent). The old one closes when its requests are done, at least 1 s after
        the move (a request that took the old client just before is not cut) and at most ``timeout_s``."""
        old = None
        try:
            old = self._move(link)
        except Exception:  # (not expected) the old connection carries on
            log.exception("model %r on %r: moving to a fresh connection to %s failed", self.model, self.host,
                          link.endpoint)
        finally:
            self._resume(link)
        if old is not None:
            self._retire(old)

    def _look(self, link: Link, looked_from: Any) -> None:
        """``link``'s ping is stuck in a slow spell: behind a segment lost on a lossy link, its answer waits for
        TCP's retransmission (hundreds of ms, more after backoff), and so does every ping and request after it on
        that connection, also once the link has recovered: the policy would learn of it only then (session 12,
        runs 9.2-9.4: the switch back to remote 1.11 s after the restore, against 0.60 when no ping was stuck). So
        ping on a fresh connection: back near the link's best, the spell is over, and the link moves
        (as when a ping ends the spell, on a connection opened then), unless it left ``looked_from`` meanwhile; the
        connection looked on is closed."""
        fresh = None
        try:
            fresh = self._fresh_client(link)
            self._first_ping(fresh, link)  # (its round trip has the handshake in it)
            pong = fresh.ping(timeout_s=max(0.5, 10 * link.best_ping), model=self.model).result()
        except Exception as exc:  # no better: the old connection and the breaker carry on
            log.debug("model %r on %r: a look at a fresh connection to %s: %s", self.model, self.host,
                      link.endpoint, exc)
            if fresh is not None:
                fresh.close()
            return
        fresh.close()  # (opened during the spell: its congestion state is the slow link's, see below)
        with self._lock:
            recovered = link.client is looked_from and link.moving is None and link.spell and link.up \
                and not self._stop.is_set() and pong.rtt_s <= _RECOVERED * link.best_ping + 0.002
            if recovered:
                link.ping, link.ping_out, link.late_answer, link.spell = Ewma(0.5), None, 0.0, False
                link.ping.add(pong.rtt_s)
                link.server_backlog, link.server_wait = pong.backlog, pong.wait_s or 0.0
                link.fresh_at, link.moving = time.monotonic(), []
        if not recovered:
            return
        log.info("model %r on %r: a ping to %s was stuck after a slow spell, and one on a fresh connection came back "
                 "in %.1f ms (best %.1f): moving to another", self.model, self.host, link.endpoint,
                 pong.rtt_s * 1e3, link.best_ping * 1e3)
        self._signals_changed()
        # The spell is over: as when a ping ends it, the link moves to a connection opened now. Not to the one
        # looked on: opened during the spell, its congestion control learnt the slow link in its handshake (the
        # policy bench, session 12: the first request on it took 239-301 ms, ~70-100 on one opened after).
        self._reconnect(link)

    def _retire(self, old: Any) -> None:
        """Close a connection a link has left once its requests are done: at least 1 s after the move (a request
        that took it just before is not cut) and at most ``timeout_s``."""
        started = time.monotonic()
        while not self._stop.wait(0.1):
            waited = time.monotonic() - started
            if (waited >= 1.0 and old.in_flight == 0) or waited > self.timeout_s:
                break
        with self._lock:
            if old not in self._retiring:  # teardown took it
                return
            self._retiring.remove(old)
            self._retired_counts[0] += old.requests_sent
            self._retired_counts[1] += old.bytes_sent
        old.close()

    def _move(self, link: Link) -> Any:
        """Open a fresh connection for ``link`` and swap it in once it answers a ping and shows its handshake done;
        returns the old client (now retiring), or None when the link stays on it."""
        fresh = self._fresh_client(link)
        try:
            self._first_ping(fresh, link)
        except Exception as exc:  # the server went away meanwhile: the old connection and the breaker carry on
            log.info("model %r on %r: no fresh connection to %s: %s", self.model, self.host, link.endpoint, exc)
            fresh.close()
            return None
        with self._lock:
            if self._stop.is_set():
                link.spell_peak = 0.0
                old = None
            else:
                old, link.client = link.client, fresh
                link.ping_out = None  # (a ping out on the old connection is ignored when it comes back)
                self._swapped(link, old)
        if old is None:
            fresh.close()
            return None
        log.info("model %r on %r: the link to %s is back near its best ping (%.1f ms) after a slow spell: moved to "
                 "a fresh connection", self.model, self.host, link.endpoint, link.best_ping * 1e3)
        return old

    def _fresh_client(self, link: Link) -> Any:
        """A new connection to ``link``'s server, started. The same client to the server (zpipe.server: its load
        figures leave a client's own requests out, and those still on the old connection are this stand-in's), on
        a connection of its own: ``<identity>~<n>`` (see zpipe.server.client_family), never one used before (a
        ROUTER ignores a peer whose identity it still holds)."""
        from zpipe.client import RemoteClient

        family = link.client.identity.partition("~")[0]
        return RemoteClient(link.endpoint, server_key=self.server_key, client_key=self.client_key,
                            timeout_s=self.timeout_s, heartbeat_s=self.heartbeat_s,
                            identity=f"{family}~{next(self._connection_seq)}").start()

    def _first_ping(self, fresh: Any, link: Link) -> float:
        """Ping on ``fresh`` and wait for its handshake to show done; the round trip (PeerTimeout if none)."""
        wait_s = max(0.5, 10 * link.best_ping)
        rtt = fresh.ping(timeout_s=wait_s, model=self.model).result().rtt_s
        deadline = time.monotonic() + wait_s  # the ping's answer may be read before the handshake's event
        while not fresh.connected and time.monotonic() < deadline:
            time.sleep(0.002)
        if not fresh.connected:
            raise PeerTimeout(f"no handshake within {wait_s:g}s")
        return rtt

    def _swapped(self, link: Link, old: Any) -> None:
        """``link`` moved from ``old`` to a fresh connection: count it. Call with the lock held."""
        self._fresh_connections += 1
        self._retiring.append(old)
        # The round trip was measured on the old connection, paced as the spell taught it (a probe sent between
        # the spell's end and this move, too): the next sample replaces it, and the gate sees it as measured on
        # the slow link, so a remote probe is due at once (policy: "link faster").
        self._rtt_stale = True
        self._ping_then = max(self._ping_then or 0.0, link.spell_peak)
        link.spell_peak = 0.0

    def _all_moving(self) -> bool:
        """Every usable link is moving to a fresh connection: a request sent now waits for a move (see
        policy.Signals.remote_moving). Call with the lock held."""
        usable = [link for link in self._links if _usable(link)]
        return bool(usable) and all(link.moving is not None for link in usable)

    def _pinged_links(self) -> list[Link]:
        """The usable links with a smoothed ping; call with the lock held."""
        return [link for link in self._links if _usable(link) and link.ping.mean is not None]

    def _pings(self) -> list[tuple[float, float | None, tuple[float, float] | None]]:
        """Each usable link's (smoothed ping, when its ping still out was sent or None, the device's stall clock
        then or None): see policy.device_stalls_left_out. Call with the lock held."""
        return [(link.ping.mean, link.ping_out, link.ping_stall_clock) for link in self._pinged_links()]

    def _late_answer(self) -> float:
        """How much later than late the usable links' newest pings came back, over the links (see _pinged); call
        with the lock held."""
        links = self._pinged_links()
        return sum(link.late_answer for link in links) / len(links) if links else 0.0

    def _ping_var(self) -> float:
        """The usable links' mean ping variance; call with the lock held."""
        links = self._pinged_links()
        return sum(link.ping.var for link in links) / len(links) if links else 0.0

    def _server_load(self) -> tuple[float, int | None]:
        """The wait for other clients' requests over the servers requests may go to (their mean, as link_delay
        takes the links' delays: requests are spread by how many each has in flight, not by its wait), and how many
        such requests they hold, as their newest ping answers said. Call with the lock held."""
        usable = [link for link in self._links if _usable(link)] or self._links
        said = [link.server_backlog for link in usable if link.server_backlog is not None]
        return sum(link.server_wait for link in usable) / len(usable), sum(said) if said else None


def _spell_over(link: Link, ping: float) -> bool:
    """Count a ping of ``link`` (its smoothed ping already has it): True when it ends a slow spell (see
    _SPELL_FACTOR). The ping itself says when it is over: the smoothed ping takes a few more to come down, and a
    request sent meanwhile on the old connection is paced at the rate it learnt on the slow link (and holds the
    next pings up behind it). Call with the lock held."""
    link.best_ping = min(link.best_ping, link.ping.mean)
    if link.spell and ping <= _RECOVERED * link.best_ping + 0.002:
        link.spell = False
        return True
    if link.ping.mean > _SPELL_FACTOR * link.best_ping + _SPELL_MARGIN_S:
        link.spell = True
        link.spell_peak = max(link.spell_peak, link.ping.mean)
    return False


def _usable(link: Link) -> bool:
    """Up (breaker closed) and connected: a link requests may go to now."""
    return link.up and link.client.connected
