"""The device's CPU load under a CPU quota (a container's limit): a real cgroup, real processes."""

import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

CHILD = textwrap.dedent("""
    import json, sys, threading, time
    from zpipe.board import CpuLoad, _quota
    load = CpuLoad()
    load()
    time.sleep(0.6)
    idle = load()
    threading.Thread(target=lambda: [None for _ in iter(int, 1)], daemon=True).start()  # spins for ever
    time.sleep(0.6)
    load()
    time.sleep(0.6)
    print(json.dumps({"quota": [str(q) for q in _quota()], "idle": idle, "busy": load()}))
""")


def _make_cgroup() -> tuple[Path, float] | None:
    """A cgroup limited to 25 % of one CPU (v2 cpu.max, or v1 cpu.cfs_quota_us): (directory, quota period in s)."""
    root = Path("/sys/fs/cgroup")
    name = f"zpipe-test-{uuid.uuid4().hex[:8]}"
    try:
        v2 = (root / "cgroup.controllers").exists()
        if v2 and "cpu" in (root / "cgroup.controllers").read_text().split():
            (root / "cgroup.subtree_control").write_text("+cpu")
            directory = root / name
            directory.mkdir()
            (directory / "cpu.max").write_text("25000 100000")
            return directory, 0.1
        else:
            directory = root / "cpu" / name
            directory.mkdir()
            (directory / "cpu.cfs_period_us").write_text("10000")
            (directory / "cpu.cfs_quota_us").write_text("2500")
            return directory, 0.01
    except OSError:
        return None


def test_under_a_cpu_quota_the_load_is_the_quotas_not_the_hosts():
    """A process that spins in a container limited to 25 % of one CPU has its device fully busy, while the host
    (2 cores) is mostly idle: the load is the share of quota periods it used up, ~1.0, and ~0 while it sleeps."""
    made = _make_cgroup() if os.geteuid() == 0 else None
    if made is None:
        pytest.skip("needs root and a cgroup cpu controller to make a CPU quota")
    directory, period_s = made
    procs = directory / "cgroup.procs"
    try:
        child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True,
                                 preexec_fn=lambda: procs.write_text(str(os.getpid())))
        out, _ = child.communicate(timeout=60)
    finally:
        directory.rmdir()
    result = json.loads(out)
    assert result["quota"] == [str(directory / "cpu.stat"), str(period_s)], result
    assert result["idle"] < 0.2 and result["busy"] > 0.8, result
