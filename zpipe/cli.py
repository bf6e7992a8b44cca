"""The ``zpipe`` command: thin click front ends over the library. The only place that configures logging.

Exit codes: 0 ok, 1 other zpipe error, 2 usage, 3 topology, 4 artifact, 5 framing, 6 stage, 7 request failed,
8 timeout, 9 closed, 10 busy, 11 compile error, 130 interrupted (SIGINT/SIGTERM; in-flight requests were drained and reported).
"""

from __future__ import annotations

import json
import logging
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from .cli_support import zpipe_errors
from .errors import RequestFailed, ZpipeError

__all__ = ["main", "cli"]

EXIT_INTERRUPTED = 130


@click.group()
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.version_option(package_name="zpipe")
def cli(verbose: int) -> None:
    """zpipe: run deep-learning inference split into stages across an edge device and an edge server."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")


@cli.command()
@click.argument("topology", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@zpipe_errors
def validate(topology: Path) -> None:
    """Check a topology file: keys, stages, wiring, artifacts. Prints the stage order and the worker processes."""
    from .topology import Topology

    topo = Topology.from_file(topology)
    grouping = topo.grouping()
    click.echo(f"{topology}: ok — pipeline {topo.name!r}, inputs {list(topo.inputs)}, outputs {list(topo.outputs)}")
    for name in topo.order():
        spec = topo.stage(name)
        click.echo(f"  {name:<16} {type(spec.stage).__name__:<12} on {spec.host:<8} "
                   f"{list(spec.tensors_in())} -> {list(spec.tensors_out())}   [{grouping.group_of(name)}]")
    click.echo(grouping.explain(topo))


@cli.command()
@click.argument("topology", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--inputs", "inputs_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help=".npz holding one array per pipeline input (required unless --explain).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, writable=True, path_type=Path),
              help="Write the first request's outputs to this .npz.")
@click.option("--requests", "n_requests", type=click.IntRange(min=1), default=1, show_default=True,
              help="How many requests to send (the same inputs each time; up to max_in_flight in flight).")
@click.option("--json", "json_out", is_flag=True, help="Print the summary as one JSON line.")
@click.option("--explain", is_flag=True, help="Print which stage runs in which worker process, and exit.")
@click.option("--metrics-port", type=click.IntRange(1, 65535),
              help="Serve the pipeline's Prometheus metrics on 127.0.0.1:PORT while it runs.")
@zpipe_errors
def run(topology: Path, inputs_path: Path | None, out_path: Path | None, n_requests: int, json_out: bool,
        explain: bool, metrics_port: int | None) -> None:
    """Run every stage of TOPOLOGY on this host and feed it requests."""
    from .pipeline import Pipeline
    from .topology import Topology

    topo = Topology.from_file(topology)
    if explain:
        click.echo(topo.grouping().explain(topo))
        return
    if inputs_path is None:
        raise click.UsageError("Missing option '--inputs' (an .npz holding one array per pipeline input).")
    try:
        with np.load(inputs_path, allow_pickle=False) as npz:
            inputs = {name: npz[name] for name in npz.files}
    except (OSError, ValueError) as exc:
        raise click.BadParameter(f"cannot read {str(inputs_path)!r} as .npz: {exc}", param_hint="--inputs")
    interrupted = []
    with _interrupts_as_flag(interrupted):
        pipe = Pipeline(topo).start()
        try:
            if metrics_port:
                pipe.serve_metrics(metrics_port)
            started = time.monotonic()
            futures = []
            first_result: list[float] = []  # wall clock of the first answer, for start-up measurements
            for _ in range(n_requests):
                if interrupted:
                    break
                futures.append(pipe.submit(inputs))
                if len(futures) == 1:
                    futures[0].add_done_callback(lambda _: first_result.append(time.time()))
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
    summary["first_result_unix"] = first_result[0] if first_result else None
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
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the demo's inputs.")
@zpipe_errors
def demo(out_dir: Path | None, n_requests: int, seed: int) -> None:
    """Build a small branchy CNN as ONNX, cut and compile it (zpipe compile), run it as a pipeline, check it."""
    from .demo import TOLERANCE, run_demo

    with tempfile.TemporaryDirectory(prefix="zpipe-demo-") as tmp:
        target = out_dir or Path(tmp)
        click.echo(f"building the demo model (ONNX) and compiling its stages with TVM into {target} ...")
        report = run_demo(target, requests=n_requests, seed=seed)
        lat = np.array(report.latencies_s) * 1000
        np.set_printoptions(precision=4, suppress=True)
        processes = "; ".join(f"{group}: {', '.join(stages)}" for group, stages in report.groups.items())
        click.echo(f"pipeline: stem -> (3 branches in parallel) -> head, in {len(report.groups)} worker processes "
                   f"({processes})")
        click.echo(f"first output y[0]: {report.outputs[0]}")
        click.echo(f"matches the whole model run in one process: max |diff| = {report.max_abs_error:.2e} "
                   f"(tolerance {TOLERANCE:g}) over {2 * report.requests} requests")
        click.echo(f"one request at a time: branches ran concurrently in {report.branches_overlapped}/"
                   f"{report.requests} requests; latency ms p50 {np.percentile(lat, 50):.2f}  "
                   f"p90 {np.percentile(lat, 90):.2f}  max {lat.max():.2f}")
        click.echo(f"{report.requests} requests in flight at once: {report.throughput_rps:.0f} req/s")
        if out_dir:
            click.echo(f"run it again: zpipe run {out_dir / 'model' / 'topology.toml'} --inputs IN.npz")


@cli.command()
@click.option("--repo", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Model repository: REPO/<model>/<version>/ holding a stage library and its manifest.")
@click.option("--bind", default="tcp://127.0.0.1:5555", show_default=True, help="Endpoint to serve on.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Workers per model (processes, or threads with --isolation thread).")
@click.option("--isolation", type=click.Choice(["process", "thread"]), default="process", show_default=True,
              help="process: each model in worker processes (a crash costs a worker); thread: in the server "
              "process (no ipc hop: lower latency; TVM releases the GIL while computing).")
@click.option("--inline-ms", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="With --isolation thread: while no model thread is busy, the server runs a model whose requests "
              "take at most this long on its own loop, saving two thread hand-offs (0: always on the model threads).")
@click.option("--max-queue", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Requests waiting per model before new ones are refused as busy.")
@click.option("--server-key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="This server's key pair (NAME.key_secret from zpipe keygen): turns CurveZMQ on.")
@click.option("--clients", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of allowed client public keys (*.key).")
@click.option("--allow-upload", is_flag=True, help="Accept compiled stages from allow-listed clients (native "
              "code: remote code execution by design).")
@click.option("--max-upload-mb", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--insecure", is_flag=True, help="Allow a non-loopback endpoint without CurveZMQ.")
@click.option("--metrics-port", type=click.IntRange(1, 65535), help="Serve Prometheus metrics on 127.0.0.1:PORT.")
@click.option("--poll-s", type=click.FloatRange(min=0.05), default=2.0, show_default=True,
              help="How often the repository is scanned for new versions.")
@click.option("--drain-timeout-s", type=click.FloatRange(min=0), default=30.0, show_default=True)
@zpipe_errors
def serve(repo: Path, bind: str, workers: int, isolation: str, inline_ms: float, max_queue: int,
          server_key: Path | None, clients: Path | None, allow_upload: bool, max_upload_mb: int, insecure: bool,
          metrics_port: int | None, poll_s: float, drain_timeout_s: float) -> None:
    """Serve the models of a repository to devices (the edge server). SIGTERM drains and exits."""
    from .server import Server, ServerConfig

    config = ServerConfig(repo=repo, bind=bind, workers=workers, isolation=isolation, inline_ms=inline_ms,
                          max_queue=max_queue, server_key=server_key, clients=clients, allow_upload=allow_upload,
                          max_upload_bytes=max_upload_mb << 20, insecure=insecure, metrics_port=metrics_port,
                          poll_s=poll_s, drain_timeout_s=drain_timeout_s)
    server = Server(config).start()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: server.stop())
    status = server.repository.status()
    click.echo(f"zpipe serve: listening on {server.endpoint}; models: "
               + (", ".join(f"{m} v{s.version} ({s.state})" for m, s in sorted(status.items())) or "none yet"),
               err=True)
    server.run()
    click.echo("zpipe serve: drained and stopped", err=True)


@cli.command()
@click.argument("endpoint")
@click.option("--server-key", help="The server's public key (file or Z85 text), when it uses CurveZMQ.")
@click.option("--client-key", type=click.Path(exists=True, dir_okay=False), help="Our key pair (.key_secret).")
@click.option("--timeout-s", type=click.FloatRange(min=0.01), default=5.0, show_default=True)
@click.option("--live", is_flag=True, help="Only check that the server answers (liveness), not that it is ready.")
def health(endpoint: str, server_key: str | None, client_key: str | None, timeout_s: float, live: bool) -> None:
    """Exit 0 when the server at ENDPOINT is ready (all its models available), 1 otherwise. Prints its status and
    the round trip to it (rtt_ms: the median of 5 pings, which its loop answers at once)."""
    from .client import RemoteClient

    try:
        with RemoteClient(endpoint, server_key=server_key, client_key=client_key, timeout_s=timeout_s) as server:
            answer = server.health(timeout_s=timeout_s)
            rtt = statistics.median(server.ping(timeout_s=timeout_s).result().rtt_s for _ in range(5))
            answer["rtt_ms"] = round(rtt * 1000, 3)
    except ZpipeError as exc:
        click.echo(json.dumps({"endpoint": endpoint, "live": False, "error": str(exc)}))
        sys.exit(1)
    answer.pop("op", None)
    click.echo(json.dumps({"endpoint": endpoint, **answer}))
    sys.exit(0 if answer.get("live") and (live or answer.get("ready")) else 1)


@cli.command()
@click.argument("name")
@click.option("--dir", "key_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("."),
              show_default=True)
def keygen(name: str, key_dir: Path) -> None:
    """Write a CurveZMQ key pair: NAME.key (public: give it to peers) and NAME.key_secret (keep it private)."""
    import zmq.auth

    key_dir.mkdir(parents=True, exist_ok=True)
    public, secret = key_dir / f"{name}.key", key_dir / f"{name}.key_secret"
    if public.exists() or secret.exists():
        raise click.ClickException(f"{public} or {secret} already exists; refusing to overwrite a key")
    zmq.auth.create_certificates(key_dir, name)
    secret.chmod(0o600)
    click.echo(f"public key: {public}\nsecret key: {secret} (mode 600; never share it)")


@cli.command()
@click.option("--listen", required=True, help="Where devices connect, HOST:PORT (e.g. 127.0.0.1:6000).")
@click.option("--to", "target", required=True, help="The server it forwards to, HOST:PORT.")
@click.option("--delay-ms", type=click.FloatRange(min=0), default=0.0, show_default=True, help="One-way delay.")
@click.option("--rate-mbit", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Bandwidth cap per direction (0: none).")
def linkemu(listen: str, target: str, delay_ms: float, rate_mbit: float) -> None:
    """A TCP proxy that emulates a network link: delay and rate per direction, outages on demand.

    SIGUSR1 cuts the link (every connection dropped, new ones refused), SIGUSR2 restores it; SIGTERM/Ctrl-C
    stops and prints byte counts per direction as JSON.
    """
    from .linkemu import LinkEmulator, parse_address

    try:
        emu = LinkEmulator(listen=parse_address(listen), target=parse_address(target), delay_ms=delay_ms,
                           rate_mbit=rate_mbit or None).start()
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    stop = []
    signal.signal(signal.SIGUSR1, lambda *_: emu.outage())
    signal.signal(signal.SIGUSR2, lambda *_: emu.restore())
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.append(True))
    click.echo(f"zpipe linkemu: {listen.removeprefix('tcp://').rsplit(':', 1)[0]}:{emu.port} -> {target} "
               f"(delay {delay_ms:g} ms, rate {rate_mbit or 'unlimited'} Mbit/s)", err=True)
    while not stop:
        time.sleep(0.1)
    click.echo(json.dumps(emu.stats()))
    emu.close()


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


def _register_subcommands() -> None:
    from .compile.commands import compile_command, inspect_command
    from .loadtest_cli import bench_command

    cli.add_command(compile_command)
    cli.add_command(inspect_command)
    cli.add_command(bench_command)


_register_subcommands()


def main() -> None:
    cli(prog_name="zpipe")
