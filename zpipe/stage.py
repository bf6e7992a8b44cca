"""The stage contract, and how stage kinds named in topologies are found. No sockets here.

A stage is a unit of placement: it turns a dict of named input arrays into a dict of named output arrays. zpipe
builds the stage object in the parent (its constructor only stores and checks configuration), ships it to a worker
process, and calls, in that process:

* :meth:`Stage.setup` once, before the worker reports READY: load libraries, allocate buffers, warm up.
* :meth:`Stage.process` once per request, one request at a time. It only computes; it never sees sockets.
* :meth:`Stage.teardown` once at an orderly stop. It is best effort: it is **not** called when the worker is
  killed (SIGKILL, a crash in native code) or when :meth:`setup` raised.

Buffer ownership: the input arrays are read-only views of received frames; copy them to modify. The returned arrays
belong to zpipe from then on and may be sent without copying, so the stage must not modify them afterwards.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Mapping, Sequence

import numpy as np

from .errors import TopologyError, did_you_mean

__all__ = ["Stage", "StageContext", "Outcome", "BUILTIN_KINDS", "resolve_kind", "import_object"]

# Short names a topology may use for the built-in kinds (they live in stages/, installed as zpipe.stages).
BUILTIN_KINDS = {
    "python": "zpipe.stages.python:PythonStage",
    "tvm": "zpipe.stages.tvm:TvmStage",
    "merge": "zpipe.stages.merge:MergeStage",
    "gate": "zpipe.stages.gate:GateStage",
    "remote": "zpipe.stages.remote:RemoteStage",
}


@dataclass(frozen=True)
class Outcome:
    """What ``handle`` may return instead of bare outputs, to attach notes to the request's record.

    Each note ``key: value`` travels with the request as ``"<key>:<stage>"`` (e.g. ``at:branch_a`` = where the
    stage ran, ``x:gate`` = the gate's decision) and ends up in the caller's :class:`~zpipe.Result`. ``defer``
    holds output ports back: their consumers get them that many seconds later (checked now, delivered by the
    worker's loop, which serves other requests meanwhile). With ``spare`` (any hashable token but None), the held
    ports are a spare copy: if the request is answered before they are due (the ``select`` merge they would reach
    ran for it in the same process: see StageContext.joins), the worker drops them unsent and calls
    :meth:`Stage.withdrawn` with the token; when they come due, :meth:`Stage.spare_due` may still hold them
    longer or call them off.
    """

    outputs: Any
    notes: Mapping[str, Any] = field(default_factory=dict)
    #: Output ports whose messages leave only this many seconds later (a gate's deferred hedge, see stages/gate.py).
    defer: Mapping[str, float] = field(default_factory=dict)
    #: Marks the held ports as a spare copy, withdrawn unsent if the request is answered first (None: never).
    spare: Hashable | None = None
    #: The held ports (not a spare: ``spare`` wins) leave as soon as the request is answered, if that comes before
    #: they are due and the select they lead to runs in this process: a copy that measures (a gate's probe) and
    #: should not compete with the answer for the device's CPU.
    after_answer: bool = False


@dataclass(frozen=True)
class StageContext:
    """What a stage may know about its surroundings, set by the worker before ``setup()``.

    ``consumers`` maps each output port to the stages that read it; ``board`` is this host's signal board, where
    stages publish measurements for others (the gate's offload policy reads its branches' figures there).
    ``signals_changed``, callable from any thread, asks the worker to publish the stage's :meth:`Stage.signals`
    within a few milliseconds: for figures that change while no request runs (a remote stand-in's pings).
    ``joins`` maps an output port to the stage that makes a held copy of it moot (a ``select`` merge: see
    Topology.join_of) when that stage runs in the same process: there the worker can withdraw a spare copy
    (:attr:`Outcome.spare`) whose ports all lead to the same one.
    """

    name: str
    consumers: Mapping[str, tuple[str, ...]]
    board: Any = None
    signals_changed: Callable[[], None] = lambda: None
    joins: Mapping[str, str] = field(default_factory=dict)


class Stage:
    """Base class of every stage kind. Subclasses take their configuration as keyword-only constructor arguments."""

    #: Port names the stage reads and writes, or None when it takes whatever the topology wires to it.
    input_names: tuple[str, ...] | None = None
    output_names: tuple[str, ...] | None = None
    #: A stage that joins gated branches sets this: it is then called when some of its inputs were skipped (the
    #: gate sent the request the other way), with ``None`` for those ports. Other stages fail such a request.
    accepts_skipped: bool = False
    #: A stage that routes (the gate) sets this: output ports it leaves out of its result are *skipped*, and the
    #: consumers of those tensors receive a skip notice (no tensors, no compute, no network traffic).
    may_skip_outputs: bool = False
    #: A stage whose handle() returns a Future (a remote stand-in) sets this: its work happens elsewhere, so a
    #: worker hosting several stages dispatches it before local ones that would keep the process busy.
    asynchronous: bool = False
    #: A stage with next to no compute of its own (merge, gate) sets this: automatic grouping does not give it a
    #: process of its own (see zpipe.grouping).
    light: bool = False
    #: Whether :meth:`signals` changes between requests (a remote stand-in's pings): then the worker publishes it
    #: at least every 50 ms while it runs. False: it changes only as requests are handled, and is published with
    #: them. None (the default): True for a stage that overrides signals().
    live_signals: bool | None = None
    #: Set by the worker before setup(): see StageContext.
    context: StageContext | None = None

    def setup(self) -> None:
        """Called once in the worker process before the first request."""

    def process(self, inputs: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        """Compute one request's outputs from its inputs (both keyed by port name)."""
        raise NotImplementedError

    def handle(self, inputs: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> Any:
        """What the worker calls per request. Stages that need the request's metadata (the gate reads X from it
        when the app sets X per request) override this; the rest implement :meth:`process`."""
        return self.process(inputs)

    def spare_due(self, spare: Hashable) -> bool | float:
        """A spare copy this stage held back (:attr:`Outcome.spare` = ``spare``) is due and its request not yet
        answered: True sends it; a finite number of seconds > 0 holds it that much longer (at least 1 ms, at most an
        hour), then asks again (any other number sends it); False holds it for good: it goes out only if the other
        branch fails. Held, it is withdrawn (:meth:`withdrawn`) when the answer comes. Called in the worker's
        loop."""
        return True

    def withdrawn(self, spare: Hashable) -> None:
        """A spare copy this stage held back (:attr:`Outcome.spare` = ``spare``) was dropped unsent: the request
        was answered before it was due. Called in the worker's loop; the stage may undo what it counted for it."""

    def signals(self) -> dict[str, Any]:
        """Extra figures to publish on the signal board next to the worker's own (processed, service time...)."""
        return {}

    def runnable(self, arrived: Mapping[str, bool | None]) -> bool:
        """While a request's inputs are joined: True runs the stage before the rest arrive (ports still missing
        come as ``None``; later parts of that request are then dropped). ``arrived`` maps every input port, in
        topology order, to True (a tensor came), False (a skip notice came) or None (nothing yet). Only stages
        that override this are asked (the ``select`` merge: the first branch of a hedged gate to answer wins)."""
        return all(v is not None for v in arrived.values())

    def check_wiring(self, name: str, inputs: Sequence[tuple[str, str]], outputs: Sequence[tuple[str, str]]) -> None:
        """Called while the topology is validated, in the parent: raise TopologyError for wiring this kind cannot
        serve. ``inputs``/``outputs`` are (port, tensor) pairs."""

    def teardown(self) -> None:
        """Best-effort clean-up at an orderly stop; not called after SIGKILL, a native crash, or a failed setup."""


def import_object(path: str, *, what: str = "object"):
    """Import ``"package.module:attribute"`` (or ``package.module.attribute``) and return the attribute."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise TopologyError(f"{what} {path!r} is not a dotted path like 'package.module:name'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TopologyError(f"{what} {path!r}: cannot import module {module_name!r}: {exc}") from exc
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise TopologyError(f"{what} {path!r}: module {module_name!r} has no attribute {attr!r}") from None
    return obj


def resolve_kind(kind: str) -> type[Stage]:
    """The Stage subclass for a topology ``kind``: a built-in short name or a dotted path to a user class."""
    if kind in BUILTIN_KINDS:
        cls = import_object(BUILTIN_KINDS[kind], what="stage kind")
    elif ":" in kind or "." in kind:
        cls = import_object(kind, what="stage kind")
    else:
        raise TopologyError(f"unknown stage kind {kind!r}; built-in kinds are {sorted(BUILTIN_KINDS)}"
                            f"{did_you_mean(kind, BUILTIN_KINDS)}, or give a dotted path 'package.module:Class'")
    if not (isinstance(cls, type) and issubclass(cls, Stage)):
        raise TopologyError(f"stage kind {kind!r} resolves to {cls!r}, which is not a zpipe.Stage subclass")
    return cls
