"""The seed's image transforms: RandomResizedCrop + flip + ColorJitter for training, resize + centre crop for eval,
both ending in the preprocessing contract's normalisation."""

from __future__ import annotations

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from mobilenetv2.config import Preprocess

INTERPOLATION = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
                 "nearest": InterpolationMode.NEAREST}


def _normalize(preprocess: Preprocess) -> list:
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(preprocess.mean, preprocess.std)]


def train_transform(preprocess: Preprocess, min_scale: float = 0.08, color_jitter: float = 0.4) -> T.Compose:
    """The seed's: RandomResizedCrop(scale min_scale-1, ratio 3/4-4/3), horizontal flip, ColorJitter."""
    steps = [
        T.RandomResizedCrop(preprocess.image_size, scale=(min_scale, 1.0), ratio=(0.75, 4 / 3),
                            interpolation=INTERPOLATION[preprocess.interpolation], antialias=True),
        T.RandomHorizontalFlip(),
    ]
    if color_jitter > 0:
        steps.append(T.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter))
    return T.Compose(steps + _normalize(preprocess))


def eval_transform(preprocess: Preprocess) -> T.Compose:
    """Resize (shorter side, or squash to a square as the seed does), centre crop, normalise."""
    size = preprocess.resize_size if preprocess.resize_mode == "short" else (preprocess.resize_size,) * 2
    resize = T.Resize(size, interpolation=INTERPOLATION[preprocess.interpolation], antialias=True)
    return T.Compose([resize, T.CenterCrop(preprocess.image_size)] + _normalize(preprocess))
