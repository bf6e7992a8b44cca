"""Every example checks its own result; run them as a user would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, timeout=300)


def test_embed_basic():
    proc = run("embed_basic.py")
    assert proc.returncode == 0, proc.stderr
    assert "50 pipelined requests ok" in proc.stdout
    assert "failed in stage 'check'" in proc.stdout


@pytest.mark.tvm
def test_run_demo_topology(tmp_path):
    pytest.importorskip("tvm")
    proc = run("run_demo_topology.py", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "max |pipeline - whole model|" in proc.stdout


@pytest.mark.tvm
def test_offload_demo(tmp_path):
    pytest.importorskip("tvm")
    proc = run("offload_demo.py", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "link carried 0 bytes up, server saw 0 requests" in proc.stdout
    assert "outputs match the whole model both ways" in proc.stdout



@pytest.mark.tvm
def test_many_stages(tmp_path):
    pytest.importorskip("onnxruntime")
    proc = run("many_stages.py", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "46 stages: first result" in proc.stdout and "max |zpipe - onnxruntime|" in proc.stdout
    assert "worker processes on device for 46 stages" in proc.stdout
