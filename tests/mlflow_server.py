"""A real ``mlflow server`` on loopback for tests: a SQLite database as the backend store, a
folder as the artefact store (served by the server, so clients upload and download over
HTTP as they would against a team's server), stopped by its own PID."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from s3_server import free_ports, log_tail, stop_process_group


@dataclass(frozen=True)
class MlflowServerInfo:
    url: str
    pid: int
    backend_store_uri: str
    artifacts_destination: Path


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@contextlib.contextmanager
def running_mlflow_server(root: Path, timeout: float = 90.0) -> Iterator[MlflowServerInfo]:
    """Start ``mlflow server`` with its database and artefacts under ``root``; wait for ``/health``
    to answer, yield, then stop the server's process group (it runs uvicorn workers)."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    (port,) = free_ports(1)
    backend = f"sqlite:///{root / 'mlflow.db'}"
    artifacts = root / "artifacts"
    log_path = root / "mlflow-server.log"
    mlflow = Path(sys.executable).with_name("mlflow")
    command = [
        "env", "--default-signal=INT,TERM", str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", backend, "--artifacts-destination", str(artifacts), "--serve-artifacts", "--workers", "1",
    ]
    environment = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=root, env=environment, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    info = MlflowServerInfo(url=f"http://127.0.0.1:{port}", pid=process.pid, backend_store_uri=backend, artifacts_destination=artifacts)
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(info.url):
            if process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with code {process.returncode}; log tail:\n{log_tail(log_path)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not answer {info.url}/health within {timeout:.0f} s; log tail:\n{log_tail(log_path)}")
            time.sleep(0.25)
        yield info
    finally:
        stop_process_group(process)  # its uvicorn workers are in the same group
