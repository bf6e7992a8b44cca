"""MetaSchedule tuning of stages: a persistent database keyed by workload, and tuning in a child process.

Database layout: ``ROOT/<target key>/`` holds MetaSchedule's JSON database (``database_workload.json``,
``database_tuning_record.json``: records keyed by each TIR workload's structural hash, so any model or stage with
the same layer shapes reuses them) and zpipe's ledger ``zpipe-ledger.json`` (per workload hash: the largest
per-task trial budget it was tuned with). ``ROOT`` defaults to ``$XDG_CACHE_HOME/zpipe/tuning``
(``~/.cache/zpipe/tuning``); the target key separates CPU models and GPUs, whose records must not mix.

A stage's tasks (one per distinct TIR workload) get ``budget = max(1, trials // tasks)`` trials each at least. A
task is *cached* when the database holds records for it and the ledger says it was tuned with at least that
budget; only the other tasks are tuned. Tuning runs in a fresh interpreter (:mod:`zpipe.compile.tune_child`)
under a deadline: MetaSchedule's builder stalled once in a process that had run onnxruntime, and a stuck tuner
must not hang the compile. Records are committed as they are measured, so a killed run keeps what it measured.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import CompileError

__all__ = ["TuningOptions", "StageTuning", "default_database_root", "database_dir", "open_database",
           "tuning_module", "stage_tasks", "task_budget", "pending_tasks", "applied_tasks", "read_ledger", "update_ledger",
           "run_tuning"]

LEDGER = "zpipe-ledger.json"


@dataclass(frozen=True, kw_only=True)
class TuningOptions:
    """``trials``: MetaSchedule trials per stage (each task gets at least one); ``database_root``: where records
    live; ``timeout_s``: deadline of the whole tuning run (all stages)."""

    trials: int
    database_root: Path
    timeout_s: float = 3600.0

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise CompileError(f"--tune {self.trials}: the number of trials must be at least 1")
        if not self.timeout_s > 0:
            raise CompileError(f"--tune-timeout {self.timeout_s}: must be a positive number of seconds")


@dataclass(frozen=True, kw_only=True)
class StageTuning:
    """What tuning did for one stage: ``tasks`` in total, ``cached`` ones taken from the database, ``tuned`` ones
    tuned now with ``trials`` trials in ``seconds``, ``applied``: tasks compiled with a tuned schedule from the
    database (the others keep TVM's default one), and the best measured latency per tuned task (ms)."""

    stage: str
    tasks: int
    cached: int
    applied: int = 0
    tuned: int = 0
    trials: int = 0
    seconds: float = 0.0
    best_ms: tuple[tuple[str, float], ...] = ()


def default_database_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "zpipe" / "tuning"


def database_dir(root: Path, target: Any) -> Path:
    """The database folder of ``target`` (a tvm Target) under ``root``."""
    text = json.dumps(json.loads(str(target)), sort_keys=True)
    return Path(root) / f"{target.kind.name}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def open_database(directory: Path) -> Any:
    """The MetaSchedule JSON database in ``directory`` (created if missing)."""
    from tvm.s_tir import meta_schedule as ms

    try:
        directory.mkdir(parents=True, exist_ok=True)
        return ms.database.JSONDatabase(work_dir=str(directory))
    except OSError as exc:
        raise CompileError(f"tuning database {str(directory)!r} cannot be created: {exc.strerror}") from exc
    except Exception as exc:  # TVM's own error types
        raise CompileError(f"tuning database {str(directory)!r} is unreadable: {exc}") from exc


def tuning_module(model: Any) -> Any:
    """The Relax module MetaSchedule tunes for an ONNX stage: imported, then lowered by the "zero" pipeline."""
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from .graph import np_dtype

    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in model.graph.input}
    dtypes = {vi.name: np_dtype(vi.type.tensor_type.elem_type) for vi in model.graph.input}
    with warnings.catch_warnings():  # "Renaming name input.1 to input_1": irrelevant to tuning
        warnings.filterwarnings("ignore", message="Renaming name", category=UserWarning)
        mod = from_onnx(model, shape_dict=shapes, dtype_dict=dtypes)
    return relax.get_pipeline("zero")(mod)


def stage_tasks(mod: Any, target: Any) -> list[Any]:
    """The tuning tasks of ``mod`` (MetaSchedule ExtractedTasks), most expensive (FLOPs × weight) first."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.analysis import estimate_tir_flops

    tasks = ms.relax_integration.extract_tasks(mod, target)
    return sorted(tasks, key=lambda t: -float(estimate_tir_flops(t.dispatched[0])) * int(t.weight))


def task_budget(trials: int, tasks: int) -> int:
    return max(1, trials // max(1, tasks))


def workload_key(task: Any) -> str:
    import tvm_ffi

    return str(tvm_ffi.structural_hash(task.dispatched[0]))


def read_ledger(directory: Path) -> dict[str, int]:
    try:
        doc = json.loads((directory / LEDGER).read_text())
        return {str(k): int(v) for k, v in doc.items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise CompileError(f"tuning ledger {str(directory / LEDGER)!r} is unreadable: {exc}; delete it to "
                           "re-tune") from exc


def update_ledger(directory: Path, tuned: dict[str, int]) -> None:
    """Record ``tuned`` (workload key -> per-task budget), keeping the larger budget; atomic replace."""
    ledger = read_ledger(directory)
    for key, budget in tuned.items():
        ledger[key] = max(budget, ledger.get(key, 0))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".ledger-")
    with os.fdopen(fd, "w") as fh:
        json.dump(ledger, fh, indent=0, sort_keys=True)
    os.replace(tmp, directory / LEDGER)


def applied_tasks(tasks: Sequence[Any], database: Any) -> int:
    """How many of ``tasks`` have a successful record in ``database`` (their tuned schedule gets applied)."""
    return sum(1 for t in tasks if database.has_workload(t.dispatched[0])
               and database.get_top_k(database.commit_workload(t.dispatched[0]), 1))


def pending_tasks(tasks: Sequence[Any], database: Any, ledger: dict[str, int], budget: int) -> list[Any]:
    """The tasks the database and ledger do not yet cover with ``budget`` trials each."""
    return [t for t in tasks
            if not (ledger.get(workload_key(t), 0) >= budget and database.has_workload(t.dispatched[0]))]


Progress = Callable[[dict], None]


def run_tuning(stages: Sequence[tuple[str, Path]], *, target: Any, directory: Path, options: TuningOptions,
               progress: Progress | None = None, log_path: Path) -> dict[str, StageTuning]:
    """Tune the tasks of ``stages`` ((name, ONNX file) pairs) missing from the database, in a child process.

    ``progress`` receives every event the child reports (``stage``, ``trials``, ``done``). The child's own output
    (MetaSchedule's logging) goes to ``log_path``. Raises CompileError when the child fails (with the log's tail) or misses the deadline (it is
    killed with its builder and runner processes; records measured so far stay in the database).
    """
    work_dir = tempfile.mkdtemp(prefix="zpipe-tuning-")
    request = {"target": str(target), "database": str(directory),
               "trials": options.trials, "stages": [{"name": n, "onnx": str(p)} for n, p in stages],
               "work_dir": work_dir}
    deadline = time.monotonic() + options.timeout_s
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "zpipe.compile.tune_child"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=log, start_new_session=True)
    events: queue.Queue = queue.Queue()
    reader = threading.Thread(target=_read_lines, args=(proc.stdout, events), daemon=True)
    reader.start()
    results: dict[str, StageTuning] = {}
    try:
        proc.stdin.write(json.dumps(request).encode())
        proc.stdin.close()
        while True:
            try:
                event = events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise CompileError(f"tuning did not finish within {options.timeout_s:g} s (--tune-timeout); "
                                   f"records measured so far are kept in {str(directory)!r}: run again to go on, "
                                   "or use fewer trials") from None
            if event is None:
                break
            if event.get("event") == "done":
                results[event["stage"]] = StageTuning(
                    stage=event["stage"], tasks=event["tasks"], cached=event["cached"], tuned=event["tuned"],
                    trials=event["trials"], seconds=event["seconds"],
                    best_ms=tuple((k, float(v)) for k, v in event.get("best_ms", {}).items()))
            if progress is not None:
                progress(event)
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise CompileError(f"tuning did not exit within {options.timeout_s:g} s (--tune-timeout)") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join(timeout=5)
        proc.stdout.close()
        if not proc.stdin.closed:
            proc.stdin.close()
        shutil.rmtree(work_dir, ignore_errors=True)
    if code != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-8:]
        raise CompileError(f"tuning failed (exit code {code}); the tuning process's last lines:\n  "
                           + "\n  ".join(tail))
    return results


def _read_lines(stream: Any, events: queue.Queue) -> None:
    for line in stream:
        try:
            events.put(json.loads(line))
        except ValueError:
            continue
    events.put(None)
