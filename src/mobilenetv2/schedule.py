"""The seed's per-step learning rate: linear warmup, then cosine decay to lr_end, floored at 0."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class SeedSchedule:
    lr_init: float
    lr_max: float
    lr_end: float
    warmup_epochs: float
    total_epochs: int
    steps_per_epoch: int

    @property
    def total_steps(self) -> int:
        return self.total_epochs * self.steps_per_epoch

    @property
    def warmup_steps(self) -> float:
        return self.warmup_epochs * self.steps_per_epoch

    def __call__(self, step: int) -> float:
        """Learning rate for global step `step` (0-based), as the seed's `get_lr` lists it."""
        warmup = self.warmup_steps
        if step < warmup:
            lr = self.lr_init + (self.lr_max - self.lr_init) * step / warmup
        else:
            progress = (step - warmup) / max(self.total_steps - warmup, 1)
            lr = self.lr_end + (self.lr_max - self.lr_end) * (1.0 + math.cos(math.pi * progress)) / 2.0
        return max(lr, 0.0)
