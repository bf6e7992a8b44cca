"""The model path: onnxruntime vs untuned vs tuned TVM on the demo ONNX model, per stage and whole; compile time
with a cold and a warm tuning cache.

    python bench/compile.py [--trials 64] [--out DIR]

Builds the demo model in code (``zpipe.compile.models.demo_model``), compiles it cut into stages and as one stage,
untuned and tuned (``--trials`` MetaSchedule trials per stage, a fresh database, then again with the now warm
database), and times every stage alone: onnxruntime on the stage's own ONNX model (2 threads) against TVM's
``time_evaluator`` on its library, fed by the previous stages' real outputs. Prints a table (ratios TVM/ORT) and
one JSON line. Tuning runs in child processes (zpipe's tuner); this process only imports onnxruntime for timing.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def ort_ms(path: Path, feeds: dict[str, np.ndarray], n: int = 200) -> tuple[float, dict[str, np.ndarray]]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    own = {i.name: feeds[i.name] for i in session.get_inputs()}
    for _ in range(20):
        session.run(None, own)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        session.run(None, own)
        times.append(time.perf_counter() - t0)
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, own)))
    return 1000 * float(np.median(times)), outputs


def tvm_ms(manifest_path: Path, feeds: dict[str, np.ndarray]) -> float:
    from zpipe.manifest import Manifest
    from zpipe.tvm_runtime import import_tvm, load_vm

    tvm = import_tvm()
    manifest = Manifest.load(manifest_path)
    vm = load_vm(str(manifest_path.with_suffix(".so")))
    args = [tvm.runtime.tensor(np.ascontiguousarray(feeds[t.name])) for t in manifest.inputs]
    timer = vm.time_evaluator(manifest.function, tvm.cpu(), number=20, repeat=7, min_repeat_ms=50)
    return 1000 * float(np.median(timer(*args).results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=64, help="MetaSchedule trials per stage")
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args()
    import onnx

    from zpipe.compile import CompileOptions, TuningOptions, compile_model
    from zpipe.compile.models import demo_model

    out = args.out or Path(tempfile.mkdtemp(prefix="zpipe-bench-compile-"))
    out.mkdir(parents=True, exist_ok=True)
    model = out / "demo.onnx"
    onnx.save(demo_model(), model)
    db = out / "tuning-db"
    tuned = TuningOptions(trials=args.trials, database_root=db)
    runs = {"untuned": CompileOptions(), "untuned_whole": CompileOptions(whole=True),
            "tuned_cold": CompileOptions(tuning=tuned), "tuned_warm": CompileOptions(tuning=tuned),
            "tuned_whole_warm": CompileOptions(whole=True, tuning=tuned)}
    reports, compile_s = {}, {}
    for label, options in runs.items():
        started = time.monotonic()
        reports[label] = compile_model(model, out / label, options, progress=lambda _msg: None)
        compile_s[label] = time.monotonic() - started
        cached = {t.stage: f"{t.cached}/{t.tasks} cached" for t in reports[label].tuning}
        print(f"compile {label:<17} {compile_s[label]:7.1f} s  {cached}", flush=True)
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    feeds = {"x": x}
    rows = []
    for build in reports["untuned"].builds:
        o_ms, outputs = ort_ms(build.manifest.with_suffix(".onnx"), feeds)
        u_ms = tvm_ms(build.manifest, feeds)
        t_ms = tvm_ms(reports["tuned_warm"].out_dir / "stages" / build.manifest.name, feeds)
        rows.append((build.name, o_ms, u_ms, t_ms))
        feeds.update(outputs)  # the next stages read the real outputs
    whole = reports["untuned_whole"].builds[0].manifest
    o_ms, _ = ort_ms(model, {"x": x})
    rows.append(("whole model", o_ms, tvm_ms(whole, {"x": x}),
                 tvm_ms(reports["tuned_whole_warm"].out_dir / "stages" / whole.name, {"x": x})))
    print(f"\n{'stage':<16} {'onnxruntime':>12} {'untuned TVM':>12} {'tuned TVM':>12} {'untuned/ORT':>12} "
          f"{'tuned/ORT':>10}   ({args.trials} trials per stage)")
    for name, o, u, t in rows:
        print(f"{name:<16} {o:10.3f}ms {u:10.3f}ms {t:10.3f}ms {u / o:12.2f} {t / o:10.2f}")
    met = all(t / o <= 1.0 for _, o, _, t in rows)
    print(f"\ntarget tuned/ORT <= 1.0 for every stage and the whole model: {'met' if met else 'NOT MET'}")
    print(f"compile time: cold tuning {compile_s['tuned_cold']:.1f} s, warm {compile_s['tuned_warm']:.1f} s, "
          f"untuned {compile_s['untuned']:.1f} s")
    print(json.dumps({"bench": "compile", "trials": args.trials, "compile_s": compile_s,
                      "stages": [{"stage": n, "ort_ms": o, "untuned_ms": u, "tuned_ms": t} for n, o, u, t in rows],
                      "target_met": met}))


if __name__ == "__main__":
    main()
