"""The backbone-feature cache behind head-only training (the seed's `--freeze_layer backbone`, made reusable).

The frozen backbone runs once per image (eval transforms, or K augmented views) and its pooled output is stored as
one memory-mapped array per split in a cache folder named by a key over the backbone weights, the file list
(paths, sizes, mtimes), the preprocessing and the transforms. A cache is built in a temp folder and renamed into
place only when complete, so a killed extraction is never reused. The head then trains from the arrays through
the same loop as every other mode (`tasks.feature_task`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from mobilenetv2.config import TrainConfig
from mobilenetv2.data.folders import SafeImageFolder, eval_loader
from mobilenetv2.model import MobileNetV2
from mobilenetv2.runtime import Runtime

CACHE_FORMAT = 1


def freeze_backbone(model: MobileNetV2) -> None:
    """No gradients and BatchNorm statistics held: the backbone stays bit-identical."""
    model.backbone.requires_grad_(False)
    model.backbone.eval()


def _hash_backbone(model: MobileNetV2, digest) -> None:
    for name, tensor in sorted(model.backbone.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(value.shape)}:{value.dtype}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())


def _hash_files(samples, digest) -> None:
    for path, label in samples:
        stat = os.stat(path)
        digest.update(f"{path}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())


def cache_key(model: MobileNetV2, splits: dict[str, SafeImageFolder], config: TrainConfig,
              teacher: str | None = None) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({"format": CACHE_FORMAT, "preprocess": config.preprocess.to_dict(),
                              "views": config.feature_views, "min_scale": config.min_scale,
                              "color_jitter": config.color_jitter, "seed": config.seed,
                              "splits": sorted(splits), "teacher": teacher}, sort_keys=True).encode())
    _hash_backbone(model, digest)
    for name, dataset in sorted(splits.items()):
        digest.update(name.encode())
        _hash_files(dataset.samples, digest)
    return digest.hexdigest()[:32]


@torch.no_grad()
def _extract(features_fn, dataset, rows: np.ndarray, labels: np.ndarray, valid: np.ndarray, view: int,
             views: int, runtime: Runtime, batch_size: int, workers: int, description: str) -> None:
    """Fill this rank's rows (view `view` of every image) of the memory-mapped arrays."""
    from tqdm import tqdm

    loader = eval_loader(_Indexed(dataset), batch_size, workers, runtime.rank, runtime.world_size,
                                     pin_memory=runtime.device.type == "cuda")
    quiet = not (runtime.is_main and sys.stderr.isatty())
    for batch in tqdm(loader, desc=description, disable=quiet, leave=False):
        inputs, labels_and_index, _skipped = batch
        if len(labels_and_index) == 0:
            continue
        with runtime.autocast():
            pooled = features_fn(runtime.to_input(inputs)).float().cpu().numpy()
        index = labels_and_index[:, 1].numpy() * views + view
        rows[index] = pooled
        labels[index] = labels_and_index[:, 0].numpy()
        valid[index] = 1


class _Indexed(torch.utils.data.Dataset):
    """Wraps a dataset so each item also carries its index (to place rows in the cache)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = self.dataset[index]
        if item is None:
            return None
        image, label = item
        return image, torch.tensor([label, index])


def build_cache(model: MobileNetV2, splits: dict[str, SafeImageFolder],
                augmented: SafeImageFolder | None, config: TrainConfig, runtime: Runtime,
                root: Path, teacher: tuple[torch.nn.Module, str] | None = None) -> tuple[Path, bool]:
    """The complete cache folder for these inputs, and whether it was reused (its key matched) or built. With a
    `teacher` (its module and sha256), each train row also holds the teacher's logits on the same view after the
    pooled features (distillation of the head: `tasks.feature_task`)."""
    key = cache_key(model, splits, config, teacher[1] if teacher else None)
    final = root / key
    if (final / "complete.json").is_file():
        return final, True
    partial = root / f"{key}.partial"
    if runtime.is_main:
        shutil.rmtree(partial, ignore_errors=True)  # a killed extraction's leftovers are never reused
        partial.mkdir(parents=True)
    runtime.barrier()
    from mobilenetv2.engines.choose import feature_function

    features_fn, engine = feature_function(model, runtime, config.feature_runtime, config.batch_size)
    counts = {}
    for name, dataset in splits.items():
        views = config.feature_views if name == "train" else 1
        count = len(dataset) * views
        features = model.num_features + (model.num_classes if teacher and name == "train" else 0)
        extract = _with_teacher(features_fn, teacher[0]) if teacher and name == "train" else features_fn
        if runtime.is_main:
            arrays = _open_arrays(partial, name, count, features, create=True)
        runtime.barrier()  # the files exist before the other ranks open them
        if not runtime.is_main:
            arrays = _open_arrays(partial, name, count, features, create=False)
        for view in range(views):
            source = dataset if (name != "train" or views == 1) else augmented
            if source is augmented:  # each view draws its own augmentation, reproducibly
                torch.manual_seed(config.seed * 1000 + view * 17 + runtime.rank)
            _extract(extract, source, *arrays, view, views, runtime, config.batch_size, config.workers,
                     f"features {name} view {view + 1}/{views} ({engine})")
        for array in arrays:
            array.flush()
        counts[name] = count
        del arrays
    runtime.barrier()
    if runtime.is_main:
        (partial / "complete.json").write_text(json.dumps({"counts": counts, "features": model.num_features,
                                                           "views": config.feature_views, "runtime": engine}))
        if final.exists():  # an incomplete folder under the final name (an older layout): replace it
            shutil.rmtree(final)
        os.replace(partial, final)
    runtime.barrier()
    return final, False


def _with_teacher(features_fn, teacher: torch.nn.Module):
    """Pooled features, then the teacher's logits on the same batch, one row per image."""

    def both(images: torch.Tensor) -> torch.Tensor:
        return torch.cat([features_fn(images).float(), teacher(images).float()], dim=1)

    return both


def _open_arrays(folder: Path, name: str, count: int, features: int, create: bool):
    mode = "w+" if create else "r+"
    rows = np.lib.format.open_memmap(folder / f"{name}_features.npy", mode=mode, dtype=np.float32,
                                     shape=(count, features) if create else None)
    labels = np.lib.format.open_memmap(folder / f"{name}_labels.npy", mode=mode, dtype=np.int64,
                                       shape=(count,) if create else None)
    valid = np.lib.format.open_memmap(folder / f"{name}_valid.npy", mode=mode, dtype=np.uint8,
                                      shape=(count,) if create else None)
    return rows, labels, valid


def built_with(folder: Path) -> str:
    """The engine that extracted a complete cache's features (caches from before engines were recorded: torch)."""
    try:
        return str(json.loads((folder / "complete.json").read_text()).get("runtime", "torch"))
    except (OSError, ValueError, AttributeError):
        return "torch"


def load_split(folder: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows and labels of one cached split, without the rows of images that could not be decoded."""
    rows = np.load(folder / f"{name}_features.npy", mmap_mode="r")
    labels = np.load(folder / f"{name}_labels.npy", mmap_mode="r")
    valid = np.load(folder / f"{name}_valid.npy").astype(bool)
    if valid.all():
        return rows, np.asarray(labels)
    return rows[valid], np.asarray(labels)[valid]
