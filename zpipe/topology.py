"""Topologies: which stages exist, where they run, and which tensor feeds which port. Frozen values; no sockets.

A topology wires stages by **tensor name**, the way ONNX does: every tensor has exactly one producer (a stage, or
the request itself for the pipeline inputs), and any number of consumers. A stage port reads or writes a tensor of
the same name unless the topology maps it (``inputs = { x = "h" }``: port ``x`` reads tensor ``h``). Fan-out is one
tensor read by several stages; fan-in is a stage reading tensors from several producers, which zpipe joins by
request id before calling the stage. A TOML file looks like::

    [pipeline]
    name = "branchy"
    inputs = ["x"]               # tensors every request carries
    outputs = ["y"]              # tensors every reply carries
    timeout_s = 30               # per-request deadline

    [stages.stem]
    kind = "tvm"                 # built-in short name, or "package.module:Class"
    library = "build/stem.so"    # kind parameters; paths are relative to this file
    inputs = ["x"]
    outputs = ["h"]

Everything is validated when the value is built, and errors name the stage and key at fault.
"""

from __future__ import annotations

import inspect
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .errors import TopologyError, ZpipeError, did_you_mean
from .stage import Stage, resolve_kind

__all__ = ["StageSpec", "HostSpec", "Topology", "REQUEST", "SINK", "LOCAL_HOST"]

REQUEST = "<request>"  # the producer of the pipeline inputs
SINK = "<sink>"  # the consumer of the pipeline outputs
LOCAL_HOST = "device"  # the host `zpipe run` runs on

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,127}$")
_PIPELINE_KEYS = ("name", "inputs", "outputs", "hwm", "max_in_flight", "timeout_s", "join_timeout_s", "groups",
                  "max_groups")
_STAGE_KEYS = ("kind", "inputs", "outputs", "host", "model", "version", "upload", "fallback", "group", "nice")
_HOST_KEYS = ("endpoint", "server_key", "client_key", "timeout_s", "heartbeat_s", "ping_s")
_TOP_KEYS = ("pipeline", "stages", "hosts")

Ports = tuple[tuple[str, str], ...]  # (port name, tensor name) pairs


@dataclass(frozen=True, kw_only=True)
class HostSpec:
    """A host other than this device (an edge server), named in a topology's ``[hosts]`` table."""

    name: str
    endpoint: str | tuple[str, ...]  # several endpoints: servers holding the same models (spread, fail over)
    server_key: str | None = None  # the server's public key (file or Z85 text): turns CurveZMQ on
    client_key: str | None = None  # our key pair (.key_secret file)
    timeout_s: float = 30.0  # default per-request deadline towards this host
    heartbeat_s: float = 1.0  # ZeroMQ heartbeat interval on the connection (0 turns heartbeats off)
    # How often the device pings this host to measure the link's delay for an offload policy (0: never). None: every
    # 0.1 s when a gate of the topology has a policy, else never (a gate told X sends nothing it need not send).
    ping_s: float | None = None

    def __post_init__(self) -> None:
        where = f"[hosts.{self.name}]"
        _positive(where, "timeout_s", self.timeout_s, (int, float))
        _positive(where, "heartbeat_s", self.heartbeat_s, (int, float), zero=True)
        if self.ping_s is not None:
            _positive(where, "ping_s", self.ping_s, (int, float), zero=True)


@dataclass(frozen=True, kw_only=True)
class StageSpec:
    """One stage of a topology: its name, the configured stage object, its wiring and its host.

    ``inputs``/``outputs`` accept a list of names (port = tensor) or a mapping port -> tensor; they are stored as
    tuples of ``(port, tensor)`` pairs.
    """

    name: str
    stage: Stage
    inputs: Ports | Sequence[str] | Mapping[str, str]
    outputs: Ports | Sequence[str] | Mapping[str, str]
    host: str = LOCAL_HOST
    model: str | None = None  # on an edge server: the model name there (default: the stage name)
    version: int | None = None  # on an edge server: pin a version (default: the newest it serves)
    upload: bool = False  # on an edge server: send the compiled library there first
    fallback: bool = False  # on an edge server: run the stage here when no server can (down, deadline, refused)
    group: str | None = None  # the worker process (group) hosting it on this device; None: grouped automatically
    nice: int = 0  # CPU priority of the process hosting it, 0..19 as in nice(1): its group takes the highest

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise TopologyError(f"stage name {self.name!r} must start with a letter or '_' and hold only letters, "
                                "digits, '_', '.', '-' (at most 128 chars)")
        if self.group is not None and not (isinstance(self.group, str) and _NAME_RE.match(self.group)):
            raise TopologyError(f"stage {self.name!r}: group {self.group!r} must be a name (letters, digits, '_', "
                                "'.', '-'; starting with a letter or '_')")
        if not isinstance(self.nice, int) or isinstance(self.nice, bool) or not 0 <= self.nice <= 19:
            raise TopologyError(f"stage {self.name!r}: nice must be an integer from 0 (normal priority) to 19 "
                                f"(lowest), got {self.nice!r}")
        if self.nice and self.host != LOCAL_HOST:
            raise TopologyError(f"stage {self.name!r}: nice applies to stages that compute on this device; this one "
                                f"runs on {self.host!r}, and its stand-in here handles the replies")
        if not isinstance(self.stage, Stage):
            raise TopologyError(f"stage {self.name!r}: expected a zpipe.Stage instance, got "
                                f"{type(self.stage).__name__}; wrap plain functions in zpipe.PythonStage")
        object.__setattr__(self, "inputs", _ports(self.name, "inputs", self.inputs))
        object.__setattr__(self, "outputs", _ports(self.name, "outputs", self.outputs))
        _check_ports(self.name, "inputs", self.inputs, self.stage.input_names, require_all=True)
        _check_ports(self.name, "outputs", self.outputs, self.stage.output_names, require_all=False)
        self.stage.check_wiring(self.name, self.inputs, self.outputs)
        if self.host == LOCAL_HOST and (self.model is not None or self.version is not None or self.upload
                                        or self.fallback):
            raise TopologyError(f"stage {self.name!r}: model/version/upload/fallback apply only to stages placed "
                                "on an edge server (set host)")
        if self.fallback and getattr(self.stage, "endpoint", "") is None:
            raise TopologyError(f"stage {self.name!r}: fallback needs a stage that can run here (e.g. kind 'tvm' "
                                "with its library), not kind 'remote'")
        if self.host == LOCAL_HOST and getattr(self.stage, "endpoint", "") is None:
            raise TopologyError(f"stage {self.name!r} of kind 'remote' needs a host from [hosts] (host = \"...\") "
                                "or an endpoint")
        if self.upload and not hasattr(self.stage, "library"):
            raise TopologyError(f"stage {self.name!r}: upload = true needs a compiled stage (kind 'tvm')")

    def tensors_in(self) -> tuple[str, ...]:
        return tuple(tensor for _, tensor in self.inputs)

    def tensors_out(self) -> tuple[str, ...]:
        return tuple(tensor for _, tensor in self.outputs)


@dataclass(frozen=True, kw_only=True)
class Topology:
    """A validated pipeline: stages, wiring, hosts and run-time bounds.

    ``hwm`` bounds each link's queue (messages); ``max_in_flight`` bounds requests submitted but not answered
    (submit blocks beyond it: backpressure); ``timeout_s`` is each request's deadline; ``join_timeout_s`` is how
    long a stage waits for the rest of a request's inputs once the first part arrived (default: ``timeout_s``).
    ``groups`` ("auto" or "per-stage") and ``max_groups`` decide how stages share worker processes
    (:mod:`zpipe.grouping`).
    """

    name: str = "pipeline"
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    stages: tuple[StageSpec, ...]
    hosts: tuple[HostSpec, ...] = ()
    hwm: int = 16
    max_in_flight: int = 64
    timeout_s: float = 60.0
    join_timeout_s: float | None = None
    groups: str = "auto"
    max_groups: int | None = None  # automatic grouping: at most this many processes (default: CPU count)
    source: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        object.__setattr__(self, "stages", tuple(self.stages))
        object.__setattr__(self, "hosts", tuple(self.hosts))
        where = f"topology {self.name!r}"
        _positive(where, "hwm", self.hwm, int)
        _positive(where, "max_in_flight", self.max_in_flight, int)
        _positive(where, "timeout_s", self.timeout_s, (int, float))
        if self.join_timeout_s is not None:
            _positive(where, "join_timeout_s", self.join_timeout_s, (int, float))
        if self.groups not in ("auto", "per-stage"):
            raise TopologyError(f"topology {self.name!r}: groups must be 'auto' or 'per-stage', got {self.groups!r}")
        if self.max_groups is not None:
            _positive(where, "max_groups", self.max_groups, int)
        self._validate()

    # -- queries -------------------------------------------------------------------------------------------------
    def stage(self, name: str) -> StageSpec:
        for spec in self.stages:
            if spec.name == name:
                return spec
        raise TopologyError(f"no stage {name!r} in topology {self.name!r}"
                            f"{did_you_mean(name, [s.name for s in self.stages])}")

    def producer(self, tensor: str) -> str:
        """The stage name producing ``tensor``, or :data:`REQUEST` for a pipeline input."""
        if tensor in self.inputs:
            return REQUEST
        for spec in self.stages:
            if tensor in spec.tensors_out():
                return spec.name
        raise TopologyError(f"nothing produces tensor {tensor!r} in topology {self.name!r}")

    def routes(self, producer: str) -> dict[str, tuple[str, ...]]:
        """Where ``producer``'s tensors go: consumer stage name (or :data:`SINK`) -> tensor names it needs."""
        produced = self.inputs if producer == REQUEST else self.stage(producer).tensors_out()
        out: dict[str, tuple[str, ...]] = {}
        for spec in self.stages:
            needed = tuple(t for t in spec.tensors_in() if t in produced)
            if needed:
                out[spec.name] = needed
        to_sink = tuple(t for t in self.outputs if t in produced)
        if to_sink:
            out[SINK] = to_sink
        return out

    def join_of(self, tensor: str) -> str | None:
        """The stage that makes a held copy of ``tensor`` moot once it ran for a request, or None.

        That is the nearest stage joining gated branches that may run before all its inputs arrived (a ``select``
        merge: Stage.accepts_skipped and Stage.runnable) among those ``tensor`` leads to, that also takes an input
        from outside them (the other branch; a select fed only from within, say behind a second gate, is passed
        through), provided the stages before it on the way take nothing from elsewhere but ``tensor``'s producer and
        give nothing to anything else (a pipeline output, a stage after the join).
        """
        if tensor in self.outputs:
            return None
        source, readers, ahead = self.producer(tensor), self._readers, self._ahead

        def only_way_out(join: str) -> bool:  # the stages before it take from and give to nothing else
            branch = ahead(starts, stop=join)
            return not branch & set(joins) and all(
                all(self.producer(t) in branch | {source} for t in self.stage(name).tensors_in())
                and all(t not in self.outputs and set(readers[t]) <= branch | {join}
                        for t in self.stage(name).tensors_out()) for name in branch)

        starts = readers.get(tensor, [])
        reach = ahead(starts)
        joins = [name for name in reach if self._may_answer_early(name)
                 and any(self.producer(t) not in reach | {source} for t in self.stage(name).tensors_in())]
        found = [join for join in joins if only_way_out(join)]
        return found[0] if len(found) == 1 else None

    def skip_shortcut(self, tensors: tuple[str, ...]) -> tuple[str, tuple[str, ...]] | None:
        """Where a skip notice for ``tensors`` may go straight to: (the join their branch leads to, the join's inputs
        from that branch), or None. A gate's skipped branch then costs its stages nothing (on the device: no message
        to each process on the way, nothing for them to pass on): the branch is theirs alone up to the join (see
        join_of), so nothing on it could run for that request anyway."""
        joins = {self.join_of(t) for t in tensors}
        join = joins.pop() if len(joins) == 1 else None
        if join is None:
            return None
        branch = self._ahead([r for t in tensors for r in self._readers.get(t, ())], stop=join)
        into_join = tuple(t for t in self.stage(join).tensors_in() if self.producer(t) in branch)
        return (join, into_join) if into_join else None

    def _ahead(self, starts: list[str], stop: str | None = None) -> set[str]:
        """The stages ``starts`` and everything downstream of them, not going past ``stop``."""
        seen: set[str] = set()
        todo = list(starts)
        while todo:
            name = todo.pop()
            if name == stop or name in seen:
                continue
            seen.add(name)
            todo += [r for t in self.stage(name).tensors_out() for r in self._readers.get(t, ())]
        return seen

    def _may_answer_early(self, name: str) -> bool:
        stage = self.stage(name).stage
        return stage.accepts_skipped and type(stage).runnable is not Stage.runnable

    def host(self, name: str) -> HostSpec:
        for host in self.hosts:
            if host.name == name:
                return host
        raise TopologyError(f"no host {name!r} in topology {self.name!r}")

    def order(self) -> tuple[str, ...]:
        """Stage names in a topological order (producers before consumers)."""
        return self._order

    def grouping(self, **options: Any):
        """Which stages share a worker process on this device: a :class:`zpipe.grouping.Grouping`."""
        from .grouping import plan_groups

        return plan_groups(self, **options)

    @property
    def effective_join_timeout_s(self) -> float:
        return self.timeout_s if self.join_timeout_s is None else self.join_timeout_s

    # -- loading -------------------------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path) -> "Topology":
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise TopologyError(f"cannot read topology file {str(path)!r}: {exc.strerror}") from exc
        return cls.from_toml(text, base_dir=path.parent, source=path)

    @classmethod
    def from_toml(cls, text: str, *, base_dir: str | Path = ".", source: Path | None = None) -> "Topology":
        where = str(source) if source else "<topology>"
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise TopologyError(f"{where}: not valid TOML: {exc}") from exc
        return cls.from_dict(doc, base_dir=Path(base_dir), source=source)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], *, base_dir: Path = Path("."), source: Path | None = None
                  ) -> "Topology":
        _unknown_keys(doc, _TOP_KEYS, "top level")
        pipeline = _table(doc, "pipeline", "top level")
        _unknown_keys(pipeline, _PIPELINE_KEYS, "[pipeline]")
        for key in ("inputs", "outputs"):
            if key not in pipeline:
                raise TopologyError(f"[pipeline] needs {key!r}: the list of tensor names every request "
                                    f"{'carries' if key == 'inputs' else 'gets back'}")
            if not _is_str_list(pipeline[key]):
                raise TopologyError(f"[pipeline] {key!r} must be a list of tensor names, got {pipeline[key]!r}")
        hosts = []
        for host_name, table in _table(doc, "hosts", "top level", required=False).items():
            _unknown_keys(table, _HOST_KEYS, f"[hosts.{host_name}]")
            if "endpoint" not in table:
                raise TopologyError(f"[hosts.{host_name}] needs 'endpoint', e.g. 'tcp://10.0.0.2:5555'")
            table = dict(table)
            if isinstance(table["endpoint"], list):
                if not table["endpoint"] or not all(isinstance(e, str) for e in table["endpoint"]):
                    raise TopologyError(f"[hosts.{host_name}] endpoint must be a string or a list of strings")
                table["endpoint"] = tuple(table["endpoint"])
            for key in ("server_key", "client_key"):
                if isinstance(table.get(key), str) and len(table[key]) != 40:  # a path, not inline Z85 text
                    table[key] = str((base_dir / table[key]).resolve())
            hosts.append(HostSpec(name=host_name, **table))
        stages = [_stage_from_table(name, table, base_dir)
                  for name, table in _table(doc, "stages", "top level").items()]
        options = {k: v for k, v in pipeline.items() if k not in ("inputs", "outputs")}
        try:
            return cls(inputs=pipeline["inputs"], outputs=pipeline["outputs"], stages=stages, hosts=hosts,
                       source=source, **options)
        except TypeError as exc:  # wrong value type for a dataclass field
            raise TopologyError(f"[pipeline]: {exc}") from exc

    # -- validation ----------------------------------------------------------------------------------------------
    def _validate(self) -> None:
        for key in ("inputs", "outputs"):
            tensors = getattr(self, key)
            if not tensors or not all(isinstance(t, str) and t for t in tensors):
                raise TopologyError(f"topology {self.name!r}: {key} must be a non-empty list of tensor names, "
                                    f"got {list(tensors)!r}")
            if len(set(tensors)) != len(tensors):
                raise TopologyError(f"topology {self.name!r}: {key} repeats a tensor: {list(tensors)}")
        names = [s.name for s in self.stages]
        if not names:
            raise TopologyError(f"topology {self.name!r} has no stages")
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise TopologyError(f"stage names must be unique; repeated: {sorted(dupes)}")
        host_names = {h.name for h in self.hosts} | {LOCAL_HOST}
        for spec in self.stages:
            if spec.host not in host_names:
                raise TopologyError(f"stage {spec.name!r}: host {spec.host!r} is not {LOCAL_HOST!r} and not in "
                                    f"[hosts]{did_you_mean(spec.host, host_names)}")
        producers: dict[str, str] = {}
        for tensor in self.inputs:
            _claim(producers, tensor, REQUEST)
        for spec in self.stages:
            for tensor in spec.tensors_out():
                _claim(producers, tensor, spec.name)
        for spec in self.stages:
            for port, tensor in spec.inputs:
                if tensor not in producers:
                    raise TopologyError(f"stage {spec.name!r} input {port!r} reads tensor {tensor!r}, which no "
                                        f"stage produces and the pipeline does not take as input"
                                        f"{did_you_mean(tensor, producers)}")
        consumed = {t for spec in self.stages for t in spec.tensors_in()} | set(self.outputs)
        for tensor in self.outputs:
            if tensor not in producers:
                raise TopologyError(f"pipeline output {tensor!r} is produced by no stage"
                                    f"{did_you_mean(tensor, producers)}")
            if producers[tensor] == REQUEST:
                raise TopologyError(f"pipeline output {tensor!r} is also a pipeline input; route it through a stage")
        for tensor, producer in producers.items():
            if tensor not in consumed:
                who = "pipeline input" if producer == REQUEST else f"output of stage {producer!r}"
                raise TopologyError(f"{who} {tensor!r} is not connected: no stage reads it and it is not a pipeline "
                                    "output; wire it or remove it")
        object.__setattr__(self, "_order", self._toposort(producers))
        readers: dict[str, list[str]] = {tensor: [] for tensor in producers}  # tensor -> the stages reading it
        for spec in self.stages:
            for tensor in dict.fromkeys(spec.tensors_in()):
                readers[tensor].append(spec.name)
        object.__setattr__(self, "_readers", readers)

    def _toposort(self, producers: Mapping[str, str]) -> tuple[str, ...]:
        deps = {s.name: {producers[t] for t in s.tensors_in()} - {REQUEST} for s in self.stages}
        order: list[str] = []
        state: dict[str, int] = {}  # 1 = on the current path, 2 = done

        def visit(name: str, path: list[str]) -> None:
            if state.get(name) == 2:
                return
            if state.get(name) == 1:
                cycle = path[path.index(name):] + [name]
                raise TopologyError(f"the stages form a cycle: {' -> '.join(cycle)}")
            state[name] = 1
            for dep in sorted(deps[name]):
                visit(dep, path + [name])
            state[name] = 2
            order.append(name)

        for spec in self.stages:
            visit(spec.name, [])
        return tuple(order)


def _stage_from_table(name: str, table: Any, base_dir: Path) -> StageSpec:
    where = f"[stages.{name}]"
    if not isinstance(table, dict):
        raise TopologyError(f"{where} must be a table, got {type(table).__name__}")
    if "kind" not in table:
        raise TopologyError(f"{where} needs 'kind': a built-in kind ('python', 'tvm', 'merge') or "
                            "'package.module:Class'")
    for key in ("inputs", "outputs"):
        if key not in table:
            raise TopologyError(f"{where} needs {key!r}: a list of tensor names or a table port = tensor")
    if not isinstance(table["kind"], str):
        raise TopologyError(f"{where} 'kind' must be a string, got {table['kind']!r}")
    cls = resolve_kind(table["kind"])
    params = {k: v for k, v in table.items() if k not in _STAGE_KEYS}
    accepted = _accepted_params(cls)
    for key in params:
        if key not in accepted:
            raise TopologyError(f"{where}: unknown key {key!r} for kind {table['kind']!r}"
                                f"{did_you_mean(key, [*_STAGE_KEYS, *accepted])}; "
                                f"this kind takes {sorted(accepted) or 'no parameters'}")
    missing = [k for k, p in accepted.items() if p.default is inspect.Parameter.empty and k not in params]
    if missing:
        raise TopologyError(f"{where}: kind {table['kind']!r} needs {missing}")
    for key in getattr(cls, "path_params", ()):
        if isinstance(params.get(key), str):
            params[key] = str((base_dir / params[key]).resolve())
    try:
        stage = cls(**params)
    except ZpipeError as exc:
        raise type(exc)(f"{where}: {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise TopologyError(f"{where}: {exc}") from exc
    return StageSpec(name=name, stage=stage, inputs=table["inputs"], outputs=table["outputs"],
                     host=table.get("host", LOCAL_HOST), model=table.get("model"), version=table.get("version"),
                     upload=table.get("upload", False), fallback=table.get("fallback", False),
                     group=table.get("group"), nice=table.get("nice", 0))


def _accepted_params(cls: type) -> dict[str, inspect.Parameter]:
    sig = inspect.signature(cls.__init__)
    return {n: p for n, p in sig.parameters.items()
            if n != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def _ports(stage: str, key: str, value: Any) -> Ports:
    if isinstance(value, Mapping):
        pairs = list(value.items())
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        pairs = [(v, v) for v in value]
    elif isinstance(value, tuple) and all(isinstance(v, tuple) and len(v) == 2 for v in value):
        pairs = list(value)
    else:
        raise TopologyError(f"stage {stage!r} {key!r} must be a list of tensor names or a table port = tensor, "
                            f"got {value!r}")
    if not pairs:
        raise TopologyError(f"stage {stage!r} needs at least one entry in {key!r}")
    for port, tensor in pairs:
        if not (isinstance(port, str) and isinstance(tensor, str) and port and tensor):
            raise TopologyError(f"stage {stage!r} {key!r}: {port!r} = {tensor!r} is not a pair of names")
    ports = [p for p, _ in pairs]
    tensors = [t for _, t in pairs]
    for label, names in (("port", ports), ("tensor", tensors)):
        if len(set(names)) != len(names):
            raise TopologyError(f"stage {stage!r} {key!r} repeats a {label}: {names}")
    return tuple(pairs)


def _check_ports(stage: str, key: str, ports: Ports, declared: Iterable[str] | None, *, require_all: bool) -> None:
    if declared is None:
        return
    declared = tuple(declared)
    for port, _ in ports:
        if port not in declared:
            raise TopologyError(f"stage {stage!r} has no {key[:-1]} port {port!r}{did_you_mean(port, declared)}; "
                                f"its {key} are {list(declared)}")
    if require_all:
        missing = [p for p in declared if p not in {p for p, _ in ports}]
        if missing:
            raise TopologyError(f"stage {stage!r} {key} {missing} are not wired; its {key} are {list(declared)}")


def _claim(producers: dict[str, str], tensor: str, producer: str) -> None:
    if tensor in producers:
        def who(p: str) -> str:
            return "the request (pipeline input)" if p == REQUEST else f"stage {p!r}"
        raise TopologyError(f"tensor {tensor!r} is produced twice: by {who(producers[tensor])} and by {who(producer)}")
    producers[tensor] = producer


def _unknown_keys(table: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    for key in table:
        if key not in allowed:
            raise TopologyError(f"{where}: unknown key {key!r}{did_you_mean(key, allowed)}; allowed: {list(allowed)}")


def _table(doc: Mapping[str, Any], key: str, where: str, *, required: bool = True) -> dict:
    if key not in doc:
        if required:
            raise TopologyError(f"{where}: missing [{key}] table")
        return {}
    if not isinstance(doc[key], dict):
        raise TopologyError(f"{where}: {key!r} must be a table, got {type(doc[key]).__name__}")
    return doc[key]


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) and v for v in value)


def _positive(where: str, key: str, value: Any, types: Any, *, zero: bool = False) -> None:
    """``value`` must be a finite number of ``types`` above 0 (or 0 itself, with ``zero``)."""
    if isinstance(value, bool) or not isinstance(value, types) or not math.isfinite(value) or value < 0 \
            or (value == 0 and not zero):
        raise TopologyError(f"{where}: {key} must be a {'non-negative' if zero else 'positive'} finite number, "
                            f"got {value!r}")
