"""Shared fixtures: real photos from scikit-image / scikit-learn, tiny ImageFolder trees, the MindSpore fixture."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

FIXTURES = Path(__file__).parent / "fixtures"
MS_CHECKPOINT = FIXTURES / "ms_mobilenetv2_w0.5_c10.ckpt"


def real_photos() -> dict[str, np.ndarray]:
    """Real RGB photos, by name."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    photos = {name: getattr(data, name)() for name in ("astronaut", "chelsea", "coffee", "rocket")}
    china, flower = load_sample_images().images
    photos.update(china=china, flower=flower)
    return photos


def write_image_folder(root: Path, per_class: int = 6, size: int = 48, seed: int = 0, classes=None) -> Path:
    """An ImageFolder whose classes are real photos; each image is a random crop of its class's photo."""
    rng = np.random.default_rng(seed)
    photos = real_photos()
    classes = classes or ["astronaut", "chelsea", "coffee"]
    for name in classes:
        photo = photos[name]
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        h, w = photo.shape[:2]
        for i in range(per_class):
            crop = int(min(h, w) * rng.uniform(0.5, 0.9))
            y, x = rng.integers(0, h - crop + 1), rng.integers(0, w - crop + 1)
            Image.fromarray(photo[y:y + crop, x:x + crop]).resize((size, size)).save(folder / f"{name}_{i:03d}.jpg")
    return root


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    return real_photos()


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """A tiny dataset root: train/ (3 classes x 8 images) and val/ (3 classes x 5 images)."""
    root = tmp_path_factory.mktemp("dataset")
    write_image_folder(root / "train", per_class=8, seed=0)
    write_image_folder(root / "val", per_class=5, seed=1)
    return root
