"""LoRA adapters (peft) on a Hugging Face model, as the generator and the VLM2Vec embedder add them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def add_lora(model: nn.Module, rank: int, alpha: int, dropout: float, target_modules: Sequence[str], seed: int) -> nn.Module:
    """``model`` wrapped with fresh LoRA adapters (seeded, without touching the caller's random
    state); only the adapter weights require grad afterwards."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules), bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, lora)
