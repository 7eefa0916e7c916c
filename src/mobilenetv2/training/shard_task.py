"""The training task on tar shards (data/streams.py): the same `TrainTask` the other builders make, its batches
streamed from the train split's shards and its evaluation counting the validation split's samples once across ranks,
with either data backend (pil: workers decode and augment; device: workers hand over each sample's bytes from the
tar, the training device decodes and augments the batch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

from mobilenetv2.config import TrainConfig
from mobilenetv2.data import augment, batched, on_device, streams
from mobilenetv2.data.folders import collate_skipping, model_class_order
from mobilenetv2.data.shard_source import ShardSet, ShardSplits, check_local
from mobilenetv2.data.transforms import eval_transform, train_transform
from mobilenetv2.errors import DataError, UserError
from mobilenetv2.evaluation import EvalResult, evaluate
from mobilenetv2.model import MobileNetV2
from mobilenetv2.runtime import Runtime
from mobilenetv2.training.schedule import resolution_for
from mobilenetv2.training.tasks import TrainTask

STREAMING_REFUSES = {"in_memory": "--in-memory decodes an ImageFolder tree once; shards stream",
                     "balanced_sampler": "--balanced-sampler draws by index; a shard stream has no index",
                     "repeated_aug": "--repeated-aug repeats by index; a shard stream has no index"}


def check_shard_run(config: TrainConfig, splits: ShardSplits) -> None:
    """Refuse what streaming cannot do and local shards that are missing: checked before anything costly starts
    (the model, `--amp auto`'s timing)."""
    if config.freeze != "none":
        raise UserError("--freeze backbone caches features of an ImageFolder tree; train the head on shards with "
                        "--freeze none, or point --data at the images")
    for option, reason in STREAMING_REFUSES.items():
        if getattr(config, option) is True or getattr(config, option) > 1:
            raise UserError(reason)
    if splits.train is None:
        raise DataError(f"{splits.source} has no train shards")
    if config.class_weights == "auto" and splits.train.class_counts is None:
        raise UserError("--class-weights auto needs the manifest's class_counts (rewrite the shards with "
                        "`mobilenetv2 data shard`) or a weights file")
    if not config.skip_bad_shards:
        for shards in (splits.train, splits.val):
            if shards is not None:
                check_local(shards)


def val_stream(shards: ShardSet, num_classes: int, preprocess, backend: str, batch_size: int, workers: int,
               runtime: Runtime, skip_bad: bool, labels: list[int] | None = None) -> streams.ShardStream:
    """Every validation sample once across ranks and workers, decoded by `backend`; `labels` maps the manifest's
    class indices to the model's."""
    item = (streams.EncodedItem(labels) if backend == "device"
            else streams.PilItem(eval_transform(preprocess), labels))
    return streams.ShardStream(shards, num_classes, item, on_device.collate_encoded if backend == "device"
                               else collate_skipping, batch_size, training=False, streams=workers, rank=runtime.rank,
                               world_size=runtime.world_size, skip_bad=skip_bad)


def val_batches(stream: streams.ShardStream, preprocess, backend: str, workers: int, runtime: Runtime):
    loader = streams.checked(streams.stream_loader(stream, workers, runtime.device.type == "cuda"))
    if backend == "device":
        return on_device.on_device(loader, on_device.DeviceEvalTransform(preprocess), runtime.device)
    return loader


def shard_task(config: TrainConfig, model: MobileNetV2, splits: ShardSplits, runtime: Runtime,
               output: Path) -> TrainTask:
    """Train the whole network (or what requires grad) on the train split's shards."""
    check_shard_run(config, splits)  # again: a resumed run may have taken options back from its checkpoint
    train, classes, preprocess = splits.train, len(splits.classes), model.preprocess
    steps, batch = streams.steps_and_batch(train.num_samples, runtime.world_size, config.batch_size)
    policy = augment.image_policy(config, preprocess)
    device = config.data_backend == "device"
    sizes = resolution_for(config)
    if device:
        item, collate = streams.EncodedItem(), on_device.collate_encoded
        train_augment = on_device.DeviceTrainAugment(preprocess, config.min_scale, config.color_jitter, sizes(0),
                                                     policy)
    else:
        transform = train_transform(preprocess, config.min_scale, config.color_jitter, normalized=False,
                                    crop_size=sizes(0), policy=policy)
        item, collate = streams.PilItem(transform), collate_skipping
    stream = streams.ShardStream(train, classes, item, collate, batch, training=True, steps=steps,
                                 streams=config.workers, seed=config.seed, rank=runtime.rank,
                                 world_size=runtime.world_size, shuffle_buffer=config.shuffle_buffer,
                                 skip_bad=config.skip_bad_shards)
    pin = runtime.device.type == "cuda"

    def batches(epoch: int, skip: int):
        stream.epoch, stream.skip = epoch, skip
        if device:
            train_augment.size = sizes(epoch)
        else:  # before the epoch's loader starts its workers, which take a copy of the stream
            transform.geometry.size = sizes(epoch)
        loader = streams.checked(streams.stream_loader(stream, config.workers, pin))
        if device:
            yield from on_device.on_device(loader, train_augment, runtime.device)
            return
        for images, labels, skipped in loader:  # uint8 from the workers, normalised on the device
            if len(labels):
                images = batched.normalize_bytes(runtime.to_input(images), preprocess)
            yield images, labels, skipped

    evaluate_fn = None
    if splits.val is not None and config.eval_every:
        val = val_stream(splits.val, classes, preprocess, config.data_backend, config.batch_size, config.workers,
                         runtime, config.skip_bad_shards)

        def evaluate_fn(network: nn.Module) -> EvalResult:
            return evaluate(network, val_batches(val, preprocess, config.data_backend, config.workers, runtime),
                            runtime, model.num_classes)

    readers = runtime.world_size * max(config.workers, 1)
    notes = [f"shards: {len(train.urls)} train shards, {train.num_samples} samples, from {splits.source}; "
             f"{steps} steps of {batch} per rank, shuffle buffer {config.shuffle_buffer}"]
    if len(train.urls) < readers:
        notes.append(f"only {len(train.urls)} shards for {readers} readers (ranks x workers): some shards are read "
                     f"by several readers each epoch; write smaller shards (data shard --shard-size)")
    counts = None
    if train.class_counts is not None:
        counts = np.zeros(model.num_classes, dtype=np.int64)
        counts[:classes] = train.class_counts
    return TrainTask(runtime.wrap_distributed(model), model, batches, steps, evaluate_fn, runtime, notes=notes,
                     class_counts=counts, train_size=sizes)


def shard_eval(shards: ShardSet, classes: list[str], model_names: list[str] | None, num_classes: int, preprocess,
               backend: str, batch_size: int, workers: int, runtime: Runtime, skip_bad: bool):
    """(batches, class names the rows follow) for evaluating a model on shards labelled by `classes`: labels are
    mapped to the model's own class indices by name when it has names."""
    names = model_class_order(classes, model_names, num_classes, "the shard manifest")
    table = [names.index(c) for c in classes]
    if not skip_bad:
        check_local(shards)
    stream = val_stream(shards, len(classes), preprocess, backend, batch_size, workers, runtime, skip_bad,
                        labels=table)
    return val_batches(stream, preprocess, backend, workers, runtime), names
