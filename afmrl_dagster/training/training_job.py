"""A training handed to other processes: a job folder that holds everything one rank needs.

Two tasks: an encoder training (:func:`write_encoder_job`: backend, its options, the training
config, the listings, their product ids, lines and attribute texts) and a generator's SFT
(:func:`write_generator_job`: the student's spec, its settings, the listings and the teacher's
attributes). The folder holds ``job.json`` (the task and its fields) and ``features.npz`` (the
frozen towers' features, when the task reads them). Every rank reads it (:func:`read_job`),
trains, and rank 0 leaves the model in ``result/`` with ``history.json``. Each rank marks its
state in ``rank-<r>.status`` (``running``, ``done`` or ``failed: ...``), so a launcher can say
which rank stopped when a run fails. The job is written to a temporary name and moved into
place, so a rank never reads half a job.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..encoders.dual_tower import ListingFeatures
from ..encoders.listing_encoder import ListingInputs
from ..local_files import write_text_atomically
from .checkpoints import LoopCheckpoint
from .encoder_training import EncoderTrainingConfig
from .generator_backends import CompactSFTSettings, HFDistillationSettings

JOB_FILE = "job.json"
FEATURES_FILE = "features.npz"
RESULT_DIR = "result"
HISTORY_FILE = "history.json"


@dataclass
class EncoderJob:
    backend: str
    options: dict
    config: EncoderTrainingConfig
    inputs: ListingInputs
    product_ids: list[str]
    product_lines: list[str]
    attribute_texts: list[str]


@dataclass
class GeneratorJob:
    """The student generator's SFT (``generator``: ``compact`` or ``hf-vlm:<id or folder>``) on
    the teacher's attributes ``targets``, one per listing of ``inputs``."""

    generator: str
    inputs: ListingInputs
    targets: list[dict]
    compact: CompactSFTSettings
    hf: HFDistillationSettings
    device: str
    checkpoint: LoopCheckpoint | None = None


def _inputs_spec(inputs: ListingInputs) -> dict:
    return {"listing_ids": inputs.listing_ids, "titles": inputs.titles, "attributes": inputs.attributes,
            "image_uris": inputs.image_uris, "descriptions": inputs.descriptions}


def _inputs_of(spec: dict, features: ListingFeatures | None, read_bytes) -> ListingInputs:
    return ListingInputs(spec["listing_ids"], spec["titles"], spec["attributes"], spec["image_uris"], read_bytes, features,
                         descriptions=spec["descriptions"])


def _write_job(folder: str | Path, spec: dict, features: ListingFeatures | None) -> Path:
    """``spec`` as ``job.json`` and ``features`` as ``features.npz`` in ``folder``, replacing an earlier
    job there (results included); written beside and moved into place."""
    folder = Path(folder)
    staging = folder.with_name(f".{folder.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    if features is not None:
        np.savez(staging / FEATURES_FILE, listing_ids=np.asarray(features.listing_ids, dtype=str), image=features.image,
                 image_mask=features.image_mask, text=features.text)
    (staging / JOB_FILE).write_text(json.dumps(spec))
    shutil.rmtree(folder, ignore_errors=True)
    staging.replace(folder)
    return folder


def write_encoder_job(folder: str | Path, job: EncoderJob) -> Path:
    """Write ``job`` as the folder ``folder`` (replacing an earlier job there, results included)."""
    spec = {
        "task": "encoder",
        "backend": job.backend,
        "options": job.options,
        "config": dataclasses.asdict(job.config),
        **_inputs_spec(job.inputs),
        "product_ids": list(job.product_ids),
        "product_lines": list(job.product_lines),
        "attribute_texts": list(job.attribute_texts),
    }
    return _write_job(folder, spec, job.inputs.features)


def write_generator_job(folder: str | Path, job: GeneratorJob) -> Path:
    """Write the generator SFT ``job`` as the folder ``folder`` (replacing an earlier job there)."""
    checkpoint = job.checkpoint
    spec = {
        "task": "generator",
        "generator": job.generator,
        **_inputs_spec(job.inputs),
        "targets": list(job.targets),
        "compact": dataclasses.asdict(job.compact),
        "hf": dataclasses.asdict(job.hf),
        "device": job.device,
        "checkpoint": None if checkpoint is None else {"directory": None if checkpoint.directory is None else str(checkpoint.directory),
                                                       "fingerprint": checkpoint.fingerprint, "every": checkpoint.every},
    }
    return _write_job(folder, spec, job.inputs.features)


def read_job(folder: str | Path, read_bytes=None) -> EncoderJob | GeneratorJob:
    """The job in ``folder``, of either task; ``read_bytes`` reads the listings' image URIs (a model that reads photos)."""
    folder = Path(folder)
    try:
        spec = json.loads((folder / JOB_FILE).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{folder} holds no readable training job ({JOB_FILE}): {error}") from error
    features = None
    if (folder / FEATURES_FILE).is_file():
        with np.load(folder / FEATURES_FILE, allow_pickle=False) as stored:
            features = ListingFeatures(stored["listing_ids"].tolist(), stored["image"], stored["image_mask"], stored["text"])
    inputs = _inputs_of(spec, features, read_bytes)
    task = spec.get("task", "encoder")
    if task == "encoder":
        return EncoderJob(spec["backend"], spec["options"], EncoderTrainingConfig(**spec["config"]), inputs, spec["product_ids"],
                          spec["product_lines"], spec["attribute_texts"])
    if task == "generator":
        checkpoint = spec["checkpoint"]
        return GeneratorJob(spec["generator"], inputs, spec["targets"], CompactSFTSettings(**spec["compact"]),
                            HFDistillationSettings(**spec["hf"]), spec["device"], None if checkpoint is None else LoopCheckpoint(**checkpoint))
    raise ValueError(f"{folder / JOB_FILE} names task {task!r}; this code runs 'encoder' and 'generator' jobs")


def status_path(folder: str | Path, rank: int) -> Path:
    return Path(folder) / f"rank-{rank}.status"


def mark(folder: str | Path, rank: int, state: str) -> None:
    write_text_atomically(status_path(folder, rank), state)


def rank_states(folder: str | Path, world_size: int) -> dict[int, str]:
    """Each rank's last state (``not started`` when it never wrote one)."""
    states = {}
    for rank in range(world_size):
        path = status_path(folder, rank)
        states[rank] = path.read_text().strip() if path.is_file() else "not started"
    return states


def failure_summary(folder: str | Path, world_size: int) -> str:
    """Which ranks did not finish, and how, in one line."""
    states = rank_states(folder, world_size)
    failed = [f"rank {rank} {state}" for rank, state in states.items() if state.startswith("failed")]
    stopped = [f"rank {rank}" for rank, state in states.items() if state in ("running", "not started")]
    parts = []
    if failed:
        parts.append("; ".join(failed))
    if stopped:
        parts.append(f"{', '.join(stopped)} stopped without finishing (killed, out of memory, or stopped by the launcher after another rank failed)")
    return "; ".join(parts) or "every rank finished"


def write_history(folder: str | Path, history: list[dict]) -> None:
    write_text_atomically(Path(folder) / HISTORY_FILE, json.dumps(history))


def read_history(folder: str | Path) -> list[dict]:
    return json.loads((Path(folder) / HISTORY_FILE).read_text())
