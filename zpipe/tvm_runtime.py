"""Lazy TVM loading: the only place outside ``zpipe.compile`` that imports ``tvm``.

``import tvm`` costs about a second and ~200 MB per process, so it happens in the worker's ``setup()``, never at
import time of zpipe.
"""

from __future__ import annotations

from typing import Any

from .errors import ArtifactError, ZpipeError

__all__ = ["import_tvm", "load_vm", "device"]


def import_tvm():
    """Import and return the ``tvm`` module, or raise ZpipeError with an install hint."""
    try:
        import tvm
        from tvm import relax  # noqa: F401  (Relax VM lives here)
    except ImportError as exc:
        raise ZpipeError("TVM is not installed: pip install 'apache-tvm==0.27.0.post1' "
                         "'apache-tvm-ffi==0.1.14.post0'") from exc
    return tvm


def device(name: str) -> Any:
    """The TVM device for ``"cpu"`` or ``"cuda"`` (``"cuda:1"`` for another GPU)."""
    tvm = import_tvm()
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda"):
        raise ZpipeError(f"device {name!r} is not 'cpu' or 'cuda[:N]'")
    dev = tvm.cpu(int(index or 0)) if kind == "cpu" else tvm.cuda(int(index or 0))
    if not dev.exist:
        raise ZpipeError(f"device {name!r} is not present on this machine")
    return dev


def load_vm(library: str, device_name: str = "cpu") -> Any:
    """Load an exported Relax library and return a ``relax.VirtualMachine`` on the given device."""
    tvm = import_tvm()
    try:
        module = tvm.runtime.load_module(library)
    except Exception as exc:  # TVM raises its own error types
        raise ArtifactError(f"cannot load TVM library {library!r}: {exc}") from exc
    return tvm.relax.VirtualMachine(module, device(device_name))
