"""MobileNetV2 image classification: the MindSpore Model Zoo system, re-implemented on PyTorch.

The public API, imported on first use (so `import mobilenetv2` and the command's `--help` stay light):
`MobileNetV2`, `make_divisible`, `load_model`, `save_model`, `export`, `predict`, `TrainConfig`, `run_training`.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "MobileNetV2": "mobilenetv2.model",
    "make_divisible": "mobilenetv2.model",
    "load_model": "mobilenetv2.checkpoint",
    "save_model": "mobilenetv2.checkpoint",
    "export": "mobilenetv2.deploy.export",
    "predict": "mobilenetv2.deploy.predict",
    "TrainConfig": "mobilenetv2.config",
    "Preprocess": "mobilenetv2.config",
    "run_training": "mobilenetv2.training.run",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'mobilenetv2' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
