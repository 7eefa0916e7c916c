"""The seed's image transforms: RandomResizedCrop + flip + ColorJitter for training, resize + centre crop for eval,
both ending in the preprocessing contract's normalisation.

Each is an `ImagePipeline`: a geometric first step, then the rest. Given a file (`decode`), the geometric step picks
its crop first and then decodes no more than it needs: libjpeg's DCT scaling (1/2, 1/4, 1/8) where the crop still
covers its output size at that scale, otherwise a full decode (`torchvision.io.decode_jpeg` for JPEGs, which is
faster than PIL's; PIL for everything else and for what decode_jpeg refuses). The crop geometry is the seed's, drawn
from the full image's size; only the resampling source is smaller, never smaller than the output.

Given a file, both steps see the photo upright (its EXIF orientation applied, unless the contract says
`exif: ignore`): the crop is drawn on the upright size, taken from the same pixels of the stored image and the
small output turned upright, so a sideways-stored photo costs no more than an upright one. Given a PIL image, its
pixels are taken as they are (decode_rgb has already turned it).

The training pipeline works in uint8 from the crop on: the crop is resampled with torch's uint8 antialiased kernel,
flip and ColorJitter run on 8-bit pixels (ColorJitter with torchvision's draws and PIL's arithmetic), and the
float conversion and normalisation can be left to the training device (`normalized=False`, then
`batched.normalize_bytes` on the batch), so workers hand over and copy a quarter of the bytes.
"""

from __future__ import annotations

import io
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance
from torchvision import transforms as classic
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2 as T

from mobilenetv2.config import Preprocess
from mobilenetv2.data.batched import normalize_bytes
from mobilenetv2.data.folders import ImageTooLarge, open_image, source_name, to_rgb
from mobilenetv2.data.orientation import pending_orientation, stored_box, upright_image, upright_size, upright_tensor

PIL_INTERPOLATION = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def _draft(image: Image.Image, scale: float) -> float:
    """Ask the decoder for `image` at no less than `scale` of its size (JPEG only; a loaded image is left as is).
    Returns the scale it will actually be decoded at: libjpeg's DCT scale 1/s (s = 1, 2, 4 or 8), which maps an
    original pixel coordinate x to x/s in the reduced image on both axes. The reduced image's sides are each rounded
    up (333 px at 1/2 is 167 px, not 166.5), so their ratio to the original sides differs from 1/s and between the
    axes: a crop box scaled by the width's ratio could pass the reduced image's bottom edge."""
    width, height = image.size
    if scale < 1 and image.format == "JPEG":
        drafted = image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
        if drafted is not None:
            _mode, (_left, _top, right, _bottom) = drafted  # (0, 0, width / s, height / s)
            return 1 / round(width / right)
    return 1.0


class SeedRandomResizedCrop:
    """RandomResizedCrop(scale, ratio 3/4-4/3) drawn on the full image's size (torchvision's draw), resampled from
    the smallest decode that covers it. Returns uint8 (3, size, size) in channels-last memory.

    A full-size decode is resampled by torch's uint8 antialiased kernel (several times faster than PIL's); a
    DCT-reduced one by PIL's, which takes the crop box at sub-pixel precision in the reduced image."""

    def __init__(self, size: int, scale: tuple[float, float], interpolation: str, exif: bool = True):
        self.size, self.scale, self.exif = size, scale, exif
        self.mode, self.resample = interpolation, PIL_INTERPOLATION[interpolation]

    def _draw(self, image: Image.Image, orientation: int = 1) -> tuple[int, int, int, int]:
        """torchvision's draw on the image's (upright) size."""
        width, height = upright_size(image.size, orientation)
        shape_only = torch.empty(1, 1, 1).expand(1, height, width)  # get_params reads the size alone
        return classic.RandomResizedCrop.get_params(shape_only, self.scale, (3 / 4, 4 / 3))

    def _resample(self, pixels: torch.Tensor, top: int, left: int, height: int, width: int) -> torch.Tensor:
        """The crop of full-size uint8 (3, H, W) pixels, resized to the output."""
        crop = pixels[None, :, top:top + height, left:left + width].contiguous(memory_format=torch.channels_last)
        smooth = self.mode != "nearest"
        return F.interpolate(crop, size=(self.size, self.size), mode=self.mode, antialias=smooth,
                             align_corners=False if smooth else None)[0]

    def _from_image(self, image: Image.Image, top: int, left: int, height: int, width: int) -> torch.Tensor:
        actual = _draft(image, self.size / min(height, width))
        if actual == 1:
            return self._resample(_pixels(to_rgb(image)), top, left, height, width)
        box = (left * actual, top * actual, (left + width) * actual, (top + height) * actual)
        return _pixels(to_rgb(image).resize((self.size, self.size), self.resample, box=box))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self._from_image(image, *self._draw(image))

    def from_file(self, path: str | os.PathLike | io.BytesIO) -> torch.Tensor:
        with open_image(path) as image:  # only the header is read so far
            orientation = pending_orientation(image, self.exif, source_name(path))
            # drawn upright, cut from the stored pixels, the small crop turned upright
            top, left, height, width = stored_box(self._draw(image, orientation), image.size, orientation)
            if image.format == "JPEG" and self.size / min(height, width) > 0.5:  # no DCT scaling possible
                pixels = _decode_jpeg(path)
                if pixels is not None and pixels.shape[-2:] == (image.height, image.width):
                    return upright_tensor(self._resample(pixels, top, left, height, width), orientation)
            return upright_tensor(self._from_image(image, top, left, height, width), orientation)


def _pixels(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as uint8 (3, H, W) in channels-last memory (no further copy)."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def _decode_jpeg(path: str | os.PathLike | io.BytesIO) -> torch.Tensor | None:
    """The JPEG at `path` (or in a bytes buffer: a shard's sample) as uint8 (3, H, W) by libjpeg-turbo through
    torchvision; None where it refuses the file (PIL then decodes it, or reports why it cannot)."""
    try:
        if isinstance(path, io.BytesIO):
            data = torch.frombuffer(bytearray(path.getbuffer()), dtype=torch.uint8)
        else:
            with open(path, "rb") as handle:
                data = torch.frombuffer(bytearray(handle.read()), dtype=torch.uint8)
        return decode_jpeg(data, mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError):
        return None


LUMA = np.array([0.299, 0.587, 0.114])  # PIL's RGB -> L weights


def _blend_values(values: np.ndarray, toward: float, factor: float) -> np.ndarray:
    """PIL's blend of 8-bit values with a constant (`toward + factor * (v - toward)`, truncated, clipped)."""
    return np.clip(np.floor(toward + factor * (values - toward)), 0, 255)


def jitter_image(image: Image.Image, order: list[int], brightness: float, contrast: float,
                 saturation: float) -> Image.Image:
    """torchvision's ColorJitter on a PIL RGB image with given draws (`order`: torchvision's permutation of
    brightness 0, contrast 1, saturation 2, hue 3), with the arithmetic of PIL's ImageEnhance. Brightness and
    contrast change each 8-bit value alone, so a run of them composes into one lookup table applied once (exactly,
    intermediate rounding included); contrast's grey level is the luma mean, read from the channel histograms
    through the table. Saturation is PIL's own blend with the image's greyscale."""
    table = np.arange(256, dtype=np.float64)  # value -> value, not applied yet
    histogram = None
    for step in order:
        if step == 0:
            table = _blend_values(table, 0.0, brightness)
        elif step == 1:
            if histogram is None:
                histogram = np.asarray(image.histogram(), dtype=np.float64).reshape(3, 256)
            channel_means = (histogram * table).sum(axis=1) / histogram.sum(axis=1)
            table = _blend_values(table, float(int(channel_means @ LUMA + 0.5)), contrast)
        elif step == 2:
            image = _apply(image, table)
            table, histogram = np.arange(256, dtype=np.float64), None
            image = ImageEnhance.Color(image).enhance(saturation)
    return _apply(image, table)


def _apply(image: Image.Image, table: np.ndarray) -> Image.Image:
    if (table == np.arange(256)).all():
        return image
    return image.point(table.astype(np.int64).tolist() * 3)


class FlipJitter:
    """Horizontal flip and ColorJitter(brightness, contrast, saturation = `strength`) on uint8 (3, H, W), with
    torchvision's draws in torchvision's order (flip, then a random order of the three, then the three factors),
    then `policy` (an automatic augmentation policy, or None), then the contract's normalisation unless
    `preprocess` is None (the device normalises the batch)."""

    def __init__(self, strength: float, preprocess: Preprocess | None, policy=None):
        self.strength, self.preprocess, self.policy = strength, preprocess, policy

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        image = Image.fromarray(pixels.permute(1, 2, 0).numpy())
        if torch.rand(1) < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        if self.strength > 0:
            order = [int(i) for i in torch.randperm(4)]
            low, high = max(0.0, 1 - self.strength), 1 + self.strength
            factors = [torch.empty(1).uniform_(low, high).item() for _ in range(3)]
            image = jitter_image(image, order, *factors)
        out = _pixels(image)
        if self.policy is not None:  # an automatic augmentation policy (data/augment.py), on 8-bit pixels
            out = self.policy(out)
        if self.preprocess is None:
            return out
        return normalize_bytes(out[None], self.preprocess)[0]


# the longest side the eval resize may give, in multiples of its shorter side: a 360-degree panorama (8:1) passes; a
# 100000 x 1 image, whose 1-pixel side the short-side resize would scale to 256 and its long side to 25.6 million
# pixels (a 177-byte PNG asking for gigabytes), is refused before anything is allocated
MAX_RESIZED_ASPECT = 16


def resize_target(height: int, width: int, size: int, mode: str) -> tuple[int, int]:
    """(height, width) after the eval resize: the shorter side to `size` ("short"), or a square ("squash").
    Raises ImageTooLarge where the resized image would be more than MAX_RESIZED_ASPECT times longer than wide."""
    if mode == "squash":
        return size, size
    short = min(height, width)
    target = max(1, round(height * size / short)), max(1, round(width * size / short))
    if max(target) > MAX_RESIZED_ASPECT * size:
        raise ImageTooLarge(f"{width}x{height} pixels: resized to {size} px on its shorter side it would be "
                            f"{target[1]}x{target[0]}, longer than {MAX_RESIZED_ASPECT}:1")
    return target


class SeedResize:
    """Shorter side to `size` ("short"), or a `size` x `size` square ("squash", the seed's), from a reduced decode."""

    def __init__(self, size: int, mode: str, interpolation: str, exif: bool = True):
        self.size, self.mode, self.resample, self.exif = size, mode, PIL_INTERPOLATION[interpolation], exif

    def __call__(self, image: Image.Image, orientation: int = 1) -> Image.Image:
        width, height = upright_size(image.size, orientation)
        target_height, target_width = resize_target(height, width, self.size, self.mode)
        _draft(image, max(target_width / width, target_height / height))  # the same scale on both axes
        return upright_image(to_rgb(image), orientation).resize((target_width, target_height), self.resample)

    def from_file(self, path: str | os.PathLike) -> Image.Image:
        with open_image(path) as image:  # not decoded yet: the resize may ask for a reduced decode
            return self(image, pending_orientation(image, self.exif, source_name(path)))


class ImagePipeline:
    """A geometric step, then the rest. `decode(path)` runs the geometric step on the file itself, so the decoder
    can skip what the output does not need; `finish` runs the rest; calling it runs both on a PIL image."""

    def __init__(self, geometry, finish):
        self.geometry, self.finish = geometry, finish

    def decode(self, path: str | os.PathLike | io.BytesIO):
        """The geometric step on a file, or on a file's bytes in a BytesIO."""
        return self.geometry.from_file(path)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.finish(self.geometry(image))


def _normalize(preprocess: Preprocess) -> list:
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(preprocess.mean, preprocess.std)]


def train_transform(preprocess: Preprocess, min_scale: float = 0.08, color_jitter: float = 0.4,
                    normalized: bool = True, crop_size: int = 0, policy=None) -> ImagePipeline:
    """The seed's: RandomResizedCrop(scale min_scale-1, ratio 3/4-4/3) to `crop_size` (0: the contract's image
    size), horizontal flip, ColorJitter, then `policy` when given; normalised floats, or uint8 with
    `normalized=False` (then `batched.normalize_bytes` on the batch, on the device)."""
    crop = SeedRandomResizedCrop(crop_size or preprocess.image_size, (min_scale, 1.0), preprocess.interpolation,
                                 preprocess.upright)
    return ImagePipeline(crop, FlipJitter(color_jitter, preprocess if normalized else None, policy))


def eval_transform(preprocess: Preprocess) -> ImagePipeline:
    """Resize (shorter side, or squash to a square as the seed does), centre crop, normalise."""
    resize = SeedResize(preprocess.resize_size, preprocess.resize_mode, preprocess.interpolation,
                        preprocess.upright)
    return ImagePipeline(resize, T.Compose([T.CenterCrop(preprocess.image_size)] + _normalize(preprocess)))
