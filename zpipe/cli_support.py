"""What every `zpipe` subcommand module shares: turning zpipe's errors into click errors with their exit codes."""

from __future__ import annotations

import functools

import click

from .errors import ZpipeError

__all__ = ["zpipe_errors"]


def zpipe_errors(fn):
    """Decorator: a ZpipeError becomes a ClickException carrying the error class's exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ZpipeError as exc:
            error = click.ClickException(str(exc))
            error.exit_code = exc.exit_code
            raise error from exc

    return wrapper
