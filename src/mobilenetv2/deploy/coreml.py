"""Core ML for iOS and macOS: an ML Program `.mlpackage` written by coremltools from `torch.export`, as a classifier
(outputs `classLabel` and `classLabel_probs`, softmax probabilities over the class names) taking `image`, an RGB
image of the model's size whose mean/std normalisation is inside the program. fp16 weights and arithmetic by default
(what the Neural Engine runs), fp32 on request. The metadata record rides in the package's user-defined metadata.

Core ML itself runs on Apple platforms only: on Linux coremltools converts and reloads but cannot predict. So the
check here reloads the package and verifies what Core ML would see (names, shapes, class labels, the operation
inventory against the network's layers), then runs the saved program's own operations and weights with torch's
kernels (`run_program`) and compares with eager PyTorch. That proves the file's graph and weights, not Apple's
kernels: the numbers on a device are not checked. coremltools is the [coreml] extra."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mobilenetv2.deploy.checks import FP16_TOLERANCE, fp16_weights_error
from mobilenetv2.engines.onnx_files import TOLERANCE, ExportCheckError, check_images, compare
from mobilenetv2.deploy.quiet import quiet
from mobilenetv2.errors import UserError
from mobilenetv2.metadata import FORMAT_NAME
from mobilenetv2.model import MobileNetV2

PRECISIONS = ("fp16", "fp32")
WEIGHTS = Path("Data") / "com.apple.CoreML" / "weights"


def require_coremltools():
    try:
        with quiet():  # its notes on macOS-only libraries, scikit-learn and torch versions
            import coremltools
    except ImportError:
        raise UserError("the coreml export needs coremltools: pip install 'mobilenetv2[coreml]'") from None
    return coremltools


class _ImageClassifier(nn.Module):
    """RGB pixels (0-255, N x 3 x H x W) -> class probabilities: the model's normalisation, the model, a softmax."""

    def __init__(self, model: MobileNetV2):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(model.preprocess.mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(model.preprocess.std).view(1, 3, 1, 1) * 255)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model((pixels - self.mean) / self.std), dim=1)


def class_labels(model: MobileNetV2) -> list[str]:
    return list(model.class_names) if model.class_names else [str(i) for i in range(model.num_classes)]


def convert(model: MobileNetV2, path: Path, precision: str = "fp16", record: dict | None = None) -> None:
    """Write `model` as an ML Program classifier package (a folder) at `path`, its metadata (or `record`) inside."""
    ct = require_coremltools()
    if precision not in PRECISIONS:
        raise UserError(f"coreml `precision` must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    size = model.preprocess.image_size
    with quiet():
        program = torch.export.export(_ImageClassifier(model).eval(), (torch.zeros(1, 3, size, size),))
        network = ct.convert(program.run_decompositions({}),
                             inputs=[ct.ImageType(name="image", shape=(1, 3, size, size),
                                                  color_layout=ct.colorlayout.RGB)],
                             classifier_config=ct.ClassifierConfig(class_labels(model)), convert_to="mlprogram",
                             compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
                             minimum_deployment_target=ct.target.iOS16)
    network.short_description = (f"MobileNetV2 (width {model.width_mult:g}, {model.num_classes} classes): an RGB "
                                 f"image resized to {model.preprocess.resize_size} px and centre-cropped to {size} px")
    network.input_description["image"] = f"RGB image, {size} x {size} (normalisation is inside the model)"
    network.user_defined_metadata[FORMAT_NAME] = json.dumps(model.metadata() if record is None else record)
    with quiet():
        network.save(str(path))


def load_program(path: Path):
    """The package's spec and its MIL program, read back from disk (weights from the package's blob file)."""
    ct = require_coremltools()
    with quiet():
        from coremltools.converters.mil.frontend.milproto.load import load

        spec = ct.utils.load_spec(str(path))
        program = load(spec, spec.specificationVersion, str(path / WEIGHTS))
    return spec, program


def inventory(program) -> dict[str, int]:
    """How many operations of each type the program's main function has."""
    counts: dict[str, int] = {}
    for operation in program.functions["main"].operations:
        counts[operation.op_type] = counts.get(operation.op_type, 0) + 1
    return counts


def _value(var, values: dict):
    return values[var.name] if var.name in values else var.val


def _pads(operation, values) -> list[int]:
    kind = _value(operation.inputs["pad_type"], values)
    if kind == "valid":
        return [0, 0, 0, 0]
    if kind != "custom":
        raise ValueError(f"conv pad_type {kind!r} is not modelled")
    return [int(v) for v in _value(operation.inputs["pad"], values)]


def _conv(operation, values) -> torch.Tensor:
    get = lambda name: _value(operation.inputs[name], values)  # noqa: E731
    top, bottom, left, right = _pads(operation, values)
    x = F.pad(torch.as_tensor(get("x")), (left, right, top, bottom))
    weight = torch.as_tensor(np.asarray(get("weight"), np.float32))
    bias = torch.as_tensor(np.asarray(get("bias"), np.float32)) if "bias" in operation.inputs else None
    return F.conv2d(x, weight, bias, tuple(int(v) for v in get("strides")), 0,
                    tuple(int(v) for v in get("dilations")), int(get("groups")))


def run_program(program, pixels: torch.Tensor) -> torch.Tensor:
    """The program's class probabilities for `pixels` (N x 3 x H x W, 0-255), its operations evaluated in order
    with its own constants (fp16 weights widened to float32) by torch's kernels. ValueError for an operation this
    evaluator does not model."""
    values: dict = {"image": pixels.float()}
    as_tensor = lambda v: torch.as_tensor(np.asarray(v, np.float32)) if not torch.is_tensor(v) else v  # noqa: E731
    for operation in program.functions["main"].operations:
        kind, inputs = operation.op_type, operation.inputs
        get = lambda name: _value(inputs[name], values)  # noqa: E731,B023
        if kind == "const":
            continue
        if kind == "cast":
            result = as_tensor(get("x"))
        elif kind in ("add", "sub", "mul", "real_div"):
            x, y = as_tensor(get("x")), as_tensor(get("y"))
            result = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "real_div": torch.div}[kind](x, y)
        elif kind == "conv":
            result = _conv(operation, values)
        elif kind == "clip":
            result = as_tensor(get("x")).clamp(float(get("alpha")), float(get("beta")))
        elif kind == "reduce_mean":
            result = as_tensor(get("x")).mean(dim=[int(a) for a in get("axes")], keepdim=bool(get("keep_dims")))
        elif kind == "reshape":
            result = as_tensor(get("x")).reshape([int(v) for v in get("shape")])
        elif kind == "linear":
            result = F.linear(as_tensor(get("x")), as_tensor(get("weight")), as_tensor(get("bias")))
        elif kind == "softmax":
            result = torch.softmax(as_tensor(get("x")), dim=int(get("axis")))
        elif kind == "classify":
            return as_tensor(get("probabilities"))
        else:
            raise ValueError(f"the Core ML program has a {kind} operation the check does not model")
        values[operation.outputs[0].name] = result
    raise ValueError("the Core ML program has no classify operation")


def describe(spec) -> dict:
    """What an app sees of the package: input and output names, the input's size and colour space, the labels'
    home, and our metadata record."""
    image = spec.description.input[0]
    return {"inputs": [i.name for i in spec.description.input], "outputs": [o.name for o in spec.description.output],
            "image": (image.type.imageType.width, image.type.imageType.height,
                      spec.description.input[0].type.imageType.ColorSpace.Name(image.type.imageType.colorSpace)),
            "predicted": spec.description.predictedFeatureName,
            "metadata": json.loads(spec.description.metadata.userDefined.get(FORMAT_NAME, "null"))}


def labels_of(program) -> list[str]:
    """The class labels the program's classify operation names."""
    for operation in program.functions["main"].operations:
        if operation.op_type == "classify":
            return [str(name) for name in operation.inputs["classes"].val]
    return []


def package_size(path: str | os.PathLike) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def export_coreml(model: MobileNetV2, temp: Path, *, precision: str = "auto", **_options) -> list[str]:
    """Core ML (deploy/py): the package reloaded and checked as far as Linux allows: its interface, labels,
    metadata and operation inventory, then its own operations and weights run by torch's kernels against eager."""
    precision = "fp16" if precision == "auto" else precision
    temp.unlink(missing_ok=True)  # a free name, held for the package (coremltools wants the .mlpackage ending)
    staging = temp.with_name(temp.name + ".mlpackage")
    try:
        convert(model, staging, precision)
        os.replace(staging, temp)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    spec, program = load_program(temp)
    size = model.preprocess.image_size
    found = describe(spec)
    expected = {"inputs": ["image"], "outputs": ["classLabel", "classLabel_probs"], "image": (size, size, "RGB"),
                "predicted": "classLabel", "metadata": json.loads(json.dumps(model.metadata()))}
    wrong = [f"{key} is {found[key]!r}, not {value!r}" for key, value in expected.items() if found[key] != value]
    if labels_of(program) != class_labels(model):
        wrong.append("its class labels are not the model's")
    counts = inventory(program)
    layers = {"conv": sum(isinstance(m, nn.Conv2d) for m in model.modules()),
              "clip": sum(isinstance(m, nn.ReLU6) for m in model.modules()), "linear": 1, "batch_norm": 0}
    wrong += [f"it has {counts.get(op, 0)} {op} operations where the network has {n}" for op, n in layers.items()
              if counts.get(op, 0) != n]
    if wrong:
        raise ExportCheckError("the Core ML package: " + "; ".join(wrong))
    images = check_images(model, 2)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (model.preprocess.mean, model.preprocess.std))
    with torch.no_grad():
        expected_probs = torch.softmax(model(images), 1)
        try:
            probs = torch.cat([run_program(program, pixels[None]) for pixels in (images * std + mean) * 255])
        except ValueError as exc:
            raise ExportCheckError(str(exc)) from None
    shared = 0.0 if precision == "fp32" else fp16_weights_error(model, images, lambda logits: torch.softmax(logits, 1))
    difference = compare(expected_probs, probs, "the Core ML program's probabilities",
                         TOLERANCE if precision == "fp32" else FP16_TOLERANCE, noise=shared)
    return [f"Core ML package reloaded: input image {size}x{size} RGB, {len(class_labels(model))} class "
            f"labels, {counts['conv']} conv / {counts['clip']} clip operations as the network's layers, metadata",
            f"its program's operations and {precision} weights run by torch's kernels vs eager, 2 photos: max abs "
            f"difference in probabilities {difference:.3g}",
            "NOT checked: Core ML's own numbers (Core ML runs on Apple platforms only; check the package on a Mac)"]
