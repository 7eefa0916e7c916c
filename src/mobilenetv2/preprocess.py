"""The preprocessing contract: what an image must go through before the network sees it (size, resize, crop,
mean, std, interpolation, EXIF orientation). It travels inside every checkpoint and export; `config` re-exports it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from mobilenetv2.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EXIF_MODES = ("apply", "ignore")  # photos turned upright by their EXIF orientation, or pixels as stored


@dataclass(frozen=True)
class Preprocess:
    """What an image must go through before the network sees it; travels inside every checkpoint and export."""

    image_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    resize_mode: str = "short"  # "short": shorter side to resize_size then centre crop; "squash": resize_size square
    exif: str = "apply"  # "apply": photos turned upright by their EXIF orientation; "ignore": pixels as stored (the seed)

    def __post_init__(self):
        if self.image_size < 8 or self.resize_size < self.image_size:
            raise UserError(f"image size {self.image_size} / resize size {self.resize_size} are not usable")
        if self.resize_mode not in ("short", "squash"):
            raise UserError(f"resize mode must be 'short' or 'squash', got {self.resize_mode!r}")
        if self.exif not in EXIF_MODES:
            raise UserError(f"exif must be 'apply' or 'ignore', got {self.exif!r}")
        if self.interpolation not in ("bilinear", "bicubic", "nearest"):
            raise UserError(f"interpolation must be bilinear, bicubic or nearest, got {self.interpolation!r}")

    @property
    def upright(self) -> bool:
        """Whether decoding turns a photo upright by its EXIF orientation (`exif` "apply")."""
        return self.exif == "apply"

    @classmethod
    def for_image_size(cls, image_size: int, **kwargs) -> Preprocess:
        """The seed's ratio: resize to 256/224 of the crop size."""
        return cls(image_size=image_size, resize_size=int(round(image_size * 256 / 224)), **kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Preprocess:
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in known}
        return cls(**kwargs)
