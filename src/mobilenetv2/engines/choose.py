"""Which engine runs a model's forward pass for `eval`, `predict`, `eval --compare` and the frozen backbone of
head-only training.

A checkpoint (any file `load_model` reads) runs in eager PyTorch, or in ONNX Runtime or OpenVINO through an ONNX
export cached beside it: `.mobilenetv2-cache/NAME.KEY.onnx`, KEY a hash of the checkpoint's bytes, written once,
checked against eager as `export` checks, and replaced when the checkpoint changes (elsewhere when that folder is
not writable: `$XDG_CACHE_HOME/mobilenetv2`). An `.onnx` file runs in ONNX Runtime or OpenVINO.

`auto` decides on this machine: on a GPU, PyTorch (the engines we ship to run on the CPU); on a CPU, the fastest
installed engine of torch, ONNX Runtime and OpenVINO as timed here for this model, size and batch, in interleaved
rounds. The timing is kept beside the cached export, per CPU, threads, batch and set of engines installed, so it is
paid once and again when an engine is added. An int8 file stays in ONNX Runtime under `auto`.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mobilenetv2.config import Preprocess
from mobilenetv2.engines.onnx_files import (ENGINE_RUNNERS, EXTRAS, CachedExportError, check_images,
                                           export_for_engines, installed, read_engine_metadata, read_onnx_metadata,
                                           read_openvino_metadata, require_runtime)
from mobilenetv2.errors import CheckpointError, UserError, first_line
from mobilenetv2.files import file_sha256
from mobilenetv2.interop import published
from mobilenetv2.metadata import parse
from mobilenetv2.model import MobileNetV2

CACHE_FOLDER = ".mobilenetv2-cache"
CACHE_FORMAT = 1  # bump when the cached export changes shape; old files are then rebuilt
TIMING_BATCH = 16  # the largest batch `auto` times with: the order of the engines holds from there up
TIMING_SECONDS = 0.3  # per engine, over the interleaved rounds


@dataclass
class Classifier:
    """A forward function over normalised batches, with the contract and names that go with it, and the engine
    that runs it."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    num_classes: int
    preprocess: Preprocess
    class_names: list[str] | None
    runtime: str = "torch"
    precision: str = "f32"  # what the engine computes float layers in (OpenVINO: f32, or bf16 when asked)


def imagenet_class_names() -> list[str]:
    text = resources.files("mobilenetv2").joinpath("resources/imagenet_classes.txt").read_text()
    return [line for line in text.splitlines() if line]


def _names_or_imagenet(names: list[str] | None, num_classes: int) -> list[str] | None:
    return names or (imagenet_class_names() if num_classes == 1000 else None)


def as_classifier(model: MobileNetV2) -> Classifier:
    """A network (fresh or loaded) as a Classifier in eager PyTorch; a 1000-class one without names gets the
    ImageNet-1k names."""
    model.eval()
    return Classifier(model, model.num_classes, model.preprocess,
                      _names_or_imagenet(model.class_names, model.num_classes))


def onnx_classifier(path: str | os.PathLike, engine: str = "onnx", precision: str = "f32") -> Classifier:
    """An exported .onnx (ours: it carries the metadata record) run by ONNX Runtime or OpenVINO on the CPU, or an
    OpenVINO IR (.xml) run by OpenVINO (its float layers in `precision`, f32 or bf16)."""
    path = Path(path)
    if not installed(engine):
        raise CheckpointError(f"reading {path.suffix} files with {engine} needs it installed: {EXTRAS[engine]}")
    meta, _record = read_engine_metadata(path)
    try:
        runner = ENGINE_RUNNERS[engine]
        run, batch_dim = runner(path, precision=precision) if precision != "f32" else runner(path)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - the engines' own load errors (Fail, InvalidGraph, RuntimeError, ...)
        raise CheckpointError(f"{path}: {engine} cannot load it ({first_line(exc, 160)})") from None
    static_batch = batch_dim if isinstance(batch_dim, int) and batch_dim > 0 else None

    def checked(images: np.ndarray) -> np.ndarray:
        try:
            return run(images)
        except Exception as exc:  # noqa: BLE001 - a graph that loads may still fail on its first input
            raise CheckpointError(f"{path}: {engine} cannot run it ({first_line(exc, 160)})") from None

    def forward(images: torch.Tensor) -> torch.Tensor:
        images = as_engine_input(images)
        if static_batch is None:
            return torch.from_numpy(checked(images))
        chunks = []  # a fixed-batch export runs chunk by chunk, the last one zero-padded
        for start in range(0, len(images), static_batch):
            chunk = images[start:start + static_batch]
            padded = np.concatenate([chunk, np.zeros((static_batch - len(chunk), *chunk.shape[1:]), chunk.dtype)])
            chunks.append(checked(padded)[: len(chunk)])
        return torch.from_numpy(np.concatenate(chunks))

    num_classes = meta.architecture["num_classes"]
    return Classifier(forward, num_classes, meta.preprocess, _names_or_imagenet(meta.class_names, num_classes),
                      engine, getattr(run, "precision", "f32"))


def as_engine_input(images: torch.Tensor) -> np.ndarray:
    """A batch as the ONNX engines take it: float32, on the CPU, C-contiguous (channels-last tensors are not)."""
    return np.ascontiguousarray(images.detach().float().cpu().numpy())


# ---------------------------------------------------------------------------------------------------------------
# the cached export of a checkpoint


def _digest(path: Path) -> str:
    return file_sha256(path, f"mobilenetv2 onnx cache {CACHE_FORMAT}\0".encode())[:20]


def _cache_folders(checkpoint: Path) -> list[Path]:
    from mobilenetv2.runtime import user_cache

    return [checkpoint.resolve().parent / CACHE_FOLDER, user_cache()]


def cached_export(checkpoint: str | os.PathLike, model: MobileNetV2) -> Path:
    """The ONNX export of `checkpoint` (whose network is `model`), from the cache or written there now."""
    from mobilenetv2.errors import WriteError

    checkpoint = Path(checkpoint)
    name = f"{checkpoint.name}.{_digest(checkpoint)}.onnx"
    failures = []
    for folder in _cache_folders(checkpoint):
        target = folder / name
        if target.is_file():
            try:
                if read_onnx_metadata(target)[0] == parse(model.metadata(), str(checkpoint)):
                    return target
            except CheckpointError:
                pass  # damaged or foreign: written again below
        try:
            folder.mkdir(parents=True, exist_ok=True)
            export_for_engines(model.eval(), target, check_images(model, 3), model.metadata())
        except (OSError, WriteError) as exc:
            failures.append(first_line(exc, 160))
            continue
        earlier = re.compile(re.escape(checkpoint.name) + r"\.[0-9a-f]{20}\.onnx")
        for stale in folder.glob(f"{checkpoint.name}.*.onnx"):  # exports of earlier contents of this file
            if stale != target and earlier.fullmatch(stale.name):
                stale.unlink(missing_ok=True)
                stale.with_suffix(".timing.json").unlink(missing_ok=True)
        return target
    raise UserError(f"no folder to cache the ONNX export of {checkpoint} in ({'; '.join(failures)}); "
                    "use --runtime torch")


# ---------------------------------------------------------------------------------------------------------------
# choosing


def _timing_key(size: int, batch: int) -> str:
    """What a timing holds for: this CPU, thread count, batch and image size."""
    from mobilenetv2.engines.timing import cpu_description

    return f"{cpu_description()} | {torch.get_num_threads()} threads | batch {batch} | {size} px"


def _time(candidates: dict[str, Callable], size: int, batch: int) -> dict[str, float]:
    """images/s of each forward on this CPU, timed in interleaved rounds on one random batch."""
    from mobilenetv2.engines.timing import interleaved

    images = torch.randn(batch, 3, size, size)
    with torch.inference_mode():
        latencies = interleaved({name: (lambda f=forward: f(images)) for name, forward in candidates.items()},
                                TIMING_SECONDS * len(candidates))
    return {name: batch * len(times) / sum(times) for name, times in latencies.items()}


def _agreed(choice: str, names: list[str], runtime) -> str:
    """Rank 0's choice on every rank (each times for itself, and timings differ)."""
    if runtime is None or not runtime.distributed:
        return choice
    votes = torch.zeros(len(names), dtype=torch.float64, device=runtime.device)
    if runtime.is_main:
        votes[names.index(choice)] = 1
    runtime.all_reduce_sum(votes)
    return names[int(votes.argmax())]


def _fastest(builders: dict[str, Callable[[], object]], forward_of: Callable[[object], Callable], size: int,
             batch: int, record: Path | None, runtime) -> object:
    """The built engine that runs fastest here: from `record` (timings kept per CPU, threads, batch and size) when
    it has them, else every candidate built and timed now (and the timings kept in `record`)."""
    from mobilenetv2.files import keep_record, read_record

    names = list(builders)
    if len(names) == 1:
        return builders[names[0]]()
    key = _timing_key(size, batch)
    known = read_record(record)
    if set(known.get(key, {})) == set(names):
        choice = _agreed(max(known[key], key=known[key].get), names, runtime)
        return builders[choice]()
    built = {name: build() for name, build in builders.items()}
    rates = _time({name: forward_of(engine) for name, engine in built.items()}, size, batch)
    keep_record(record, {**known, key: rates})
    return built[_agreed(max(rates, key=rates.get), names, runtime)]


AUTO_ENGINES = ("torch", "onnx", "openvino")


def _cpu_engines(runtime_name: str) -> list[str]:
    if runtime_name == "auto":
        return [engine for engine in AUTO_ENGINES if installed(engine)]
    return [runtime_name]


PRECISIONS = ("auto", "f32", "bf16")


def _runtime_for(runtime_name: str, precision: str) -> str:
    """The runtime that computes in `precision`: auto and f32 leave the choice as it is (every engine computes f32);
    bf16 is OpenVINO's (its CPU plugin on bf16 units), under `runtime` openvino or auto."""
    if precision not in PRECISIONS:
        raise UserError(f"`precision` must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "bf16":
        return runtime_name
    if runtime_name not in ("auto", "openvino"):
        raise UserError(f"`precision` bf16 runs in OpenVINO, not {runtime_name}: use --runtime openvino (or auto)")
    require_runtime("openvino")
    return "openvino"


def load_classifier(path: str | os.PathLike, device: torch.device | None = None, runtime_name: str = "auto",
                    batch_size: int = 32, runtime=None, precision: str = "auto") -> Classifier:
    """The model in `path` ready to classify normalised batches, run by `runtime_name` (see the module's text) in
    `precision` (auto and f32: f32 everywhere; bf16: OpenVINO's bf16, where the CPU has it). `runtime` (a
    `mobilenetv2.runtime.Runtime`, optional) makes every rank of a torchrun job choose alike."""
    from mobilenetv2.checkpoint import load_model

    runtime_name = _runtime_for(runtime_name, precision)
    precision = "bf16" if precision == "bf16" else "f32"
    require_runtime(runtime_name)
    on_gpu = device is not None and device.type != "cpu"
    if on_gpu and runtime_name not in ("auto", "torch"):
        raise UserError(f"`runtime` {runtime_name} runs on the CPU; use --device cpu, or --runtime torch on {device}")
    batch = max(1, min(batch_size, TIMING_BATCH))
    if str(path).endswith(".xml"):  # an OpenVINO IR: OpenVINO alone reads it
        path = Path(path)
        if runtime_name not in ("auto", "openvino"):
            raise UserError(f"{path} is an OpenVINO IR: run it with --runtime openvino (or auto)")
        read_openvino_metadata(path)
        return onnx_classifier(path, "openvino", precision)
    if str(path).endswith(".onnx"):
        path = Path(path)
        if runtime_name == "torch":
            raise UserError(f"{path} is an ONNX file: run it with --runtime onnx or openvino (or auto)")
        meta, record = read_onnx_metadata(path)
        engines = [e for e in _cpu_engines(runtime_name) if e != "torch"] or ["onnx"]
        if runtime_name == "auto" and isinstance(record, dict) and record.get("quantization"):
            # int8 arithmetic differs between engines: auto keeps the one `quantize` measured the file with
            engines = ["onnx"]
        size = meta.preprocess.image_size
        builders = {engine: (lambda engine=engine: onnx_classifier(path, engine, precision)) for engine in engines}
        return _fastest(builders, lambda c: c.forward, size, batch, None, runtime)
    model = load_model(path)
    if on_gpu or _cpu_engines(runtime_name) == ["torch"]:
        return as_classifier(model.to(device) if device is not None else model)
    if published.is_published_name(str(path)):  # its export is cached beside the file in its library's cache
        path = published.resolve(str(path))[0]
    try:
        export = cached_export(path, model)
    except CachedExportError as exc:
        if runtime_name != "auto":
            raise
        # an automatic choice never turns an answer into an error: eager PyTorch answers where its export fails
        print(f"mobilenetv2: warning: runtime auto runs {path} in torch: {exc}", file=sys.stderr, flush=True)
        return as_classifier(model.to(device) if device is not None else model)
    builders = {engine: (lambda: as_classifier(model)) if engine == "torch" else
                (lambda engine=engine: onnx_classifier(export, engine, precision))
                for engine in _cpu_engines(runtime_name)}
    return _fastest(builders, lambda c: c.forward, model.preprocess.image_size, batch,
                    export.with_suffix(".timing.json"), runtime)


# ---------------------------------------------------------------------------------------------------------------
# the frozen backbone of head-only training


class _Features(nn.Module):
    def __init__(self, model: MobileNetV2):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.features(images)


def feature_function(model: MobileNetV2, runtime, runtime_name: str = "auto",
                     batch_size: int = 32) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """A function images -> pooled backbone features (N, num_features), and the engine that runs it: eager on a GPU
    or when asked, else the fastest installed on this CPU (an ONNX export of the frozen backbone, in a temp folder
    for the length of the extraction)."""
    require_runtime(runtime_name)
    if runtime.device.type != "cpu" or _cpu_engines(runtime_name) == ["torch"]:
        if runtime.device.type != "cpu" and runtime_name not in ("auto", "torch"):
            raise UserError(f"`feature_runtime` {runtime_name} runs on the CPU; training is on {runtime.device}")
        return model.features, "torch"

    def builder(engine: str, target: Path):
        def build():
            if engine == "torch":
                return engine, model.features
            run, _batch = ENGINE_RUNNERS[engine](target)
            return engine, lambda images: torch.from_numpy(run(as_engine_input(images)))
        return build

    with tempfile.TemporaryDirectory(prefix="mobilenetv2-features-") as folder:  # engines keep the graph in memory
        target = Path(folder) / "features.onnx"
        try:
            export_for_engines(_Features(model).eval(), target, check_images(model, 3), model.metadata())
        except CachedExportError as exc:
            if runtime_name != "auto":
                raise
            print(f"mobilenetv2: warning: runtime auto extracts features in torch: {exc}", file=sys.stderr,
                  flush=True)
            return model.features, "torch"
        engine, forward = _fastest({engine: builder(engine, target) for engine in _cpu_engines(runtime_name)},
                                   lambda built: built[1], model.preprocess.image_size,
                                   max(1, min(batch_size, TIMING_BATCH)), None, runtime)
    return forward, engine
