"""Shared fixtures: real ZeroMQ contexts that fail the test when a socket leaks, and small topology builders."""

from __future__ import annotations

import threading

import pytest
import zmq


@pytest.fixture
def ctx():
    """A context whose sockets must all be closed by the test: term() under a timeout catches leaks."""
    context = zmq.Context()
    yield context
    done = threading.Event()

    def term():
        context.term()
        done.set()

    thread = threading.Thread(target=term, daemon=True)
    thread.start()
    if not done.wait(5.0):
        context.destroy(linger=0)
        pytest.fail("zmq context did not terminate within 5 s: a socket was left open")


@pytest.fixture(params=["inproc", "ipc", "tcp"])
def endpoint(request, tmp_path):
    """One bindable endpoint per transport; tcp binds a free port on 127.0.0.1."""
    if request.param == "inproc":
        return f"inproc://t-{id(request)}"
    if request.param == "ipc":
        return f"ipc://{tmp_path}/sock"
    return "tcp://127.0.0.1:*"
