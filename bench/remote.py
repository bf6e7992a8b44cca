"""Remote inference: zpipe (`zpipe serve` + RemoteClient) vs TVM's own RPC server, on 127.0.0.1, in one run.

    python bench/remote.py [--quick] [--workers N] [--isolation process|thread] [--rounds R]

Both systems run the same compiled `.so` (built here with `zpipe.compile.export_stage`): ``y = x * 2 + 1`` on
float32[1, N] for payloads of 4 KiB, 64 KiB, 1 MiB and 16 MiB, plus a model with ~6 MiB of constant weights
embedded in its library (``y = x @ W``, W float32[1536, 1024]) for the upload measurement.

  (a) round-trip latency of one remote inference (median, p90), after warm-up. A TVM RPC iteration sends the
      input (``tvm.runtime.tensor(x, device=remote.cpu())``), runs the VM function and fetches the output
      (``.numpy()``): what a device does. zpipe: ``RemoteClient.infer``. Every output is checked against x*2+1.
  (b) throughput with 8 requests in flight. zpipe: one RemoteClient streaming with map(..., in_flight=8).
      TVM RPC: one session is one request at a time, and one ``rpc_server`` serves one session at a time (the
      next connection waits until the session ends), so what it offers is (i) one session, sequential, and
      (ii) 8 client threads with 8 sessions on 8 ``rpc_server`` processes.
  (c) model upload + load: zpipe ``upload`` (Curve keys + ``--allow-upload``) until ``health()`` reports the new
      version served, and until the first correct reply; TVM ``remote.upload`` + ``load_module`` +
      ``VirtualMachine``, and until the first correct reply. Each repetition uses a new name/version, so nothing
      is served from a cache.
  (d) zpipe with CurveZMQ on vs off for (a): a second server with ``--server-key``/``--clients``.

The three systems of (a) alternate in rounds so that they see the same machine noise. Prints tables with the
absolute figures and the ratios measured in this run, the targets of issue 4 and whether they were met, then one
JSON line with every figure. Every process started here (zpipe servers and their workers, rpc_server and its
session process) runs in its own process group and is killed by group at the end, also on errors.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import numpy as np

HOST = "127.0.0.1"  # loopback only, everywhere in this benchmark
SIZES = {"4KiB": 4 << 10, "64KiB": 64 << 10, "1MiB": 1 << 20, "16MiB": 16 << 20}
ZP_ITERS = {"4KiB": 1000, "64KiB": 600, "1MiB": 200, "16MiB": 24}  # per system, over all rounds
TVM_ITERS = {"4KiB": 300, "64KiB": 120, "1MiB": 24, "16MiB": 3}  # TVM RPC moves ~45 MB/s
ZP_THROUGHPUT = {"4KiB": 2000, "64KiB": 1000, "1MiB": 300, "16MiB": 32}  # requests per throughput measurement
TVM_THROUGHPUT = {"4KiB": 1000, "64KiB": 200, "1MiB": 24, "16MiB": 3}  # requests, one session
TVM_THROUGHPUT_8 = {"4KiB": 150, "64KiB": 30, "1MiB": 6, "16MiB": 1}  # requests per session, 8 sessions
WINDOW = 8  # requests in flight for (b)
WEIGHTS_SHAPE = (1536, 1024)  # 6 MiB of float32 constants embedded in the library for (c)
UPLOAD_REPS = 5
TARGET_SPEEDUP_1MIB = 50.0  # zpipe round trip at 1 MiB at least 50x faster than TVM RPC
TARGET_THROUGHPUT = 10.0  # zpipe throughput at least 10x TVM RPC's

_started: list[subprocess.Popen] = []  # every process group we started, for the cleanup


# -- building the models ------------------------------------------------------------------------------------------
def build_models(out: Path) -> dict[str, Path]:
    """Compile the affine models (one per payload size) and the weights model; returns name -> .so path."""
    from tvm.relax.frontend import nn

    from zpipe.compile import export_stage

    libs = {}
    for label, nbytes in SIZES.items():
        class Affine(nn.Module):
            def forward(self, x):
                return x * 2.0 + 1.0

        mod, _ = Affine().export_tvm({"forward": {"x": nn.spec.Tensor((1, nbytes // 4), "float32")}})
        name = f"affine_{label}"
        export_stage(mod, name=name, out_dir=out / name, function="forward", input_names=["x"], output_names=["y"])
        libs[name] = out / name / f"{name}.so"

    weights = np.random.default_rng(7).standard_normal(WEIGHTS_SHAPE).astype(np.float32)

    class Weights(nn.Module):
        def forward(self, x):
            return nn.op.matmul(x, nn.Tensor.from_const(weights))

    mod, _ = Weights().export_tvm({"forward": {"x": nn.spec.Tensor((1, WEIGHTS_SHAPE[0]), "float32")}})
    export_stage(mod, name="weights", out_dir=out / "weights", function="forward", input_names=["x"],
                 output_names=["y"])
    libs["weights"] = out / "weights" / "weights.so"
    np.save(out / "weights" / "W.npy", weights)
    return libs


def make_repo(repo: Path, libs: dict[str, Path], names: list[str]) -> None:
    """REPO/<model>/1/<model>.so + .json for each named model."""
    for name in names:
        version = repo / name / "1"
        version.mkdir(parents=True)
        shutil.copy(libs[name], version)
        shutil.copy(libs[name].with_suffix(".json"), version)


def make_keys(keys: Path) -> dict[str, Path]:
    for name in ("server", "device"):
        subprocess.run([sys.executable, "-m", "zpipe", "keygen", name, "--dir", str(keys)], check=True,
                       capture_output=True, timeout=60)
    allowed = keys / "allowed"
    allowed.mkdir()
    shutil.copy(keys / "device.key", allowed / "device.key")
    return {"server_secret": keys / "server.key_secret", "server_public": keys / "server.key",
            "device_secret": keys / "device.key_secret", "allowed": allowed}


# -- processes ----------------------------------------------------------------------------------------------------
def _spawn(cmd: list[str], **kw) -> subprocess.Popen:
    """Start a process in its own session, so that it and all its children can be killed by process group."""
    proc = subprocess.Popen(cmd, start_new_session=True, **kw)
    _started.append(proc)
    return proc


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def stop_group(proc: subprocess.Popen, *, graceful_s: float = 30.0) -> dict:
    """SIGTERM the leader (zpipe serve drains; rpc_server exits), wait, then SIGKILL whatever of the group is left.
    Returns what happened (for the report: a zpipe server should leave no process behind)."""
    outcome = {"pid": proc.pid, "exit": None, "leftover_killed": False}
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
    try:
        outcome["exit"] = proc.wait(timeout=graceful_s)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + 5.0
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _group_alive(proc.pid):
        outcome["leftover_killed"] = True
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.poll() is None:
        proc.wait(timeout=10)
        outcome["exit"] = proc.returncode
    if proc in _started:
        _started.remove(proc)
    return outcome


def kill_all() -> None:
    for proc in list(_started):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        _started.remove(proc)


class ZpipeServer:
    """`python -m zpipe serve` as a child process (own process group); endpoint parsed from its stderr."""

    def __init__(self, repo: Path, *args: str, timeout_s: float = 180.0) -> None:
        cmd = [sys.executable, "-m", "zpipe", "serve", "--repo", str(repo), "--bind", f"tcp://{HOST}:*",
               "--poll-s", "0.2", *args]
        self.proc = _spawn(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        self.endpoint: str | None = None
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ready.wait(timeout_s) or self.endpoint is None:
            raise RuntimeError("zpipe serve did not start:\n" + "".join(self.log[-30:]))
        if not self.endpoint.startswith(f"tcp://{HOST}:"):
            raise RuntimeError(f"zpipe serve bound {self.endpoint}, not loopback")

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)
            if self.endpoint is None and "listening on " in line:
                self.endpoint = line.split("listening on ")[1].split(";")[0].strip()
                self._ready.set()
        self._ready.set()  # exited before listening

    def stop(self) -> dict:
        outcome = stop_group(self.proc)
        self._reader.join(timeout=5)
        outcome["drained"] = any("drained and stopped" in line for line in self.log)
        return outcome


class TvmRpcServer:
    """`python -m tvm.exec.rpc_server` on 127.0.0.1 (own process group: its session process survives a SIGTERM
    to the parent alone). It picks a free port in a range below the kernel's ephemeral range (a port picked there
    can be taken by any outgoing connection, ours included, before the server binds it); we read the port it bound
    from its log and connect only then, with a time limit (rpc.connect itself waits forever on a busy server)."""

    _count = 0

    def __init__(self, log_dir: Path) -> None:
        TvmRpcServer._count += 1
        start = 20000 + (os.getpid() * 97 + TvmRpcServer._count * 211) % 9000
        self.log_path = log_dir / f"rpc_server_{TvmRpcServer._count}.log"
        self.port: int | None = None
        self.proc = _spawn([sys.executable, "-m", "tvm.exec.rpc_server", "--host", HOST, "--port", str(start),
                            "--port-end", str(start + 400)], stdout=open(self.log_path, "w"),
                           stderr=subprocess.STDOUT)

    def wait_bound(self, timeout_s: float = 120.0) -> int:
        deadline = time.monotonic() + timeout_s
        while self.port is None:
            found = re.search(r"bind to 127\.0\.0\.1:(\d+)", self.log_path.read_text())
            if found:
                self.port = int(found.group(1))
            elif self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("rpc_server did not start: " + self.log_path.read_text()[-2000:])
            else:
                time.sleep(0.1)
        return self.port

    def connect(self, timeout_s: float = 60.0):
        from tvm import rpc

        port = self.wait_bound()
        box: dict = {}

        def go() -> None:
            try:
                box["remote"] = rpc.connect(HOST, port)
            except BaseException as exc:  # re-raised below
                box["error"] = exc

        thread = threading.Thread(target=go, daemon=True)
        thread.start()
        thread.join(timeout_s)
        if "remote" not in box:
            raise RuntimeError(f"TVM RPC connect to {HOST}:{port} failed: {box.get('error', 'timed out')}; "
                               + self.log_path.read_text()[-1000:])
        return box["remote"]

    def stop(self) -> dict:
        return stop_group(self.proc, graceful_s=5)


def serve_echo() -> None:
    """The raw pyzmq baseline: a ROUTER on 127.0.0.1 echoing frames back untouched (no zpipe, no TVM)."""
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(f"tcp://{HOST}:*")
    print(sock.getsockopt_string(zmq.LAST_ENDPOINT), flush=True)
    while True:
        frames = sock.recv_multipart(copy=False)
        if frames[-1].bytes == b"quit":
            return
        sock.send_multipart(frames, copy=False)


class RawEcho:
    def __init__(self) -> None:
        import zmq

        self.proc = _spawn([sys.executable, __file__, "--serve-echo"], stdout=subprocess.PIPE, text=True)
        endpoint = self.proc.stdout.readline().strip()
        if not endpoint.startswith(f"tcp://{HOST}:"):
            raise RuntimeError(f"echo server did not start ({endpoint!r})")
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(endpoint)

    def time(self, x: np.ndarray, iters: int) -> list[float]:
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            self.sock.send(x, copy=False)
            frame = self.sock.recv(copy=False)
            np.frombuffer(frame.buffer, dtype=x.dtype)
            times.append(time.perf_counter() - t0)
        return times

    def stop(self) -> dict:
        try:
            self.sock.send(b"quit")
            self.proc.wait(timeout=5)
        except Exception:
            pass
        self.sock.close()
        self.ctx.term()
        return stop_group(self.proc, graceful_s=1)


# -- measuring ----------------------------------------------------------------------------------------------------
def payload(label: str) -> np.ndarray:
    return np.random.default_rng(len(label)).standard_normal((1, SIZES[label] // 4)).astype(np.float32)


class Checker:
    """Counts outputs that differ from the expected ones (checked outside the timed region)."""

    def __init__(self) -> None:
        self.checked = 0
        self.wrong: list[str] = []

    def affine(self, what: str, x: np.ndarray, y: np.ndarray) -> None:
        self.checked += 1
        if y.shape != x.shape or y.dtype != np.float32 or not np.array_equal(y, x * np.float32(2) + np.float32(1)):
            self.wrong.append(what)


def time_zpipe(client, model: str, x: np.ndarray, iters: int, check: Checker, what: str) -> list[float]:
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        y = client.infer(model, {"x": x})["y"]
        times.append(time.perf_counter() - t0)
        check.affine(what, x, y)
    return times


class TvmSession:
    """One TVM RPC session (one rpc_server serves one session at a time) with the affine models uploaded and
    loaded once. The device-side round trip is tensor(x, remote device) + call + numpy()."""

    def __init__(self, server: TvmRpcServer, libs: list[Path]) -> None:
        from tvm import relax

        self.remote = server.connect()
        self.dev = self.remote.cpu()
        self.fns = {}
        for library in libs:
            self.remote.upload(str(library))
            vm = relax.VirtualMachine(self.remote.load_module(library.name), self.dev)
            self.fns[library.stem] = (vm, vm["forward"])
        self.model = None

    def infer(self, x: np.ndarray, model: str | None = None) -> np.ndarray:
        import tvm

        return self.fns[model or self.model][1](tvm.runtime.tensor(x, device=self.dev)).numpy()


def time_tvm(session: TvmSession, x: np.ndarray, iters: int, check: Checker, what: str) -> list[float]:
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        y = session.infer(x)
        times.append(time.perf_counter() - t0)
        check.affine(what, x, y)
    return times


def zpipe_throughput(client, model: str, x: np.ndarray, total: int, check: Checker) -> float:
    """Requests per second with WINDOW requests in flight on one connection: ``RemoteClient.map``, a stream sent
    and read on this thread (the submit()/futures path costs two thread hand-offs per request more)."""
    t0 = time.perf_counter()
    done = 0
    for result in client.map(model, ({"x": x} for _ in range(total)), in_flight=WINDOW):
        done += 1
        last = result.outputs["y"]
    elapsed = time.perf_counter() - t0
    check.affine(f"zpipe throughput {model}", x, last)
    return done / elapsed


def tvm_throughput_1(session: TvmSession, x: np.ndarray, total: int, check: Checker) -> float:
    t0 = time.perf_counter()
    for _ in range(total):
        y = session.infer(x)
    elapsed = time.perf_counter() - t0
    check.affine("tvm throughput 1 session", x, y)
    return total / elapsed


def tvm_throughput_8(sessions: list[TvmSession], x: np.ndarray, per_session: int, check: Checker) -> float:
    """8 threads, each with its own session on its own rpc_server, each doing per_session requests."""
    barrier = threading.Barrier(len(sessions) + 1)
    errors: list[BaseException] = []
    outs: list[np.ndarray] = []

    def run(session: TvmSession) -> None:
        try:
            barrier.wait()
            y = None
            for _ in range(per_session):
                y = session.infer(x)
            outs.append(y)
        except BaseException as exc:  # reported after the join
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s,), daemon=True) for s in sessions]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join(timeout=300)
    elapsed = time.perf_counter() - t0
    if errors or any(t.is_alive() for t in threads):
        raise RuntimeError(f"TVM RPC 8 sessions failed: {errors[:1]}")
    for y in outs:
        check.affine("tvm throughput 8 sessions", x, y)
    return len(sessions) * per_session / elapsed


def upload_zpipe(client, lib: Path, x: np.ndarray, expected: np.ndarray, reps: int) -> dict:
    stored, served, first = [], [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        version = client.upload("weights", lib)
        t1 = time.perf_counter()
        deadline = t1 + 120
        while True:
            health = client.health()
            if health.get("version:weights") == version and health.get("state:weights") == "available":
                break
            if time.perf_counter() > deadline:
                raise RuntimeError(f"uploaded version {version} not served within 120 s: {health}")
            time.sleep(0.002)
        t2 = time.perf_counter()
        result = client.submit("weights", {"x": x}, version=version).result()
        t3 = time.perf_counter()
        if result.meta.get("version") != version or not np.allclose(result.outputs["y"], expected, rtol=1e-4,
                                                                    atol=1e-3):
            raise RuntimeError("zpipe: wrong output from the uploaded weights model")
        stored.append(t1 - t0)
        served.append(t2 - t0)
        first.append(t3 - t0)
    return {"stored_s": med(stored), "served_s": med(served), "first_reply_s": med(first), "reps": reps,
            "served_all_s": served}


def upload_tvm(server: TvmRpcServer, lib: Path, x: np.ndarray, expected: np.ndarray, reps: int) -> dict:
    import tvm
    from tvm import relax

    remote = server.connect()
    uploaded, loaded, first = [], [], []
    for i in range(reps):
        name = f"weights_{i}.so"  # a new file each time: a second dlopen of one path would hit the loader cache
        t0 = time.perf_counter()
        remote.upload(str(lib), target=name)
        t1 = time.perf_counter()
        vm = relax.VirtualMachine(remote.load_module(name), remote.cpu())
        t2 = time.perf_counter()
        y = vm["forward"](tvm.runtime.tensor(x, device=remote.cpu())).numpy()
        t3 = time.perf_counter()
        if not np.allclose(y, expected, rtol=1e-4, atol=1e-3):
            raise RuntimeError("TVM RPC: wrong output from the uploaded weights model")
        uploaded.append(t1 - t0)
        loaded.append(t2 - t0)
        first.append(t3 - t0)
    return {"upload_s": med(uploaded), "loaded_s": med(loaded), "first_reply_s": med(first), "reps": reps,
            "loaded_all_s": loaded}


def med(xs: list[float]) -> float:
    return float(np.median(xs))


def p90(xs: list[float]) -> float:
    return float(np.percentile(xs, 90))


def _fmt(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:7.0f} µs"
    if seconds < 1.0:
        return f"{seconds * 1e3:7.2f} ms"
    return f"{seconds:7.3f} s "


# -- the run ------------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace, work: Path) -> dict:
    import zpipe
    from zpipe.client import RemoteClient

    scale = 0.1 if args.quick else 1.0
    n = lambda table, label, low=3: max(low, int(table[label] * scale))  # noqa: E731
    t_start = time.perf_counter()
    print("building models ...", file=sys.stderr, flush=True)
    libs = build_models(work / "build")
    affine = [f"affine_{label}" for label in SIZES]
    keys = make_keys(work / "keys")
    make_repo(work / "repo_plain", libs, affine)
    make_repo(work / "repo_curve", libs, affine)
    check = Checker()
    figures: dict = {"zpipe_version": getattr(zpipe, "__version__", "?"), "workers": args.workers,
                     "isolation": args.isolation,
                     "host": HOST, "window": WINDOW, "cpus": os.cpu_count(), "loadavg_start": os.getloadavg()[0]}

    print("starting servers ...", file=sys.stderr, flush=True)
    workers = ("--workers", str(args.workers), "--isolation", args.isolation)
    plain = ZpipeServer(work / "repo_plain", *workers)
    curve = ZpipeServer(work / "repo_curve", *workers, "--server-key", str(keys["server_secret"]), "--clients",
                        str(keys["allowed"]), "--allow-upload")
    tvm_servers = [TvmRpcServer(work) for _ in range(WINDOW + 1)]  # 8 for (a)/(b), one more for (c)
    echo = RawEcho()
    stops: dict = {}
    sessions: list[TvmSession] = []
    try:
        with RemoteClient(plain.endpoint, timeout_s=120) as zc, \
                RemoteClient(curve.endpoint, server_key=keys["server_public"], client_key=keys["device_secret"],
                             timeout_s=120) as zk:
            for c in (zc, zk):
                health = c.health()
                if not health.get("ready"):
                    raise RuntimeError(f"zpipe server not ready: {health}")

            print("connecting TVM RPC sessions ...", file=sys.stderr, flush=True)
            sessions += [TvmSession(server, [libs[m] for m in affine]) for server in tvm_servers[:WINDOW]]
            session = sessions[0]

            # (a) + (d): latency, three systems alternating in rounds
            latency: dict = {}
            for label in SIZES:
                print(f"latency {label} ...", file=sys.stderr, flush=True)
                model, x = f"affine_{label}", payload(label)
                session.model = model
                zi, ti = n(ZP_ITERS, label, 6), n(TVM_ITERS, label, 2)
                time_zpipe(zc, model, x, max(3, zi // 10), check, f"zpipe {label} warm-up")
                time_zpipe(zk, model, x, max(3, zi // 10), check, f"zpipe curve {label} warm-up")
                time_tvm(session, x, 1 if label == "16MiB" else max(2, ti // 10), check, f"tvm {label} warm-up")
                echo.time(x, max(3, zi // 10))
                zp, zcur, tv, raw = [], [], [], []
                rounds = min(args.rounds, ti)
                for r in range(rounds):
                    zp += time_zpipe(zc, model, x, zi // rounds, check, f"zpipe {label}")
                    zcur += time_zpipe(zk, model, x, zi // rounds, check, f"zpipe curve {label}")
                    tv += time_tvm(session, x, ti // rounds, check, f"tvm {label}")
                    raw += echo.time(x, zi // rounds)
                latency[label] = {
                    "zpipe_plain": {"median_s": med(zp), "p90_s": p90(zp), "n": len(zp)},
                    "zpipe_curve": {"median_s": med(zcur), "p90_s": p90(zcur), "n": len(zcur)},
                    "tvm_rpc": {"median_s": med(tv), "p90_s": p90(tv), "n": len(tv)},
                    "raw_pyzmq_echo": {"median_s": med(raw), "p90_s": p90(raw), "n": len(raw)},
                    "speedup_tvm_over_raw_echo": med(tv) / med(raw),
                    "speedup_tvm_over_zpipe": med(tv) / med(zp),
                    "speedup_tvm_over_zpipe_curve": med(tv) / med(zcur),
                    "curve_over_plain": med(zcur) / med(zp),
                }
                latency[label]["tvm_rpc"]["MB_per_s"] = 2 * SIZES[label] / med(tv) / 1e6
            figures["latency"] = latency

            # (b): throughput with 8 in flight; the rounds alternate the systems, figures are medians
            throughput: dict = {}
            for label in SIZES:
                print(f"throughput {label} ...", file=sys.stderr, flush=True)
                model, x = f"affine_{label}", payload(label)
                zpipe_throughput(zc, model, x, WINDOW * 2, check)  # warm-up
                for s in sessions:
                    s.model = model
                    s.infer(x)  # warm-up
                runs: dict[str, list[float]] = {"zp": [], "zpk": [], "t1": [], "t8": []}
                for _ in range(args.rounds):
                    runs["zp"].append(zpipe_throughput(zc, model, x, n(ZP_THROUGHPUT, label, 2 * WINDOW), check))
                    runs["zpk"].append(zpipe_throughput(zk, model, x, n(ZP_THROUGHPUT, label, 2 * WINDOW), check))
                    runs["t1"].append(tvm_throughput_1(sessions[0], x, n(TVM_THROUGHPUT, label, 2), check))
                    runs["t8"].append(tvm_throughput_8(sessions, x, n(TVM_THROUGHPUT_8, label, 1), check))
                zp, zpk, t1, t8 = (med(runs[k]) for k in ("zp", "zpk", "t1", "t8"))
                best = max(t1, t8)
                throughput[label] = {"zpipe_plain_rps": zp, "zpipe_curve_rps": zpk, "tvm_1_session_rps": t1,
                                     "tvm_8_sessions_rps": t8, "ratio_vs_tvm_1": zp / t1, "ratio_vs_tvm_8": zp / t8,
                                     "ratio_vs_tvm_best": zp / best,
                                     "zpipe_plain_MB_per_s": zp * 2 * SIZES[label] / 1e6,
                                     "tvm_best_MB_per_s": best * 2 * SIZES[label] / 1e6,
                                     "rounds": {k: [round(v, 1) for v in vs] for k, vs in runs.items()}}
            figures["throughput"] = throughput

            # (c): upload + load of the library with embedded weights
            print("upload ...", file=sys.stderr, flush=True)
            lib = libs["weights"]
            W = np.load(lib.parent / "W.npy")
            xw = np.random.default_rng(3).standard_normal((1, WEIGHTS_SHAPE[0])).astype(np.float32)
            expected = xw @ W
            reps = max(2, int(UPLOAD_REPS * (0.6 if args.quick else 1)))
            zu = upload_zpipe(zk, lib, xw, expected, reps)
            tu = upload_tvm(tvm_servers[WINDOW], lib, xw, expected, reps)  # its own server and session
            figures["upload"] = {"library_bytes": lib.stat().st_size, "zpipe_curve": zu, "tvm_rpc": tu,
                                 "speedup_loaded": tu["loaded_s"] / zu["served_s"],
                                 "speedup_transfer": tu["upload_s"] / zu["stored_s"],
                                 "speedup_first_reply": tu["first_reply_s"] / zu["first_reply_s"]}
            figures["curve_server_stats"] = {k: v for k, v in zk.stats().items() if k in ("requests",)}
    finally:
        sessions.clear()  # close the TVM RPC sessions before their servers go
        session = None  # noqa: F841
        for name, server in (("zpipe_plain", plain), ("zpipe_curve", curve)):
            try:
                stops[name] = server.stop()
            except Exception as exc:  # keep cleaning up
                stops[name] = {"error": repr(exc)}
        for i, server in enumerate(tvm_servers):
            stops[f"tvm_rpc_{i}"] = server.stop()
        stops["raw_echo"] = echo.stop()
    figures["server_shutdown"] = {k: v for k, v in stops.items() if k.startswith("zpipe")}
    figures["tvm_rpc_leftover_killed"] = sum(bool(v.get("leftover_killed")) for k, v in stops.items()
                                             if k.startswith("tvm"))
    figures["outputs_checked"] = check.checked
    figures["outputs_wrong"] = len(check.wrong)
    figures["wall_s"] = time.perf_counter() - t_start
    figures["loadavg_end"] = os.getloadavg()[0]
    if check.wrong:
        print(f"WRONG OUTPUTS: {len(check.wrong)} (first: {check.wrong[:5]})", file=sys.stderr)
    return figures


def report(figures: dict, args: argparse.Namespace) -> None:
    lat, thr, up = figures["latency"], figures["throughput"], figures["upload"]
    print(f"\nzpipe serve vs TVM RPC on {HOST}, same .so; zpipe --workers {figures['workers']}; medians "
          f"(p90 in brackets); rounds alternate the systems; {figures['cpus']} CPUs, load average "
          f"{figures['loadavg_start']:.1f} at start, {figures['loadavg_end']:.1f} at end")
    print("(a)+(d) round trip of one remote inference (raw pyzmq echo: no zpipe, no TVM, no worker: the ceiling)")
    print(f"{'payload':>7} | {'zpipe':>22} | {'zpipe+Curve':>22} | {'TVM RPC':>22} | {'TVM/zpipe':>9} | "
          f"{'TVM/Curve':>9} | {'Curve/plain':>11} | {'raw pyzmq echo':>14} | {'TVM/raw':>7}")
    for label, f in lat.items():
        cell = lambda d: f"{_fmt(d['median_s'])} ({_fmt(d['p90_s']).strip()})"  # noqa: E731
        print(f"{label:>7} | {cell(f['zpipe_plain']):>22} | {cell(f['zpipe_curve']):>22} | {cell(f['tvm_rpc']):>22}"
              f" | {f['speedup_tvm_over_zpipe']:8.1f}x | {f['speedup_tvm_over_zpipe_curve']:8.1f}x | "
              f"{f['curve_over_plain']:10.2f}x | {_fmt(f['raw_pyzmq_echo']['median_s']):>14} | "
              f"{f['speedup_tvm_over_raw_echo']:6.0f}x")
    print(f"\n(b) throughput with {WINDOW} requests in flight (requests/s; medians of {args.rounds} rounds "
          "alternating the systems)")
    print(f"{'payload':>7} | {'zpipe':>9} | {'zpipe+Curve':>11} | {'TVM 1 sess':>10} | {'TVM 8 sess':>10} | "
          f"{'zp/TVM1':>8} | {'zp/TVM8':>8} | {'zpipe MB/s':>10}")
    for label, f in thr.items():
        print(f"{label:>7} | {f['zpipe_plain_rps']:9.1f} | {f['zpipe_curve_rps']:11.1f} | "
              f"{f['tvm_1_session_rps']:10.2f} | {f['tvm_8_sessions_rps']:10.2f} | {f['ratio_vs_tvm_1']:7.1f}x | "
              f"{f['ratio_vs_tvm_8']:7.1f}x | {f['zpipe_plain_MB_per_s']:10.0f}")
    print("    (TVM 8 sess = 8 client threads, 8 sessions on 8 rpc_server processes: one rpc_server serves one "
          "session at a time)")
    zu, tu = up["zpipe_curve"], up["tvm_rpc"]
    print(f"\n(c) upload + load of a library with embedded weights ({up['library_bytes'] / 1e6:.2f} MB), "
          f"median of {zu['reps']}")
    print(f"{'':>22} | {'upload call':>11} | {'serving':>10} | {'first reply':>11}")
    print(f"{'zpipe (Curve, upload)':>22} | {_fmt(zu['stored_s']):>11} | {_fmt(zu['served_s']):>10} | "
          f"{_fmt(zu['first_reply_s']):>11}")
    print(f"{'TVM RPC':>22} | {_fmt(tu['upload_s']):>11} | {_fmt(tu['loaded_s']):>10} | "
          f"{_fmt(tu['first_reply_s']):>11}")
    print(f"{'TVM/zpipe':>22} | {up['speedup_transfer']:10.2f}x | {up['speedup_loaded']:9.2f}x | "
          f"{up['speedup_first_reply']:10.2f}x")
    print("    zpipe: upload call = upload() returned (stored as a new version; the server replies after loading it);"
          "\n    serving = health() reports the new version available; TVM: upload call = remote.upload, serving = + "
          "load_module + VirtualMachine;\n    first reply = from the start of the upload to the first checked output")

    speed_1m = lat["1MiB"]["speedup_tvm_over_zpipe"]
    thr_ok = {label: f["ratio_vs_tvm_best"] >= TARGET_THROUGHPUT for label, f in thr.items()}
    targets = {
        "round_trip_1MiB": {"target": f">= {TARGET_SPEEDUP_1MIB:g}x faster than TVM RPC", "measured": speed_1m,
                            "met": speed_1m >= TARGET_SPEEDUP_1MIB},
        "throughput": {"target": f">= {TARGET_THROUGHPUT:g}x TVM RPC's (against its better of 1 and 8 sessions)",
                       "measured": {label: f["ratio_vs_tvm_best"] for label, f in thr.items()},
                       "met_per_payload": thr_ok, "met": all(thr_ok.values())},
    }
    figures["targets"] = targets
    print("\ntargets (issue 4):")
    print(f"  round trip at 1 MiB: zpipe {speed_1m:.1f}x faster than TVM RPC; target >= {TARGET_SPEEDUP_1MIB:g}x: "
          f"{'MET' if targets['round_trip_1MiB']['met'] else 'NOT MET'}")
    print("  throughput, 8 in flight, vs TVM RPC's best: "
          + ", ".join(f"{label} {f['ratio_vs_tvm_best']:.1f}x" for label, f in thr.items())
          + f"; target >= {TARGET_THROUGHPUT:g}x: " + ("MET at every payload" if targets["throughput"]["met"] else
                                                      "NOT MET at " + ", ".join(k for k, v in thr_ok.items()
                                                                                 if not v)))
    shut = figures["server_shutdown"]
    print(f"outputs checked: {figures['outputs_checked']}, wrong: {figures['outputs_wrong']}; zpipe servers: "
          + ", ".join(f"{k} exit {v.get('exit')}{' drained' if v.get('drained') else ''}"
                      f"{' LEFTOVER PROCESSES KILLED' if v.get('leftover_killed') else ''}" for k, v in shut.items())
          + f"; wall time {figures['wall_s']:.0f} s")
    print(json.dumps({"bench": "remote", "quick": args.quick, **figures}, default=float))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the iterations (smoke run)")
    parser.add_argument("--serve-echo", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=1, help="zpipe serve --workers (per model)")
    parser.add_argument("--isolation", choices=["process", "thread"], default="process",
                        help="zpipe serve --isolation: models in worker processes or in the server process")
    parser.add_argument("--rounds", type=int, default=3, help="rounds alternating the systems in (a) and (b)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (models, keys, logs)")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="kill everything and fail after this long")
    args = parser.parse_args()
    if args.serve_echo:
        serve_echo()
        return

    # The measurements run in a thread, so that the main thread stays free to react to signals and to the time
    # limit even while a TVM RPC call hangs in C: then every process group we started is killed.
    def on_signal(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    work = Path(tempfile.mkdtemp(prefix="zpipe-bench-remote-"))
    box: dict = {}

    def measure() -> None:
        try:
            box["figures"] = run(args, work)
        except BaseException as exc:  # reported by the main thread
            box["error"] = "".join(traceback.format_exception(exc))

    thread = threading.Thread(target=measure, name="bench", daemon=True)
    code = 0
    try:
        thread.start()
        deadline = time.monotonic() + args.timeout_s
        while thread.is_alive():
            thread.join(0.5)
            if time.monotonic() > deadline:
                print(f"bench/remote.py: no result after {args.timeout_s:g} s; killing everything", file=sys.stderr)
                code = 3
                break
        if "figures" in box:
            report(box["figures"], args)
        elif code == 0:
            print(box.get("error", "bench/remote.py: no result"), file=sys.stderr)
            code = 1
    except BaseException:  # SIGTERM, Ctrl-C
        code = 1
        raise
    finally:
        kill_all()
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
        if code:
            sys.stderr.flush()
            os._exit(code)  # a thread may still be stuck in a TVM call: do not wait for it


if __name__ == "__main__":
    main()
