"""Learning-rate schedule shared by the organism builder and adapter training."""
from __future__ import annotations

import math


def warmup_cosine(steps: int, warmup: float, floor: float = 0.1):
    """Multiplier for ``LambdaLR``: linear warm-up over ``warmup`` of the steps, then cosine decay to ``floor``."""
    warmup_steps = max(1, int(warmup * steps))

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, steps - warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier
