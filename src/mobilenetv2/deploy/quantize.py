"""Post-training static int8 quantization for ONNX Runtime, checked on the user's own val folder.

The network goes out as fp32 ONNX through torch's current exporter (BatchNorm folded into the convolutions), is
calibrated on N training images with the eval transforms, and quantized to QDQ form: per-channel int8 weights,
uint8 activations. The stem convolution and the first inverted residual block may stay in fp32 (`KEEP_FP32`): they
run at half the input resolution with 3-16 channels, where ONNX Runtime's int8 kernels can be slower than its fp32
ones (the 3-channel stem through im2col, the 16-channel depthwise convolution through per-pixel indirection). Which
layout is faster depends on the image size and the CPU (on a 2-core x86 VM, keeping them fp32 is 1.2x faster at
48 px and 0.85x at 224 px), so by default (`auto`) both are written and timed here at batch 32, and the faster one is
kept; the timings and the CPU they were taken on go into the metadata (another CPU may favour the other layout).
Both files are then evaluated on the val folder; the top-1 of each and the drop are printed and written into the
int8 file's metadata (`quantization`), so `eval` and `predict` read it like any exported model.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mobilenetv2.data.folders import eval_loader, find_splits, image_folder
from mobilenetv2.data.transforms import eval_transform
from mobilenetv2.engines.onnx_files import write_onnx
from mobilenetv2.errors import DataError, UserError
from mobilenetv2.files import write_error
from mobilenetv2.metadata import FORMAT_NAME
from mobilenetv2.model import MobileNetV2

# what `keep_fp32` may name: the backbone's leading layers left in fp32 ("auto": the faster of these, timed)
KEEP_FP32 = {"stem": 2, "none": 0}
SPEED_BATCH = 32


@dataclass
class QuantizeReport:
    fp32_top1: float
    int8_top1: float
    evaluated: int
    calibration_images: int
    keep_fp32: str = "none"
    images_per_s: dict[str, float] | None = None  # per layout and for "fp32", when `auto` timed them
    timed_on: str | None = None  # timing.cpu_description() of the CPU that timed them

    @property
    def drop_points(self) -> float:
        return 100 * (self.fp32_top1 - self.int8_top1)


def calibration_batches(model: MobileNetV2, train: Path, images: int, batch_size: int = 1, seed: int = 0):
    """`images` training images (an even draw over the folder, fixed by `seed`) through the eval transform."""
    dataset = image_folder(train, eval_transform(model.preprocess))
    if not len(dataset):
        raise DataError(f"{train} holds no images to calibrate on")
    order = np.random.default_rng(seed).permutation(len(dataset))[:images]
    batch = []
    for index in order:
        item = dataset[int(index)]
        if item is None:
            continue
        batch.append(item[0].numpy())
        if len(batch) == batch_size:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)


def calibration_from(model: MobileNetV2, data: str | os.PathLike | None, images: int) -> list[np.ndarray]:
    """`images` train images of the dataset root `data` for int8 calibration (eval transforms), one per batch."""
    if not data:
        raise UserError("`int8` needs `data` (its train/ images calibrate the quantizer)")
    if images < 1:
        raise UserError("`calibration_images` must be >= 1")
    return list(calibration_batches(model, find_splits(data).train, images))


def quantize(model: MobileNetV2, data: str | os.PathLike, output: str | os.PathLike, *, calibration_images: int = 512,
             batch_size: int = 100, workers: int = 2, keep_fp32: str = "auto") -> QuantizeReport:
    """Write `model` as a checked int8 ONNX file at `output`; `data` holds train/ (calibration) and val/.
    `keep_fp32` ("stem", "none", or "auto": the faster of the two here) names the leading layers left in fp32."""
    from mobilenetv2 import runtime as runtime_module
    from mobilenetv2.deploy.export import export_onnx
    from mobilenetv2.deploy.predict import labelled_dataset, load_classifier
    from mobilenetv2.deploy.timing import cpu_description
    from mobilenetv2.evaluation import evaluate_each

    if calibration_images < 1:
        raise UserError("`calibration_images` must be >= 1")
    layouts(model, keep_fp32)  # refuses an unknown name before any work
    splits = find_splits(data)
    if splits.val is None:
        raise DataError(f"{data} has no val/ folder to measure the int8 model on")
    output = Path(output)
    model = model.eval()
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(output, exc) from None
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".quantize.") as tmp:
        fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        export_onnx(model, fp32, batch_size=1, dynamic_batch=True, onnx_exporter="auto")  # carries the model's metadata
        chosen, rates = write_faster_int8(model, fp32, int8, lambda: calibration_batches(model, splits.train,
                                                                                         calibration_images), keep_fp32)
        with runtime_module.session("cpu", "off") as state:  # both files on the same decoded images, read once
            engines = [load_classifier(path, runtime_name="onnx") for path in (fp32, int8)]
            val = labelled_dataset(engines[0], splits.val, eval_transform(engines[0].preprocess))
            results = evaluate_each([engine.forward for engine in engines], eval_loader(val, batch_size, workers),
                                    state, engines[0].num_classes)
        report = QuantizeReport(results[0].top1, results[1].top1, results[1].count, calibration_images, chosen, rates,
                                cpu_description() if rates else None)
        _add_metadata(int8, {**model.metadata(), "quantization": {
            "scheme": "onnxruntime static QDQ: int8 per-channel weights, uint8 activations, MinMax calibration",
            "fp32_layers": fp32_modules(model, chosen), "calibration_images": calibration_images,
            "fp32_top1": report.fp32_top1, "int8_top1": report.int8_top1, "evaluated_images": report.evaluated,
            **({"images_per_s_at_batch_32": rates, "timed_on": report.timed_on} if rates else {})}})
        try:
            os.replace(int8, output)
        except OSError as exc:
            raise write_error(output, exc) from None
    return report


def layouts(model: MobileNetV2, keep_fp32: str) -> list[str]:
    """The `KEEP_FP32` layouts that `keep_fp32` asks for: itself, or all of them for "auto"."""
    names = list(KEEP_FP32) if keep_fp32 == "auto" else [keep_fp32]
    for name in names:
        fp32_modules(model, name)
    return names


def write_faster_int8(model: MobileNetV2, fp32: Path, output: Path, batches: Callable[[], Iterable[np.ndarray]],
                      keep_fp32: str = "auto") -> tuple[str, dict[str, float] | None]:
    """`write_int8` of `fp32` to `output` with the layout `keep_fp32` names, or with "auto" each layout written
    (calibrated on a fresh `batches()`) and timed here beside `fp32` itself, keeping the faster layout. Returns the
    layout and the timings (each layout's and "fp32"'s)."""
    candidates = {name: output.with_name(f"{output.name}.{name}") for name in layouts(model, keep_fp32)}
    for name, path in candidates.items():
        write_int8(fp32, path, batches(), fp32_convolutions=leading_convolutions(model, fp32_modules(model, name)))
    rates = None
    if len(candidates) > 1:
        rates = images_per_second({**candidates, "fp32": fp32}, model.preprocess.image_size)
    chosen = max(candidates, key=rates.get) if rates else next(iter(candidates))
    os.replace(candidates.pop(chosen), output)
    for path in candidates.values():
        path.unlink()
    return chosen, rates


def speed_note(rates: dict[str, float] | None) -> str | None:
    """What the timings say about int8 against fp32 on this CPU, when int8 is the slower: ONNX Runtime's int8
    kernels lose to its fp32 ones on some CPUs (a Zen 4 VM with AVX-512 VNNI: 0.72x at 224 px, 0.38x at 48 px)."""
    if not rates or "fp32" not in rates:
        return None
    best = max(rate for name, rate in rates.items() if name != "fp32")
    if best >= rates["fp32"]:
        return None
    return (f"int8 runs {best / rates['fp32']:.2f}x fp32 in ONNX Runtime on this CPU: for speed here keep the fp32 "
            f"model, or run this file in OpenVINO (`--runtime openvino`), whose int8 kernels are faster on some CPUs")


def images_per_second(files: dict[str, Path], image_size: int, seconds: float = 1.5) -> dict[str, float]:
    """Throughput of each ONNX file at batch SPEED_BATCH with ONNX Runtime on this machine, in interleaved rounds."""
    from mobilenetv2.deploy.timing import interleaved, onnx_runner

    images = torch.randn(SPEED_BATCH, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    calls = {name: (lambda run=onnx_runner(path, threads): run(images)) for name, path in files.items()}
    latencies = interleaved(calls, seconds)
    return {name: round(SPEED_BATCH * len(times) / sum(times), 1) for name, times in latencies.items()}


def fp32_modules(model: MobileNetV2, keep_fp32: str) -> list[str]:
    """The names of the backbone's leading modules that `keep_fp32` leaves in fp32."""
    if keep_fp32 not in KEEP_FP32:
        raise UserError(f"`keep_fp32` must be one of {', '.join(KEEP_FP32)}, got {keep_fp32!r}")
    return [f"backbone.{index}" for index in range(min(KEEP_FP32[keep_fp32], len(model.backbone)))]


def leading_convolutions(model: MobileNetV2, modules: list[str]) -> int:
    """How many of the network's convolutions, in forward order, belong to `modules` (a leading run of layers)."""
    named = dict(model.named_modules())
    return sum(isinstance(layer, torch.nn.Conv2d) for name in modules for layer in named[name].modules())


def write_int8(fp32: Path, output: Path, batches: Iterable[np.ndarray], *, fp32_convolutions: int = 0) -> None:
    """The shipped int8 recipe on an fp32 ONNX file: static QDQ, per-channel int8 weights, uint8 activations,
    MinMax ranges from `batches` (preprocessed images, N x 3 x H x W). The first `fp32_convolutions` Conv nodes
    (the exporter writes them in forward order, BatchNorm folded in) stay in fp32."""
    import onnx
    from onnxruntime import quantization as ort_quant

    convolutions = [node.name for node in onnx.load(str(fp32), load_external_data=False).graph.node
                    if node.op_type == "Conv"]

    batches = iter(batches)

    class Reader(ort_quant.CalibrationDataReader):
        def get_next(self):
            batch = next(batches, None)
            return None if batch is None else {"input": batch}

    logging.disable(logging.WARNING)  # onnxruntime's advice to pre-process (the exporter already folded BN)
    try:
        ort_quant.quantize_static(str(fp32), str(output), Reader(), quant_format=ort_quant.QuantFormat.QDQ,
                                  per_channel=True, activation_type=ort_quant.QuantType.QUInt8,
                                  weight_type=ort_quant.QuantType.QInt8,
                                  calibrate_method=ort_quant.CalibrationMethod.MinMax,
                                  nodes_to_exclude=convolutions[:fp32_convolutions])
    finally:
        logging.disable(logging.NOTSET)
    _drop_unused_constants(output)


def _drop_unused_constants(path: Path) -> None:
    """Remove the Constant nodes nothing reads: quantization folds each Clip (ReLU6) into its QDQ range and leaves
    the clip's bounds behind, and every engine that opened the file warned about each of them. The file is written
    back through onnx.checker either way."""
    import onnx

    proto = onnx.load(str(path))
    graph = proto.graph
    read = {name for node in graph.node for name in node.input} | {output.name for output in graph.output}
    for node in [node for node in graph.node if node.op_type == "Constant" and not read.intersection(node.output)]:
        graph.node.remove(node)
    write_onnx(proto, path)


def _add_metadata(path: Path, record: dict) -> None:
    import onnx

    proto = onnx.load(str(path))
    kept = [entry for entry in proto.metadata_props if entry.key != FORMAT_NAME]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    entry = proto.metadata_props.add()
    entry.key, entry.value = FORMAT_NAME, json.dumps(record)
    write_onnx(proto, path)


def quantization_record(path: str | os.PathLike) -> dict | None:
    """The `quantization` entry an int8 file carries, or None."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    for entry in proto.metadata_props:
        if entry.key == FORMAT_NAME:
            return json.loads(entry.value).get("quantization")
    return None

