"""Partial and gated offload of the demo CNN on the two-host test bed (issue 5, "Benchmark").

    python3 bench/offload.py [--quick] [--rounds R] [--requests N] [--cpu PCT] [--heartbeat-s S]
                             [--width W --depth D | --heavy]

``--width``/``--depth`` scale the demo CNN (channels; conv3x3 layers in block1_branch0, the offloaded branch);
``--heavy`` is width 32, depth 8: a branch of ~67 ms on a full core, where offloading it can pay for the link.

Needs root. Uses ../shared/testbed: `netpair.sh up 10 100 0` (namespaces `dev` 10.77.0.1 and `edge` 10.77.0.2,
10 ms each way, 100 Mbit/s), an edge server `zpipe serve --repo <demo repo> --bind tcp://10.77.0.2:5555
--insecure` in `edge` (no CurveZMQ: the link only exists between our own two namespaces), and the device side in
`dev` under `cpuslow.sh 25 10000` (all device processes, pipeline workers included, share 25 % of one CPU).

The device runs, all started once and measured in interleaved blocks (order shuffled every round, so all modes
see the same machine noise), one request at a time (the latency a single caller sees):

  device          the demo topology, every stage on the device
  server          one remote stage: the demo's ``whole`` model on the server (a Pipeline with a remote stand-in)
  server (client) the same through a bare RemoteClient (no Pipeline): shows the device-side pipeline overhead
  partial         topologies/partial.toml: block1_branch0 on the server while the other branches run on the device
  gated X=1       topologies/gated.toml, X = 1: block1_branch0 on the server
  gated X=0       the same pipeline, X = 0: block1_branch0 on the device; nothing may go to the server

Bytes per request come from three independent counters, read between blocks by this (host-namespace) process:
the test bed's relay (IP bytes each way, `netpair.sh status`), the server's own per-client counters (read by a
helper *inside* the edge namespace, so reading them adds no link traffic), and the device's remote stand-ins
(``Pipeline.signals(stage)["bytes_sent"]``). Heartbeats are off by default (``--heartbeat-s 0``) so that the link
counters show request traffic only (gated.toml's default of 1 s adds a PING/PONG per second per connection), and
IPv6 is switched off inside the two namespaces, whose kernels otherwise send an occasional 48-byte router
solicitation across the link.

Every output is checked against the whole model. Prints a table and one JSON line. Ratios are against device-only
from the same run. Cleans up: the server, helper and device processes are killed by process group, and
`netpair.sh down` runs at the end, also on errors.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from testbed import EDGE_ADDR, ROOT, TESTBED, Proc, log, netpair, netpair_up, require_down, teardown

MODES = ["device", "server", "server (client)", "partial", "gated X=1", "gated X=0"]
TARGET_RATIO = 0.5  # partial or gated offload at most 0.5x the device-only latency


# -- helpers shared by the processes ---------------------------------------------------------------------------------
def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# -- topologies ------------------------------------------------------------------------------------------------------
def _with_host(text: str, endpoint: str, heartbeat_s: float) -> str:
    """Point [hosts.edge] at our server and set its heartbeat (a line of ours replaces any existing one)."""
    text = re.sub(r"(?m)^heartbeat_s\s*=.*\n", "", text)
    return re.sub(r'(?m)^endpoint = "tcp://127\.0\.0\.1:5555"\s*$',
                  f'endpoint = "{endpoint}"\nheartbeat_s = {heartbeat_s}', text)


def write_topologies(work: Path, endpoint: str, heartbeat_s: float) -> dict[str, Path]:
    topo_dir = work / "topologies"
    topo_dir.mkdir(exist_ok=True)
    paths = {"device": work / "build" / "demo" / "model" / "topology.toml"}  # by build_demo: all on this host
    for name in ("partial", "gated"):
        text = _with_host((ROOT / "topologies" / f"{name}.toml").read_text(), endpoint, heartbeat_s)
        assert endpoint in text, f"topologies/{name}.toml: [hosts.edge] endpoint line not found"
        paths[name] = topo_dir / f"{name}.toml"
        paths[name].write_text(text)
    paths["server"] = topo_dir / "server.toml"
    paths["server"].write_text(f"""\
[pipeline]
name = "demo-server"
inputs = ["x"]
outputs = ["y"]
timeout_s = 30

[hosts.edge]
endpoint = "{endpoint}"
timeout_s = 10
heartbeat_s = {heartbeat_s}

[stages.whole]
kind = "remote"
host = "edge"
model = "whole"
inputs = ["x"]
outputs = ["y"]
""")
    return paths


# -- the device side (runs in namespace dev, under cpuslow) ----------------------------------------------------------
def device_main(args: argparse.Namespace) -> None:
    from zpipe import Pipeline, Topology
    from zpipe.client import RemoteClient

    work = Path(args.work)
    paths = {k: Path(v) for k, v in json.loads(args.paths).items()}
    data = np.load(work / "inputs.npz")
    xs, expected = list(data["xs"]), list(data["ys"])

    def snap(label: str) -> dict:
        """Ask the orchestrator (our stdin/stdout) for link and server counters; adds no link traffic."""
        print(f"SNAP {label}", flush=True)
        return json.loads(sys.stdin.readline())

    def say(text: str) -> None:
        print(f"LOG {text}", flush=True)

    pipes: dict[str, Pipeline] = {}
    client = None
    try:
        for name in ("device", "server", "partial", "gated"):
            t0 = time.monotonic()
            pipes[name] = Pipeline(Topology.from_file(paths[name]), start_timeout_s=300).start()
            say(f"pipeline {name!r} started in {time.monotonic() - t0:.1f} s")
        client = RemoteClient(args.endpoint, heartbeat_s=args.heartbeat_s, timeout_s=10).start()

        timeline: dict[str, dict[str, list[tuple[float, float]]]] = {m: {} for m in MODES}

        def run(mode: str, x: np.ndarray) -> tuple[np.ndarray, dict]:
            submitted = time.monotonic()  # the workers' stage times are time.monotonic() on this host too
            r = _run(mode, x)
            for stage, (start, end) in r.stage_times.items():
                timeline[mode].setdefault(stage, []).append((start - submitted, end - submitted))
            return r.outputs["y"], r.meta

        def _run(mode: str, x: np.ndarray):
            if mode == "device":
                r = pipes["device"].submit({"x": x}).result(timeout=60)
            elif mode == "server":
                r = pipes["server"].submit({"x": x}).result(timeout=60)
            elif mode == "server (client)":
                r = client.submit("whole", {"x": x}).result(timeout=60)
            elif mode == "partial":
                r = pipes["partial"].submit({"x": x}).result(timeout=60)
            else:
                offload = 1 if mode == "gated X=1" else 0
                r = pipes["gated"].submit({"x": x, "offload": np.array(offload)}).result(timeout=60)
                ran_edge = "branch0_edge" in r.stage_times
                ran_local = "branch0_local" in r.stage_times
                if ran_edge != bool(offload) or ran_local == bool(offload):
                    raise AssertionError(f"{mode}: block1_branch0 ran at {r.placement}")
            return r

        remote_stage = {"server": ("server", "whole"), "partial": ("partial", "block1_branch0"),
                        "gated X=1": ("gated", "branch0_edge"), "gated X=0": ("gated", "branch0_edge")}

        def device_sent(mode: str) -> tuple[int, int]:
            if mode == "server (client)":
                return client.requests_sent, client.bytes_sent
            if mode not in remote_stage:
                return 0, 0
            pipe, stage = remote_stage[mode]
            s = pipes[pipe].signals(stage)
            return int(s.get("requests_sent", 0)), int(s.get("bytes_sent", 0))

        for mode in MODES:  # warm-up: first calls load kernels, connections settle
            for i in range(args.warmup):
                run(mode, xs[i % len(xs)])
        for mode in MODES:
            timeline[mode].clear()
        rng = random.Random(1)
        lat: dict[str, list[float]] = {m: [] for m in MODES}
        errors: dict[str, list[str]] = {m: [] for m in MODES}
        totals = {m: {"up": 0, "down": 0, "up_pkts": 0, "down_pkts": 0, "server_requests": 0, "server_bytes": 0,
                      "dev_requests": 0, "dev_bytes": 0, "seconds": 0.0} for m in MODES}
        time.sleep(0.3)
        before = snap("start")
        for rnd in range(args.rounds):
            order = MODES[:]
            rng.shuffle(order)
            for mode in order:
                dev0 = device_sent(mode)
                t_block = time.monotonic()
                for i in range(args.requests):
                    k = (rnd * args.requests + i) % len(xs)
                    t0 = time.perf_counter()
                    try:
                        y, _ = run(mode, xs[k])
                        dt = time.perf_counter() - t0
                        if not np.allclose(y, expected[k], atol=1e-4):
                            raise AssertionError(f"output differs from the whole model by "
                                                 f"{float(np.max(np.abs(y - expected[k]))):.3g}")
                        lat[mode].append(dt)
                    except Exception as exc:  # counted and reported, the run goes on
                        errors[mode].append(f"{type(exc).__name__}: {str(exc)[:200]}")
                seconds = time.monotonic() - t_block
                time.sleep(0.25)  # trailing ACKs reach the relay; the stand-ins publish their counts
                after = snap(mode)
                dev1 = device_sent(mode)
                t = totals[mode]
                for key in ("up", "down", "up_pkts", "down_pkts"):
                    t[key] += after[key] - before[key]
                t["server_requests"] += after["server_requests"] - before["server_requests"]
                t["server_bytes"] += after["server_bytes"] - before["server_bytes"]
                t["dev_requests"] += dev1[0] - dev0[0]
                t["dev_bytes"] += dev1[1] - dev0[1]
                t["seconds"] += seconds
                before = after
            say(f"round {rnd + 1}/{args.rounds} done")
        stages = {m: {st: [round(float(np.median([a for a, _ in v])) * 1e3, 2),
                           round(float(np.median([b for _, b in v])) * 1e3, 2)] for st, v in tl.items()}
                  for m, tl in timeline.items()}
        print("RESULT " + json.dumps({"latencies": lat, "errors": errors, "totals": totals, "stages": stages,
                                      "stats": {k: p.stats() for k, p in pipes.items()}}), flush=True)
    finally:
        if client is not None:
            client.close()
        for p in pipes.values():
            p.close(drain_timeout_s=5)


# -- the server-stats helper (runs in namespace edge, next to the server) --------------------------------------------
def edge_stats_main(endpoint: str) -> None:
    import logging

    logging.disable(logging.WARNING)  # "no encryption" warning: this connection never leaves the edge namespace
    from zpipe.client import RemoteClient

    with RemoteClient(endpoint, heartbeat_s=0) as observer:
        for _ in sys.stdin:
            s = observer.stats()
            print(json.dumps({"requests": s.get("requests", 0), "request_bytes": s.get("request_bytes", 0)}),
                  flush=True)


# -- the orchestrator (host namespace, root) -------------------------------------------------------------------------
def link_counters() -> dict[str, int]:
    """IP bytes the relay carried each way (a2b = dev -> edge, b2a = edge -> dev), from `netpair.sh status`."""
    text = netpair("status")
    m = re.search(r"stats: (\{.*\})", text)
    if m:
        stats = json.loads(m.group(1))
        return {"up": stats["a2b"]["tx_bytes"], "down": stats["b2a"]["tx_bytes"],
                "up_pkts": stats["a2b"]["tx_pkts"], "down_pkts": stats["b2a"]["tx_pkts"]}
    raise RuntimeError(f"cannot read link counters from netpair.sh status:\n{text}")


def orchestrate(args: argparse.Namespace) -> dict:
    from zpipe.demo import DEMO_INPUT_SHAPE, build_demo, load_whole

    require_down()
    work = Path(tempfile.mkdtemp(prefix="zpipe-bench-offload-"))
    procs: list[Proc] = []
    try:
        t0 = time.monotonic()
        build_demo(work / "build" / "demo", width=args.width, depth=args.depth)
        whole = load_whole(work / "build" / "demo")
        rng = np.random.default_rng(0)
        xs = [rng.standard_normal(DEMO_INPUT_SHAPE).astype("float32") for _ in range(16)]
        log(f"demo model: width {args.width}, depth {args.depth}")
        ys = [whole(x) for x in xs]
        np.savez(work / "inputs.npz", xs=np.stack(xs), ys=np.stack(ys))
        endpoint = f"tcp://{EDGE_ADDR}:{args.port}"
        paths = write_topologies(work, endpoint, args.heartbeat_s)
        log(f"demo built in {time.monotonic() - t0:.1f} s ({work})")

        netpair_up(str(args.delay_ms), str(args.rate_mbit), "0")
        for ns in ("dev", "edge"):  # the kernel's IPv6 chatter (router solicitations, 48 B) is not ours to count
            subprocess.run([str(TESTBED / "netpair.sh"), "exec", ns, "sysctl", "-q", "-w",
                            "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"], check=True)
        log(f"test bed up: {args.delay_ms} ms each way, {args.rate_mbit} Mbit/s")
        server = Proc([str(TESTBED / "netpair.sh"), "exec", "edge", sys.executable, "-m", "zpipe", "serve",
                       "--repo", str(work / "build" / "demo" / "repo"), "--bind", endpoint, "--insecure"],
                      name="server")
        procs.append(server)
        log(server.wait_for("listening on", 120).strip())
        helper = Proc([str(TESTBED / "netpair.sh"), "exec", "edge", sys.executable, __file__, "--edge-stats",
                       endpoint], stdin=subprocess.PIPE, stdout=subprocess.PIPE, name="edge stats helper")
        procs.append(helper)

        def server_counters() -> dict[str, int]:
            helper.p.stdin.write("stats\n")
            helper.p.stdin.flush()
            line = helper.p.stdout.readline()
            if not line:
                raise RuntimeError("edge stats helper died:\n" + "\n".join(helper.stderr[-20:]))
            s = json.loads(line)
            return {"server_requests": s["requests"], "server_bytes": s["request_bytes"]}

        device = Proc([str(TESTBED / "cpuslow.sh"), str(args.cpu), "10000", "--", str(TESTBED / "netpair.sh"),
                       "exec", "dev", sys.executable, __file__, "--device", "--work", str(work), "--paths",
                       json.dumps({k: str(v) for k, v in paths.items()}), "--endpoint", endpoint,
                       "--rounds", str(args.rounds), "--requests", str(args.requests), "--warmup",
                       str(args.warmup), "--heartbeat-s", str(args.heartbeat_s)],
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, name="device")
        procs.append(device)
        result = None
        for line in device.p.stdout:
            if line.startswith("SNAP "):
                counters = {**link_counters(), **server_counters()}
                device.p.stdin.write(json.dumps(counters) + "\n")
                device.p.stdin.flush()
            elif line.startswith("RESULT "):
                result = json.loads(line[len("RESULT "):])
            elif line.startswith("LOG "):
                log(line[4:].rstrip())
            else:
                log("device: " + line.rstrip())
        device.p.wait(timeout=120)
        throttle = [s for s in device.stderr if "nr_throttled" in s]
        if result is None:
            raise RuntimeError(f"the device side failed (exit {device.p.returncode}):\n" +
                               "\n".join(device.stderr[-40:]))
        result["cpuslow"] = throttle[-1] if throttle else ""
        result["server_stderr_tail"] = server.stderr[-5:]
        return result
    finally:
        teardown(procs, work, keep=args.keep)


def report(args: argparse.Namespace, result: dict) -> None:
    lat, errors, totals = result["latencies"], result["errors"], result["totals"]
    dev_p50, dev_p99 = _pct(lat["device"], 50) * 1e3, _pct(lat["device"], 99) * 1e3
    print(f"\ndemo CNN, one request at a time; link {args.delay_ms} ms each way, {args.rate_mbit} Mbit/s; device "
          f"limited to {args.cpu}% of one CPU; {args.rounds} interleaved rounds x {args.requests} requests per mode; "
          f"heartbeat_s = {args.heartbeat_s}")
    print(f"{'mode':<16} | {'n':>4} | {'err':>3} | {'p50 ms':>7} | {'p99 ms':>7} | {'p50/dev':>7} | {'p99/dev':>7} | "
          f"{'link up B/req':>13} | {'link down B/req':>15} | {'server req/req':>14} | {'server B/req':>12} | "
          f"{'device sent B/req':>17}")
    figures = {}
    for mode in MODES:
        n = len(lat[mode]) + len(errors[mode])
        t = totals[mode]
        p50, p99 = _pct(lat[mode], 50) * 1e3, _pct(lat[mode], 99) * 1e3
        row = {"n": n, "errors": len(errors[mode]), "p50_ms": round(p50, 2), "p99_ms": round(p99, 2),
               "mean_ms": round(float(np.mean(lat[mode])) * 1e3, 2) if lat[mode] else None,
               "p50_vs_device": round(p50 / dev_p50, 3), "p99_vs_device": round(p99 / dev_p99, 3),
               "link_up_bytes_per_req": round(t["up"] / n, 1), "link_down_bytes_per_req": round(t["down"] / n, 1),
               "server_requests_per_req": round(t["server_requests"] / n, 3),
               "server_tensor_bytes_per_req": round(t["server_bytes"] / n, 1),
               "device_sent_tensor_bytes_per_req": round(t["dev_bytes"] / n, 1),
               "link_up_bytes_total": t["up"], "link_down_bytes_total": t["down"],
               "server_requests_total": t["server_requests"], "device_requests_sent_total": t["dev_requests"]}
        figures[mode] = row
        print(f"{mode:<16} | {n:>4} | {len(errors[mode]):>3} | {p50:7.1f} | {p99:7.1f} | {p50 / dev_p50:7.2f} | "
              f"{p99 / dev_p99:7.2f} | {row['link_up_bytes_per_req']:>13.0f} | "
              f"{row['link_down_bytes_per_req']:>15.0f} | "
              f"{row['server_requests_per_req']:>14.2f} | {row['server_tensor_bytes_per_req']:>12.0f} | "
              f"{row['device_sent_tensor_bytes_per_req']:>17.0f}")
    best = min(("partial", "gated X=1"), key=lambda m: figures[m]["p50_ms"])
    ratio = figures[best]["p50_ms"] / dev_p50
    x0 = totals["gated X=0"]
    x0_ok = x0["server_requests"] == 0 and x0["server_bytes"] == 0 and x0["dev_bytes"] == 0 and \
        (args.heartbeat_s > 0 or x0["up"] == 0)
    print(f"\ntarget: partial or gated offload <= {TARGET_RATIO}x device-only latency: best is {best}, p50 "
          f"{ratio:.2f}x (p99 {figures[best]['p99_ms'] / dev_p99:.2f}x) -> "
          f"{'met' if ratio <= TARGET_RATIO else 'MISSED'}")
    print(f"target: X==0 moves 0 request bytes: server saw {x0['server_requests']} requests / {x0['server_bytes']} "
          f"tensor bytes, device stand-in sent {x0['dev_bytes']} bytes, link carried {x0['up']} B up / "
          f"{x0['down']} B down ({x0['up_pkts']} / {x0['down_pkts']} packets) during the X==0 blocks -> "
          f"{'met' if x0_ok else 'MISSED'}")
    print("\nwhere the time goes: median (start, end) of each stage in ms after submit (device clock; a remote "
          "stage's interval is its stand-in's round trip)")
    for mode in MODES:
        if result["stages"].get(mode):
            print(f"  {mode:<14} " + ", ".join(f"{st} {a:.1f}-{b:.1f}" for st, (a, b) in
                                             sorted(result["stages"][mode].items(), key=lambda kv: kv[1][0])))
    for mode in MODES:
        if errors[mode]:
            print(f"errors in {mode}: {errors[mode][:3]}")
    if result.get("cpuslow"):
        print(f"device cgroup: {result['cpuslow'].split('cpuslow: ')[-1]}")
    print(json.dumps({"bench": "offload", "quick": args.quick, "delay_ms": args.delay_ms,
                      "rate_mbit": args.rate_mbit, "cpu_pct": args.cpu, "heartbeat_s": args.heartbeat_s,
                      "rounds": args.rounds, "requests": args.requests, "results": figures,
                      "target_ratio": TARGET_RATIO, "best_offload": best, "best_ratio_p50": round(ratio, 3),
                      "ratio_met": ratio <= TARGET_RATIO, "x0_zero_bytes_met": x0_ok,
                      "stage_timeline_ms": result["stages"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds of 10 requests (smoke run)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--requests", type=int, default=30, help="requests per mode per round")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--cpu", type=float, default=25, help="device CPU share, %% of one CPU")
    parser.add_argument("--delay-ms", type=float, default=10)
    parser.add_argument("--rate-mbit", type=float, default=100)
    parser.add_argument("--heartbeat-s", type=float, default=0.0)
    parser.add_argument("--width", type=int, default=8, help="demo CNN channels")
    parser.add_argument("--depth", type=int, default=2, help="conv3x3 layers in the offloaded branch")
    parser.add_argument("--heavy", action="store_true", help="width 32, depth 8 (a branch worth offloading)")
    parser.add_argument("--port", type=int, default=5555)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--device", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--edge-stats", metavar="ENDPOINT", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.edge_stats:
        edge_stats_main(args.edge_stats)
        return
    if args.device:
        device_main(args)
        return
    if args.quick:
        args.rounds, args.requests = 3, 10
    if args.heavy:
        args.width, args.depth = 32, 8
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces, cgroups)")
    started = time.monotonic()
    report(args, orchestrate(args))
    log(f"total {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
