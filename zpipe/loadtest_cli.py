"""`zpipe bench`: the load-test harness's command line (registered by zpipe.cli). Work in progress (issue 7)."""

from __future__ import annotations

import click

__all__ = ["bench_command"]


@click.group("bench", invoke_without_command=True)
@click.pass_context
def bench_command(ctx: click.Context) -> None:
    """Load-test a topology or a server: latency percentiles, throughput, errors (work in progress)."""
    if ctx.invoked_subcommand is None:
        raise click.ClickException("zpipe bench is not implemented yet (issue 7)")
