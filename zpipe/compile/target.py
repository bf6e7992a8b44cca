"""What the stages are compiled for: this host's CPU (``llvm``), a CUDA GPU (``cuda``), or another CPU (a triple).

* ``llvm`` (the default): LLVM for this machine's CPU, with its features (``mcpu`` from the host) and core count.
* ``cuda``: needs a CUDA GPU present at compile time; the stages' topology entries get ``device = "cuda"``.
* ``<arch>-<vendor>-<os>`` (e.g. ``aarch64-linux-gnu``): cross-compile for another CPU. LLVM generates the code,
  but linking the stage ``.so`` needs a C++ cross compiler for that triple (``--cc``, default ``<triple>-g++`` on
  PATH, e.g. from the ``g++-aarch64-linux-gnu`` package); the libraries then run on that machine, not here, and
  cannot be tuned here (tuning runs candidates on the target).
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from typing import Any

from .errors import CompileError

__all__ = ["TargetSpec", "parse_target"]

_TRIPLE_RE = re.compile(r"^[a-z0-9_]+(-[A-Za-z0-9_.]+){1,3}$")


@dataclass(frozen=True, kw_only=True)
class TargetSpec:
    """A parsed ``--target``: ``kind`` is ``llvm``, ``cuda`` or ``cross``; ``triple``/``cc`` for cross targets;
    ``mcpu`` overrides the CPU model (default: this host's for ``llvm``, generic for cross targets)."""

    kind: str
    triple: str | None = None
    mcpu: str | None = None
    cc: str | None = None

    @property
    def label(self) -> str:
        return self.triple if self.kind == "cross" else self.kind

    @property
    def device(self) -> str:
        """The ``device`` the tvm stage kind uses to run these libraries."""
        return "cuda" if self.kind == "cuda" else "cpu"

    @property
    def runs_here(self) -> bool:
        return self.kind != "cross"

    def tvm_target(self) -> Any:
        """The ``tvm.target.Target``; raises CompileError when the device or the triple's backend is missing."""
        from ..tvm_runtime import import_tvm

        tvm = import_tvm()
        if self.kind == "cuda":
            if not tvm.cuda(0).exist:
                raise CompileError("--target cuda: no CUDA GPU is present on this machine (tvm.cuda(0) does not "
                                   "exist); compile with --target llvm, or on a machine with the GPU")
            return tvm.target.Target(tvm.target.Target.from_device(tvm.cuda(0)), host=_host(tvm, None))
        if self.kind == "cross":
            arch = self.triple.split("-")[0]
            known = [str(t) for t in tvm.target.codegen.llvm_get_targets()]
            if arch not in known:
                raise CompileError(f"--target {self.triple}: LLVM in this TVM build has no backend for {arch!r}; "
                                   f"known architectures: {', '.join(known)}")
            config = {"kind": "llvm", "mtriple": self.triple}
            if self.mcpu:
                config["mcpu"] = self.mcpu
            return tvm.target.Target(config)
        return _host(tvm, self.mcpu)

    def fcompile(self) -> Any:
        """The ``fcompile`` for ``export_library``: None (the host compiler) or the cross compiler."""
        if self.kind != "cross":
            return None
        from tvm.support import cc as tvm_cc

        return tvm_cc.cross_compiler(self.cc)


def parse_target(text: str, *, mcpu: str | None = None, cc: str | None = None) -> TargetSpec:
    """Parse ``--target`` (``llvm``, ``cuda`` or an LLVM triple), with ``--mcpu`` and ``--cc``.

    A cross target's compiler is looked up now (``cc``, else ``<triple>-g++`` on PATH), so a missing one fails
    before anything is compiled.
    """
    text = text.strip()
    if text in ("llvm", "cpu", "host"):
        return TargetSpec(kind="llvm", mcpu=mcpu)
    if text == "cuda":
        return TargetSpec(kind="cuda")
    if not _TRIPLE_RE.match(text):
        raise CompileError(f"--target {text!r} is not 'llvm', 'cuda' or an LLVM target triple such as "
                           "'aarch64-linux-gnu'")
    compiler = cc or f"{text}-g++"
    found = shutil.which(compiler) if not os.path.isabs(compiler) else (compiler if os.path.exists(compiler)
                                                                       else None)
    if found is None:
        raise CompileError(f"--target {text}: linking the stage libraries for {text!r} needs a C++ cross compiler, "
                           f"and {compiler!r} was not found; install one (e.g. apt install g++-"
                           f"{text.replace('_', '-')}) or pass --cc PATH")
    return TargetSpec(kind="cross", triple=text, mcpu=mcpu, cc=found)


def _host(tvm: Any, mcpu: str | None) -> Any:
    config = dict(tvm.target.Target.from_device(tvm.cpu()).export())
    config["num-cores"] = os.cpu_count() or 1
    if mcpu:
        config["mcpu"] = mcpu
    config.pop("keys", None)
    config.pop("tag", None)
    return tvm.target.Target(config)
