"""Checkpoint averaging (timm's avg_checkpoints.py): the element-wise mean of several checkpoints of one network,
BatchNorm statistics included, with the first one's metadata. In a training checkpoint with an EMA, `model` holds
the EMA weights and `train_model` the raw ones; each is averaged with its own kind."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from mobilenetv2 import metadata
from mobilenetv2.checkpoint import load_model, read_torch_file, save_model, torch_bytes
from mobilenetv2.errors import UserError
from mobilenetv2.files import atomic_write_bytes
from mobilenetv2.model import MobileNetV2

NUMBERED = re.compile(r"^mobilenetv2-(\d+)_(\d+)\.pt$")  # the seed's names, as training writes them


def last_checkpoints(run_dir: str | os.PathLike, count: int) -> list[Path]:
    """The `count` newest numbered checkpoints of a run folder (RUN/checkpoints/mobilenetv2-EPOCH_STEPS.pt)."""
    folder = Path(run_dir) / "checkpoints"
    if count < 2:
        raise UserError("`last` must be >= 2 (one checkpoint is its own average)")
    found = sorted((p for p in folder.glob("mobilenetv2-*.pt") if NUMBERED.match(p.name)),
                   key=lambda p: tuple(int(x) for x in NUMBERED.match(p.name).groups())) if folder.is_dir() else []
    if len(found) < count:
        raise UserError(f"{folder} has {len(found)} numbered checkpoint(s); `last` {count} asks for {count} "
                        "(training keeps `keep_max` of them)")
    return found[-count:]


def _mean(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Floating tensors: the mean, summed in float64 (so copies of one tensor average back to it exactly);
    integer ones (BatchNorm's step counters): the floor of the mean."""
    averaged = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            total = sum(state[key].double() for state in states)
            averaged[key] = (total / len(states)).to(first.dtype)
        else:
            averaged[key] = sum(state[key] for state in states) // len(states)
    return averaged


def _raw_weights(path: Path) -> dict[str, torch.Tensor] | None:
    """A training checkpoint's raw weights (beside its EMA), or None."""
    if path.suffix != ".pt":
        return None
    record = read_torch_file(path)
    raw = record.get("train_model") if metadata.is_ours(record) else None
    return raw if isinstance(raw, dict) and all(isinstance(v, torch.Tensor) for v in raw.values()) else None


def average(paths: list[str | os.PathLike], output: str | os.PathLike) -> MobileNetV2:
    """Write the mean of `paths` (any format load_model reads) to `output`; returns the averaged network. Refuses
    networks of different architectures, classes or preprocessing."""
    if len(paths) < 2:
        raise UserError("average needs two or more checkpoints")
    paths = [Path(p) for p in paths]
    models = [load_model(path) for path in paths]
    first = models[0]
    for path, model in zip(paths[1:], models[1:]):
        if model.metadata()["config"] != first.metadata()["config"]:
            raise UserError(f"{path} is another network ({model.metadata()['config']}) than {paths[0]} "
                            f"({first.metadata()['config']}); only one architecture averages")
        if model.class_names != first.class_names:
            raise UserError(f"{path} has other classes than {paths[0]}")
        if model.preprocess != first.preprocess:
            raise UserError(f"{path} preprocesses differently from {paths[0]}")
    first.load_state_dict(_mean([model.state_dict() for model in models]))
    raws = [_raw_weights(path) for path in paths]
    if all(raw is not None for raw in raws) and str(output).endswith(".pt"):
        record = {**first.metadata(), "model": {k: v.contiguous() for k, v in first.state_dict().items()},
                  "train_model": _mean(raws)}
        atomic_write_bytes(output, torch_bytes(record))
    else:
        save_model(first, output)
    return first
