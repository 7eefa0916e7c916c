"""The recipe's pieces, built from a config: the optimizer (and which parameters weight decay applies to), the loss,
the learning-rate schedule and the weight average. The training loop takes them from here and nothing else builds
them, so one step of the recipe can be run on a batch anywhere (a test, a notebook) exactly as the loop runs it:

    optimizer, criterion = build_optimizer(model, config), build_loss(config, model.num_classes)
    criterion(model(images), labels, images).backward(); optimizer.step()
"""

from __future__ import annotations

import torch
from torch import nn

from mobilenetv2.config import TrainConfig
from mobilenetv2.errors import UserError
from mobilenetv2.training.distill import Teacher, distillation_loss
from mobilenetv2.training.loss import SeedLabelSmoothingLoss
from mobilenetv2.training.schedule import Schedule, schedule_for

# normalisation layers: their scale and shift are what MindSpore names gamma and beta
NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm,
               nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def _decayed(module: nn.Module, name: str, decay_on: str) -> bool:
    """Whether parameter `name` of `module` is decayed under the set `decay_on` (config.WEIGHT_DECAY_SETS)."""
    if decay_on == "all":
        return True
    if isinstance(module, NORM_LAYERS):
        return False
    return decay_on == "seed" or name != "bias"  # "weights": convolution and linear weights only


def weight_decay_groups(model: nn.Module, weight_decay: float, decay_on: str) -> list[dict]:
    """The trainable parameters as optimizer groups: those `decay_on` decays first (at `weight_decay`), then the
    rest (at 0); an empty group is left out. Within a group, parameters keep the model's order, so a training
    checkpoint's optimizer state fits the same set again on resume."""
    decayed, spared, seen = [], [], set()
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if parameter.requires_grad and id(parameter) not in seen:
                seen.add(id(parameter))
                (decayed if _decayed(module, name, decay_on) else spared).append(parameter)
    groups = [{"params": decayed, "weight_decay": weight_decay}, {"params": spared, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def _momentum_sgd(groups, config: TrainConfig, fused: bool | None) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=config.lr_init, momentum=config.momentum, fused=fused)


def _nesterov_sgd(groups, config: TrainConfig, fused: bool | None) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=config.lr_init, momentum=config.momentum, nesterov=True, fused=fused)


def _rmsprop_tf(groups, config: TrainConfig, fused: bool | None) -> torch.optim.Optimizer:
    """TensorFlow's RMSprop as timm writes it (eps inside the square root, the learning rate inside the momentum
    buffer, the square average starting at one) with timm's alpha 0.9: the EfficientNet-style recipes' optimizer."""
    try:
        from timm.optim import RMSpropTF
    except ImportError:
        raise UserError("`optimizer` rmsprop-tf needs timm: pip install 'mobilenetv2[recipes]'") from None
    return RMSpropTF(groups, lr=config.lr_init, alpha=0.9, eps=config.opt_eps or 1e-10, momentum=config.momentum)


def _adamw(groups, config: TrainConfig, fused: bool | None) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=config.lr_init, eps=config.opt_eps or 1e-8, fused=fused)


# config.OPTIMIZERS -> builder(parameter groups, config, fused)
_OPTIMIZERS = {"sgd": _momentum_sgd, "nesterov": _nesterov_sgd, "rmsprop-tf": _rmsprop_tf, "adamw": _adamw}


def build_optimizer(model: nn.Module, config: TrainConfig, device: torch.device | None = None) -> torch.optim.Optimizer:
    """The optimizer `config.optimizer` names (the seed's momentum SGD by default) over `model`'s trainable
    parameters, weight decay on the set `config.weight_decay_on` names. Its rate starts at lr_init; the loop sets
    the schedule's rate before every step. On the device given, the fused kernel, where torch has one for it, updates
    every parameter in one call instead of one per tensor (on a CPU: 0.7 ms a step instead of 2.5 ms for the demo's
    network; the same arithmetic, rounded in another order: weights one float32 ulp apart after 10 steps)."""
    groups = weight_decay_groups(model, config.weight_decay, config.weight_decay_on)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return _OPTIMIZERS[config.optimizer](groups, config, True if device is not None and _fuses(device) else None)


def _fuses(device: torch.device) -> bool:
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # a torch without the list: CUDA only, as torch has had fused kernels longest there
        return device.type == "cuda"
    return device.type in _get_fused_kernels_supported_devices()


def build_loss(config: TrainConfig, num_classes: int, teacher: Teacher | None = None,
               class_weights: torch.Tensor | None = None) -> nn.Module:
    """The seed's label-smoothed cross-entropy over `num_classes` outputs (its target entries weighted by
    `class_weights` when given); with a `teacher`, that loss beside the distillation loss the config names
    (training/distill.py). Called as criterion(logits, labels, inputs)."""
    task_loss = SeedLabelSmoothingLoss(config.label_smoothing, num_classes, class_weights)
    return distillation_loss(task_loss, teacher, config) if teacher is not None else task_loss


def build_schedule(config: TrainConfig, steps_per_epoch: int) -> Schedule:
    """The per-step learning rate `config.lr_schedule` names, with the config's batch-size scaling."""
    return schedule_for(config, steps_per_epoch)


def build_ema(model: nn.Module, config: TrainConfig) -> nn.Module | None:
    """An exponential moving average of `model`'s weights and buffers (None when `config.ema` is 0). Each update
    moves it by 1 - decay toward the model; the loop updates it every `config.ema_every` steps. With `ema_warmup` the
    decay of update n (from 0) is min(ema, 1 - (1 + n)^(-2/3)), timm's ModelEmaV3 warm-up, so early averages
    follow the fast-moving weights instead of remembering the random start."""
    if not config.ema:
        return None
    from torch.optim.swa_utils import AveragedModel

    decay, warmup = config.ema, config.ema_warmup

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], updates: torch.Tensor) -> None:
        step_decay = min(decay, 1 - (1 + float(updates)) ** (-2 / 3)) if warmup else decay
        if averaged[0].is_floating_point():
            torch._foreach_lerp_(averaged, current, 1 - step_decay)
        else:  # BatchNorm's step counters, as torch's own EMA function treats them
            for mean, value in zip(averaged, current, strict=True):
                mean.copy_(mean * step_decay + value * (1 - step_decay))

    return AveragedModel(model, multi_avg_fn=update, use_buffers=True)
