"""ExecuTorch for phones: a `.pte` program with the XNNPACK delegate, fp32 or int8 (PT2E quantization with
per-channel symmetric weights, calibrated on images with the eval transforms), run back with ExecuTorch's own Python
runtime. ExecuTorch is an optional extra (`pip install 'mobilenetv2[mobile]'`)."""

from __future__ import annotations

import contextlib
import copy
import io
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch

from mobilenetv2.errors import UserError
from mobilenetv2.model import MobileNetV2


def _require_executorch() -> None:
    try:
        import executorch.exir  # noqa: F401
    except ImportError:
        raise UserError("ExecuTorch export needs the executorch package: pip install 'mobilenetv2[mobile]'") from None


def export_executorch(model: MobileNetV2, path: str | os.PathLike, *, int8: bool = False,
                      calibration: Iterable | None = None) -> None:
    """Write `model` (batch 1, the model's image size) as an XNNPACK-delegated ExecuTorch program at `path`.
    With `int8`, `calibration` (batches of preprocessed images) sets the activation ranges."""
    _require_executorch()
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    model = copy.deepcopy(model).eval().to(memory_format=torch.contiguous_format)  # XNNPACK picks its own layout
    size = model.preprocess.image_size
    example = (torch.zeros(1, 3, size, size),)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.export.export(model, example)
        if int8:
            program = torch.export.export(_quantized(program.module(), calibration), example)
        lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
    Path(path).write_bytes(lowered.buffer)


def _quantized(graph: torch.nn.Module, calibration: Iterable | None) -> torch.nn.Module:
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                          get_symmetric_quantization_config)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if calibration is None:
        raise UserError("int8 ExecuTorch export needs calibration images")
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for batch in calibration:
            for image in torch.as_tensor(batch):  # the program is exported for batch 1
                prepared(image[None])
    return convert_pt2e(prepared)


def executorch_threads(threads: int | None = None) -> int:
    """The threads ExecuTorch's XNNPACK kernels use (all cores unless set), after setting them to `threads`."""
    _require_executorch()
    from executorch.extension.pybindings import portable_lib

    if threads is not None and threads != portable_lib._threadpool_get_thread_count():
        with contextlib.redirect_stderr(io.StringIO()):
            portable_lib._unsafe_reset_threadpool(threads)
    return portable_lib._threadpool_get_thread_count()


def executorch_runner(path: str | os.PathLike):
    """A callable(images) -> logits running the `.pte` with ExecuTorch's runtime, one image at a time."""
    _require_executorch()
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(str(path)).load_method("forward")

    def run(images: torch.Tensor) -> torch.Tensor:
        return torch.cat([method.execute([image[None].contiguous()])[0] for image in images])

    return run
