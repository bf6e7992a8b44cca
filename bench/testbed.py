"""Helpers the test-bed benchmarks share (bench/offload.py, bench/policy.py): child processes in their own process
groups, the namespace pair of ../shared/testbed (netpair.sh), logging. Not a library: imported by the scripts
beside it."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTBED = ROOT.parent / "shared" / "testbed"
DEV_ADDR, EDGE_ADDR = "10.77.0.1", "10.77.0.2"

__all__ = ["ROOT", "TESTBED", "DEV_ADDR", "EDGE_ADDR", "child_env", "log", "Proc", "netpair", "require_down", "teardown"]


def child_env() -> dict[str, str]:
    """This environment, with the repository on PYTHONPATH and unbuffered output (for children in namespaces).
    A PYTHONPATH given to the bench comes first: `PYTHONPATH=<another checkout> python bench/policy.py` runs that
    checkout's zpipe on both sides with this script (an A/B). It used to come after the repository, so that the
    device and server ran the script's own code whatever it said (session 15: an "A/B" that compared one commit
    with itself)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(ROOT)]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


class Proc:
    """A child in its own process group, stderr collected by a thread (so the pipe never fills)."""

    def __init__(self, cmd: list[str], *, stdin=None, stdout=None, name: str) -> None:
        self.name = name
        self.p = subprocess.Popen(cmd, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, text=True,
                                  env=child_env(), start_new_session=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.p.stderr:
            self.stderr.append(line.rstrip())
            self.lines.put(line)

    def wait_for(self, text: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.p.poll() is not None:
                    break
                continue
            if text in line:
                return line
        raise RuntimeError(f"{self.name}: no {text!r} within {timeout_s} s; stderr:\n" + "\n".join(self.stderr[-20:]))

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10) -> None:
        if self.p.poll() is not None:
            return
        try:
            os.killpg(self.p.pid, sig)  # our own group: the process and its children
            self.p.wait(timeout=timeout_s)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.p.wait(timeout=5)


def netpair(*args: str, check: bool = True) -> str:
    out = subprocess.run([str(TESTBED / "netpair.sh"), *args], capture_output=True, text=True, timeout=60)
    if check and out.returncode != 0:
        raise RuntimeError(f"netpair.sh {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout + out.stderr


def netpair_up(*link: str) -> None:
    """`netpair.sh up` with ``link`` (delay ms, rate Mbit/s, loss %), once more after a failed start: its user-space
    link emulator did not come up once in a series of runs, with nothing in its log (session 15, run 4 of 8)."""
    try:
        netpair("up", *link)
    except RuntimeError as exc:
        log(f"{exc}; once more")
        netpair("down", check=False)
        time.sleep(1.0)
        netpair("up", *link)


def require_down() -> None:
    """Refuse to start when the namespace pair is already up (another run owns it)."""
    state = netpair("status", check=False).strip()
    if not state.startswith("down"):
        raise SystemExit(f"the test bed is already up (someone else's run?): {state.splitlines()[0]}; "
                         "not touching it")


def teardown(procs: list["Proc"], work: Path, *, keep: bool) -> None:
    """Stop our children (newest first), take the namespace pair down, and remove the work folder unless kept."""
    for proc in reversed(procs):
        proc.stop()
    netpair("down", check=False)
    if not keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
