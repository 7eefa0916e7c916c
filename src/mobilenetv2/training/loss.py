"""The seed's label-smoothed softmax cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SeedLabelSmoothingLoss(nn.Module):
    """The seed's loss (CrossEntropyWithLabelSmooth): one-hot targets with on = 1 - eps and off = eps / (K - 1) over K
    classes, softmax cross-entropy, mean over the batch. Half-precision logits are computed in float32; float64
    stays float64.

    Labels are class indices (N,) or soft targets (N, K) whose rows sum to one (mixup, cutmix). Smoothing is affine,
    so a soft target t becomes t * (1 - eps - off) + off: a mix of two labels with weights lam and 1 - lam gets the
    same mix of their smoothed one-hot targets.

    `class_weights` (one per class) weight each target entry: the loss is sum_i sum_k w_k t_ik (-log p_ik) divided
    by sum_i sum_k w_k t_ik, so hard labels without smoothing give torch's weighted cross-entropy, and weights that
    are all equal give the unweighted loss."""

    def __init__(self, smoothing: float, num_classes: int, class_weights: torch.Tensor | None = None):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if class_weights is not None and class_weights.shape != (num_classes,):
            raise ValueError(f"class_weights must hold {num_classes} weights, got shape {tuple(class_weights.shape)}")
        self.smoothing, self.num_classes, self.class_weights = smoothing, num_classes, class_weights

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, inputs: torch.Tensor | None = None) -> torch.Tensor:
        """`inputs` (the batch the logits came from) is what a distillation criterion needs; this loss ignores it."""
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"the loss is for {self.num_classes} classes, the logits have {logits.shape[1]}")
        log_probs = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=1)
        off = self.smoothing / (self.num_classes - 1) if self.num_classes > 1 else 0.0
        if labels.is_floating_point():
            target = labels.to(log_probs.dtype) * (1.0 - self.smoothing - off) + off
        else:
            target = torch.full_like(log_probs, off).scatter_(1, labels[:, None], 1.0 - self.smoothing)
        if self.class_weights is None:
            return -(target * log_probs).sum(dim=1).mean()
        weighted = target * self.class_weights.to(log_probs)
        return -(weighted * log_probs).sum() / weighted.sum()
