"""The edge server's model repository: versioned compiled stages on disk, loaded into worker pools, hot-swapped.

Layout (what `zpipe compile` and uploads produce)::

    REPO/<model>/<version>/<name>.so      version: a positive integer directory name
    REPO/<model>/<version>/<name>.json    the stage manifest (zpipe.manifest), exactly one per version

The newest version that loads is served. A version directory that appears later is loaded in the background and
swapped in when ready; requests already running on the old version finish there (its pools drain), so a swap fails
no request. A version that fails to load is reported (state ``failed`` with the error) and the previous version
keeps serving; it is retried only when its directory changes.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .board import Ewma
from .errors import ArtifactError, Busy, PeerTimeout, PipelineClosed, ZpipeError
from .manifest import Manifest
from .pipeline import Pipeline, Result
from .topology import StageSpec, Topology

__all__ = ["Repository", "ModelVersion", "ModelStatus"]

log = logging.getLogger(__name__)

_WARM_UP_S = 60.0  # a loaded version's warm-up run may take this long


@dataclass
class ModelVersion:
    """One loaded version of a model: its manifest and where it runs.

    ``pools``: single-stage pipelines, one worker process each (isolation: a crash in native code costs a
    worker, not the server). ``threads``: stage instances in the server process, run on a thread pool or by the
    server's loop itself (TVM releases the GIL while it computes, measured here): no ipc hops.
    """

    model: str
    version: int
    manifest: Manifest
    pools: list[Pipeline] = field(default_factory=list)
    threads: "_InProcess | None" = None

    def submit(self, tensors: dict, *, timeout_s: float) -> Future:
        """Start one request; raises Busy when every worker has max_in_flight requests, PipelineClosed if closed."""
        if self.threads is not None:
            return self.threads.submit(tensors, timeout_s)
        healthy = [p for p in self.pools if p.healthy]
        if not healthy:
            raise ArtifactError(f"model {self.model!r} version {self.version}: every worker died repeatedly "
                                "(see the server log); it is not served until a new version loads")
        pipe = min(healthy, key=lambda p: p.stats()["in_flight"])
        return pipe.submit(tensors, timeout_s=timeout_s, block=False)

    def close(self, drain_timeout_s: float) -> None:
        for pipe in self.pools:
            pipe.close(drain_timeout_s=drain_timeout_s)
        if self.threads is not None:
            self.threads.close(drain_timeout_s)


class _InProcess:
    """Runs a stage in the server's own process: ``threads`` stage instances, each running one request at a time,
    and a thread pool of that size. The server's loop may also run a request itself on an idle instance
    (:meth:`run_here`): for a fast model, the two thread hand-offs cost more than the model."""

    def __init__(self, stage_factory, *, threads: int, max_in_flight: int) -> None:
        self._lock = threading.Lock()
        self._in_flight = 0
        self._max = max_in_flight
        self._closed = False
        self._stages: list = []
        try:  # all built now, so a broken library fails the version here (and the old one keeps serving)
            for _ in range(threads):
                stage = stage_factory()
                stage.setup()
                self._stages.append(stage)
        except BaseException:
            self._teardown()
            raise
        self._idle: queue.SimpleQueue = queue.SimpleQueue()
        for stage in self._stages:
            self._idle.put(stage)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="zpipe-model")
        self._run_time = Ewma(0.2)

    @property
    def run_s(self) -> float | None:
        """Smoothed time of one request, once one has run."""
        return self._run_time.mean

    def warm_up(self, tensors: dict) -> list[Future]:
        """Run ``tensors`` once on every stage instance, on the pool's threads."""
        return [self._pool.submit(stage.process, tensors) for stage in self._stages]

    def submit(self, tensors: dict, timeout_s: float) -> Future:
        with self._lock:
            if self._closed:
                raise PipelineClosed("this model version was replaced or the server is stopping")
            if self._in_flight >= self._max:
                raise Busy(f"{self._in_flight} requests in flight")
            self._in_flight += 1
            # Inside the lock: close() cannot shut the executor down between the check and the submit.
            return self._pool.submit(self._run, tensors, time.monotonic() + timeout_s)

    def run_here(self, tensors: dict, deadline: float) -> Result | None:
        """Run one request on the calling thread if a stage instance is idle; None (nothing run) if none is."""
        with self._lock:
            if self._closed:
                raise PipelineClosed("this model version was replaced or the server is stopping")
            try:
                stage = self._idle.get_nowait()
            except queue.Empty:
                return None
            self._in_flight += 1
        try:
            return self._process(stage, tensors, deadline)
        finally:
            self._release(stage)

    def _run(self, tensors: dict, deadline: float) -> Result:
        """A pool thread's task (counted in ``_in_flight`` by submit)."""
        stage = self._idle.get()  # only the loop's run_here can hold one past this pool's size, briefly
        try:
            return self._process(stage, tensors, deadline)
        finally:
            self._release(stage)

    def _process(self, stage, tensors: dict, deadline: float) -> Result:
        started = time.monotonic()
        if started > deadline:
            raise PeerTimeout("the request's deadline passed before a thread was free; not run", reason="timeout")
        outputs = stage.process(tensors)
        elapsed = time.monotonic() - started
        self._run_time.add(elapsed)
        return Result(request_id=0, outputs=outputs, latency_s=elapsed)

    def _release(self, stage) -> None:
        self._idle.put(stage)
        with self._lock:
            self._in_flight -= 1

    def close(self, drain_timeout_s: float) -> None:
        with self._lock:
            self._closed = True
            self._pool.shutdown(wait=False)  # no new work from here on; what is queued still runs
        self._pool.shutdown(wait=True)  # the drain: running and queued requests finish
        for _ in self._stages:  # and a request the server's loop is running itself (run_here)
            try:
                self._idle.get(timeout=max(drain_timeout_s, 1.0))
            except queue.Empty:
                log.warning("a stage instance was still running at the end of the drain")
        self._teardown()

    def _teardown(self) -> None:
        for stage in self._stages:
            try:
                stage.teardown()
            except Exception:
                log.exception("teardown failed")


@dataclass
class ModelStatus:
    state: str = "loading"  # loading | available | failed
    version: int | None = None  # the version being served
    error: str = ""  # why the newest version failed to load, if it did
    failed: dict[int, float] = field(default_factory=dict)  # version -> directory mtime when it failed


class Repository:
    """Scans ``root`` for models and versions and keeps the newest loadable version of each one serving.

    Thread-safe: the server's loop calls :meth:`get` while a background thread loads and swaps versions.
    """

    def __init__(self, root: str | Path, *, workers: int = 1, max_in_flight: int = 64, poll_s: float = 2.0,
                 start_timeout_s: float = 120.0, drain_timeout_s: float = 30.0, isolation: str = "process") -> None:
        if isolation not in ("process", "thread"):
            raise ZpipeError(f"isolation must be 'process' or 'thread', got {isolation!r}")
        self.isolation = isolation
        self.root = Path(root)
        if not self.root.is_dir():
            raise ArtifactError(f"model repository {str(self.root)!r} is not a directory")
        self.workers = workers
        self.max_in_flight = max_in_flight
        self.poll_s = poll_s
        self.start_timeout_s = start_timeout_s
        self.drain_timeout_s = drain_timeout_s
        self._lock = threading.Lock()
        self._serving: dict[str, ModelVersion] = {}
        self._status: dict[str, ModelStatus] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()  # scan now rather than at the next poll
        self._scan_lock = threading.Lock()  # one scan at a time: a version is never loaded twice
        self._scanned = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------------------------
    def start(self, *, wait: bool = True) -> None:
        """Start the background loader; with ``wait``, return after the first scan has loaded what it could."""
        self._thread = threading.Thread(target=self._run, name="zpipe-repository", daemon=True)
        self._thread.start()
        if wait:
            self._scanned.wait()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self.start_timeout_s + 5)
        with self._lock:
            serving, self._serving = list(self._serving.values()), {}
        for mv in serving:
            mv.close(self.drain_timeout_s)

    # -- queries -------------------------------------------------------------------------------------------------
    def get(self, model: str, version: int | None = None) -> ModelVersion:
        """The serving version of ``model`` (or exactly ``version``); raises ZpipeError naming what is missing."""
        with self._lock:
            mv = self._serving.get(model)
            status = self._status.get(model)
        if mv is None:
            if status is not None and status.state == "loading":
                raise Busy(f"model {model!r} is still loading")
            known = sorted(self._status)
            why = f": {status.error}" if status is not None and status.error else ""
            raise ArtifactError(f"model {model!r} is not available on this server{why}; it serves {known}")
        if version is not None and version != mv.version:
            raise ArtifactError(f"model {model!r} version {version} is not on this server; it serves version "
                                f"{mv.version}")
        return mv

    def status(self) -> dict[str, ModelStatus]:
        with self._lock:
            return {name: ModelStatus(state=s.state, version=s.version, error=s.error)
                    for name, s in self._status.items()}

    def ready(self) -> bool:
        """Every model found in the repository has a version serving."""
        with self._lock:
            return bool(self._status) and all(s.version is not None for s in self._status.values())

    def scan_now(self) -> None:
        """Scan once, synchronously (the loader thread also scans every ``poll_s``)."""
        with self._scan_lock:
            for model_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
                self._consider(model_dir)

    def request_scan(self) -> None:
        """Ask the loader thread to scan now (returns at once: loading never blocks the caller)."""
        self._wake.set()

    # -- loading -------------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.scan_now()
            except Exception:
                log.exception("repository scan failed")
            self._scanned.set()
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def _consider(self, model_dir: Path) -> None:
        model = model_dir.name
        with self._lock:
            status = self._status.setdefault(model, ModelStatus())
            current = self._serving.get(model)
        versions = sorted((int(p.name), p) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
        for version, path in reversed(versions):
            if current is not None and version <= current.version:
                return  # nothing newer than what is serving
            mtime = path.stat().st_mtime
            if status.failed.get(version) == mtime:
                continue  # failed before and unchanged: try an older one
            try:
                mv = self._load(model, version, path)
            except Exception as exc:
                log.error("model %r version %d failed to load: %s", model, version, exc)
                with self._lock:
                    status.failed[version] = mtime
                    status.error = f"version {version}: {exc}"
                    status.state = "available" if current is not None else "failed"
                continue
            self._swap(mv, status)
            return
        if current is None and status.state == "loading":
            with self._lock:
                status.state = "failed"
                status.error = status.error or f"no loadable version under {str(model_dir)!r}"

    def _load(self, model: str, version: int, path: Path) -> ModelVersion:
        manifests = sorted(path.glob("*.json"))
        if len(manifests) != 1:
            raise ArtifactError(f"{str(path)!r} must hold exactly one stage manifest (*.json), found "
                                f"{[m.name for m in manifests]}")
        manifest = Manifest.load(manifests[0])
        from .stage import resolve_kind

        def make_stage():
            return resolve_kind("tvm")(library=str(path / manifest.library), manifest=str(manifests[0]))

        stage = make_stage()  # checks the files and the manifest's hash here
        if self.isolation == "thread":
            started = time.monotonic()
            threads = _InProcess(make_stage, threads=self.workers, max_in_flight=self.max_in_flight)
            mv = ModelVersion(model=model, version=version, manifest=manifest, threads=threads)
            _warm_up(mv, lambda zeros: threads.warm_up(zeros))
            log.info("model %r version %d loaded in-process in %.2fs (%d threads)", model, version,
                     time.monotonic() - started, self.workers)
            return mv
        topology = Topology(name=f"{model}@{version}", inputs=[t.name for t in manifest.inputs],
                            outputs=[t.name for t in manifest.outputs], max_in_flight=self.max_in_flight,
                            stages=[StageSpec(name=_stage_name(model), stage=stage,
                                              inputs=[t.name for t in manifest.inputs],
                                              outputs=[t.name for t in manifest.outputs])])
        started = time.monotonic()
        pools: list[Pipeline] = []
        try:
            for _ in range(self.workers):
                pools.append(Pipeline(topology, start_timeout_s=self.start_timeout_s).start())
        except BaseException:
            for pipe in pools:
                pipe.close(drain_timeout_s=0)
            raise
        mv = ModelVersion(model=model, version=version, manifest=manifest, pools=pools)
        _warm_up(mv, lambda zeros: [pipe.submit(zeros, timeout_s=_WARM_UP_S) for pipe in pools])
        log.info("model %r version %d loaded in %.2fs (%d workers)", model, version, time.monotonic() - started,
                 self.workers)
        return mv

    def _swap(self, mv: ModelVersion, status: ModelStatus) -> None:
        with self._lock:
            old = self._serving.get(mv.model)
            self._serving[mv.model] = mv
            status.state, status.version = "available", mv.version
            if status.error.startswith(f"version {mv.version}:"):
                status.error = ""
        if old is not None:
            log.info("model %r: version %d replaces %d; draining the old one", mv.model, mv.version, old.version)
            threading.Thread(target=old.close, args=(self.drain_timeout_s,), daemon=True,
                             name=f"zpipe-drain-{mv.model}-{old.version}").start()


def _warm_up(mv: ModelVersion, run_everywhere) -> None:
    """Run every worker (process or thread) once on zeros before the version is served: its first request does not
    pay the first call's cost (TVM resolves kernels and allocates then: ~7 ms here), and a library that loads but
    fails to run fails the version (the previous one keeps serving) instead of the first real request.
    ``run_everywhere(zeros)`` returns one future per worker."""
    zeros = {t.name: np.zeros(t.shape, np.dtype(t.dtype)) for t in mv.manifest.inputs}
    try:
        for future in run_everywhere(zeros):
            future.result(timeout=_WARM_UP_S)
    except Exception as exc:
        mv.close(drain_timeout_s=0)
        raise ArtifactError(f"model {mv.model!r} version {mv.version} loaded but failed its warm-up run on "
                            f"zeros: {exc}") from exc


def _stage_name(model: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "_.-" else "_" for c in model)
    return cleaned if cleaned[:1].isalpha() or cleaned[:1] == "_" else f"m_{cleaned}"

