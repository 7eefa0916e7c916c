"""The one metadata schema that travels with a model in every format we write (`.pt`, `.safetensors`, ONNX,
TorchScript): the constructor arguments, the class names and the preprocessing contract, versioned.

`describe` writes it, `parse` reads it (older versions included). No torch import here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mobilenetv2.config import Preprocess
from mobilenetv2.errors import CheckpointError

FORMAT_NAME = "mobilenetv2"
FORMAT_VERSION = 2
# constructor arguments a file may carry; anything else in "config" is refused
ARCHITECTURE_KEYS = ("num_classes", "width_mult", "round_nearest", "dropout", "inverted_residual_setting")
# bounds on what a file may ask us to build (a network is allocated before its weights are checked)
MAX_CLASSES = 100_000
MAX_WIDTH = 4.0
MAX_STAGES, MAX_EXPANSION, MAX_CHANNELS, MAX_REPEATS = 32, 16, 4096, 16


@dataclass
class ModelMetadata:
    """What a file says about the model in it."""

    architecture: dict[str, Any]  # MobileNetV2 constructor arguments
    class_names: list[str] | None = None
    preprocess: Preprocess = field(default_factory=Preprocess)


def describe(architecture: dict[str, Any], class_names: list[str] | None, preprocess: Preprocess) -> dict[str, Any]:
    """The metadata record, as plain data (JSON- and `weights_only`-safe)."""
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "config": dict(architecture),
        "class_names": list(class_names) if class_names is not None else None,
        "preprocess": preprocess.to_dict(),
    }


def is_ours(record: Any) -> bool:
    return isinstance(record, dict) and record.get("format") == FORMAT_NAME


def parse(record: dict[str, Any], source: str) -> ModelMetadata:
    """Read a record written by any version of `describe` (version 1 exports kept the config at the top level)."""
    version = record.get("version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{source}: written by a newer mobilenetv2 (format version {version})")
    config = record.get("config")
    if not isinstance(config, dict):  # version 1 ONNX / TorchScript metadata
        config = {key: record[key] for key in ("num_classes", "width_mult") if key in record}
    unknown = sorted(set(config) - set(ARCHITECTURE_KEYS))
    if unknown:
        raise CheckpointError(f"{source}: unknown model configuration keys {', '.join(unknown)}")
    problem = _architecture_problem(config)
    if problem:
        raise CheckpointError(f"{source}: its model configuration is not usable ({problem})")
    names = record.get("class_names")
    if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
        raise CheckpointError(f"{source}: class names must be a list of strings")
    preprocess = record.get("preprocess") or {}
    if not isinstance(preprocess, dict):
        raise CheckpointError(f"{source}: preprocessing contract must be a mapping")
    return ModelMetadata(dict(config), names, Preprocess.from_dict(preprocess))


def _is_int(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _architecture_problem(config: dict[str, Any]) -> str | None:
    """What is wrong with a file's constructor arguments, or None; every size is bounded before anything is built."""
    if "num_classes" in config and not _is_int(config["num_classes"], 1, MAX_CLASSES):
        return f"num_classes must be an integer in 1-{MAX_CLASSES}"
    width = config.get("width_mult", 1.0)
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0 < width <= MAX_WIDTH:
        return f"width_mult must be a number in (0, {MAX_WIDTH:g}]"
    if "round_nearest" in config and not _is_int(config["round_nearest"], 1, 64):
        return "round_nearest must be an integer in 1-64"
    dropout = config.get("dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        return "dropout must be in [0, 1)"
    setting = config.get("inverted_residual_setting")
    if setting is not None:
        rows_ok = isinstance(setting, list) and 1 <= len(setting) <= MAX_STAGES and all(
            isinstance(row, (list, tuple)) and len(row) == 4 and _is_int(row[0], 1, MAX_EXPANSION)
            and _is_int(row[1], 1, MAX_CHANNELS) and _is_int(row[2], 1, MAX_REPEATS) and row[3] in (1, 2)
            for row in setting)
        if not rows_ok:
            return (f"inverted_residual_setting must be at most {MAX_STAGES} rows of (t <= {MAX_EXPANSION}, "
                    f"c <= {MAX_CHANNELS}, n <= {MAX_REPEATS}, s in 1 or 2)")
    return None
