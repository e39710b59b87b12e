"""Indexes for large catalogs: the kind chosen by size, IVF-PQ with re-ranking, a template trained
once and reused, its drift check, shards by product line, and the ANN benchmark script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest

from afmrl_dagster.retrieval.index import (
    EXACT_UP_TO,
    HNSW_UP_TO,
    IndexConfig,
    build_index,
    index_bytes,
    recall_against_exact,
    resolve_kind,
    search,
)
from afmrl_dagster.retrieval.index_template import IndexTemplate
from afmrl_dagster.retrieval.shards import ShardedIndex

REPO_ROOT = Path(__file__).resolve().parents[1]


def clustered(n: int, dim: int = 32, clusters: int = 60, seed: int = 0, spread: float = 0.3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    points = centres[rng.integers(0, clusters, n)] + spread * rng.normal(size=(n, dim))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def test_auto_chooses_exact_then_hnsw_then_ivfpq_by_size_and_an_explicit_kind_wins():
    auto = IndexConfig()
    assert [resolve_kind(auto, n) for n in (10, EXACT_UP_TO, EXACT_UP_TO + 1, HNSW_UP_TO, HNSW_UP_TO + 1)] == [
        "flat", "flat", "hnsw", "hnsw", "ivfpq"]
    assert resolve_kind(IndexConfig(kind="ivfpq"), 10) == "ivfpq"
    assert isinstance(build_index(clustered(50), auto), faiss.IndexFlatIP)
    with pytest.raises(ValueError, match="refine"):
        IndexConfig(refine="pca")
    with pytest.raises(ValueError, match="pq_m"):
        build_index(clustered(2000, dim=30), IndexConfig(kind="ivfpq", pq_m=8))


def test_ivfpq_with_re_ranking_finds_what_exact_search_finds_in_a_fraction_of_the_bytes():
    embeddings = clustered(6000)
    ranked = build_index(embeddings, IndexConfig(kind="ivfpq", nlist=32, nprobe=16, pq_m=8, refine_factor=10))
    assert recall_against_exact(ranked, embeddings, sample_size=200, k=10) >= 0.9
    codes_only = build_index(embeddings, IndexConfig(kind="ivfpq", nlist=32, nprobe=16, pq_m=8, refine="none"))
    assert index_bytes(codes_only) / len(embeddings) < 0.3 * index_bytes(build_index(embeddings, IndexConfig(kind="flat"))) / len(embeddings)
    assert recall_against_exact(codes_only, embeddings, sample_size=200, k=10) < recall_against_exact(ranked, embeddings, sample_size=200, k=10)


def test_a_template_trained_once_takes_a_new_line_as_a_rebuild_over_it_would(tmp_path):
    gallery, line = clustered(5000, seed=1), clustered(800, seed=2)
    template = IndexTemplate.train(gallery[:3000], IndexConfig(kind="ivfpq", nlist=24, nprobe=24, pq_m=8), size=5000)
    assert template.kind == "ivfpq" and template.index.ntotal == 0 and template.residual > 0
    grown = template.filled(gallery)
    grown.add(line)  # the refresh: the line's vectors only
    rebuilt = template.filled(np.concatenate([gallery, line]))
    queries = np.concatenate([gallery[:20], line[:20]])
    for got, want in zip(search(grown, queries, 10), search(rebuilt, queries, 10)):
        np.testing.assert_array_equal(got, want)
    assert template.index.ntotal == 0  # filling copies the template
    again = IndexTemplate.from_bytes(template.to_bytes())
    assert (again.kind, again.trained_on, again.residual) == (template.kind, 3000, template.residual)
    for got, want in zip(search(again.filled(gallery), queries, 10), search(template.filled(gallery), queries, 10)):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="not an index template"):
        IndexTemplate.from_bytes(b"\x04\x00\x00\x00\x00\x00\x00\x00{}{}garbage")
    full = IndexTemplate(template.filled(gallery[:10]), "ivfpq", 3000, 1.0)
    with pytest.raises(ValueError, match="must be empty"):
        IndexTemplate.from_bytes(full.to_bytes())


def test_drift_stays_near_one_for_the_sample_s_products_and_asks_for_retraining_on_new_ones():
    gallery = clustered(6000, seed=3)
    template = IndexTemplate.train(gallery[:4000], IndexConfig(kind="ivf", nlist=30))
    assert 0.8 < template.drift(gallery[4000:]) < 1.1 and not template.needs_retraining(gallery[4000:])
    elsewhere = clustered(1000, clusters=5, seed=99, spread=0.05)  # products the lists were not trained on
    assert template.drift(elsewhere) > 1.25 and template.needs_retraining(elsewhere)
    flat = IndexTemplate.train(gallery, IndexConfig(kind="flat"))
    assert flat.drift(elsewhere) == 1.0 and flat.filled(gallery).ntotal == len(gallery)


def test_shards_by_line_search_together_as_one_index_and_a_line_is_replaced_alone():
    gallery = clustered(3000, seed=4)
    lines = np.random.default_rng(0).integers(0, 3, len(gallery))
    sharded = ShardedIndex()
    for line in range(3):
        rows = np.flatnonzero(lines == line)
        sharded.put(f"line-{line}", build_index(gallery[rows], IndexConfig(kind="flat")), rows)
    assert sharded.ntotal == len(gallery)
    whole = build_index(gallery, IndexConfig(kind="flat"))
    queries = clustered(25, seed=5)
    scores, rows = sharded.search(queries, 10)
    want_scores, want_rows = search(whole, queries, 10)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-6)
    kept = np.flatnonzero(lines == 0)[:5]  # line 0 refreshed down to five listings; the other shards untouched
    other = sharded.shards["line-1"][0]
    sharded.put("line-0", build_index(gallery[kept], IndexConfig(kind="flat")), kept)
    assert sharded.shards["line-1"][0] is other and sharded.ntotal == 5 + int((lines > 0).sum())
    _, rows = sharded.search(gallery[kept[:2]], 3)
    assert rows[:, 0].tolist() == kept[:2].tolist()
    with pytest.raises(ValueError, match="repeats gallery rows"):
        sharded.put("line-9", build_index(gallery[:2], IndexConfig(kind="flat")), np.flatnonzero(lines == 2)[:2])
    small = ShardedIndex()
    small.put("tiny", build_index(gallery[:3], IndexConfig(kind="flat")), np.arange(3))
    scores, rows = small.search(gallery[:1], 5)
    assert rows[0].tolist()[3:] == [-1, -1] and np.isneginf(scores[0, 3:]).all()


def test_stored_shards_rebuild_only_the_refreshed_line_and_reuse_the_template_until_the_catalog_drifts(tmp_path):
    import polars as pl

    from afmrl_dagster.retrieval.index import open_published_index, publish_index
    from afmrl_dagster.retrieval.shards import open_line_shards, publish_line_shards
    from afmrl_dagster.storage import StorageError, open_store

    store = open_store(str(tmp_path / "store"))
    gallery = clustered(4000, seed=6)
    lines = [f"line-{i % 4}" for i in range(len(gallery))]
    ids = [f"l{i:05d}" for i in range(len(gallery))]
    config = IndexConfig(kind="ivf", nlist=24, nprobe=24)
    first = publish_line_shards(store, gallery, ids, lines, config, family="encoder-a")
    assert (sorted(first.built), first.reused, first.template) == ([f"line-{i}" for i in range(4)], [], "trained")
    sharded = open_line_shards(store, first.shards, ids)
    exact = build_index(gallery, IndexConfig(kind="flat"))
    queries = clustered(30, seed=7)
    np.testing.assert_array_equal(sharded.search(queries, 5)[1], search(exact, queries, 5)[1])  # every list probed: exact

    refreshed = gallery.copy()
    changed = [i for i, line in enumerate(lines) if line == "line-2"]
    refreshed[changed] = clustered(len(gallery) + len(changed), seed=6)[len(gallery):]  # line 2 re-embedded: new vectors, same products
    second = publish_line_shards(store, refreshed, ids, lines, config, family="encoder-a")
    assert (second.built, sorted(second.reused), second.template) == (["line-2"], ["line-0", "line-1", "line-3"], "reused")
    assert second.drift < 1.25 and second.template_key == first.template_key
    assert all(second.shards[line] == first.shards[line] for line in second.reused)

    moved = clustered(len(gallery), seed=9, clusters=7, spread=1.5) + 3.0  # a catalog far from the template's sample
    third = publish_line_shards(store, moved, ids, lines, config, family="encoder-a")
    assert third.template == "retrained" and third.drift > 1.25 and len(third.built) == 4 and third.template_key != first.template_key
    assert publish_line_shards(store, moved, ids, lines, config, family="encoder-b").template == "trained"  # another encoder, its own

    listings = pl.DataFrame({"listing_id": ids, "title": [f"t{i}" for i in range(len(ids))]})
    manifest = publish_index(store, "indexes/published", second.shards, listings, {"kind": "ivf"})
    index, table = open_published_index(store, manifest["uri"])
    assert manifest["rows"] == index.ntotal == len(ids) and table["listing_id"].to_list() == ids
    np.testing.assert_array_equal(index.search(queries, 5)[1], search(build_index(refreshed, IndexConfig(kind="flat")), queries, 5)[1])
    shard = second.shards["line-0"]
    data = next(key for key in store.list_keys(shard + "/") if key.endswith("index.faiss"))
    store.put_bytes(data, b"not the index that was published")
    with pytest.raises(StorageError, match="does not match"):
        open_published_index(store, manifest["uri"])  # fails closed on a shard whose checksum no longer verifies


def test_ann_benchmark_writes_both_tables(tmp_path):
    results = tmp_path / "results.md"
    results.write_text("before\n<!-- ann-benchmark:start -->\nold\n<!-- ann-benchmark:end -->\nafter\n")
    done = subprocess.run(
        [sys.executable, "benchmarks/ann.py", "--size", "20000", "--dim", "32", "--line-size", "2000", "--queries", "50",
         "--write-results", str(results)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    text = results.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "old" not in text
    assert "| exact (flat) | - |" in text and "| HNSW (M 32) | efSearch 128 |" in text and "nprobe 32" in text
    assert "| exact (flat) | " in text.split("A new product line")[1] and "rebuild / add" in text
