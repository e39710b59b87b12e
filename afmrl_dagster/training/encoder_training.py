"""Stage 1 training: the dual-tower head on frozen features with AGCL (or plain InfoNCE).

A batch is B (anchor, positive) pairs: two listings of each of B distinct products. Products
are drawn preferably from the same product line, so that in-batch negatives are the hard
near-identical siblings AGCL is built for.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np
import torch

from ..encoders.dual_tower import DualTowerConfig, DualTowerHead, ListingFeatures
from .agcl import AGCLConfig, AGCLLoss
from .bm25 import TOKENIZERS, BM25Scorer
from .schedules import warmup_cosine

SAMPLERS = ("product_line", "random")


@dataclass
class EncoderTrainingConfig:
    """Optimisation settings; ``agcl`` and ``head`` also accept plain dicts (e.g. from run config)."""

    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    grad_accumulation: int = 1
    sampler: str = "product_line"
    seed: int = 0
    agcl: AGCLConfig = field(default_factory=AGCLConfig)
    head: DualTowerConfig = field(default_factory=DualTowerConfig)
    device: str = "cpu"
    bm25_tokenizer: str = "words"
    max_grad_norm: float = 1.0
    pca_init: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.agcl, dict):
            self.agcl = AGCLConfig(**self.agcl)
        if isinstance(self.head, dict):
            self.head = DualTowerConfig(**self.head)
        if self.epochs < 1 or self.batch_size < 2 or self.grad_accumulation < 1:
            raise ValueError(
                f"need epochs >= 1, batch_size >= 2 (in-batch negatives), grad_accumulation >= 1; "
                f"got {self.epochs}, {self.batch_size}, {self.grad_accumulation}"
            )
        if self.learning_rate <= 0 or self.weight_decay < 0 or self.max_grad_norm <= 0:
            raise ValueError("learning_rate and max_grad_norm must be > 0 and weight_decay >= 0")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.bm25_tokenizer not in TOKENIZERS:
            raise ValueError(f"bm25_tokenizer must be one of {sorted(TOKENIZERS)}, got {self.bm25_tokenizer!r}")


@dataclass
class TrainingResult:
    """The trained head (on CPU, eval mode) and one history dict per epoch."""

    head: DualTowerHead
    history: list[dict]


class ProductBatchSampler:
    """Batches of (anchor, positive) listing indices of distinct products; one pass over products per epoch.

    Products with a single listing have no positive and are skipped as anchors. In
    ``product_line`` mode the products of a line are kept together (lines in random order,
    products shuffled within), so most batches hold siblings from one line; ``random``
    mode shuffles all products.
    """

    def __init__(self, product_ids: Sequence[str], product_lines: Sequence[str], batch_size: int, mode: str = "product_line", seed: int = 0):
        if len(product_ids) != len(product_lines):
            raise ValueError(f"{len(product_ids)} product ids but {len(product_lines)} product lines")
        if mode not in SAMPLERS:
            raise ValueError(f"mode must be one of {SAMPLERS}, got {mode!r}")
        if batch_size < 2:
            raise ValueError(f"batch_size must be >= 2, got {batch_size}")
        self.batch_size, self.mode, self.seed = batch_size, mode, seed
        products, codes = np.unique(np.asarray(product_ids, dtype=object).astype(str), return_inverse=True)
        order = np.argsort(codes, kind="stable")
        counts = np.bincount(codes, minlength=len(products))
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        eligible = np.flatnonzero(counts >= 2)
        self._listings = order
        self._starts, self._counts = starts[eligible], counts[eligible]
        lines = np.asarray(product_lines, dtype=object).astype(str)[order[self._starts]]
        _, self._line_codes = np.unique(lines, return_inverse=True)
        self.num_products = len(eligible)
        if self.num_products < 2:
            raise ValueError(f"need at least 2 products with 2+ listings to form contrastive pairs, found {self.num_products}")

    def __len__(self) -> int:
        full, rest = divmod(self.num_products, self.batch_size)
        return full + (rest >= 2)

    def _product_order(self, rng: np.random.Generator) -> np.ndarray:
        if self.mode == "random":
            return rng.permutation(self.num_products)
        line_rank = rng.permutation(self._line_codes.max() + 1)[self._line_codes]
        # Random tie-break inside a line, then sort by the line's random rank.
        return np.lexsort((rng.random(self.num_products), line_rank))

    def epoch(self, epoch: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """The batches of epoch ``epoch`` (deterministic given the seed and the epoch)."""
        rng = np.random.default_rng([self.seed, epoch])
        order = self._product_order(rng)
        counts, starts = self._counts[order], self._starts[order]
        first = (rng.random(len(order)) * counts).astype(np.int64)
        # A second, different listing: shift by 1..count-1 places around the product's listings.
        second = (first + 1 + (rng.random(len(order)) * (counts - 1)).astype(np.int64)) % counts
        anchors, positives = self._listings[starts + first], self._listings[starts + second]
        batches = [
            (anchors[start : start + self.batch_size], positives[start : start + self.batch_size])
            for start in range(0, len(order), self.batch_size)
        ]
        batches = [batch for batch in batches if len(batch[0]) >= 2]
        return [batches[i] for i in rng.permutation(len(batches))]


@dataclass
class FeatureTensors:
    """Catalog features as CPU tensors (shared with the numpy arrays), gathered per batch."""

    image: torch.Tensor
    image_mask: torch.Tensor
    text: torch.Tensor

    @classmethod
    def from_features(cls, features: ListingFeatures) -> "FeatureTensors":
        return cls(torch.from_numpy(features.image), torch.from_numpy(features.image_mask), torch.from_numpy(features.text))


def batch_loss(
    head: DualTowerHead,
    loss_fn: AGCLLoss,
    tensors: FeatureTensors,
    anchors: np.ndarray,
    positives: np.ndarray,
    product_codes: np.ndarray,
    scorer: BM25Scorer | None,
    device: str = "cpu",
) -> dict[str, torch.Tensor]:
    """AGCL loss of one batch of (anchor, positive) pairs: BM25 matrices, one head pass, loss."""
    both = torch.from_numpy(np.concatenate([anchors, positives]))
    embeddings = head(tensors.image[both].to(device), tensors.image_mask[both].to(device), tensors.text[both].to(device))
    queries, candidates = embeddings[: len(anchors)], embeddings[len(anchors) :]
    bm25 = bm25_reverse = None
    if loss_fn.config.use_weights:
        if scorer is None:
            raise ValueError("a BM25 scorer is required when AGCL weights are on")
        bm25 = scorer.batch_matrix(anchors, positives).to(device)
        if loss_fn.config.symmetric:
            bm25_reverse = scorer.batch_matrix(positives, anchors).to(device)
    same_product = torch.from_numpy(product_codes[anchors][:, None] == product_codes[positives][None, :]).to(device)
    return loss_fn(queries, candidates, head.temperature, bm25, same_product, bm25_reverse)



def make_optimizer(head: DualTowerHead, learning_rate: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with decay on weight matrices only (not biases nor the temperature)."""
    trainable = [(name, p) for name, p in head.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for _, p in trainable if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for _, p in trainable if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=learning_rate)


def train_encoder(
    features: ListingFeatures,
    product_ids: Sequence[str],
    product_lines: Sequence[str],
    attribute_texts: Sequence[str],
    config: EncoderTrainingConfig | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> TrainingResult:
    """Train a :class:`DualTowerHead` on ``features`` (text features of listing_text(title, attributes)).

    ``product_ids``, ``product_lines`` and ``attribute_texts`` are aligned with the rows of
    ``features``; attribute texts feed BM25 (e.g. ``"colour: red; neckline: v-neck"``).
    """
    config = config or EncoderTrainingConfig()
    n = len(features)
    if not (len(product_ids) == len(product_lines) == len(attribute_texts) == n):
        raise ValueError(
            f"{n} listings but {len(product_ids)} product ids, {len(product_lines)} lines, {len(attribute_texts)} attribute texts"
        )
    head_config = replace(config.head, image_dim=features.image.shape[1], text_dim=features.text.shape[1])
    sampler = ProductBatchSampler(product_ids, product_lines, config.batch_size, config.sampler, config.seed)
    scorer = BM25Scorer(attribute_texts, tokenizer=config.bm25_tokenizer) if config.agcl.use_weights else None
    _, product_codes = np.unique(np.asarray(product_ids, dtype=object).astype(str), return_inverse=True)
    tensors = FeatureTensors.from_features(features)
    loss_fn = AGCLLoss(config.agcl)
    steps_per_epoch = math.ceil(len(sampler) / config.grad_accumulation)
    total_steps = config.epochs * steps_per_epoch
    history: list[dict] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        head = DualTowerHead(head_config)
        if config.pca_init:
            head.init_from_features(features, seed=config.seed)
        head.to(config.device).train()
        optimizer = make_optimizer(head, config.learning_rate, config.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(total_steps, config.warmup_fraction)
        )
        for epoch in range(config.epochs):
            started = time.perf_counter()
            sums = {"loss": 0.0, "mean_negative_weight": 0.0, "masked_fraction": 0.0}
            batches = sampler.epoch(epoch)
            optimizer.zero_grad(set_to_none=True)
            for number, (anchors, positives) in enumerate(batches, start=1):
                out = batch_loss(head, loss_fn, tensors, anchors, positives, product_codes, scorer, config.device)
                (out["loss"] / config.grad_accumulation).backward()
                if number % config.grad_accumulation == 0 or number == len(batches):
                    torch.nn.utils.clip_grad_norm_(head.parameters(), config.max_grad_norm)
                    optimizer.step()
                    schedule.step()
                    optimizer.zero_grad(set_to_none=True)
                for key in sums:
                    sums[key] += float(out[key].detach())
            record = {
                "epoch": epoch + 1,
                "loss": sums["loss"] / len(batches),
                "lr": optimizer.param_groups[0]["lr"],
                "temperature": float(head.temperature.detach()),
                "mean_negative_weight": sums["mean_negative_weight"] / len(batches),
                "masked_fraction": sums["masked_fraction"] / len(batches),
                "seconds": time.perf_counter() - started,
            }
            history.append(record)
            if on_epoch is not None:
                on_epoch(record)
    return TrainingResult(head=head.cpu().eval(), history=history)
