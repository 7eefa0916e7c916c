"""Classify images, and evaluate a model file (ours, any format `load_model` reads, or an exported .onnx) on a
folder of class folders."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mobilenetv2.checkpoint import load_model
from mobilenetv2.config import Preprocess
from mobilenetv2.data.folders import (DECODE_ERRORS, class_folders, decode_rgb, eval_loader, find_val_folder,
                                      image_folder, pad_class_names)
from mobilenetv2.data.transforms import eval_transform
from mobilenetv2.errors import CheckpointError, DataError, UserError, first_line
from mobilenetv2.evaluation import EvalResult, evaluate, ranked
from mobilenetv2.metadata import FORMAT_NAME, parse
from mobilenetv2.model import MobileNetV2


def imagenet_class_names() -> list[str]:
    text = resources.files("mobilenetv2").joinpath("resources/imagenet_classes.txt").read_text()
    return [line for line in text.splitlines() if line]


@dataclass
class Classifier:
    """A forward function over normalised batches, with the contract and names that go with it."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    num_classes: int
    preprocess: Preprocess
    class_names: list[str] | None


def _names_or_imagenet(names: list[str] | None, num_classes: int) -> list[str] | None:
    return names or (imagenet_class_names() if num_classes == 1000 else None)


def as_classifier(model: MobileNetV2) -> Classifier:
    """A network (fresh or loaded) as a Classifier; a 1000-class one without names gets the ImageNet-1k names."""
    model.eval()
    return Classifier(model, model.num_classes, model.preprocess,
                      _names_or_imagenet(model.class_names, model.num_classes))


def load_classifier(path: str | os.PathLike, device: torch.device | None = None) -> Classifier:
    path = Path(path)
    if path.suffix == ".onnx":
        return _onnx_classifier(path)
    model = load_model(path)
    return as_classifier(model.to(device) if device is not None else model)


MAX_ONNX_BYTES = 2 << 30  # protobuf's own limit for one message


def _onnx_classifier(path: Path) -> Classifier:
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise CheckpointError("reading .onnx files needs onnx and onnxruntime: pip install 'mobilenetv2[export]'") from None
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size > MAX_ONNX_BYTES:
        raise CheckpointError(f"{path}: {path.stat().st_size} bytes is more than the {MAX_ONNX_BYTES} an ONNX file "
                              "can hold")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for foreign bytes
        raise CheckpointError(f"{path}: not a readable ONNX file ({type(exc).__name__})") from None
    try:
        properties = {entry.key: entry.value for entry in proto.metadata_props}
    except ValueError as exc:  # a property that is not UTF-8 (UnicodeDecodeError)
        raise CheckpointError(f"{path}: its metadata is not text ({first_line(exc, 120)})") from None
    if FORMAT_NAME not in properties:
        raise CheckpointError(f"{path}: an ONNX file without mobilenetv2 metadata (export it with 'mobilenetv2 export')")
    try:
        meta = parse(json.loads(properties[FORMAT_NAME]), str(path))
    except (ValueError, TypeError):  # not JSON, or not even UTF-8
        raise CheckpointError(f"{path}: its mobilenetv2 metadata is not a JSON record") from None
    num_classes = meta.architecture.get("num_classes")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise CheckpointError(f"{path}: its mobilenetv2 metadata has no class count")
    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        batch_dim = session.get_inputs()[0].shape[0]
    except Exception as exc:  # noqa: BLE001 - onnxruntime's Fail, InvalidGraph, InvalidArgument, ...
        raise CheckpointError(f"{path}: onnxruntime cannot load it ({first_line(exc, 160)})") from None
    static_batch = batch_dim if isinstance(batch_dim, int) and batch_dim > 0 else None

    def run(images: np.ndarray) -> np.ndarray:
        try:
            return session.run(["logits"], {"input": images})[0]
        except Exception as exc:  # noqa: BLE001 - a graph that loads may still fail on its first input
            raise CheckpointError(f"{path}: onnxruntime cannot run it ({first_line(exc, 160)})") from None

    def forward(images: torch.Tensor) -> torch.Tensor:
        images = images.cpu().numpy()
        if static_batch is None:
            return torch.from_numpy(run(images))
        chunks = []  # a fixed-batch export runs chunk by chunk, the last one zero-padded
        for start in range(0, len(images), static_batch):
            chunk = images[start:start + static_batch]
            padded = np.concatenate([chunk, np.zeros((static_batch - len(chunk), *chunk.shape[1:]), chunk.dtype)])
            chunks.append(run(padded)[: len(chunk)])
        return torch.from_numpy(np.concatenate(chunks))

    return Classifier(forward, num_classes, meta.preprocess, _names_or_imagenet(meta.class_names, num_classes))


def read_image(path: str | os.PathLike):
    """An RGB PIL image; a missing or undecodable file is a DataError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image not found: {path}")
    try:
        return decode_rgb(path)
    except DECODE_ERRORS as exc:
        raise DataError(f"{path}: not a readable image ({exc.__class__.__name__}: {str(exc)[:120]})") from None


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
            inputs.append(transform(read_image(path)))
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


def eval_folder(root: str | os.PathLike) -> Path:
    """The folder of class folders to evaluate: DIR/val (or the seed's validation_preprocess), else DIR itself."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    return find_val_folder(root) or root


def labelled_dataset(classifier: Classifier, folder: Path, transform):
    """The folder's images, labelled with the classifier's own class indices (by name when it has names)."""
    classes = class_folders(folder)
    names = classifier.class_names
    if names:
        unknown = [c for c in classes if c not in names]
        if unknown:
            raise DataError(f"{folder} has classes the model does not know: {', '.join(unknown[:5])}")
        return image_folder(folder, transform, names)
    if len(classes) > classifier.num_classes:
        raise DataError(f"{folder} has {len(classes)} classes, the model {classifier.num_classes}")
    return image_folder(folder, transform, pad_class_names(classes, classifier.num_classes))


def evaluate_checkpoint(checkpoint: str | os.PathLike, folder: str | os.PathLike, runtime, *, batch_size: int = 100,
                        workers: int = 2, resize_mode: str | None = None) -> tuple[EvalResult, list[str]]:
    """Top-1/top-5/confusion of a checkpoint (or .onnx) on a folder of class folders; this rank's shard under
    torchrun, counts summed over ranks. Returns the result and the class names its rows follow."""
    classifier = load_classifier(checkpoint, runtime.device)
    preprocess = classifier.preprocess
    if resize_mode:
        preprocess = dataclasses.replace(preprocess, resize_mode=resize_mode)
    dataset = labelled_dataset(classifier, Path(folder), eval_transform(preprocess))
    loader = eval_loader(dataset, batch_size, workers, runtime.rank, runtime.world_size)
    return evaluate(classifier.forward, loader, runtime, classifier.num_classes), dataset.classes


@dataclass
class Agreement:
    """Per-image top-1 of two models on the same images."""

    count: int
    agree: int
    a_correct: int
    b_correct: int
    only_a_correct: int  # images A gets right and B gets wrong
    only_b_correct: int

    @property
    def flips(self) -> int:
        return self.count - self.agree

    def __str__(self) -> str:
        n = self.count
        return (f"top-1 agreement {self.agree}/{n} ({self.agree / n:.2%}): {self.flips} predictions flip; "
                f"A top-1 {self.a_correct / n:.4f}, B top-1 {self.b_correct / n:.4f}; only A right "
                f"{self.only_a_correct}, only B right {self.only_b_correct}")


@torch.no_grad()
def compare_models(a: str | os.PathLike, b: str | os.PathLike, folder: str | os.PathLike, *, batch_size: int = 100,
                   workers: int = 2) -> Agreement:
    """How many val images the two models (any formats: .pt, .onnx, int8 .onnx, ...) classify alike. Both must
    share preprocessing and class names, so every image goes through both as the same tensor."""
    first, second = load_classifier(a), load_classifier(b)
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
    return Agreement(*map(int, counts))
