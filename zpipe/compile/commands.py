"""Click commands of the model path: `zpipe compile` and `zpipe inspect` (registered by zpipe.cli).

Heavy imports (onnx, tvm) happen inside the commands, never at import time. ZpipeErrors become ClickExceptions
carrying the error's exit code (CompileError: 11, ArtifactError: 4).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..cli_support import zpipe_errors

__all__ = ["compile_command", "inspect_command"]


def _pairs(option: str, values: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for value in values:
        key, sep, rest = value.partition("=")
        if not sep or not key or not rest:
            raise click.BadParameter(f"{value!r} is not NAME=VALUE", param_hint=option)
        out[key] = rest
    return out


def _shapes(values: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for name, dims in _pairs("--shape", values).items():
        try:
            shape = tuple(int(d) for d in dims.split(","))
        except ValueError:
            shape = ()
        if not shape or any(d <= 0 for d in shape):
            raise click.BadParameter(f"{name}={dims}: dimensions must be positive integers, e.g. "
                                     f"{name}=1,3,224,224", param_hint="--shape")
        shapes[name] = shape
    return shapes


def _planning_options(fn):
    options = [
        click.option("--shape", "shape", multiple=True, metavar="NAME=D1,D2,...",
                     help="Static shape for a dynamic model input (repeatable)."),
        click.option("--cut", "cuts", multiple=True, metavar="TENSOR",
                     help="Also cut the model at this tensor (repeatable)."),
        click.option("--stages", "max_stages", type=click.IntRange(min=1), default=None,
                     help="Merge the smallest stages until at most N compiled stages are left."),
        click.option("--whole", is_flag=True, help="Keep the whole model as one stage (no cuts, no gates)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


MODEL = click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))


@click.command("inspect")
@MODEL
@_planning_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@zpipe_errors
def inspect_command(model: Path, shape: tuple[str, ...], cuts: tuple[str, ...], max_stages: int | None,
                    whole: bool, as_json: bool) -> None:
    """Print the stage plan of an ONNX MODEL without compiling: forks and joins, stages with their op counts, and
    the bytes of every tensor crossing a cut (what would travel if that hop went over the network)."""
    from .driver import CompileOptions, plan_model
    from .report import format_plan, plan_dict

    plan = plan_model(model, CompileOptions(shapes=_shapes(shape), cuts=cuts, max_stages=max_stages, whole=whole))
    click.echo(json.dumps(plan_dict(plan), indent=2) if as_json else format_plan(plan))


@click.command("compile")
@MODEL
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder (default: ./<model name>-zpipe).")
@_planning_options
@click.option("--target", default="llvm", show_default=True,
              help="'llvm' (this CPU), 'cuda', or an LLVM triple to cross-compile (e.g. aarch64-linux-gnu).")
@click.option("--mcpu", default=None, help="CPU model for llvm/cross targets (default: this host's / generic).")
@click.option("--cc", default=None, help="C++ cross compiler linking cross-compiled stages (default: <triple>-g++).")
@click.option("--tune", "trials", type=click.IntRange(min=1), default=None, metavar="TRIALS",
              help="Tune every stage with MetaSchedule, TRIALS trials per stage (cached tasks are reused).")
@click.option("--tuning-db", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Tuning database folder (default: ~/.cache/zpipe/tuning).")
@click.option("--tune-timeout", type=click.FloatRange(min=1), default=3600.0, show_default=True,
              help="Seconds the whole tuning run may take.")
@click.option("--place", multiple=True, metavar="STAGE=HOST", help="Run STAGE on HOST (repeatable).")
@click.option("--host", "hosts", multiple=True, metavar="NAME=ENDPOINT",
              help="Declare an edge host for --place, e.g. edge1=tcp://10.0.0.2:5555 (repeatable).")
@click.option("--max-groups", type=click.IntRange(min=0), default=None,
              help="Worker processes the emitted topology groups the device's stages into (default: this machine's "
                   "CPU count; 0: write no groups, the device groups automatically).")
@click.option("--force", is_flag=True, help="Replace OUT even when it holds another model's build.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the summary.")
@zpipe_errors
def compile_command(model: Path, out_dir: Path | None, shape: tuple[str, ...], cuts: tuple[str, ...],
                    max_stages: int | None, whole: bool, target: str, mcpu: str | None, cc: str | None,
                    trials: int | None, tuning_db: Path | None, tune_timeout: float, place: tuple[str, ...],
                    hosts: tuple[str, ...], max_groups: int | None, force: bool, quiet: bool) -> None:
    """Cut an ONNX MODEL into stages at its branch points, compile each with TVM, and write OUT/topology.toml
    (run it with: zpipe run OUT/topology.toml --inputs IN.npz)."""
    from .driver import CompileOptions, compile_model
    from .report import format_bytes
    from .target import parse_target
    from .tuning import TuningOptions, default_database_root

    tuning = None if trials is None else TuningOptions(
        trials=trials, database_root=tuning_db or default_database_root(), timeout_s=tune_timeout)
    options = CompileOptions(shapes=_shapes(shape), cuts=cuts, max_stages=max_stages, whole=whole,
                             target=parse_target(target, mcpu=mcpu, cc=cc), tuning=tuning,
                             placements=_pairs("--place", place), hosts=_pairs("--host", hosts), force=force,
                             max_groups=max_groups)
    out_dir = out_dir or Path(f"{model.stem}-zpipe")
    report = compile_model(model, out_dir, options, progress=None if quiet else click.echo)
    crossing = sum(e.info.nbytes or 0 for e in report.plan.edges if not e.producer.startswith("<")
                   and not e.consumer.startswith("<"))
    click.echo(f"wrote {report.out_dir}: {len(report.builds)} stages, {len(report.plan.gates)} gates, "
               f"{format_bytes(crossing)} over all hops between stages, in {report.seconds:.1f} s")
    for result in report.tuning:
        click.echo(f"  tuning {result.stage}: {result.tasks} tasks, {result.cached} from the database, "
                   f"{result.tuned} tuned now ({result.trials} trials, {result.seconds:.1f} s), "
                   f"{result.applied} compiled with a tuned schedule")
    groups = {}
    for stage, group in report.groups.items():
        groups.setdefault(group, []).append(stage)
    if groups:
        click.echo(f"{len(groups)} worker processes on the device: " +
                   "; ".join(f"{g}: {', '.join(s)}" for g, s in groups.items()))
    click.echo(f"run it: zpipe run {report.topology} --inputs IN.npz")
