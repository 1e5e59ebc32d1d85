"""The keep-rate schedule of EViT training (EVIT.md): 1.0, then a cosine down to the target."""

from __future__ import annotations

import math


def keep_rate_at(step: int, target: float, steps_per_epoch: int, shrink_start: float, shrink_epochs: float) -> float:
    """Keep rate at iteration ``step`` (0-based).

    1.0 for the first ``shrink_start`` epochs; then over ``shrink_epochs``
    epochs ``target + (1 - target) * (1 + cos(pi * t)) / 2`` with ``t`` the
    fraction of shrink iterations done; then ``target``.
    """
    start = shrink_start * steps_per_epoch
    length = shrink_epochs * steps_per_epoch
    if step < start:
        return 1.0
    if length <= 0 or step >= start + length:
        return target
    t = (step - start) / length
    return target + (1.0 - target) * (1.0 + math.cos(math.pi * t)) / 2.0
