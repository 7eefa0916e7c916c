"""What the loop trains on, in one shape for every mode: a `TrainTask` holds the module that maps batch inputs to
logits, the batches of an epoch (resumable mid-epoch), the steps per epoch and the per-epoch evaluation.

Four builders, one signature `(config, model, splits, runtime, output) -> TrainTask | None`:
`image_task` (a DataLoader over image files, decoded and augmented with PIL), `device_task` (workers read bytes, the
training device decodes and augments each batch), `memory_task` (a small dataset decoded once, augmented per batch)
and `feature_task` (the head alone, on cached backbone features; None on ranks that only helped extract them).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

from mobilenetv2.config import TrainConfig
from mobilenetv2.data import augment, batched, folders, on_device
from mobilenetv2.data.transforms import eval_transform, train_transform
from mobilenetv2.errors import UserError
from mobilenetv2.evaluation import EvalResult, evaluate
from mobilenetv2.model import MobileNetV2
from mobilenetv2.runtime import Runtime
from mobilenetv2.training import head_cache
from mobilenetv2.training.balance import BalancedSampler
from mobilenetv2.training.distill import CachedLogits
from mobilenetv2.training.schedule import resolution_for


@dataclass
class TrainTask:
    """The loop's inputs."""

    trainable: nn.Module  # batch inputs -> logits (DDP-wrapped where the loop runs distributed)
    model: MobileNetV2  # the full network that checkpoints hold
    train_batches: Callable[[int, int], Iterable]  # (epoch, batches to skip) -> (inputs, labels, skipped)
    steps_per_epoch: int
    evaluate: Callable[[nn.Module], EvalResult] | None  # full network (or its EMA) -> metrics on val
    runtime: Runtime  # where the loop runs (the head-only task trains on one process)
    notes: list[str] = field(default_factory=list)
    class_counts: np.ndarray | None = None  # training images per output (class weights 'auto' need them)
    teacher: nn.Module | None = None  # head-only distillation: the teacher's logits, read from each batch's rows
    train_size: Callable[[int], int] | None = None  # epoch -> the training crop's size (None: features, no crop)


class _SkipSampler(Sampler[int]):
    """Drops the first `skip` indices of a sampler's order (resuming mid-epoch)."""

    def __init__(self, sampler: Sampler[int], skip: int):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        iterator = iter(self.sampler)
        for _ in range(self.skip):
            next(iterator, None)
        return iterator

    def __len__(self) -> int:
        return max(len(self.sampler) - self.skip, 0)


class _SeededSamples(Dataset):
    """Each item's augmentation drawn from its own seed (run seed, rank, epoch, position in the rank's epoch),
    without touching the global random streams (torch's, and Python's and NumPy's, which timm's RandAugment draws
    from): the same for any worker count, and the same after a resume in the middle of an epoch. The position, not
    the index, makes the seed, so the copies of an image under repeated augmentation draw apart."""

    def __init__(self, dataset: Dataset, seed: int, rank: int):
        self.dataset, self.seed, self.epoch = dataset, seed * 1_009 + rank, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        position, index = item
        seed = ((self.seed * 1_000_003 + self.epoch) * 10_000_019 + position) % (1 << 63)
        return augment.seeded_call(seed, self.dataset.__getitem__, index)


class _Positioned(Sampler[tuple[int, int]]):
    """(position in the epoch, index) pairs of a sampler's order."""

    def __init__(self, sampler: Sampler[int]):
        self.sampler = sampler

    def __iter__(self):
        return enumerate(self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class _RepeatedAugmentation(Sampler[int]):
    """timm's RepeatAugSampler (DeiT's): each index `repeats` times in a row, the copies dealt to ranks in turn, each
    rank's share cut to about length / ranks per epoch. timm seeds its shuffle with the epoch alone; the run's seed
    is folded into the epoch it is given, so different seeds shuffle apart."""

    def __init__(self, length: int, repeats: int, runtime: Runtime, seed: int):
        try:
            from timm.data.distributed_sampler import RepeatAugSampler
        except ImportError:
            raise UserError("`repeated_aug` uses timm's sampler: pip install 'mobilenetv2[recipes]'") from None
        self.sampler = RepeatAugSampler(range(length), num_replicas=runtime.world_size, rank=runtime.rank,
                                        shuffle=True, num_repeats=repeats)
        self.seed = seed

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(self.seed * 1_000_003 + epoch)

    def __iter__(self):
        return iter(self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


def _train_sampler(labels, config: TrainConfig, runtime: Runtime) -> tuple[Sampler[int], bool, int]:
    """This rank's shuffled share of the items labelled `labels` (with repeated augmentation, or drawn class-balanced,
    when asked), whether to drop the remainder, and the steps per epoch.

    The seed drops the remainder; a set smaller than one batch keeps its single batch.
    """
    length = len(labels)
    if config.balanced_sampler:
        sampler = BalancedSampler(np.asarray(labels), config.seed, runtime.rank, runtime.world_size)
    elif config.repeated_aug > 1:
        sampler = _RepeatedAugmentation(length, config.repeated_aug, runtime, config.seed)
    else:
        sampler = DistributedSampler(range(length), num_replicas=runtime.world_size, rank=runtime.rank, shuffle=True,
                                     seed=config.seed, drop_last=False)
    drop_last = len(sampler) >= config.batch_size
    return sampler, drop_last, len(sampler) // config.batch_size if drop_last else 1


def _epoch_loader(dataset, sampler: Sampler[int], drop_last: bool, config: TrainConfig, runtime: Runtime,
                  collate, epoch: int, skip: int, positioned: bool = False) -> DataLoader:
    """One epoch of training batches from files, `skip` batches in (a resumed epoch); the loader's own seed comes
    from (seed, epoch), never from the global random stream. `positioned`: the dataset takes (position, index)."""
    sampler.set_epoch(epoch)
    order = _Positioned(sampler) if positioned else sampler
    return DataLoader(dataset, batch_size=config.batch_size, sampler=_SkipSampler(order, skip * config.batch_size),
                      num_workers=config.workers, collate_fn=collate, pin_memory=runtime.device.type == "cuda",
                      drop_last=drop_last, persistent_workers=False,
                      generator=torch.Generator().manual_seed(config.seed + epoch))


def _counts(labels, model: MobileNetV2) -> np.ndarray:
    """Training images per output of the model's head."""
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=model.num_classes)


def _known_classes(model: MobileNetV2, splits: folders.DatasetSplits) -> list[str]:
    """The class names that have folders (the head may have more outputs)."""
    return model.class_names[: len(splits.classes)]


def image_task(config: TrainConfig, model: MobileNetV2, splits: folders.DatasetSplits, runtime: Runtime,
               output: Path) -> TrainTask:
    """Train the whole network (or what requires grad) on images through a DataLoader."""
    known = _known_classes(model, splits)
    policy = augment.image_policy(config, model.preprocess)
    sizes = resolution_for(config)
    transform = train_transform(model.preprocess, config.min_scale, config.color_jitter, normalized=False,
                                crop_size=sizes(0), policy=policy)
    train_set = _SeededSamples(folders.image_folder(splits.train, transform, known), config.seed, runtime.rank)
    targets = train_set.dataset.targets
    sampler, drop_last, steps = _train_sampler(targets, config, runtime)
    pin = runtime.device.type == "cuda"

    def batches(epoch: int, skip: int):  # uint8 from the workers, normalised on the device
        # set before the epoch's loader starts its workers, which take a copy of the dataset
        train_set.epoch, transform.geometry.size = epoch, sizes(epoch)
        loader = _epoch_loader(train_set, sampler, drop_last, config, runtime, folders.collate_skipping, epoch, skip,
                               positioned=True)
        for images, labels, skipped in loader:
            if len(labels):
                images = batched.normalize_bytes(runtime.to_input(images), model.preprocess)
            yield images, labels, skipped

    evaluate_fn = None
    if splits.val is not None and config.eval_every:
        val_set = folders.image_folder(splits.val, eval_transform(model.preprocess), known)
        val_loader = folders.eval_loader(val_set, config.batch_size, config.workers, runtime.rank, runtime.world_size,
                                         pin)

        def evaluate_fn(network: nn.Module) -> EvalResult:
            return evaluate(network, val_loader, runtime, model.num_classes)

    return TrainTask(runtime.wrap_distributed(model), model, batches, steps, evaluate_fn, runtime,
                     class_counts=_counts(targets, model), train_size=sizes)


def device_task(config: TrainConfig, model: MobileNetV2, splits: folders.DatasetSplits, runtime: Runtime,
                output: Path) -> TrainTask:
    """Train on images that DataLoader workers only read; the training device decodes and augments each batch."""
    known = _known_classes(model, splits)
    train_set = folders.image_folder(splits.train, None, known, kind=on_device.EncodedFolder)
    sampler, drop_last, steps = _train_sampler(train_set.targets, config, runtime)
    sizes = resolution_for(config)
    train_augment = on_device.DeviceTrainAugment(model.preprocess, config.min_scale, config.color_jitter, sizes(0),
                                                 augment.image_policy(config, model.preprocess))
    pin = runtime.device.type == "cuda"

    def batches(epoch: int, skip: int):
        train_augment.size = sizes(epoch)
        loader = _epoch_loader(train_set, sampler, drop_last, config, runtime, on_device.collate_encoded, epoch, skip)
        return on_device.on_device(loader, train_augment, runtime.device)

    evaluate_fn = None
    if splits.val is not None and config.eval_every:
        val_set = folders.image_folder(splits.val, None, known, kind=on_device.EncodedFolder)
        val_loader = folders.eval_loader(val_set, config.batch_size, config.workers, runtime.rank, runtime.world_size,
                                         pin, collate=on_device.collate_encoded)
        transform = on_device.DeviceEvalTransform(model.preprocess)

        def evaluate_fn(network: nn.Module) -> EvalResult:
            return evaluate(network, on_device.on_device(val_loader, transform, runtime.device), runtime,
                            model.num_classes)

    return TrainTask(runtime.wrap_distributed(model), model, batches, steps, evaluate_fn, runtime,
                     notes=[f"data backend device: batches decoded and augmented on {runtime.device}"],
                     class_counts=_counts(train_set.targets, model), train_size=sizes)


def memory_task(config: TrainConfig, model: MobileNetV2, splits: folders.DatasetSplits, runtime: Runtime,
                output: Path) -> TrainTask:
    """Train on a dataset decoded once into memory, augmenting whole batches (no per-image DataLoader work)."""
    preprocess, known = model.preprocess, _known_classes(model, splits)
    images, labels, skipped = batched.decode_all(folders.image_folder(splits.train, None, known,
                                                                       exif=preprocess.upright),
                                                 preprocess.resize_size, config.workers)
    sizes = resolution_for(config)
    train_augment = batched.BatchAugment(preprocess, config.min_scale, config.color_jitter, sizes(0),
                                         augment.image_policy(config, preprocess))
    sampler, drop_last, steps = _train_sampler(labels.numpy(), config, runtime)

    def batches(epoch: int, skip: int):
        sampler.set_epoch(epoch)
        train_augment.size = sizes(epoch)
        order = torch.tensor(list(sampler))
        for start in range(skip * config.batch_size, steps * config.batch_size if drop_last else len(order),
                           config.batch_size):
            index = order[start:start + config.batch_size]
            yield train_augment(images[index]), labels[index], skipped if start == 0 else 0

    evaluate_fn = None
    if splits.val is not None and config.eval_every:
        val_set = folders.image_folder(splits.val, eval_transform(preprocess), known)
        val_images, val_labels, val_skipped = batched.collect_tensors(val_set, config.workers)
        shard = torch.arange(runtime.rank, len(val_labels), runtime.world_size)

        def evaluate_fn(network: nn.Module) -> EvalResult:
            chunks = ((val_images[i], val_labels[i], 0) for i in shard.split(max(config.batch_size, 256)))
            result = evaluate(network, chunks, runtime, model.num_classes)
            result.skipped += val_skipped
            return result

    return TrainTask(runtime.wrap_distributed(model), model, batches, steps, evaluate_fn, runtime,
                     notes=[f"{len(labels)} training images decoded into memory at {preprocess.resize_size} px"],
                     class_counts=_counts(labels.numpy(), model), train_size=sizes)


class HeadOnFeatures(nn.Module):
    """Pooled features -> logits through the network's own head (what the loop trains in head-only mode). Rows
    may carry more columns after the features (a teacher's cached logits); the head reads the first `features`."""

    def __init__(self, head: nn.Module, features: int):
        super().__init__()
        self.head, self.features = head, features

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.head.classify(pooled[:, :self.features])


def _feature_batches(rows: np.ndarray, labels: np.ndarray, batch_size: int, order: np.ndarray):
    for start in range(0, len(order), batch_size):
        index = np.sort(order[start:start + batch_size])  # sorted reads are sequential in the memmap
        yield torch.from_numpy(np.ascontiguousarray(rows[index])), torch.from_numpy(labels[index]), 0


def feature_task(config: TrainConfig, model: MobileNetV2, splits: folders.DatasetSplits, runtime: Runtime,
                 output: Path, teacher=None) -> TrainTask | None:
    """Extract (split across ranks) or reuse the feature cache, then train the head on the main process only. A
    `teacher` (Teacher, TeacherFile) runs during extraction; its logits are cached beside the features, and the
    task's `teacher` reads them back from each batch."""
    head_cache.freeze_backbone(model)
    preprocess, known = model.preprocess, _known_classes(model, splits)
    datasets = {"train": folders.image_folder(splits.train, eval_transform(preprocess), known)}
    if splits.val is not None and config.eval_every:
        datasets["val"] = folders.image_folder(splits.val, eval_transform(preprocess), known)
    augmented = None
    if config.feature_views > 1:
        augmented = folders.image_folder(splits.train, train_transform(preprocess, config.min_scale,
                                                                       config.color_jitter), known)
    root = Path(config.feature_cache) if config.feature_cache else output / "feature_cache"
    folder, reused = head_cache.build_cache(model, datasets, augmented, config, runtime, root,
                                            (teacher[0], teacher[1].sha256) if teacher else None)
    if not runtime.is_main:
        return None
    local = dataclasses.replace(runtime, rank=0, world_size=1)  # the head is trained once, here
    rows, labels = head_cache.load_split(folder, "train")
    views = config.feature_views
    images = len(labels) // views if views > 1 else len(labels)
    steps = max(images // config.batch_size, 1)
    balanced = BalancedSampler(labels[::views], config.seed) if config.balanced_sampler else None

    def batches(epoch: int, skip: int):
        generator = np.random.default_rng([config.seed, epoch])
        if config.balanced_sampler:  # images drawn class-balanced, with replacement
            balanced.set_epoch(epoch)
            order = np.array(list(balanced)) * views + (generator.integers(0, views, images) if views > 1 else 0)
        elif views > 1:  # one random view of each image per epoch
            order = generator.permutation(np.arange(images) * views + generator.integers(0, views, images))
        else:
            order = generator.permutation(len(labels))
        order = order[: steps * config.batch_size] if len(order) >= config.batch_size else order
        return _feature_batches(rows, labels, config.batch_size, order[skip * config.batch_size:])

    evaluate_fn = None
    if "val" in datasets:
        val_rows, val_labels = head_cache.load_split(folder, "val")

        def evaluate_fn(network: MobileNetV2) -> EvalResult:
            val_batches = _feature_batches(val_rows, val_labels, config.batch_size, np.arange(len(val_labels)))
            return evaluate(network.head.classify, val_batches, local, model.num_classes)

    return TrainTask(HeadOnFeatures(model.head, model.num_features), model, batches, steps, evaluate_fn, local,
                     teacher=CachedLogits(model.num_features) if teacher else None,
                     notes=[f"feature cache {'reused' if reused else 'built'}: {folder} ({len(labels)} train rows, "
                            f"backbone run by {head_cache.built_with(folder)})"],
                     class_counts=_counts(labels[::views], model))


def build_task(config: TrainConfig, model: MobileNetV2, splits: folders.DatasetSplits, runtime: Runtime,
               output: Path, teacher=None) -> TrainTask | None:
    """The task for the config's mode; the head-only one caches a `teacher`'s logits with the features."""
    if config.freeze == "backbone":
        return feature_task(config, model, splits, runtime, output, teacher)
    if config.in_memory:
        builder = memory_task
    else:
        builder = device_task if config.data_backend == "device" else image_task
    return builder(config, model, splits, runtime, output)
