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
