"""The link emulator: delay and rate take effect, outages cut and refuse, and the link works again after one."""

from __future__ import annotations

import time

import pytest
import zmq

from zpipe.linkemu import LinkEmulator, parse_address


@pytest.fixture
def echo(ctx):
    server = ctx.socket(zmq.ROUTER)
    server.linger = 0
    port = server.bind_to_random_port("tcp://127.0.0.1")
    yield server, port
    server.close()


def roundtrip(client, server, payload: bytes) -> float:
    started = time.monotonic()
    client.send(payload)
    assert server.poll(10_000)
    server.send_multipart(server.recv_multipart())
    assert client.poll(10_000)
    assert client.recv() == payload
    return time.monotonic() - started


def test_delay_rate_outage_and_restore(ctx, echo):
    server, port = echo
    with LinkEmulator(listen=("127.0.0.1", 0), target=("127.0.0.1", port), delay_ms=10, rate_mbit=100) as emu:
        client = ctx.socket(zmq.DEALER)
        client.linger = 0
        client.connect(f"tcp://127.0.0.1:{emu.port}")
        try:
            roundtrip(client, server, b"warm")
            small = min(roundtrip(client, server, b"x" * 10) for _ in range(3))
            assert 0.019 < small < 0.035  # 2 × 10 ms
            big = roundtrip(client, server, b"y" * (1 << 20))
            assert 0.17 < big < 0.35  # 2 × (1 MiB at 100 Mbit/s = 84 ms + 10 ms)
            stats = emu.stats()
            assert stats["up_bytes"] >= (1 << 20) and stats["down_bytes"] >= (1 << 20)
            emu.outage()
            time.sleep(0.2)
            assert emu.stats()["open"] == 0
            emu.restore()
            emu.set(delay_ms=0, rate_mbit=0)
            deadline = time.monotonic() + 10
            payload = b"z" * (4 << 20)  # more than the emulator buffers: its accounting must have healed
            client.send(payload)
            while not server.poll(100):
                assert time.monotonic() < deadline, "the link did not come back after the outage"
            server.send_multipart(server.recv_multipart())
            assert client.poll(10_000) and client.recv() == payload
        finally:
            client.close()


def test_parse_address():
    assert parse_address("tcp://127.0.0.1:5555") == ("127.0.0.1", 5555)
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_address("nowhere")
