"""The zpipe exception tree.

Every error zpipe raises on purpose is a :class:`ZpipeError`. Subclasses are split by what the caller can do about
it, and each carries the exit code the CLI uses::

    ZpipeError (1)                 base; never raised bare
    ├── TopologyError (3)          the topology file or spec is wrong: fix the file
    │   └── ArtifactError (4)      a file a stage needs (library, manifest) is missing or unusable
    ├── FramingError (5)           a message on the wire is malformed: the peer is buggy or hostile
    ├── StageError (6)             a stage raised while processing one request (carries the stage name)
    ├── RequestFailed (7)          a request ended without outputs (carries the request id and the reason)
    │   └── PeerTimeout (8)        a deadline passed waiting for a peer (stage, worker, server)
    ├── PipelineClosed (9)         the pipeline is shut down (or shutting down) and takes no more requests
    ├── Busy (10)                  no capacity right now (max_in_flight reached, server queue full): retry later
    └── CompileError (11)          zpipe.compile.errors: a model cannot be cut or compiled as asked

Messages name the culprit (stage, key, endpoint, request id) with ``!r``, say what was expected and what arrived,
and where possible how to fix it. This module imports nothing from zpipe.
"""

from __future__ import annotations

import difflib
from typing import Iterable

__all__ = [
    "did_you_mean",
    "ZpipeError",
    "TopologyError",
    "ArtifactError",
    "FramingError",
    "StageError",
    "RequestFailed",
    "PeerTimeout",
    "PipelineClosed",
    "Busy",
]


class ZpipeError(Exception):
    """Base class of every error zpipe raises on purpose."""

    exit_code = 1


class TopologyError(ZpipeError):
    """A topology (file or in-code spec) is invalid: unknown key, missing stage, cycle, unconnected port."""

    exit_code = 3


class ArtifactError(TopologyError):
    """A file a stage needs is missing or unusable (compiled library, manifest)."""

    exit_code = 4


class FramingError(ZpipeError):
    """A message does not follow the zpipe wire format, or breaks one of its limits."""

    exit_code = 5


class StageError(ZpipeError):
    """A stage failed on one request. ``stage`` names it; the worker keeps serving."""

    exit_code = 6

    def __init__(self, message: str, *, stage: str | None = None) -> None:
        super().__init__(message)
        self.stage = stage


class RequestFailed(ZpipeError):
    """A request ended without outputs. ``request_id``, ``stage`` and ``reason`` say which, where and why."""

    exit_code = 7

    def __init__(self, message: str, *, request_id: int | None = None, stage: str | None = None,
                 reason: str = "error") -> None:
        super().__init__(message)
        self.request_id = request_id
        self.stage = stage
        self.reason = reason


class PeerTimeout(RequestFailed):
    """A deadline passed while waiting for a peer: a stage, a worker process or a server."""

    exit_code = 8


class PipelineClosed(ZpipeError):
    """The pipeline is closed or draining and accepts no new requests."""

    exit_code = 9


class Busy(ZpipeError):
    """No capacity right now: a non-blocking submit found max_in_flight reached, or a server's queue is full."""

    exit_code = 10


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A ``"; did you mean 'x'?"`` suffix for an error message, or ``""`` when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""
