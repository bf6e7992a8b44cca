"""The offload policy under changing conditions, on the two-host test bed (issue 6, "Benchmark").

    python3 bench/policy.py [--phase-s 12] [--rate 4] [--cpu 25] [--plot /tmp/zpipe-bench-policy.png] [--raw F]
    python3 bench/policy.py --repeats 4 --raw F  (four runs, F.1 ... F.4, each reported, then pooled; each run
                                                  starts with the next mode, so that none always runs first)
    python3 bench/policy.py --pool F1 F2 ...     (several runs' --raw files: each run's verdicts, then pooled)

Needs root. Uses ../shared/testbed: `netpair.sh up 10 100 0` (namespaces `dev` 10.77.0.1 and `edge` 10.77.0.2),
an edge server `zpipe serve --bind tcp://10.77.0.2:5555 --insecure` in `edge` (no CurveZMQ: the link only joins
our own two namespaces), and the device side in `dev` under `cpuslow.sh 25 10000` (25 % of one CPU, shared by all
device processes).

The model: the demo CNN's branches are far too light to be worth offloading (bench/offload.py), so this benchmark
compiles a heavier branch, ``heavy`` (ten 3x3 convolutions, 32 channels, on float32[1, 8, 32, 32]: ~30 ms on a
full core, ~120 ms on the 25 % device). Topology (the shape of topologies/gated.toml):

    gate (policy "latency") ─┬─ heavy_edge  (on the server; fallback = true) ─┬─ select ─ y
                              └─ heavy_local (on the device) ───────────────────┘

Three modes, each a run of 5 phases x --phase-s seconds (default 12: 60 s) at a fixed request rate (open loop:
requests are submitted on a clock, not after the previous answer), one mode after the other, each in the same
scripted conditions:

    phase 1 baseline      link 10 ms / 100 Mbit/s / 0 % loss, device idle
    phase 2 bad link      `netpair.sh set 50 20 5`
    phase 3 baseline      `netpair.sh set 10 100 0`
    phase 4 busy device   a CPU hog process in the dev namespace *and the device's cgroup* (it competes for the
                          same 25 %)
    phase 5 baseline      hog killed

  auto    the gate's policy decides (requests carry no X)
  local   X = 0 for every request (meta "offload"), same pipeline shape
  remote  X = 1 for every request (with the same fallback = true)

Each change comes halfway between two requests (a request sent at the moment of a change would travel under the
new conditions while counting in the old phase). Reports per phase and mode p50/p99, the offload share and
fallbacks; for auto, how long after each change its decision switched (first non-probe decision for the new side);
lost requests (submitted but not answered with a correct output). Targets (issue 6): switch within 1 s of a
change; per phase auto's p99 within 10 % of the better of local/remote; zero lost requests. Writes a PNG (latency
and auto's decision over time) and one JSON line.
Cleans up: server and device process groups are killed, `netpair.sh down` runs at the end, also on errors.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from testbed import EDGE_ADDR, TESTBED, Proc, log, netpair, netpair_up, require_down, teardown

GOOD_LINK, BAD_LINK = ("10", "100", "0"), ("50", "20", "5")
PHASES = ["baseline", "bad link", "baseline 2", "busy device", "baseline 3"]
MODES = ["auto", "local", "remote"]
SWITCH_TARGET_S = 1.0
P99_TARGET = 1.10
SHAPE = (1, 8, 32, 32)


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# -- model and topology ----------------------------------------------------------------------------------------------
def build_heavy(out: Path, channels: int = 32, depth: int = 10) -> Path:
    """Compile the heavy branch; lay it out as a server repository too (out/repo/heavy/1/). Returns the .so."""
    from tvm import relax
    from tvm.relax.frontend import nn

    from zpipe.compile import export_stage
    from zpipe.tvm_runtime import import_tvm

    tvm = import_tvm()

    class Heavy(nn.Module):
        def __init__(self):
            self.convs = nn.ModuleList([nn.Conv2D(8 if i == 0 else channels, 8 if i == depth - 1 else channels, 3,
                                                  padding=1) for i in range(depth)])

        def forward(self, x):
            for conv in self.convs:
                x = nn.relu(conv(x))
            return x

    mod, params = Heavy().export_tvm({"forward": {"x": nn.spec.Tensor(SHAPE, "float32")}})
    rng = np.random.default_rng(0)
    bound = {name: tvm.runtime.tensor((rng.standard_normal([int(d) for d in p.shape]) * 0.1).astype("float32"))
             for name, p in params}
    mod = relax.transform.BindParams("forward", bound)(mod)
    export_stage(mod, name="heavy", out_dir=out, function="forward", input_names=["x"], output_names=["y"])
    version = out / "repo" / "heavy" / "1"
    version.mkdir(parents=True)
    for suffix in (".so", ".json"):
        shutil.copy(out / f"heavy{suffix}", version / f"heavy{suffix}")
    return out / "heavy.so"


def topology_text(endpoint: str, library: Path, host_timeout_s: float, policy_options: str, local_nice: int) -> str:
    return f"""\
[pipeline]
name = "policy-bench"
inputs = ["x"]
outputs = ["y"]
timeout_s = 30

[hosts.edge]
endpoint = "{endpoint}"
timeout_s = {host_timeout_s}
heartbeat_s = 1

[stages.gate]
kind = "gate"
control = "offload"          # not wired: X comes from meta "offload" when given, else from the policy
meta_key = "offload"
policy = "latency"
policy_options = {{ {policy_options} }}
inputs = {{ x = "x" }}
outputs = {{ "then.x" = "x@edge", "else.x" = "x@local" }}

[stages.heavy_edge]
kind = "tvm"
library = "{library}"
host = "edge"
model = "heavy"
fallback = true
inputs = {{ x = "x@edge" }}
outputs = {{ y = "y@edge" }}

[stages.heavy_local]
kind = "tvm"
library = "{library}"
nice = {local_nice}
inputs = {{ x = "x@local" }}
outputs = {{ y = "y@local" }}

[stages.select]
kind = "merge"
op = "select"
inputs = ["y@edge", "y@local"]
outputs = ["y"]
"""


# -- the device side (namespace dev, under cpuslow) ------------------------------------------------------------------
def mount_cpu_cgroup() -> str:
    """Let the device see its CPU quota, as a container sees its own. `ip netns exec` mounts a fresh /sys for the
    namespace, without the cgroup filesystems, so zpipe's device load (zpipe.board.CpuLoad) found no quota and
    read the host's CPU use instead (sessions 7-8 until this was found). Mount the cpu hierarchy again, in this
    process's own mount namespace (the one `ip netns exec` made: the host's mounts do not change). Says what the
    device load now reads."""
    from zpipe.board import CpuLoad

    if CpuLoad().stall_clock() is None:
        mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
        if any(m == "/sys/fs/cgroup" or m.startswith("/sys/fs/cgroup/") for m in mounts):
            raise RuntimeError("the device side sees no CPU quota, but cgroups are mounted at /sys/fs/cgroup: "
                               "run it under cpuslow.sh (it will not mount over them)")
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, _ = line.split(":", 2)
            if "cpu" in controllers.split(","):  # cgroup v1
                subprocess.run(["mount", "-t", "tmpfs", "cgroups", "/sys/fs/cgroup"], check=True)
                os.mkdir(f"/sys/fs/cgroup/{controllers}")
                subprocess.run(["mount", "-t", "cgroup", "-o", controllers, "cgroup",
                                f"/sys/fs/cgroup/{controllers}"], check=True)
                break
        else:
            subprocess.run(["mount", "-t", "cgroup2", "cgroup2", "/sys/fs/cgroup"], check=True)
    clock = CpuLoad().stall_clock()
    if clock is None:
        raise RuntimeError("the device's CPU quota is not visible at /sys/fs/cgroup; its load would be the host's")
    return f"its cgroup's CPU quota (used up for {min(clock):.1f} s so far)"


def device_main(args: argparse.Namespace) -> None:
    from zpipe import Pipeline, Topology

    work = Path(args.work)
    data = np.load(work / "inputs.npz")
    xs, ys = list(data["xs"]), list(data["ys"])

    def ask(line: str) -> str:
        print(line, flush=True)
        return sys.stdin.readline().strip()

    def say(text: str) -> None:
        print(f"LOG {text}", flush=True)

    def submit_at_rate(pipe, meta, t0: float, duration_s: float, out: list) -> None:
        i = 0
        while True:
            due = t0 + i / args.rate
            if due - t0 >= duration_s:
                return
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            submitted = time.monotonic()
            try:
                out.append((i, submitted - t0, pipe.submit({"x": xs[i % len(xs)]}, meta=meta), None))
            except Exception as exc:  # not even accepted: counted as lost
                out.append((i, submitted - t0, None, f"submit: {type(exc).__name__}: {exc}"))
            i += 1

    def collect(futures: list) -> list:
        # Wait for every answer before checking any: checking takes CPU from the device's quota, and the run's last
        # requests would pay for it (session 12: the last request of a run took 110-140 ms in 9 of 26 runs of
        # session 11, against ~67 before it, in every mode).
        concurrent.futures.wait([fut for _, _, fut, _ in futures if fut is not None], timeout=120)
        records = []
        for i, at, fut, err in futures:
            rec = {"i": i, "t": round(at, 4), "lat": None, "x": None, "why": "", "at": "", "err": err}
            if fut is not None:
                try:
                    r = fut.result(timeout=120)
                    y = r.outputs["y"]
                    if not np.allclose(y, ys[i % len(ys)], atol=1e-3):
                        rec["err"] = "wrong output"
                    rec["lat"] = round(r.latency_s, 5)
                    rec["x"] = int(r.meta.get("x:gate", -1))
                    rec["why"] = str(r.meta.get("why:gate", ""))
                    where = r.placement
                    rec["at"] = where.get("heavy_edge", where.get("heavy_local", "?"))
                except Exception as exc:
                    rec["err"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            records.append(rec)
        return records

    say(f"device load: {mount_cpu_cgroup()}")
    text = (work / "topology.toml").read_text()
    pipes: dict[str, Pipeline] = {}
    hog = None
    results = {}
    try:
        for name in ("auto", "forced"):
            t0 = time.monotonic()
            pipes[name] = Pipeline(Topology.from_toml(text), start_timeout_s=300).start()
            say(f"pipeline {name!r} started in {time.monotonic() - t0:.1f} s")
        for mode in args.modes.split(","):
            pipe = pipes["auto" if mode == "auto" else "forced"]
            meta = None if mode == "auto" else {"offload": 1 if mode == "remote" else 0}
            warm: list = []
            submit_at_rate(pipe, meta, time.monotonic(), args.warmup_s, warm)  # baseline conditions
            collect(warm)
            before = pipe.stats()
            gate_before = pipe.signals("gate")
            futures: list = []
            t0 = time.monotonic()
            total_s = args.phase_s * len(PHASES)
            submitter = threading.Thread(target=submit_at_rate, args=(pipe, meta, t0, total_s, futures), daemon=True)
            submitter.start()
            events = []
            for k in range(1, len(PHASES)):
                # Halfway between two requests: a change at a request's own send time (as before session 5)
                # catches that request in flight under the new conditions while it counts in the old phase.
                time.sleep(max(0.0, t0 + k * args.phase_s + 0.5 / args.rate - time.monotonic()))
                if k in (1, 2):
                    link = BAD_LINK if k == 1 else GOOD_LINK
                    reply = ask("SET " + " ".join(link))  # the host side runs netpair.sh set and answers its time
                    events.append({"phase": PHASES[k], "t": round(float(reply.split()[1]) - t0, 4),
                                   "what": f"netpair.sh set {' '.join(link)}"})
                elif k == 3:  # a hog in our namespace and cgroup: it competes for the device's 25 %
                    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                    events.append({"phase": PHASES[k], "t": round(time.monotonic() - t0, 4),
                                   "what": f"CPU hog pid {hog.pid} started"})
                elif k == 4:
                    hog.kill()
                    hog.wait()
                    hog = None
                    events.append({"phase": PHASES[k], "t": round(time.monotonic() - t0, 4), "what": "CPU hog killed"})
            submitter.join()
            records = collect(futures)
            after = pipe.stats()
            results[mode] = {"records": records, "events": events,
                             "stats": {k: after.get(k, 0) - before.get(k, 0) for k in ("submitted", "ok", "failed",
                                                                                           "late")},
                             "gate": gate_counts(gate_before, pipe.signals("gate"))}
            lost = sum(1 for r in records if r["err"])
            say(f"mode {mode}: {len(records)} requests, {lost} lost or wrong")
        print("RESULT " + json.dumps(results), flush=True)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
        for p in pipes.values():
            p.close(drain_timeout_s=10)


def gate_counts(before: dict, after: dict) -> dict:
    """What the gate counted during the run (its board entry after less before): the policy's decisions, what
    became of the spare local copies that came due, and those withdrawn before they were due."""
    def diff(key: str) -> dict:
        return {k: v - before.get(key, {}).get(k, 0) for k, v in after.get(key, {}).items()
                if v - before.get(key, {}).get(k, 0)}

    return {"decisions": diff("decisions"), "spares": diff("spares"),
            "withdrawn": after.get("withdrawn", 0) - before.get("withdrawn", 0)}


# -- the host side ---------------------------------------------------------------------------------------------------
def orchestrate(args: argparse.Namespace) -> dict:
    from zpipe.tvm_runtime import import_tvm, load_vm

    require_down()
    work = Path(tempfile.mkdtemp(prefix="zpipe-bench-policy-"))
    procs: list[Proc] = []
    try:
        tvm = import_tvm()
        rng = np.random.default_rng(1)
        xs = [rng.standard_normal(SHAPE).astype("float32") for _ in range(8)]

        def per_call_ms(vm) -> float:
            t = time.perf_counter()
            for x in xs:
                vm["forward"](tvm.runtime.tensor(x)).numpy()
            return (time.perf_counter() - t) / len(xs) * 1e3

        # Calibrate: the branch should take --branch-ms on a host core (×4 on the 25 % device), whatever this
        # machine's speed, so that always-local is loaded but not saturated at --rate.
        probe_dir = work / "calibrate"
        probe_dir.mkdir()
        vm = load_vm(str(build_heavy(probe_dir, depth=10)))
        per_call_ms(vm)
        args.depth = max(2, round(10 * args.branch_ms / per_call_ms(vm)))
        library = build_heavy(work, depth=args.depth)
        vm = load_vm(str(library))
        ys = [vm["forward"](tvm.runtime.tensor(x)).numpy() for x in xs]
        log(f"heavy branch: {args.depth} conv3x3 layers, {per_call_ms(vm):.1f} ms per call on this (host) core")
        np.savez(work / "inputs.npz", xs=np.stack(xs), ys=np.stack(ys))
        endpoint = f"tcp://{EDGE_ADDR}:{args.port}"
        (work / "topology.toml").write_text(topology_text(endpoint, library, args.host_timeout_s,
                                                          args.policy_options, args.local_nice))

        netpair_up(*GOOD_LINK)
        server = Proc([str(TESTBED / "netpair.sh"), "exec", "edge", sys.executable, "-m", "zpipe", "serve",
                       "--repo", str(work / "repo"), "--bind", endpoint, "--insecure"], name="server")
        procs.append(server)
        log(server.wait_for("listening on", 120).strip())
        device = Proc([str(TESTBED / "cpuslow.sh"), str(args.cpu), "10000", "--", str(TESTBED / "netpair.sh"),
                       "exec", "dev", sys.executable, __file__, "--device", "--work", str(work), "--rate",
                       str(args.rate), "--phase-s", str(args.phase_s), "--warmup-s", str(args.warmup_s),
                       "--modes", args.modes], stdin=subprocess.PIPE, stdout=subprocess.PIPE, name="device")
        procs.append(device)
        result = None
        for line in device.p.stdout:
            if line.startswith("SET "):
                netpair("set", *line.split()[1:4])
                device.p.stdin.write(f"OK {time.monotonic()}\n")  # CLOCK_MONOTONIC: the same in every namespace
                device.p.stdin.flush()
                log(f"netpair.sh set {' '.join(line.split()[1:4])}")
            elif line.startswith("RESULT "):
                result = json.loads(line[len("RESULT "):])
            elif line.startswith("LOG "):
                log(line[4:].rstrip())
            else:
                log("device: " + line.rstrip())
        device.p.wait(timeout=120)
        if result is None:
            raise RuntimeError(f"the device side failed (exit {device.p.returncode}):\n" +
                               "\n".join(device.stderr[-40:]))
        return result
    finally:
        teardown(procs, work, keep=args.keep)


# -- analysis --------------------------------------------------------------------------------------------------------
def _phase_of(t: float, bounds: list[float]) -> int:
    k = 0
    while k + 1 < len(bounds) and t >= bounds[k + 1]:
        k += 1
    return k


def _is_probe(rec: dict) -> bool:
    return "probe" in rec["why"]


def analyse(args: argparse.Namespace, result: dict) -> dict:
    modes = [m for m in MODES if m in result]
    table: dict[str, dict[str, dict]] = {p: {} for p in PHASES}
    for mode in modes:
        bounds = [0.0] + [e["t"] for e in result[mode]["events"]]
        per: list[list[dict]] = [[] for _ in PHASES]
        for rec in result[mode]["records"]:
            per[_phase_of(rec["t"], bounds)].append(rec)
        for k, recs in enumerate(per):
            ok = [r["lat"] for r in recs if not r["err"]]
            table[PHASES[k]][mode] = {
                "n": len(recs), "lost": sum(1 for r in recs if r["err"]), "p50_ms": round(_pct(ok, 50) * 1e3, 1),
                "p99_ms": round(_pct(ok, 99) * 1e3, 1),
                "offload_share": round(sum(1 for r in recs if r["x"] == 1) / max(1, len(recs)), 3),
                "fallbacks": sum(1 for r in recs if "fallback" in r["at"]),
                "probes": sum(1 for r in recs if _is_probe(r)),
                "switches": sum(1 for a, b in zip(recs, recs[1:]) if a["x"] != b["x"])}
    # The better side per phase, from the forced runs (lower p50); auto's reaction to each change that moves it.
    better = {}
    for phase in PHASES:
        row = table[phase]
        if "local" in row and "remote" in row:
            better[phase] = 1 if row["remote"]["p50_ms"] < row["local"]["p50_ms"] else 0
    switches = []
    if "auto" in result:
        events = result["auto"]["events"]
        bounds = [0.0] + [e["t"] for e in events]
        per: list[list[dict]] = [[] for _ in PHASES]
        for rec in result["auto"]["records"]:
            per[_phase_of(rec["t"], bounds)].append(rec)
        for k, phase in enumerate(PHASES):
            decided = [r["x"] for r in per[k] if not _is_probe(r) and r["x"] in (0, 1)]
            if phase in better and decided:
                table[phase]["auto"]["agree"] = round(sum(x == better[phase] for x in decided) / len(decided), 3)
        for k, event in enumerate(events, start=1):
            old, new = better.get(PHASES[k - 1]), better.get(PHASES[k])
            entry = {"change": f"{PHASES[k - 1]} -> {PHASES[k]}", "what": event["what"], "better_before": old,
                     "better_after": new}
            row = table[PHASES[k]]
            if new is not None and "local" in row and "remote" in row:  # by how much the better side is better
                won, lost_ = (row["remote"], row["local"]) if new == 1 else (row["local"], row["remote"])
                entry["margin"] = {q: round(lost_[f"{q}_ms"] / won[f"{q}_ms"] - 1, 3) for q in ("p50", "p99")}
            if old is not None and new is not None and old != new:
                last = [r for r in per[k - 1] if not _is_probe(r) and r["x"] in (0, 1)][-1:]
                if last and last[0]["x"] == new:
                    entry["delay_s"], entry["note"] = 0.0, "auto was already on that side"
                else:
                    first = next((r for r in per[k] if not _is_probe(r) and r["x"] == new), None)
                    entry["delay_s"] = round(first["t"] - event["t"], 3) if first else None
            switches.append(entry)
    return {"table": table, "switches": switches}


def report(args: argparse.Namespace, result: dict, analysis: dict) -> None:
    table, switches = analysis["table"], analysis["switches"]
    modes = [m for m in MODES if m in result]
    print(f"\nheavy branch (32 ch x {args.depth} conv3x3 on [1, 8, 32, 32]); device at {args.cpu}% of one CPU; "
          f"{args.rate} req/s open loop; 5 phases x {args.phase_s} s per mode, modes one after the other; "
          "policy 'latency' " + (f"{{ {args.policy_options} }}" if args.policy_options else "(default options)"))
    head = f"{'phase':<12} | " + " | ".join(f"{m + ' p50/p99 ms':>20} {'off%':>4} {'fb':>3} {'lost':>4}"
                                            for m in modes)
    print(head + " | auto p99 / best | target")
    verdicts = {}
    for phase in PHASES:
        row = table[phase]
        cells = []
        for m in modes:
            c = row[m]
            cells.append(f"{c['p50_ms']:>9.1f} / {c['p99_ms']:>7.1f} {c['offload_share'] * 100:>4.0f} "
                         f"{c['fallbacks']:>3} {c['lost']:>4}")
        line = f"{phase:<12} | " + " | ".join(cells)
        if all(m in row for m in MODES):
            best = min(row["local"]["p99_ms"], row["remote"]["p99_ms"])
            ratio = row["auto"]["p99_ms"] / best
            verdicts[phase] = ratio
            line += f" | {ratio:14.2f} | {'ok' if ratio <= P99_TARGET else 'MISS'}"
        print(line)
    print("(off% = share of requests offloaded; fb = remote requests that fell back to the device)")
    if "auto" in table[PHASES[0]]:
        print("auto: probes / decision changes per phase: " + ", ".join(
            f"{p} {table[p]['auto']['probes']}/{table[p]['auto']['switches']}" for p in PHASES))
    if "auto" in table[PHASES[0]]:
        print("auto: share of its (non-probe) decisions for the better side per phase: " + ", ".join(
            f"{p} {table[p]['auto'].get('agree', float('nan')) * 100:.0f}%" for p in PHASES))
    gate = result.get("auto", {}).get("gate")
    if gate:
        print(f"auto: gate decisions {gate['decisions']}; spare local copies that came due: "
              f"{gate['spares'] or 'none'}; withdrawn before due: {gate['withdrawn']}")
    side = {0: "local", 1: "remote", None: "?"}
    print("\nchanges (better side = lower p50 of the forced runs in that phase; delay = first non-probe decision of "
          "auto for the new better side):")
    for s in switches:
        d = s.get("delay_s")
        if s["better_before"] == s["better_after"]:
            verdict = "no switch needed"
        elif d is None:
            verdict = "auto never switched in this phase -> MISS"
        else:
            verdict = f"auto switched after {d:.2f} s{' (' + s['note'] + ')' if s.get('note') else ''} -> " + \
                ("ok" if d <= SWITCH_TARGET_S else "MISS")
        margin = s.get("margin")
        by = f" (by {margin['p50']:.0%} at p50, {margin['p99']:.0%} at p99)" if margin else ""
        print(f"  {s['change']:<26} ({s['what']}): better {side[s['better_before']]} -> "
              f"{side[s['better_after']]}{by}: {verdict}")
    lost = {m: sum(1 for r in result[m]["records"] if r["err"]) for m in modes}
    errs = [r["err"] for m in modes for r in result[m]["records"] if r["err"]]
    print(f"\nlost requests: {lost}" + (f"; e.g. {errs[:3]}" if errs else ""))
    print("pipeline counters per mode (submitted/ok/failed/late): "
          + ", ".join(f"{m} {s['submitted']}/{s['ok']}/{s['failed']}/{s['late']}"
                      for m, s in ((m, result[m]["stats"]) for m in modes)))
    switch_ok = all(s.get("delay_s") is not None and s["delay_s"] <= SWITCH_TARGET_S
                    for s in switches if s["better_before"] != s["better_after"])
    p99_ok = all(v <= P99_TARGET for v in verdicts.values())
    print(f"targets: switch within {SWITCH_TARGET_S:g} s: {'met' if switch_ok else 'MISSED'}; auto p99 within "
          f"{(P99_TARGET - 1) * 100:.0f}% of the better fixed mode in every phase: {'met' if p99_ok else 'MISSED'} "
          f"({sum(v <= P99_TARGET for v in verdicts.values())}/{len(verdicts)} phases); zero lost: "
          f"{'met' if not any(lost.values()) else 'MISSED'}")
    plot(args, result)
    print(json.dumps({"bench": "policy", "rate": args.rate, "phase_s": args.phase_s, "cpu_pct": args.cpu,
                      "policy_options": args.policy_options, "local_nice": args.local_nice, "table": table,
                      "switches": switches, "lost": lost,
                      "auto_p99_over_best": {k: round(v, 3) for k, v in verdicts.items()},
                      "switch_met": switch_ok, "p99_met": p99_ok, "zero_lost_met": not any(lost.values()),
                      "plot": args.plot}))


def pool(args: argparse.Namespace, files: list[str]) -> None:
    """Report several runs' raw records (``--raw`` files) together: each run's verdicts, then p50/p99 per phase and
    mode over all their requests. A phase of one run holds ~48 requests, so its p99 is its slowest request or two;
    pooled, the p99 says how auto does in that phase rather than how one request went."""
    runs = [json.loads(Path(f).read_text()) for f in files]
    missing = [f for f, result in zip(files, runs) if any(m not in result for m in MODES)]
    if missing:
        raise SystemExit(f"--pool needs runs of all three modes ({', '.join(MODES)}); not in: {', '.join(missing)}")
    print(f"\n{len(runs)} runs pooled: " + ", ".join(files))
    pooled: dict[str, dict[str, list[float]]] = {p: {m: [] for m in MODES} for p in PHASES}
    all_delays: list[float | None] = []
    lost = {m: 0 for m in MODES}
    tables = []
    for f, result in zip(files, runs):
        analysis = analyse(args, result)
        table = analysis["table"]
        tables.append(table)
        ratios = [table[p]["auto"]["p99_ms"] / min(table[p]["local"]["p99_ms"], table[p]["remote"]["p99_ms"])
                  for p in PHASES]
        delays = [s.get("delay_s") for s in analysis["switches"] if s["better_before"] != s["better_after"]]
        all_delays += delays
        print(f"  {f}: auto p99 / best per phase " + " ".join(f"{r:.2f}" for r in ratios)
              + f" ({sum(r <= P99_TARGET for r in ratios)}/{len(ratios)} within {(P99_TARGET - 1) * 100:.0f}%); "
              + "switch delays " + ", ".join("never" if d is None else f"{d:.2f} s" for d in delays))
        for mode in MODES:
            bounds = [0.0] + [e["t"] for e in result[mode]["events"]]
            for rec in result[mode]["records"]:
                if not rec["err"]:
                    pooled[PHASES[_phase_of(rec["t"], bounds)]][mode].append(rec["lat"])
                else:
                    lost[mode] += 1
    print(f"{'phase':<12} | {'n':>4} | " + " | ".join(f"{m + ' p50/p99 ms':>20}" for m in MODES)
          + " | auto p99 / best | target")
    met = 0
    for phase in PHASES:
        row = {m: (_pct(pooled[phase][m], 50) * 1e3, _pct(pooled[phase][m], 99) * 1e3) for m in MODES}
        ratio = row["auto"][1] / min(row["local"][1], row["remote"][1])
        met += ratio <= P99_TARGET
        print(f"{phase:<12} | {len(pooled[phase]['auto']):>4} | "
              + " | ".join(f"{row[m][0]:>9.1f} / {row[m][1]:>8.1f}" for m in MODES)
              + f" | {ratio:14.2f} | {'ok' if ratio <= P99_TARGET else 'MISS'}")
    in_time = sum(d is not None and d <= SWITCH_TARGET_S for d in all_delays)
    if len(tables) > 1:
        noise_floor(tables, {p: min(("local", "remote"), key=lambda m: _pct(pooled[p][m], 50)) for p in PHASES})
    print(f"pooled: auto p99 within {(P99_TARGET - 1) * 100:.0f}% of the better fixed mode in {met}/{len(PHASES)} "
          f"phases; switches within {SWITCH_TARGET_S:g} s: {in_time}/{len(all_delays)}; lost or wrong: "
          + ", ".join(f"{m} {n}" for m, n in lost.items()))


def noise_floor(tables: list[dict], better: dict[str, str]) -> None:
    """What the per-run target asks, measured on the fixed modes themselves: the better fixed mode of one run put in
    auto's place and held against another run's better fixed mode, phase by phase (every ordered pair of runs). A
    policy that always chose the better side could do no better than this; auto's own per-run figures follow."""
    def within(p99: float, table: dict, phase: str) -> bool:
        return p99 <= P99_TARGET * min(table[phase]["local"]["p99_ms"], table[phase]["remote"]["p99_ms"])

    pairs = [(a, b) for a in tables for b in tables if a is not b]
    phase_ok = {p: sum(within(a[p][better[p]]["p99_ms"], b, p) for a, b in pairs) for p in PHASES}
    all_ok = sum(all(within(a[p][better[p]]["p99_ms"], b, p) for p in PHASES) for a, b in pairs)
    auto_ok = {p: sum(within(t[p]["auto"]["p99_ms"], t, p) for t in tables) for p in PHASES}
    auto_all = sum(all(within(t[p]["auto"]["p99_ms"], t, p) for p in PHASES) for t in tables)
    counts = [t[p][m]["n"] for t in tables for p in PHASES for m in ("local", "remote")]
    print(f"noise floor: a phase of one run holds ~{round(sum(counts) / len(counts))} requests, so its p99 is its "
          "slowest request or so")
    print(f"  the better fixed mode of one run in auto's place, against another run ({len(pairs)} pairs), within "
          f"{(P99_TARGET - 1) * 100:.0f}%: " + ", ".join(f"{p} {phase_ok[p]}/{len(pairs)}" for p in PHASES)
          + f"; all five phases in {all_ok}/{len(pairs)}")
    print(f"  auto against its own run ({len(tables)} runs): " + ", ".join(f"{p} {auto_ok[p]}/{len(tables)}"
                                                                    for p in PHASES)
          + f"; all five phases in {auto_all}/{len(tables)}")


def plot(args: argparse.Namespace, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"auto": "tab:blue", "local": "tab:green", "remote": "tab:red"}
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(12, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for mode in (m for m in MODES if m in result):
        recs = [r for r in result[mode]["records"] if r["lat"] is not None]
        ax1.plot([r["t"] for r in recs], [r["lat"] * 1e3 for r in recs], ".", ms=4, color=colors[mode],
                 label=f"{mode}", alpha=0.8)
        bad = [r for r in result[mode]["records"] if r["err"]]
        if bad:
            ax1.plot([r["t"] for r in bad], [1.0] * len(bad), "x", color=colors[mode], label=f"{mode} lost")
    events = result[next(iter(result))]["events"]
    bounds = [0.0] + [e["t"] for e in events] + [args.phase_s * len(PHASES)]
    for k, phase in enumerate(PHASES):
        if phase in ("bad link", "busy device"):
            for ax in (ax1, ax2):
                ax.axvspan(bounds[k], bounds[k + 1], color="orange" if phase == "bad link" else "grey", alpha=0.15)
        ax1.text((bounds[k] + bounds[k + 1]) / 2, 1.02, phase, transform=ax1.get_xaxis_transform(), ha="center")
    ax1.set_yscale("log")
    ax1.set_ylabel("latency (ms)")
    ax1.legend(loc="upper right")
    ax1.grid(True, which="both", alpha=0.3)
    if "auto" in result:
        recs = [r for r in result["auto"]["records"] if r["x"] in (0, 1)]
        normal = [r for r in recs if not _is_probe(r)]
        probes = [r for r in recs if _is_probe(r)]
        ax2.step([r["t"] for r in normal], [r["x"] for r in normal], where="post", color=colors["auto"],
                 label="auto: X (1 = offload)")
        ax2.plot([r["t"] for r in probes], [r["x"] for r in probes], "o", mfc="none", color="black", ms=5,
                 label="probe")
    ax2.set_yticks([0, 1], ["local", "remote"])
    ax2.set_xlabel("time since the run started (s); phases from the auto run (the other runs differ by < 0.1 s)")
    ax2.legend(loc="center right")
    ax2.grid(True, alpha=0.3)
    fig.suptitle(f"offload policy: heavy branch, device {args.cpu}% CPU, {args.rate} req/s", y=0.995)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    print(f"plot: {args.plot}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--phase-s", type=float, default=12.0, help="seconds per phase (5 phases per mode)")
    parser.add_argument("--rate", type=float, default=4.0, help="requests per second (open loop)")
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--cpu", type=float, default=25, help="device CPU share, %% of one CPU")
    parser.add_argument("--modes", default="auto,local,remote")
    parser.add_argument("--branch-ms", type=float, default=30.0,
                        help="calibrate the heavy branch to this many ms per call on a host core")
    parser.add_argument("--policy-options", default="", help='TOML inline-table body, e.g. "probe_interval_s = 5"')
    parser.add_argument("--host-timeout-s", type=float, default=5.0)
    parser.add_argument("--local-nice", type=int, default=10,
                        help="nice of the device's heavy branch (0: same priority as the stages handling replies)")
    parser.add_argument("--port", type=int, default=5555)
    parser.add_argument("--plot", default="/tmp/zpipe-bench-policy.png")
    parser.add_argument("--raw", help="also write every request's record (time, latency, X, reason) here (JSON)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run the whole schedule this many times, then report them pooled (see --pool); "
                             "with --raw F each run's records go to F.1, F.2, ...; each run starts with the next "
                             "mode (auto, local, remote; then local, remote, auto; ...): none always runs first")
    parser.add_argument("--pool", nargs="+", metavar="RAW",
                        help="run nothing: report these --raw files of earlier runs, each and all together")
    parser.add_argument("--device", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device:
        device_main(args)
        return
    if args.pool:
        pool(args, args.pool)
        return
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces, cgroups)")
    if args.repeats < 1:
        raise SystemExit("--repeats needs a positive number of runs")
    if args.repeats > 1 and set(args.modes.split(",")) != set(MODES):
        raise SystemExit(f"--repeats pools the runs, which needs all three modes ({','.join(MODES)})")
    started = time.monotonic()
    raws = []
    for k in range(1, args.repeats + 1):
        if args.repeats > 1:
            log(f"run {k} of {args.repeats}")
        run_args = args
        if args.repeats > 1:  # each run its own plot: F.png -> F.1.png, ...; and the next mode first (see --repeats)
            plot = Path(args.plot)
            modes = args.modes.split(",")
            modes = modes[(k - 1) % len(modes):] + modes[:(k - 1) % len(modes)]
            log(f"run {k}: modes in the order {', '.join(modes)}")
            run_args = argparse.Namespace(**{**vars(args), "modes": ",".join(modes),
                                             "plot": str(plot.with_name(f"{plot.stem}.{k}{plot.suffix}"))})
        result = orchestrate(run_args)
        raw = args.raw if args.repeats == 1 else (f"{args.raw}.{k}" if args.raw else
                                                   f"{tempfile.gettempdir()}/zpipe-bench-policy.{os.getpid()}.{k}.json")
        if raw:
            Path(raw).write_text(json.dumps(result))
            raws.append(raw)
        report(run_args, result, analyse(run_args, result))
    if args.repeats > 1:
        pool(args, raws)
    log(f"total {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
