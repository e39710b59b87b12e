"""Stage 1 training: the dual-tower head on frozen features with AGCL (or plain InfoNCE).

A batch is B (anchor, positive) pairs: two listings of each of B distinct products. Products
are drawn preferably from the same product line, so that in-batch negatives are the hard
near-identical siblings AGCL is built for.

With ``checkpoint_dir`` set, training writes checkpoints (see :mod:`.checkpoints`) and a
later call resumes exactly where the last one stopped: on CPU a resumed run ends with the
same weights and history, bit for bit, as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..encoders.dual_tower import DualTowerConfig, DualTowerHead, ListingFeatures
from ..encoders.backends import EncoderBackend
from ..encoders.listing_encoder import FrozenTowerEncoder, ListingEncoder, ListingInputs, new_encoder
from .agcl import AGCLConfig, AGCLLoss
from .bm25 import TOKENIZERS, BM25Scorer
from .checkpoints import (
    rng_state,
    set_rng_state,
    check_fingerprint,
    config_fingerprint,
    flatten_tensors,
    has_checkpoint,
    load_checkpoint,
    save_checkpoint,
    unflatten_tensors,
)
from .distributed import barrier, distributed_embeddings, distributed_world, wrap_for_ranks
from .optimizers import adamw
from .schedules import warmup_cosine

if TYPE_CHECKING:
    import PIL.Image

    from ..encoders.vlm2vec import VLM2VecEncoder

SAMPLERS = ("product_line", "random")
MIXED_PRECISION = ("auto", "bf16", "no")
CHECKPOINT_FORMAT = 1
# Where and when to checkpoint or stop, and the device, do not change what is computed, so a
# run may resume with other values for them; every other field must match the checkpoint.
NOT_FINGERPRINTED = ("device", "checkpoint_dir", "checkpoint_every_steps", "max_steps")


@dataclass
class EncoderTrainingConfig:
    """Optimisation settings; ``agcl`` and ``head`` also accept plain dicts (e.g. from run config).
    The defaults are the pipeline's (``EncoderTrainingRunConfig`` of the ``agcl_encoder`` asset reads them)."""

    epochs: int = 40
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    grad_accumulation: int = 1
    sampler: str = "product_line"
    # Pairs drawn per product in an epoch, adjacent in the sampler's order (so mostly in one
    # batch): more steps per epoch and several views of a product per batch on small catalogs.
    pairs_per_product: int = 1
    seed: int = 0
    agcl: AGCLConfig = field(default_factory=AGCLConfig)
    head: DualTowerConfig = field(default_factory=DualTowerConfig)
    device: str = "cpu"
    bm25_tokenizer: str = "words"
    max_grad_norm: float = 1.0
    pca_init: bool = True
    # "auto": bf16 autocast of the head's forward pass on CUDA, full precision on CPU.
    mixed_precision: str = "auto"
    checkpoint_dir: str | None = None
    # Checkpoint every this many optimizer steps; 0 = at the end of every epoch.
    checkpoint_every_steps: int = 0
    # Stop after this many optimizer steps in all (leaving a checkpoint); None = train to the end.
    max_steps: int | None = None

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
        if self.pairs_per_product < 1:
            raise ValueError(f"pairs_per_product must be >= 1, got {self.pairs_per_product}")
        if self.bm25_tokenizer not in TOKENIZERS:
            raise ValueError(f"bm25_tokenizer must be one of {sorted(TOKENIZERS)}, got {self.bm25_tokenizer!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        if self.mixed_precision == "bf16" and torch.device(self.device).type != "cuda":
            raise ValueError(f"mixed_precision='bf16' needs a CUDA device, got device={self.device!r}")
        if self.checkpoint_every_steps < 0:
            raise ValueError(f"checkpoint_every_steps must be >= 0, got {self.checkpoint_every_steps}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps}")

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype of the head's forward pass; None (full precision) off CUDA or with "no"."""
        on_cuda = torch.device(self.device).type == "cuda"
        return torch.bfloat16 if on_cuda and self.mixed_precision in ("auto", "bf16") else None


@dataclass
class TrainingResult:
    """The trained encoder (on CPU, eval mode; ``head`` for the frozen-tower backend) and one history dict per epoch.

    ``completed`` is False when ``max_steps`` stopped training early; ``global_step`` counts
    optimizer steps, those before a resumed checkpoint included.
    """

    head: DualTowerHead | None
    history: list[dict]
    global_step: int = 0
    completed: bool = True
    encoder: ListingEncoder | None = None  # the trained encoder, whatever its backend


class ProductBatchSampler:
    """Batches of (anchor, positive) listing indices; one pass over products per epoch.

    Each product gives ``pairs_per_product`` pairs an epoch, next to each other in the order
    (so a batch holds several views of it; the loss never counts two listings of one product
    as negatives). Products with a single listing have no positive and are skipped. In
    ``product_line`` mode the products of a line are kept together (lines in random order,
    products shuffled within), so most batches hold siblings from one line; ``random``
    mode shuffles all products.
    """

    def __init__(self, product_ids: Sequence[str], product_lines: Sequence[str], batch_size: int, mode: str = "product_line", seed: int = 0,
                 pairs_per_product: int = 1):
        if len(product_ids) != len(product_lines):
            raise ValueError(f"{len(product_ids)} product ids but {len(product_lines)} product lines")
        if mode not in SAMPLERS:
            raise ValueError(f"mode must be one of {SAMPLERS}, got {mode!r}")
        if batch_size < 2:
            raise ValueError(f"batch_size must be >= 2, got {batch_size}")
        if pairs_per_product < 1:
            raise ValueError(f"pairs_per_product must be >= 1, got {pairs_per_product}")
        self.batch_size, self.mode, self.seed, self.pairs_per_product = batch_size, mode, seed, pairs_per_product
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
        full, rest = divmod(self.num_products * self.pairs_per_product, self.batch_size)
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
        order = np.repeat(self._product_order(rng), self.pairs_per_product)
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
    def from_features(cls, features: ListingFeatures) -> FeatureTensors:
        return cls(torch.from_numpy(features.image), torch.from_numpy(features.image_mask), torch.from_numpy(features.text))


def batch_loss(
    head: DualTowerHead,
    loss_fn: AGCLLoss,
    tensors: FeatureTensors,
    anchors: np.ndarray,
    positives: np.ndarray,
    product_codes: np.ndarray,
    scorer: BM25Scorer | None,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """AGCL loss of one batch of (anchor, positive) pairs: BM25 matrices, one head pass, loss.

    With ``autocast_dtype`` (CUDA only) the head's forward pass runs under autocast; the
    similarities and the loss are always computed in float32.
    """
    both = torch.from_numpy(np.concatenate([anchors, positives]))
    precision = torch.autocast(device_type="cuda", dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    with precision:
        embeddings = head(tensors.image[both].to(device), tensors.image_mask[both].to(device), tensors.text[both].to(device))
    return pair_loss(loss_fn, embeddings.float(), head.temperature.float(), anchors, positives, product_codes, scorer)


def encoder_batch_loss(
    encoder: ListingEncoder,
    loss_fn: AGCLLoss,
    inputs: ListingInputs,
    anchors: np.ndarray,
    positives: np.ndarray,
    product_codes: np.ndarray,
    scorer: BM25Scorer | None,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """AGCL loss of one batch of (anchor, positive) pairs through any :class:`ListingEncoder`:
    one forward pass over both sides (under bf16 autocast when ``autocast_dtype`` is set, CUDA
    only); the similarities and the loss are computed in float32."""
    both = np.concatenate([anchors, positives])
    precision = torch.autocast(device_type="cuda", dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    with precision:
        embeddings = encoder.embed_rows(inputs, both)
    return pair_loss(loss_fn, embeddings.float(), encoder.temperature.float(), anchors, positives, product_codes, scorer)


def pair_loss(
    loss_fn: AGCLLoss,
    embeddings: torch.Tensor,
    temperature: torch.Tensor,
    anchors: np.ndarray,
    positives: np.ndarray,
    product_codes: np.ndarray,
    scorer: BM25Scorer | None,
) -> dict[str, torch.Tensor]:
    """AGCL loss of ``embeddings`` = anchors' rows then positives' rows: BM25 matrices of the
    pairs (both directions when symmetric), the same-product mask, the loss."""
    device = embeddings.device
    queries, candidates = embeddings[: len(anchors)], embeddings[len(anchors) :]
    bm25 = bm25_reverse = None
    if loss_fn.config.use_weights:
        if scorer is None:
            raise ValueError("a BM25 scorer is required when AGCL weights are on")
        bm25 = scorer.batch_matrix(anchors, positives).to(device)
        if loss_fn.config.symmetric:
            bm25_reverse = scorer.batch_matrix(positives, anchors).to(device)
    codes = np.asarray(product_codes)
    same_product = torch.from_numpy(codes[anchors][:, None] == codes[positives][None, :]).to(device)
    return loss_fn(queries, candidates, temperature, bm25, same_product, bm25_reverse)


def vlm2vec_batch_loss(
    encoder: VLM2VecEncoder,
    loss_fn: AGCLLoss,
    images: Sequence[PIL.Image.Image | None],
    texts: Sequence[str],
    anchors: np.ndarray,
    positives: np.ndarray,
    product_codes: np.ndarray,
    scorer: BM25Scorer | None = None,
) -> dict[str, torch.Tensor]:
    """AGCL loss of one batch of (anchor, positive) listing pairs through a VLM2Vec encoder whose
    listing texts are already written (``texts``, e.g. by ``listing_prompt_text``): the same as
    :func:`encoder_batch_loss` over ``ListingInputs`` of those images and texts.
    ``anchors``/``positives`` index ``images``/``texts``."""
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images but {len(texts)} texts")
    inputs = ListingInputs([str(i) for i in range(len(texts))], list(texts), images=list(images))
    anchors, positives = np.asarray(anchors, dtype=np.int64), np.asarray(positives, dtype=np.int64)
    return encoder_batch_loss(encoder, loss_fn, inputs, anchors, positives, product_codes, scorer)


def make_optimizer(model: torch.nn.Module, learning_rate: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with decay on weight matrices only (not biases nor the temperature), over the
    parameters that require grad. A model may scale the rate of some of them with a method
    ``learning_rate_scale(name) -> float`` (a fine-tuned tower learns slower than its head)."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    scale = getattr(model, "learning_rate_scale", None)
    if scale is not None:
        groups = {}
        for name, p in trainable:
            key = (float(scale(name)), p.dim() >= 2)
            groups.setdefault(key, []).append(p)
        return adamw(
            [{"params": ps, "lr": learning_rate * factor, "weight_decay": weight_decay if matrix else 0.0}
             for (factor, matrix), ps in sorted(groups.items())],
            lr=learning_rate,
        )
    groups = [
        {"params": [p for _, p in trainable if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for _, p in trainable if p.dim() < 2], "weight_decay": 0.0},
    ]
    return adamw([g for g in groups if g["params"]], lr=learning_rate)


SUMMED = ("loss", "mean_negative_weight", "masked_fraction")


@dataclass
class TrainingProgress:
    """Where a run stands between optimizer steps: what a checkpoint stores besides tensors."""

    global_step: int = 0
    epoch: int = 0  # index of the epoch in progress
    position: int = 0  # batches of that epoch already trained on
    sums: dict = field(default_factory=lambda: dict.fromkeys(SUMMED, 0.0))
    seconds: float = 0.0  # time spent on that epoch so far
    history: list = field(default_factory=list)


def data_fingerprint(features: ListingFeatures, product_ids: Sequence[str], product_lines: Sequence[str], attribute_texts: Sequence[str]) -> dict:
    """Shape and content digest of the training data, so a checkpoint resumes on the same data only."""
    digest = hashlib.blake2b(digest_size=16)
    for array in (features.image, features.image_mask, features.text):
        digest.update(np.ascontiguousarray(array).data)
    for values in (features.listing_ids, product_ids, product_lines, attribute_texts):
        digest.update(json.dumps([str(value) for value in values]).encode())
    return {
        "data.listings": len(features),
        "data.image_dim": int(features.image.shape[1]),
        "data.text_dim": int(features.text.shape[1]),
        "data.digest": digest.hexdigest(),
    }


def _save_training_checkpoint(
    directory: str, encoder: ListingEncoder, optimizer: torch.optim.Optimizer, schedule: torch.optim.lr_scheduler.LRScheduler,
    progress: TrainingProgress, fingerprint: dict, device: torch.device,
) -> None:
    optimizer_structure, optimizer_tensors = flatten_tensors(optimizer.state_dict(), "optimizer")
    schedule_structure, schedule_tensors = flatten_tensors(schedule.state_dict(), "schedule")
    rng_tensors, rng_meta = rng_state(device)
    state = {**encoder.checkpoint_state(), **optimizer_tensors, **schedule_tensors, **rng_tensors}
    meta = {
        "format": CHECKPOINT_FORMAT,
        "fingerprint": fingerprint,
        "progress": asdict(progress),
        "optimizer": optimizer_structure,
        "schedule": schedule_structure,
        "rng": rng_meta,
    }
    save_checkpoint(directory, state, meta)


def _load_training_checkpoint(
    directory: str, encoder: ListingEncoder, optimizer: torch.optim.Optimizer, schedule: torch.optim.lr_scheduler.LRScheduler,
    fingerprint: dict, device: torch.device,
) -> TrainingProgress:
    state, meta = load_checkpoint(directory)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint in {directory} has format {meta.get('format')!r}, this code reads {CHECKPOINT_FORMAT}")
    check_fingerprint(meta["fingerprint"], fingerprint)
    own = set(encoder.checkpoint_state())
    encoder.load_checkpoint_state({name: t for name, t in state.items() if name in own})
    optimizer.load_state_dict(unflatten_tensors(meta["optimizer"], state))
    schedule.load_state_dict(unflatten_tensors(meta["schedule"], state))
    set_rng_state(state, meta["rng"], device)
    return TrainingProgress(**meta["progress"])


def train_encoder(
    features: ListingFeatures,
    product_ids: Sequence[str],
    product_lines: Sequence[str],
    attribute_texts: Sequence[str],
    config: EncoderTrainingConfig | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    resume: bool = True,
    initial_head: DualTowerHead | None = None,
) -> TrainingResult:
    """Train a :class:`DualTowerHead` on ``features`` (text features of listing_text(title, attributes)).

    ``product_ids``, ``product_lines`` and ``attribute_texts`` are aligned with the rows of
    ``features``; attribute texts feed BM25 (e.g. ``"colour: red; neckline: v-neck"``).
    ``initial_head`` starts from that head's weights (e.g. another round of training on new
    attributes) instead of the PCA start; its shape must match. Checkpoints and ``resume``:
    see :func:`train_listing_encoder`.
    """
    config = config or EncoderTrainingConfig()
    head_config = replace(config.head, image_dim=features.image.shape[1], text_dim=features.text.shape[1])

    def build() -> FrozenTowerEncoder:
        head = DualTowerHead(head_config)
        if initial_head is not None:
            head.load_state_dict(initial_head.state_dict())
        return FrozenTowerEncoder(head)

    inputs = ListingInputs(features.listing_ids, [""] * len(features), features=features)
    fingerprint = {}
    if initial_head is not None:  # a checkpoint resumes only from the same starting weights
        digest = hashlib.blake2b(digest_size=16)
        for name, tensor in sorted(initial_head.state_dict().items()):
            digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
        fingerprint["initial_head"] = digest.hexdigest()
    result = train_listing_encoder(
        build, inputs, product_ids, product_lines, attribute_texts, config, on_epoch, resume,
        fresh_start=config.pca_init and initial_head is None, extra_fingerprint=fingerprint,
    )
    result.head = result.encoder.head
    return result


def train_backend_encoder(
    backend: EncoderBackend,
    inputs: ListingInputs,
    product_ids: Sequence[str],
    product_lines: Sequence[str],
    attribute_texts: Sequence[str],
    config: EncoderTrainingConfig | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    **options,
) -> TrainingResult:
    """Train the encoder ``backend`` names on ``inputs`` with AGCL: the frozen-tower head on
    ``inputs.features`` (:func:`train_encoder`), any other backend from raw photos and text
    (:func:`train_listing_encoder`); ``options`` go to the backend's constructor."""
    config = config or EncoderTrainingConfig()
    if not backend.reads_raw_inputs:
        if inputs.features is None:
            raise ValueError("the dual-tower backend trains on the towers' cached features: ListingInputs.features is missing")
        if options:
            raise ValueError(f"the dual-tower backend takes no options, got {sorted(options)}")
        return train_encoder(inputs.features, product_ids, product_lines, attribute_texts, config, on_epoch)

    def build() -> ListingEncoder:
        return new_encoder(backend, config.head, device=config.device, seed=config.seed, **options)

    return train_listing_encoder(build, inputs, product_ids, product_lines, attribute_texts, config, on_epoch)


def inputs_fingerprint(inputs: ListingInputs, product_ids: Sequence[str], product_lines: Sequence[str], attribute_texts: Sequence[str]) -> dict:
    """What a checkpoint must be resumed on: the cached features when the encoder reads them,
    else the texts and image locations of the listings."""
    if inputs.features is not None:
        return data_fingerprint(inputs.features, product_ids, product_lines, attribute_texts)
    digest = hashlib.blake2b(digest_size=16)
    for values in (inputs.listing_ids, inputs.texts(), inputs.image_uris or [], product_ids, product_lines, attribute_texts):
        digest.update(json.dumps([str(value) for value in values]).encode())
    return {"data.listings": len(inputs), "data.digest": digest.hexdigest()}


def train_listing_encoder(
    encoder: ListingEncoder | Callable[[], ListingEncoder],
    inputs: ListingInputs,
    product_ids: Sequence[str],
    product_lines: Sequence[str],
    attribute_texts: Sequence[str],
    config: EncoderTrainingConfig | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    resume: bool = True,
    fresh_start: bool = True,
    extra_fingerprint: dict | None = None,
) -> TrainingResult:
    """Train any :class:`ListingEncoder` with AGCL (or plain InfoNCE) on the rows of ``inputs``.

    The one training loop of every encoder backend: the product-line sampler, BM25 weights
    over ``attribute_texts``, gradient accumulation, bf16 autocast on CUDA, gradient clipping,
    warmup + cosine. ``fresh_start`` lets the encoder prepare itself (the head's PCA start)
    when no checkpoint is resumed. ``encoder`` may be a function that builds it: it is then
    built after the training seed is set, so its random start is the seed's.

    With ``config.checkpoint_dir`` set, checkpoints (the encoder's trained weights, optimizer,
    schedule, position, random generators) are written there; when it already holds one and
    ``resume`` is true, training continues from it (weights, optimizer, schedule, step,
    position in the epoch, random generators, history) after checking that config and data
    match it (ValueError naming the differing fields otherwise). ``on_epoch`` is called for
    the epochs finished by this call only. ``resume=False`` starts afresh and overwrites.
    """
    config = config or EncoderTrainingConfig()
    n = len(inputs)
    if not (len(product_ids) == len(product_lines) == len(attribute_texts) == n):
        raise ValueError(
            f"{n} listings but {len(product_ids)} product ids, {len(product_lines)} lines, {len(attribute_texts)} attribute texts"
        )
    sampler = ProductBatchSampler(product_ids, product_lines, config.batch_size, config.sampler, config.seed, config.pairs_per_product)
    scorer = BM25Scorer(attribute_texts, tokenizer=config.bm25_tokenizer) if config.agcl.use_weights else None
    _, product_codes = np.unique(np.asarray(product_ids, dtype=object).astype(str), return_inverse=True)
    loss_fn = AGCLLoss(config.agcl)
    steps_per_epoch = math.ceil(len(sampler) / config.grad_accumulation)
    total_steps = config.epochs * steps_per_epoch
    device = torch.device(config.device)
    autocast_dtype = config.autocast_dtype
    progress = TrainingProgress()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        if not isinstance(encoder, ListingEncoder):
            encoder = encoder()
        fingerprint: dict = {}
        if config.checkpoint_dir is not None:
            fingerprint = {
                **config_fingerprint(config, NOT_FINGERPRINTED),
                **inputs_fingerprint(inputs, product_ids, product_lines, attribute_texts),
                **(extra_fingerprint or {}),
            }
            if encoder.kind != FrozenTowerEncoder.kind:
                fingerprint["encoder.kind"] = encoder.kind
            fingerprint.update(encoder.fingerprint())
        resuming = config.checkpoint_dir is not None and resume and has_checkpoint(config.checkpoint_dir)
        if fresh_start and not resuming:
            encoder.prepare_training(inputs, config.seed)
        encoder.to(device).train()
        optimizer = make_optimizer(encoder, config.learning_rate, config.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(total_steps, config.warmup_fraction)
        )
        if resuming:
            progress = _load_training_checkpoint(config.checkpoint_dir, encoder, optimizer, schedule, fingerprint, device)
        # Under torchrun (a process group of several ranks): DDP, each rank embedding its products of the global batch.
        rank, world_size = distributed_world()
        ranks = wrap_for_ranks(encoder, device) if world_size > 1 else None

        def checkpoint() -> None:
            if config.checkpoint_dir is not None:
                if rank == 0:  # one writer; every rank reads it back on resume
                    _save_training_checkpoint(config.checkpoint_dir, encoder, optimizer, schedule, progress, fingerprint, device)
                barrier()

        def stop_now() -> bool:
            return config.max_steps is not None and progress.global_step >= config.max_steps

        trained = [p for p in encoder.parameters() if p.requires_grad]
        while progress.epoch < config.epochs and not stop_now():
            started = time.perf_counter() - progress.seconds
            batches = sampler.epoch(progress.epoch)
            optimizer.zero_grad(set_to_none=True)
            for number, (anchors, positives) in enumerate(batches, start=1):
                if number <= progress.position:
                    continue  # trained on before the checkpoint this run resumed from
                if ranks is None:
                    out = encoder_batch_loss(encoder, loss_fn, inputs, anchors, positives, product_codes, scorer, autocast_dtype)
                else:
                    precision = (torch.autocast(device_type="cuda", dtype=autocast_dtype) if autocast_dtype is not None
                                 else contextlib.nullcontext())
                    embeddings, temperature, order = distributed_embeddings(ranks, inputs, anchors, positives, product_codes, precision)
                    out = pair_loss(loss_fn, embeddings, temperature.float(), anchors[order], positives[order], product_codes, scorer)
                (out["loss"] / config.grad_accumulation).backward()
                stepped = number % config.grad_accumulation == 0 or number == len(batches)
                if stepped:
                    torch.nn.utils.clip_grad_norm_(trained, config.max_grad_norm)
                    optimizer.step()
                    schedule.step()
                    optimizer.zero_grad(set_to_none=True)
                    progress.global_step += 1
                for key in progress.sums:
                    progress.sums[key] += float(out[key].detach())
                if not stepped:
                    continue
                # Checkpoints fall between optimizer steps only, where no gradient is pending.
                progress.position, progress.seconds = number, time.perf_counter() - started
                if stop_now():
                    break
                if config.checkpoint_every_steps and progress.global_step % config.checkpoint_every_steps == 0:
                    checkpoint()
            else:
                record = {
                    "epoch": progress.epoch + 1,
                    "loss": progress.sums["loss"] / len(batches),
                    "lr": max(group["lr"] for group in optimizer.param_groups),
                    "temperature": float(encoder.temperature.detach()),
                    "mean_negative_weight": progress.sums["mean_negative_weight"] / len(batches),
                    "masked_fraction": progress.sums["masked_fraction"] / len(batches),
                    "seconds": time.perf_counter() - started,
                }
                progress.history.append(record)
                progress.epoch, progress.position, progress.seconds = progress.epoch + 1, 0, 0.0
                progress.sums = dict.fromkeys(SUMMED, 0.0)
                if on_epoch is not None:
                    on_epoch(record)
                if config.checkpoint_every_steps == 0 or progress.epoch == config.epochs:
                    checkpoint()
                continue
            checkpoint()  # stopped by max_steps
    return TrainingResult(
        head=None,
        history=list(progress.history),
        global_step=progress.global_step,
        completed=progress.epoch >= config.epochs,
        encoder=encoder.cpu().eval(),
    )
