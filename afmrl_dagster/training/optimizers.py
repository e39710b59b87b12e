"""AdamW as every training loop of the library builds it: the fused kernel where PyTorch has one.

PyTorch's default AdamW on CPU updates parameter by parameter, one small kernel per operation
(``_single_tensor_adam``): on the dual-tower head it took about a third of a training step on
2 CPU cores. The fused kernel does the same update in one pass per parameter group
(``benchmarks/optimizer_step.py`` measures both on the same parameters).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

FUSED_DEVICE_TYPES = ("cpu", "cuda")


def can_fuse(parameters: list[torch.Tensor]) -> bool:
    """Whether the fused AdamW kernel takes ``parameters``: floating point, on one CPU or CUDA device."""
    devices = {p.device for p in parameters}
    return (len(devices) == 1 and next(iter(devices)).type in FUSED_DEVICE_TYPES
            and all(p.is_floating_point() for p in parameters))


def adamw(parameters: Iterable[torch.Tensor] | Iterable[dict], lr: float, weight_decay: float = 0.01) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over ``parameters`` (tensors, or parameter groups as dicts), fused when
    :func:`can_fuse`; otherwise PyTorch's default implementation."""
    parameters = list(parameters)
    tensors = [p for group in parameters for p in group["params"]] if parameters and isinstance(parameters[0], dict) else parameters
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, fused=True if can_fuse(tensors) else None)
