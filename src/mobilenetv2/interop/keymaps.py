"""Declarative key maps from other checkpoint layouts onto ours, and the one function that applies them.

A layout is data: rename rules (regex -> replacement, applied in order), the keys it may carry that are not
weights (reported, never loaded), and optional per-key shape adapters. `apply_key_map` checks every tensor's
shape against the target network and refuses leftovers, so nothing is dropped or invented silently.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from mobilenetv2.errors import CheckpointError
from mobilenetv2.model import SEED_INVERTED_RESIDUAL_SETTING

# BatchNorm's step counter is bookkeeping torch adds; layouts that lack it get zeros.
_OPTIONAL_TARGET_SUFFIX = ".num_batches_tracked"


@dataclass(frozen=True)
class KeyLayout:
    name: str
    rename: tuple[tuple[str, str], ...]
    ignore: tuple[str, ...] = ()
    exact: Mapping[str, str] = field(default_factory=dict)

    def target_key(self, key: str) -> str | None:
        """Our key for a source key, or None when the key is bookkeeping to ignore."""
        if any(re.search(pattern, key) for pattern in self.ignore):
            return None
        if key in self.exact:
            return self.exact[key]
        for pattern, replacement in self.rename:
            key = re.sub(pattern, replacement, key)
        return key


OURS = KeyLayout(name="mobilenetv2", rename=((r"^(module|_orig_mod)\.", ""),))

TORCHVISION = KeyLayout(
    name="torchvision",
    rename=((r"^(module|_orig_mod)\.", ""), (r"^features\.", "backbone."), (r"^classifier\.1\.", "head.classifier.")),
)

MINDSPORE = KeyLayout(
    name="mindspore",
    rename=(
        (r"^backbone\.features\.", "features."),
        (r"^(head\.head\.1|head\.dense|head\.1|dense)\.", "head.classifier."),
        (r"^features\.", "backbone."),
        (r"\.features\.", "."),  # the seed's ConvBNReLU wraps its layers in a SequentialCell named `features`
        (r"\.gamma$", ".weight"),
        (r"\.beta$", ".bias"),
        (r"\.moving_mean$", ".running_mean"),
        (r"\.moving_variance$", ".running_var"),
    ),
    # optimizer and loop state that MindSpore saves beside the weights
    ignore=(
        r"^moments\.", r"^accum\.", r"^learning_rate$", r"^global_step$", r"^momentum$", r"^scale_sense$",
        r"^current_iterator_step$", r"^last_overflow_iterator_step$", r"^epoch_num$", r"^step_num$",
    ),
)


# Our keys -> the seed's MindSpore keys (for exporting back to MindSpore). BatchNorm renames apply to 1-D tensors
# outside the classifier; BatchNorm's step counter has no MindSpore counterpart.
MINDSPORE_EXPORT = KeyLayout(
    name="mindspore-export",
    rename=(
        (r"^backbone\.(\d+)\.conv\.(\d+)\.(\d+)\.", r"features.\1.conv.\2.features.\3."),
        (r"^backbone\.(\d+)\.(\d+)\.", r"features.\1.features.\2."),
        (r"^backbone\.(\d+)\.conv\.(\d+)\.", r"features.\1.conv.\2."),
        (r"^head\.classifier\.", "dense."),
    ),
    ignore=(r"\.num_batches_tracked$",),
)
_MINDSPORE_BN_NAMES = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}


def to_mindspore_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict in the seed's key layout (`features.*`, `dense.*`)."""
    renamed = rename_keys(state, MINDSPORE_EXPORT).state_dict
    result = {}
    for key, value in renamed.items():
        prefix, _, leaf = key.rpartition(".")
        if not key.startswith("dense.") and (value.dim() == 1 or leaf.startswith("running_")):
            key = f"{prefix}.{_MINDSPORE_BN_NAMES[leaf]}"
        result[key] = value
    return result


def timm_layout(setting=SEED_INVERTED_RESIDUAL_SETTING) -> KeyLayout:
    """timm's `mobilenetv2_*` names its blocks by stage and repeat; ours are numbered flat."""
    exact: dict[str, str] = {}
    bn_fields = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

    def add(source: str, target: str, batchnorm: bool = False) -> None:
        if batchnorm:
            for name in bn_fields:
                exact[f"{source}.{name}"] = f"{target}.{name}"
        else:
            exact[f"{source}.weight"] = f"{target}.weight"

    add("conv_stem", "backbone.0.0")
    add("bn1", "backbone.0.1", batchnorm=True)
    flat = 1
    for stage, (t, _c, n, _s) in enumerate(setting):
        for repeat in range(n):
            src, dst = f"blocks.{stage}.{repeat}", f"backbone.{flat}.conv"
            if t == 1:  # timm's DepthwiseSeparableConv
                add(f"{src}.conv_dw", f"{dst}.0.0")
                add(f"{src}.bn1", f"{dst}.0.1", batchnorm=True)
                add(f"{src}.conv_pw", f"{dst}.1")
                add(f"{src}.bn2", f"{dst}.2", batchnorm=True)
            else:
                add(f"{src}.conv_pw", f"{dst}.0.0")
                add(f"{src}.bn1", f"{dst}.0.1", batchnorm=True)
                add(f"{src}.conv_dw", f"{dst}.1.0")
                add(f"{src}.bn2", f"{dst}.1.1", batchnorm=True)
                add(f"{src}.conv_pwl", f"{dst}.2")
                add(f"{src}.bn3", f"{dst}.3", batchnorm=True)
            flat += 1
    add("conv_head", f"backbone.{flat}.0")
    add("bn2", f"backbone.{flat}.1", batchnorm=True)
    exact["classifier.weight"] = "head.classifier.weight"
    exact["classifier.bias"] = "head.classifier.bias"
    return KeyLayout(name="timm", rename=((r"^(module|_orig_mod)\.", ""),), exact=exact)


TIMM = timm_layout()


def detect_layout(keys: list[str]) -> KeyLayout:
    """Which layout a bare state dict is in, from its key names."""
    keyset = set(keys)
    stripped = {re.sub(r"^(module|_orig_mod)\.", "", k) for k in keyset}
    if "backbone.0.0.weight" in stripped:
        return OURS
    if "features.0.0.weight" in stripped:
        return TORCHVISION
    if "conv_stem.weight" in stripped:
        check_timm_depth(stripped)
        return TIMM
    if any(k.startswith(("features.0.features.", "backbone.features.0.features.")) for k in keyset):
        return MINDSPORE
    raise CheckpointError(
        "unrecognised weights: expected MobileNetV2 keys from mobilenetv2, torchvision, timm or MindSpore "
        f"(first keys: {', '.join(sorted(keys)[:3]) or 'none'})"
    )


def check_timm_depth(keys: set[str]) -> None:
    """timm's `mobilenetv2_110d` / `120d` repeat blocks more often than the seed's table: refuse them."""
    repeats: dict[int, int] = {}
    for key in keys:
        match = re.match(r"^blocks\.(\d+)\.(\d+)\.", key)
        if match:
            stage, repeat = int(match.group(1)), int(match.group(2))
            repeats[stage] = max(repeats.get(stage, 0), repeat + 1)
    found = [repeats.get(i, 0) for i in range(max(repeats, default=-1) + 1)]
    expected = [row[2] for row in SEED_INVERTED_RESIDUAL_SETTING]
    if found != expected:
        raise CheckpointError(
            f"timm checkpoint has blocks per stage {found}, the seed's MobileNetV2 has {expected}: "
            "depth-multiplied variants (mobilenetv2_110d, mobilenetv2_120d) are a different network"
        )


def _depthwise_from_mindspore(array: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    """Old MindSpore DepthwiseConv2dNative weights are (1, C, k, k); ours are (C, 1, k, k)."""
    if array.dim() == 4 and array.shape[0] == 1 and tuple(shape) == (array.shape[1], 1, *array.shape[2:]):
        return array.reshape(shape)
    return None


@dataclass
class MappedWeights:
    state_dict: dict[str, torch.Tensor]
    ignored: list[str]


def rename_keys(source: Mapping[str, torch.Tensor], layout: KeyLayout) -> MappedWeights:
    """Apply a layout's renames; refuse two source keys that land on one target."""
    renamed: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    ignored: list[str] = []
    for key, value in source.items():
        target = layout.target_key(key)
        if target is None:
            ignored.append(key)
            continue
        if target in renamed:
            raise CheckpointError(f"{layout.name} keys {origin[target]!r} and {key!r} both map to {target!r}")
        renamed[target], origin[target] = value, key
    return MappedWeights(renamed, ignored)


def apply_key_map(
    renamed: Mapping[str, torch.Tensor],
    target_state: Mapping[str, torch.Tensor],
    *,
    layout_name: str,
    skip_prefixes: tuple[str, ...] = (),
    adapt: Callable[[torch.Tensor, torch.Size], torch.Tensor | None] = _depthwise_from_mindspore,
) -> dict[str, torch.Tensor]:
    """Check renamed weights against the network's state dict key by key: present, same shape, nothing left over.

    `skip_prefixes` names target parts not to take from the source (the head, when it is filtered out).
    """
    result: dict[str, torch.Tensor] = {}
    for key, reference in target_state.items():
        if key.startswith(skip_prefixes):
            continue
        if key not in renamed:
            if key.endswith(_OPTIONAL_TARGET_SUFFIX):
                result[key] = torch.zeros_like(reference)
                continue
            raise CheckpointError(f"{layout_name} checkpoint is missing tensor {key!r}")
        value = renamed[key]
        if value.shape != reference.shape:
            adapted = adapt(value, reference.shape)
            if adapted is None:
                raise CheckpointError(
                    f"{layout_name} tensor {key!r} has shape {tuple(value.shape)}, the network needs {tuple(reference.shape)}"
                )
            value = adapted
        result[key] = value.to(reference.dtype)
    leftovers = sorted(k for k in renamed if k not in target_state and not k.startswith(skip_prefixes))
    if leftovers:
        raise CheckpointError(f"{layout_name} checkpoint has tensors the network does not: {', '.join(leftovers[:5])}")
    return result
