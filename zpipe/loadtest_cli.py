"""`zpipe bench`: the load-test harness's command line (registered by zpipe.cli). Thin: parses, builds the target,
calls :mod:`zpipe.loadtest`, prints. Heavy imports (hdrh, rich, matplotlib) happen inside the commands.

    zpipe bench TOPOLOGY [options]                 # the same as `zpipe bench run TOPOLOGY`
    zpipe bench --endpoint tcp://H:P --model M ...  # against an edge server alone
    zpipe bench compare A.json B.json               # B/A ratios, step by step

Exit codes: those of zpipe (3 topology, 7 the probe request failed, 9 closed, ...), 2 usage, 130 interrupted
(the requests in flight were drained and the partial figures printed and written). Failed requests during the
load are figures, not an exit code.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import click

from .errors import ZpipeError

__all__ = ["bench_command"]

EXIT_INTERRUPTED = 130


class _BenchGroup(click.Group):
    """A group whose default subcommand is ``run``: ``zpipe bench X`` means ``zpipe bench run X`` unless X names
    a subcommand (a topology file called ``compare`` needs ``zpipe bench run compare``)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group("bench", cls=_BenchGroup)
def bench_command() -> None:
    """Load-test a topology or an edge server: throughput, latency percentiles, errors, per-stage times.

    `zpipe bench TOPOLOGY [OPTIONS]` runs the load (see `zpipe bench run --help`);
    `zpipe bench compare A.json B.json` prints the ratios of two runs.
    """


class _Levels(click.ParamType):
    name = "LIST"

    def __init__(self, cast: type) -> None:
        self.cast = cast

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple:
        if isinstance(value, tuple):
            return value
        try:
            levels = tuple(self.cast(v) for v in str(value).split(","))
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of {self.cast.__name__}s (e.g. 1,2,4)", param, ctx)
        if not all(v > 0 for v in levels):
            self.fail(f"{value!r}: every level must be positive", param, ctx)
        return levels


@bench_command.command("run")
@click.argument("topology", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--endpoint", help="Bench an edge server alone (tcp://HOST:PORT) instead of a topology.")
@click.option("--model", help="With --endpoint: the model to request.")
@click.option("--server-key", help="With --endpoint: the server's public key, when it uses CurveZMQ.")
@click.option("--client-key", type=click.Path(exists=True, dir_okay=False), help="Our key pair (.key_secret).")
@click.option("--concurrency", "-c", type=_Levels(int), help="Closed loop: requests in flight; a list sweeps "
              "(1,2,4,8). The default, with 1, when --rate is not given.")
@click.option("--rate", "-r", type=_Levels(float), help="Open loop: requests per second; a list sweeps (50,100).")
@click.option("--arrivals", type=click.Choice(["constant", "poisson"]), default="constant", show_default=True,
              help="Open loop: gaps between intended send times.")
@click.option("--duration", "duration_s", type=click.FloatRange(min=0, min_open=True),
              help="Seconds measured per step (default 10 unless --requests).")
@click.option("--requests", "n_requests", type=click.IntRange(min=1), help="Requests measured per step.")
@click.option("--warmup", "warmup_s", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Seconds per step whose requests are left out of the figures.")
@click.option("--timeout-s", type=click.FloatRange(min=0, min_open=True),
              help="Per-request deadline (default: the topology's timeout_s, or 30 s for --endpoint).")
@click.option("--inputs", "inputs_paths", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help=".npz with one array per input; repeat to cycle several requests' inputs.")
@click.option("--shape", "shapes", multiple=True, metavar="NAME=1x3x32x32[:DTYPE]",
              help="Random tensor for input NAME; repeatable. Default: random per the stages' manifests.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of random inputs and Poisson gaps.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write every figure "
              "and the run's configuration here (schema zpipe-bench/1).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a PNG: latency over time and the latency CDF.")
@click.option("--metrics-port", type=click.IntRange(1, 65535), help="With a TOPOLOGY: serve the pipeline's "
              "Prometheus metrics (gate decisions, remote links) on 127.0.0.1:PORT during the run.")
@click.option("--quiet", "-q", is_flag=True, help="No live progress bar (it is off anyway when not on a terminal).")
def run_command(topology: Path | None, endpoint: str | None, model: str | None, server_key: str | None,
                client_key: str | None, concurrency: tuple | None, rate: tuple | None, arrivals: str,
                duration_s: float | None, n_requests: int | None, warmup_s: float, timeout_s: float | None,
                inputs_paths: tuple[Path, ...], shapes: tuple[str, ...], seed: int, json_path: Path | None,
                plot_path: Path | None, metrics_port: int | None, quiet: bool) -> None:
    """Apply load to TOPOLOGY (run here, as a client of its stages) or to a server, and report the figures."""
    if (topology is None) == (endpoint is None):
        raise click.UsageError("give a TOPOLOGY file or --endpoint (with --model), not both")
    if endpoint is not None and not model:
        raise click.UsageError("--endpoint needs --model: the model to request")
    if concurrency and rate:
        raise click.UsageError("--concurrency (closed loop) and --rate (open loop) exclude each other")
    if duration_s is not None and n_requests is not None:
        raise click.UsageError("--duration and --requests exclude each other")
    if metrics_port and endpoint is not None:
        raise click.UsageError("--metrics-port serves a topology's metrics; an edge server serves its own "
                               "(zpipe serve --metrics-port)")
    with _errors():
        from .loadtest import LoadConfig, plot_report, run_load

        target = _target(topology, endpoint, model, server_key, client_key, metrics_port)
        with target as (submit, describe, hosts, default_to):
            inputs = _inputs(inputs_paths, shapes, topology, seed, describe)
            try:
                config = LoadConfig(mode="open" if rate else "closed", levels=rate or concurrency or (1,),
                                    arrivals=arrivals, duration_s=duration_s,
                                    requests=n_requests, warmup_s=warmup_s, timeout_s=timeout_s or default_to,
                                    seed=seed)
            except ValueError as exc:
                raise click.UsageError(str(exc)) from None
            _probe(submit, inputs[0], config.timeout_s)
            stop = threading.Event()
            with _interrupts(stop), _live(quiet) as progress:
                report = run_load(submit, inputs, config, target=describe, stage_hosts=hosts, progress=progress,
                                  stop=stop)
    _print_report(report)
    for path, write in ((json_path, report.write_json), (plot_path, lambda p: plot_report(report, p))):
        if path is not None:
            try:
                write(path)
            except OSError as exc:
                raise click.FileError(str(path), hint=exc.strerror or str(exc)) from exc
            click.echo(f"wrote {path}", err=True)
    if stop.is_set():
        sys.exit(EXIT_INTERRUPTED)


@bench_command.command("compare")
@click.argument("a_path", metavar="A.json", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("b_path", metavar="B.json", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def compare_command(a_path: Path, b_path: Path) -> None:
    """Print B/A ratios of two runs' figures, step by step (throughput > 1 and latency < 1 mean B is better)."""
    from .loadtest import compare_reports, load_report

    try:
        a, b = load_report(a_path), load_report(b_path)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    if len(a["steps"]) != len(b["steps"]):
        click.echo(f"note: A has {len(a['steps'])} steps, B {len(b['steps'])}; comparing the first "
                   f"{min(len(a['steps']), len(b['steps']))}", err=True)
    if a["config"]["mode"] != b["config"]["mode"]:
        click.echo(f"note: A is {a['config']['mode']} loop, B is {b['config']['mode']} loop", err=True)
    click.echo(f"A = {a_path}\nB = {b_path}")
    click.echo(f"{'step':<12}{'metric':<18}{'A':>12}{'B':>12}{'B/A':>8}")
    for row in compare_reports(a, b):
        load = f"{row['load_a']:g}" + ("" if row["load_a"] == row["load_b"] else f"/{row['load_b']:g}")
        ratio = "n/a" if row["ratio"] is None else f"{row['ratio']:.2f}"
        click.echo(f"{load:<12}{row['metric']:<18}{_fmt(row['a']):>12}{_fmt(row['b']):>12}{ratio:>8}")


# -- helpers -------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """ZpipeError -> ClickException with the error class's exit code (as zpipe.cli does)."""
    try:
        yield
    except ZpipeError as exc:
        error = click.ClickException(str(exc))
        error.exit_code = exc.exit_code
        raise error from exc


@contextlib.contextmanager
def _target(topology: Path | None, endpoint: str | None, model: str | None, server_key: str | None,
            client_key: str | None, metrics_port: int | None) -> Iterator[tuple]:
    """(submit, description, stage hosts, default timeout) for a topology run here, or a server's model."""
    if topology is not None:
        from .pipeline import Pipeline
        from .topology import Topology

        topo = Topology.from_file(topology)
        hosts = {name: topo.stage(name).host for name in topo.order()}
        describe = {"kind": "topology", "topology": str(topology), "name": topo.name,
                    "max_in_flight": topo.max_in_flight, "stages": hosts}
        with Pipeline(topo) as pipe:
            if metrics_port:
                click.echo(f"metrics: http://127.0.0.1:{pipe.serve_metrics(metrics_port)}/metrics", err=True)
            yield (lambda inputs, timeout_s: pipe.submit(inputs, timeout_s=timeout_s)), describe, hosts, \
                topo.timeout_s
            return
    from .client import RemoteClient

    with RemoteClient(endpoint, server_key=server_key, client_key=client_key) as client:
        describe = {"kind": "endpoint", "endpoint": endpoint, "model": model}
        yield (lambda inputs, timeout_s: client.submit(model, inputs, timeout_s=timeout_s)), describe, {}, 30.0


def _inputs(paths: tuple[Path, ...], shapes: tuple[str, ...], topology: Path | None, seed: int,
            describe: dict) -> list[dict]:
    from .loadtest import load_npz, parse_shape, random_inputs, random_tensor

    import numpy as np

    if paths and shapes:
        raise click.UsageError("--inputs and --shape exclude each other")
    try:
        if paths:
            describe["inputs"] = {"source": "npz", "files": [str(p) for p in paths]}
            return [load_npz(p) for p in paths]
        if shapes:
            rng = np.random.default_rng(seed)
            parsed = [parse_shape(s) for s in shapes]
            describe["inputs"] = {"source": "shape", "tensors": {n: {"shape": list(s), "dtype": d}
                                                                 for n, s, d in parsed}}
            return [{n: random_tensor(s, d, rng) for n, s, d in parsed}]
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--inputs" if paths else "--shape") from None
    if topology is None:
        raise click.UsageError("against --endpoint, give --inputs FILE.npz or --shape NAME=1x3x32x32:float32 "
                               "(the server's health answer does not carry input specs)")
    from .topology import Topology

    made = random_inputs(Topology.from_file(topology), seed=seed)
    describe["inputs"] = {"source": "random", "seed": seed,
                          "tensors": {n: {"shape": list(a.shape), "dtype": str(a.dtype)} for n, a in made.items()}}
    return [made]


def _probe(submit: Any, inputs: dict, timeout_s: float) -> None:
    """One request before the load, so a wrong input fails once, with its message, instead of on every request."""
    try:
        submit(inputs, timeout_s).result()
    except ZpipeError as exc:
        raise type(exc)(f"the probe request (first inputs) failed before the load started: {exc}") from exc


@contextlib.contextmanager
def _interrupts(stop: threading.Event) -> Iterator[None]:
    """SIGINT/SIGTERM stop the load (in-flight requests drain and are reported) instead of killing us."""
    saved = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _live(quiet: bool) -> Iterator[Any]:
    """A rich progress bar on stderr with the last interval's throughput and p99, or None (quiet / no terminal)."""
    from rich.console import Console

    console = Console(stderr=True)
    if quiet or not console.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), console=console) as bar:
        tasks: dict[int, Any] = {}

        def update(tick: Any) -> None:
            if tick.step not in tasks:
                tasks[tick.step] = bar.add_task(f"step {tick.step + 1}/{tick.steps} ({tick.level:g})", total=1.0,
                                                info="")
            p99 = "-" if tick.p99_ms is None else f"{tick.p99_ms:.2f} ms"
            bar.update(tasks[tick.step], completed=tick.fraction,
                       info=f"{tick.rps:8.1f} req/s  p99 {p99}  sent {tick.sent}  errors {tick.errors}")

        yield update


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}" if value < 100 else f"{value:.0f}"


def _print_report(report: Any) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160, highlight=False)
    mode = report.config["mode"]
    target = report.config["target"]
    table = Table(title=f"zpipe bench: {target.get('name') or target.get('model')} — {mode} loop"
                        + (f", {report.config['arrivals']} arrivals" if mode == "open" else "")
                        + ": latency in ms", box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True,
                  caption="load = " + ("offered req/s" if mode == "open" else "in flight")
                          + "; sent = ok + fail + t/o (timed out)")
    for col in ("load", "sent", "ok", "fail", "t/o", "ok/s", "p50", "p90", "p99", "p99.9", "max"):
        table.add_column(col, justify="right", no_wrap=True)
    for s in report.steps:
        lat = s.latency_ms
        table.add_row(f"{s.level:g}", str(s.sent), str(s.ok), str(s.failed), str(s.timed_out),
                      f"{s.throughput_rps:.1f}", *(_ms(lat[k]) for k in ("p50", "p90", "p99", "p99_9", "max")))
    console.print(table)
    for s in report.steps:
        where = f"load {s.level:g}:"
        if s.errors:
            console.print(f"{where} errors by kind {s.errors}")
        if s.saturated:
            console.print(f"{where} [bold]saturated[/bold]: offered {s.level:g} req/s, answered fewer than 90 %; "
                          f"send lag p99 {s.schedule_lag_ms['p99']} ms (latencies count from the intended send "
                          "time, so the queueing is in them)")
        if s.stages:
            console.print(where + " per stage ms (p50/p99): " + ", ".join(
                f"{n}@{v['host']} {v['p50']:g}/{v['p99']:g} ×{v['count']}" for n, v in s.stages.items()))
        if len(s.routes) > 1:
            console.print(where + " routes: " + "; ".join(
                f"{r['count']} via {'+'.join(r['stages'])} (hosts {', '.join(r['hosts'])})" for r in s.routes))
        if s.client_overhead_us and not s.saturated:  # when saturated it holds the wait for a free slot
            console.print(f"{where} harness latency − target-reported latency: p50 {s.client_overhead_us['p50']} µs, "
                          f"p99 {s.client_overhead_us['p99']} µs")
        if s.interrupted:
            console.print(f"{where} interrupted: figures cover the part that ran")
