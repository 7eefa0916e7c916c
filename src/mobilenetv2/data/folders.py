"""ImageFolder trees: the dataset layout, label numbering, the bad-file policy and exact eval shards.

Every decoder (train, eval, predict, feature extraction, every data backend) reads images the same way:
- odd but valid files are decoded, not skipped: greyscale, CMYK and progressive JPEG, 16-bit PNG (scaled to 8 bits),
  palette and RGBA PNG, GIF (first frame), WebP, BMP, TIFF, any suffix case, 1x1 images. Transparency is composited
  on a fixed white background (`BACKGROUND`), never dropped.
- EXIF orientation is applied (a phone's portrait photo is seen upright, as every viewer shows it), the same way on
  every path (PIL, decode_jpeg, the device decoder; data/orientation.py), so train, eval and predict agree;
  `Preprocess.exif = "ignore"` uses pixels as stored, as torchvision's ImageFolder and the seed do.
- an image of more than `MAX_PIXELS` pixels is refused from its header, before any pixel is decoded (decompression
  bombs).
An image that cannot be decoded (truncated, empty, not an image, too large, a broken link) is skipped with a warning
naming the file and the reason, and counted; the batch and the epoch go on.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import datasets

from mobilenetv2.data.orientation import pending_orientation, upright_image
from mobilenetv2.errors import DataError

VAL_FOLDER_NAMES = ("val", "validation_preprocess", "validation", "test")
MAX_PIXELS = 89_478_485  # PIL's own warning threshold (about 9459 x 9459); larger images are refused unread
BACKGROUND = (255, 255, 255)  # what transparent pixels become


# the suffixes an image folder reads (any case): torchvision's, and GIF
IMAGE_SUFFIXES = tuple(sorted(set(datasets.folder.IMG_EXTENSIONS) | {".gif"}))


def is_image_file(path: str) -> bool:
    return path.lower().endswith(IMAGE_SUFFIXES)


class ImageTooLarge(ValueError):
    """An image header declares more pixels than MAX_PIXELS, or its eval resize would (`transforms.resize_target`)."""


# what decoding raises for files that are not images, truncated, corrupt or too large
DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def open_image(source: str | Path | BinaryIO) -> Image.Image:
    """PIL's Image.open (the header only, nothing decoded yet), refused with ImageTooLarge beyond MAX_PIXELS
    (`check_size`). PIL's own decompression-bomb warning is silenced: the refusal says it in one line, and the
    warning was a second, unasked-for line on stderr. PIL's complaint of a corrupt EXIF block (it reads the block
    as it opens a JPEG) is kept on the image as `exif_problem`, for the orientation's reader to say once, naming the
    file."""
    with warnings.catch_warnings(record=True) as complaints:
        warnings.simplefilter("always")
        image = Image.open(source)
    for complaint in complaints:
        if issubclass(complaint.category, Image.DecompressionBombWarning):
            continue
        if "EXIF" in str(complaint.message):  # said once, naming the file, when the orientation is read
            image.exif_problem = str(complaint.message).strip()  # type: ignore[attr-defined]
        else:
            warnings.warn_explicit(complaint.message, complaint.category, complaint.filename, complaint.lineno)
    try:
        return check_size(image)
    except ImageTooLarge:
        image.close()
        raise


def check_size(image: Image.Image) -> Image.Image:
    """`image` (opened, not decoded), or ImageTooLarge when its header declares more than MAX_PIXELS pixels."""
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ImageTooLarge(f"{width}x{height} pixels, more than the {MAX_PIXELS} allowed")
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: 16- and 32-bit greyscale scaled (not clipped), transparency composited on
    BACKGROUND, everything else by PIL's conversion."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        grey = np.clip(values * (255.0 / top), 0, 255).round().astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def decode_rgb(source: str | Path | BinaryIO, exif: bool = True) -> Image.Image:
    """The image in `source` (a path or a binary file; the first frame of an animation), fully decoded, as RGB,
    turned upright by its EXIF orientation (`exif=False`: as stored). Raises one of DECODE_ERRORS for bytes that are
    no image, or an image larger than MAX_PIXELS."""
    with open_image(source) as image:
        orientation = pending_orientation(image, exif, source_name(source))
        image.load()
        return upright_image(to_rgb(image), orientation)


def source_name(source: object) -> str:
    """How a warning names an image: its path, or the name of the file object it was read from."""
    return str(source) if isinstance(source, (str, Path)) else str(getattr(source, "name", "image bytes"))


def pad_class_names(names: list[str], num_classes: int) -> list[str]:
    """`names` followed by placeholders `class_K` up to `num_classes` (a head with more outputs than folders)."""
    return list(names) + [f"class_{i}" for i in range(len(names), num_classes)]


def model_class_order(classes: list[str], model_names: list[str] | None, num_classes: int, where: str) -> list[str]:
    """The class names a model's outputs follow, for data labelled by `classes`: the model's own names (each data
    class must be among them), or, for a model without names, `classes` padded to its outputs."""
    if model_names:
        unknown = [c for c in classes if c not in model_names]
        if unknown:
            raise DataError(f"{where} has classes the model does not know: {', '.join(unknown[:5])}")
        return list(model_names)
    if len(classes) > num_classes:
        raise DataError(f"{where} has {len(classes)} classes, the model {num_classes}")
    return pad_class_names(classes, num_classes)


class SafeImageFolder(datasets.ImageFolder):
    """ImageFolder that yields None for files it cannot decode (dropped by `collate_skipping`). A transform that
    decodes itself (an ImagePipeline) follows its own contract's `exif`; otherwise `exif` says whether images are
    turned upright."""

    exif = True

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        pipeline = self.transform
        decodes_itself = hasattr(pipeline, "decode")  # an ImagePipeline decodes no larger than it needs
        try:
            image = pipeline.decode(path) if decodes_itself else decode_rgb(path, self.exif)
        except DECODE_ERRORS as exc:
            warnings.warn(f"skipping unreadable image {path}: {exc}", stacklevel=1)
            return None
        if decodes_itself:
            return pipeline.finish(image), label
        if pipeline is not None:
            image = pipeline(image)
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
        if not any(is_image_file(path.name) and _decodes(path) for path in sorted((folder / name).rglob("*"))):
            raise DataError(f"class folder {folder / name} holds no readable images")
    return classes


def _decodes(path: Path) -> bool:
    """Whether `path` decodes (the check stops at a class's first readable image, so it costs one decode)."""
    try:
        decode_rgb(path)
        return True
    except DECODE_ERRORS:
        return False


def find_val_folder(root: Path) -> Path | None:
    """DIR/val, or the seed's DIR/validation_preprocess (and two other common names), if there is one."""
    return next((root / name for name in VAL_FOLDER_NAMES if (root / name).is_dir()), None)


def find_splits(root: str | Path) -> DatasetSplits:
    """A dataset root with train/ (and val/ or validation_preprocess/), checked before anything runs."""
    root = Path(root)
    if not str(root) or not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    train = root / "train"
    if not train.is_dir():
        raise DataError(f"{root} has no train/ folder (expected {root}/train/<class>/<image>)")
    val = find_val_folder(root)
    classes = class_folders(train)
    if val is not None:
        val_classes = class_folders(val)
        if not set(val_classes) <= set(classes):
            extra = sorted(set(val_classes) - set(classes))
            raise DataError(f"{val} has classes the train folder lacks: {', '.join(extra[:5])}")
    return DatasetSplits(train, val, classes)


def image_folder(folder: Path, transform, classes: list[str] | None = None,
                 kind: type[SafeImageFolder] = SafeImageFolder, exif: bool = True) -> SafeImageFolder:
    """An ImageFolder (of `kind`) whose label indices follow `classes` (so val uses train's numbering); `exif`: see
    SafeImageFolder."""
    dataset = kind(str(folder), transform=transform, allow_empty=True, is_valid_file=is_image_file)
    dataset.exif = exif
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
                pin_memory: bool = False, collate=collate_skipping) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), rank, world_size),
                      num_workers=workers, collate_fn=collate, pin_memory=pin_memory, persistent_workers=False)
