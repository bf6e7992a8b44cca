"""The zpipe command as a user runs it: real subprocesses, real topologies, exit codes, SIGTERM drain."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "topologies" / "toy-branches.toml"


def zpipe(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zpipe", *map(str, args)], capture_output=True, text=True,
                          timeout=120, **kw)


def test_validate_prints_the_plan():
    proc = zpipe("validate", TOY)
    assert proc.returncode == 0, proc.stderr
    assert "pipeline 'toy-branches'" in proc.stdout
    assert proc.stdout.index("stem") < proc.stdout.index("join")


def test_validate_error_exit_code_and_message(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(TOY.read_text().replace("max_in_flight", "max_inflight"))
    proc = zpipe("validate", bad)
    assert proc.returncode == 3
    assert "unknown key 'max_inflight'; did you mean 'max_in_flight'" in proc.stderr


def test_run_writes_outputs_and_summary(tmp_path):
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.savez(tmp_path / "in.npz", x=x)
    proc = zpipe("run", TOY, "--inputs", tmp_path / "in.npz", "--out", tmp_path / "out.npz", "--requests", 50,
                 "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["sent"] == summary["ok"] == 50 and summary["failed"] == 0
    assert summary["p50_ms"] > 0 and summary["p99_ms"] >= summary["p50_ms"]
    with np.load(tmp_path / "out.npz") as out:
        np.testing.assert_allclose(out["y"], (2 * x) + (2 * x + 1))


def test_run_with_wrong_inputs_names_them(tmp_path):
    np.savez(tmp_path / "in.npz", z=np.zeros(2))
    proc = zpipe("run", TOY, "--inputs", tmp_path / "in.npz")
    assert proc.returncode == 3
    assert "missing ['x'], unexpected ['z']" in proc.stderr


def test_run_names_a_metrics_port_in_use_and_bench_refuses_it_for_a_server(tmp_path):
    import socket

    np.savez(tmp_path / "in.npz", x=np.zeros((3, 4), np.float32))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = zpipe("run", TOY, "--inputs", tmp_path / "in.npz", "--metrics-port", port)
    assert proc.returncode != 0
    assert f"cannot serve metrics on 127.0.0.1:{port}: Address already in use" in proc.stderr, proc.stderr
    proc = zpipe("bench", "run", "--endpoint", "tcp://127.0.0.1:1", "--model", "m", "--metrics-port", 9100)
    assert proc.returncode == 2
    assert "--metrics-port serves a topology's metrics" in proc.stderr, proc.stderr


def test_sigterm_drains_and_accounts_for_every_request(tmp_path):
    slow = tmp_path / "slow.toml"
    slow.write_text(TOY.read_text().replace("seconds = 0.005", "seconds = 0.05").replace("max_in_flight = 32",
                                                                                         "max_in_flight = 4"))
    np.savez(tmp_path / "in.npz", x=np.ones(4, dtype=np.float32))
    proc = subprocess.Popen([sys.executable, "-m", "zpipe", "run", str(slow), "--inputs", str(tmp_path / "in.npz"),
                             "--requests", "10000", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    time.sleep(4.0)  # workers start, requests flow
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert 0 < summary["sent"] < 10000
    assert summary["sent"] == summary["ok"] + summary["failed"]  # drained: nothing in flight was lost
    assert summary["failed"] == 0, summary
