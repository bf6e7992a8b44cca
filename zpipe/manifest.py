"""Stage manifests: the JSON file beside a compiled stage library that says what it takes and returns.

    {"format": "zpipe-stage/1", "name": "stem", "library": "stem.so", "function": "main",
     "inputs":  [{"name": "x", "dtype": "float32", "shape": [1, 3, 32, 32]}],
     "outputs": [{"name": "h", "dtype": "float32", "shape": [1, 8, 32, 32]}],
     "target": "llvm", "library_sha256": "..."}

``library`` is relative to the manifest's folder. ``library_sha256`` lets a loader (and the edge server, for
uploads) refuse a library that is not the one the manifest describes. Pure stdlib + numpy; no TVM here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import ArtifactError

__all__ = ["TensorSpec", "Manifest", "sha256_file", "MANIFEST_FORMAT"]

MANIFEST_FORMAT = "zpipe-stage/1"


@dataclass(frozen=True, kw_only=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]

    def check(self, stage: str, array: np.ndarray) -> None:
        """Raise ValueError naming the stage and tensor when ``array`` does not match this spec."""
        if array.dtype != np.dtype(self.dtype) or tuple(array.shape) != self.shape:
            raise ValueError(f"stage {stage!r} input {self.name!r} expects {self.dtype}{list(self.shape)}, "
                             f"got {array.dtype}{list(array.shape)}")


@dataclass(frozen=True, kw_only=True)
class Manifest:
    name: str
    library: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    function: str = "main"
    target: str = "llvm"
    library_sha256: str = ""
    format: str = MANIFEST_FORMAT

    @classmethod
    def load(cls, path: str | Path) -> "Manifest":
        path = Path(path)
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise ArtifactError(f"manifest {str(path)!r} does not exist; compile the stage first "
                                "(zpipe compile, or zpipe demo for the demo model)") from None
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"manifest {str(path)!r} is unreadable or not JSON: {exc}") from exc
        try:
            if doc.get("format") != MANIFEST_FORMAT:
                raise ArtifactError(f"manifest {str(path)!r} has format {doc.get('format')!r}, "
                                    f"expected {MANIFEST_FORMAT!r}")
            specs = {key: tuple(TensorSpec(name=t["name"], dtype=str(np.dtype(t["dtype"])),
                                           shape=tuple(int(d) for d in t["shape"])) for t in doc[key])
                     for key in ("inputs", "outputs")}
            return cls(name=doc["name"], library=doc["library"], function=doc.get("function", "main"),
                       target=doc.get("target", "llvm"), library_sha256=doc.get("library_sha256", ""), **specs)
        except ArtifactError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ArtifactError(f"manifest {str(path)!r} is malformed: {type(exc).__name__}: {exc}") from exc

    def save(self, path: str | Path) -> None:
        doc = asdict(self)
        Path(path).write_text(json.dumps(doc, indent=2) + "\n")


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
