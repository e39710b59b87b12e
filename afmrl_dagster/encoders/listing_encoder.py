"""One interface over every encoder backend, so that training, the index, the evaluation and
search treat them alike.

A backend is chosen by one setting (``AFMRL_ENCODER``, parsed by :class:`EncoderBackend`):

- ``dual-tower``: the trainable head over frozen image and text towers (the fast default; its
  tower features are computed once per listing and cached by the pipeline);
- ``dual-tower-finetune``: the same towers trained end to end on raw photos and text with the
  head (:mod:`.finetune`);
- ``vlm2vec:<hub id or folder>``: a vision-language model's last-token state, with LoRA
  (:mod:`.vlm2vec`).

Every backend is a :class:`ListingEncoder`: it embeds rows of :class:`ListingInputs` (ids,
titles, attributes, images, and the cached tower features where they exist), it is trained by
the one AGCL loop (:func:`afmrl_dagster.training.encoder_training.train_listing_encoder`), and
it is saved to a folder that :func:`load_encoder` reads back whatever its kind.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import PIL.Image
import torch
from torch import nn

from ..attributes.format import Attributes, listing_text
from .backends import ENCODER_KINDS, EncoderBackend, EncoderSpecError  # noqa: F401  (re-exported)
from .dual_tower import CONFIG_FILE, WEIGHTS_FILE, DualTowerConfig, DualTowerHead, ListingFeatures, load_head, save_head
from .towers import decode_image

# Written by every backend but the frozen-tower head, whose folder (head + config) predates it.
ENCODER_FILE = "encoder.json"
# kind -> "module:function(directory, device) -> ListingEncoder", imported on first use
_LOADERS = {
    "dual-tower-finetune": "afmrl_dagster.encoders.finetune:load_finetuned_encoder",
    "vlm2vec": "afmrl_dagster.encoders.vlm2vec:load_vlm2vec_encoder",
}


@dataclass
class ListingInputs:
    """What an encoder reads of N listings, row ``i`` being ``listing_ids[i]``.

    ``image_uris`` are read with ``read_bytes`` when an encoder needs the pixels; ``images``
    holds already decoded images instead (a query). ``features``, when given, are the frozen
    towers' features of the same rows with the text part computed from
    ``listing_text(title, attributes)``: the frozen-tower encoder reads those rather than the
    pixels.
    """

    listing_ids: list[str]
    titles: list[str]
    attributes: list[Attributes | None] | None = None
    image_uris: list[str | None] | None = None
    read_bytes: Callable[[str], bytes] | None = None
    features: ListingFeatures | None = None
    images: list[PIL.Image.Image | None] | None = None
    # False when ``features.text`` is not the features of these rows' texts (only their image part is)
    text_features_current: bool = True
    descriptions: list[str | None] | None = None  # what a generator reads besides the title
    _texts: list[str] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.listing_ids = list(self.listing_ids)
        self.titles = ["" if title is None else str(title) for title in self.titles]
        n = len(self.listing_ids)
        sizes = {"titles": len(self.titles)}
        for name in ("attributes", "image_uris", "images", "descriptions"):
            if getattr(self, name) is not None:
                setattr(self, name, list(getattr(self, name)))
                sizes[name] = len(getattr(self, name))
        if self.features is not None:
            sizes["features"] = len(self.features)
        wrong = {name: size for name, size in sizes.items() if size != n}
        if wrong:
            raise ValueError(f"{n} listing ids but {', '.join(f'{size} {name}' for name, size in wrong.items())}")

    def __len__(self) -> int:
        return len(self.listing_ids)

    def texts(self, rows: Sequence[int] | np.ndarray | None = None) -> list[str]:
        """``listing_text(title, attributes)`` of ``rows`` (all rows by default)."""
        if self._texts is None:
            attributes = self.attributes or [None] * len(self)
            self._texts = [listing_text(title, attrs) for title, attrs in zip(self.titles, attributes)]
        return list(self._texts) if rows is None else [self._texts[i] for i in rows]

    def load_images(self, rows: Sequence[int] | np.ndarray | None = None) -> list[PIL.Image.Image | None]:
        """Decoded images of ``rows`` (all rows by default; ``None`` where a listing has none); an
        image that cannot be read fails naming the listing and its ``image_uri``."""
        if rows is None:
            rows = range(len(self))
        if self.images is not None:
            return [self.images[i] for i in rows]
        if self.image_uris is None:
            return [None] * len(rows)
        images = []
        for i in rows:
            uri = self.image_uris[i]
            if not uri:
                images.append(None)
                continue
            if self.read_bytes is None:
                raise ValueError("ListingInputs has image_uris but no read_bytes to read them with")
            try:
                images.append(decode_image(self.read_bytes(uri)))
            except (OSError, ValueError) as error:
                raise ValueError(f"listing {self.listing_ids[i]!r}: image_uri {uri!r} cannot be read: {error}") from error
        return images

    def subset(self, rows: Sequence[int] | np.ndarray) -> ListingInputs:
        """The rows ``rows`` (in that order) as new inputs."""
        rows = [int(i) for i in rows]

        def pick(values):
            return None if values is None else [values[i] for i in rows]

        return ListingInputs(
            [self.listing_ids[i] for i in rows], [self.titles[i] for i in rows], pick(self.attributes), pick(self.image_uris),
            self.read_bytes, None if self.features is None else self.features.subset(rows), pick(self.images), self.text_features_current,
            pick(self.descriptions),
        )

    def with_attributes(self, rows: Sequence[int] | np.ndarray, attributes: Sequence[Attributes | None]) -> ListingInputs:
        """The rows ``rows`` (repeats allowed) carrying ``attributes`` instead of their own: what a
        query looks like with each attribute set a generator samples for it. Cached features
        keep their image part; their text part is marked stale, so it is computed again."""
        if len(attributes) != len(rows):
            raise ValueError(f"{len(rows)} rows but {len(attributes)} attribute sets")
        picked = self.subset(rows)
        picked.attributes, picked.text_features_current = list(attributes), False
        return picked


class ListingEncoder(nn.Module):
    """An encoder of listings: L2-normalised embeddings of rows of :class:`ListingInputs`.

    Subclasses give ``kind``, :meth:`embed_rows` (differentiable, used by training),
    ``temperature`` (the contrastive temperature AGCL divides by) and :meth:`save`.
    """

    kind: str = ""

    def embed_rows(self, inputs: ListingInputs, rows: np.ndarray) -> torch.Tensor:
        raise NotImplementedError

    @property
    def temperature(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def save(self, directory: str | os.PathLike) -> Path:
        raise NotImplementedError

    def prepare_training(self, inputs: ListingInputs, seed: int) -> None:
        """Called once before the first step of a fresh training run (not when resuming)."""

    def embedding_batch_size(self) -> int:
        return 256

    def fingerprint(self) -> dict:
        """Settings of the encoder that a training checkpoint may only be resumed with (beside the
        training config and the data); none by default."""
        return {}

    def embed(self, inputs: ListingInputs, batch_size: int | None = None,
              progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """Embeddings ``float32 [N, dim]`` of every row, in eval mode, ``batch_size`` rows at a time."""
        batch_size = batch_size or self.embedding_batch_size()
        was_training = self.training
        self.eval()
        chunks = []
        try:
            with torch.inference_mode():
                for start in range(0, len(inputs), batch_size):
                    rows = np.arange(start, min(start + batch_size, len(inputs)))
                    chunks.append(self.embed_rows(inputs, rows).float().cpu().numpy())
                    if progress is not None:
                        progress(int(rows[-1]) + 1, len(inputs))
        finally:
            self.train(was_training)
        if not chunks:
            return np.zeros((0, 0), dtype=np.float32)
        return np.concatenate(chunks).astype(np.float32, copy=False)

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """What a training checkpoint keeps: the trained weights and every buffer."""
        state = {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}
        state.update({name: b.detach() for name, b in self.named_buffers()})
        return state

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        own = dict(self.named_parameters()) | dict(self.named_buffers())
        unknown = sorted(set(state) - set(own))
        missing = sorted(set(self.checkpoint_state()) - set(state))
        if unknown or missing:
            raise ValueError(f"checkpoint does not fit this encoder: unknown {unknown[:5]}, missing {missing[:5]}")
        with torch.no_grad():
            for name, tensor in state.items():
                own[name].copy_(tensor.to(own[name].device))


class FrozenTowerEncoder(ListingEncoder):
    """``dual-tower``: the trainable :class:`DualTowerHead` over frozen tower features.

    Reads ``inputs.features`` when given (the pipeline caches them per listing); otherwise it
    computes them with the towers the head's config names (a query at search time).
    """

    kind = "dual-tower"

    def __init__(self, head: DualTowerHead):
        super().__init__()
        self.head = head
        self._image_featurizer = self._text_featurizer = None

    @property
    def temperature(self) -> torch.Tensor:
        return self.head.temperature

    def image_featurizer(self):
        """The image tower the head was trained on, built on first use."""
        if self._image_featurizer is None:
            from .towers import ImageFeaturizer

            self._image_featurizer = ImageFeaturizer(self.head.config.image_tower, device=str(self.device))
        return self._image_featurizer

    def text_featurizer(self):
        """The text tower the head was trained on, built on first use (or the one given to :meth:`use_text_featurizer`)."""
        if self._text_featurizer is None:
            from .towers import TextFeaturizer

            self._text_featurizer = TextFeaturizer(self.head.config.text_tower, device=str(self.device))
        return self._text_featurizer

    def use_text_featurizer(self, featurizer) -> FrozenTowerEncoder:
        """Share an already loaded text tower (its cache too); it must be the head's tower."""
        if featurizer.name != self.head.config.text_tower:
            raise ValueError(f"the head was trained on text tower {self.head.config.text_tower!r}, not {featurizer.name!r}")
        self._text_featurizer = featurizer
        return self

    def features_of(self, inputs: ListingInputs, rows: np.ndarray) -> ListingFeatures:
        """Tower features of ``rows``: cached where ``inputs`` carry them, computed where not."""
        ids = [inputs.listing_ids[i] for i in rows]
        if inputs.features is not None:
            cached = inputs.features.subset(rows)
            if inputs.text_features_current:
                return cached
            return ListingFeatures(ids, cached.image, cached.image_mask, self.text_featurizer().encode(inputs.texts(rows)))
        image, mask = self.image_featurizer().encode(inputs.load_images(rows))
        return ListingFeatures(ids, image, mask, self.text_featurizer().encode(inputs.texts(rows)))

    def embed_rows(self, inputs: ListingInputs, rows: np.ndarray) -> torch.Tensor:
        features = self.features_of(inputs, rows)
        device = self.device
        return self.head(torch.from_numpy(features.image).to(device), torch.from_numpy(features.image_mask).to(device),
                         torch.from_numpy(features.text).to(device))

    def embedding_batch_size(self) -> int:
        return 1024

    def prepare_training(self, inputs: ListingInputs, seed: int) -> None:
        if inputs.features is not None:
            self.head.init_from_features(inputs.features, seed=seed)

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        return {f"head.{name}": tensor.detach() for name, tensor in self.head.state_dict().items()}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        self.head.load_state_dict({name.removeprefix("head."): t for name, t in state.items() if name.startswith("head.")}, strict=True)

    def save(self, directory: str | os.PathLike) -> Path:
        return save_head(self.head, directory)


def _imported(path: str):
    module, _, function = path.partition(":")
    return getattr(importlib.import_module(module), function)


def new_encoder(backend: EncoderBackend, head: DualTowerConfig, device: str = "cpu", seed: int = 0, **options) -> ListingEncoder:
    """An untrained encoder of a backend that reads raw inputs: ``dual-tower-finetune`` (the
    towers ``head`` names, under a head of its ``embed_dim``) or ``vlm2vec`` (LoRA over
    ``backend.model``); ``options`` are the backend's own settings. The frozen-tower head is
    built from its cached features by ``train_encoder`` instead."""
    if backend.kind == "vlm2vec":
        from .vlm2vec import new_vlm2vec_encoder

        return new_vlm2vec_encoder(backend.model, device, seed=seed, **options)
    if backend.kind == "dual-tower-finetune":
        from .finetune import new_finetuned_encoder

        return new_finetuned_encoder(head.image_tower, head.text_tower, embed_dim=head.embed_dim, device=device, **options)
    raise ValueError(f"backend {backend.spec!r} is built from its cached features by train_encoder, not by new_encoder")


def write_encoder_json(directory: Path, kind: str, **details) -> None:
    """The ``encoder.json`` that tells :func:`load_encoder` a folder's backend."""
    (Path(directory) / ENCODER_FILE).write_text(json.dumps({"kind": kind, **details}, indent=2, sort_keys=True))


def encoder_kind(directory: str | os.PathLike) -> str:
    """The backend of a saved encoder folder; fails naming the folder when it holds none."""
    folder = Path(directory)
    if (folder / ENCODER_FILE).is_file():
        kind = json.loads((folder / ENCODER_FILE).read_text()).get("kind")
        if kind not in ENCODER_KINDS:
            raise ValueError(f"{folder / ENCODER_FILE} names kind {kind!r}, not one of {ENCODER_KINDS}")
        return kind
    if (folder / WEIGHTS_FILE).is_file() and (folder / CONFIG_FILE).is_file():
        return "dual-tower"
    raise ValueError(f"{folder} holds no saved encoder (neither {ENCODER_FILE} nor {WEIGHTS_FILE} + {CONFIG_FILE})")


def load_encoder(directory: str | os.PathLike, device: str = "cpu") -> ListingEncoder:
    """The encoder saved in ``directory`` by any backend's ``save``, in eval mode on ``device``."""
    kind = encoder_kind(directory)
    if kind == "dual-tower":
        return FrozenTowerEncoder(load_head(directory, device=device)).eval()
    return _imported(_LOADERS[kind])(directory, device).eval()


def load_stored_encoder(store, uri: str, device: str = "cpu") -> ListingEncoder:
    """The encoder folder kept at ``uri`` of an artefact store (a manifest's ``uri``), checksums verified."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="afmrl-encoder-") as scratch:
        return load_encoder(store.download_directory(store.key_of(uri), Path(scratch) / "encoder"), device=device)
