"""The network for a training mode: from scratch, full fine-tune (head filtered out), incremental
(head kept), class-incremental (head rows moved to their classes), head-only (backbone frozen elsewhere)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from mobilenetv2.checkpoint import LoadedWeights, load_state_into, same_width
from mobilenetv2.config import TrainConfig
from mobilenetv2.data.folders import pad_class_names
from mobilenetv2.errors import UserError
from mobilenetv2.model import MobileNetV2

DEFAULT_WIDTH = 1.0


@dataclass
class ModelSetup:
    model: MobileNetV2  # carries its class names and preprocessing contract
    notes: list[str] = field(default_factory=list)


def resolve_config(config: TrainConfig, loaded: LoadedWeights | None) -> TrainConfig:
    """The config with what it left open filled in: the width from `pretrained` (or 1.0 without one). A width that
    was given and disagrees with the checkpoint is refused."""
    if loaded is None:
        return dataclasses.replace(config, width_mult=config.width_mult or DEFAULT_WIDTH)
    if config.width_mult and not same_width(config.width_mult, loaded.width_mult):
        raise UserError(f"`pretrained` {config.pretrained} has width {loaded.width_mult} but `width_mult` is "
                        f"{config.width_mult}; leave `width_mult` out to take the checkpoint's")
    return dataclasses.replace(config, width_mult=config.width_mult or loaded.width_mult)


def build_model(config: TrainConfig, classes: list[str], loaded: LoadedWeights | None) -> ModelSetup:
    """The network for this mode, with whatever the mode takes from the pretrained checkpoint. `config` is resolved."""
    num_classes = config.num_classes or len(classes)
    if num_classes < len(classes):
        raise UserError(f"`num_classes` {num_classes} is smaller than the {len(classes)} class folders")
    class_names = pad_class_names(classes, num_classes)
    model = MobileNetV2(num_classes=num_classes, width_mult=config.width_mult, dropout=config.dropout,
                        drop_path=config.drop_path, class_names=class_names, preprocess=config.preprocess)
    if loaded is None:
        return ModelSetup(model, ["training from scratch"])
    if config.extend_classes:
        return _extend_classes(model, loaded, config)
    head_fits = loaded.num_classes == num_classes and loaded.class_names in (None, class_names)
    if config.filter_head or (config.freeze == "backbone" and not head_fits):
        load_state_into(model, loaded, skip_head=True)
        return ModelSetup(model, [f"loaded the backbone of {config.pretrained}; new {num_classes}-class head"])
    if not head_fits:
        have = f"{loaded.num_classes} classes" + (f" ({', '.join(loaded.class_names[:4])}, ...)" if loaded.class_names else "")
        raise UserError(f"`pretrained` head has {have}, the data has {num_classes} ({', '.join(class_names[:4])}, ...): "
                        "use `filter_head` for a new head or `extend_classes` to add classes")
    load_state_into(model, loaded)
    return ModelSetup(model, [f"continuing from all of {config.pretrained} (head included)"])


def _extend_classes(model: MobileNetV2, loaded: LoadedWeights, config: TrainConfig) -> ModelSetup:
    """Class-incremental: the checkpoint's head rows move to their classes' new positions; new rows are fresh."""
    old_names, class_names = loaded.class_names, model.class_names
    if not old_names:
        raise UserError(f"`extend_classes` needs class names in the checkpoint; {config.pretrained} has none "
                        "(convert it with class names)")
    missing = [name for name in old_names if name not in class_names]
    if missing:
        raise UserError(f"`extend_classes`: the training folder lacks the checkpoint's classes {', '.join(missing[:5])}")
    load_state_into(model, loaded, skip_head=True)
    weight, bias = loaded.state_dict["head.classifier.weight"], loaded.state_dict["head.classifier.bias"]
    with torch.no_grad():
        for old_index, name in enumerate(old_names):
            new_index = class_names.index(name)
            model.head.classifier.weight[new_index] = weight[old_index]
            model.head.classifier.bias[new_index] = bias[old_index]
    added = [name for name in class_names if name not in old_names]
    return ModelSetup(model, [f"extended {len(old_names)} classes with {len(added)} new: {', '.join(added[:5])}"])

