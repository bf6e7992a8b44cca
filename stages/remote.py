"""The ``remote`` stage kind: the device-side stand-in for a stage that runs on an edge server.

A stage placed on a host from the topology's ``[hosts]`` runs through this stand-in (zpipe builds it; a topology
may also name ``kind = "remote"`` directly). Requests go to the server over one connection with many in flight
(the worker keeps taking work while replies are pending, up to ``max_in_flight``); each carries its remaining
deadline. With ``upload``, the stand-in sends the compiled library to the server during setup (the server must
run with ``--allow-upload`` and know our key); otherwise the model must be in the server's repository.
A request the gate routes elsewhere never reaches this stage, so nothing is sent to the server for it.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from typing import Any, Mapping

import numpy as np

from zpipe.errors import ArtifactError, StageError
from zpipe.stage import Stage

__all__ = ["RemoteStage"]


class RemoteStage(Stage):
    path_params = ("server_key", "client_key", "upload_library")

    def __init__(self, *, endpoint: str | None = None, model: str | None = None, version: int | None = None, server_key: str | None = None,
                 client_key: str | None = None, upload_library: str | None = None, timeout_s: float = 30.0,
                 heartbeat_s: float = 1.0, max_in_flight: int = 64, input_names: list[str] | None = None,
                 output_names: list[str] | None = None, host: str | None = None) -> None:
        self.endpoint = endpoint
        self.model = model
        self.version = version
        self.server_key, self.client_key = server_key, client_key
        self.upload_library = upload_library
        self.timeout_s = timeout_s
        self.heartbeat_s = heartbeat_s
        self.max_in_flight = max_in_flight
        self.input_names = tuple(input_names) if input_names else None
        self.output_names = tuple(output_names) if output_names else None
        self.host = host or endpoint

    def setup(self) -> None:
        from zpipe.client import RemoteClient

        if not self.endpoint or not self.model:
            raise StageError("a remote stage needs an endpoint and a model: place it on a host from [hosts] "
                             "(host = \"edge\") or give endpoint and model")
        self.client = RemoteClient(self.endpoint, server_key=self.server_key, client_key=self.client_key,
                                   timeout_s=self.timeout_s, heartbeat_s=self.heartbeat_s).start()
        if self.upload_library:
            self.version = self.client.upload(self.model, self.upload_library)
            deadline = time.monotonic() + self.timeout_s
            while self._served_version() != self.version:  # the server loads it in the background
                if time.monotonic() > deadline:
                    raise ArtifactError(f"server {self.host!r} stored model {self.model!r} version {self.version} "
                                        f"but did not load it within {self.timeout_s:g}s")
                time.sleep(0.05)
            return
        served = self._served_version()
        if served is None or (self.version is not None and served != self.version):
            wanted = f"version {self.version}" if self.version is not None else "any version"
            health = self.client.health()
            raise ArtifactError(f"model {self.model!r} ({wanted}) is not on server {self.host!r} "
                                f"({self.endpoint}); it serves {health.get('models')}"
                                + (f"; {health.get('error:' + self.model)}" if health.get("error:" + self.model)
                                   else "") + ". Put it in the server's repository, or set upload = true")

    def _served_version(self) -> int | None:
        health = self.client.health(timeout_s=self.timeout_s)
        return health.get(f"version:{self.model}")

    def handle(self, inputs: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> Future:
        deadline = meta.get("deadline")
        timeout = self.timeout_s
        if isinstance(deadline, (int, float)):  # the request's own deadline, if it is sooner
            timeout = min(timeout, deadline - time.monotonic())
        if timeout <= 0:
            raise StageError(f"request reached remote stage for {self.model!r} after its deadline; not sent")
        outer: Future = Future()
        inner = self.client.submit(self.model, inputs, version=self.version, timeout_s=timeout)

        def relay(f: Future) -> None:
            exc = f.exception()
            if exc is not None:
                outer.set_exception(exc)
            else:
                outer.set_result(f.result().outputs)

        inner.add_done_callback(relay)
        return outer

    def process(self, inputs: Mapping[str, np.ndarray]) -> Any:
        return self.handle(inputs, {}).result()

    def teardown(self) -> None:
        self.client.close()

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "client"}
