"""torch.hub entry: the seed's `mindspore_hub_conf.create_network`, in PyTorch.

    model = torch.hub.load(repo_dir, "mobilenet_v2", source="local", num_classes=10, width_mult=0.5, weights=None)
    backbone = torch.hub.load(repo_dir, "mobilenet_v2", source="local", include_top=False)
"""

import os
import sys

dependencies = ["torch", "torchvision", "numpy", "google.protobuf", "yaml", "safetensors"]

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))


def mobilenet_v2(num_classes: int | None = None, width_mult: float | None = None, weights: str | None = None,
                 include_top: bool = True, **kwargs):
    """MobileNetV2 (default 1000 classes, width 1.0); `weights` is a local path in any format
    `mobilenetv2.load_model` reads (never downloaded), and must agree with num_classes / width_mult when given.

    With `include_top=False` the backbone alone is returned (image -> feature map), as the seed's create_network does.
    """
    from mobilenetv2 import MobileNetV2, load_model

    if weights:
        model = load_model(weights, num_classes=num_classes, width_mult=width_mult)
    else:
        model = MobileNetV2(num_classes=num_classes or 1000, width_mult=width_mult or 1.0, **kwargs)
    return model if include_top else model.backbone
