"""Supervised fine-tuning of the attribute generator on the teacher's attributes (distillation).

Teacher forcing with cross-entropy over the canonical token sequence of each target
attribute set, AdamW with linear warmup then cosine decay. ``attribute_accuracy`` scores
generated texts against gold attribute sets.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..attributes.format import normalize_attributes, parse_attributes
from ..attributes.generator import AttributeGenerator, feature_tensor
from ..attributes.vocabulary import BOS_ID, EOS_ID, PAD_ID, AttributeVocabulary
from .checkpoints import LoopCheckpoint
from .distributed import distributed_world, wrap_for_ranks
from .optimizers import adamw
from .schedules import warmup_cosine


@dataclass
class SFTConfig:
    epochs: int = 60  # the pipeline's (AttributeGeneratorConfig reads it through DistillationSettings)
    batch_size: int = 64
    learning_rate: float = 2e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"SFTConfig needs epochs >= 1 and batch_size >= 1, got {self.epochs} and {self.batch_size}")
        if self.learning_rate <= 0 or self.weight_decay < 0:
            raise ValueError(f"SFTConfig needs learning_rate > 0 and weight_decay >= 0, got {self.learning_rate}, {self.weight_decay}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"SFTConfig.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")


def encode_targets(vocab: AttributeVocabulary, targets: list[dict], max_new_tokens: int) -> tuple[torch.Tensor, int]:
    """Targets as ``[N, T]`` ids ending in ``<eos>``, right-padded; and the number of pairs left
    out (unknown to the vocabulary, or beyond ``max_new_tokens``)."""
    rows, skipped = [], 0
    for attributes in targets:
        ids, left_out = vocab.encode_counting(attributes, max_tokens=max_new_tokens)
        rows.append(ids + [EOS_ID])
        skipped += left_out
    length = max(len(row) for row in rows)
    padded = torch.full((len(rows), length), PAD_ID, dtype=torch.long)
    for index, row in enumerate(rows):
        padded[index, : len(row)] = torch.tensor(row)
    return padded, skipped



def train_generator_sft(
    model: AttributeGenerator,
    vocab: AttributeVocabulary,
    image,
    image_mask,
    text,
    targets: list[dict],
    config: SFTConfig | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    checkpoint: LoopCheckpoint | None = None,
) -> list[dict]:
    """Train ``model`` in place to write ``targets`` (one attribute dict per row of the features).

    With ``checkpoint``, the model, optimizer, schedule and random state are saved after every
    ``checkpoint.every`` epochs, and a run that finds a checkpoint goes on from the epoch after it
    (the epochs' shuffles are replayed from the seed, so it trains as the uninterrupted run would).

    Returns one record per epoch: ``epoch``, ``loss`` (mean token cross-entropy),
    ``token_accuracy`` (teacher-forced), ``learning_rate`` (at the epoch's end), ``seconds``,
    ``skipped_pairs`` (target pairs the vocabulary or length could not hold). The model is
    left in eval mode.
    """
    config = config or SFTConfig()
    if len(targets) != len(image) or len(image) != len(text) or len(image) != len(image_mask):
        raise ValueError(f"features ({len(image)}, {len(image_mask)}, {len(text)}) and targets ({len(targets)}) differ in length")
    if not targets:
        raise ValueError("no training targets")
    if len(vocab) != model.vocab_size:
        raise ValueError(f"vocabulary has {len(vocab)} tokens but the model was built for {model.vocab_size}")
    device = torch.device(config.device)
    model.to(device)
    image_t = feature_tensor(image, torch.float32, device)
    mask_t = feature_tensor(image_mask, torch.bool, device)
    text_t = feature_tensor(text, torch.float32, device)
    sequences, skipped = encode_targets(vocab, targets, model.config.max_new_tokens)
    sequences = sequences.to(device)
    inputs = torch.cat([torch.full((len(targets), 1), BOS_ID, dtype=torch.long, device=device), sequences[:, :-1]], dim=1)

    optimizer = adamw(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(targets) / config.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config.epochs * steps_per_epoch, config.warmup_fraction))
    shuffler = np.random.default_rng(config.seed)
    history: list[dict] = []
    # Dropout draws from the global generator: seed it without disturbing the caller's state.
    cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    # Under torchrun: DDP, each rank taking its share of every global batch.
    rank, world_size = distributed_world()
    ranks = wrap_for_ranks(model, device, inputs_are_listings=False) if world_size > 1 else None
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(config.seed)
        model.train()
        done = 0
        if checkpoint is not None:
            done, history = checkpoint.resume(model, optimizer, scheduler, device=device)
            for _ in range(done):  # the shuffles of the epochs already trained
                shuffler.permutation(len(targets))
        for epoch in range(done, config.epochs):
            started = time.perf_counter()
            loss_sum, correct, tokens = 0.0, 0, 0
            order = torch.as_tensor(shuffler.permutation(len(targets)), device=device)
            for start in range(0, len(targets), config.batch_size):
                batch = order[start : start + config.batch_size]
                # Trim the padding columns this batch does not need.
                length = int((sequences[batch] != PAD_ID).sum(dim=1).max())
                count = int((sequences[batch, :length] != PAD_ID).sum())  # the global batch's tokens
                weight = 1.0
                if ranks is not None:  # this rank's rows of the global batch
                    mine = np.array_split(np.arange(len(batch)), world_size)[rank]
                    # A last batch smaller than the world: a rank without rows runs one row at weight 0 (DDP needs every rank's backward).
                    weight, mine = (1.0, mine) if len(mine) else (0.0, np.arange(1))
                    batch = batch[torch.from_numpy(mine).to(device)]
                target = sequences[batch, :length]
                logits = (model if ranks is None else ranks)(image_t[batch], mask_t[batch], text_t[batch], inputs[batch, :length])
                # Token cross-entropy summed here, over the global batch's tokens: with DDP's mean over
                # ranks (times the world size) the gradient is the one-process gradient of the batch.
                summed = weight * F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=PAD_ID, reduction="sum")
                loss = summed / count
                optimizer.zero_grad(set_to_none=True)
                (loss * world_size).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                real = target != PAD_ID
                batch_correct = torch.tensor([float(summed.detach()), weight * float(((logits.argmax(-1) == target) & real).sum())], device=device)
                if ranks is not None:
                    torch.distributed.all_reduce(batch_correct)
                loss_sum += float(batch_correct[0])
                correct += int(batch_correct[1])
                tokens += count
            record = {
                "epoch": epoch,
                "loss": loss_sum / tokens,
                "token_accuracy": correct / tokens,
                "learning_rate": scheduler.get_last_lr()[0],
                "seconds": time.perf_counter() - started,
                "skipped_pairs": skipped,
            }
            history.append(record)
            if checkpoint is not None and rank == 0:  # one writer; every rank reads it back on resume
                checkpoint.save(epoch + 1, config.epochs, model, optimizer, history, scheduler, device=device)
            if on_epoch:
                on_epoch(record)
    model.eval()
    return history


def attribute_accuracy(predicted_texts: list[str], gold: list[dict], vocabulary: set[str] | frozenset[str] | None = None) -> dict:
    """Score generated texts against gold attribute sets (both normalised).

    ``validity_rate``: share of texts that parse (with ``vocabulary``: using known keys only).
    ``pair_precision`` / ``pair_recall`` / ``pair_f1``: micro-averaged over key-value pairs; an
    invalid text counts as predicting nothing. ``key_exact_match``: for each gold key, the
    share of listings having it whose predicted value is exactly the gold value.
    """
    if len(predicted_texts) != len(gold):
        raise ValueError(f"{len(predicted_texts)} predictions for {len(gold)} gold sets")
    valid = true_positive = predicted_pairs = gold_pairs = 0
    key_hits: dict[str, list[int]] = {}
    for text, gold_set in zip(predicted_texts, gold):
        parsed = parse_attributes(text, vocabulary)
        predicted = parsed.attributes or {}
        valid += parsed.is_valid
        gold_set = normalize_attributes(gold_set or {})
        matches = sum(predicted.get(key) == value for key, value in gold_set.items())
        true_positive += matches
        predicted_pairs += len(predicted)
        gold_pairs += len(gold_set)
        for key, value in gold_set.items():
            hits = key_hits.setdefault(key, [0, 0])
            hits[0] += predicted.get(key) == value
            hits[1] += 1
    precision = true_positive / predicted_pairs if predicted_pairs else 0.0
    recall = true_positive / gold_pairs if gold_pairs else 0.0
    return {
        "validity_rate": valid / len(gold) if gold else 0.0,
        "pair_precision": precision,
        "pair_recall": recall,
        "pair_f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "key_exact_match": {key: hits / total for key, (hits, total) in sorted(key_hits.items())},
        "num_items": len(gold),
    }
