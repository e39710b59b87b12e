"""The single code location: every asset, check, job, schedule, sensor and resource.

Heavy libraries (torch, transformers, mlflow, GX) are imported inside asset bodies, so
loading these definitions stays fast for the webserver, the daemon and every CLI call.
What differs between a laptop, CI and production is chosen here and only here, from one
:class:`~afmrl_dagster.settings.Settings` read from the environment when the definitions load
(see the README's configuration table): the resources, the sensors' state and interval, and
the executor. Secrets stay ``dg.EnvVar`` references.
"""

from __future__ import annotations

import dagster as dg

from .assets import attributes, automation, catalog, cit, encoder, features, rar, retrieval
from .encoders.backends import EncoderBackend
from .resources.catalog_source import CatalogSource
from .resources.compute import TorchCompute
from .resources.io_manager import TableIOManager
from .resources.models import EvaluationSplit, FeatureTowers, GeneratorBackend, ListingEncoderBackend
from .resources.storage import ArtifactStore
from .resources.teacher import AttributeTeacherBackend
from .resources.tracking import MlflowTracking
from .settings import AWS_ACCESS_KEY_ID_ENV, AWS_SECRET_ACCESS_KEY_ENV, Settings


def _secret(name: str, settings: Settings):
    """A secret from the environment, resolved only at run time: it never enters run config."""
    return dg.EnvVar(name) if name in settings.secrets_set else None


def build_resources(settings: Settings | None = None) -> dict:
    """The resources of ``settings`` (default: read from the environment now)."""
    settings = settings or Settings.from_env()
    store = ArtifactStore(
        location=settings.store,
        endpoint_url=settings.s3_endpoint_url,
        region_name=settings.aws_region,
        access_key_id=_secret(AWS_ACCESS_KEY_ID_ENV, settings),
        secret_access_key=_secret(AWS_SECRET_ACCESS_KEY_ENV, settings),
    )
    EncoderBackend.parse(settings.encoder)  # a setting that names no backend fails as the definitions load
    return {
        "artifact_store": store,
        "io_manager": TableIOManager(store=store),
        "catalog_source": CatalogSource(spec=settings.catalog, store=store, image_roots=list(settings.image_roots)),
        "mlflow_tracking": MlflowTracking(tracking_uri=settings.tracking_uri),
        "torch_compute": TorchCompute(device=settings.device, checkpoints=settings.checkpoints, world_size=settings.world_size),
        "feature_towers": FeatureTowers(image_model=settings.image_tower, text_model=settings.text_tower),
        "evaluation_split": EvaluationSplit(),
        "listing_encoder": ListingEncoderBackend(spec=settings.encoder),
        "attribute_teacher": AttributeTeacherBackend(
            kind=settings.teacher,
            base_url=settings.teacher_url,
            model=settings.teacher_model,
            revision=settings.teacher_revision,
        ),
        "generator_backend": GeneratorBackend(spec=settings.generator),
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
    retrieval.serving_record,
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


def build_executor(settings: Settings | None = None):
    """``AFMRL_EXECUTOR``: unset or ``multiprocess`` (Dagster's default, steps as local
    processes) or ``k8s`` (dagster-k8s's ``k8s_job_executor``: every step its own Kubernetes
    job, the torch steps requesting GPUs through their ``dagster-k8s/config`` tags)."""
    settings = settings or Settings.from_env()
    if settings.executor == "multiprocess":
        return None
    try:
        from dagster_k8s import k8s_job_executor
    except ImportError as error:
        raise ImportError("AFMRL_EXECUTOR=k8s needs dagster-k8s: pip install 'afmrl-dagster[deploy]'") from error
    return k8s_job_executor


def build_definitions(resources: dict | None = None, settings: Settings | None = None) -> dg.Definitions:
    """The code location; ``settings`` (default: read from the environment now) chooses the
    resources (unless ``resources`` are given), the sensors and the executor."""
    settings = settings or Settings.from_env()
    return dg.Definitions(
        assets=ASSETS,
        jobs=JOBS,
        schedules=[automation.catalog_refresh_schedule],
        sensors=automation.build_sensors(settings),
        resources=resources if resources is not None else build_resources(settings),
        executor=build_executor(settings),
    )


@dg.definitions
def defs() -> dg.Definitions:
    return build_definitions()
