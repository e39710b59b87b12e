"""Shared fixtures. Telemetry and hub lookups are off for every test."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterator

import pytest

for _name, _value in {
    "DAGSTER_DISABLE_TELEMETRY": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "AWS_EC2_METADATA_DISABLED": "true",
}.items():
    os.environ.setdefault(_name, _value)

REPO_ROOT = Path(__file__).resolve().parents[1]

# Helper modules (s3_server.py, pipeline_fixtures.py) live beside this file; with
# --import-mode=importlib the tests folder is not on sys.path by itself.
_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from mlflow_server import MlflowServerInfo, running_mlflow_server  # noqa: E402
from s3_server import S3ServerInfo, running_s3_server  # noqa: E402


def shared_data_dir() -> Path:
    return Path(os.environ.get("AFMRL_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real datasets beside the project; tests using it skip when it is absent."""
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path} (set AFMRL_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3ServerInfo]:
    """A running SeaweedFS S3 endpoint (loopback, one admin key pair), stopped by PID after the session.

    Buckets are not auto-created: make yours with ``s3_server.client().create_bucket(Bucket=...)``
    (names: 3-63 lowercase letters, digits, '-'). ``s3_server.store_options()`` gives the
    keyword arguments for ``open_store`` / ``S3ObjectStore``.
    """
    with running_s3_server(tmp_path_factory.mktemp("s3-server")) as server:
        yield server


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[MlflowServerInfo]:
    """A running ``mlflow server`` (loopback, SQLite backend, artefacts served over HTTP),
    stopped by PID after the session; point ``MlflowTracking(tracking_uri=mlflow_server.url)`` at it."""
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server


@pytest.fixture(scope="session")
def tiny_vlms(tmp_path_factory):
    """``get(family)``: the folder of a tiny random-weight VLM of ``family`` (qwen, llava,
    idefics3), built offline on first use and shared by every test of the session."""
    from afmrl_dagster.vlm.tiny_models import build_tiny_idefics3, build_tiny_llava, build_tiny_qwen2_vl

    builders = {"qwen": build_tiny_qwen2_vl, "llava": build_tiny_llava, "idefics3": build_tiny_idefics3}
    root = tmp_path_factory.mktemp("tiny_vlms")
    built: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in built:
            built[family] = str(builders[family](root / family))
        return built[family]

    return get
