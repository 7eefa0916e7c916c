"""Evaluation: top-1 / top-5 / loss / confusion over batches, counted exactly once per item across ranks.

Shared by training (per-epoch eval), `mobilenetv2 eval` and the demo; it imports nothing from training or deploy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from mobilenetv2.runtime import Runtime


def ranked(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The indices of each row's `k` highest scores, highest first; equal scores (common in an int8 model's
    quantized logits) in index order, so every command names the same top-1 for the same logits."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]


@dataclass
class EvalResult:
    count: int
    top1: float
    top5: float
    loss: float  # mean plain cross-entropy (no label smoothing)
    skipped: int
    confusion: torch.Tensor  # [true, predicted]

    def per_class_accuracy(self) -> list[float | None]:
        totals = self.confusion.sum(dim=1)
        return [float(self.confusion[i, i] / totals[i]) if totals[i] else None for i in range(len(totals))]

    def to_dict(self, class_names: list[str] | None = None) -> dict:
        names = class_names or [str(i) for i in range(len(self.confusion))]
        return {"count": self.count, "top1": self.top1, "top5": self.top5, "loss": self.loss, "skipped": self.skipped,
                "per_class_accuracy": dict(zip(names, self.per_class_accuracy())),
                "confusion_matrix": self.confusion.tolist(), "class_names": names}


@torch.no_grad()
def evaluate(model_fn: Callable[[torch.Tensor], torch.Tensor], batches: Iterable, runtime: Runtime,
             num_classes: int) -> EvalResult:
    """Counts every item of `batches` (this rank's shard, as (inputs, labels, skipped)) once, then sums the counts
    over all ranks."""
    sums = torch.zeros(5, dtype=torch.float64, device=runtime.device)  # correct1, correct5, loss, count, skipped
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=runtime.device)
    for inputs, labels, skipped in batches:
        sums[4] += skipped
        if len(labels) == 0:
            continue
        labels = labels.to(runtime.device)
        with runtime.autocast():
            logits = model_fn(runtime.to_input(inputs)).float()
        top = ranked(logits, 5)
        sums[0] += (top[:, 0] == labels).sum()
        sums[1] += (top == labels[:, None]).any(dim=1).sum()
        sums[2] += F.cross_entropy(logits, labels, reduction="sum")
        sums[3] += len(labels)
        confusion.index_put_((labels, top[:, 0]), torch.ones_like(labels, dtype=torch.float64), accumulate=True)
    runtime.all_reduce_sum(sums)
    runtime.all_reduce_sum(confusion)
    count = int(sums[3].item())
    denominator = max(count, 1)
    return EvalResult(count, sums[0].item() / denominator, sums[1].item() / denominator, sums[2].item() / denominator,
                      int(sums[4].item()), confusion.cpu().long())
