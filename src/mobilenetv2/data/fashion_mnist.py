"""Real datasets written as ImageFolder trees, offline. Fashion-MNIST comes from Debian's
`dataset-fashion-mnist` package (/usr/share/datasets/fashion-mnist/*.gz), or from torchvision's downloader
when asked for and the internet is reachable.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np

from mobilenetv2.errors import DataError
from mobilenetv2.files import written_with

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle_boot")
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
_MAX_ITEMS = 1_000_000
_MAX_SIDE = 1024


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (the MNIST file format), with every size it declares bounded and checked."""
    with gzip.open(path, "rb") as handle:
        header = handle.read(4)
        if len(header) != 4 or header[:2] != b"\x00\x00" or header[2] != 0x08:
            raise DataError(f"{path} is not an unsigned-byte IDX file")
        dims = [int.from_bytes(handle.read(4), "big") for _ in range(header[3])]
        if not dims or dims[0] > _MAX_ITEMS or any(d > _MAX_SIDE or d < 1 for d in dims[1:]):
            raise DataError(f"{path} declares an implausible shape {dims}")
        size = int(np.prod(dims))
        data = handle.read(size + 1)
    if len(data) != size:
        raise DataError(f"{path} holds {len(data)} bytes of data, its header declares {size}")
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def _source_folder(source: Path | None, download: bool, out: Path) -> Path:
    folder = Path(source) if source else FASHION_MNIST_DIR
    if all((folder / name).is_file() for pair in _FILES.values() for name in pair):
        return folder
    if download:
        from torchvision.datasets import FashionMNIST

        raw = out / ".download"
        try:
            for train in (True, False):
                FashionMNIST(str(raw), train=train, download=True)
        except Exception as exc:  # network errors come in many types; the message is what matters
            raise DataError(f"could not download Fashion-MNIST ({exc})") from None
        return raw / "FashionMNIST" / "raw"
    raise DataError(f"Fashion-MNIST files not found in {folder}: install them with "
                    "'sudo apt-get install dataset-fashion-mnist', or pass `download`")


def write_fashion_mnist(out: str | Path, *, per_class: int | None = None, val_per_class: int | None = None,
                        source: str | Path | None = None, download: bool = False) -> Path:
    """Fashion-MNIST as train/<class>/*.png and val/<class>/*.png. Reused when already written with these limits."""
    from PIL import Image

    out = Path(out)
    marker = out / "fashion_mnist.json"
    wanted = {"per_class": per_class, "val_per_class": val_per_class}
    if written_with(marker, "limits", wanted):
        return out
    folder = _source_folder(source, download, out)
    counts = {}
    for split, (images_file, labels_file) in _FILES.items():
        images, labels = read_idx(folder / images_file), read_idx(folder / labels_file)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels) or labels.max() >= 10:
            raise DataError(f"{folder}: {split} images and labels do not match")
        limit = per_class if split == "train" else val_per_class
        target = out / split
        shutil.rmtree(target, ignore_errors=True)
        taken = np.zeros(10, dtype=int)
        for name in FASHION_MNIST_CLASSES:
            (target / name).mkdir(parents=True, exist_ok=True)
        for index, (image, label) in enumerate(zip(images, labels)):
            if limit is not None and taken[label] >= limit:
                continue
            taken[label] += 1
            Image.fromarray(image, mode="L").save(target / FASHION_MNIST_CLASSES[label] / f"{index:05d}.png")
        counts[split] = int(taken.sum())
    marker.write_text(json.dumps({"limits": wanted, "counts": counts, "classes": list(FASHION_MNIST_CLASSES)}))
    return out
