"""LiteRT (TensorFlow Lite), Android's runtime: a `.tflite` written by litert-torch (no TensorFlow), fp32 or static
int8 (PT2E, per-channel symmetric weights, calibrated on images with the eval transforms), run back with LiteRT's own
`Interpreter`. The file takes NCHW as exported or NHWC (`layout="nhwc"`, as Android apps hold pixels); the class
names and the preprocessing contract ride inside it, as a zip archive appended to the flatbuffer (how LiteRT's own
metadata tools pack associated files: the interpreter ignores it, `unzip -l model.tflite` lists it).
LiteRT is an optional extra (`pip install 'mobilenetv2[litert]'`)."""

from __future__ import annotations

import copy
import io
import json
import os
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mobilenetv2.deploy.checks import check_against_eager, int8_check
from mobilenetv2.engines.onnx_files import ExportCheckError
from mobilenetv2.deploy.quiet import quiet
from mobilenetv2.errors import CheckpointError, UserError
from mobilenetv2.metadata import FORMAT_NAME
from mobilenetv2.model import MobileNetV2

LAYOUTS = ("nchw", "nhwc")
CONTRACT = f"{FORMAT_NAME}.json"  # the metadata record inside the appended archive
LABELS = "labels.txt"  # one class name per line, as Android's image classifier reads them
MAX_CONTRACT_BYTES = 1 << 20


def require_litert() -> None:
    try:
        with quiet():  # torchao's deprecation notes at import
            import ai_edge_litert.interpreter  # noqa: F401
            import litert_torch  # noqa: F401
    except ImportError:
        raise UserError("the tflite export needs litert-torch and LiteRT: pip install 'mobilenetv2[litert]'") from None


class _ChannelsLast(nn.Module):
    """The network taking N x H x W x 3, as an Android bitmap's pixels are laid out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.permute(0, 3, 1, 2))


def convert(model: MobileNetV2, path: Path, *, layout: str = "nchw", int8: bool = False,
            calibration: Iterable | None = None) -> None:
    """Write `model` (batch 1, its image size) as a `.tflite` at `path`; with `int8`, `calibration` (batches of
    preprocessed N x 3 x H x W images) sets the activation ranges, and the file takes and gives int8 tensors
    (their scale and zero point in the tensors' quantization parameters, as LiteRT's quantized models do)."""
    require_litert()
    import litert_torch

    if layout not in LAYOUTS:
        raise UserError(f"`layout` must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    network = copy.deepcopy(model).eval().to(memory_format=torch.contiguous_format)
    size = model.preprocess.image_size
    if layout == "nhwc":
        network = _ChannelsLast(network).eval()
    sample = (torch.zeros(1, size, size, 3) if layout == "nhwc" else torch.zeros(1, 3, size, size),)
    with quiet():
        if int8:
            network, options = _quantized(network, sample, calibration, layout)
        else:
            options = {}
        litert_torch.convert(network, sample, **options).export(str(path))


def _quantized(network: nn.Module, sample: tuple, calibration: Iterable | None, layout: str):
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if calibration is None:
        raise UserError("int8 LiteRT export needs calibration images (`data`)")
    quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))
    prepared = prepare_pt2e(torch.export.export(network, sample).module(), quantizer)
    with torch.no_grad():
        for batch in calibration:
            for image in torch.as_tensor(batch):  # the graph is exported for batch 1
                prepared((image.permute(1, 2, 0) if layout == "nhwc" else image)[None])
    return convert_pt2e(prepared, fold_quantize=False), {"quant_config": QuantConfig(pt2e_quantizer=quantizer)}


def attach_contract(path: Path, record: dict, class_names: list[str] | None) -> None:
    """Append the metadata record (and the class names, one a line) to the `.tflite` as a zip archive."""
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as package:
        package.writestr(CONTRACT, json.dumps(record))
        if class_names:
            package.writestr(LABELS, "\n".join(class_names) + "\n")
    with open(path, "ab") as file:
        file.write(archive.getvalue())


def read_contract(path: str | os.PathLike) -> dict:
    """The metadata record a `.tflite` of ours carries; CheckpointError when it has none."""
    try:
        with zipfile.ZipFile(path) as package:
            info = package.getinfo(CONTRACT)
            if info.file_size > MAX_CONTRACT_BYTES:
                raise CheckpointError(f"{path}: its {CONTRACT} declares {info.file_size} bytes")
            return json.loads(package.read(info))
    except (zipfile.BadZipFile, KeyError, ValueError, OSError):
        raise CheckpointError(f"{path}: a .tflite without mobilenetv2 metadata (export it with 'mobilenetv2 export "
                              "--format tflite')") from None


def litert_runner(path: str | os.PathLike, threads: int | None = None,
                  layout: str | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A callable(images N x 3 x H x W, normalised) -> float logits running the `.tflite` in LiteRT's interpreter
    (XNNPACK) on `threads`: it lays the batch out as the file takes it (`layout`, default from its metadata),
    quantizes an int8 input and dequantizes an int8 output, and resizes the batch dimension as the batch changes."""
    require_litert()
    from ai_edge_litert.interpreter import Interpreter

    if layout is None:
        layout = read_contract(path).get("litert", {}).get("layout", "nchw")
    with quiet():
        interpreter = Interpreter(model_path=str(path), num_threads=threads or torch.get_num_threads())
    source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    shape = [int(v) for v in source["shape"]]

    def run(images: torch.Tensor) -> torch.Tensor:
        array = (images.permute(0, 2, 3, 1) if layout == "nhwc" else images).contiguous().numpy()
        if array.shape[0] != shape[0]:
            shape[0] = array.shape[0]
            interpreter.resize_tensor_input(source["index"], shape)
            interpreter.allocate_tensors()
        if source["dtype"] == np.int8:
            scale, zero = source["quantization"]
            array = np.clip(np.round(array / scale) + zero, -128, 127).astype(np.int8)
        interpreter.set_tensor(source["index"], array)
        interpreter.invoke()
        output = interpreter.get_tensor(target["index"]).astype(np.float32)
        if target["dtype"] == np.int8:
            scale, zero = target["quantization"]
            output = (output - zero) * scale
        return torch.from_numpy(output)

    with quiet():  # the XNNPACK delegate's line
        interpreter.allocate_tensors()
    return run


def val_dataset(model: MobileNetV2, folder: str | os.PathLike):
    """The images of `folder` (class folders) through the eval transforms, labelled in the model's class order
    (DataError, before any conversion, for classes the model does not know)."""
    from mobilenetv2.data.folders import class_folders, image_folder, model_class_order
    from mobilenetv2.data.transforms import eval_transform

    folder = Path(folder)
    names = model_class_order(class_folders(folder), model.class_names, model.num_classes, str(folder))
    return image_folder(folder, eval_transform(model.preprocess), names)


def val_top1(model: MobileNetV2, run: Callable[[torch.Tensor], torch.Tensor], dataset,
             batch_size: int = 50) -> tuple[float, float, int]:
    """Top-1 of eager `model` and of the file (`run`) on `dataset` (`val_dataset`), each image read once: (eager's,
    the file's, images counted)."""
    from mobilenetv2 import runtime as runtime_module
    from mobilenetv2.data.folders import eval_loader
    from mobilenetv2.evaluation import evaluate_each

    with runtime_module.session("cpu", "off") as state:
        eager, written = evaluate_each([model, run], eval_loader(dataset, batch_size, 0), state, model.num_classes)
    return eager.top1, written.top1, eager.count


def export_tflite(model: MobileNetV2, temp: Path, *, int8: bool = False, calibration=None, val=None,
                  layout: str = "nchw", **_options) -> list[str]:
    """LiteRT (deploy/py), batch 1 (the interpreter resizes it); fp32 checked like ONNX at batches 1 and 3,
    int8 within INT8_TOLERANCE, with its top-1 beside eager's on the `val` folder when given. The metadata record
    (and the file's layout and quantization) rides inside the file."""
    if int8 and calibration is None:
        raise UserError("int8 LiteRT export needs calibration images (`data`)")
    val = val_dataset(model, val) if int8 and val is not None else None
    convert(model, temp, layout=layout, int8=int8, calibration=calibration)
    run = litert_runner(temp, layout=layout)
    record = {**model.metadata(), "litert": {"layout": layout, "input": "int8 (the input tensor's scale and zero "
                                             "point)" if int8 else "float32", "batch": "1, resizable"}}
    if not int8:
        reports = check_against_eager(model, lambda images: [run(images)], [1, 3], False, "LiteRT Interpreter",
                                       "LiteRT")
    else:
        reports = [int8_check(model, run, "LiteRT Interpreter")]
        if val is not None:
            fp32_top1, int8_top1, count = val_top1(model, run, val)
            record["quantization"] = {"scheme": "litert-torch PT2E static int8: per-channel symmetric weights, "
                                      "int8 activations", "calibration_images": len(calibration),
                                      "fp32_top1": fp32_top1, "int8_top1": int8_top1, "evaluated_images": count}
            reports.append(f"top-1 on {count} val images: fp32 (eager) {fp32_top1:.2%}, int8 (LiteRT) "
                           f"{int8_top1:.2%}")
    attach_contract(temp, record, model.class_names)
    if read_contract(temp) != json.loads(json.dumps(record)):
        raise ExportCheckError("the LiteRT file's metadata does not read back as written")
    run = litert_runner(temp)  # the file as shipped: the archive appended, the layout read from it
    if int8:
        int8_check(model, run, "LiteRT Interpreter")
    else:
        check_against_eager(model, lambda images: [run(images)], [2], False, "LiteRT Interpreter", "LiteRT")
    return reports
