"""The ``tvm`` stage kind: run one exported TVM (Relax) library on its inputs, ports named by its manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from zpipe.errors import ArtifactError, StageError
from zpipe.framing import aligned_empty
from zpipe.manifest import Manifest, sha256_file
from zpipe.stage import Stage
from zpipe.tvm_runtime import import_tvm, load_vm

__all__ = ["TvmStage"]


class TvmStage(Stage):
    """Runs ``library`` (a ``.so`` from ``export_library``) with the Relax VM.

    ``manifest`` defaults to the library path with ``.json`` instead of ``.so``. Inputs are checked against the
    manifest (dtype and shape) and copied into 64-byte-aligned buffers that the stage owns and reuses for every
    request (TVM needs the alignment; received frames do not have it). The copy is one memcpy; reuse avoids paying
    first-touch page faults on every request.

    Outputs are not copied: each is a read-only numpy view of the tensor the VM returned (DLPack), which stays alive
    as long as the view does. An output that is one of the staging buffers (a model that returns an input as it is)
    is copied, since the next request overwrites those.
    """

    path_params = ("library", "manifest")

    def __init__(self, *, library: str, manifest: str | None = None, device: str = "cpu") -> None:
        lib = Path(library)
        if not lib.is_file():
            raise ArtifactError(f"TVM library {library!r} does not exist; compile the stage first "
                                "(zpipe compile, or zpipe demo for the demo model)")
        self.manifest_path = str(Path(manifest) if manifest else lib.with_suffix(".json"))
        self.manifest = Manifest.load(self.manifest_path)
        if self.manifest.library_sha256 and sha256_file(lib) != self.manifest.library_sha256:
            raise ArtifactError(f"TVM library {library!r} does not match its manifest {self.manifest_path!r} "
                                "(sha256 differs): recompile, or fix the manifest")
        self.library = str(lib)
        self.device = device
        self.input_names = tuple(t.name for t in self.manifest.inputs)
        self.output_names = tuple(t.name for t in self.manifest.outputs)

    def setup(self) -> None:
        self._tvm = import_tvm()
        self._vm = load_vm(self.library, self.device)
        self._fn = self._vm[self.manifest.function]
        self._staging = {t.name: aligned_empty(t.shape, t.dtype) for t in self.manifest.inputs}
        self._dev_inputs = [self._tvm.runtime.from_dlpack(self._staging[t.name]) for t in self.manifest.inputs]

    def process(self, inputs: Mapping[str, np.ndarray]):
        for spec in self.manifest.inputs:
            array = inputs[spec.name]
            try:
                spec.check(self.manifest.name, array)
            except ValueError as exc:
                raise StageError(str(exc), stage=self.manifest.name) from None
            np.copyto(self._staging[spec.name], array)
        out = self._fn(*self._dev_inputs)
        values = [out] if len(self.manifest.outputs) == 1 and not isinstance(out, (tuple, list)) else list(out)
        if len(values) != len(self.manifest.outputs):
            raise StageError(f"library {self.library!r} returned {len(values)} outputs, manifest lists "
                             f"{len(self.manifest.outputs)}", stage=self.manifest.name)
        return {spec.name: self._to_numpy(value) for spec, value in zip(self.manifest.outputs, values)}

    def _to_numpy(self, value) -> np.ndarray:
        if self.device != "cpu":
            return value.numpy()
        array = np.from_dlpack(value)
        if any(np.may_share_memory(array, buffer) for buffer in self._staging.values()):
            return array.copy()
        array.flags.writeable = False  # it may be the VM's constant, or travel zero-copy: nobody writes to it
        return array

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_tvm", "_vm", "_fn", "_staging", "_dev_inputs")}
