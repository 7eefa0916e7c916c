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
    names = record.get("class_names")
    if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
        raise CheckpointError(f"{source}: class names must be a list of strings")
    preprocess = record.get("preprocess") or {}
    if not isinstance(preprocess, dict):
        raise CheckpointError(f"{source}: preprocessing contract must be a mapping")
    return ModelMetadata(dict(config), names, Preprocess.from_dict(preprocess))
