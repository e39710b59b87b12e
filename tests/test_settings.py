"""Environment defaults live in ``afmrl_dagster.settings`` only, are read when the definitions
load (not at import), and one ``Settings`` chooses the resources, sensors and executor."""

from __future__ import annotations

import re

import dagster as dg
import pytest

from afmrl_dagster.definitions import build_definitions, build_resources
from afmrl_dagster.settings import DEFAULT_STORE, DEFAULT_TRACKING_URI, Settings
from conftest import REPO_ROOT


def test_an_empty_environment_gives_the_defaults():
    assert Settings.from_env({}) == Settings()
    assert Settings().store == ".afmrl/store" and Settings().tracking_uri == "sqlite:///.afmrl/mlflow.db"


def test_settings_read_every_variable():
    environ = {
        "AFMRL_STORE": "s3://bucket/afmrl", "AFMRL_S3_ENDPOINT_URL": "http://minio:9000", "AWS_REGION": "eu-west-1",
        "MLFLOW_TRACKING_URI": "http://mlflow:5000", "AFMRL_CATALOG": "parquet:s3://bucket/catalog", "AFMRL_DEVICE": "cuda:1",
        "AFMRL_IMAGE_TOWER": "openai/clip-vit-base-patch32", "AFMRL_TEXT_TOWER": "my-text", "AFMRL_TEACHER": "openai-compatible",
        "AFMRL_TEACHER_URL": "http://gpu:8000/v1", "AFMRL_TEACHER_MODEL": "big", "AFMRL_TEACHER_REVISION": "r2",
        "AFMRL_AUTOMATION": "OFF", "AFMRL_SENSOR_INTERVAL_SECONDS": "60", "AFMRL_EXECUTOR": "K8s", "AFMRL_K8S_GPUS": "2",
        "AFMRL_DATA": "/data", "AWS_ACCESS_KEY_ID": "key", "AFMRL_GENERATOR": "hf-vlm:Qwen/Qwen2.5-VL-3B-Instruct",
        "AFMRL_IMAGE_ROOTS": " s3://bucket/images, /mnt/photos ,", "AFMRL_CHECKPOINTS": "/mnt/checkpoints", "AFMRL_WORLD_SIZE": "4",
    }
    assert Settings.from_env(environ) == Settings(
        store="s3://bucket/afmrl", s3_endpoint_url="http://minio:9000", aws_region="eu-west-1", tracking_uri="http://mlflow:5000",
        catalog="parquet:s3://bucket/catalog", image_roots=("s3://bucket/images", "/mnt/photos"), device="cuda:1", checkpoints="/mnt/checkpoints",
        image_tower="openai/clip-vit-base-patch32", text_tower="my-text",
        teacher="openai-compatible", teacher_url="http://gpu:8000/v1", teacher_model="big", teacher_revision="r2",
        generator="hf-vlm:Qwen/Qwen2.5-VL-3B-Instruct", automation=False, sensor_interval_seconds=60, executor="k8s", k8s_gpus=2, data="/data",
        world_size=4, secrets_set=frozenset({"AWS_ACCESS_KEY_ID"}),
    )


@pytest.mark.parametrize("name, value, message", [
    ("AFMRL_AUTOMATION", "maybe", "'on' or 'off'"),
    ("AFMRL_SENSOR_INTERVAL_SECONDS", "0", "whole number of seconds"),
    ("AFMRL_EXECUTOR", "kubernetes", "'multiprocess' or 'k8s'"),
    ("AFMRL_K8S_GPUS", "one", "whole number of GPUs"),
    ("AFMRL_WORLD_SIZE", "0", "at least 1"),
    ("AFMRL_GENERATOR", "hf-vlm:", "'compact' or 'hf-vlm:<hub id or local folder>'"),
    ("AFMRL_GENERATOR", "qwen", "'compact' or 'hf-vlm:<hub id or local folder>'"),
    ("AFMRL_TEACHER", "hf-vlm", "needs the model"),
])
def test_bad_values_are_named(name, value, message):
    with pytest.raises(ValueError, match=message):
        Settings.from_env({name: value})


def test_resources_come_from_the_settings():
    resources = build_resources(Settings(store="s3://afmrl-bucket/store", tracking_uri="http://mlflow:5000", catalog="builtin:families=2",
                                         device="cpu", text_tower="my-text", teacher_revision="r1", secrets_set=frozenset({"AWS_ACCESS_KEY_ID"})))
    assert resources["artifact_store"].location == "s3://afmrl-bucket/store"
    assert resources["artifact_store"].access_key_id is not None and resources["artifact_store"].secret_access_key is None
    assert resources["mlflow_tracking"].tracking_uri == "http://mlflow:5000"
    assert resources["catalog_source"].spec == "builtin:families=2"
    assert resources["torch_compute"].device == "cpu"
    assert resources["feature_towers"].text_model == "my-text"
    assert resources["attribute_teacher"].revision == "r1"
    assert resources["generator_backend"].spec == "compact"
    assert build_resources(Settings(generator="hf-vlm:/models/student"))["generator_backend"].kind() == "hf-vlm"


def test_the_environment_is_read_when_the_definitions_load(monkeypatch):
    """Not at import: a variable set after the modules are imported still counts."""
    monkeypatch.setenv("AFMRL_AUTOMATION", "off")
    monkeypatch.setenv("AFMRL_SENSOR_INTERVAL_SECONDS", "45")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    definitions = build_definitions()
    sensors = {sensor.name: sensor for sensor in definitions.sensors}
    assert {sensor.default_status for sensor in sensors.values()} == {dg.DefaultSensorStatus.STOPPED}
    assert sensors["new_product_line_sensor"].minimum_interval_seconds == 45
    assert sensors["catalog_automation_sensor"].minimum_interval_seconds == 30
    assert definitions.resources["mlflow_tracking"].tracking_uri == "http://mlflow.example:5000"


def test_the_resources_defaults_are_the_settings_defaults():
    from afmrl_dagster.resources.catalog_source import CatalogSource
    from afmrl_dagster.resources.compute import TorchCompute
    from afmrl_dagster.resources.models import FeatureTowers, GeneratorBackend
    from afmrl_dagster.resources.storage import ArtifactStore
    from afmrl_dagster.resources.teacher import AttributeTeacherBackend
    from afmrl_dagster.resources.tracking import MlflowTracking

    defaults = Settings()
    assert ArtifactStore().location == defaults.store
    assert MlflowTracking().tracking_uri == defaults.tracking_uri
    assert CatalogSource(store=ArtifactStore()).spec == defaults.catalog
    assert TorchCompute().device == defaults.device
    assert (FeatureTowers().image_model, FeatureTowers().text_model) == (defaults.image_tower, defaults.text_tower)
    assert AttributeTeacherBackend().kind == defaults.teacher
    assert GeneratorBackend().spec == defaults.generator


def test_the_store_and_tracking_defaults_are_written_once():
    """Only settings.py has the default store and tracking URI as string literals; the rest
    import them (prose in docstrings and help texts may still name them)."""
    written = []
    for folder in ("afmrl_dagster", "assets", "resources", "benchmarks"):
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            if path == REPO_ROOT / "afmrl_dagster" / "settings.py":
                continue
            text = path.read_text()
            for literal in (DEFAULT_TRACKING_URI, DEFAULT_STORE):
                if re.search(r"""["']""" + re.escape(literal) + r"""["']""", text):
                    written.append(f"{path.relative_to(REPO_ROOT)}: {literal}")
    assert not written, written
