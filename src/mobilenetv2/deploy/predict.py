"""Classify images, and evaluate a model file (ours, any format `load_model` reads, or an exported .onnx) on a
folder of class folders, each run by the engine `engines.choose` picks (or the one asked for)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mobilenetv2.data.folders import (DECODE_ERRORS, class_folders, decode_rgb, eval_loader, find_val_folder,
                                      image_folder, model_class_order)
from mobilenetv2.data.shard_source import ShardSet, find_shard_splits, is_shard_source
from mobilenetv2.data.transforms import eval_transform
from mobilenetv2.engines.choose import Classifier, as_classifier, imagenet_class_names, load_classifier
from mobilenetv2.errors import DataError, UserError
from mobilenetv2.evaluation import TTA_MODES, EvalResult, evaluate, ranked, with_tta
from mobilenetv2.model import MobileNetV2
from mobilenetv2.training.shard_task import shard_eval

__all__ = ["Classifier", "as_classifier", "imagenet_class_names", "load_classifier", "predict", "evaluate_checkpoint",
           "compare_models", "eval_folder", "read_image"]


def read_image(path: str | os.PathLike, exif: bool = True):
    """An RGB PIL image, upright by its EXIF orientation unless `exif` is False; a missing or undecodable file is a
    DataError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image not found: {path}")
    try:
        return decode_rgb(path, exif)
    except DECODE_ERRORS as exc:
        raise DataError(f"{path}: not a readable image ({exc.__class__.__name__}: {str(exc)[:120]})") from None


def _prepared(transform, image, path) -> torch.Tensor:
    """`image` through the eval transform; one it refuses (a resize too long) is a DataError naming `path`."""
    try:
        return transform(image)
    except DECODE_ERRORS as exc:
        raise DataError(f"{path}: {exc}") from None


@torch.no_grad()
def predict(classifier: Classifier | MobileNetV2, images: list[str | os.PathLike], topk: int = 5,
            skip_unreadable: bool = False) -> list[dict]:
    """Top-k classes with probabilities for each image, most likely first, in the order given. An unreadable image
    raises DataError, or with `skip_unreadable` gets an entry {"image", "error"} and the others are still answered."""
    if isinstance(classifier, MobileNetV2):
        classifier = as_classifier(classifier)
    transform = eval_transform(classifier.preprocess)
    inputs, results = [], []
    for path in images:
        try:
            inputs.append(_prepared(transform, read_image(path, classifier.preprocess.upright), path))
            results.append({"image": str(path)})
        except DataError as exc:
            if not skip_unreadable:
                raise
            results.append({"image": str(path), "error": str(exc)})
    answered = [result for result in results if "error" not in result]
    if not answered:
        return results
    probabilities = torch.softmax(classifier.forward(torch.stack(inputs)).float(), dim=1)
    indices = ranked(probabilities, topk)
    values = probabilities.gather(1, indices)
    names = classifier.class_names or [str(i) for i in range(classifier.num_classes)]
    for result, row_values, row_indices in zip(answered, values.tolist(), indices.tolist()):
        result["predictions"] = [{"class": names[i], "index": int(i), "probability": float(p)}
                                 for p, i in zip(row_values, row_indices)]
    return results


@dataclass(frozen=True)
class ShardEval:
    """Shards to evaluate on: the validation split of a shard source (else its train split)."""

    shards: ShardSet
    classes: list[str]
    skip_bad: bool = False

    def __str__(self) -> str:
        return f"{len(self.shards.urls)} {self.shards.split} shards ({self.shards.num_samples} samples)"


def eval_folder(root: str | os.PathLike, shard_info: str = "", skip_bad_shards: bool = False) -> Path | ShardEval:
    """The folder of class folders to evaluate: DIR/val (or the seed's validation_preprocess), else DIR itself; or,
    for a shard source, its validation shards (else its train shards)."""
    if is_shard_source(str(root)):
        splits = find_shard_splits(str(root), shard_info)
        return ShardEval(splits.val or splits.train, splits.classes, skip_bad_shards)
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    return find_val_folder(root) or root


def labelled_dataset(classifier: Classifier, folder: Path, transform, **kind):
    """The folder's images, labelled with the classifier's own class indices (by name when it has names)."""
    names = model_class_order(class_folders(folder), classifier.class_names, classifier.num_classes, str(folder))
    return image_folder(folder, transform, names, **kind)


DATA_BACKENDS = ("pil", "device")


def evaluate_checkpoint(checkpoint: str | os.PathLike, folder: str | os.PathLike | ShardEval, runtime, *, batch_size: int = 100,
                        workers: int = 2, resize_mode: str | None = None, runtime_name: str = "auto",
                        data_backend: str = "pil", tta: str = "none", exif: str | None = None,
                        precision: str = "auto") -> tuple[EvalResult, list[str], Classifier]:
    """Top-1/top-5/confusion of a checkpoint (or .onnx) on a folder of class folders; this rank's shard under
    torchrun, counts summed over ranks. `data_backend` pil decodes in the loader's workers; device decodes each batch
    on the runtime's device (nvJPEG on a GPU), as training's. `tta` averages the logits of views of each image
    (evaluation.with_tta; flip-crops cuts its crops from the whole resized square). `resize_mode` and `exif` replace
    the checkpoint's own; `precision` bf16 runs OpenVINO's bf16 (engines.choose.load_classifier). Returns the result,
    the class names its rows follow and the classifier (its `runtime` names the engine that ran)."""
    from mobilenetv2.data import on_device

    if data_backend not in DATA_BACKENDS:
        raise UserError(f"`data_backend` must be one of {', '.join(DATA_BACKENDS)}, got {data_backend!r}")
    if tta not in TTA_MODES:
        raise UserError(f"`tta` must be one of {', '.join(TTA_MODES)}, got {tta!r}")
    classifier = load_classifier(checkpoint, runtime.device, runtime_name, batch_size, runtime, precision)
    preprocess = classifier.preprocess
    if resize_mode:
        preprocess = dataclasses.replace(preprocess, resize_mode=resize_mode)
    if exif:  # EXIF orientation applied or ignored, whatever the checkpoint's contract says
        preprocess = dataclasses.replace(preprocess, exif=exif)
    forward = with_tta(classifier.forward, tta, preprocess.image_size)
    if tta == "flip-crops":  # the loader hands over the resized square; the crops are cut from it
        preprocess = dataclasses.replace(preprocess, image_size=preprocess.resize_size)
    if isinstance(folder, ShardEval):
        batches, names = shard_eval(folder.shards, folder.classes, classifier.class_names, classifier.num_classes,
                                    preprocess, data_backend, batch_size, workers, runtime, folder.skip_bad)
        return evaluate(forward, batches, runtime, classifier.num_classes), names, classifier
    if data_backend == "pil":
        dataset = labelled_dataset(classifier, Path(folder), eval_transform(preprocess))
        batches = eval_loader(dataset, batch_size, workers, runtime.rank, runtime.world_size)
    else:
        dataset = labelled_dataset(classifier, Path(folder), None, kind=on_device.EncodedFolder)
        loader = eval_loader(dataset, batch_size, workers, runtime.rank, runtime.world_size,
                             runtime.device.type == "cuda", collate=on_device.collate_encoded)
        batches = on_device.on_device(loader, on_device.DeviceEvalTransform(preprocess), runtime.device)
    return evaluate(forward, batches, runtime, classifier.num_classes), dataset.classes, classifier


@dataclass
class Agreement:
    """Per-image top-1 of two models on the same images."""

    count: int
    agree: int
    a_correct: int
    b_correct: int
    only_a_correct: int  # images A gets right and B gets wrong
    only_b_correct: int
    runtimes: tuple[str, str] = ("torch", "torch")  # the engine that ran A, and B's

    @property
    def flips(self) -> int:
        return self.count - self.agree

    def __str__(self) -> str:
        n = self.count
        return (f"top-1 agreement {self.agree}/{n} ({self.agree / n:.2%}): {self.flips} predictions flip; "
                f"A top-1 {self.a_correct / n:.4f}, B top-1 {self.b_correct / n:.4f}; only A right "
                f"{self.only_a_correct}, only B right {self.only_b_correct} (runtime A {self.runtimes[0]}, "
                f"B {self.runtimes[1]})")


@torch.no_grad()
def compare_models(a: str | os.PathLike, b: str | os.PathLike, folder: str | os.PathLike, *, batch_size: int = 100,
                   workers: int = 2, runtime_name: str = "auto") -> Agreement:
    """How many val images the two models (any formats: .pt, .onnx, int8 .onnx, ...) classify alike, each run by
    `runtime_name`'s engine. Both must share preprocessing and class names, so every image goes through both as the
    same tensor."""
    first, second = (load_classifier(path, runtime_name=runtime_name, batch_size=batch_size) for path in (a, b))
    if first.preprocess != second.preprocess:
        raise UserError(f"{a} and {b} preprocess differently; compare models with one preprocessing contract")
    if first.class_names != second.class_names or first.num_classes != second.num_classes:
        raise UserError(f"{a} and {b} have different classes")
    dataset = labelled_dataset(first, Path(folder), eval_transform(first.preprocess))
    counts = np.zeros(6, dtype=np.int64)
    for images, labels, _skipped in eval_loader(dataset, batch_size, workers):
        if not len(labels):
            continue
        top_a, top_b = (ranked(model.forward(images), 1)[:, 0].cpu() for model in (first, second))
        right_a, right_b = top_a == labels, top_b == labels
        counts += [len(labels), int((top_a == top_b).sum()), int(right_a.sum()), int(right_b.sum()),
                   int((right_a & ~right_b).sum()), int((right_b & ~right_a).sum())]
    if not counts[0]:
        raise DataError(f"{folder} holds no readable images")
    return Agreement(*map(int, counts), runtimes=(first.runtime, second.runtime))
