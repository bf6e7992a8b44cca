"""The supported surface is deliberate: pinned exports, and imports that flow one way."""

from __future__ import annotations

import ast
from pathlib import Path

import zpipe

ROOT = Path(__file__).resolve().parents[1]

EXPORTED = {
    "ArtifactError", "Busy", "FramingError", "HostSpec", "Kind", "Limits", "Manifest", "Message", "PeerTimeout", "Pipeline",
    "PipelineClosed", "PythonStage", "MergeStage", "TvmStage", "RequestFailed", "Result", "Stage", "StageError",
    "StageSpec", "TensorSpec", "Topology", "TopologyError", "ZpipeError", "__version__",
}


def test_exported_members():
    assert set(zpipe.__all__) == EXPORTED
    for name in zpipe.__all__:
        assert getattr(zpipe, name) is not None


def _zpipe_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("zpipe."):
            found.add(node.module.split(".")[1])
    return found


# module -> zpipe modules it may import (the one-way flow of ../shared/STYLE.md)
ALLOWED = {
    "errors": set(),
    "framing": {"errors"},
    "manifest": {"errors"},
    "stage": {"errors"},
    "board": set(),
    "policy": {"errors"},
    "topology": {"errors", "grouping", "stage"},
    "grouping": {"errors", "topology"},
    "transport": {"errors", "framing"},
    "tvm_runtime": {"errors"},
    "runner": {"board", "errors", "framing", "stage"},
    "held": {"framing", "runner"},
    "worker": {"board", "errors", "framing", "held", "runner", "stage", "transport"},
    "supervisor": {"errors", "framing", "grouping", "stage", "topology", "transport", "worker"},
    "pipeline": {"board", "errors", "framing", "pipeline_metrics", "supervisor", "topology", "transport", "worker"},
    "pipeline_metrics": {"server_metrics"},
    "server_metrics": set(),
    "loadtest": {"errors", "loadtest_report"},
    "loadtest_report": {"loadtest"},
    "testing": {"errors", "stage"},
}


def test_imports_flow_one_way():
    for module, allowed in ALLOWED.items():
        used = _zpipe_imports(ROOT / "zpipe" / f"{module}.py")
        assert used <= allowed, f"zpipe/{module}.py imports {sorted(used - allowed)}, not allowed"


def test_stages_import_only_zpipe():
    """Built-in kinds use zpipe's API, numpy and the standard library: nothing reaches around the framework."""
    import sys

    allowed = {"zpipe", "numpy", "__future__"} | set(sys.stdlib_module_names)
    for path in (ROOT / "stages").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"


def test_no_unpickling_of_socket_data():
    """pickle is used only on the private pipe from parent to its own worker (zpipe/worker.py main())."""
    for path in list((ROOT / "zpipe").rglob("*.py")) + list((ROOT / "stages").glob("*.py")):
        text = path.read_text()
        assert "recv_pyobj" not in text and "recv_serialized" not in text, path
        if "pickle.loads" in text:
            assert path.name == "worker.py", f"{path} unpickles data"


def test_importing_zpipe_does_not_import_tvm():
    import subprocess
    import sys

    code = "import sys, zpipe, zpipe.cli; print('tvm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
