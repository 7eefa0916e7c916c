"""The check every export shares: the written file, run in its own runtime on real photos, against eager PyTorch
(fp32 within TOLERANCE or a multiple of eager float32's own error; fp16 weights and int8 within their own bounds)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from mobilenetv2.engines.onnx_files import NOISE_MULTIPLE, TOLERANCE, check_images, compare, float32_error
from mobilenetv2.model import MobileNetV2

INT8_TOLERANCE = 0.15  # int8 files: max |difference| from eager, relative to max(1, logit scale)
# fp16 weights (OpenVINO --precision fp16, Core ML): max |difference| / max(1, logit scale), or NOISE_MULTIPLE x
# what rounding the network's own weights to fp16 moves eager's answer by, where that is larger
FP16_TOLERANCE = 5e-3
# bf16 compute (OpenVINO's CPU default on CPUs with bf16 units): max |difference| / max(1, logit scale), or
# NOISE_MULTIPLE x what bf16 autocast moves eager's answer by (`bf16_compute_error`), where that is larger. bf16 keeps
# 8 bits of mantissa: a deep network's logits move by about 0.4 % of their scale (0.04 at scale 10)
BF16_TOLERANCE = 1e-2


def bf16_compute_error(model: nn.Module, images: torch.Tensor) -> float:
    """max |eager under bf16 autocast - eager| on `images`: the error bf16 arithmetic brings by itself."""
    with torch.no_grad():
        exact = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rounded = model(images)
    return float((rounded.float() - exact).abs().max())


def fp16_weights_error(model: nn.Module, images: torch.Tensor, output=lambda logits: logits) -> float:
    """max |eager with every weight rounded to fp16 - eager| on `images` (through `output`, e.g. a softmax): the
    error fp16 weights bring by themselves, which a file holding them shares."""
    rounded = copy.deepcopy(model)
    for tensor in (*rounded.parameters(), *rounded.buffers()):
        if tensor.is_floating_point():
            tensor.data = tensor.data.half().float()
    with torch.no_grad():
        return float((output(rounded(images)) - output(model(images))).abs().max())


def check_against_eager(model: MobileNetV2, run: Callable, batch_sizes: list[int], with_softmax: bool,
                         runner: str, what: str) -> list[str]:
    """Run the written file (`run(images)` -> outputs, logits first) on real photos and compare with eager."""
    reports = []
    for batch in batch_sizes:
        images = check_images(model, batch)
        with torch.no_grad():
            expected = model(images)
            results = run(images)
        noise = float32_error(model, images)
        difference = compare(expected, results[0], f"{what} logits at batch {batch}", noise=noise)
        if with_softmax:
            compare(torch.softmax(expected, 1), results[1], f"{what} probs at batch {batch}")
        reports.append(f"{runner} vs eager, batch {batch}: max abs difference {difference:.3g}" +
                       noise_note(expected, noise))
    return reports


def noise_note(expected: torch.Tensor, noise: float) -> str:
    """Said where eager float32's own error, not TOLERANCE, set the bound (an ill-conditioned network)."""
    if NOISE_MULTIPLE * noise <= TOLERANCE * max(1.0, float(expected.abs().max())):
        return ""
    return (f" (eager float32 is itself {noise:.3g} from float64 on these photos: the bound is {NOISE_MULTIPLE}x "
            "that, as the network is ill-conditioned)")


def int8_check(model: MobileNetV2, run: Callable, runner: str) -> str:
    """An int8 file's logits on 4 photos within INT8_TOLERANCE of eager's, and how many top-1s agree."""
    images = check_images(model, 4)
    with torch.no_grad():
        expected, actual = model(images), run(images)
    difference = compare(expected, actual, f"int8 {runner} logits", INT8_TOLERANCE)
    agree = int((expected.argmax(1) == actual.argmax(1)).sum())
    return (f"{runner} (int8) vs eager, 4 photos: max abs difference {difference:.3g} (tolerance "
            f"{INT8_TOLERANCE} x logit scale), top-1 equal on {agree}/4")
