"""Resources and configs for running the real pipeline small and fast in tests."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from afmrl_dagster.assets.attributes import AttributeGeneratorConfig
from afmrl_dagster.assets.cit import CITConfig
from afmrl_dagster.assets.encoder import EncoderTrainingRunConfig
from afmrl_dagster.assets.rar import RARConfig
from afmrl_dagster.assets.retrieval import EvaluationConfig
from afmrl_dagster.resources.catalog_source import CatalogSource
from afmrl_dagster.resources.compute import TorchCompute
from afmrl_dagster.resources.io_manager import TableIOManager
from afmrl_dagster.resources.models import EvaluationSplit, FeatureTowers, GeneratorBackend, ListingEncoderBackend
from afmrl_dagster.resources.storage import ArtifactStore
from afmrl_dagster.resources.teacher import AttributeTeacherBackend
from afmrl_dagster.resources.tracking import MlflowTracking


TINY_CATALOG = "builtin:families=2,siblings=2,listings=3"


def tiny_resources(root: Path, catalog_spec: str = TINY_CATALOG, store: ArtifactStore | None = None, tracking_uri: str | None = None,
                   encoder: str = "dual-tower", teacher: AttributeTeacherBackend | None = None, generator: str = "compact",
                   image_roots: list[str] | None = None, world_size: int = 1) -> dict:
    """Resources of a small run under ``root``; MLflow in ``root/mlflow.db`` unless ``tracking_uri`` names a server;
    ``encoder``, ``teacher`` and ``generator`` are the AFMRL_ENCODER, AFMRL_TEACHER and AFMRL_GENERATOR backends;
    ``image_roots`` is AFMRL_IMAGE_ROOTS; ``world_size`` the training processes (AFMRL_WORLD_SIZE)."""
    store = store or ArtifactStore(location=str(root / "store"))
    return {
        "artifact_store": store,
        "io_manager": TableIOManager(store=store),
        "catalog_source": CatalogSource(spec=catalog_spec, store=store, image_roots=image_roots or []),
        "mlflow_tracking": MlflowTracking(tracking_uri=tracking_uri or f"sqlite:///{root / 'mlflow.db'}", experiment_name="afmrl-test"),
        "torch_compute": TorchCompute(device="cpu", checkpoints=str(root / "checkpoints"), world_size=world_size),
        "feature_towers": FeatureTowers(),
        "evaluation_split": EvaluationSplit(holdout_fraction=0.25, validation_fraction=0.34),  # per line: 1 test, 1 validation, 2 training products
        "attribute_teacher": teacher or AttributeTeacherBackend(),
        "generator_backend": GeneratorBackend(spec=generator),
        "listing_encoder": ListingEncoderBackend(spec=encoder),
    }


TINY_CONFIG = {
    "attribute_generator": AttributeGeneratorConfig(epochs=60, batch_size=8),
    "agcl_encoder": EncoderTrainingRunConfig(epochs=4, batch_size=8),
    "rar_generator": RARConfig(steps=3, queries_per_step=4, group_size=4, reward_k=5),
    "cit_encoder": CITConfig(epochs=3, batch_size=8),
    # 9 validation queries cannot tell a 4-epoch encoder from the towers: the gain gate is
    # tolerated here (the default, 0, is what users get; test_failed_evaluation_gate fails it).
    "retrieval_evaluation": EvaluationConfig(min_gain_over_zero_shot=-1.0),
}


@contextlib.contextmanager
def materialised_chain(root: Path, resources: dict, asset_config: dict) -> Iterator[tuple]:
    """The whole chain materialised in process under ``root``, on a Dagster instance whose home
    holds the project's dagster.yaml: yields ``(instance, outcome of materialize_pipeline)``."""
    import dagster as dg

    from afmrl_dagster.apps.demo import materialize_pipeline
    from afmrl_dagster.definitions import build_definitions

    home = root / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text((Path(__file__).resolve().parents[1] / "dagster.yaml").read_text())
    definitions = build_definitions(resources)
    with dg.instance_for_test(temp_dir=str(home)) as instance:
        yield definitions, instance, materialize_pipeline(definitions, instance, asset_config, log=lambda _: None)
