"""MobileNetV2 image classification: the MindSpore Model Zoo system, re-implemented on PyTorch."""

from mobilenetv2.checkpoint import load_model, save_model
from mobilenetv2.model import MobileNetV2, make_divisible

__all__ = ["MobileNetV2", "load_model", "make_divisible", "save_model"]
__version__ = "0.1.0"
