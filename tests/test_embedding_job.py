"""The resumable embedding job: chunks stored as they are done, a killed run resumed from them,
and a chunk that does not verify embedded again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from afmrl_dagster.encoders.dual_tower import DualTowerConfig, DualTowerHead, ListingFeatures
from afmrl_dagster.encoders.embedding_job import CHUNK_FILE, embed_resumably, read_chunk
from afmrl_dagster.encoders.listing_encoder import FrozenTowerEncoder, ListingInputs
from afmrl_dagster.storage import LocalObjectStore

REPO_ROOT = Path(__file__).resolve().parents[1]
JOB = "work/catalog_embeddings/test-job"
# The driver a killed run executes: the same encoder and inputs as setup() below, one chunk every 0.3 s.
DRIVER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from test_embedding_job import setup, JOB
    from afmrl_dagster.encoders.embedding_job import embed_resumably
    from afmrl_dagster.storage import LocalObjectStore
    encoder, inputs = setup()
    embed_resumably(encoder, inputs, LocalObjectStore({root!r}), JOB, chunk_size=10, progress=lambda *_: time.sleep(0.3))
""")


def setup(n: int = 200) -> tuple[FrozenTowerEncoder, ListingInputs]:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    features = ListingFeatures([f"l{i:04d}" for i in range(n)], rng.normal(size=(n, 12)), rng.random(n) > 0.1, rng.normal(size=(n, 8)))
    encoder = FrozenTowerEncoder(DualTowerHead(DualTowerConfig(embed_dim=8, image_dim=12, text_dim=8, hidden_dim=16)))
    return encoder, ListingInputs(features.listing_ids, ["t"] * n, features=features)


def test_chunks_are_stored_as_they_are_done_and_a_rerun_reads_them_back(tmp_path):
    encoder, inputs = setup()
    store = LocalObjectStore(tmp_path / "store")
    seen = []
    embeddings, report = embed_resumably(encoder, inputs, store, JOB, chunk_size=64, progress=lambda done, total, _: seen.append(done))
    np.testing.assert_array_equal(embeddings, encoder.embed(inputs))
    assert seen == [64, 128, 192, 200] and (report.chunks, report.chunks_reused, report.listings_embedded) == (4, 0, 200)
    assert report.listings_per_second > 0 and report.as_metadata()["chunks"] == 4
    assert store.list_keys(JOB + "/") == [f"{JOB}/{CHUNK_FILE.format(i)}" for i in range(4)]
    again, report = embed_resumably(encoder, inputs, store, JOB, chunk_size=64)
    np.testing.assert_array_equal(again, embeddings)
    assert (report.chunks_reused, report.listings_embedded, report.listings_per_second) == (4, 0, 0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        embed_resumably(encoder, inputs, store, JOB, chunk_size=0)


def test_a_chunk_that_does_not_verify_is_embedded_again_never_trusted(tmp_path):
    encoder, inputs = setup()
    store = LocalObjectStore(tmp_path / "store")
    embeddings, _ = embed_resumably(encoder, inputs, store, JOB, chunk_size=64)
    first, second = (f"{JOB}/{CHUNK_FILE.format(i)}" for i in (0, 1))
    store.put_bytes(first, store.get_bytes(first)[:100])  # cut short
    stored = store.get_bytes(second)
    assert read_chunk(stored, inputs.listing_ids[64:128]) is not None
    assert read_chunk(stored, inputs.listing_ids[65:129]) is None  # other listings: not this chunk
    tampered = bytearray(stored)
    tampered[-200] ^= 0xFF
    store.put_bytes(second, bytes(tampered))
    again, report = embed_resumably(encoder, inputs, store, JOB, chunk_size=64)
    np.testing.assert_array_equal(again, embeddings)
    assert (report.chunks_reused, report.listings_embedded) == (2, 128)
    assert read_chunk(store.get_bytes(first), inputs.listing_ids[:64]) is not None  # rewritten whole


def test_a_killed_run_resumes_from_the_chunks_it_stored(tmp_path):
    root = tmp_path / "store"
    driver = DRIVER.format(tests=str(REPO_ROOT / "tests"), root=str(root))
    process = subprocess.Popen([sys.executable, "-c", driver], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True)
    store = LocalObjectStore(root)
    deadline = time.monotonic() + 120
    try:
        while len(store.list_keys(JOB + "/")) < 3 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    stored = len(store.list_keys(JOB + "/"))
    assert 3 <= stored < 20  # killed midway: 200 listings are 20 chunks of 10
    encoder, inputs = setup()
    embeddings, report = embed_resumably(encoder, inputs, store, JOB, chunk_size=10)
    np.testing.assert_array_equal(embeddings, encoder.embed(inputs))
    assert report.chunks_reused >= stored - 1 and report.listings_embedded == 10 * (20 - report.chunks_reused)
