"""Exports: ONNX, TorchScript and MindSpore `.ckpt`, each checked against the eager model after writing.

ONNX and TorchScript files carry the preprocessing contract and the class names as metadata.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mobilenetv2.checkpoint import atomic_write_bytes
from mobilenetv2.errors import UserError
from mobilenetv2.model import MobileNetV2

TOLERANCE = 1e-4
METADATA_KEY = "mobilenetv2"
FORMATS = ("onnx", "torchscript", "mindspore")


class ExportCheckError(Exception):
    """The written file disagrees with the eager model beyond the tolerance."""


class WithSoftmax(nn.Module):
    """Logits and probabilities, as the seed's exported graph ends in a Softmax."""

    def __init__(self, model: MobileNetV2):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor):
        logits = self.model(images)
        return logits, torch.softmax(logits, dim=1)


def export_metadata(model: MobileNetV2) -> dict:
    return {"format": METADATA_KEY, "num_classes": model.num_classes, "width_mult": model.width_mult,
            "class_names": getattr(model, "class_names", None),
            "preprocess": model.preprocess.to_dict()}


def check_images(model: MobileNetV2, batch: int) -> torch.Tensor:
    """A batch of real photos (scikit-image, if installed) preprocessed by the model's own contract."""
    from PIL import Image

    from mobilenetv2.data import eval_transform

    try:
        from skimage import data as photos

        arrays = [photos.astronaut(), photos.chelsea(), photos.coffee(), photos.rocket()]
    except ImportError:  # a deterministic textured image when scikit-image is absent
        grid = np.indices((300, 400)).sum(0)
        arrays = [np.stack([(grid * k) % 255 for k in (3, 5, 7)], -1).astype(np.uint8)]
    transform = eval_transform(model.preprocess)
    return torch.stack([transform(Image.fromarray(arrays[i % len(arrays)])) for i in range(batch)])


def _compare(expected: torch.Tensor, actual, what: str) -> float:
    difference = float(np.abs(expected.detach().numpy() - np.asarray(actual)).max())
    if not difference <= TOLERANCE:
        raise ExportCheckError(f"{what} differs from eager PyTorch by {difference:.3g} (> {TOLERANCE})")
    return difference


def export_onnx(model: MobileNetV2, output: Path, *, batch_size: int = 1, dynamic_batch: bool = False,
                with_softmax: bool = False) -> list[str]:
    import onnx

    network = (WithSoftmax(model) if with_softmax else model).eval()
    size = model.preprocess.image_size
    example = torch.zeros(batch_size, 3, size, size)
    outputs = ["logits", "probs"] if with_softmax else ["logits"]
    dynamic_axes = {name: {0: "batch"} for name in ["input", *outputs]} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(network, (example,), str(output) + ".tmp", input_names=["input"], output_names=outputs,
                          dynamic_axes=dynamic_axes, opset_version=17, dynamo=False)
    temp = Path(str(output) + ".tmp")
    proto = onnx.load(str(temp))
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(export_metadata(model))
    proto.doc_string = "MobileNetV2 (mobilenetv2): input N x 3 x H x W float32, normalised as in metadata"
    temp.unlink()
    atomic_write_bytes(output, proto.SerializeToString())
    return _check_onnx(model, output, batch_size, dynamic_batch, with_softmax)


def _check_onnx(model, output, batch_size, dynamic_batch, with_softmax) -> list[str]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    return _check_against_eager(model, lambda images: session.run(None, {"input": images.numpy()}), batch_size,
                                dynamic_batch, with_softmax, "onnxruntime", "ONNX")


def _check_against_eager(model: MobileNetV2, run, batch_size: int, dynamic_batch: bool, with_softmax: bool,
                         runner: str, what: str) -> list[str]:
    """Run the written file (`run(images)` -> outputs, logits first) on real photos and compare with eager."""
    reports = []
    for batch in sorted({batch_size, 3} if dynamic_batch else {batch_size}):
        images = check_images(model, batch)
        with torch.no_grad():
            expected = model(images)
            results = run(images)
        difference = _compare(expected, results[0], f"{what} logits at batch {batch}")
        if with_softmax:
            _compare(torch.softmax(expected, 1), results[1], f"{what} probs at batch {batch}")
        reports.append(f"{runner} vs eager, batch {batch}: max abs difference {difference:.3g}")
    return reports


def export_torchscript(model: MobileNetV2, output: Path, *, batch_size: int = 1, dynamic_batch: bool = False,
                       with_softmax: bool = False) -> list[str]:
    network = (WithSoftmax(model) if with_softmax else model).eval()
    size = model.preprocess.image_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.trace(network, torch.zeros(batch_size, 3, size, size))
        temp = Path(str(output) + ".tmp")
        torch.jit.save(scripted, str(temp), _extra_files={"mobilenetv2.json": json.dumps(export_metadata(model))})
        temp.replace(output)
        loaded = torch.jit.load(str(output))

    def run(images):
        outputs = loaded(images)
        return [output.detach() for output in outputs] if with_softmax else [outputs.detach()]

    return _check_against_eager(model, run, batch_size, dynamic_batch, with_softmax, "torch.jit.load", "TorchScript")


def export_mindspore(model: MobileNetV2, output: Path, **_unused) -> list[str]:
    """The seed's key layout (`features.*`, `dense.*`) in MindSpore's protobuf format; read back and compared."""
    from mobilenetv2.checkpoint import read_weights
    from mobilenetv2.interop import keymaps, mindspore

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tensors = {k: v.numpy() for k, v in keymaps.to_mindspore_keys(state).items()}
    mindspore.write_checkpoint(tensors, output)
    back = read_weights(output).state_dict
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        if not torch.equal(back[key], value):
            raise ExportCheckError(f"MindSpore checkpoint tensor {key} does not read back bit-exactly")
    return [f"MindSpore checkpoint read back bit-exactly ({len(tensors)} tensors)"]


def export(model: MobileNetV2, fmt: str, output: Path, **options) -> list[str]:
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    output.parent.mkdir(parents=True, exist_ok=True)
    return {"onnx": export_onnx, "torchscript": export_torchscript, "mindspore": export_mindspore}[fmt](
        model.eval(), output, **options)
