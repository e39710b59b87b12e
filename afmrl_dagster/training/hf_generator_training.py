"""Training steps of the Hugging Face attribute generator
(:class:`afmrl_dagster.attributes.hf_generator.HFAttributeGenerator`): distillation of the
teacher's attribute texts (:func:`hf_sft_step`) and one GRPO update (:func:`hf_grpo_step`),
with the LoRA base model (adapters switched off) as the frozen reference, or a separate
reference model when fine-tuning fully. The GRPO maths (group advantages, k3 KL) are those
of the built-in generator's :mod:`.grpo`.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Sequence

import numpy as np
import PIL.Image
import torch

from ..attributes.format import parse_attributes
from ..attributes.hf_generator import HFAttributeGenerator
from .grpo import GRPOConfig, group_advantages, k3_kl


def target_ids(generator: HFAttributeGenerator, targets: Sequence[str], max_new_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of target texts followed by eos, right-padded ``[B, T]``, and their mask."""
    tokenizer = generator.tokenizer
    limit = max_new_tokens or generator.config.max_new_tokens
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    rows = [(tokenizer.encode(text, add_special_tokens=False) + eos)[:limit] for text in targets]
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = True
    return ids.to(generator.device), mask.to(generator.device)


def hf_sft_step(
    generator: HFAttributeGenerator,
    optimizer: torch.optim.Optimizer,
    images: Sequence[PIL.Image.Image | None],
    prompts: Sequence[str],
    targets: Sequence[str],
    max_grad_norm: float = 1.0,
    ranks: torch.nn.Module | None = None,
    token_count: int | None = None,
    contributes: bool = True,
) -> float:
    """One distillation step: mean token cross-entropy of the teacher's attribute texts given
    the prompts (LoRA adapters, or every weight without LoRA); returns the loss.

    Under DDP, ``ranks`` is the generator's model in its DDP wrapper, each rank passes its rows
    of the global batch and ``token_count`` is the global batch's target tokens: each rank's loss
    is its share of the global mean, scaled by the world size against DDP's mean over ranks, so
    the gradient is the one-process gradient of the global batch. The loss returned is then the
    global batch's. A rank with no rows of a small last batch passes one row with ``contributes``
    off: it takes part in DDP's reduction with a zero loss."""
    if len(targets) != len(prompts):
        raise ValueError(f"{len(targets)} targets for {len(prompts)} prompts")
    world_size = torch.distributed.get_world_size() if ranks is not None else 1
    generator.model.train()
    batch = generator.encode_prompts(images, prompts)
    ids, mask = target_ids(generator, targets)
    optimizer.zero_grad(set_to_none=True)
    log_probs = generator.completion_log_probs(batch, ids, mask, model=ranks)
    summed = -log_probs.sum()
    loss = summed / (mask.sum().clamp(min=1) if token_count is None else max(token_count, 1))
    if not contributes:
        loss = loss * 0.0
    (loss * world_size).backward()
    torch.nn.utils.clip_grad_norm_(generator.trainable_parameters(), max_grad_norm)
    optimizer.step()
    generator.model.eval()
    if ranks is None:
        return float(loss.detach())
    total = loss.detach().clone()
    torch.distributed.all_reduce(total)
    return float(total)


def repeat_batch(batch: dict[str, torch.Tensor], times: int, rows: int) -> dict[str, torch.Tensor]:
    """Each prompt's inputs ``times`` times in a row. Per-image tensors (pixel values and grids,
    whose first dimension is not the number of prompts) are repeated image by image."""
    repeated = {}
    grid = batch.get("image_grid_thw")
    for key, value in batch.items():
        if key == "pixel_values" and grid is not None and grid.shape[0] == rows and value.shape[0] != rows:
            # Qwen-VL: each image's patches are a block of prod(grid) rows; repeat block by block.
            blocks = value.split(grid.prod(-1).tolist(), dim=0)
            repeated[key] = torch.cat([block.repeat(times, *([1] * (value.dim() - 1))) for block in blocks], dim=0)
        elif value.shape[0] == rows:
            repeated[key] = value.repeat_interleave(times, dim=0)
        elif rows == 1:  # one prompt's image patches (Qwen-VL): the whole block once per sample
            repeated[key] = value.repeat(times, *([1] * (value.dim() - 1)))
        else:
            raise ValueError(f"input {key!r} is not per prompt ({value.shape[0]} rows for {rows} prompts); "
                             "give every prompt an image, or sample one prompt at a time")
    return repeated


@contextlib.contextmanager
def _reference(generator: HFAttributeGenerator, reference_model, reference_adapter: str | None = None):
    if reference_model is not None:
        yield reference_model
    elif reference_adapter is not None:  # a frozen adapter beside the trained one (the SFT state)
        model = generator.model
        active = model.active_adapter
        model.set_adapter(reference_adapter)
        try:
            yield model
        finally:
            model.set_adapter(active)  # peft makes the active adapter trainable and freezes the others
    elif generator.config.use_lora or hasattr(generator.model, "disable_adapter"):
        with generator.model.disable_adapter():
            yield generator.model
    else:
        raise ValueError("full fine-tuning needs a separate frozen reference model (reference_model=...)")


def hf_grpo_step(
    generator: HFAttributeGenerator,
    optimizer: torch.optim.Optimizer,
    images: Sequence[PIL.Image.Image | None],
    prompts: Sequence[str],
    reward_fn: Callable[[list[list[str]]], np.ndarray],
    config: GRPOConfig,
    reference_model=None,
    sample_seed: int | None = None,
    reference_adapter: str | None = None,
) -> dict:
    """One GRPO update: sample ``group_size`` completions per prompt, reward them, normalise the
    rewards within each group, and step on the clipped surrogate plus ``kl_beta`` times the
    k3 KL to the reference. ``reward_fn(texts [Q][G]) -> [Q, G]``. The reference is
    ``reference_model``, else the adapter named ``reference_adapter`` (e.g. the SFT adapter,
    :meth:`HFAttributeGenerator.load_reference_adapter`), else the base model (adapters off)."""
    started = time.perf_counter()
    group = config.group_size
    model = generator.model
    model.eval()  # dropout off: old and new log-probs are of one distribution
    if sample_seed is not None:
        torch.manual_seed(sample_seed)
    batch = generator.encode_prompts(images, prompts)
    completion, mask = generator.generate_ids(batch, num_samples=group, do_sample=True, temperature=config.temperature)
    texts = generator.decode(completion, mask)
    grouped = [texts[q * group:(q + 1) * group] for q in range(len(prompts))]
    rewards = np.asarray(reward_fn(grouped), dtype=np.float64)
    if rewards.shape != (len(prompts), group):
        raise ValueError(f"reward_fn returned shape {rewards.shape}, expected {(len(prompts), group)}")
    repeated = repeat_batch(batch, group, len(prompts))
    mask_f = mask.float()
    tokens = mask_f.sum().clamp(min=1.0)
    with torch.no_grad():
        old = generator.completion_log_probs(repeated, completion, mask, config.temperature)
        with _reference(generator, reference_model, reference_adapter) as reference:
            reference_log_probs = generator.completion_log_probs(repeated, completion, mask, config.temperature, model=reference)
    advantages = torch.as_tensor(group_advantages(rewards).reshape(-1), dtype=torch.float32, device=generator.device)[:, None]
    optimizer.zero_grad(set_to_none=True)
    new = generator.completion_log_probs(repeated, completion, mask, config.temperature)
    ratio = torch.exp(new - old)
    surrogate = -torch.minimum(ratio * advantages, ratio.clamp(1 - config.clip_epsilon, 1 + config.clip_epsilon) * advantages)
    kl = k3_kl(new, reference_log_probs)
    loss = ((surrogate + config.kl_beta * kl) * mask_f).sum() / tokens
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(generator.trainable_parameters(), config.max_grad_norm)
    optimizer.step()
    parsed = [parse_attributes(text) for text in texts]
    return {
        "loss": float(loss.detach()),
        "kl": float(((kl.detach()) * mask_f).sum() / tokens),
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std()),
        "validity_rate": sum(p.is_valid for p in parsed) / len(parsed),
        "mean_length": float(mask_f.sum(dim=1).mean()),
        "grad_norm": float(grad_norm),
        "seconds": time.perf_counter() - started,
        "samples": grouped,
    }
