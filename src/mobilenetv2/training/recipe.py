"""The recipe's pieces, built from a config: the optimizer (and which parameters weight decay applies to), the loss,
the learning-rate schedule and the weight average. The training loop takes them from here and nothing else builds
them, so one step of the recipe can be run on a batch anywhere (a test, a notebook) exactly as the loop runs it:

    optimizer, criterion = build_optimizer(model, config), build_loss(config, model.num_classes)
    criterion(model(images), labels).backward(); optimizer.step()
"""

from __future__ import annotations

import torch
from torch import nn

from mobilenetv2.config import TrainConfig
from mobilenetv2.training.loss import SeedLabelSmoothingLoss
from mobilenetv2.training.schedule import SeedSchedule, schedule_for

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


def build_optimizer(model: nn.Module, config: TrainConfig, device: torch.device | None = None) -> torch.optim.Optimizer:
    """The seed's momentum SGD over `model`'s trainable parameters, weight decay on the set `config.weight_decay_on`
    names. Its rate starts at lr_init; the loop sets the schedule's rate before every step. On CUDA the fused kernel
    updates every parameter in one launch instead of one per tensor."""
    groups = weight_decay_groups(model, config.weight_decay, config.weight_decay_on)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    fused = True if device is not None and device.type == "cuda" else None
    return torch.optim.SGD(groups, lr=config.lr_init, momentum=config.momentum, fused=fused)


def build_loss(config: TrainConfig, num_classes: int) -> nn.Module:
    """The seed's label-smoothed cross-entropy over `num_classes` outputs."""
    return SeedLabelSmoothingLoss(config.label_smoothing, num_classes)


def build_schedule(config: TrainConfig, steps_per_epoch: int) -> SeedSchedule:
    """The per-step learning rate: linear warmup, then cosine decay, with the config's batch-size scaling."""
    return schedule_for(config, steps_per_epoch)


def build_ema(model: nn.Module, config: TrainConfig) -> nn.Module | None:
    """An exponential moving average of `model`'s weights and buffers (None when `config.ema` is 0)."""
    if not config.ema:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema), use_buffers=True)
