"""The single code location: every asset, check, job, schedule, sensor and resource.

Heavy libraries (torch, transformers, mlflow, GX) are imported inside asset bodies, so
loading these definitions stays fast for the webserver, the daemon and every CLI call.
Resources read their settings from environment variables when set (see the README), so one
definition serves a laptop, CI and production; secrets stay ``dg.EnvVar`` references.
"""

from __future__ import annotations

import os

import dagster as dg

from .assets import attributes, automation, catalog, cit, encoder, features, rar, retrieval
from .resources.catalog_source import CatalogSource
from .resources.compute import TorchCompute
from .resources.io_manager import TableIOManager
from .resources.models import EvaluationSplit, FeatureTowers
from .resources.storage import ArtifactStore
from .resources.teacher import AttributeTeacherBackend
from .resources.tracking import MlflowTracking


def _secret(name: str):
    """A secret from the environment, resolved only at run time: it never enters run config."""
    return dg.EnvVar(name) if name in os.environ else None


def build_resources() -> dict:
    env = os.environ.get
    store = ArtifactStore(
        location=env("AFMRL_STORE", ".afmrl/store"),
        endpoint_url=env("AFMRL_S3_ENDPOINT_URL"),
        region_name=env("AWS_REGION"),
        access_key_id=_secret("AWS_ACCESS_KEY_ID"),
        secret_access_key=_secret("AWS_SECRET_ACCESS_KEY"),
    )
    return {
        "artifact_store": store,
        "io_manager": TableIOManager(store=store),
        "catalog_source": CatalogSource(spec=env("AFMRL_CATALOG", "builtin"), store=store),
        "mlflow_tracking": MlflowTracking(tracking_uri=env("MLFLOW_TRACKING_URI", "sqlite:///.afmrl/mlflow.db")),
        "torch_compute": TorchCompute(device=env("AFMRL_DEVICE", "auto")),
        "feature_towers": FeatureTowers(
            image_model=env("AFMRL_IMAGE_TOWER", "efficientnet-lite0"), text_model=env("AFMRL_TEXT_TOWER", "all-MiniLM-L6-v2")
        ),
        "evaluation_split": EvaluationSplit(),
        "attribute_teacher": AttributeTeacherBackend(
            kind=env("AFMRL_TEACHER", "seller-attributes"),
            base_url=env("AFMRL_TEACHER_URL"),
            model=env("AFMRL_TEACHER_MODEL"),
            revision=env("AFMRL_TEACHER_REVISION", ""),
        ),
    }


ASSETS = [
    catalog.raw_catalog,
    attributes.teacher_attributes,
    features.listing_features,
    attributes.attribute_generator,
    attributes.generated_attributes,
    encoder.agcl_encoder,
    retrieval.catalog_embeddings,
    retrieval.retrieval_index,
    retrieval.retrieval_evaluation,
    retrieval.encoder_promotion,
    rar.rar_generator,
    cit.cit_encoder,
]
JOBS = [automation.catalog_refresh_job, automation.model_training_job, automation.catalog_embedding_job, automation.retrieval_job]


# Which assets each job materialises, in the order the whole graph must run.
PIPELINE_ORDER: list[tuple[str, bool]] = [  # (job name, partitioned by product line)
    ("catalog_refresh_job", True),
    ("model_training_job", False),
    ("catalog_embedding_job", True),
    ("retrieval_job", False),
]


def build_executor():
    """``AFMRL_EXECUTOR``: unset or ``multiprocess`` (Dagster's default, steps as local
    processes) or ``k8s`` (dagster-k8s's ``k8s_job_executor``: every step its own Kubernetes
    job, the torch steps requesting GPUs through their ``dagster-k8s/config`` tags)."""
    kind = os.environ.get("AFMRL_EXECUTOR", "multiprocess").strip().lower()
    if kind == "multiprocess":
        return None
    if kind == "k8s":
        try:
            from dagster_k8s import k8s_job_executor
        except ImportError as error:
            raise ImportError("AFMRL_EXECUTOR=k8s needs dagster-k8s: pip install 'afmrl-dagster[deploy]'") from error
        return k8s_job_executor
    raise ValueError(f"AFMRL_EXECUTOR must be 'multiprocess' or 'k8s', got {kind!r}")


def build_definitions(resources: dict | None = None) -> dg.Definitions:
    return dg.Definitions(
        assets=ASSETS,
        jobs=JOBS,
        schedules=[automation.catalog_refresh_schedule],
        sensors=[automation.new_product_line_sensor, automation.catalog_automation_sensor],
        resources=resources if resources is not None else build_resources(),
        executor=build_executor(),
    )


@dg.definitions
def defs() -> dg.Definitions:
    return build_definitions()
