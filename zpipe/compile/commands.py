"""Click commands of the model path: `zpipe compile` and `zpipe inspect` (registered by zpipe.cli).

Heavy imports (onnx, tvm) happen inside the commands, never at import time.
"""

from __future__ import annotations

import click

__all__ = ["compile_command", "inspect_command"]


@click.command("compile")
def compile_command() -> None:
    """Cut an ONNX model into stages at its branch points and compile each with TVM (work in progress)."""
    raise click.ClickException("zpipe compile is not implemented yet (issue 3)")


@click.command("inspect")
def inspect_command() -> None:
    """Print the stage plan of an ONNX model without compiling (work in progress)."""
    raise click.ClickException("zpipe inspect is not implemented yet (issue 3)")
