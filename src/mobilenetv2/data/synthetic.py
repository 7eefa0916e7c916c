"""An ImageNet-like JPEG folder made offline from the real photos that scikit-image ships: random crops at random
scales, resized to about the size of an ImageNet image, re-encoded at varied JPEG qualities (some progressive, some
with chroma subsampling off). One class per source photo, so a network can learn it; for benchmarks without ImageNet.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np

from mobilenetv2.errors import DataError
from mobilenetv2.files import written_with

SOURCE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "hubble_deep_field",
                 "immunohistochemistry", "brick", "grass")  # all shipped inside the scikit-image wheel
MAX_IMAGES = 10_000_000
MAX_SIDE = 4096


def _photos() -> dict[str, np.ndarray]:
    try:
        from skimage import data
    except ImportError:
        raise DataError("the synthetic data set is made from scikit-image's photos: "
                        "pip install 'mobilenetv2[synthetic]'") from None
    photos = {}
    for name in SOURCE_PHOTOS:
        photo = getattr(data, name)()
        photos[name] = np.stack([photo] * 3, -1) if photo.ndim == 2 else photo[..., :3]
    return photos


def parse_size(text: str) -> tuple[int, int]:
    """'500x375' -> (500, 375): width by height."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise DataError(f"size must look like 500x375 (width x height), got {text!r}") from None
    if not (16 <= width <= MAX_SIDE and 16 <= height <= MAX_SIDE):
        raise DataError(f"size {text}: each side must be between 16 and {MAX_SIDE} pixels")
    return width, height


def _jpeg(photo: np.ndarray, size: tuple[int, int], generator: np.random.Generator) -> bytes:
    from PIL import Image

    h, w = photo.shape[:2]
    scale = generator.uniform(0.35, 1.0)
    crop_h, crop_w = max(8, int(h * scale)), max(8, int(w * scale * generator.uniform(0.75, 1.33)))
    crop_w = min(crop_w, w)
    top, left = generator.integers(0, h - crop_h + 1), generator.integers(0, w - crop_w + 1)
    image = Image.fromarray(photo[top:top + crop_h, left:left + crop_w])
    jitter = generator.uniform(0.8, 1.2)  # ImageNet images vary in size around their typical one
    image = image.resize((max(16, int(size[0] * jitter)), max(16, int(size[1] * jitter))), Image.BILINEAR)
    if generator.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=int(generator.integers(70, 96)), progressive=bool(generator.random() < 0.2),
               subsampling=0 if generator.random() < 0.2 else 2)
    return buffer.getvalue()


def write_synthetic(out: str | Path, *, images: int, size: str = "500x375", val_fraction: float = 0.1,
                    seed: int = 0) -> Path:
    """`images` JPEGs as OUT/train/<photo>/*.jpg and OUT/val/<photo>/*.jpg. Reused when already written alike."""
    if not 1 <= images <= MAX_IMAGES:
        raise DataError(f"`images` must be between 1 and {MAX_IMAGES}")
    if not 0 <= val_fraction < 1:
        raise DataError("`val_fraction` must be in [0, 1)")
    dimensions = parse_size(size)
    out = Path(out)
    marker = out / "synthetic.json"
    wanted = {"images": images, "size": list(dimensions), "val_fraction": val_fraction, "seed": seed}
    if written_with(marker, "options", wanted):
        return out
    photos = _photos()
    names = list(photos)
    generator = np.random.default_rng(seed)
    val_every = round(1 / val_fraction) if val_fraction else 0
    for split in ("train", "val"):
        shutil.rmtree(out / split, ignore_errors=True)
        for name in names if split == "train" or val_every else ():  # no val/ at all without a val share
            (out / split / name).mkdir(parents=True)
    counts = {"train": 0, "val": 0}
    for index in range(images):
        name = names[index % len(names)]
        per_class = index // len(names)  # this image's number within its class: every class gets its val share
        split = "val" if val_every and per_class % val_every == val_every - 1 else "train"
        (out / split / name / f"{index:08d}.jpg").write_bytes(_jpeg(photos[name], dimensions, generator))
        counts[split] += 1
    marker.write_text(json.dumps({"options": wanted, "counts": counts, "classes": names}))
    return out
