"""The export format table: each format's name, default file ending, what it is, and the function in
`deploy.export` that writes and checks it. No torch import, so the command line can list formats at once."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mobilenetv2.errors import UserError


@dataclass(frozen=True)
class ExportFormat:
    suffix: str  # the default file ending
    writer: str  # the write-and-check function: its name in deploy/export.py, or module:name in deploy/
    description: str


FORMATS: dict[str, ExportFormat] = {
    "onnx": ExportFormat(".onnx", "export_onnx", "ONNX, checked with onnxruntime"),
    "torchscript": ExportFormat(".torchscript.pt", "export_torchscript", "TorchScript trace, checked with torch.jit.load"),
    "mindspore": ExportFormat(".ckpt", "export_mindspore", "MindSpore .ckpt in the seed's key layout, read back"),
    "executorch": ExportFormat(".pte", "export_pte", "ExecuTorch program with the XNNPACK delegate (--int8: PT2E "
                               "int8), run back with ExecuTorch's runtime"),
    "torchvision": ExportFormat(".pth", "export_torchvision", "state dict that torchvision.models.mobilenet_v2 "
                                "loads strictly (.pth or .safetensors)"),
    "triton": ExportFormat("-triton", "export_triton", "Triton model repository entry, a folder named for the model: "
                           "config.pbtxt (ONNX Runtime backend, dynamic batching up to --batch-size, labels) and "
                           "1/model.onnx, the config checked with Triton's own schema (the [triton] extra)"),
    "timm": ExportFormat(".pth", "export_timm", "state dict that timm's mobilenetv2_* models load strictly (.pth or "
                         ".safetensors)"),
    "tflite": ExportFormat(".tflite", "litert:export_tflite", "LiteRT (TensorFlow Lite) for Android through "
                           "litert-torch, fp32 or --int8 (--layout nhwc for bitmaps' pixel order), run back with LiteRT's "
                           "Interpreter; class names and contract inside (the [litert] extra)"),
    "openvino": ExportFormat(".xml", "openvino_ir:export_openvino", "OpenVINO IR (.xml + .bin beside it), fp32 "
                             "or --precision fp16, run back with OpenVINO (the [openvino] extra)"),
    "coreml": ExportFormat(".mlpackage", "coreml:export_coreml", "Core ML ML Program classifier for iOS/macOS "
                           "(fp16, or --precision fp32), taking an RGB image; on Linux its numbers are NOT checked, only its "
                           "structure (coremltools predicts on macOS only; the [coreml] extra)"),
    "mindir": ExportFormat(".mindir", "mindir:export_mindir", "MindSpore MINDIR (the seed's export), the seed's network in "
                           "MindSpore, run back with mindspore.load + GraphCell; MindSpore in this environment or "
                           "in --mindspore-python's"),
}


def require_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")


def default_output(checkpoint: str | os.PathLike, fmt: str) -> Path:
    """Where an export goes when no output is named: beside the checkpoint, with the format's ending."""
    return Path(Path(checkpoint).with_suffix("").as_posix() + FORMATS[fmt].suffix)
