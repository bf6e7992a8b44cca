"""Start-up and memory of a many-stage pipeline: stage groups vs one process per stage vs onnxruntime (issue 8).

    python bench/startup.py [--repeats 3] [--skip-per-stage] [--stages 4,16,46] [--out DIR]

Builds Inception-style nets in code (``zpipe.compile.models.inception_net``) that ``zpipe compile`` cuts into 4,
16 and 46 stages, compiles each untuned into a work folder, and launches ``zpipe run TOPOLOGY --inputs IN.npz
--requests 1 --json`` as a fresh process in two layouts: *grouped* (the topology as compiled: ``group = "autoN"``
keys, at most one worker process per CPU) and *per-stage* (the same libraries, the ``group`` keys dropped and
``[pipeline] groups = "per-stage"``: one worker process per stage). The baseline, measured in the same run, is
onnxruntime running the whole ONNX model once in one fresh Python process (CPUExecutionProvider).

Measured per launch: time to first result (the wall clock when the first request finished, as ``zpipe run --json``
reports it in ``first_result_unix``, minus the wall clock just before ``Popen``) and the peak total RSS of the
launched process plus all its descendants (psutil, sampled every 20 ms; RSS summed over the tree, so pages shared
between processes, e.g. libtvm's text, count once per process). One untimed warm-up launch per configuration
(warm page cache), then ``--repeats`` rounds that interleave the configurations of a model; medians are reported.
A reference row times a bare ``import tvm`` in a fresh process (what every TVM worker process pays at least).

Prints a table (ratios to onnxruntime), whether the targets for the grouped layout at 40+ stages are met (first
result <= 5 s, peak RSS <= 1 GiB), then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

MODELS = {4: dict(blocks=1, branches=2), 16: dict(blocks=3, branches=4), 46: dict(blocks=9, branches=4)}
SAMPLE_S = 0.02
TIMEOUT_S = 300.0
TARGET_S, TARGET_MIB, TARGET_STAGES = 5.0, 1024.0, 40

ORT_SCRIPT = """
import sys, time
import numpy as np
import onnxruntime as ort
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
with np.load(sys.argv[2]) as npz:
    feeds = {name: npz[name] for name in npz.files}
session.run(None, feeds)
print(time.time(), flush=True)
"""

IMPORT_TVM_SCRIPT = """
import time
from zpipe.tvm_runtime import import_tvm
import_tvm()
print(time.time(), flush=True)
"""


def _tree(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _kill_tree(proc: psutil.Process) -> None:
    """Kill ``proc`` and every descendant (children first collected, so none is orphaned unseen)."""
    victims = _tree(proc)
    for p in reversed(victims):
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=10)


def launch(argv: list[str], work: Path) -> dict:
    """Run ``argv`` to completion; return its last stdout line, wall-clock start, peak tree RSS and process count."""
    stdout_path, stderr_path = work / "launch.out", work / "launch.err"
    peak_rss, peak_children = 0, 0
    with open(stdout_path, "w") as out, open(stderr_path, "w") as err:
        t0 = time.time()
        popen = subprocess.Popen(argv, stdout=out, stderr=err)
        proc = psutil.Process(popen.pid)
        try:
            while popen.poll() is None:
                rss, alive = 0, 0
                for p in _tree(proc):
                    try:
                        rss += p.memory_info().rss
                        alive += 1
                    except (psutil.NoSuchProcess, psutil.ZombieProcess):
                        pass
                peak_rss = max(peak_rss, rss)
                peak_children = max(peak_children, alive - 1)
                if time.time() - t0 > TIMEOUT_S:
                    raise TimeoutError(f"{argv[:3]} still running after {TIMEOUT_S:.0f} s")
                time.sleep(SAMPLE_S)
            exit_s = time.time() - t0
        except BaseException:
            _kill_tree(proc)
            raise
    if popen.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {popen.returncode}:\n{stderr_path.read_text()[-3000:]}")
    lines = [line for line in stdout_path.read_text().splitlines() if line.strip()]
    return {"t0": t0, "last_line": lines[-1] if lines else "", "peak_rss_mib": peak_rss / 2**20,
            "children": peak_children, "exit_s": exit_s}


def measure_zpipe(zpipe_exe: Path, topology: Path, inputs: Path, work: Path) -> dict:
    run = launch([str(zpipe_exe), "run", str(topology), "--inputs", str(inputs), "--requests", "1", "--json"], work)
    summary = json.loads(run["last_line"])
    if not summary.get("first_result_unix"):
        raise RuntimeError(f"zpipe run {topology}: no first result: {summary}")
    return {"first_s": summary["first_result_unix"] - run["t0"], "peak_rss_mib": run["peak_rss_mib"],
            "processes": run["children"], "exit_s": run["exit_s"]}


def measure_script(script: str, args: list[str], work: Path) -> dict:
    run = launch([sys.executable, "-c", script, *args], work)
    return {"first_s": float(run["last_line"]) - run["t0"], "peak_rss_mib": run["peak_rss_mib"],
            "processes": 1 + run["children"], "exit_s": run["exit_s"]}


def per_stage_topology(grouped: Path) -> Path:
    """The grouped topology with its ``group`` keys dropped and ``groups = "per-stage"``: one process per stage.
    Written next to it, so it points at the very same libraries."""
    text = re.sub(r'(?m)^group = "[^"]*"\n', "", grouped.read_text())
    text, n = re.subn(r"(?m)^\[pipeline\]\n", '[pipeline]\ngroups = "per-stage"\n', text, count=1)
    if n != 1 or re.search(r"(?m)^group\s*=", text):
        raise RuntimeError(f"{grouped}: unexpected topology layout")
    path = grouped.with_name("topology-per-stage.toml")
    path.write_text(text)
    return path


def build(stages: int, out: Path) -> tuple[Path, Path, int]:
    """Compile the net meant to cut into ``stages`` stages; returns (ONNX path, topology path, actual stages)."""
    import onnx

    from zpipe.compile import CompileOptions, compile_model
    from zpipe.compile.models import inception_net

    model = out / f"inception_{stages}.onnx"
    onnx.save(inception_net(**MODELS[stages]), model)
    started = time.monotonic()
    report = compile_model(model, out / f"inception_{stages}", CompileOptions(), progress=lambda _msg: None)
    n = len(report.plan.stages)
    print(f"compiled {stages:>2}-stage net: {n} stages, {len(set(report.groups.values()))} groups, "
          f"{time.monotonic() - started:.1f} s", flush=True)
    return model, report.topology, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed launches per configuration (median)")
    parser.add_argument("--skip-per-stage", action="store_true",
                        help="skip one-process-per-stage (at 46 stages: ~40 s and ~5 GB per launch)")
    parser.add_argument("--stages", default="4,16,46", help="comma-separated subset of 4,16,46")
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args()
    wanted = [int(s) for s in args.stages.split(",")]
    if not set(wanted) <= set(MODELS):
        parser.error(f"--stages: choose from {sorted(MODELS)}")

    out = args.out or Path(tempfile.mkdtemp(prefix="zpipe-bench-startup-"))
    out.mkdir(parents=True, exist_ok=True)
    zpipe_exe = Path(sys.executable).with_name("zpipe")
    inputs = out / "inputs.npz"
    np.savez(inputs, x=np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32))

    configs = []  # (stages, layout, how to measure)
    for stages in wanted:
        model, topology, n = build(stages, out)
        configs.append((n, "onnxruntime", lambda m=model: measure_script(ORT_SCRIPT, [str(m), str(inputs)], out)))
        configs.append((n, "grouped", lambda t=topology: measure_zpipe(zpipe_exe, t, inputs, out)))
        if not args.skip_per_stage:
            per_stage = per_stage_topology(topology)
            configs.append((n, "per-stage", lambda t=per_stage: measure_zpipe(zpipe_exe, t, inputs, out)))
    configs.append((0, "import tvm", lambda: measure_script(IMPORT_TVM_SCRIPT, [], out)))

    samples: dict[tuple[int, str], list[dict]] = {(n, layout): [] for n, layout, _ in configs}
    for n, layout, fn in configs:  # untimed warm-up: page cache, .pyc files
        fn()
    for round_ in range(args.repeats):
        for n, layout, fn in configs:
            samples[(n, layout)].append(fn())
        print(f"round {round_ + 1}/{args.repeats} done", flush=True)

    rows = {}
    for key, runs in samples.items():
        rows[key] = {"first_s": statistics.median(r["first_s"] for r in runs),
                     "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in runs),
                     "processes": max(r["processes"] for r in runs),
                     "exit_s": statistics.median(r["exit_s"] for r in runs),
                     "first_s_all": [round(r["first_s"], 3) for r in runs]}
    print(f"\nstart-up to first result and peak RSS (process tree), median of {args.repeats}; "
          "ratio = / onnxruntime in one process, same run")
    print(f"{'stages':>6} | {'layout':<11} | {'processes':>9} | {'first result':>12} | {'peak RSS':>10} | "
          f"{'time ratio':>10} | {'RSS ratio':>9}")
    for (n, layout), row in rows.items():
        if layout == "import tvm":
            continue
        base = rows[(n, "onnxruntime")]
        print(f"{n:>6} | {layout:<11} | {row['processes']:>9} | {row['first_s']:10.2f} s | "
              f"{row['peak_rss_mib']:7.0f} MB | {row['first_s'] / base['first_s']:10.2f} | "
              f"{row['peak_rss_mib'] / base['peak_rss_mib']:9.2f}")
    tvm_row = rows[(0, "import tvm")]
    print(f"reference: a bare `import tvm` process: {tvm_row['first_s']:.2f} s, {tvm_row['peak_rss_mib']:.0f} MB")

    big = [(n, row) for (n, layout), row in rows.items() if layout == "grouped" and n >= TARGET_STAGES]
    met = None
    if big:
        met = all(row["first_s"] <= TARGET_S and row["peak_rss_mib"] <= TARGET_MIB for _, row in big)
        for n, row in big:
            print(f"target at {n} stages, grouped: first result {row['first_s']:.2f} s <= {TARGET_S:.0f} s "
                  f"{'met' if row['first_s'] <= TARGET_S else 'NOT MET'}; peak RSS {row['peak_rss_mib']:.0f} MB "
                  f"<= {TARGET_MIB:.0f} MB {'met' if row['peak_rss_mib'] <= TARGET_MIB else 'NOT MET'}")
    else:
        print(f"targets (grouped, {TARGET_STAGES}+ stages): not measured in this run")
    print(json.dumps({"bench": "startup", "repeats": args.repeats,
                      "rows": [{"stages": n, "layout": layout, **row} for (n, layout), row in rows.items()],
                      "target_met": met}))


if __name__ == "__main__":
    main()
