"""`dagster dev` (webserver + daemon + code server) on loopback for tests, stopped by PID."""

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from s3_server import free_ports, log_tail, stop_process_group

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class DagsterServer:
    url: str
    pid: int

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        request = urllib.request.Request(f"{self.url}/graphql", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            payload = json.loads(response.read())
        if payload.get("errors"):
            raise RuntimeError(f"GraphQL errors: {payload['errors']}")
        return payload["data"]


@contextlib.contextmanager
def running_dagster_dev(dagster_home: Path, env: dict[str, str], log_dir: Path, timeout: float = 90.0) -> Iterator[DagsterServer]:
    """Start ``dagster dev`` with the project's workspace.yaml against ``dagster_home``; wait until the
    code location has loaded (a real GraphQL answer), then yield; stop the whole process group."""
    (port,) = free_ports(1)
    log_path = log_dir / "dagster-dev.log"
    dagster = Path(sys.executable).with_name("dagster")
    command = ["env", "--default-signal=INT,TERM", str(dagster), "dev", "-w", str(REPO_ROOT / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env={**os.environ, **env, "DAGSTER_HOME": str(dagster_home)},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    server = DagsterServer(url=f"http://127.0.0.1:{port}", pid=process.pid)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"dagster dev exited with code {process.returncode}; log tail:\n{log_tail(log_path)}")
            try:
                data = server.graphql("{ workspaceOrError { ... on Workspace { locationEntries { name locationOrLoadError { __typename } } } } }")
                entries = data["workspaceOrError"]["locationEntries"]
                if entries and entries[0]["locationOrLoadError"] and entries[0]["locationOrLoadError"]["__typename"] == "RepositoryLocation":
                    break
                if entries and entries[0]["locationOrLoadError"] and entries[0]["locationOrLoadError"]["__typename"] == "PythonError":
                    raise RuntimeError(f"code location failed to load; log tail:\n{log_tail(log_path)}")
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"dagster dev not ready within {timeout:.0f} s; log tail:\n{log_tail(log_path)}")
            time.sleep(0.5)
        yield server
    finally:
        stop_process_group(process, grace_seconds=30)
