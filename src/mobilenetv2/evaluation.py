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


TTA_MODES = ("none", "flip", "flip-crops")


def with_tta(model_fn: Callable[[torch.Tensor], torch.Tensor], mode: str, crop_size: int):
    """`model_fn` answering with logits averaged over views of each image: `flip`, the image and its mirror;
    `flip-crops`, torchvision's TenCrop: five `crop_size` crops of the (larger) batch given, its four corners and
    its centre, and their mirrors. `none` returns `model_fn` itself."""
    if mode not in TTA_MODES:
        raise ValueError(f"tta must be one of {', '.join(TTA_MODES)}, got {mode!r}")
    if mode == "none":
        return model_fn

    def views(images: torch.Tensor) -> list[torch.Tensor]:
        if mode == "flip":
            return [images]
        height, width = images.shape[-2:]
        if min(height, width) < crop_size:
            raise ValueError(f"flip-crops needs images of at least {crop_size} px, got {height}x{width}")
        top, left = int(round((height - crop_size) / 2)), int(round((width - crop_size) / 2))
        corners = [(0, 0), (0, width - crop_size), (height - crop_size, 0), (height - crop_size, width - crop_size),
                   (top, left)]
        return [images[..., y:y + crop_size, x:x + crop_size] for y, x in corners]

    def averaged(images: torch.Tensor) -> torch.Tensor:
        total, count = None, 0
        for view in views(images):
            for flipped in (view, view.flip(-1)):
                logits = model_fn(flipped).float()
                total, count = (logits if total is None else total + logits), count + 1
        return total / count

    return averaged


@torch.no_grad()
def evaluate(model_fn: Callable[[torch.Tensor], torch.Tensor], batches: Iterable, runtime: Runtime,
             num_classes: int) -> EvalResult:
    """Counts every item of `batches` (this rank's shard, as (inputs, labels, skipped)) once, then sums the counts
    over all ranks."""
    return evaluate_each([model_fn], batches, runtime, num_classes)[0]


@torch.no_grad()
def evaluate_each(model_fns: list[Callable[[torch.Tensor], torch.Tensor]], batches: Iterable, runtime: Runtime,
                  num_classes: int) -> list[EvalResult]:
    """`evaluate` for several models in one pass over `batches`: each batch is read and decoded once and goes
    through every model as the same tensor."""
    sums = torch.zeros(len(model_fns), 5, dtype=torch.float64, device=runtime.device)  # correct1, 5, loss, count, skip
    confusion = torch.zeros(len(model_fns), num_classes, num_classes, dtype=torch.float64, device=runtime.device)
    for inputs, labels, skipped in batches:
        sums[:, 4] += skipped
        if len(labels) == 0:
            continue
        labels = labels.to(runtime.device)
        inputs = runtime.to_input(inputs)
        for index, model_fn in enumerate(model_fns):
            with runtime.autocast():
                logits = model_fn(inputs).float()
            top = ranked(logits, 5)
            sums[index, 0] += (top[:, 0] == labels).sum()
            sums[index, 1] += (top == labels[:, None]).any(dim=1).sum()
            sums[index, 2] += F.cross_entropy(logits, labels, reduction="sum")
            sums[index, 3] += len(labels)
            confusion[index].index_put_((labels, top[:, 0]), torch.ones_like(labels, dtype=torch.float64),
                                        accumulate=True)
    runtime.all_reduce_sum(sums)
    runtime.all_reduce_sum(confusion)
    results = []
    for row, matrix in zip(sums.tolist(), confusion.cpu().long()):
        count = int(row[3])
        denominator = max(count, 1)
        results.append(EvalResult(count, row[0] / denominator, row[1] / denominator, row[2] / denominator,
                                  int(row[4]), matrix))
    return results
