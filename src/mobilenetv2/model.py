"""The seed's MobileNetV2 network: a `backbone` (image -> feature map) and a `head` (pool -> logits), the
channel plan that weight readers match checkpoints against, and the metadata a model carries (class names and the
preprocessing contract). Nothing from training, data or deploy is imported here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torchvision.ops import StochasticDepth

from mobilenetv2.config import Preprocess
from mobilenetv2.cpu_autograd import ReLU6OwningGrad, depthwise
from mobilenetv2.metadata import describe

# t (expansion), c (output channels), n (repeats), s (first stride)
SEED_INVERTED_RESIDUAL_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32
LAST_CHANNELS = 1280


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round `value` to a multiple of `divisor`, never more than 10 % below it (the seed's `_make_divisible`)."""
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def channel_plan(width_mult: float, setting: Sequence[Sequence[int]] = SEED_INVERTED_RESIDUAL_SETTING,
                 round_nearest: int = 8) -> list[int]:
    """Output channels of every backbone stage: stem, each inverted residual block, last 1x1 conv."""
    plan = [make_divisible(STEM_CHANNELS * width_mult, round_nearest)]
    for _t, c, n, _s in setting:
        plan += [make_divisible(c * width_mult, round_nearest)] * n
    return plan + [make_divisible(LAST_CHANNELS * max(1.0, width_mult), round_nearest)]


class ConvBNReLU(nn.Sequential):
    """Convolution, BatchNorm, ReLU6; `groups == in_channels` makes it depthwise."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, groups: int = 1):
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels, eps=1e-5, momentum=0.1),
            nn.ReLU6(inplace=True),
        )


_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


def _hooked(module: nn.Module) -> bool:
    """Whether any hook could see (and keep) an activation inside `module`."""
    registry = nn.modules.module
    return (any(getattr(registry, name, None) for name in _GLOBAL_HOOKS)
            or any(getattr(m, name, None) for m in module.modules() for name in _MODULE_HOOKS))


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (3x3) -> linear project (1x1), with a skip when shapes allow."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int, drop_path: float = 0.0):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        hidden = int(round(in_channels * expand_ratio))
        self.use_residual = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(in_channels, hidden, kernel_size=1))
        layers += [
            ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels, eps=1e-5, momentum=0.1),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = out_channels
        # stochastic depth: in training, each image skips the block's branch with this probability (no parameters,
        # the identity in eval, so checkpoints and exports are the same with or without it)
        self.drop_path = StochasticDepth(drop_path, "row") if self.use_residual and drop_path > 0 else nn.Identity()

    # CPU training runs the branch's ReLU6 layers through ReLU6OwningGrad: a demo-shape step 1.05-1.06x, a 224-px
    # step 1.07x with glibc keeping freed memory (cpu_memory.py) and 1.30-1.80x without (2-core AMD EPYC Zen 4), and
    # depthwise layers on small maps through DepthwiseTinyMapGrad: a demo-shape step 1.37x with AVX2 kernels, 1.09x
    # with AVX-512 ones (benchmarks/train_throughput.py). False runs them through their modules, as other devices do.
    owning_relu6 = True
    depthwise_small_maps = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self._cpu_branch(x) if self._owns_activations(x) else self.conv(x)
        if self.use_residual:
            return x + self.drop_path(branch)
        return branch

    def _owns_activations(self, x: torch.Tensor) -> bool:
        """The CPU training path only where nothing else can read the branch's activations or their gradients: eager
        CPU training (not tracing, compiling, exporting or under a torch.func transform), and no hook anywhere in the
        branch."""
        if not (self.owning_relu6 or self.depthwise_small_maps):
            return False
        if torch.jit.is_tracing() or torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
            return False
        return (self.training and torch.is_grad_enabled() and type(x) is torch.Tensor and x.device.type == "cpu"
                and not _hooked(self.conv))

    def _cpu_branch(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.conv:
            if isinstance(layer, ConvBNReLU):
                conv, norm, relu6 = layer
                is_depthwise = conv.groups == conv.in_channels == conv.out_channels > 1
                x = norm(depthwise(conv, x) if self.depthwise_small_maps and is_depthwise else conv(x))
                # a 1x1 map is both channels-last and NCHW; stock autograd hands the next BatchNorm backward a
                # gradient whose strides pick its other kernel, so the in-place path would change the sums there
                owning = self.owning_relu6 and x.shape[-1] * x.shape[-2] > 1
                x = ReLU6OwningGrad.apply(x) if owning else relu6(x)
            else:
                x = layer(x)
        return x


class Backbone(nn.Sequential):
    """Image (N, 3, H, W) -> feature map (N, out_channels, H/32, W/32)."""

    def __init__(
        self,
        width_mult: float = 1.0,
        round_nearest: int = 8,
        inverted_residual_setting: Sequence[Sequence[int]] | None = None,
        drop_path: float = 0.0,
    ):
        setting = SEED_INVERTED_RESIDUAL_SETTING if inverted_residual_setting is None else inverted_residual_setting
        if not setting or any(len(row) != 4 for row in setting):
            raise ValueError("inverted_residual_setting must be a non-empty list of (t, c, n, s) rows")
        plan = iter(channel_plan(width_mult, setting, round_nearest))
        in_channels = next(plan)
        layers: list[nn.Module] = [ConvBNReLU(3, in_channels, stride=2)]
        blocks = sum(n for _t, _c, n, _s in setting)
        for t, _c, n, s in setting:
            for i in range(n):
                block_channels = next(plan)
                rate = drop_path * (len(layers) - 1) / blocks  # block k of `blocks` drops at drop_path * k / blocks
                layers.append(InvertedResidual(in_channels, block_channels, s if i == 0 else 1, t, rate))
                in_channels = block_channels
        out_channels = next(plan)
        layers.append(ConvBNReLU(in_channels, out_channels, kernel_size=1))
        super().__init__(*layers)
        self.out_channels = out_channels


class Head(nn.Module):
    """Global average pool, optional dropout, linear classifier. Returns logits (no softmax)."""

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(in_features, num_classes)

    def pooled(self, feature_map: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(feature_map), 1)

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """Logits from pooled features (the cached-feature path trains through this)."""
        return self.classifier(self.dropout(pooled))

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.classify(self.pooled(feature_map))


class MobileNetV2(nn.Module):
    """The seed's MobileNetV2: `backbone` then `head`.

    It carries its metadata: `class_names` (None, or one name per class) and `preprocess`, the contract an image
    goes through before the network sees it. Both travel into every checkpoint and export.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        round_nearest: int = 8,
        dropout: float = 0.0,
        inverted_residual_setting: Sequence[Sequence[int]] | None = None,
        *,
        drop_path: float = 0.0,
        class_names: Sequence[str] | None = None,
        preprocess: Preprocess | None = None,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if width_mult <= 0:
            raise ValueError(f"width_mult must be > 0, got {width_mult}")
        self.num_classes = num_classes
        self.width_mult = width_mult
        self.round_nearest = round_nearest
        self.dropout = dropout
        self.inverted_residual_setting = (None if inverted_residual_setting is None
                                          else tuple(tuple(int(v) for v in row) for row in inverted_residual_setting))
        self.backbone = Backbone(width_mult, round_nearest, inverted_residual_setting, drop_path)
        self.head = Head(self.backbone.out_channels, num_classes, dropout)
        self.class_names = class_names
        self.preprocess = preprocess if preprocess is not None else Preprocess()
        self.reset_parameters()

    @property
    def class_names(self) -> list[str] | None:
        return self._class_names

    @class_names.setter
    def class_names(self, names: Sequence[str] | None) -> None:
        if names is not None:
            names = [str(name) for name in names]
            if len(names) != self.num_classes:
                raise ValueError(f"{len(names)} class names for a {self.num_classes}-class model")
        self._class_names = names

    def architecture(self) -> dict:
        """The constructor arguments that rebuild this network, as plain data."""
        setting = self.inverted_residual_setting
        return {"num_classes": self.num_classes, "width_mult": self.width_mult, "round_nearest": self.round_nearest,
                "dropout": self.dropout,
                "inverted_residual_setting": None if setting is None else [list(row) for row in setting]}

    def metadata(self) -> dict:
        """The versioned metadata record every format we write carries (see `mobilenetv2.metadata`)."""
        return describe(self.architecture(), self.class_names, self.preprocess)

    @property
    def num_features(self) -> int:
        return self.backbone.out_channels

    def reset_parameters(self) -> None:
        """The seed's init: conv N(0, sqrt(2 / (k*k*out))), BN gamma 1 beta 0, head N(0, 0.01), zero biases."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01)
                nn.init.zeros_(module.bias)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The pooled feature vector (N, num_features) that the head's classifier consumes."""
        return self.head.pooled(self.backbone(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))
