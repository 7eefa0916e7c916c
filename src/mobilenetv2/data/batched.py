"""Small datasets held in memory: decoded once into one uint8 tensor, then augmented a whole batch at a time
(each image with its own crop, flip and jitter), so no per-image DataLoader work remains in the training loop."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision.transforms import v2 as T

from mobilenetv2.config import Preprocess
from mobilenetv2.data.folders import SafeImageFolder, collate_skipping
from mobilenetv2.errors import DataError

MAX_IN_MEMORY_BYTES = 8 << 30


@torch.no_grad()
def collect_tensors(dataset: SafeImageFolder, workers: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Every image through the dataset's own transform, stacked into one tensor, with labels and a skip count."""
    loader = DataLoader(dataset, batch_size=256, num_workers=workers, collate_fn=collate_skipping)
    images, labels, skipped = [], [], 0
    for batch, batch_labels, batch_skipped in loader:
        skipped += batch_skipped
        if len(batch_labels):
            images.append(batch)
            labels.append(batch_labels)
    return torch.cat(images), torch.cat(labels), skipped


@torch.no_grad()
def decode_all(dataset: SafeImageFolder, size: int, workers: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Every image squashed to size x size, as one uint8 tensor (N, 3, size, size), with labels and a skip count."""
    needed = len(dataset) * 3 * size * size
    if needed > MAX_IN_MEMORY_BYTES:
        raise DataError(f"in-memory training would need {needed / 2**30:.1f} GiB for {len(dataset)} images at "
                        f"{size} px (limit {MAX_IN_MEMORY_BYTES / 2**30:.0f} GiB); train from disk instead")
    resized = copy.copy(dataset)
    resized.transform = T.Compose([T.ToImage(), T.Resize((size, size), antialias=True)])
    return collect_tensors(resized, workers)


class BatchAugment:
    """The seed's train transform applied to a whole uint8 batch at once, each image with its own draw:
    RandomResizedCrop (scale, ratio 3/4-4/3) to `crop_size` (0: the contract's image size) and flip as one affine
    resampling, ColorJitter, `policy` (an automatic augmentation policy, per image) when given, normalisation."""

    def __init__(self, preprocess: Preprocess, min_scale: float = 0.08, color_jitter: float = 0.4,
                 crop_size: int = 0, policy=None):
        self.size = crop_size or preprocess.image_size
        self.scale = (min_scale, 1.0)
        self.log_ratio = (math.log(3 / 4), math.log(4 / 3))
        self.jitter = color_jitter
        self.preprocess, self.policy = preprocess, policy
        self.mode = "bicubic" if preprocess.interpolation == "bicubic" else "bilinear"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        n = len(images)
        x = images.float() / 255
        area = torch.empty(n).uniform_(*self.scale)
        ratio = torch.exp(torch.empty(n).uniform_(*self.log_ratio))
        width, height = torch.sqrt(area * ratio).clamp(max=1), torch.sqrt(area / ratio).clamp(max=1)
        centre_x = (torch.rand(n) * (1 - width) + width / 2) * 2 - 1
        centre_y = (torch.rand(n) * (1 - height) + height / 2) * 2 - 1
        flip = torch.where(torch.rand(n) < 0.5, -1.0, 1.0)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2] = width * flip, centre_x
        theta[:, 1, 1], theta[:, 1, 2] = height, centre_y
        grid = F.affine_grid(theta, [n, 3, self.size, self.size], align_corners=False)
        x = F.grid_sample(x, grid, mode=self.mode, padding_mode="border", align_corners=False).clamp_(0, 1)
        if self.jitter > 0:
            x = color_jitter(x, self.jitter)
        if self.policy is not None:
            x = self.policy.on_batch(x)
        return normalize(x, self.preprocess)


def normalize(x: torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    """A batch in [0, 1] normalised by the contract's mean and std, on the batch's device."""
    mean = torch.tensor(preprocess.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def normalize_bytes(images: torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    """uint8 images (N, 3, H, W, any memory format, any device) as float32 normalised by the contract, in two passes
    that keep the memory format."""
    mean = torch.tensor(preprocess.mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.std, device=images.device).view(1, 3, 1, 1)
    return images.to(torch.float32).mul_(1 / (255 * std)).sub_(mean / std)


def color_jitter(x: torch.Tensor, jitter: float) -> torch.Tensor:
    """ColorJitter(brightness, contrast, saturation = jitter) on a batch in [0, 1], each image with its own factors
    (drawn on the CPU generator, so the draws are the same whatever device the batch is on)."""
    n = len(x)

    def factor():
        return torch.empty(n, 1, 1, 1).uniform_(max(0.0, 1 - jitter), 1 + jitter).to(x.device)

    weights = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
    x = (x * factor()).clamp(0, 1)  # brightness
    mean = (x * weights).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    x = ((x - mean) * factor() + mean).clamp(0, 1)  # contrast
    gray = (x * weights).sum(1, keepdim=True)
    return ((x - gray) * factor() + gray).clamp(0, 1)  # saturation
