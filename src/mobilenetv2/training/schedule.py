"""What changes with the position in training: per-step learning rates (the seed's linear warmup then cosine decay
to lr_end, floored at 0; a linear decay to lr_end, the "budgeted" schedule of time-to-accuracy recipes; timm's step
decay), the optional linear scaling of the rates with the batch size, and the training crop's size per epoch under
progressive resizing. Each is a function of the position alone, so a resumed run takes up the same values."""

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
            lr = self.lr_end + (self.lr_max - self.lr_end) * self.remaining(progress)
        return max(lr, 0.0)

    @staticmethod
    def remaining(progress: float) -> float:
        """The share of (lr_max - lr_end) left after `progress` (0 to 1) of the decay: the seed's cosine."""
        return (1.0 + math.cos(math.pi * progress)) / 2.0


@dataclass(frozen=True)
class LinearSchedule(SeedSchedule):
    """The seed's warmup, then a straight line from lr_max to lr_end over the remaining steps (FFCV's "budgeted"
    schedule: the decay is stretched over however many epochs the run is given), floored at 0."""

    @staticmethod
    def remaining(progress: float) -> float:
        return 1.0 - progress


@dataclass(frozen=True)
class StepSchedule:
    """timm's StepLRScheduler stepped per update (`sched_on_updates`; warmup not a prefix): linear warmup from
    lr_init to lr_max, then lr_max * decay_rate ** floor(step / decay steps), steps counted from 0 (warmup included)."""

    lr_init: float
    lr_max: float
    warmup_epochs: float
    decay_epochs: float
    decay_rate: float
    steps_per_epoch: int

    def __call__(self, step: int) -> float:
        warmup = self.warmup_epochs * self.steps_per_epoch
        if step < warmup:
            return self.lr_init + (self.lr_max - self.lr_init) * step / warmup
        return self.lr_max * self.decay_rate ** (step // (self.decay_epochs * self.steps_per_epoch))


def lr_scale(batch_size: int, reference_batch: int, scaling: str) -> float:
    """The factor on every learning rate: batch / reference batch under linear scaling (as timm does with the
    global batch; per-process batches give the same ratio at a fixed world size), else 1 (the seed's way)."""
    if scaling == "linear" and reference_batch:
        return batch_size / reference_batch
    return 1.0


def lr_note(batch_size: int, reference_batch: int, scaling: str, lr_max: float) -> str | None:
    """A log line when the batch differs from the one the learning rates were tuned for; None when it does not."""
    if not reference_batch or reference_batch == batch_size:
        return None
    scaled = lr_max * batch_size / reference_batch
    if scaling == "linear":
        return (f"batch size {batch_size} differs from the recipe's {reference_batch}: learning rates scaled linearly "
                f"by {batch_size}/{reference_batch}, lr_max {lr_max:g} -> {scaled:.4g}")
    return (f"batch size {batch_size} differs from the recipe's {reference_batch}: lr_max {lr_max:g} used as given "
            f"(the seed's way); lr_scaling linear would use {scaled:.4g}")


def divergence_hint(loss: float, classes: int, batch_size: int, reference_batch: int, scaling: str,
                    lr_max: float) -> str | None:
    """A log line when a logged loss is far above what a uniform guess scores (ln K; the seed's smoothing keeps a
    converging run near or below it): the run diverges, and the line names the fix. The seed's rate (0.8 for a batch
    of 150 a process) taken unchanged at a newcomer's batch of 16 climbs to tens within the first epoch."""
    if classes < 2 or loss < 4 * math.log(classes):
        return None
    if scaling != "linear" and reference_batch and batch_size < reference_batch:
        fix = (f"--lr-max {lr_max:g} was tuned for a batch of {reference_batch} and is used as given at batch "
               f"{batch_size} (the seed's way): add --lr-scaling linear "
               f"(lr_max {lr_max * lr_scale(batch_size, reference_batch, 'linear'):.4g}), "
               f"or give a lower --lr-max")
    else:
        fix = f"give a lower --lr-max (now {lr_max:g}) or a longer --warmup-epochs"
    return (f"the loss ({loss:.3g}) is far above a uniform guess's (ln {classes} = {math.log(classes):.2f}): training "
            f"is diverging. {fix} (docs: getting-started, \"your own folder\")")


Schedule = SeedSchedule | StepSchedule  # LinearSchedule is a SeedSchedule


def schedule_for(config, steps_per_epoch: int) -> Schedule:
    """The run's schedule (`config.lr_schedule`) from a TrainConfig, with its learning-rate scaling applied."""
    factor = lr_scale(config.batch_size, config.lr_reference_batch, config.lr_scaling)
    if config.lr_schedule == "step":
        return StepSchedule(config.lr_init * factor, config.lr_max * factor, config.warmup_epochs, config.decay_epochs,
                            config.decay_rate, steps_per_epoch)
    shape = LinearSchedule if config.lr_schedule == "linear" else SeedSchedule
    return shape(config.lr_init * factor, config.lr_max * factor, config.lr_end * factor, config.warmup_epochs,
                        config.epochs, steps_per_epoch)


@dataclass(frozen=True)
class ResolutionSchedule:
    """Progressive resizing (FFCV's): the training crop is `low` px until epoch `start`, grows linearly to `high` by
    epoch `end`, and stays `high` after. The size changes per epoch: epoch e (0-based) trains at the line's value at
    e, rounded to the nearest multiple of `multiple` (halves up) and kept within [low, high]. Without progressive resizing
    `low == high` and every epoch trains at that size."""

    low: int
    high: int
    start: float = 0.0
    end: float = 0.0
    multiple: int = 32

    def __call__(self, epoch: int) -> int:
        if self.low == self.high or epoch <= self.start:
            return self.low
        if epoch >= self.end:
            return self.high
        size = self.low + (self.high - self.low) * (epoch - self.start) / (self.end - self.start)
        return min(max(math.floor(size / self.multiple + 0.5) * self.multiple, self.low), self.high)


def resolution_for(config) -> ResolutionSchedule:
    """The run's training crop size per epoch: `config.progressive_resize` over `config.progressive_ramp` when set,
    else its one fixed size (`config.train_sizes`)."""
    low, high = config.train_sizes
    if not config.progressive_resize:
        return ResolutionSchedule(low, high)
    start, end = config.progressive_ramp_epochs
    return ResolutionSchedule(low, high, start, end, config.progressive_multiple)
