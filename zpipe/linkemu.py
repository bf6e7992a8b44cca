"""A TCP link emulator: a proxy that adds one-way delay and a bandwidth cap per direction, and can cut the link.

    emu = LinkEmulator(listen=("127.0.0.1", 0), target=("127.0.0.1", 5555), delay_ms=10, rate_mbit=100).start()
    ... connect to tcp://127.0.0.1:{emu.port} instead of the server ...
    emu.set(delay_ms=50, rate_mbit=20)      # the network got worse, while traffic flows
    emu.outage(); emu.restore()             # cut every connection and refuse new ones; then heal
    emu.stats()                             # bytes each way: independent of zpipe's own counters

Each direction is a serial link: a chunk leaves after the previous one finished (``len * 8 / rate``), then
arrives ``delay_ms`` later; reading stops while a direction has more than ``queue_bytes`` in transit, so a slow link
back-pressures the sender as a real one does. Loss is not emulated (TCP would retransmit it: use delay and
outages), see ../shared/testbed for a packet-level emulator. It only ever connects to ``target``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass

__all__ = ["LinkEmulator", "parse_address"]

_CHUNK = 64 * 1024


def parse_address(text: str) -> tuple[str, int]:
    """``"tcp://127.0.0.1:5555"`` or ``"127.0.0.1:5555"`` -> ("127.0.0.1", 5555)."""
    host, _, port = text.removeprefix("tcp://").rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


@dataclass
class _Direction:
    name: str
    busy_until: float = 0.0  # when the serial link finishes sending what it already took (shared: one link)
    bytes: int = 0
    chunks: int = 0


class LinkEmulator:
    """Runs its own asyncio loop in a background thread; every public method is thread-safe."""

    def __init__(self, *, listen: tuple[str, int], target: tuple[str, int], delay_ms: float = 0.0,
                 rate_mbit: float | None = None, queue_bytes: int = 4 << 20) -> None:
        self.listen, self.target = listen, target
        self.delay_ms, self.rate_mbit = float(delay_ms), rate_mbit
        self.queue_bytes = queue_bytes
        self.up = True
        self.port: int | None = None
        self._dirs = {"up": _Direction("up"), "down": _Direction("down")}  # up: client -> target
        self._conns: set[asyncio.StreamWriter] = set()
        self._connections_total = 0
        self._refused = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None

    # -- control (any thread) ------------------------------------------------------------------------------------
    def start(self) -> "LinkEmulator":
        self._thread = threading.Thread(target=self._run, name="zpipe-linkemu", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("link emulator did not start")
        if self.port is None:
            raise OSError(f"link emulator cannot listen on {self.listen}")
        return self

    def set(self, *, delay_ms: float | None = None, rate_mbit: float | None = None) -> None:
        if delay_ms is not None:
            self.delay_ms = float(delay_ms)
        if rate_mbit is not None:
            self.rate_mbit = rate_mbit if rate_mbit > 0 else None

    def outage(self) -> None:
        """Cut every connection now and refuse new ones until :meth:`restore`."""
        self.up = False
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._abort_all)

    def restore(self) -> None:
        self.up = True

    def stats(self) -> dict[str, float]:
        return {"up_bytes": self._dirs["up"].bytes, "down_bytes": self._dirs["down"].bytes,
                "up_chunks": self._dirs["up"].chunks, "down_chunks": self._dirs["down"].chunks,
                "connections": self._connections_total, "open": len(self._conns), "refused": self._refused,
                "link_up": self.up, "delay_ms": self.delay_ms, "rate_mbit": self.rate_mbit or 0}

    def close(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)

    def __enter__(self) -> "LinkEmulator":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the loop ------------------------------------------------------------------------------------------------
    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            server = loop.run_until_complete(asyncio.start_server(self._accept, *self.listen))
            self.port = server.sockets[0].getsockname()[1]
        except OSError:
            loop.close()
            self._ready.set()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            server.close()
            self._abort_all()
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            if tasks:
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.close()

    def _abort_all(self) -> None:
        for writer in list(self._conns):
            writer.transport.abort()
        self._conns.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            self._refused += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._connections_total += 1
        self._conns.update((writer, up_writer))
        try:
            await asyncio.gather(self._pump(reader, up_writer, self._dirs["up"]),
                                 self._pump(up_reader, writer, self._dirs["down"]))
        except asyncio.CancelledError:
            pass  # the emulator is closing; ending quietly keeps asyncio's stream callback from complaining
        finally:
            for w in (writer, up_writer):
                self._conns.discard(w)
                w.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, d: _Direction) -> None:
        loop = asyncio.get_running_loop()
        transit: asyncio.Queue = asyncio.Queue()
        space = asyncio.Event()
        space.set()
        in_transit = 0  # this connection's bytes taken but not yet delivered (bounded by queue_bytes)

        async def deliver() -> None:
            nonlocal in_transit
            while True:
                due, data = await transit.get()
                if data is None:
                    return
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
                in_transit -= len(data)
                if in_transit <= self.queue_bytes:
                    space.set()

        deliverer = asyncio.ensure_future(deliver())
        try:
            while True:
                await space.wait()
                data = await reader.read(_CHUNK)
                if not data:
                    break
                d.bytes += len(data)
                d.chunks += 1
                now = loop.time()
                sent = max(now, d.busy_until)
                if self.rate_mbit:
                    sent += len(data) * 8 / (self.rate_mbit * 1e6)
                d.busy_until = sent
                in_transit += len(data)
                if in_transit > self.queue_bytes:
                    space.clear()
                transit.put_nowait((sent + self.delay_ms / 1000, data))
            transit.put_nowait((0.0, None))
            await deliverer
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            pass
        finally:
            deliverer.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                await deliverer
