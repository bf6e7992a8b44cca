"""Tensor echo round trip: zpipe framing + sockets vs raw pyzmq, over tcp on 127.0.0.1, two processes.

    python bench/framing.py [--quick]

An echo server (a child process) serves two ROUTER sockets: one echoes raw frames back untouched (the baseline:
pyzmq with copy=False), the other decodes each message with zpipe.framing (validation, read-only views) and sends
a REPLY message re-encoded from those views. The client (this process) alternates between the two in rounds, so
both see the same machine noise. A third row runs a whole zpipe Pipeline (driver -> worker process with an
identity stage -> driver, over ipc) against a raw ipc echo with the same process layout.

A "raw 3-frame" column sends raw pyzmq messages with zpipe's frame layout (two small frames, then the tensor) and
no zpipe code, to separate the cost of the layout from the cost of zpipe's Python.

Prints a table of median round-trip times and the ratio zpipe/raw per payload size, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np
import zmq

from zpipe.framing import Kind, Message
from zpipe.transport import make_socket, recv_message, send_message

SIZES = {"4KiB": 4 << 10, "64KiB": 64 << 10, "1MiB": 1 << 20, "16MiB": 16 << 20}
ITERS = {"4KiB": 2000, "64KiB": 1000, "1MiB": 300, "16MiB": 30}
TARGETS = {"4KiB": 1.5, "64KiB": None, "1MiB": 1.10, "16MiB": 1.10}


def serve(raw_endpoint: str, zp_endpoint: str) -> None:
    ctx = zmq.Context()
    raw = make_socket(ctx, zmq.ROUTER, hwm=1000)
    zp = make_socket(ctx, zmq.ROUTER, hwm=1000)
    raw.bind(raw_endpoint)
    zp.bind(zp_endpoint)
    print(raw.getsockopt_string(zmq.LAST_ENDPOINT), zp.getsockopt_string(zmq.LAST_ENDPOINT), flush=True)
    poller = zmq.Poller()
    poller.register(raw, zmq.POLLIN)
    poller.register(zp, zmq.POLLIN)
    while True:
        for sock, _ in poller.poll():
            if sock is raw:
                frames = raw.recv_multipart(copy=False)
                if frames[-1].bytes == b"quit":
                    return
                raw.send_multipart(frames, copy=False)
            else:
                envelope, msg = recv_message(zp, envelope_frames=1)
                send_message(zp, Message(kind=Kind.REPLY, request_id=msg.request_id, tensors=msg.tensors),
                             envelope=envelope)


def _time_raw(sock: zmq.Socket, payload: np.ndarray, iters: int) -> list[float]:
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        sock.send(payload, copy=False)
        frame = sock.recv(copy=False)
        np.frombuffer(frame.buffer, dtype=payload.dtype)
        times.append(time.perf_counter() - t0)
    return times


def _time_raw3(sock: zmq.Socket, payload: np.ndarray, iters: int) -> list[float]:
    """Raw pyzmq with zpipe's frame layout (two small frames, then the tensor), no framing code: isolates the
    cost of the multipart layout itself from the cost of zpipe's Python."""
    prefix, header = b"ZP\x01\x01" + bytes(8), b'{"t":[["x","<f4",[%d]]],"m":{}}' % payload.size
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        sock.send_multipart([prefix, header, payload], copy=False)
        frames = sock.recv_multipart(copy=False)
        np.frombuffer(frames[-1].buffer, dtype=payload.dtype)
        times.append(time.perf_counter() - t0)
    return times


def _time_zpipe(sock: zmq.Socket, payload: np.ndarray, iters: int) -> list[float]:
    times = []
    for i in range(iters):
        t0 = time.perf_counter()
        send_message(sock, Message(kind=Kind.REQUEST, request_id=i, tensors={"x": payload}))
        _, msg = recv_message(sock)
        msg.tensors["x"]
        times.append(time.perf_counter() - t0)
    return times


def bench_sockets(rounds: int, scale: float) -> dict:
    server = subprocess.Popen([sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True)
    raw_ep, zp_ep = server.stdout.readline().split()
    ctx = zmq.Context()
    raw = make_socket(ctx, zmq.DEALER, hwm=1000)
    zp = make_socket(ctx, zmq.DEALER, hwm=1000)
    raw.connect(raw_ep)
    zp.connect(zp_ep)
    results = {}
    try:
        for label, nbytes in SIZES.items():
            payload = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8).view(np.float32)
            iters = max(5, int(ITERS[label] * scale))
            _time_raw(raw, payload, max(3, iters // 10))  # warm-up both paths
            _time_zpipe(zp, payload, max(3, iters // 10))
            raw_t, raw3_t, zp_t = [], [], []
            for _ in range(rounds):
                raw_t += _time_raw(raw, payload, iters // rounds or 1)
                raw3_t += _time_raw3(raw, payload, iters // rounds or 1)
                zp_t += _time_zpipe(zp, payload, iters // rounds or 1)
            results[label] = (float(np.median(raw_t)), float(np.median(zp_t)), float(np.median(raw3_t)))
    finally:
        raw.send(b"quit")
        server.wait(timeout=10)
        raw.close()
        zp.close()
        ctx.term()
    return results


def _pipeline_echo(x):
    return x["x"]


def bench_pipeline(rounds: int, scale: float) -> dict:
    """Whole zpipe Pipeline (driver -> worker -> driver over ipc) vs a raw ipc echo through a child process."""
    import tempfile

    from zpipe import Pipeline, PythonStage, StageSpec, Topology

    topo = Topology(inputs=["x"], outputs=["y"], stages=[
        StageSpec(name="echo", stage=PythonStage(function=_pipeline_echo), inputs=["x"], outputs=["y"])])
    tmp = tempfile.mkdtemp(prefix="zpb-")
    server = subprocess.Popen([sys.executable, __file__, "--serve", "--raw", f"ipc://{tmp}/raw",
                               "--zp", f"ipc://{tmp}/zp"], stdout=subprocess.PIPE, text=True)
    raw_ep, _ = server.stdout.readline().split()
    ctx = zmq.Context()
    raw = make_socket(ctx, zmq.DEALER, hwm=1000)
    raw.connect(raw_ep)
    results = {}
    try:
        with Pipeline(topo) as pipe:
            for label, nbytes in SIZES.items():
                payload = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8).view(np.float32)
                iters = max(5, int(ITERS[label] * scale) // 2)
                for _ in range(3):
                    pipe.infer({"x": payload})
                _time_raw(raw, payload, 3)
                raw_t, zp_t = [], []
                for _ in range(rounds):
                    raw_t += _time_raw(raw, payload, iters // rounds or 1)
                    for _ in range(iters // rounds or 1):
                        t0 = time.perf_counter()
                        pipe.infer({"x": payload})
                        zp_t.append(time.perf_counter() - t0)
                results[label] = (float(np.median(raw_t)), float(np.median(zp_t)))
    finally:
        raw.send(b"quit")
        server.wait(timeout=10)
        raw.close()
        ctx.term()
    return results


def _fmt(seconds: float) -> str:
    return f"{seconds * 1e6:9.0f} µs" if seconds < 1e-3 else f"{seconds * 1e3:9.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--raw", default="tcp://127.0.0.1:*", help=argparse.SUPPRESS)
    parser.add_argument("--zp", default="tcp://127.0.0.1:*", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="a tenth of the iterations (smoke run)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.serve:
        serve(args.raw, args.zp)
        return
    scale = 0.1 if args.quick else 1.0
    sockets = bench_sockets(args.rounds, scale)
    pipeline = bench_pipeline(args.rounds, scale)
    print("tensor echo round trip, median; ratio = zpipe / raw pyzmq measured in the same run")
    print(f"{'payload':>8} | {'raw tcp':>12} | {'zpipe tcp':>12} | {'ratio':>6} | {'target':>9} | "
          f"{'raw 3-frame':>12} | {'ratio':>6} || {'raw ipc':>12} | {'Pipeline ipc':>12} | {'ratio':>6}")
    figures = {}
    for label in SIZES:
        raw_t, zp_t, raw3_t = sockets[label]
        praw, pzp = pipeline[label]
        target = TARGETS[label]
        ratio = zp_t / raw_t
        figures[label] = {"raw_tcp_s": raw_t, "zpipe_tcp_s": zp_t, "ratio": round(ratio, 3), "target": target,
                          "raw_3frame_tcp_s": raw3_t, "ratio_3frame": round(raw3_t / raw_t, 3),
                          "raw_ipc_s": praw, "pipeline_ipc_s": pzp, "pipeline_ratio": round(pzp / praw, 3)}
        mark = "" if target is None else ("ok" if ratio <= target else "MISS")
        print(f"{label:>8} | {_fmt(raw_t)} | {_fmt(zp_t)} | {ratio:6.2f} | {str(target or '-'):>4} {mark:<4} | "
              f"{_fmt(raw3_t)} | {raw3_t / raw_t:6.2f} || {_fmt(praw)} | {_fmt(pzp)} | {pzp / praw:6.2f}")
    print(json.dumps({"bench": "framing", "quick": args.quick, "results": figures}))


if __name__ == "__main__":
    main()
