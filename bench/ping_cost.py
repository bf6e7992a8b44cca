"""What a policy's link pings cost an idle device, in CPU (issue 6).

    python3 bench/ping_cost.py [--seconds 15]

A gate with the latency policy pings the server every `ping_s` (a host key; default 0.05 s with a policy): each
ping is sent and answered by the remote stand-in, and both events are published on the signal board within ms,
so the gate can age a ping still out. This runs the shape of bench/policy.py's topology against a `zpipe serve`
on 127.0.0.1, sends no requests, and measures the CPU time of the device side's worker processes (the server
left out) for pings off, every 0.1 s and every 0.05 s, with the run directory (signal board, ipc sockets) in
memory (/dev/shm, zpipe's default where there is one) and on disk (the temporary directory, via ZPIPE_RUNDIR).
Prints % of one CPU and each line's ratio to pings off in the same place, plus one JSON line. Runs in ~3 min.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0)
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
    finally:
        server.terminate()
        server.wait()
    print(f"{'run dir':8} {'ping_s':>6} {'CPU % of one':>13} {'vs pings off':>13}")
    for place, row in result.items():
        for ping_s, share in row.items():
            print(f"{place:8} {ping_s:>6} {share * 100:12.2f}% {share / row['0.0']:12.2f}x")
    print(json.dumps({"bench": "ping_cost", "cpu_share": result}))


if __name__ == "__main__":
    main()
