"""The step arithmetic of a fine-tune: how many optimizer steps, and the keep rate and learning
rate at each one (the keep-rate schedule of docs/algorithm.md: 1.0, then a cosine down to the target).

Everything here is a pure function of its arguments, so that a resumed run computes the same
values as an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import EvitError


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


def lr_at(step: int, total: int, warmup: int, base: float, minimum: float) -> float:
    """Linear warm-up to ``base``, then cosine down to ``minimum`` at ``total`` steps."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return minimum + (base - minimum) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def steps_per_epoch(per_rank: int | None, *, batch_size: int, accum_steps: int, given: int | None,
                    world: int = 1) -> int:
    """Optimizer steps per epoch: ``given`` (``--steps-per-epoch``) when set, else the full
    batches of ``batch_size`` x ``accum_steps`` in ``per_rank`` images (the last partial one dropped)."""
    per_step = batch_size * accum_steps
    if per_rank is not None and per_rank < per_step:
        images = f"{per_rank} images" if per_rank else "no images"
        where = f" per process ({world} processes)" if world > 1 else ""
        raise EvitError(f"the training split has {images}{where}, fewer than one step takes (--batch-size "
                        f"{batch_size} x --accum-steps {accum_steps}): lower --batch-size or give more images")
    return given or per_rank // per_step


@dataclass(frozen=True)
class Schedule:
    """The steps of a run and the keep rates and learning rate at each."""

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    base_lr: float
    min_lr: float
    keep_targets: tuple[float, ...] = ()
    shrink_start: float = 0.0
    shrink_epochs: float = 0.0

    @classmethod
    def plan(cls, epochs: float, warmup_epochs: float, steps_per_epoch: int, **rest) -> Schedule:
        """``epochs`` (may be fractional) of ``steps_per_epoch``: at least one step in all."""
        total = max(1, round(epochs * steps_per_epoch))
        return cls(steps_per_epoch, total, round(warmup_epochs * steps_per_epoch), **rest)

    @property
    def num_epochs(self) -> int:
        """Epochs that hold at least one step (the last may be partial)."""
        return math.ceil(self.total_steps / self.steps_per_epoch)

    def steps_in_epoch(self, epoch: int) -> int:
        """Optimizer steps of ``epoch`` (0-based)."""
        return min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)

    def at(self, step: int) -> tuple[list[float], float]:
        """Keep rate of each EViT layer and the learning rate at optimizer step ``step`` (0-based)."""
        rates = [keep_rate_at(step, t, self.steps_per_epoch, self.shrink_start, self.shrink_epochs)
                 for t in self.keep_targets]
        return rates, lr_at(step, self.total_steps, self.warmup_steps, self.base_lr, self.min_lr)

    def after(self, steps_done: int) -> tuple[list[float], float]:
        """What an epoch's metrics report after ``steps_done`` steps: the values of the last step taken."""
        return self.at(max(steps_done - 1, 0))
