"""Assets called directly as functions, with a built asset context and real resources."""

import dagster as dg
import polars as pl

from afmrl_dagster.assets.attributes import AttributeQualityConfig, teacher_attributes
from afmrl_dagster.catalog.schema import make_catalog
from afmrl_dagster.resources.compute import TorchCompute
from afmrl_dagster.resources.storage import ArtifactStore
from afmrl_dagster.resources.teacher import AttributeTeacherBackend
from teacher_process import teacher_server


def catalog() -> pl.DataFrame:
    return make_catalog([
        {"listing_id": "mug-1", "product_id": "p1", "product_line": "mugs", "title": "Red mug", "source": "test",
         "seller_attributes": {"Color": "Red", "Size": "400ML"}},
        {"listing_id": "mug-2", "product_id": "p1", "product_line": "mugs", "title": "Mug, red, 400 ml", "source": "test",
         "seller_attributes": {"colour": "red"}},
        {"listing_id": "mug-3", "product_id": "p2", "product_line": "mugs", "title": "Blue mug", "source": "test"},
    ])


def invoke(tmp_path, min_valid_share: float, teacher: AttributeTeacherBackend | None = None):
    store = ArtifactStore(location=str(tmp_path))
    with dg.build_asset_context(partition_key="mugs") as context:
        return teacher_attributes(context, AttributeQualityConfig(min_valid_share=min_valid_share), catalog(), store,
                                  teacher or AttributeTeacherBackend(), TorchCompute(device="cpu"))


def test_teacher_attributes_from_a_served_teacher_are_cached_per_listing(tmp_path):
    with teacher_server() as base_url:
        teacher = AttributeTeacherBackend(kind="openai-compatible", base_url=base_url, model="title-facts", revision="1")
        first = invoke(tmp_path, 0.9, teacher)
        assert first.value["attributes_json"].to_list() == ["{}", '{"volume": "400 ml"}', "{}"]
        assert (first.metadata["status"], first.metadata["listings_generated"]) == ("computed", 3)
        assert first.metadata["teacher"] == "openai-compatible@title-facts@1+teacher-v1"
        second = invoke(tmp_path, 0.9, teacher)
        assert (second.metadata["status"], second.metadata["listings_generated"], second.metadata["listings_cached"]) == ("cached", 0, 3)
        assert second.value.equals(first.value)


def test_teacher_attributes_normalise_and_report_checks(tmp_path):
    result = invoke(tmp_path, min_valid_share=0.9)
    table = result.value
    assert table["listing_id"].to_list() == ["mug-1", "mug-2", "mug-3"]
    assert table["attributes_json"][0] == '{"colour": "red", "size": "400 ml"}'
    assert table["is_valid"].all()
    checks = {check.check_name: check.passed for check in result.check_results}
    assert checks == {"attribute_parse_rate": True, "attribute_key_vocabulary": True}
    assert result.metadata["status"] == "computed"
    assert invoke(tmp_path, min_valid_share=0.9).metadata["status"] == "cached"


def test_a_model_version_is_registered_only_once_its_artefact_is_stored(tmp_path, monkeypatch):
    """publish_model stores the folder, then registers the version, then writes the manifest a
    cache hit needs: a store that cannot take the folder leaves no registered version, and a
    published model is found again by its slot."""
    import mlflow
    import pytest
    from mlflow.tracking import MlflowClient

    from afmrl_dagster.assets.publishing import cached_manifest, publish_model
    from afmrl_dagster.encoders.dual_tower import DualTowerConfig, DualTowerHead, save_head
    from afmrl_dagster.storage import LocalObjectStore, StorageError

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking)
    head = DualTowerHead(DualTowerConfig(image_dim=8, text_dim=8, embed_dim=4, hidden_dim=8))
    experiment = MlflowClient(tracking).create_experiment("publish-model")  # its own, not the one an earlier test made active
    try:
        (tmp_path / "not-a-folder").write_text("")
        broken = LocalObjectStore(tmp_path / "not-a-folder")  # its root is a file: nothing can be stored
        with mlflow.start_run(experiment_id=experiment) as run, pytest.raises(StorageError):
            publish_model(None, "encoder", lambda folder: save_head(head, folder), broken, "models/enc/k1", "afmrl-test-encoder", run, {})
        assert not MlflowClient().search_registered_models(filter_string="name='afmrl-test-encoder'")

        store = LocalObjectStore(tmp_path / "store")
        with mlflow.start_run(experiment_id=experiment) as run:
            manifest = publish_model(None, "encoder", lambda folder: save_head(head, folder), store, "models/enc/k1", "afmrl-test-encoder", run,
                                     {"fingerprint": "k1"})
        assert manifest["model_version"] == "1" and cached_manifest(store, "models/enc/k1") == manifest
        assert cached_manifest(store, "models/enc/other") is None
    finally:
        mlflow.set_tracking_uri(previous)


def test_retrieval_index_rebuilds_only_a_refreshed_lines_shard_and_reuses_its_ivf_template(tmp_path):
    """The asset itself, twice over a catalog of three lines with one line re-embedded between:
    the second run builds that line's shard alone and fills it from the stored template."""
    import numpy as np

    from afmrl_dagster.assets.retrieval import RetrievalIndexConfig, retrieval_index
    from afmrl_dagster.features import embeddings_table
    from afmrl_dagster.retrieval.index import open_published_index

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, 16))
    products = rng.integers(0, 40, 3000)

    def vectors(noise_seed: int) -> np.ndarray:
        points = centres[products] + 0.3 * np.random.default_rng(noise_seed).normal(size=(3000, 16))
        return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)

    ids = [f"l{i:04d}" for i in range(3000)]
    lines = [("mugs", "tops", "shoes")[i % 3] for i in range(3000)]
    catalog_rows = make_catalog([{"listing_id": lid, "product_id": f"p{p}", "product_line": line, "title": f"item {p}", "source": "test"}
                                 for lid, p, line in zip(ids, products, lines)])
    store = ArtifactStore(location=str(tmp_path))
    config = RetrievalIndexConfig(kind="ivf", nlist=16, nprobe=16, min_recall_at_10=0.99)
    encoder, generator = {"uri": "encoder-uri", "model_version": "1"}, {"uri": "generator-uri", "model_version": "1"}

    def materialise(embeddings: np.ndarray, settings: RetrievalIndexConfig = config):
        with dg.build_asset_context() as context:
            return retrieval_index(context, settings, catalog_rows, embeddings_table(ids, [f"p{p}" for p in products], embeddings),
                                   encoder, generator, store)

    first_vectors = vectors(1)
    first = materialise(first_vectors)
    assert (first.metadata["shards_built"], first.metadata["shards_reused"], first.metadata["template"]) == (3, 0, "trained")
    refreshed = first_vectors.copy()
    tops = [i for i, line in enumerate(lines) if line == "tops"]
    refreshed[tops] = vectors(2)[tops]
    second = materialise(refreshed)
    assert (second.metadata["shards_built"], second.metadata["shards_reused"], second.metadata["template"]) == (1, 2, "reused")
    assert second.check_results[0].passed  # every list probed: the shards answer as exact search does
    # Each shard's recall, measured when it was built, read back for the reused ones without downloading them.
    assert second.value["shard_recall_at_10"] == {"mugs": 1.0, "shoes": 1.0, "tops": 1.0}
    spread = np.random.default_rng(5).normal(size=(3000, 16))  # no clusters: a query's neighbours lie in several lists
    spread = (spread / np.linalg.norm(spread, axis=1, keepdims=True)).astype(np.float32)
    coarse = materialise(spread, RetrievalIndexConfig(kind="ivf", nlist=16, nprobe=1, min_recall_at_10=0.99))
    assert coarse.metadata["shards_built"] == 3 and not coarse.check_results[0].passed  # one list of 16 probed: the gate fails
    assert coarse.check_results[0].metadata["recall_at_10_vs_exact"].value < 0.99
    index, listings = open_published_index(store.open(), second.value["uri"])
    _, rows = index.search(refreshed[tops[:5]], 1)
    assert listings["listing_id"].gather(rows[:, 0]).to_list() == [ids[i] for i in tops[:5]]
