"""Spawn the worker processes of a topology on this host, wait for READY, restart the dead, stop them in order.

One worker process hosts one group of stages (:mod:`zpipe.grouping`); the supervisor knows workers by group name.

Workers are fresh interpreters (``python -c "from zpipe.worker import main; main()"``) that read their
:class:`~zpipe.worker.WorkerPlan` from a pipe: a child inherits no sockets, contexts or TVM state from the parent,
and, unlike ``multiprocessing``'s spawn, never re-imports the caller's ``__main__`` (so scripts need no
``if __name__ == "__main__"`` guard and work from stdin or a notebook). Liveness of local workers is watched through
a pidfd per child (a file descriptor that becomes readable when the process ends), which the pipeline's I/O loop
polls together with its sockets: a dead local worker is noticed at once, without heartbeat traffic.
"""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import time
from dataclasses import dataclass, field

import cloudpickle
import zmq

from .errors import PeerTimeout, StageError, ZpipeError
from .framing import Kind, Message
from .grouping import Grouping
from .stage import Stage, resolve_kind
from .topology import LOCAL_HOST, REQUEST, SINK, StageSpec, Topology
from .transport import ipc_endpoint, make_socket, recv_message, send_message
from .worker import StageSlot, WorkerPlan, marker_path, running_stage

__all__ = ["Supervisor"]

log = logging.getLogger(__name__)

_STABLE_S = 60.0  # a worker that ran this long before dying gets its restart budget back
AUTO_PING_S = 0.05  # a remote stand-in pings its servers this often when a gate has an offload policy


@dataclass
class _Child:
    plan: WorkerPlan
    process: subprocess.Popen | None = None
    pidfd: int | None = None
    ready: bool = False
    restarts: int = 0
    started_at: float = field(default_factory=time.monotonic)


class Supervisor:
    """Owns the worker processes and the control socket. Not thread-safe: one thread drives it at a time."""

    def __init__(self, topology: Topology, ctx: zmq.Context, rundir: str, sink_endpoint: str, *,
                 max_restarts: int = 3) -> None:
        self.topology = topology
        self.max_restarts = max_restarts
        self.control = make_socket(ctx, zmq.ROUTER, hwm=1000)
        self.control.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted worker takes over its identity
        self.control.bind(ipc_endpoint(rundir, "control"))
        control = self.control.getsockopt_string(zmq.LAST_ENDPOINT)
        self.grouping: Grouping = topology.grouping()
        self.board_dir = os.path.join(rundir, "board")
        group_of = self.grouping.group_of
        # A stage needs a socket only when something outside its group feeds it (the request, or another group).
        endpoints = {}
        for i, spec in enumerate(topology.stages):
            producers = {topology.producer(t) for t in spec.tensors_in()}
            if any(p == REQUEST or group_of(p) != group_of(spec.name) for p in producers):
                endpoints[spec.name] = ipc_endpoint(rundir, f"s{i}")
        endpoints[SINK] = sink_endpoint
        self.endpoints = endpoints
        watched = _watched_from(topology, self.grouping)
        self.children: dict[str, _Child] = {}
        for group, stages in self.grouping.groups.items():
            slots = []
            for name in stages:
                spec = topology.stage(name)
                routes = tuple((consumer, endpoints.get(consumer, ""), tensors)
                               for consumer, tensors in topology.routes(name).items())
                slots.append(StageSlot(name=name, stage_blob=cloudpickle.dumps(_stage_to_run(topology, spec)),
                                       inputs=spec.inputs, outputs=spec.outputs, endpoint=endpoints.get(name, ""),
                                       routes=routes, consumers=_consumers(topology, spec),
                                       joins=tuple((t, j) for t in spec.tensors_out()
                                                   if (j := topology.join_of(t)) is not None),
                                       watched=name in watched,
                                       skip_to=_skip_shortcuts(topology, spec, self.grouping, endpoints)))
            plan = WorkerPlan(group=group, stages=tuple(slots), control=control, hwm=topology.hwm,
                              join_timeout_s=topology.effective_join_timeout_s, sys_path=tuple(sys.path),
                              parent_pid=os.getpid(), board_dir=self.board_dir,
                              nice=_group_nice(topology, group, stages))
            self.children[group] = _Child(plan=plan)

    # -- start ---------------------------------------------------------------------------------------------------
    def start(self, timeout_s: float) -> None:
        """Spawn every worker and wait until all report READY; on any failure stop them all and raise."""
        deadline = time.monotonic() + timeout_s
        try:
            for name in self.children:
                self._spawn(name)
            while not all(c.ready for c in self.children.values()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    waiting = [s for n, c in self.children.items() if not c.ready for s in self.grouping.groups[n]]
                    raise PeerTimeout(f"stages {waiting} did not report READY within {timeout_s:g}s; a slow setup() "
                                      "(compiling? loading a large library?) needs a larger start timeout",
                                      reason="start_timeout")
                if self.control.poll(min(200, int(remaining * 1000) + 1)):
                    self.handle_control()
                for name, child in self.children.items():
                    if not child.ready and child.process.poll() is not None:
                        # It may have sent "failed" just before exiting: read that first, for a better message.
                        while self.control.poll(50):
                            self.handle_control()
                        raise StageError(f"{self.describe(name)}: worker exited with code "
                                         f"{child.process.returncode} before it was ready", stage=self.culprit(name))
        except BaseException:
            self.stop(timeout_s=2.0)
            raise

    def _spawn(self, name: str) -> None:
        child = self.children[name]
        self._close_pidfd(child)
        marker_path(self.board_dir, name).unlink(missing_ok=True)  # what an earlier process was running
        child.process = subprocess.Popen(
            [sys.executable, "-c", "from zpipe.worker import main; main()"], stdin=subprocess.PIPE,
            start_new_session=False)
        # The plan holds only our own values (endpoints, and the stage cloudpickled by this process). It travels
        # over a private pipe to our own child: never over a socket.
        try:
            child.process.stdin.write(pickle.dumps(child.plan))
            child.process.stdin.close()
        except BrokenPipeError:  # the child died at once; its exit is noticed and reported like any other
            log.error("%s: worker exited before reading its plan", self.describe(name))
        child.pidfd = os.pidfd_open(child.process.pid) if hasattr(os, "pidfd_open") else None
        child.ready = False
        child.started_at = time.monotonic()

    @staticmethod
    def _close_pidfd(child: _Child) -> None:
        if child.pidfd is not None:
            os.close(child.pidfd)
            child.pidfd = None

    # -- control messages ----------------------------------------------------------------------------------------
    def describe(self, group: str) -> str:
        """A group as errors name it, with the stage it was running if it died: "stage 'x'", "group 'auto0'
        (stages a, b) while running stage 'b'"."""
        text = self.grouping.describe(group)
        stage = running_stage(self.board_dir, group)
        if stage is not None and len(self.grouping.groups[group]) > 1:
            text += f" while running stage {stage!r}"
        return text

    def culprit(self, group: str) -> str | None:
        """The stage to blame for a group's death: the one it was running, or its only stage."""
        stages = self.grouping.groups[group]
        return running_stage(self.board_dir, group) or (stages[0] if len(stages) == 1 else None)

    def handle_control(self) -> Message | None:
        """Read one control message from a worker; raises StageError when a worker reports a failed setup."""
        try:
            envelope, msg = recv_message(self.control, envelope_frames=1, flags=zmq.NOBLOCK)
        except zmq.Again:
            return None
        except ZpipeError as exc:
            log.warning("malformed control message: %s", exc)
            return None
        name = envelope[0].decode(errors="replace")
        child = self.children.get(name)
        if child is None:
            log.warning("control message from unknown worker %r", name)
            return None
        op = msg.meta.get("op")
        if op == "ready":
            child.ready = True
            log.info("%s ready (pid %s) in %.2fs", self.grouping.describe(name), msg.meta.get("pid"),
                     time.monotonic() - child.started_at)
        elif op == "failed":
            stage = msg.meta.get("stage")
            stage = stage if isinstance(stage, str) else name
            raise StageError(f"stage {stage!r}: setup() raised {msg.meta.get('error')}: {msg.meta.get('message')}\n"
                             f"{msg.meta.get('traceback', '')}", stage=stage)
        return msg

    # -- liveness ------------------------------------------------------------------------------------------------
    def sentinels(self) -> dict[int, str]:
        """pidfd -> group name, for polling alongside sockets (readable once the process has ended)."""
        return {c.pidfd: n for n, c in self.children.items() if c.pidfd is not None}

    def exited(self) -> list[str]:
        """Groups whose worker process has ended (for platforms without pidfd, polled by the I/O loop)."""
        return [n for n, c in self.children.items() if c.process is not None and c.process.poll() is not None]

    def on_exit(self, name: str) -> bool:
        """A worker ended unexpectedly: restart it if allowed. Returns False when it may not be restarted."""
        child = self.children[name]
        child.process.wait(timeout=1.0)
        log.error("%s: worker (pid %s) died with exit code %s", self.describe(name), child.process.pid,
                  child.process.returncode)
        if time.monotonic() - child.started_at > _STABLE_S:
            child.restarts = 0  # it ran well for a while: crashes long apart do not add up to "broken"
        if child.restarts >= self.max_restarts:
            self._close_pidfd(child)
            return False
        child.restarts += 1
        self._spawn(name)
        return True

    def pid_of(self, stage: str) -> int | None:
        """The process id of the worker hosting ``stage`` (None before it was spawned)."""
        process = self.children[self.grouping.group_of(stage)].process
        return process.pid if process is not None else None

    def exitcode(self, name: str) -> int | None:
        return self.children[name].process.poll()

    # -- stop ----------------------------------------------------------------------------------------------------
    def stop(self, timeout_s: float = 5.0) -> None:
        """Order every worker to stop, wait, then terminate and kill stragglers."""
        if self.control.closed:
            return
        for name, child in self.children.items():
            if child.process is not None and child.process.poll() is None:
                self._order(name, "stop")
        deadline = time.monotonic() + timeout_s
        for child in self.children.values():
            if child.process is None:
                continue
            try:
                child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in time; terminating", self.grouping.describe(child.plan.group))
                child.process.terminate()
                try:
                    child.process.wait(timeout=2.0)
                except subprocess.TimeoutExpired:
                    child.process.kill()
                    child.process.wait(timeout=2.0)
            self._close_pidfd(child)
        self.control.close(linger=0)

    def _order(self, name: str, op: str) -> None:
        try:
            send_message(self.control, Message(kind=Kind.CONTROL, request_id=0, meta={"op": op}),
                         envelope=[name.encode()], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # not connected (yet) or already gone
            log.debug("could not send %r to group %r: %s", op, name, exc)


def _group_nice(topology: Topology, group: str, stages: tuple[str, ...]) -> int:
    """A process has one priority: the highest nice its stages ask for (with a warning when they differ)."""
    asked = {name: topology.stage(name).nice for name in stages}
    if len(set(asked.values())) > 1:
        log.warning("group %r hosts stages asking for different nice values %s: it runs at %d; give the stage you "
                    "want at low priority a group of its own (group = \"...\")", group, asked, max(asked.values()))
    return max(asked.values())


def _stage_to_run(topology: Topology, spec: StageSpec) -> Stage:
    """The stage object a local worker runs for ``spec``: itself, or a remote stand-in when it is placed on an
    edge server (the stand-in forwards requests there and uploads the library first when asked)."""
    if spec.host == LOCAL_HOST:
        return spec.stage
    host = topology.host(spec.host)
    ping_s = host.ping_s
    if ping_s is None:  # automatic: only an offload policy needs the link's delay
        ping_s = AUTO_PING_S if any(getattr(s.stage, "policy_name", None) for s in topology.stages) else 0.0
    return resolve_kind("remote")(
        endpoint=list(host.endpoint) if isinstance(host.endpoint, tuple) else host.endpoint,
        model=spec.model or spec.name, version=spec.version, server_key=host.server_key,
        client_key=host.client_key, upload_library=getattr(spec.stage, "library", None) if spec.upload else None,
        timeout_s=host.timeout_s, heartbeat_s=host.heartbeat_s, input_names=[p for p, _ in spec.inputs],
        output_names=[p for p, _ in spec.outputs], host=host.name, fallback=spec.stage if spec.fallback else None,
        ping_s=ping_s)


def _watched_from(topology: Topology, grouping: Grouping) -> set[str]:
    """The stages whose figures an offload policy reads from another process: a policy gate reads its branches'
    first stages (a gate in the same process reads them from memory)."""
    group_of = grouping.group_of
    return {c for spec in topology.stages if getattr(spec.stage, "policy_name", None)
            for _, consumers in _consumers(topology, spec) for c in consumers if group_of(c) != group_of(spec.name)}


def _skip_shortcuts(topology: Topology, spec: StageSpec, grouping: Grouping,
                    endpoints: dict[str, str]) -> tuple[tuple[str, str, str, tuple[str, ...]], ...]:
    """For a gate: the routes whose skip notice may go straight to their branch's join (Topology.skip_shortcut), as
    StageSlot.skip_to. The join must be reachable from the gate's process: in it, or with a socket of its own."""
    if not spec.stage.may_skip_outputs:
        return ()
    out = []
    for consumer, tensors in topology.routes(spec.name).items():
        shortcut = topology.skip_shortcut(tensors) if consumer != SINK else None
        if shortcut is not None:
            join, into_join = shortcut
            if grouping.group_of(join) == grouping.group_of(spec.name) or join in endpoints:
                out.append((consumer, join, endpoints.get(join, ""), into_join))
    return tuple(out)


def _consumers(topology: Topology, spec: StageSpec) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """For each output port of ``spec``: the stages that read its tensor."""
    return tuple((port, tuple(s.name for s in topology.stages if tensor in s.tensors_in()))
                 for port, tensor in spec.outputs)
