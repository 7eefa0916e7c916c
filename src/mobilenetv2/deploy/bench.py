"""`mobilenetv2 bench`: latency and throughput of one model in every runtime we ship to, on this machine, in one run.

Each runtime is built from the same checkpoint (fp32 eager PyTorch in channels-last, fp32 ONNX Runtime, int8 ONNX
Runtime, OpenVINO on the same fp32 and int8 ONNX files (and in bf16 on CPUs with bf16 units), ExecuTorch with
XNNPACK, LiteRT fp32 and int8) and measured in interleaved rounds, every runtime with the same thread count. Beside
its speed, each row's top-1 agreement with eager PyTorch on sixteen views of real photos says what it costs. The
int8 file is the one given, or one quantized here with real photos as calibration (speed does not depend on
calibration; for accuracy use `mobilenetv2 quantize`, which measures it). The `.pte` is the one given (checked to be this checkpoint's network), or exported here (a minute or two on a small CPU).
"""

from __future__ import annotations

import contextlib
import copy
import io
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from mobilenetv2.deploy.timing import cpu_description, interleaved, onnx_runner, openvino_runner
from mobilenetv2.errors import UserError
from mobilenetv2.model import MobileNetV2

RUNTIMES = ("torch", "onnx", "onnx-int8", "openvino", "openvino-bf16", "openvino-int8", "executorch", "litert",
            "litert-int8")


def default_runtimes() -> str:
    """What `bench` times when not told: every CPU engine installed here, ExecuTorch and LiteRT aside (phones'
    engines, asked for by name)."""
    from mobilenetv2.engines.onnx_files import installed, openvino_has_bf16

    openvino = (["openvino"] + (["openvino-bf16"] if openvino_has_bf16() else []) + ["openvino-int8"]
                if installed("openvino") else [])
    return ",".join(["torch", "onnx", "onnx-int8"] + openvino)


@dataclass
class BenchRow:
    runtime: str
    batch_size: int
    threads: int
    p50_ms: float
    p90_ms: float
    images_per_s: float
    cpu: str  # timing.cpu_description(): int8 speed depends on the CPU's int8 instructions
    top1_agreement: str = ""  # "agreeing/views": top-1 as eager PyTorch's on `agreement_images`


def summary(latencies: list[float], batch_size: int) -> tuple[float, float, float]:
    """p50 and p90 latency (ms), and images/s over all the calls (images over the time they took)."""
    p50 = statistics.median(latencies)
    return 1000 * p50, 1000 * float(np.percentile(latencies, 90)), batch_size * len(latencies) / sum(latencies)


def runners(model: MobileNetV2, runtimes: list[str], folder: Path, threads: int, int8: Path | None,
            pte: Path | None = None, tflite: Path | None = None) -> dict:
    """runtime name -> callable(images) for each runtime asked for."""
    from mobilenetv2.deploy.export import export_onnx

    found: dict[str, Callable] = {}
    if "torch" in runtimes:
        network = copy.deepcopy(model).to(memory_format=torch.channels_last)

        def eager(images):
            with torch.inference_mode():
                return network(images.contiguous(memory_format=torch.channels_last))

        found["torch"] = eager
    if {"onnx", "onnx-int8", "openvino", "openvino-bf16", "openvino-int8"} & set(runtimes):
        fp32 = folder / "fp32.onnx"
        export_onnx(model, fp32, batch_size=1, dynamic_batch=True, onnx_exporter="auto")
        if "onnx" in runtimes:
            found["onnx"] = onnx_runner(fp32, threads)
        if "openvino" in runtimes:
            found["openvino"] = openvino_runner(fp32, threads)
        if "openvino-bf16" in runtimes:
            found["openvino-bf16"] = openvino_runner(fp32, threads, "bf16")
        if {"onnx-int8", "openvino-int8"} & set(runtimes):
            if int8 is None:  # speed does not depend on the calibration: real photos will do
                from mobilenetv2.deploy.export import check_images
                from mobilenetv2.deploy.quantize import write_faster_int8

                int8 = folder / "int8.onnx"
                write_faster_int8(model, fp32, int8, lambda: [check_images(model, 8).numpy()])
            if "onnx-int8" in runtimes:
                found["onnx-int8"] = onnx_runner(int8, threads)
            if "openvino-int8" in runtimes:  # OpenVINO reads the QDQ file's int8 layers as int8
                found["openvino-int8"] = openvino_runner(int8, threads)
    if "executorch" in runtimes:
        from mobilenetv2.deploy.mobile import executorch_threads, export_executorch

        if pte is None:
            pte = folder / "model.pte"
            export_executorch(model, pte)
        if executorch_threads(threads) != threads:
            raise UserError(f"ExecuTorch could not be given {threads} threads")
        found["executorch"] = _checked_pte(model, Path(pte))
    given = _checked_tflite(model, Path(tflite), threads) if tflite is not None else None
    for name in ("litert", "litert-int8"):
        if given is not None and given[0] == name:
            found[name] = given[1]
        elif name in runtimes:  # speed does not depend on the calibration: real photos will do
            from mobilenetv2.deploy.export import check_images
            from mobilenetv2.deploy.litert import convert, litert_runner

            path = folder / f"{name}.tflite"
            convert(model, path, int8=name == "litert-int8", calibration=[check_images(model, 8).numpy()])
            found[name] = litert_runner(path, threads, layout="nchw")
    return found


def _checked_tflite(model: MobileNetV2, path: Path, threads: int) -> tuple[str, Callable]:
    """The row a given `.tflite` of ours times (litert, or litert-int8 when its record says int8) and its runner,
    once it answered as `model` does (the export's tolerance for fp32, the int8 one for int8)."""
    from mobilenetv2.deploy.export import INT8_TOLERANCE, TOLERANCE, ExportCheckError, check_images, compare
    from mobilenetv2.deploy.litert import litert_runner, read_contract
    from mobilenetv2.errors import CheckpointError

    if not path.is_file():
        raise UserError(f"no LiteRT file at {path}")
    try:
        int8 = bool(read_contract(path).get("quantization"))
    except CheckpointError as exc:
        raise UserError(str(exc)) from None
    images = check_images(model, 2)
    try:
        run = litert_runner(path, threads)
        with torch.no_grad():
            compare(model(images), run(images), f"{path}'s logits", INT8_TOLERANCE if int8 else TOLERANCE)
    except ExportCheckError as exc:
        raise UserError(f"{exc}: not this checkpoint's network") from None
    except (RuntimeError, ValueError) as exc:  # another input shape
        raise UserError(f"{path}: LiteRT cannot run it on this checkpoint's images ({str(exc)[:160]})") from None
    return ("litert-int8" if int8 else "litert"), run


def _checked_pte(model: MobileNetV2, path: Path) -> Callable:
    """The runner of a given `.pte`, once it answered as `model` does (within the int8 export's tolerance, so an int8
    program passes and another network does not)."""
    from mobilenetv2.deploy.export import INT8_TOLERANCE, ExportCheckError, check_images, compare
    from mobilenetv2.deploy.mobile import executorch_runner

    if not path.is_file():
        raise UserError(f"no ExecuTorch program at {path}")
    images = check_images(model, 2)
    try:
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):  # the runtime's own log of what it refused
            run = executorch_runner(path)
            compare(model(images), run(images), f"{path}'s logits", INT8_TOLERANCE)
    except ExportCheckError as exc:
        raise UserError(f"{exc}: not this checkpoint's network") from None
    except (RuntimeError, ValueError) as exc:  # not a program, or one with another input shape
        raise UserError(f"{path}: ExecuTorch cannot run it on this checkpoint's images ({str(exc)[:160]})") from None
    return run


def agreement_images(model: MobileNetV2) -> torch.Tensor:
    """Sixteen views of the four check photos (whole, mirrored, two corner crops), by the model's contract."""
    from PIL import Image

    from mobilenetv2.data.transforms import eval_transform
    from mobilenetv2.engines.onnx_files import check_photos

    transform, views = eval_transform(model.preprocess), []
    for photo in check_photos():
        width, height = photo.size
        views += [photo, photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
                  photo.crop((0, 0, width * 3 // 4, height * 3 // 4)),
                  photo.crop((width // 4, height // 4, width, height))]
    return torch.stack([transform(view) for view in views])


def agreement(model: MobileNetV2, found: dict[str, Callable]) -> dict[str, str]:
    """runtime -> "agreeing/views": how many of `agreement_images` each runtime gives eager PyTorch's top-1."""
    images = agreement_images(model)
    with torch.no_grad():
        expected = model(images).argmax(1).numpy()
    result = {}
    for name, run in found.items():
        one_by_one = name == "executorch"  # a phone's program for batch 1
        outputs = [run(images[i:i + 1]) for i in range(len(images))] if one_by_one else [run(images)]
        top1 = np.concatenate([_logits(output) for output in outputs]).argmax(1)
        result[name] = f"{int((top1 == expected).sum())}/{len(images)}"
    return result


def _logits(output) -> np.ndarray:
    """A runner's answer (a tensor, an array, or a list of outputs with the logits first) as a float array."""
    if isinstance(output, (list, tuple)):
        output = output[0]
    return output.detach().float().numpy() if isinstance(output, torch.Tensor) else np.asarray(output, np.float32)


def bench(model: MobileNetV2, runtimes: list[str], batch_sizes: list[int], *, seconds: float = 3.0,
          int8: Path | None = None, pte: Path | None = None, tflite: Path | None = None) -> list[BenchRow]:
    unknown = [name for name in runtimes if name not in RUNTIMES]
    if unknown:
        raise UserError(f"unknown `formats` {', '.join(unknown)}; choose from {', '.join(RUNTIMES)}")
    if any(name.startswith("openvino") for name in runtimes):
        from mobilenetv2.engines.onnx_files import installed

        if not installed("openvino"):
            raise UserError("the openvino rows need OpenVINO: pip install 'mobilenetv2[openvino]'")
    if not batch_sizes or min(batch_sizes) < 1:
        raise UserError("`batch_sizes` must be positive integers")
    model = model.eval()
    threads = torch.get_num_threads()
    size = model.preprocess.image_size
    rows, cpu = [], cpu_description()
    with tempfile.TemporaryDirectory() as tmp:
        found = runners(model, runtimes, Path(tmp), threads, int8, pte, tflite)
        agreeing = agreement(model, found)
        for batch in batch_sizes:
            images = torch.randn(batch, 3, size, size)
            # the .pte is exported for batch 1 (what a phone runs)
            calls = {name: (lambda run=found[name], images=images: run(images)) for name in runtimes
                     if name != "executorch" or batch == 1}
            latencies = interleaved(calls, seconds)  # in turn, same input, same threads
            rows += [BenchRow(name, batch, threads, *summary(latencies[name], batch), cpu, agreeing[name])
                     for name in calls]
    return rows


def parse_list(text: str, kind: type, name: str) -> list:
    """"a,b,c" as a list of `kind`; one UserError line naming `name` otherwise."""
    try:
        return [kind(value.strip()) for value in text.split(",") if value.strip()]
    except ValueError:
        raise UserError(f"`{name}` must be a comma-separated list, got {text!r}") from None


def table(rows: list[BenchRow]) -> str:
    lines = [f"CPU: {rows[0].cpu}" if rows else "", "",
             "| runtime | batch | threads | p50 ms | p90 ms | images/s | vs onnx fp32 | top-1 as torch |",
             "|---|---|---|---|---|---|---|---|"]
    base = {row.batch_size: row.images_per_s for row in rows if row.runtime == "onnx"}
    for row in rows:
        ratio = f"{row.images_per_s / base[row.batch_size]:.2f}x" if row.batch_size in base else ""
        lines.append(f"| {row.runtime} | {row.batch_size} | {row.threads} | {row.p50_ms:.2f} | {row.p90_ms:.2f} | "
                     f"{row.images_per_s:.1f} | {ratio} | {row.top1_agreement} |")
    return "\n".join(lines)


def as_dicts(rows: list[BenchRow]) -> list[dict]:
    return [asdict(row) for row in rows]
