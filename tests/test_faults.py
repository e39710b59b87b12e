"""Faults with real processes: writers racing on one artefact, and a writer SIGKILLed in the middle
of an upload, on the local store and on a real S3 server (SeaweedFS). Every published artefact
must verify, the previous version must survive a kill, and nothing a killed writer left behind
(an unfinished multipart upload, a local temp file) may outlive the next publishes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from afmrl_dagster.storage import COMPLETE_MARKER, TEMP_SUFFIX, VERSIONS_FOLDER, ObjectStore, open_store

MIB = 1024 * 1024
PART = 5 * MIB  # the smallest S3 part: files above it go up in several parts

WRITER = """
import json, sys
from afmrl_dagster.storage import open_store

location, prefix, folder, options = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
open_store(location, **options).upload_directory(folder, prefix)
"""


def writer(location: str, prefix: str, folder: Path, options: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, location, prefix, str(folder), json.dumps(options)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def model_folder(path: Path, label: str, big_files: int = 0, big_mib: int = 12) -> Path:
    (path / "weights").mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"writer": label}))
    (path / "weights" / "head.bin").write_bytes(os.urandom(4096))
    for i in range(big_files):
        (path / "weights" / f"shard-{i}.bin").write_bytes(os.urandom(big_mib * MIB))
    return path


@pytest.fixture(params=["local", "s3"])
def target(request, tmp_path):
    """(location, open_store options, a store on it) for the local store or a bucket on the session's S3 server."""
    if request.param == "local":
        location, options = str(tmp_path / "store"), {}
    else:
        server = request.getfixturevalue("s3_server")
        bucket = f"faults-{os.getpid()}-{time.monotonic_ns() % 10**9}"
        server.client().create_bucket(Bucket=bucket)
        location, options = f"s3://{bucket}/afmrl", {**server.store_options(), "multipart_threshold": PART}
    return location, options, open_store(location, **options)


def verified_writer(store: ObjectStore, prefix: str, into: Path) -> str:
    """Download ``prefix`` (every file checked against the manifest's SHA-256) and say who wrote it."""
    return json.loads((store.download_directory(prefix, into) / "config.json").read_text())["writer"]


def test_two_writer_processes_at_once_always_leave_one_verifying_version(target, tmp_path):
    """Three rounds of two processes publishing different folders (12 MiB shards, in parts on S3)
    to one prefix at the same moment: both exit 0 and the published version downloads and
    verifies, whole, from one of them."""
    location, options, store = target
    folders = [model_folder(tmp_path / f"w{i}", f"w{i}", big_files=1) for i in range(2)]
    for round_ in range(3):
        processes = [writer(location, "models/race", folder, options) for folder in folders]
        outcomes = [(process.wait(timeout=300), process.stderr.read()) for process in processes]
        assert all(code == 0 for code, _ in outcomes), outcomes
        assert verified_writer(store, "models/race", tmp_path / f"copy{round_}") in ("w0", "w1")


def _kill_mid_upload(location: str, options: dict, store: ObjectStore, folder: Path, prefix: str) -> None:
    """Start a writer of ``folder`` and SIGKILL it once part of the new version is stored and
    before its manifest is: a multipart upload with a part on S3, a finished shard locally."""
    process = writer(location, prefix, folder, options)
    versions = f"{prefix}/{VERSIONS_FOLDER}/"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if options:  # S3: an upload with at least one part stored
                client, bucket = store.client, store.bucket
                full = store._full_key(versions.rstrip("/")) + "/"
                uploads = client.list_multipart_uploads(Bucket=bucket, Prefix=full).get("Uploads", [])
                if any(client.list_parts(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"]).get("Parts") for u in uploads):
                    break
            elif any(key.endswith("shard-0.bin") for key in store.list_keys(versions)):
                break
            time.sleep(0.01)
        assert process.poll() is None, f"the writer finished before it could be killed: {process.stderr.read()[-2000:]}"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()


def _leftovers(store: ObjectStore, options: dict, prefix: str) -> list[str]:
    """What killed writers left under ``prefix``: open multipart uploads on S3, temp files locally."""
    if options:
        full = store._full_key(prefix) + "/"
        return [u["Key"] for u in store.client.list_multipart_uploads(Bucket=store.bucket, Prefix=full).get("Uploads", [])]
    return [str(path) for path in Path(store.uri(prefix)).rglob(f"*{TEMP_SUFFIX}")]


def test_a_writer_killed_mid_upload_loses_nothing_and_leaves_nothing_after_the_next_publishes(target, tmp_path):
    """Version A is published; a writer of version B (three 24 MiB shards) is SIGKILLed part-way.
    A is still what readers get, whole and verifying. Two more publishes (C, then D: the first
    keeps A for readers still fetching it, the second no longer does) clear what the killed
    writer left: no open multipart upload, no temp file, no stray version folder."""
    location, options, store = target
    prefix = "models/killed"
    store.upload_directory(model_folder(tmp_path / "a", "A"), prefix)
    manifest_a = store.get_bytes(f"{prefix}/{COMPLETE_MARKER}")
    _kill_mid_upload(location, options, store, model_folder(tmp_path / "b", "B", big_files=3, big_mib=24), prefix)

    assert store.get_bytes(f"{prefix}/{COMPLETE_MARKER}") == manifest_a
    assert verified_writer(store, prefix, tmp_path / "after-kill") == "A"
    assert any(f"/{VERSIONS_FOLDER}/" in key for key in store.list_keys(prefix)) or _leftovers(store, options, prefix)
    for label in ("C", "D"):
        store.upload_directory(model_folder(tmp_path / label.lower(), label), prefix)
    assert verified_writer(store, prefix, tmp_path / "after-d") == "D"
    assert _leftovers(store, options, prefix) == []
    manifest = json.loads(store.get_bytes(f"{prefix}/{COMPLETE_MARKER}"))
    folders = {key.split("/")[3] for key in store.list_keys(f"{prefix}/{VERSIONS_FOLDER}/")}
    assert folders == {manifest["version"], manifest["previous_version"]}  # D, and C kept for its readers


def test_the_reliability_benchmark_finds_no_crash_hang_or_lost_object(tmp_path):
    """``benchmarks/reliability.py`` (one round of each writer fault): every hostile input gets a
    clear error and every fault is survived; it exits 1 on the first crash, hang or lost object."""
    results = tmp_path / "results.md"
    results.write_text("<!-- reliability:start -->\n<!-- reliability:end -->\n")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "reliability.py"
    done = subprocess.run([sys.executable, str(script), "--rounds", "1", "--write-results", str(results)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    total = next(line for line in results.read_text().splitlines() if line.startswith("| **all** |"))
    tried, clear, crashes, hangs, lost = (int(cell) for cell in total.strip("|").split("|")[1:])
    assert tried == clear >= 60 and crashes == hangs == lost == 0, total
