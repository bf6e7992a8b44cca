"""What a policy's link pings cost the device, in CPU, idle and per request (issue 6).

    python3 bench/ping_cost.py [--seconds 15] [--rate 4]

A gate with the latency policy pings the server every `ping_s` (a host key; default 0.05 s with a policy): each
ping is sent and answered by the remote stand-in (whose figures the gate, in the same process, reads from memory;
a gate in another process reads them from the signal board, where each ping event is then published within ms).
This runs the shape of bench/policy.py's topology against a `zpipe serve` on 127.0.0.1, sends no requests, and
measures the CPU time of the device side's worker processes (the server left out) for pings off, every 0.1 s and
every 0.05 s, with the run directory (signal board, ipc sockets) in memory (/dev/shm, zpipe's default where there
is one) and on disk (the temporary directory, via ZPIPE_RUNDIR). Prints % of one CPU and each line's ratio to
pings off in the same place. Then the same pipeline under load: --rate requests a second, all to the server, and
the CPU each device worker process spends per request (its share of the pings included). One JSON line at the
end. Runs in ~4 min."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import policy as policy_bench  # noqa: E402  (its heavy model and topology)

from zpipe import Pipeline, Topology  # noqa: E402


def cpu_seconds(pids: set[int]) -> float:
    hz = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / hz  # utime + stime
    return total


def idle_cpu(endpoint: str, library: Path, ping_s: float, rundir: str, seconds: float) -> float:
    text = policy_bench.topology_text(endpoint, library, 2.0, "", 0).replace(
        "heartbeat_s = 1", f"heartbeat_s = 1\nping_s = {ping_s}")
    old_rundir = os.environ.get("ZPIPE_RUNDIR")
    os.environ["ZPIPE_RUNDIR"] = rundir
    try:
        with Pipeline(Topology.from_toml(text)) as pipe:
            time.sleep(2.0)  # started, connected, first pings in
            pids = {pipe.signals(stage)["pid"] for stage in ("gate", "heavy_edge", "heavy_local", "select")}
            before, started = cpu_seconds(pids), time.monotonic()
            time.sleep(seconds)
            return (cpu_seconds(pids) - before) / (time.monotonic() - started)
    finally:
        if old_rundir is None:
            del os.environ["ZPIPE_RUNDIR"]
        else:
            os.environ["ZPIPE_RUNDIR"] = old_rundir


def loaded_cpu(endpoint: str, library: Path, rate: float, seconds: float) -> dict[str, float]:
    """The device side's CPU per request (ms) while requests go to the server (X = 1) at ``rate``: per worker
    process (the gate's, which hosts the stand-in and the select; the local branch's), pings on (50 ms)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(policy_bench.SHAPE).astype("float32")
    text = policy_bench.topology_text(endpoint, library, 2.0, "", 0)
    with Pipeline(Topology.from_toml(text)) as pipe:
        for _ in range(20):
            pipe.infer({"x": x}, meta={"offload": 1})
        pids = {stage: pipe.signals(stage)["pid"] for stage in ("gate", "heavy_local")}
        before = {stage: cpu_seconds({pid}) for stage, pid in pids.items()}
        started, futures = time.monotonic(), []
        for i in range(int(rate * seconds)):
            time.sleep(max(0.0, started + i / rate - time.monotonic()))
            futures.append(pipe.submit({"x": x}, meta={"offload": 1}))
        for future in futures:
            future.result(timeout=60)
        return {stage: (cpu_seconds({pid}) - before[stage]) / len(futures) * 1e3 for stage, pid in pids.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rate", type=float, default=4.0, help="requests a second for the loaded run")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="zpipe-ping-cost-"))
    library = policy_bench.build_heavy(work)
    endpoint = "tcp://127.0.0.1:5871"
    server = subprocess.Popen([sys.executable, "-m", "zpipe", "serve", "--repo", str(work / "repo"),
                               "--bind", endpoint], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    places = {"memory": "/dev/shm", "disk": tempfile.gettempdir()}
    result: dict[str, dict[str, float]] = {}
    try:
        time.sleep(3.0)
        for place, rundir in places.items():
            if not os.path.isdir(rundir):
                continue
            result[place] = {str(ping_s): idle_cpu(endpoint, library, ping_s, rundir, args.seconds)
                             for ping_s in (0.0, 0.1, 0.05)}
        loaded = loaded_cpu(endpoint, library, args.rate, args.seconds)
    finally:
        server.terminate()
        server.wait()
    print(f"{'run dir':8} {'ping_s':>6} {'CPU % of one':>13} {'vs pings off':>13}")
    for place, row in result.items():
        for ping_s, share in row.items():
            print(f"{place:8} {ping_s:>6} {share * 100:12.2f}% {share / row['0.0']:12.2f}x")
    print(f"\nloaded ({args.rate:g} req/s to the server, X = 1, pings every 0.05 s, run dir in memory): CPU per "
          "request, ms: " + ", ".join(f"{stage}'s process {ms:.2f}" for stage, ms in loaded.items()))
    print(json.dumps({"bench": "ping_cost", "cpu_share": result, "loaded_ms_per_request": loaded}))


if __name__ == "__main__":
    main()
