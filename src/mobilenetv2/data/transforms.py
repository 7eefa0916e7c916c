"""The seed's image transforms: RandomResizedCrop + flip + ColorJitter for training, resize + centre crop for eval,
both ending in the preprocessing contract's normalisation.

Each is an `ImagePipeline`: a geometric first step on the PIL image, then the rest. Given a file (`decode`), the
geometric step picks its crop first and then asks libjpeg for the smallest DCT-scaled decode (1/2, 1/4, 1/8) that
still covers the crop at its output size, so a large crop or an eval resize does not pay for a full-size decode.
The crop geometry is the seed's, drawn from the full image's size; only the resampling source is smaller, never
smaller than the output.
"""

from __future__ import annotations

import math
import os

import torch
from PIL import Image
from torchvision import transforms as classic
from torchvision.transforms import v2 as T

from mobilenetv2.config import Preprocess

PIL_INTERPOLATION = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def _draft(image: Image.Image, scale: float) -> float:
    """Ask the decoder for `image` at no less than `scale` of its size (JPEG only; a loaded image is left as is).
    Returns the scale it will actually be decoded at."""
    width, height = image.size
    if scale < 1 and image.format == "JPEG":
        image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
    return image.size[0] / width


class SeedRandomResizedCrop:
    """RandomResizedCrop(scale, ratio 3/4-4/3) drawn on the full image's size, resampled from a reduced decode."""

    def __init__(self, size: int, scale: tuple[float, float], interpolation: str):
        self.size, self.scale, self.resample = size, scale, PIL_INTERPOLATION[interpolation]

    def __call__(self, image: Image.Image) -> Image.Image:
        top, left, height, width = classic.RandomResizedCrop.get_params(image, self.scale, (3 / 4, 4 / 3))
        actual = _draft(image, self.size / min(height, width))
        box = (left * actual, top * actual, (left + width) * actual, (top + height) * actual)
        return image.convert("RGB").resize((self.size, self.size), self.resample, box=box)


def resize_target(height: int, width: int, size: int, mode: str) -> tuple[int, int]:
    """(height, width) after the eval resize: the shorter side to `size` ("short"), or a square ("squash")."""
    if mode == "squash":
        return size, size
    short = min(height, width)
    return max(1, round(height * size / short)), max(1, round(width * size / short))


class SeedResize:
    """Shorter side to `size` ("short"), or a `size` x `size` square ("squash", the seed's), from a reduced decode."""

    def __init__(self, size: int, mode: str, interpolation: str):
        self.size, self.mode, self.resample = size, mode, PIL_INTERPOLATION[interpolation]

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        target_height, target_width = resize_target(height, width, self.size, self.mode)
        _draft(image, max(target_width / width, target_height / height))
        return image.convert("RGB").resize((target_width, target_height), self.resample)


class ImagePipeline:
    """A geometric step on a PIL image, then the tensor steps. `decode(path)` runs the geometric step on the file
    itself, so the decoder can skip what the output does not need; `finish` runs the rest."""

    def __init__(self, geometry, finish: T.Compose):
        self.geometry, self.finish = geometry, finish

    def decode(self, path: str | os.PathLike) -> Image.Image:
        with Image.open(path) as image:  # not decoded yet: the geometric step may ask for a reduced decode
            return self.geometry(image)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.finish(self.geometry(image))


def _normalize(preprocess: Preprocess) -> list:
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(preprocess.mean, preprocess.std)]


def train_transform(preprocess: Preprocess, min_scale: float = 0.08, color_jitter: float = 0.4) -> ImagePipeline:
    """The seed's: RandomResizedCrop(scale min_scale-1, ratio 3/4-4/3), horizontal flip, ColorJitter."""
    steps = [T.RandomHorizontalFlip()]
    if color_jitter > 0:
        steps.append(T.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter))
    crop = SeedRandomResizedCrop(preprocess.image_size, (min_scale, 1.0), preprocess.interpolation)
    return ImagePipeline(crop, T.Compose(steps + _normalize(preprocess)))


def eval_transform(preprocess: Preprocess) -> ImagePipeline:
    """Resize (shorter side, or squash to a square as the seed does), centre crop, normalise."""
    resize = SeedResize(preprocess.resize_size, preprocess.resize_mode, preprocess.interpolation)
    return ImagePipeline(resize, T.Compose([T.CenterCrop(preprocess.image_size)] + _normalize(preprocess)))
