"""The engines' timing (`mobilenetv2.engines.timing`) as `bench` and `quantize` use it, with runners over ONNX files
that take torch tensors."""

from __future__ import annotations

from pathlib import Path

from mobilenetv2.engines.onnx_files import onnxruntime_run, openvino_run
from mobilenetv2.engines.timing import ROUNDS, cpu_description, interleaved, timed

__all__ = ["ROUNDS", "cpu_description", "interleaved", "timed", "onnx_runner", "openvino_runner"]


def onnx_runner(path: Path, threads: int):
    """A callable(images: torch.Tensor) running the ONNX file with ONNX Runtime's CPU provider on `threads`."""
    run, _batch = onnxruntime_run(path, threads)
    return lambda images: run(images.numpy())


def openvino_runner(path: Path, threads: int, precision: str = "f32"):
    """The same with OpenVINO: float layers in `precision` (f32, or bf16 on CPUs with bf16 units), int8 layers of a
    quantized file in int8."""
    run, _batch = openvino_run(path, threads, precision)
    return lambda images: run(images.numpy())
