"""RAR: retrieval-aware attribute reinforcement of the generator with GRPO.

Per step, for ``queries_per_step`` training queries the current policy samples a group of
``group_size`` attribute outputs; ``reward_fn`` scores them (in AFMRL: Recall@k of the
query's true matches when the attributes are appended to it, -0.1 for unparseable output).
Advantages are the rewards normalised within each group, ``(r - mean) / (std + 1e-4)``.

Choices the paper leaves open, made here:

- **Token-level clipped ratio.** Each generated token ``t`` (``<eos>`` included) carries
  ``ratio_t = pi(t) / pi_old(t)`` and the sequence's advantage; the loss term is the PPO
  clipped surrogate ``-min(ratio_t A, clip(ratio_t, 1-eps, 1+eps) A)``.
- **KL to the SFT generator with the k3 estimator**, per token:
  ``exp(ref_t - logp_t) - (ref_t - logp_t) - 1`` (non-negative, unbiased for KL(pi || ref)),
  weighted by ``kl_beta``.
- **Loss averaged over all generated tokens of the batch** (not per sequence first): per-
  sequence averaging gives each token of a short output more weight, a length bias on top of
  the shortening the paper already observes.
- Log-probabilities are taken at the sampling ``temperature`` (the distribution actually
  sampled), with dropout off, so the first update starts at ratio 1 exactly.
- AdamW without weight decay (decay would pull the policy away from the reference too) and
  a constant learning rate; ``updates_per_batch`` optimiser steps per sampled batch, each over
  ``grad_accumulation`` micro-batches.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..attributes.format import parse_attributes
from ..attributes.generator import AttributeGenerator, feature_tensor
from ..attributes.vocabulary import AttributeVocabulary
from .checkpoints import LoopCheckpoint
from .optimizers import adamw

RewardFn = Callable[[np.ndarray, list[list[str]]], np.ndarray]
LOGGED_SAMPLES = 4


@dataclass
class GRPOConfig:
    """The GRPO schedule; the defaults are the pipeline's (``RARConfig`` of the ``rar_generator`` asset reads them)."""

    steps: int = 60
    queries_per_step: int = 16
    group_size: int = 8
    learning_rate: float = 3e-4
    kl_beta: float = 0.01
    clip_epsilon: float = 0.2
    temperature: float = 1.0
    updates_per_batch: int = 2
    grad_accumulation: int = 1
    max_grad_norm: float = 1.0
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self):
        for name in ("steps", "queries_per_step", "updates_per_batch", "grad_accumulation"):
            if getattr(self, name) < 1:
                raise ValueError(f"GRPOConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2:
            raise ValueError(f"GRPOConfig.group_size must be >= 2 (advantages are relative within a group), got {self.group_size}")
        for name in ("learning_rate", "temperature", "max_grad_norm"):
            if getattr(self, name) <= 0:
                raise ValueError(f"GRPOConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.kl_beta < 0:
            raise ValueError(f"GRPOConfig.kl_beta must be >= 0, got {self.kl_beta}")
        if not 0 < self.clip_epsilon < 1:
            raise ValueError(f"GRPOConfig.clip_epsilon must be in (0, 1), got {self.clip_epsilon}")


def group_advantages(rewards: np.ndarray) -> np.ndarray:
    """``(r - mean) / (std + 1e-4)`` within each row (group) of ``rewards`` ``[Q, G]``."""
    rewards = np.asarray(rewards, dtype=np.float64)
    return (rewards - rewards.mean(axis=1, keepdims=True)) / (rewards.std(axis=1, keepdims=True) + 1e-4)


def k3_kl(log_probs: torch.Tensor, reference_log_probs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference) from log-probs of policy samples."""
    log_ratio = reference_log_probs - log_probs
    return torch.exp(log_ratio) - log_ratio - 1.0


def _query_stream(count: int, per_step: int, rng: np.random.Generator):
    """Query indices per step: passes over a fresh permutation, never repeating within a step."""
    order: list[int] = []
    while True:
        if len(order) < per_step:
            seen = set(order)
            order += [int(i) for i in rng.permutation(count) if int(i) not in seen]
        batch, order = order[:per_step], order[per_step:]
        yield np.asarray(batch, dtype=np.int64)


def train_grpo(
    policy: AttributeGenerator,
    reference: AttributeGenerator,
    vocab: AttributeVocabulary,
    image,
    image_mask,
    text,
    reward_fn: RewardFn,
    config: GRPOConfig | None = None,
    on_step: Callable[[dict], None] | None = None,
    checkpoint: LoopCheckpoint | None = None,
) -> list[dict]:
    """Train ``policy`` in place with GRPO; ``reference`` (the SFT generator) is only read.

    ``image``/``image_mask``/``text`` are the features of the training queries;
    ``reward_fn(query_indices [Q], texts Q x G) -> [Q, G]``. Returns one record per step:
    ``step``, ``reward_mean``, ``reward_std``, ``validity_rate``, ``kl`` (mean per-token k3 of
    the sampling policy against the reference), ``mean_num_attributes`` (over valid outputs),
    ``mean_length`` (tokens), ``loss``, ``clip_fraction``, ``grad_norm``, ``seconds`` and
    ``samples`` (a few ``(query_index, text, reward)``). ``queries_per_step`` is capped at the
    number of queries. With ``checkpoint``, the policy, optimizer and sampler are saved every
    ``checkpoint.every`` steps and a run that finds a checkpoint goes on from the step after it
    (the query order is replayed from the seed).
    """
    config = config or GRPOConfig()
    if policy is reference:
        raise ValueError("reference must be a separate, frozen copy of the SFT generator, not the policy itself")
    if {id(p) for p in policy.parameters()} & {id(p) for p in reference.parameters()}:
        raise ValueError("policy and reference share parameters; pass a deep copy as the reference")
    if not (len(image) == len(image_mask) == len(text)) or len(image) == 0:
        raise ValueError(f"feature arrays must be non-empty and of equal length, got {len(image)}, {len(image_mask)}, {len(text)}")
    if not (len(vocab) == policy.vocab_size == reference.vocab_size):
        raise ValueError(f"vocabulary ({len(vocab)}), policy ({policy.vocab_size}) and reference ({reference.vocab_size}) sizes differ")
    device = torch.device(config.device)
    policy.to(device).eval()  # dropout off: sampled, old and new log-probs are of one distribution
    reference.to(device).eval()
    image_t = feature_tensor(image, torch.float32, device)
    mask_t = feature_tensor(image_mask, torch.bool, device)
    text_t = feature_tensor(text, torch.float32, device)
    queries_per_step = min(config.queries_per_step, len(image))
    group = config.group_size
    optimizer = adamw(policy.parameters(), lr=config.learning_rate, weight_decay=0.0)
    sampler = torch.Generator(device=device).manual_seed(config.seed)
    queries = _query_stream(len(image), queries_per_step, np.random.default_rng(config.seed))
    history: list[dict] = []
    done = 0
    if checkpoint is not None:
        done, history = checkpoint.resume(policy, optimizer, generator=sampler, device=device)
        for _ in range(done):  # the queries of the steps already trained
            next(queries)
    for step in range(done, config.steps):
        started = time.perf_counter()
        query_indices = next(queries)
        index = torch.as_tensor(query_indices, device=device)
        features = (image_t[index], mask_t[index], text_t[index])
        sequences = policy.sample(*features, num_samples=group, temperature=config.temperature, generator=sampler)
        repeated = tuple(tensor.repeat_interleave(group, dim=0) for tensor in features)
        with torch.no_grad():
            old_log_probs, token_mask = policy.token_log_probs(*repeated, sequences, config.temperature)
            reference_log_probs, _ = reference.token_log_probs(*repeated, sequences, config.temperature)
        texts = [vocab.decode(row) for row in sequences.tolist()]
        grouped = [texts[q * group : (q + 1) * group] for q in range(len(query_indices))]
        rewards = np.asarray(reward_fn(query_indices, grouped), dtype=np.float64)
        if rewards.shape != (len(query_indices), group):
            raise ValueError(f"reward_fn returned shape {rewards.shape}, expected {(len(query_indices), group)}")
        advantages = torch.as_tensor(group_advantages(rewards).reshape(-1), dtype=torch.float32, device=device)
        mask_f = token_mask.float()
        total_tokens = mask_f.sum().clamp(min=1.0)

        losses, clipped, grad_norms = [], [], []
        micro_batches = torch.arange(sequences.shape[0], device=device).chunk(config.grad_accumulation)
        for _ in range(config.updates_per_batch):
            optimizer.zero_grad(set_to_none=True)
            update_loss, update_clipped = 0.0, 0.0
            for rows in micro_batches:
                log_probs, _ = policy.token_log_probs(*(tensor[rows] for tensor in repeated), sequences[rows], config.temperature)
                ratio = torch.exp(log_probs - old_log_probs[rows])
                advantage = advantages[rows, None]
                surrogate = -torch.minimum(ratio * advantage, ratio.clamp(1 - config.clip_epsilon, 1 + config.clip_epsilon) * advantage)
                per_token = surrogate + config.kl_beta * k3_kl(log_probs, reference_log_probs[rows])
                loss = (per_token * mask_f[rows]).sum() / total_tokens
                loss.backward()
                update_loss += float(loss.detach())
                update_clipped += float((((ratio - 1).abs() > config.clip_epsilon).float() * mask_f[rows]).sum() / total_tokens)
            grad_norms.append(float(torch.nn.utils.clip_grad_norm_(policy.parameters(), config.max_grad_norm)))
            optimizer.step()
            losses.append(update_loss)
            clipped.append(update_clipped)

        parsed = [parse_attributes(text_, vocab.keys) for text_ in texts]
        sizes = [len(p.attributes) for p in parsed if p.is_valid]
        kl = float((k3_kl(old_log_probs, reference_log_probs) * mask_f).sum() / total_tokens)
        record = {
            "step": step,
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()),
            "validity_rate": sum(p.is_valid for p in parsed) / len(parsed),
            "kl": kl,
            "mean_num_attributes": float(np.mean(sizes)) if sizes else 0.0,
            "mean_length": float(mask_f.sum(dim=1).mean()),
            "loss": float(np.mean(losses)),
            "clip_fraction": float(np.mean(clipped)),
            "grad_norm": float(np.mean(grad_norms)),
            "seconds": time.perf_counter() - started,
            "samples": [
                (int(query_indices[q]), grouped[q][0], float(rewards[q, 0])) for q in range(min(LOGGED_SAMPLES, len(query_indices)))
            ],
        }
        history.append(record)
        if checkpoint is not None:
            checkpoint.save(step + 1, config.steps, policy, optimizer, history, generator=sampler, device=device)
        if on_step:
            on_step(record)
    return history
