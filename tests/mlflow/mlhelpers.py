"""Shared, session-scoped fixtures of the MLflow tests: one trained run, one real server.

* ``trained``: a tiny dataset, its validation result and a two-phase training run made by
  the real CLI (``ple-adatt train``) while tracking to the session's ``mlflow server``;
* ``mlflow_server``: ``mlflow server`` on 127.0.0.1 with a sqlite store in a temp dir,
  started once and stopped by its pid at the end of the session.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ.pop("MLFLOW_TRACKING_URI", None)  # tests say where they track, explicitly
os.environ.pop("MLFLOW_EXPERIMENT_NAME", None)
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DATA_CONFIG = ROOT / "configs/data/synthetic.yaml"
TRAIN_CONFIG = ROOT / "configs/train/cpu_small.yaml"
QUICK = ["--set", "training.shared_expert_epochs=3", "--set", "transfer.adatt.freeze_epoch=2",
         "--set", "training.cluster_finetune_epochs=1"]
PIPELINE_RUN_ID = "kfp-test-run-0001"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    uri: str
    pid: int
    root: Path


def _wait_healthy(uri: str, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"mlflow server did not become healthy in {timeout}s:\n{log.read_text()[-3000:]}")


@dataclass
class _ServerProcess:
    proc: subprocess.Popen
    uri: str
    root: Path
    log: Path

    def wait(self) -> Server:
        _wait_healthy(self.uri, self.proc, self.log)
        return Server(self.uri, self.proc.pid, self.root)


@pytest.fixture(scope="session")
def _server_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_ServerProcess]:
    """Start ``mlflow server`` (not waiting for it: the trained fixture overlaps its start-up)."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log = root / "server.log"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
            cwd=root, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    try:
        yield _ServerProcess(proc, uri, root, log)
    finally:
        # stop exactly the server we started, by its pid (its own process group: start_new_session)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)


@pytest.fixture(scope="session")
def mlflow_server(_server_process: _ServerProcess) -> Server:
    return _server_process.wait()


@dataclass
class Trained:
    data: Path
    validation: Path
    run: Path
    tracking_uri: str
    pipeline_run_id: str

    @property
    def phase1(self) -> Path:
        return self.run / "phase1"

    @property
    def phase2(self) -> Path:
        return self.run / "phase2"


def ple_adatt(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
              check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / "ple-adatt"), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"ple-adatt {args[0]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, _server_process: _ServerProcess) -> Trained:
    """Generate, validate and train once per session, both tracked to the server (the
    registry links a version to its validate and train runs).

    The data is generated while the server starts; validation runs beside the training
    (2 cores are enough). Both run in the session's temporary directory: nothing lands in
    the checkout's ./mlflow.db.
    """
    d = tmp_path_factory.mktemp("trained")
    data = d / "data.parquet"
    ple_adatt("generate", "--out", str(data), "--rows", "3000", cwd=d)
    server = _server_process.wait()
    validate = subprocess.Popen(
        [str(BIN / "ple-adatt"), "validate", "--data", str(data), "--config", str(DATA_CONFIG),
         "--out", str(d / "validation")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "MLFLOW_TRACKING_URI": server.uri}, cwd=d)
    try:
        ple_adatt("train", "--data", str(data), "--data-config", str(DATA_CONFIG), "--config", str(TRAIN_CONFIG),
                  "--out", str(d / "run"), "--pipeline-run-id", PIPELINE_RUN_ID, *QUICK,
                  env={"MLFLOW_TRACKING_URI": server.uri}, cwd=d)
        out, _ = validate.communicate(timeout=300)
    finally:
        if validate.poll() is None:
            validate.kill()
            validate.wait()
    assert validate.returncode == 0, out
    return Trained(data, d / "validation", d / "run", server.uri, PIPELINE_RUN_ID)


@pytest.fixture
def server_env(monkeypatch: pytest.MonkeyPatch, mlflow_server: Server) -> Server:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    return mlflow_server


@pytest.fixture
def local_store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A working directory without MLFLOW_TRACKING_URI: the embedded sqlite default applies."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def derive_checkpoint(src: Path, dst: Path, *, metric_shift: float, seed: int) -> Path:
    """A copy of ``src`` with slightly different weights (another content hash) and every
    task's primary validation metric moved by ``metric_shift`` (relative; > 0 is better)."""
    import json

    import torch

    from ple_adatt.artifacts import path_sha256
    from ple_adatt.metrics import PRIMARY_METRIC

    shutil.copytree(src, dst)
    state = torch.load(dst / "checkpoint.pt", weights_only=True)
    g = torch.Generator().manual_seed(seed)
    key = next(k for k, v in state.items() if v.is_floating_point() and v.ndim == 2)
    state[key] = state[key] + 1e-4 * torch.randn(state[key].shape, generator=g)
    torch.save(state, dst / "checkpoint.pt")
    man = json.loads((dst / "manifest.json").read_text())
    man["files"]["checkpoint.pt"] = path_sha256(dst / "checkpoint.pt")
    kinds = {s["name"]: s["type"] for s in man["task_specs"]}
    for task, m in man["metrics"]["tasks"].items():
        metric, higher = PRIMARY_METRIC[kinds[task]]
        if isinstance(m.get(metric), float):
            v = m[metric]
            m[metric] = v * (1 + metric_shift) if higher else v * (1 - metric_shift)
            if v == 0.0:
                m[metric] = metric_shift if higher else 0.0
    (dst / "manifest.json").write_text(json.dumps(man))
    return dst


@pytest.fixture(autouse=True)
def _isolated_cwd(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Nothing a test does may land in the repository (the default store is ./mlflow.db)."""
    monkeypatch.chdir(tmp_path)


class Proxy:
    """A TCP forwarder on 127.0.0.1 to a real tracking server: :meth:`stop` is an outage in the
    middle of a stage (the listening socket and every open connection close)."""

    def __init__(self, upstream: str, port: int = 0):
        """``port``: 0 for a free one; a stopped proxy's port to bring its URI back."""
        import threading
        from urllib.parse import urlparse

        up = urlparse(upstream)
        self._upstream = (up.hostname, up.port)
        self._listener = socket.create_server(("127.0.0.1", port))
        self.uri = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # stopped
            try:
                server = socket.create_connection(self._upstream, timeout=30)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._stopped:
                    client.close()
                    server.close()
                    return
                self._conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            conns, self._conns = self._conns, []
        with contextlib.suppress(OSError):  # wakes the accepting thread (a bare close would not)
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
