"""Learning-rate schedules shared by every trainer."""

from __future__ import annotations

import math
from typing import Callable


def warmup_cosine(total_steps: int, warmup_fraction: float) -> Callable[[int], float]:
    """Learning-rate multiplier: linear warmup over ``warmup_fraction`` of the steps, then cosine decay to zero."""
    warmup = max(1, int(round(total_steps * warmup_fraction))) if warmup_fraction > 0 else 0

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return multiplier
