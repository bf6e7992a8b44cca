"""``zpipe compile`` as a library call: ONNX model in, ``OUT/`` with compiled stages and a topology out.

Layout of ``OUT``::

    topology.toml          runs as is: zpipe run OUT/topology.toml --inputs IN.npz
    build.json             build record: source model path and sha256, target, plan, per-stage timings, tuning
    stages/<name>.onnx     each stage as an ONNX model (inputs/outputs keep the model's tensor names)
    stages/<name>.so       its TVM library
    stages/<name>.json     its manifest (zpipe.Manifest + source_sha256, onnx_sha256, role, tuning)
    tuning.log             output of the tuning process (with --tune)

Guarantees: everything is written into a temporary folder beside ``OUT`` and renamed into place at the end, so a
failed compile leaves ``OUT`` as it was. ``OUT`` is replaced only when it is missing, empty, or holds an earlier
build of the same model (same source sha256); another model's build is replaced only with ``force``, and a
folder not written by zpipe compile never is.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping

from ..errors import ArtifactError
from ..manifest import sha256_file
from .build import StageBuild, build_onnx_stage, unsupported_nodes
from .cut import stage_model
from .emit import check_placements, topology_toml
from .errors import CompileError
from .graph import load_model
from .plan import Plan, make_plan
from .report import plan_dict
from .target import TargetSpec
from .tuning import StageTuning, TuningOptions

__all__ = ["CompileOptions", "CompileReport", "compile_model", "plan_model", "BUILD_RECORD", "BUILD_FORMAT"]

BUILD_RECORD = "build.json"
BUILD_FORMAT = "zpipe-compile/1"

Progress = Callable[[str], None]


@dataclass(frozen=True, kw_only=True)
class CompileOptions:
    """Everything ``zpipe compile`` takes besides the model and ``OUT``.

    ``shapes``: input name -> static shape for dynamic inputs; ``cuts``: extra chain cuts (tensor names);
    ``max_stages``: merge small stages down to this many; ``whole``: one stage, no cuts and no gates;
    ``tuning``: MetaSchedule tuning (None: untuned); ``placements``: stage -> host; ``hosts``: host -> endpoint;
    ``force``: replace ``OUT`` even when it holds another model's build; ``max_groups``: worker processes the
    emitted topology's groups may use on the device (default: this machine's CPU count, or no groups for a cross
    target; 0: emit no groups and let the device group automatically).
    """

    shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    cuts: tuple[str, ...] = ()
    max_stages: int | None = None
    whole: bool = False
    target: TargetSpec = field(default_factory=lambda: TargetSpec(kind="llvm"))
    tuning: TuningOptions | None = None
    placements: Mapping[str, str] = field(default_factory=dict)
    hosts: Mapping[str, str] = field(default_factory=dict)
    force: bool = False
    max_groups: int | None = None

    def __post_init__(self) -> None:
        if self.max_stages is not None and self.max_stages < 1:
            raise CompileError(f"--stages {self.max_stages}: must be at least 1")
        if self.whole and (self.cuts or self.max_stages is not None):
            raise CompileError("--whole keeps the model as one stage; it cannot be combined with --cut or --stages")
        if self.tuning is not None and not self.target.runs_here:
            raise CompileError(f"--tune with --target {self.target.label}: tuning measures candidates on the target "
                               "device, which is not this machine; compile untuned, or tune on the device")


@dataclass(frozen=True, kw_only=True)
class CompileReport:
    """What a compile produced: the plan, each stage's build, tuning per stage, and the wall time."""

    out_dir: Path
    topology: Path
    plan: Plan
    builds: tuple[StageBuild, ...]
    tuning: tuple[StageTuning, ...]
    seconds: float
    groups: dict[str, str] = field(default_factory=dict)  # stage -> worker group written into the topology


def plan_model(model: str | Path, options: CompileOptions = CompileOptions()) -> Plan:
    """Load and plan ``model`` as :func:`compile_model` would, without compiling (``zpipe inspect``)."""
    graph = load_model(model, shapes=options.shapes)
    plan = make_plan(graph, cuts=options.cuts, max_stages=options.max_stages, whole=options.whole)
    check_placements(plan, options.placements, options.hosts)
    return plan


def compile_model(model: str | Path, out_dir: str | Path, options: CompileOptions = CompileOptions(), *,
                  progress: Progress | None = None) -> CompileReport:
    """Cut ``model`` into stages, compile each with TVM (tuned when asked) and write ``out_dir`` (see above)."""
    started = time.monotonic()
    say = progress or (lambda _msg: None)
    model, out_dir = Path(model), Path(out_dir)
    graph = load_model(model, shapes=options.shapes)
    plan = make_plan(graph, cuts=options.cuts, max_stages=options.max_stages, whole=options.whole)
    check_placements(plan, options.placements, options.hosts)
    _check_out_dir(out_dir, plan.source_sha256, model, options.force)
    target = options.target.tvm_target()
    say(f"{model}: {len(plan.stages)} stages ({', '.join(s.name for s in plan.stages)}), "
        f"target {options.target.label}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.zpipe-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        models, onnx_paths = _write_stage_models(graph, plan, tmp / "stages")
        tuned, database = _tune(plan, onnx_paths, target, options.tuning, tmp, say)
        builds = []
        for stage in plan.stages:
            extra = {"source": str(model), "source_sha256": plan.source_sha256, "role": stage.role,
                     "onnx": onnx_paths[stage.name].name, "onnx_sha256": sha256_file(onnx_paths[stage.name])}
            if stage.name in tuned:
                extra["tuning"] = _tuning_dict(tuned[stage.name])
            build = build_onnx_stage(models[stage.name], name=stage.name, out_dir=tmp / "stages", target=target,
                                     fcompile=options.target.fcompile(), database=database, extra=extra)
            say(f"compiled {stage.name} in {build.compile_s:.2f} s")
            builds.append(build)
        emit = dict(plan=plan, target=options.target, placements=options.placements, hosts=options.hosts,
                    source=model.name)
        groups = _groups(topology_toml(**emit), tmp, plan, options.max_groups, options.target)
        (tmp / "topology.toml").write_text(topology_toml(**emit, groups=groups))
        record = {"format": BUILD_FORMAT, "source": str(model.resolve()), "source_sha256": plan.source_sha256,
                  "target": str(target), "target_label": options.target.label, "plan": plan_dict(plan),
                  "compile_s": {b.name: round(b.compile_s, 3) for b in builds},
                  "tuning": {name: _tuning_dict(t) for name, t in tuned.items()}}
        (tmp / BUILD_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        _replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    relocated = tuple(StageBuild(name=b.name, manifest=out_dir / "stages" / b.manifest.name,
                                 library=out_dir / "stages" / b.library.name, compile_s=b.compile_s) for b in builds)
    return CompileReport(out_dir=out_dir, topology=out_dir / "topology.toml", plan=plan, builds=relocated,
                         tuning=tuple(tuned.values()), seconds=time.monotonic() - started, groups=groups)


def _groups(text: str, out_dir: Path, plan: Plan, max_groups: int | None, target: TargetSpec) -> dict[str, str]:
    """Stage -> worker group for the emitted topology, weighing stages by their multiply-accumulates."""
    if max_groups == 0:
        return {}
    if max_groups is None and not target.runs_here:
        return {}  # another machine: its core count is unknown here, so the device groups automatically
    from ..grouping import plan_groups
    from ..topology import Topology

    topology = Topology.from_toml(text, base_dir=out_dir)
    grouping = plan_groups(topology, max_groups=max_groups, costs={s.name: max(s.macs, 1) for s in plan.stages})
    return {stage: group for group, stages in grouping.groups.items() for stage in stages}


def _write_stage_models(graph, plan: Plan, stages_dir: Path) -> tuple[dict, dict[str, Path]]:
    """Cut every stage, refuse ops TVM cannot import (before compiling anything), write ``<stage>.onnx``."""
    stages_dir.mkdir()
    models = {stage.name: stage_model(graph, stage) for stage in plan.stages}
    for name, stage_onnx in models.items():
        for node, op, where in unsupported_nodes(stage_onnx):
            raise CompileError(f"stage {name!r}: node {node!r} (op {op!r}, {where}) cannot be imported by TVM's "
                               "ONNX frontend; replace the op in the model, or export it with another opset")
    paths = {name: stages_dir / f"{name}.onnx" for name in models}
    for name, stage_onnx in models.items():
        paths[name].write_bytes(stage_onnx.SerializeToString())
    return models, paths


def _tune(plan: Plan, onnx_paths: Mapping[str, Path], target, options: TuningOptions | None, tmp: Path,
          say: Progress) -> tuple[dict[str, StageTuning], object]:
    """Tune what the database lacks (in a child process); returns per-stage results and the database to apply."""
    if options is None:
        return {}, None
    import onnx

    from . import tuning

    directory = tuning.database_dir(options.database_root, target)
    database = tuning.open_database(directory)
    ledger = tuning.read_ledger(directory)
    results: dict[str, StageTuning] = {}
    tasks = {}
    todo = []
    for stage in plan.stages:
        tasks[stage.name] = tuning.stage_tasks(tuning.tuning_module(onnx.load(str(onnx_paths[stage.name]))), target)
        budget = tuning.task_budget(options.trials, len(tasks[stage.name]))
        pending = tuning.pending_tasks(tasks[stage.name], database, ledger, budget)
        results[stage.name] = StageTuning(stage=stage.name, tasks=len(tasks[stage.name]),
                                          cached=len(tasks[stage.name]) - len(pending))
        if pending:
            todo.append((stage.name, onnx_paths[stage.name]))
    cached = sum(r.cached for r in results.values())
    say(f"tuning database {directory}: {cached}/{sum(r.tasks for r in results.values())} tasks cached; "
        f"{len(todo)} stages to tune with {options.trials} trials each")
    if todo:
        results.update(tuning.run_tuning(todo, target=target, directory=directory, options=options,
                                         progress=lambda event: _say_tuning(say, event),
                                         log_path=tmp / "tuning.log"))
        database = tuning.open_database(directory)  # re-read: the child added records
    results = {name: replace(r, applied=tuning.applied_tasks(tasks[name], database)) for name, r in results.items()}
    return results, database


def _say_tuning(say: Progress, event: dict) -> None:
    kind = event.get("event")
    if kind == "stage":
        say(f"tuning {event['stage']}: {event['tasks']} tasks, {event['cached']} cached, "
            f"{event['budget']} trials per task")
    elif kind == "trials":
        best = _latency(event.get("best_ms"))
        say(f"tuning {event['stage']}: {event['done']}/{event['total']} trials, task {event['task']} best {best}")
    elif kind == "done":
        say(f"tuned {event['stage']}: {event['tuned']} tasks, {event['trials']} trials in {event['seconds']:.1f} s")


def _latency(ms: float | None) -> str:
    if ms is None:
        return "n/a (no valid candidate yet)"
    return f"{ms:.3f} ms" if ms >= 0.1 else f"{ms * 1000:.1f} us"


def _tuning_dict(result: StageTuning) -> dict:
    return {"tasks": result.tasks, "cached": result.cached, "applied": result.applied, "tuned": result.tuned, "trials": result.trials,
            "seconds": result.seconds, "best_ms": dict(result.best_ms)}


def _check_out_dir(out_dir: Path, source_sha256: str, model: Path, force: bool) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ArtifactError(f"output path {str(out_dir)!r} exists and is not a folder")
    if not any(out_dir.iterdir()):
        return
    record_path = out_dir / BUILD_RECORD
    try:
        record = json.loads(record_path.read_text())
        if record.get("format") != BUILD_FORMAT:
            raise ValueError(f"format {record.get('format')!r}")
    except (OSError, ValueError, AttributeError):
        raise ArtifactError(f"output folder {str(out_dir)!r} is not empty and holds no zpipe build record "
                            f"({BUILD_RECORD}); refusing to replace it: choose another --out") from None
    if record.get("source_sha256") != source_sha256 and not force:
        raise ArtifactError(f"output folder {str(out_dir)!r} holds the build of another model "
                            f"({record.get('source')!r}, sha256 {str(record.get('source_sha256'))[:16]}...), not of "
                            f"{str(model)!r}; choose another --out, or pass --force to replace it")


def _replace(new: Path, out_dir: Path) -> None:
    """Move ``new`` to ``out_dir``; an existing ``out_dir`` is swapped out first and removed only afterwards."""
    if not out_dir.exists():
        os.rename(new, out_dir)
        return
    old = out_dir.parent / f".{out_dir.name}.zpipe-old-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(out_dir, old)
    try:
        os.rename(new, out_dir)
    except OSError:
        os.rename(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)
