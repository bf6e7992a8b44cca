"""Partial and dynamic offload from Python, on one machine: an edge server process behind an emulated 5G link.

    python examples/offload_demo.py [OUT_DIR]

Compiles the demo CNN, starts `zpipe serve` on its repository, puts a link emulator (10 ms each way) in front of
it, then runs the gated topology: X == 0 keeps block1_branch0 on the device (and the link stays silent), X == 1
runs it on the server. Checks every output against the whole model, and exits non-zero if anything is off.
"""

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from zpipe import Pipeline, Topology
from zpipe.client import RemoteClient
from zpipe.demo import DEMO_INPUT_SHAPE, build_demo, load_whole
from zpipe.linkemu import LinkEmulator, parse_address

ROOT = Path(__file__).resolve().parents[1]


def main(out: Path) -> None:
    build_demo(out / "build" / "demo")
    server = subprocess.Popen([sys.executable, "-m", "zpipe", "serve", "--repo", str(out / "build" / "demo" / "repo"),
                               "--bind", "tcp://127.0.0.1:*"], stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "listening on" not in line:
            line = server.stderr.readline()
            if not line:
                raise SystemExit("the server did not start")
        endpoint = line.split("listening on ")[1].split(";")[0]
        with LinkEmulator(listen=("127.0.0.1", 0), target=parse_address(endpoint), delay_ms=10) as link:
            text = (ROOT / "topologies" / "gated.toml").read_text()
            text = text.replace("tcp://127.0.0.1:5555", f"tcp://127.0.0.1:{link.port}").replace(
                "heartbeat_s = 1 ", "heartbeat_s = 0 ")
            (out / "topologies").mkdir(exist_ok=True)
            (out / "topologies" / "gated.toml").write_text(text)
            run(out, endpoint, link)
    finally:
        server.terminate()
        server.wait(timeout=30)


def run(out: Path, endpoint: str, link: LinkEmulator) -> None:
    whole = load_whole(out / "build" / "demo")
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal(DEMO_INPUT_SHAPE).astype("float32") for _ in range(20)]
    expected = [whole(x) for x in xs]
    with Pipeline(Topology.from_file(out / "topologies" / "gated.toml")) as pipe, RemoteClient(endpoint) as watch:
        for offload in (0, 1):
            link_before, server_before = link.stats()["up_bytes"], watch.stats()["requests"]
            started = time.monotonic()
            results = [pipe.submit({"x": x, "offload": np.array(offload)}).result() for x in xs]
            for r, e in zip(results, expected):
                np.testing.assert_allclose(r.outputs["y"], e, atol=1e-4)
            sent = link.stats()["up_bytes"] - link_before
            served = watch.stats()["requests"] - server_before
            where = "on the edge server" if offload else "on this device"
            print(f"X={offload}: block1_branch0 ran {where}; {len(xs)} requests in "
                  f"{(time.monotonic() - started) * 1000:.0f} ms, median latency "
                  f"{np.median([r.latency_s for r in results]) * 1000:.1f} ms; link carried {sent} bytes up, "
                  f"server saw {served} requests")
            if offload == 0:
                assert sent == 0 and served == 0, (sent, served)
            else:
                assert served == len(xs) and sent >= len(xs) * 8 * 32 * 32 * 4
    print("outputs match the whole model both ways")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="zpipe-offload-")))
