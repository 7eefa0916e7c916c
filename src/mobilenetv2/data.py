"""Datasets and loaders: the seed's transforms, ImageFolder trees, exact eval shards, the bad-file policy.

An image that cannot be decoded is skipped with a warning and counted; the batch and the epoch go on.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import datasets
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from mobilenetv2.config import Preprocess
from mobilenetv2.errors import DataError

VAL_FOLDER_NAMES = ("val", "validation_preprocess", "validation", "test")
_INTERPOLATION = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
                  "nearest": InterpolationMode.NEAREST}


def _normalize(preprocess: Preprocess) -> list:
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(preprocess.mean, preprocess.std)]


def train_transform(preprocess: Preprocess, min_scale: float = 0.08, color_jitter: float = 0.4) -> T.Compose:
    """The seed's: RandomResizedCrop(scale min_scale-1, ratio 3/4-4/3), horizontal flip, ColorJitter."""
    steps = [
        T.RandomResizedCrop(preprocess.image_size, scale=(min_scale, 1.0), ratio=(0.75, 4 / 3),
                            interpolation=_INTERPOLATION[preprocess.interpolation], antialias=True),
        T.RandomHorizontalFlip(),
    ]
    if color_jitter > 0:
        steps.append(T.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter))
    return T.Compose(steps + _normalize(preprocess))


def eval_transform(preprocess: Preprocess) -> T.Compose:
    """Resize (shorter side, or squash to a square as the seed does), centre crop, normalise."""
    size = preprocess.resize_size if preprocess.resize_mode == "short" else (preprocess.resize_size,) * 2
    resize = T.Resize(size, interpolation=_INTERPOLATION[preprocess.interpolation], antialias=True)
    return T.Compose([resize, T.CenterCrop(preprocess.image_size)] + _normalize(preprocess))


def _load_rgb(path: str):
    with open(path, "rb") as handle:
        image = Image.open(handle)
        image.load()
    return image.convert("RGB")


class SafeImageFolder(datasets.ImageFolder):
    """ImageFolder that yields None for files it cannot decode (dropped by `collate_skipping`)."""

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            image = _load_rgb(path)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
            warnings.warn(f"skipping unreadable image {path}: {exc}", stacklevel=1)
            return None
        if self.transform is not None:
            image = self.transform(image)
        return image, label


def collate_skipping(batch):
    """Stack the good samples; the third item counts the skipped ones."""
    good = [item for item in batch if item is not None]
    skipped = len(batch) - len(good)
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    images, labels = torch.utils.data.default_collate(good)
    return images, labels, skipped


@dataclass(frozen=True)
class DatasetSplits:
    train: Path
    val: Path | None
    classes: list[str]


def class_folders(folder: Path) -> list[str]:
    classes = sorted(entry.name for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise DataError(f"{folder} holds no class folders (expected {folder}/<class>/<image>)")
    for name in classes:
        if not any(path.is_file() and path.suffix.lower() in datasets.folder.IMG_EXTENSIONS
                   for path in (folder / name).rglob("*")):
            raise DataError(f"class folder {folder / name} holds no images")
    return classes


def find_splits(root: str | Path) -> DatasetSplits:
    """A dataset root with train/ (and val/ or validation_preprocess/), checked before anything runs."""
    root = Path(root)
    if not str(root) or not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    train = root / "train"
    if not train.is_dir():
        raise DataError(f"{root} has no train/ folder (expected {root}/train/<class>/<image>)")
    val = next((root / name for name in VAL_FOLDER_NAMES if (root / name).is_dir()), None)
    classes = class_folders(train)
    if val is not None:
        val_classes = class_folders(val)
        if not set(val_classes) <= set(classes):
            extra = sorted(set(val_classes) - set(classes))
            raise DataError(f"{val} has classes the train folder lacks: {', '.join(extra[:5])}")
    return DatasetSplits(train, val, classes)


def image_folder(folder: Path, transform, classes: list[str] | None = None) -> SafeImageFolder:
    """An ImageFolder whose label indices follow `classes` (so val uses train's numbering)."""
    dataset = SafeImageFolder(str(folder), transform=transform, allow_empty=True)
    if classes is not None and dataset.classes != classes:
        index = {name: i for i, name in enumerate(classes)}
        dataset.samples = [(path, index[dataset.classes[label]]) for path, label in dataset.samples]
        dataset.targets = [label for _, label in dataset.samples]
        dataset.classes, dataset.class_to_idx = list(classes), index
    return dataset


class ShardSampler(Sampler[int]):
    """Rank r takes items r, r+W, r+2W, ...: every item exactly once across ranks, no padding, nothing dropped."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1):
        self.indices = range(rank, length, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def eval_loader(dataset: Dataset, batch_size: int, workers: int, rank: int = 0, world_size: int = 1,
                pin_memory: bool = False) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), rank, world_size),
                      num_workers=workers, collate_fn=collate_skipping, pin_memory=pin_memory,
                      persistent_workers=False)


# ---------------------------------------------------------------- small datasets held in memory

MAX_IN_MEMORY_BYTES = 8 << 30


@torch.no_grad()
def decode_all(dataset: SafeImageFolder, size: int, workers: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Every image squashed to size x size, as one uint8 tensor (N, 3, size, size), with labels and a skip count."""
    needed = len(dataset) * 3 * size * size
    if needed > MAX_IN_MEMORY_BYTES:
        raise DataError(f"--in-memory would need {needed / 2**30:.1f} GiB for {len(dataset)} images at {size} px "
                        f"(limit {MAX_IN_MEMORY_BYTES / 2**30:.0f} GiB); train from disk instead")
    return collect_tensors(_with_transform(dataset, T.Compose([T.ToImage(), T.Resize((size, size), antialias=True)])),
                           workers)


def _with_transform(dataset: SafeImageFolder, transform) -> SafeImageFolder:
    import copy

    clone = copy.copy(dataset)
    clone.transform = transform
    return clone


class BatchAugment:
    """The seed's train transform applied to a whole uint8 batch at once, each image with its own draw:
    RandomResizedCrop (scale, ratio 3/4-4/3) and flip as one affine resampling, ColorJitter, normalisation."""

    def __init__(self, preprocess: Preprocess, min_scale: float = 0.08, color_jitter: float = 0.4):
        self.size = preprocess.image_size
        self.scale = (min_scale, 1.0)
        self.log_ratio = (math.log(3 / 4), math.log(4 / 3))
        self.jitter = color_jitter
        self.mean = torch.tensor(preprocess.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(preprocess.std).view(1, 3, 1, 1)

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
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if self.jitter > 0:
            x = self._color_jitter(x, n)
        return (x - self.mean) / self.std

    def _color_jitter(self, x: torch.Tensor, n: int) -> torch.Tensor:
        def factor():
            return torch.empty(n, 1, 1, 1).uniform_(max(0.0, 1 - self.jitter), 1 + self.jitter)

        weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        x = (x * factor()).clamp(0, 1)  # brightness
        mean = (x * weights).sum(1, keepdim=True).mean((2, 3), keepdim=True)
        x = ((x - mean) * factor() + mean).clamp(0, 1)  # contrast
        gray = (x * weights).sum(1, keepdim=True)
        return ((x - gray) * factor() + gray).clamp(0, 1)  # saturation


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
