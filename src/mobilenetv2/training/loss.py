"""The seed's label-smoothed softmax cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SeedLabelSmoothingLoss(nn.Module):
    """The seed's loss: one-hot targets with on = 1 - eps, off = eps / (K - 1), softmax cross-entropy, mean."""

    def __init__(self, smoothing: float):
        super().__init__()
        self.smoothing = smoothing

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        classes = logits.shape[1]
        log_probs = F.log_softmax(logits.float(), dim=1)
        off = self.smoothing / (classes - 1) if classes > 1 else 0.0
        target = torch.full_like(log_probs, off).scatter_(1, labels[:, None], 1.0 - self.smoothing)
        return -(target * log_probs).sum(dim=1).mean()
