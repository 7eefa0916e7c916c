"""ONNX files and the engines that run them on the CPU (ONNX Runtime; OpenVINO, which reads the same files): their
sessions, the metadata record our files carry, the export an engine runs a checkpoint through (checked against
eager PyTorch on real photos), and the photos and comparison every export check uses."""

from __future__ import annotations

import contextlib
import functools
import copy
import io
import json
import os
import warnings
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mobilenetv2.errors import CheckpointError, UserError, first_line
from mobilenetv2.metadata import FORMAT_NAME, parse
from mobilenetv2.model import MobileNetV2

RUNTIMES = ("auto", "torch", "onnx", "openvino")
ENGINES = RUNTIMES[1:]
EXTRAS = {"onnx": "pip install 'mobilenetv2[export]'", "openvino": "pip install 'mobilenetv2[openvino]'"}
MAX_ONNX_BYTES = 2 << 30  # protobuf's own limit for one message
TOLERANCE = 1e-4  # max |difference| from eager, relative to max(1, logit scale)
# ... or this multiple of eager float32's own error on the same photos (its distance from float64), where that is
# larger: an ill-conditioned network (logits in the hundreds, BatchNorm scales in the tens) rounds further from the
# exact answer in eager float32 than TOLERANCE allows an export, and an export shares that noise, it does not add it
NOISE_MULTIPLE = 4


class ExportCheckError(Exception):
    """The written file disagrees with the eager model beyond the tolerance."""


class CachedExportError(CheckpointError):
    """The ONNX export an engine would run disagrees with the eager model beyond the tolerance."""


CHECK_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")  # resources/photos: real photos shipped with the package


def check_photos() -> list:
    """The real photos every export check runs on (RGB PIL images; resources/photos/SOURCES.txt says whose)."""
    from importlib import resources

    from PIL import Image

    folder = resources.files("mobilenetv2").joinpath("resources/photos")
    photos = []
    for name in CHECK_PHOTOS:
        with folder.joinpath(f"{name}.jpg").open("rb") as file, Image.open(file) as image:
            photos.append(image.convert("RGB"))
    return photos


def check_images(model: MobileNetV2, batch: int) -> torch.Tensor:
    """A batch of real photos (`check_photos`, in turn) preprocessed by the model's own contract."""
    from mobilenetv2.data.transforms import eval_transform

    photos, transform = check_photos(), eval_transform(model.preprocess)
    return torch.stack([transform(photos[i % len(photos)]) for i in range(batch)])


def float32_error(model: nn.Module, images: torch.Tensor) -> float:
    """Eager float32's own error on `images`: max |float32 logits - float64 logits| of the same network (about 1e-6
    of the logit scale for a healthy network)."""
    exact = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        return float((model(images).double() - exact(images.double())).abs().max())


def compare(expected: torch.Tensor, actual, what: str, tolerance: float | None = None, noise: float = 0.0) -> float:
    """Max |difference|; raises ExportCheckError above `tolerance` (default TOLERANCE) x max(1, max |expected|), or
    above NOISE_MULTIPLE x `noise` (eager float32's own error, `float32_error`) where that is larger."""
    expected = expected.detach().numpy()
    difference = float(np.abs(expected - np.asarray(actual)).max())
    limit = max((TOLERANCE if tolerance is None else tolerance) * max(1.0, float(np.abs(expected).max())),
                NOISE_MULTIPLE * noise)
    if not difference <= limit:
        raise ExportCheckError(f"{what} differs from eager PyTorch by {difference:.3g} (> {limit:.3g})")
    return difference


def installed(engine: str) -> bool:
    """Whether `engine` can run here (ONNX Runtime and OpenVINO also need onnx, to export and read metadata)."""
    if engine == "torch":
        return True
    needs = {"onnx": ("onnx", "onnxruntime"), "openvino": ("onnx", "openvino")}[engine]
    return all(find_spec(name) is not None for name in needs)


def require_runtime(name: str) -> None:
    if name not in RUNTIMES:
        raise UserError(f"unknown `runtime` {name!r}; choose one of {', '.join(RUNTIMES)}")
    if name != "auto" and not installed(name):
        raise UserError(f"`runtime` {name} is not installed: {EXTRAS[name]}")


def _threads() -> int:
    return torch.get_num_threads()


def onnxruntime_run(path: Path, threads: int | None = None) -> tuple[Callable[[np.ndarray], np.ndarray], object]:
    """run(images) -> logits through ONNX Runtime's CPU provider on `threads` (torch's count when None), and the
    file's batch dimension (an int when fixed)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads or _threads(), 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return (lambda images: session.run(["logits"], {"input": images})[0]), session.get_inputs()[0].shape[0]


OPENVINO_PRECISIONS = ("f32", "bf16", "default")


@functools.cache
def openvino_core():
    """The process's one OpenVINO Core, shared by every model it reads and compiles. A Core per model (as this
    module made before) left the process to die of a segmentation fault later, at an unrelated moment (a fork, a
    collection): xdist workers that had run OpenVINO a few times died with signal 11 in the suite."""
    import openvino

    return openvino.Core()


def openvino_cpu_precision() -> str:
    """The precision OpenVINO's CPU plugin runs float layers in when not told: bf16 on CPUs with bf16 units (Zen 4,
    Sapphire Rapids and later), f32 elsewhere. What OpenVINO Model Server, benchmark_app and a plain
    `core.compile_model(xml)` run."""
    return _precision_name(openvino_core().get_property("CPU", "INFERENCE_PRECISION_HINT"))


def _precision_name(element_type) -> str:
    """An OpenVINO element type as OpenVINO writes it: f32, bf16, f16."""
    return element_type.get_type_name() if hasattr(element_type, "get_type_name") else str(element_type)


def openvino_has_bf16() -> bool:
    return "BF16" in openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def openvino_run(path: Path, threads: int | None = None,
                 precision: str = "f32") -> tuple[Callable[[np.ndarray], np.ndarray], object]:
    """As `onnxruntime_run`, through OpenVINO on the CPU, its float layers in `precision`: f32 (the contract), bf16
    (asked; refused on a CPU without bf16 units) or "default" (whatever the CPU plugin picks here, see
    `openvino_cpu_precision`). The int8 layers of a quantized file stay int8 either way. `run.precision` says what
    the compiled model runs."""
    if precision not in OPENVINO_PRECISIONS:
        raise UserError(f"OpenVINO `precision` must be one of {', '.join(OPENVINO_PRECISIONS)}, got {precision!r}")
    if precision == "bf16" and not openvino_has_bf16():
        raise UserError("this CPU has no bf16 units (OpenVINO would run f32): use --precision f32")
    core = openvino_core()
    network = core.read_model(str(path))
    config = {"INFERENCE_NUM_THREADS": threads or _threads()}
    if precision != "default":
        config["INFERENCE_PRECISION_HINT"] = precision
    compiled = core.compile_model(network, "CPU", config)
    request = compiled.create_infer_request()
    output = compiled.output("logits")

    def run(images: np.ndarray) -> np.ndarray:
        return request.infer({"input": images})[output].copy()

    run.precision = _precision_name(compiled.get_property("INFERENCE_PRECISION_HINT"))
    batch = network.input("input").get_partial_shape()[0]
    return run, (batch.get_length() if batch.is_static else None)


ENGINE_RUNNERS = {"onnx": onnxruntime_run, "openvino": openvino_run}


def read_onnx_metadata(path: Path):
    """The mobilenetv2 metadata of an ONNX file, parsed, and the record as written (an int8 file's holds its
    `quantization`); CheckpointError for anything else."""
    import onnx

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
        record = json.loads(properties[FORMAT_NAME])
        meta = parse(record, str(path))
    except (ValueError, TypeError):  # not JSON, or not even UTF-8
        raise CheckpointError(f"{path}: its mobilenetv2 metadata is not a JSON record") from None
    num_classes = meta.architecture.get("num_classes")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise CheckpointError(f"{path}: its mobilenetv2 metadata has no class count")
    return meta, record


MAX_IR_BYTES = 2 << 30


def read_openvino_metadata(path: Path):
    """As `read_onnx_metadata`, for an OpenVINO IR (`.xml`, its `.bin` beside it) written by `export --format
    openvino`: the record rides in the IR's runtime info."""
    if not installed("openvino"):
        raise CheckpointError(f"reading OpenVINO IR needs OpenVINO: {EXTRAS['openvino']}")
    weights = path.with_suffix(".bin")
    for part in (path, weights):
        if not part.is_file():
            raise CheckpointError(f"checkpoint not found: {part}" + (" (an IR's weights lie beside its .xml)"
                                                                     if part == weights else ""))
        if part.stat().st_size > MAX_IR_BYTES:
            raise CheckpointError(f"{part}: {part.stat().st_size} bytes is more than the {MAX_IR_BYTES} we read")
    try:
        network = openvino_core().read_model(str(path))
        text = network.get_rt_info([FORMAT_NAME]).astype(str) if network.has_rt_info([FORMAT_NAME]) else None
    except Exception as exc:  # noqa: BLE001 - OpenVINO's own parse errors
        raise CheckpointError(f"{path}: not a readable OpenVINO IR ({first_line(exc, 120)})") from None
    if text is None:
        raise CheckpointError(f"{path}: an OpenVINO IR without mobilenetv2 metadata (export it with 'mobilenetv2 "
                              "export --format openvino')")
    try:
        record = json.loads(text)
        meta = parse(record, str(path))
    except (ValueError, TypeError):
        raise CheckpointError(f"{path}: its mobilenetv2 metadata is not a JSON record") from None
    if not isinstance(meta.architecture.get("num_classes"), int) or meta.architecture["num_classes"] < 1:
        raise CheckpointError(f"{path}: its mobilenetv2 metadata has no class count")
    return meta, record


def read_engine_metadata(path: Path):
    """The metadata of a file an engine runs: an ONNX file, or an OpenVINO IR (`.xml`)."""
    return read_openvino_metadata(path) if path.suffix == ".xml" else read_onnx_metadata(path)


ONNX_OPSET = {"dynamo": 18, "legacy": 17}  # 18 is the lowest the dynamo exporter writes
ONNX_EXPORTERS = ("auto", *ONNX_OPSET)


def torch_onnx_export(network: nn.Module, example: torch.Tensor, path: Path, outputs: list[str],
                      dynamic_batch: bool, exporter: str) -> str:
    """Write `network` as ONNX to `path` through torch's `exporter` and return the one used: "dynamo" (torch.export,
    the current one), "legacy" (TorchScript-based, deprecated) or "auto": the legacy one while this torch has it, as
    it takes under a second where torch.export takes ten (the same graph for ONNX Runtime: BatchNorm folded, the
    same speed), else the dynamo one. Each caller checks the file against eager."""
    if exporter not in ONNX_EXPORTERS:
        raise UserError(f"`onnx_exporter` must be one of {', '.join(ONNX_EXPORTERS)}, got {exporter!r}")
    dynamic_axes = {name: {0: "batch"} for name in ["input", *outputs]} if dynamic_batch else None
    names = ("legacy", "dynamo") if exporter == "auto" else (exporter,)
    for name in names:
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # the exporter's progress
                warnings.simplefilter("ignore")
                torch.onnx.export(network, (example,), str(path), input_names=["input"], output_names=outputs,
                                  dynamic_axes=dynamic_axes, opset_version=ONNX_OPSET[name], dynamo=name == "dynamo",
                                  external_data=False)
            return name
        except Exception:  # noqa: BLE001 - under auto, no legacy exporter in this torch: the current one
            if name == names[-1]:
                raise


def check_onnx(model) -> None:
    """ExportCheckError, with onnx.checker's reason, unless it accepts `model` (an onnx.ModelProto or a file's path):
    a malformed graph is refused here, not later by whichever engine first loads it."""
    import onnx

    try:
        onnx.checker.check_model(str(model) if isinstance(model, Path) else model)
    except onnx.checker.ValidationError as exc:
        raise ExportCheckError(f"onnx.checker refuses the ONNX graph: {first_line(exc)[:300]}") from None


def write_onnx(proto, path: Path) -> None:
    """`proto` (an onnx.ModelProto) written to `path` once onnx.checker accepts it (`check_onnx`)."""
    check_onnx(proto)
    path.write_bytes(proto.SerializeToString())


def export_for_engines(model: nn.Module, target: Path, sample: torch.Tensor, metadata: dict) -> None:
    """`model` (images -> one output) as ONNX with a dynamic batch (the fast exporter, see `torch_onnx_export`),
    written atomically to `target` after it ran in ONNX Runtime on `sample` and matched eager."""
    import onnx

    from mobilenetv2.files import temp_path_beside

    temp = temp_path_beside(target)
    try:
        torch_onnx_export(model, sample[:1], temp, ["logits"], True, "auto")
        proto = onnx.load(str(temp))
        entry = proto.metadata_props.add()
        entry.key, entry.value = FORMAT_NAME, json.dumps(metadata)
        write_onnx(proto, temp)
        run, _batch = onnxruntime_run(temp)
        with torch.no_grad():
            expected = model(sample)
        try:
            compare(expected, run(sample.numpy()), "the cached ONNX export", noise=float32_error(model, sample))
        except ExportCheckError as exc:
            raise CachedExportError(f"{target}: {exc}") from None
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)
