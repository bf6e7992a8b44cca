"""The ``zpipe`` command: thin click front ends over the library. The only place that configures logging.

Exit codes: 0 ok, 1 other zpipe error, 2 usage, 3 topology, 4 artifact, 5 framing, 6 stage, 7 request failed,
8 timeout, 9 closed, 130 interrupted (SIGINT/SIGTERM; in-flight requests were drained and reported).
"""

from __future__ import annotations

import functools
import json
import logging
import signal
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from .errors import RequestFailed, ZpipeError

__all__ = ["main", "cli"]

EXIT_INTERRUPTED = 130


def _zpipe_errors(fn):
    """Turn ZpipeError into a ClickException carrying the error class's exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ZpipeError as exc:
            error = click.ClickException(str(exc))
            error.exit_code = exc.exit_code
            raise error from exc

    return wrapper


@click.group()
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.version_option(package_name="zpipe")
def cli(verbose: int) -> None:
    """zpipe: run deep-learning inference split into stages across an edge device and an edge server."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")


@cli.command()
@click.argument("topology", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_zpipe_errors
def validate(topology: Path) -> None:
    """Check a topology file: keys, stages, wiring, artifacts. Prints the stage order."""
    from .topology import Topology

    topo = Topology.from_file(topology)
    click.echo(f"{topology}: ok — pipeline {topo.name!r}, inputs {list(topo.inputs)}, outputs {list(topo.outputs)}")
    for name in topo.order():
        spec = topo.stage(name)
        click.echo(f"  {name:<16} {type(spec.stage).__name__:<12} on {spec.host:<8} "
                   f"{list(spec.tensors_in())} -> {list(spec.tensors_out())}")


@cli.command()
@click.argument("topology", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--inputs", "inputs_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              required=True, help=".npz holding one array per pipeline input.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, writable=True, path_type=Path),
              help="Write the first request's outputs to this .npz.")
@click.option("--requests", "n_requests", type=click.IntRange(min=1), default=1, show_default=True,
              help="How many requests to send (the same inputs each time; up to max_in_flight in flight).")
@click.option("--json", "json_out", is_flag=True, help="Print the summary as one JSON line.")
@_zpipe_errors
def run(topology: Path, inputs_path: Path, out_path: Path | None, n_requests: int, json_out: bool) -> None:
    """Run every stage of TOPOLOGY on this host and feed it requests."""
    from .pipeline import Pipeline
    from .topology import Topology

    topo = Topology.from_file(topology)
    try:
        with np.load(inputs_path, allow_pickle=False) as npz:
            inputs = {name: npz[name] for name in npz.files}
    except (OSError, ValueError) as exc:
        raise click.BadParameter(f"cannot read {str(inputs_path)!r} as .npz: {exc}", param_hint="--inputs")
    interrupted = []
    with _interrupts_as_flag(interrupted):
        pipe = Pipeline(topo).start()
        try:
            started = time.monotonic()
            futures = []
            for _ in range(n_requests):
                if interrupted:
                    break
                futures.append(pipe.submit(inputs))
        finally:
            pipe.close()
        elapsed = time.monotonic() - started
    results, failures = [], []
    for future in futures:
        try:
            results.append(future.result())
        except ZpipeError as exc:
            failures.append(exc)
    summary = _summary(n_requests, len(futures), results, failures, elapsed)
    if out_path is not None and results:
        np.savez(out_path, **results[0].outputs)
    if json_out:
        click.echo(json.dumps(summary))
    else:
        _print_summary(summary, failures)
    if interrupted:
        sys.exit(EXIT_INTERRUPTED)
    if failures:
        first = failures[0]
        sys.exit(getattr(first, "exit_code", RequestFailed.exit_code))


@cli.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where to put the compiled stages and topology (default: a temporary folder).")
@click.option("--requests", "n_requests", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the demo model's weights and inputs.")
@_zpipe_errors
def demo(out_dir: Path | None, n_requests: int, seed: int) -> None:
    """Build a small branchy CNN in code, compile its stages with TVM, run them as a pipeline, check the result."""
    from .demo import TOLERANCE, run_demo

    with tempfile.TemporaryDirectory(prefix="zpipe-demo-") as tmp:
        target = out_dir or Path(tmp)
        click.echo(f"building the demo model's stages with TVM into {target} ...")
        report = run_demo(target, requests=n_requests, seed=seed)
        lat = np.array(report.latencies_s) * 1000
        np.set_printoptions(precision=4, suppress=True)
        click.echo("pipeline: stem -> (branch_a || branch_b) -> merge -> head, 5 worker processes")
        click.echo(f"first output y[0]: {report.outputs[0]}")
        click.echo(f"matches the whole model run in one process: max |diff| = {report.max_abs_error:.2e} "
                   f"(tolerance {TOLERANCE:g}) over {2 * report.requests} requests")
        click.echo(f"one request at a time: branches ran concurrently in {report.branches_overlapped}/"
                   f"{report.requests} requests; latency ms p50 {np.percentile(lat, 50):.2f}  "
                   f"p90 {np.percentile(lat, 90):.2f}  max {lat.max():.2f}")
        click.echo(f"{report.requests} requests in flight at once: {report.throughput_rps:.0f} req/s")
        if out_dir:
            click.echo(f"run it again: zpipe run {out_dir / 'topology.toml'} --inputs IN.npz")


def _summary(wanted: int, sent: int, results: list, failures: list, elapsed: float) -> dict:
    lat = np.array([r.latency_s for r in results]) * 1000 if results else np.zeros(0)
    reasons: dict[str, int] = {}
    for exc in failures:
        key = getattr(exc, "reason", None) or type(exc).__name__
        reasons[key] = reasons.get(key, 0) + 1
    pct = {f"p{p}_ms": round(float(np.percentile(lat, p)), 3) for p in (50, 90, 99)} if results else {}
    return {"requested": wanted, "sent": sent, "ok": len(results), "failed": len(failures),
            "failed_by_reason": reasons, "not_sent": wanted - sent, "elapsed_s": round(elapsed, 3),
            "throughput_rps": round(len(results) / elapsed, 2) if elapsed > 0 else None, **pct,
            "max_ms": round(float(lat.max()), 3) if results else None}


def _print_summary(s: dict, failures: list) -> None:
    click.echo(f"requests: {s['sent']} sent, {s['ok']} ok, {s['failed']} failed"
               + (f" {s['failed_by_reason']}" if s["failed"] else "")
               + (f", {s['not_sent']} not sent (interrupted)" if s["not_sent"] else ""))
    if s["ok"]:
        click.echo(f"latency ms: p50 {s['p50_ms']}  p90 {s['p90_ms']}  p99 {s['p99_ms']}  max {s['max_ms']}   "
                   f"throughput {s['throughput_rps']} req/s")
    for exc in failures[:3]:
        click.echo(f"  {exc}", err=True)


class _interrupts_as_flag:
    """SIGINT/SIGTERM set a flag instead of killing us, so `run` stops feeding and drains what is in flight."""

    def __init__(self, flag: list) -> None:
        self.flag = flag

    def __enter__(self):
        self.saved = {sig: signal.signal(sig, lambda *_: self.flag.append(True))
                      for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)


def _register_model_path() -> None:
    from .compile.commands import compile_command, inspect_command

    cli.add_command(compile_command)
    cli.add_command(inspect_command)


_register_model_path()


def main() -> None:
    cli(prog_name="zpipe")
