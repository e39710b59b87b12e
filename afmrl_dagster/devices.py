"""Which torch device runs the work: one resolver for the commands (``afmrl evaluate``, ``afmrl
search``, the ladder) and for the pipeline's compute resource."""

from __future__ import annotations

import os
import re

from .settings import DEFAULT_DEVICE, DEVICE_ENV

DEVICE_SPEC = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class DeviceError(ValueError):
    """A device that is malformed or that this machine lacks; the message names it."""


def resolve_device(spec: str | None = None) -> str:
    """The torch device ``spec`` names: ``auto`` (CUDA when torch sees it, else CPU), ``cpu``,
    ``cuda``, ``cuda:N`` or ``mps``. ``None`` reads ``AFMRL_DEVICE`` (default ``auto``).

    A CUDA or MPS device this machine lacks is an error rather than a quiet fallback to the CPU:
    a run that asked for a GPU should not take hours on the CPU without saying so."""
    if spec is None:
        spec = os.environ.get(DEVICE_ENV, DEFAULT_DEVICE)
    device = spec.strip().lower()
    if not DEVICE_SPEC.match(device):
        raise DeviceError(f"device {spec!r} is not 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    if device == "cpu":
        return device  # no torch import for the common case
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError("device 'mps': torch sees no MPS device")
        return device
    if not torch.cuda.is_available():
        raise DeviceError(f"device {spec!r}: torch sees no CUDA device")
    index, count = int(device.partition(":")[2] or 0), torch.cuda.device_count()
    if index >= count:
        raise DeviceError(f"device {spec!r}: torch sees {count} CUDA device(s), numbered from 0")
    return device
