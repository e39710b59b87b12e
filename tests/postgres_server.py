"""A real PostgreSQL server on loopback for tests (Debian's postgresql binaries), in a
throwaway data folder, stopped by ``pg_ctl`` and then by its PID."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from s3_server import free_ports, log_tail

USER = "afmrl"


def find_postgres_bin() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl``: on PATH, or Debian's /usr/lib/postgresql/N/bin."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(os.path.realpath(on_path)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    return Path(candidates[0]).parent if candidates else None


@dataclass(frozen=True)
class PostgresInfo:
    host: str
    port: int
    user: str

    def env(self, database: str) -> dict[str, str]:
        """The variables ``deploy/dagster.yaml`` reads."""
        return {"DAGSTER_PG_HOST": self.host, "DAGSTER_PG_PORT": str(self.port), "DAGSTER_PG_USER": self.user,
                "DAGSTER_PG_PASSWORD": "unused-with-trust-auth", "DAGSTER_PG_DB": database}


@contextlib.contextmanager
def running_postgres(bin_dir: Path, timeout: float = 60.0) -> Iterator[PostgresInfo]:
    """``initdb`` a cluster (trust authentication on loopback only), start it, yield, stop it.

    PostgreSQL refuses to run as root; as root the server runs as the ``postgres`` system user
    (which Debian's package creates), in a folder it owns."""
    as_root = os.geteuid() == 0
    base = Path(tempfile.mkdtemp(prefix="afmrl-pg-"))
    run_as: list[str] = []
    if as_root:
        owner = pwd.getpwnam("postgres")
        os.chown(base, owner.pw_uid, owner.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    data, log_path = base / "data", base / "server.log"
    (port,) = free_ports(1)
    env = {**os.environ, "LC_ALL": "C"}
    try:
        subprocess.run([*run_as, str(bin_dir / "initdb"), "-D", str(data), "-U", USER, "--auth=trust", "--no-sync"],
                       check=True, capture_output=True, env=env, timeout=120)
        options = f"-h 127.0.0.1 -p {port} -k {base} -c fsync=off"
        subprocess.run([*run_as, str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(log_path), "-w", "-t", str(int(timeout)), "start"],
                       check=True, capture_output=True, env=env, timeout=timeout + 10)
    except subprocess.CalledProcessError as error:
        shutil.rmtree(base, ignore_errors=True)
        raise RuntimeError(f"PostgreSQL did not start: {error.stderr.decode(errors='replace')[-2000:]}\n{log_tail(log_path)}") from error
    pid = int((data / "postmaster.pid").read_text().splitlines()[0])
    try:
        yield PostgresInfo(host="127.0.0.1", port=port, user=USER)
    finally:
        subprocess.run([*run_as, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True, env=env, timeout=60)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(base, ignore_errors=True)
