"""Start and stop ``afmrl serve-teacher`` as its own process for tests."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from typing import Iterator

import requests

_SERVING = re.compile(r"serving (\S+) on (http://\S+/v1)")


@contextlib.contextmanager
def teacher_server(*args: str, env: dict | None = None) -> Iterator[str]:
    """``afmrl serve-teacher --port 0 ARGS`` in its own process; yields its base URL, kills it by PID."""
    process = subprocess.Popen(
        [sys.executable, "-m", "afmrl_dagster.apps.cli", "serve-teacher", "--port", "0", *args],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={**os.environ, **(env or {})},
    )
    try:
        deadline = time.monotonic() + 120
        line = ""
        while time.monotonic() < deadline and process.poll() is None:
            line = process.stdout.readline()
            if _SERVING.search(line):
                break
        match = _SERVING.search(line)
        assert match, f"server did not start (exit {process.poll()}), last line {line!r}"
        base_url = match.group(2)
        assert requests.get(base_url.removesuffix("/v1") + "/health", timeout=10).json() == {"status": "ok"}
        yield base_url
    finally:
        process.kill()
        process.wait(timeout=30)
