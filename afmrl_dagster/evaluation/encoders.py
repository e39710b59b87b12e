"""The encoder an evaluation scores, and the embeddings it gives a plan's listings.

An encoder is named by a spec: ``zero-shot`` (the frozen towers alone), ``champion`` (what the
serving record of the artefact store names), a folder written by ``save_head``, or an MLflow
model URI. Text is the bare title (``listing_text(title)``); images go through the frozen
image tower.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl

from ..attributes.format import listing_text
from ..devices import DeviceError, resolve_device
from ..encoders.dual_tower import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    DualTowerConfig,
    DualTowerHead,
    ListingFeatures,
    embed_features,
    zero_shot_embeddings,
)
from ..encoders.listing_encoder import ENCODER_FILE, FrozenTowerEncoder, ListingEncoder, ListingInputs, encoder_kind, load_encoder
from ..encoders.towers import ImageFeaturizer, TextFeaturizer, decode_image
from ..settings import DEFAULT_IMAGE_TOWER, DEFAULT_TEXT_TOWER, DEFAULT_TRACKING_URI, IMAGE_TOWER_ENV, TEXT_TOWER_ENV, TRACKING_URI_ENV
from ..storage import StorageError, read_uri_bytes
from .protocols import EvaluationError

ZERO_SHOT = "zero-shot"
CHAMPION = "champion"  # the encoder the serving record names
_MODEL_URI = re.compile(r"^(models|runs|mlflow-artifacts|s3|gs|wasbs|dbfs|https?|file):", re.IGNORECASE)


def _quiet(message: str) -> None:
    pass


@dataclass
class Encoder:
    """Zero-shot towers (``model`` None) or a trained encoder of any backend (a head over the
    towers its config names, fine-tuned towers, a VLM2Vec adapter), run on ``device``
    (default: ``AFMRL_DEVICE`` through :func:`afmrl_dagster.devices.resolve_device`)."""

    name: str
    image_tower: str
    text_tower: str
    model: ListingEncoder | None = None
    device: str = field(default_factory=resolve_device)

    @property
    def head(self) -> DualTowerHead | None:
        """The head of a frozen-tower encoder; None for the zero-shot towers and other backends."""
        return self.model.head if isinstance(self.model, FrozenTowerEncoder) else None


def _trained_encoder(name: str, model: ListingEncoder, device: str) -> Encoder:
    head = getattr(model, "head", None)
    config = getattr(head, "config", None) or DualTowerConfig()
    return Encoder(name, config.image_tower, config.text_tower, model, device)


def _head_encoder(name: str, folder: Path, device: str) -> Encoder:
    try:
        encoder_kind(folder)
    except ValueError:
        missing = [file for file in (WEIGHTS_FILE, CONFIG_FILE) if not (folder / file).is_file()]
        raise EvaluationError(f"encoder folder {folder} lacks {', '.join(missing)} (expected a folder written by save_head, "
                              f"or an encoder folder with {ENCODER_FILE})") from None
    return _trained_encoder(name, load_encoder(folder, device=device), device)


def _served_encoder(device: str) -> Encoder:
    """The encoder the serving record of the artefact store (``AFMRL_STORE``) names."""
    from ..encoders.listing_encoder import load_stored_encoder
    from ..serving import ServingError, read_serving_record
    from ..settings import Settings
    from ..storage import open_store

    settings = Settings.from_env()
    try:
        store = open_store(settings.store, endpoint_url=settings.s3_endpoint_url, region_name=settings.aws_region)
        record = read_serving_record(store)
        model = load_stored_encoder(store, record.encoder_uri, device=device)
    except (ServingError, StorageError) as error:
        raise EvaluationError(f"encoder 'champion': {error}") from error
    name = f"{record.encoder_model} version {record.encoder_version} (serving record)"
    return _trained_encoder(name, model, device)


def resolve_encoder(spec: str, device: str | None = None) -> Encoder:
    """``zero-shot``, ``champion`` (what the serving record names), a folder written by ``save_head``, or an MLflow model URI
    (``models:/afmrl-encoder@champion``, ``runs:/<id>/encoder``; tracking URI from
    ``MLFLOW_TRACKING_URI``, default ``sqlite:///.afmrl/mlflow.db``). ``device`` default: ``AFMRL_DEVICE``."""
    try:
        device = resolve_device(device)
    except DeviceError as error:
        raise EvaluationError(str(error)) from error
    if spec == ZERO_SHOT:
        return Encoder(ZERO_SHOT, os.environ.get(IMAGE_TOWER_ENV, DEFAULT_IMAGE_TOWER), os.environ.get(TEXT_TOWER_ENV, DEFAULT_TEXT_TOWER),
                       device=device)
    if spec == CHAMPION:
        return _served_encoder(device)
    if Path(spec).expanduser().is_dir():
        return _head_encoder(spec, Path(spec).expanduser(), device)
    if not _MODEL_URI.match(spec):
        raise EvaluationError(f"encoder {spec!r} is not 'zero-shot', 'champion', an existing folder, or an MLflow model URI (models:/..., runs:/...)")
    import mlflow  # only here: zero-shot and folder encoders never need MLflow

    from ..registry import download_model_artifact

    tracking_uri = os.environ.get(TRACKING_URI_ENV, DEFAULT_TRACKING_URI)
    mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="afmrl-encoder-") as scratch:
        try:
            folder = download_model_artifact(spec, "head", scratch)
        except Exception as error:  # MLflow raises many types for an unknown name, alias or run
            raise EvaluationError(f"cannot fetch encoder {spec!r} from MLflow at {tracking_uri}: {error}") from error
        return _head_encoder(spec, folder, device)


def _image_features(encoder: Encoder, listings: pl.DataFrame, images: dict[str, bytes], progress: Callable[[str], None], batch_size: int = 64):
    """Image-tower features and mask; the tower is not even loaded for a text-only catalog."""
    ids, uris = listings["listing_id"].to_list(), listings["image_uri"].to_list()
    wanted = [i for i, (lid, uri) in enumerate(zip(ids, uris)) if lid in images or uri]
    if not wanted:
        dim = encoder.head.config.image_dim if encoder.head else DualTowerConfig().image_dim
        return np.zeros((len(ids), dim), np.float32), np.zeros(len(ids), bool), []
    featurizer = ImageFeaturizer(encoder.image_tower, device=encoder.device)
    features = np.zeros((len(ids), featurizer.dim), np.float32)
    mask = np.zeros(len(ids), bool)
    unreadable = []
    for start in range(0, len(wanted), batch_size):
        rows, decoded = [], []
        for i in wanted[start : start + batch_size]:
            try:
                data = images[ids[i]] if ids[i] in images else read_uri_bytes(uris[i])
            except StorageError as error:
                raise EvaluationError(f"image of listing {ids[i]!r} cannot be read: {error}") from error
            try:
                decoded.append(decode_image(data))
                rows.append(i)
            except ValueError:
                unreadable.append(ids[i])
        if decoded:
            features[rows], mask[rows] = featurizer.encode(decoded)
        progress(f"image features {min(start + batch_size, len(wanted))}/{len(wanted)}")
    if unreadable:
        progress(f"{len(unreadable)} image(s) cannot be decoded, scored as text-only, e.g. {unreadable[:3]}")
    return features, mask, unreadable


@dataclass
class EmbeddedListings:
    """Embeddings ``[N, dim]`` of a plan's listings (in order) and how many had a usable image."""

    embeddings: np.ndarray
    with_image: int
    unreadable_images: list[str]


def tower_features(
    encoder: Encoder, listings: pl.DataFrame, images: dict[str, bytes] | None = None, text_batch: int = 512,
    progress: Callable[[str], None] = _quiet,
) -> tuple[ListingFeatures, list[str]]:
    """Frozen-tower features of ``listings`` (image, and the bare title as text) and the ids
    whose image could not be decoded; ``progress`` hears how far the towers are."""
    image, mask, unreadable = _image_features(encoder, listings, images or {}, progress)
    texts = [listing_text(title) for title in listings["title"].to_list()]
    featurizer = TextFeaturizer(encoder.text_tower, device=encoder.device)
    chunks = []
    for start in range(0, len(texts), text_batch):
        chunks.append(featurizer.encode(texts[start : start + text_batch]))
        progress(f"text features {min(start + text_batch, len(texts))}/{len(texts)}")
    text = np.concatenate(chunks) if chunks else np.zeros((0, featurizer.dim), np.float32)
    return ListingFeatures(listings["listing_id"].to_list(), image, mask, text), unreadable


def embed_listings(
    encoder: Encoder, listings: pl.DataFrame, images: dict[str, bytes] | None = None, text_batch: int = 512,
    progress: Callable[[str], None] = _quiet,
) -> EmbeddedListings:
    """Embed ``listings``: frozen towers on image and title, then the head (or the zero-shot
    fusion); an encoder of another backend reads the photos and titles itself."""
    if encoder.model is not None and not isinstance(encoder.model, FrozenTowerEncoder):
        return _embed_raw(encoder, listings, images or {}, progress)
    features, unreadable = tower_features(encoder, listings, images, text_batch, progress)
    if encoder.model is None:
        embeddings = zero_shot_embeddings(features)
    else:
        embeddings = embed_features(encoder.head, features, device=encoder.device)
    return EmbeddedListings(embeddings, int(features.image_mask.sum()), unreadable)


def _embed_raw(encoder: Encoder, listings: pl.DataFrame, images: dict[str, bytes], progress: Callable[[str], None]) -> EmbeddedListings:
    """Embeddings of an encoder that reads photos and titles (fine-tuned towers, VLM2Vec)."""
    ids, uris = listings["listing_id"].to_list(), listings["image_uri"].to_list()
    decoded, unreadable = [], []
    for lid, uri in zip(ids, uris):
        if lid not in images and not uri:
            decoded.append(None)
            continue
        try:
            data = images[lid] if lid in images else read_uri_bytes(uri)
        except StorageError as error:
            raise EvaluationError(f"image of listing {lid!r} cannot be read: {error}") from error
        try:
            decoded.append(decode_image(data))
        except ValueError:
            decoded.append(None)
            unreadable.append(lid)
    if unreadable:
        progress(f"{len(unreadable)} image(s) cannot be decoded, scored as text-only, e.g. {unreadable[:3]}")
    inputs = ListingInputs(ids, listings["title"].to_list(), images=decoded)
    embeddings = encoder.model.embed(inputs, progress=lambda done, total: progress(f"embedded {done}/{total}"))
    return EmbeddedListings(embeddings, sum(image is not None for image in decoded), unreadable)
