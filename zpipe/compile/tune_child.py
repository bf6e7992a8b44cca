"""The tuning child: ``python -m zpipe.compile.tune_child`` reads one JSON request on stdin and tunes its stages.

Request: ``{"target": <Target JSON>, "database": DIR, "trials": N, "work_dir": DIR,
"stages": [{"name": ..., "onnx": PATH}, ...]}``. It writes one JSON event per line on stdout; everything else
the process prints (TVM's logging included) goes to stderr:

* ``{"event": "stage", "stage", "tasks", "cached", "budget"}`` before a stage's tuning starts;
* ``{"event": "trials", "stage", "task", "done", "total", "best_ms"}`` after every measured batch;
* ``{"event": "done", "stage", "tasks", "cached", "tuned", "trials", "seconds", "best_ms"}`` when it is tuned.

Only tasks missing from the database (see :mod:`zpipe.compile.tuning`) are tuned. Records go to the database as
they are measured; the ledger is updated when a stage finishes.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
import types
from pathlib import Path
from typing import Any, TextIO

__all__ = ["main", "load_cpu_intrinsics", "EVOLUTION_FROM"]

EVOLUTION_FROM = 8  # per-task trial budget from which the evolutionary search is used


def load_cpu_intrinsics(*, only_stub: bool = False) -> None:
    """Register the CPU tensor intrinsics (x86, ARM) without importing the whole ``tvm.s_tir.tensor_intrin``.

    MetaSchedule imports that package in the tuner and in every builder process (its pool restarts per batch);
    the package's CUDA part alone takes ~7 s of the ~10 s here. The package is pre-registered in ``sys.modules``
    with its real path, so the CPU submodules import normally. ``only_stub`` registers no intrinsics at all: the
    builder gets candidates that are already scheduled (tensorized blocks hold the intrinsic's code), so it
    needs none.
    """
    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        return
    import tvm.s_tir

    package = types.ModuleType(name)
    package.__path__ = [os.path.join(os.path.dirname(tvm.s_tir.__file__), "tensor_intrin")]
    package.__package__ = name
    sys.modules[name] = package
    for sub in () if only_stub else ("x86", "arm_cpu"):
        importlib.import_module(f"{name}.{sub}")


def _builder_init() -> None:
    load_cpu_intrinsics(only_stub=True)


def main() -> None:
    events = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else printed (TVM, MetaSchedule) goes to stderr, never into the event stream
    sys.stdout = sys.stderr
    request = json.loads(sys.stdin.read())

    import onnx
    import tvm

    target = tvm.target.Target(json.loads(request["target"]))
    if target.kind.name == "llvm":
        load_cpu_intrinsics()
    from . import tuning

    directory = Path(request["database"])
    database = tuning.open_database(directory)
    for stage in request["stages"]:
        _tune_stage(stage["name"], onnx.load(stage["onnx"]), target=target, database=database,
                    directory=directory, trials=int(request["trials"]), work_dir=request["work_dir"],
                    events=events)


def _tune_stage(name: str, model: Any, *, target: Any, database: Any, directory: Path, trials: int,
                work_dir: str, events: TextIO) -> None:
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.relax_integration import extracted_tasks_to_tune_contexts

    from . import tuning

    started = time.monotonic()
    tasks = tuning.stage_tasks(tuning.tuning_module(model), target)
    budget = tuning.task_budget(trials, len(tasks))
    pending = tuning.pending_tasks(tasks, database, tuning.read_ledger(directory), budget)
    _emit(events, event="stage", stage=name, tasks=len(tasks), cached=len(tasks) - len(pending), budget=budget)
    progress, state = _progress_callback(name, [t.task_name for t in pending], max(trials, len(pending)), events)
    if pending:
        contexts, weights = extracted_tasks_to_tune_contexts(
            pending, work_dir=work_dir, strategy=_strategy(budget))
        builder = ms.builder.LocalBuilder(max_workers=max(1, min(os.cpu_count() or 1, budget)),
                                          initializer=_builder_init if target.kind.name == "llvm" else None)
        ms.tune.tune_tasks(tasks=contexts, task_weights=weights, work_dir=work_dir,
                           max_trials_global=max(trials, len(pending)), num_trials_per_iter=min(64, budget),
                           database=database, cost_model="random", builder=builder,
                           measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"), progress])
        tuning.update_ledger(directory, {tuning.workload_key(t): budget for t in pending})
    _emit(events, event="done", stage=name, tasks=len(tasks), cached=len(tasks) - len(pending), tuned=len(pending),
          trials=state["done"], seconds=round(time.monotonic() - started, 3), best_ms=state["best"])


def _strategy(budget: int) -> Any:
    """Random sampling of the design space for small per-task budgets (evolution needs a population of measured
    candidates to pay off, and takes seconds per round to breed one); evolutionary search from 8 trials per task."""
    from tvm.s_tir import meta_schedule as ms

    if budget < EVOLUTION_FROM:
        return ms.search_strategy.ReplayTrace()
    return ms.search_strategy.EvolutionarySearch(population_size=min(512, 16 * budget),
                                                 init_min_unmeasured=min(50, 2 * budget))


def _progress_callback(stage: str, task_names: list[str], total: int, events: TextIO) -> tuple[Any, dict]:
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    state = {"done": 0, "best": {}}

    @derived_object
    class Progress(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
            state["done"] += len(runner_results)
            task = task_names[task_id] if task_id < len(task_names) else str(task_id)
            for result in runner_results:
                if result.error_msg is None and result.run_secs:
                    ms_value = 1000 * sum(float(s) for s in result.run_secs) / len(result.run_secs)
                    state["best"][task] = min(ms_value, state["best"].get(task, ms_value))
            _emit(events, event="trials", stage=stage, task=task, done=state["done"], total=total,
                  best_ms=state["best"].get(task))

    return Progress(), state


def _emit(events: TextIO, **event: Any) -> None:
    events.write(json.dumps(event) + "\n")


if __name__ == "__main__":
    main()
