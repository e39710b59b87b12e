"""The image tower's last block trained with the head, on grocery's store photos.

Over frozen EfficientNet-Lite0 features the ladder's best row stops near 0.86 R@1 from a store
photo to the product's catalog image; what moves it is training the tower's last block. This
module trains that arm (``dual-tower-finetune``: GeM-pooled ``efficientnet-lite0-gem``, its
last block and final 1x1 convolution trained at ``tower_learning_rate_scale`` x the head's
rate, the text tower frozen, plain InfoNCE, the dataset's schedule, the PCA start from the GeM
tower's frozen features) for the quality ladder and ``benchmarks/photo_catalog.py`` alike.

Every image's frozen blocks run once (:class:`FinetunedImageBlock` fills the starting encoder's
cache for every listing, and keeps it on disk under ``cache_dir`` for the next run); each seed
trains a copy of it, so a seed costs the last block only.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..encoders.dual_tower import ListingFeatures
from ..encoders.finetune import FinetunedTowerEncoder, new_finetuned_encoder
from ..encoders.listing_encoder import ListingInputs
from ..training.encoder_training import EncoderTrainingConfig, train_listing_encoder
from .quality_ladder import INFO_NCE, PARTS, LadderDataset, LadderSettings, features_key, plan_ranks, rank_metrics
from .reader_fusion import READER, ReaderScores

GEM_TOWER = "efficientnet-lite0-gem"
OWN_IMAGE = "dataset-image:"  # the key of an image the dataset holds itself (by listing id), not at a URI
FINETUNED_ROW = "plain InfoNCE, fine-tuned image block (GeM)"
FINETUNED_READER_ROW = f"{FINETUNED_ROW} + {READER} (fused at search)"


class FinetunedImageBlock:
    """The fine-tuned arm of one dataset: every listing's inputs, the starting encoder with its
    frozen-block cache filled, and the GeM tower's frozen features (the PCA start)."""

    def __init__(self, dataset: LadderDataset, cache_dir: str | Path | None = None,
                 progress: Callable[[str], None] = lambda message: None, tower: str = GEM_TOWER):
        started = time.perf_counter()
        self.dataset = dataset

        def read_bytes(uri: str) -> bytes:  # the dataset's own images (built-in catalogs, by listing id) or files
            return dataset.images[uri.removeprefix(OWN_IMAGE)] if uri.startswith(OWN_IMAGE) else Path(uri).read_bytes()

        listings = dataset.listings()
        ids = listings["listing_id"].to_list()
        uris = [uri or (f"{OWN_IMAGE}{listing}" if listing in dataset.images else None) for listing, uri in zip(ids, listings["image_uri"].to_list())]
        self.inputs = ListingInputs(ids, listings["title"].to_list(), image_uris=uris, read_bytes=read_bytes)
        row_of = {listing: i for i, listing in enumerate(self.inputs.listing_ids)}
        self.train_rows = np.array([row_of[i] for i in dataset.train["listing_id"].to_list()])
        self.part_rows = {part: np.array([row_of[i] for i in dataset.plan(part).listings["listing_id"].to_list()]) for part in PARTS}
        torch.manual_seed(0)
        self.base = new_finetuned_encoder(tower, unfrozen_blocks=1, unfrozen_text_layers=0, frozen_cache_items=1_000_000)
        self.base.eval()
        path = None
        if cache_dir is not None:
            path = Path(cache_dir) / f"{dataset.name}-frozen-blocks-{features_key(listings, tower, str(self.base.config.image_size))}.pt"
        if path is not None and path.is_file():
            stored = torch.load(path, weights_only=True)
            self.base.load_frozen_image_outputs(stored["outputs"])
            self.features = ListingFeatures(self.inputs.listing_ids, *(stored[name].numpy() for name in ("image", "image_mask", "text")))
            progress(f"{dataset.name}: frozen blocks of {len(stored['outputs'])} images read from {path}")
        else:
            self.features = self._frozen_blocks(progress)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                temporary = path.with_name(f".{path.name}.tmp")
                torch.save({"outputs": self.base.frozen_image_outputs(),
                            **{name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in
                               (("image", self.features.image), ("image_mask", self.features.image_mask), ("text", self.features.text))}},
                           temporary)
                temporary.replace(path)
        self.seconds = time.perf_counter() - started

    def _frozen_blocks(self, progress: Callable[[str], None]) -> ListingFeatures:
        """Every listing through the starting encoder once (filling its frozen-block cache); its
        pooled outputs, the untrained tower's features."""
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(self.inputs), 64):
                rows = np.arange(start, min(start + 64, len(self.inputs)))
                chunks.append([t.float().cpu().numpy() for t in self.base.tower_features(self.inputs, rows)])
                if (start // 64) % 10 == 0:
                    progress(f"{self.dataset.name}: frozen blocks {rows[-1] + 1}/{len(self.inputs)}")
        image, mask, text = (np.concatenate(parts) for parts in zip(*chunks))
        return ListingFeatures(self.inputs.listing_ids, image, mask, text)

    def train(self, seed: int, training: dict, tower_learning_rate_scale: float = 1.0) -> FinetunedTowerEncoder:
        """A copy of the starting encoder trained on the dataset's training listings (plain InfoNCE)."""
        encoder = copy.deepcopy(self.base)
        encoder.config.tower_learning_rate_scale = tower_learning_rate_scale
        train_inputs = self.inputs.subset(self.train_rows)
        train_inputs.features = self.features.subset(self.train_rows)  # the PCA start, as a frozen head's
        config = EncoderTrainingConfig(**training, seed=seed, agcl=dict(INFO_NCE))
        return train_listing_encoder(encoder, train_inputs, self.dataset.train["product_id"].to_list(),
                                     self.dataset.train["product_line"].to_list(), self.dataset.attribute_texts, config).encoder

    def embed(self, encoder: FinetunedTowerEncoder) -> dict[str, np.ndarray]:
        """Per part, one embedding per listing of its plan, in plan order (a listing both parts
        hold, their shared gallery, is embedded once)."""
        rows, inverse = np.unique(np.concatenate([self.part_rows[part] for part in PARTS]), return_inverse=True)
        embeddings = encoder.embed(self.inputs.subset(rows))[inverse]
        bounds = np.cumsum([0, *(len(self.part_rows[part]) for part in PARTS)])
        return {part: embeddings[bounds[i]:bounds[i + 1]] for i, part in enumerate(PARTS)}


def scored(dataset: LadderDataset, embeddings: dict[str, np.ndarray]) -> dict:
    """Ranks and metrics of every task of both parts, in the ladder's record shape."""
    out = {}
    for part in PARTS:
        ranks = plan_ranks(dataset.plan(part), embeddings[part])
        out[part] = {"ranks": ranks, "metrics": {task: rank_metrics(values) for task, values in ranks.items()}}
    return out


def run_finetuned_tower(
    block: FinetunedImageBlock,
    reader: ReaderScores | None,
    settings: LadderSettings | None = None,
    progress: Callable[[str], None] = lambda message: None,
) -> list[dict]:
    """Per seed, the fine-tuned arm's record (:data:`FINETUNED_ROW`) and, with a reader, the same
    encoder's cosine fused with the reader's BM25 (:data:`FINETUNED_READER_ROW`, the weight
    chosen on validation), in the ladder's record shape."""
    settings = settings or LadderSettings()
    dataset = block.dataset
    training = {**settings.training, **dataset.training}
    records = []
    for seed in settings.seeds:
        started = time.perf_counter()
        embeddings = block.embed(block.train(seed, training))
        seconds = time.perf_counter() - started
        outcome = scored(dataset, embeddings)
        records.append({"dataset": dataset.name, "row": FINETUNED_ROW, "seed": seed, "seconds": seconds, **outcome})
        first = next(iter(outcome["validation"]["metrics"]))
        message = f"{dataset.name}: {FINETUNED_ROW} seed {seed} validation R@1 {first} {outcome['validation']['metrics'][first]['recall@1']:.3f}"
        if reader is not None:
            alpha, fused = reader.fuse(embeddings)
            records.append({"dataset": dataset.name, "row": FINETUNED_READER_ROW, "seed": seed, "seconds": seconds, "alpha": alpha, **fused})
            task = reader.tasks["validation"][0].name
            message += f"; fused (alpha {alpha}) {task} {fused['validation']['metrics'][task]['recall@1']:.3f}"
        progress(f"{message} ({seconds:.0f} s)")
    return records
