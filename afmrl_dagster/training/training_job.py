"""An encoder training handed to other processes: a job folder that holds everything one rank needs.

The asset that launches a distributed training writes the job (:func:`write_encoder_job`):
``job.json`` (backend, its options, the training config, the listings' ids, titles,
attributes, image URIs, product ids, lines and attribute texts) and ``features.npz`` (the frozen
towers' features, when the backend reads them). Every rank reads it (:func:`read_encoder_job`),
trains, and rank 0 leaves the encoder in ``result/`` with ``history.json``. Each rank marks its
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
from .encoder_training import EncoderTrainingConfig

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


def write_encoder_job(folder: str | Path, job: EncoderJob) -> Path:
    """Write ``job`` as the folder ``folder`` (replacing an earlier job there, results included)."""
    folder = Path(folder)
    staging = folder.with_name(f".{folder.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    inputs = job.inputs
    spec = {
        "backend": job.backend,
        "options": job.options,
        "config": dataclasses.asdict(job.config),
        "listing_ids": inputs.listing_ids,
        "titles": inputs.titles,
        "attributes": inputs.attributes,
        "image_uris": inputs.image_uris,
        "descriptions": inputs.descriptions,
        "product_ids": list(job.product_ids),
        "product_lines": list(job.product_lines),
        "attribute_texts": list(job.attribute_texts),
    }
    if inputs.features is not None:
        features = inputs.features
        np.savez(staging / FEATURES_FILE, listing_ids=np.asarray(features.listing_ids, dtype=str), image=features.image,
                 image_mask=features.image_mask, text=features.text)
    (staging / JOB_FILE).write_text(json.dumps(spec))
    shutil.rmtree(folder, ignore_errors=True)
    staging.replace(folder)
    return folder


def read_encoder_job(folder: str | Path, read_bytes=None) -> EncoderJob:
    """The job in ``folder``; ``read_bytes`` reads the listings' image URIs (a backend that reads photos)."""
    folder = Path(folder)
    try:
        spec = json.loads((folder / JOB_FILE).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{folder} holds no readable training job ({JOB_FILE}): {error}") from error
    features = None
    if (folder / FEATURES_FILE).is_file():
        with np.load(folder / FEATURES_FILE, allow_pickle=False) as stored:
            features = ListingFeatures(stored["listing_ids"].tolist(), stored["image"], stored["image_mask"], stored["text"])
    inputs = ListingInputs(spec["listing_ids"], spec["titles"], spec["attributes"], spec["image_uris"], read_bytes, features,
                           descriptions=spec["descriptions"])
    return EncoderJob(spec["backend"], spec["options"], EncoderTrainingConfig(**spec["config"]), inputs, spec["product_ids"],
                      spec["product_lines"], spec["attribute_texts"])


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
