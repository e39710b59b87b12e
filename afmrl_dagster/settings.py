"""Every environment default of the project, written once (plain Python: no Dagster, no torch).

The environment is read by :meth:`Settings.from_env`, called when the definitions load
(``afmrl_dagster.definitions``) or a command runs (``afmrl search``, ``afmrl rollback``, the
benchmarks), never when a module is imported. One :class:`Settings` then chooses everything
that differs between a laptop, CI and production: the artefact store, MLflow, the catalog,
the device and towers, the teacher and the student generator, the sensors' state and interval, and the executor with
its GPU requests. Secrets are not settings: only whether each is set is recorded, and the
resources resolve them at run time through ``dg.EnvVar``.

Hyper-parameter defaults are not here: they live in the library's config dataclasses
(``training/``), which the assets' ``dg.Config`` classes read.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

# ---- environment variable names ---------------------------------------------------------------
STORE_ENV = "AFMRL_STORE"
S3_ENDPOINT_URL_ENV = "AFMRL_S3_ENDPOINT_URL"
AWS_REGION_ENV = "AWS_REGION"
AWS_ACCESS_KEY_ID_ENV = "AWS_ACCESS_KEY_ID"
AWS_SECRET_ACCESS_KEY_ENV = "AWS_SECRET_ACCESS_KEY"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
CATALOG_ENV = "AFMRL_CATALOG"
IMAGE_ROOTS_ENV = "AFMRL_IMAGE_ROOTS"  # comma-separated folders or s3://bucket/prefix a catalog's image_uri may point into
DEVICE_ENV = "AFMRL_DEVICE"
CHECKPOINTS_ENV = "AFMRL_CHECKPOINTS"  # where long trainings keep the checkpoints they resume from after a kill
IMAGE_TOWER_ENV = "AFMRL_IMAGE_TOWER"
TEXT_TOWER_ENV = "AFMRL_TEXT_TOWER"
TEACHER_ENV = "AFMRL_TEACHER"
ENCODER_ENV = "AFMRL_ENCODER"
TEACHER_URL_ENV = "AFMRL_TEACHER_URL"
TEACHER_MODEL_ENV = "AFMRL_TEACHER_MODEL"
TEACHER_REVISION_ENV = "AFMRL_TEACHER_REVISION"
GENERATOR_ENV = "AFMRL_GENERATOR"
TEACHER_API_KEY_ENV = "OPENAI_API_KEY"  # read at call time by the HTTP teacher, never stored
AUTOMATION_ENV = "AFMRL_AUTOMATION"
SENSOR_INTERVAL_ENV = "AFMRL_SENSOR_INTERVAL_SECONDS"
EXECUTOR_ENV = "AFMRL_EXECUTOR"
K8S_GPUS_ENV = "AFMRL_K8S_GPUS"
WORLD_SIZE_ENV = "AFMRL_WORLD_SIZE"  # processes the encoder training and the generator SFT run on (torchrun through Dagster Pipes above 1)
DATA_ENV = "AFMRL_DATA"  # the benchmarks' dataset folder
SECRET_ENVS = (AWS_ACCESS_KEY_ID_ENV, AWS_SECRET_ACCESS_KEY_ENV)

# ---- defaults ----------------------------------------------------------------------------------
DEFAULT_STORE = ".afmrl/store"
DEFAULT_TRACKING_URI = "sqlite:///.afmrl/mlflow.db"
DEFAULT_CATALOG = "builtin"
DEFAULT_DEVICE = "auto"
DEFAULT_CHECKPOINTS = ".afmrl/checkpoints"
DEFAULT_IMAGE_TOWER = "efficientnet-lite0"
DEFAULT_TEXT_TOWER = "all-MiniLM-L6-v2"
DEFAULT_TEACHER = "seller-attributes"
DEFAULT_ENCODER = "dual-tower"  # or dual-tower-finetune, vlm2vec:<hub id or folder>
DEFAULT_GENERATOR = "compact"
HF_VLM_PREFIX = "hf-vlm:"  # teacher and generator: a Hugging Face VLM by hub id or local folder
DEFAULT_AUTOMATION = True
DEFAULT_SENSOR_INTERVAL_SECONDS = 300
EXECUTORS = ("multiprocess", "k8s")
DEFAULT_EXECUTOR = "multiprocess"
DEFAULT_K8S_GPUS = 1
DEFAULT_DATA = "../shared/data"
# Caps on what a catalog's image URI may hand the pipeline: bytes read from a local file and
# pixels decoded (checked from the header, before decoding). A listing over either is refused
# with its id and quarantined like any unreadable image.
MAX_IMAGE_BYTES = 32 * 1024 * 1024
MAX_IMAGE_PIXELS = 40_000_000


@dataclass(frozen=True)
class Settings:
    """The deployment's settings; ``Settings()`` is a laptop with nothing set."""

    store: str = DEFAULT_STORE
    s3_endpoint_url: str | None = None
    aws_region: str | None = None
    tracking_uri: str = DEFAULT_TRACKING_URI
    catalog: str = DEFAULT_CATALOG
    image_roots: tuple[str, ...] = ()  # besides the catalog's own location and the store's images/
    device: str = DEFAULT_DEVICE
    checkpoints: str = DEFAULT_CHECKPOINTS
    image_tower: str = DEFAULT_IMAGE_TOWER
    text_tower: str = DEFAULT_TEXT_TOWER
    teacher: str = DEFAULT_TEACHER
    encoder: str = DEFAULT_ENCODER
    teacher_url: str | None = None
    teacher_model: str | None = None
    teacher_revision: str = ""
    generator: str = DEFAULT_GENERATOR  # the student: 'compact' or 'hf-vlm:<hub id or folder>'
    automation: bool = DEFAULT_AUTOMATION  # sensors start running (True) or stopped
    sensor_interval_seconds: int = DEFAULT_SENSOR_INTERVAL_SECONDS
    executor: str = DEFAULT_EXECUTOR
    k8s_gpus: int = DEFAULT_K8S_GPUS  # GPUs per torch step's pod under the k8s executor; 0 = none
    world_size: int = 1  # processes the encoder training and the generator SFT run on; above 1, torchrun through Dagster Pipes
    data: str = DEFAULT_DATA
    secrets_set: frozenset[str] = field(default_factory=frozenset)  # which of SECRET_ENVS are set

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        """The settings of ``environ`` (default: this process's environment), validated."""
        env = environ.get
        automation = env(AUTOMATION_ENV, "on").strip().lower()
        if automation not in ("on", "off"):
            raise ValueError(f"{AUTOMATION_ENV} must be 'on' or 'off', got {automation!r}")
        interval = env(SENSOR_INTERVAL_ENV, str(DEFAULT_SENSOR_INTERVAL_SECONDS))
        if not interval.isdigit() or int(interval) < 1:
            raise ValueError(f"{SENSOR_INTERVAL_ENV} must be a whole number of seconds >= 1, got {interval!r}")
        generator = env(GENERATOR_ENV, DEFAULT_GENERATOR).strip()
        if generator != "compact" and not (generator.startswith(HF_VLM_PREFIX) and generator[len(HF_VLM_PREFIX):].strip()):
            raise ValueError(f"{GENERATOR_ENV} must be 'compact' or 'hf-vlm:<hub id or local folder>', got {generator!r}")
        teacher = env(TEACHER_ENV, DEFAULT_TEACHER).strip()
        if teacher == HF_VLM_PREFIX.rstrip(":") or (teacher.startswith(HF_VLM_PREFIX) and not teacher[len(HF_VLM_PREFIX):].strip()):
            raise ValueError(f"{TEACHER_ENV}=hf-vlm needs the model: 'hf-vlm:<hub id or local folder>', got {teacher!r}")
        executor = env(EXECUTOR_ENV, DEFAULT_EXECUTOR).strip().lower()
        if executor not in EXECUTORS:
            raise ValueError(f"{EXECUTOR_ENV} must be 'multiprocess' or 'k8s', got {executor!r}")
        return cls(
            store=env(STORE_ENV, DEFAULT_STORE),
            s3_endpoint_url=env(S3_ENDPOINT_URL_ENV),
            aws_region=env(AWS_REGION_ENV),
            tracking_uri=env(TRACKING_URI_ENV, DEFAULT_TRACKING_URI),
            catalog=env(CATALOG_ENV, DEFAULT_CATALOG),
            image_roots=tuple(root.strip() for root in env(IMAGE_ROOTS_ENV, "").split(",") if root.strip()),
            device=env(DEVICE_ENV, DEFAULT_DEVICE),
            checkpoints=env(CHECKPOINTS_ENV, DEFAULT_CHECKPOINTS),
            image_tower=env(IMAGE_TOWER_ENV, DEFAULT_IMAGE_TOWER),
            text_tower=env(TEXT_TOWER_ENV, DEFAULT_TEXT_TOWER),
            encoder=env(ENCODER_ENV, DEFAULT_ENCODER).strip(),
            teacher=teacher,
            teacher_url=env(TEACHER_URL_ENV),
            teacher_model=env(TEACHER_MODEL_ENV),
            teacher_revision=env(TEACHER_REVISION_ENV, ""),
            generator=generator,
            automation=automation == "on",
            sensor_interval_seconds=int(interval),
            executor=executor,
            k8s_gpus=k8s_gpus_from_env(environ),
            world_size=world_size_from_env(environ),
            data=env(DATA_ENV, DEFAULT_DATA),
            secrets_set=frozenset(name for name in SECRET_ENVS if name in environ),
        )


def world_size_from_env(environ: Mapping[str, str] = os.environ) -> int:
    """``AFMRL_WORLD_SIZE``: a whole number of training processes, at least 1."""
    size = environ.get(WORLD_SIZE_ENV, "1")
    if not size.isdigit() or int(size) < 1:
        raise ValueError(f"{WORLD_SIZE_ENV} must be a whole number of processes, at least 1; got {size!r}")
    return int(size)


def k8s_gpus_from_env(environ: Mapping[str, str] = os.environ) -> int:
    """``AFMRL_K8S_GPUS`` alone (the GPU tags of the torch assets are fixed when their modules
    are imported, before the rest of the settings are read)."""
    gpus = environ.get(K8S_GPUS_ENV, str(DEFAULT_K8S_GPUS))
    if not gpus.isdigit():
        raise ValueError(f"{K8S_GPUS_ENV} must be a whole number of GPUs, got {gpus!r}")
    return int(gpus)
