"""Typed configuration: the preprocessing contract, the training options, YAML loading and CLI overrides.

No torch import here. A config is built once (defaults < YAML file < command-line flags) and never mutated.
Each field's `help` metadata is its `--help` text.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mobilenetv2.errors import UserError
from mobilenetv2.files import read_yaml, write_yaml  # noqa: F401  (part of this module's interface)
from mobilenetv2.preprocess import EXIF_MODES, IMAGENET_MEAN, IMAGENET_STD, Preprocess  # noqa: F401  (likewise)

# the parameter sets weight decay can apply to (TrainConfig.weight_decay_on); training/recipe.py decides membership
WEIGHT_DECAY_SETS = ("seed", "weights", "all")
OPTIMIZERS = ("sgd", "nesterov", "rmsprop-tf", "adamw")  # built by training/recipe.py
TORCHVISION_POLICIES = ("ta_wide", "augmix", "imagenet")  # data/augment.py; timm's RandAugment strings besides
RAND_AUGMENT = re.compile(r"^rand(-[a-z]+[0-9.]*)+$")  # timm's string: rand-m9-mstd0.5, rand-m7-n3-inc1, ...


def _help(text: str, **kwargs) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass(frozen=True)
class TrainConfig:
    """Every option of `mobilenetv2 train`. Defaults are the seed's GPU recipe (configs/seed_gpu.yaml)."""

    data: str = _help("dataset root holding train/<class>/... and optionally val/ (or validation_preprocess/), or "
                      "tar shards: a folder or URL with _info.json, a brace pattern, a pipe: command", default="")
    output: str = _help("run folder for logs and checkpoints (default runs/<date-time>)", default="")
    device: str = _help("auto | cpu | cuda | cuda:N", default="auto")
    # schedule
    epochs: int = _help("epochs to train", default=200)
    batch_size: int = _help("images per step per process (the global batch is this times the world size)", default=150)
    lr_init: float = _help("learning rate at the first warmup step", default=0.0)
    lr_max: float = _help("learning rate after warmup (per process batch, as in the seed)", default=0.8)
    lr_end: float = _help("learning rate the cosine or linear schedule decays to", default=0.0)
    warmup_epochs: float = _help("epochs of linear warmup from lr-init to lr-max", default=0.0)
    lr_scaling: str = _help("none (the seed's way: rates as given) | linear (every rate times batch-size / "
                            "lr-reference-batch, as timm scales by the global batch)", default="none")
    lr_reference_batch: int = _help("per-process batch the learning rates are tuned for (0: batch-size; the command "
                                    "line sets it to the recipe's batch when --batch-size overrides it)", default=0)
    max_steps: int = _help("stop after this many optimizer steps in total (0: no limit)", default=0)
    # optimizer and loss
    momentum: float = _help("SGD momentum", default=0.9)
    weight_decay: float = _help("L2 weight decay", default=4e-5)
    weight_decay_on: str = _help("the parameters weight decay applies to: seed (all but BatchNorm's scale and shift, "
                                 "as the seed's CPU/GPU path) | weights (convolution and linear weights only, as the "
                                 "seed's Ascend path) | all", default="seed")
    label_smoothing: float = _help("label smoothing epsilon: targets are 1-eps and eps/(K-1)", default=0.1)
    optimizer: str = _help("sgd (momentum SGD, the seed's) | nesterov | rmsprop-tf (TensorFlow's RMSprop as timm "
                           "has it, alpha 0.9; needs timm) | adamw", default="sgd")
    opt_eps: float = _help("epsilon of rmsprop-tf and adamw (0: the optimizer's own, 1e-10 and 1e-8)", default=0.0)
    lr_schedule: str = _help("cosine (the seed's) | linear (a straight line to lr-end: the budgeted schedule) | step "
                             "(times decay-rate every decay-epochs, as timm's); each after warmup, per step",
                             default="cosine")
    decay_epochs: float = _help("epochs between decays of the step schedule", default=2.4)
    decay_rate: float = _help("factor per decay of the step schedule", default=0.97)
    clip_grad_norm: float = _help("clip the gradients' global L2 norm to this before each step (0: off)", default=0.0)
    drop_path: float = _help("stochastic depth in training: inverted residual block k of n skips its branch per "
                             "image at rate drop_path * k / n (timm's rule; 0: off; eval and exports unchanged)",
                             default=0.0)
    # model
    width_mult: float = _help("width multiplier, channels rounded to multiples of 8 (0: the width of --pretrained, "
                              "else 1.0)", default=0.0)
    num_classes: int = _help("classifier outputs (0: the number of class folders)", default=0)
    dropout: float = _help("dropout before the classifier", default=0.0)
    image_size: int = _help("eval crop size in pixels, and the training crop's unless train-crop-size is set",
                            default=224)
    resize_size: int = _help("eval resize before the centre crop (0: image_size * 256 / 224, the seed's ratio)", default=0)
    pretrained: str = _help("checkpoint to start from (any format load_model reads), or published weights by name: "
                            "torchvision:IMAGENET1K_V1/V2, timm:mobilenetv2_050.lamb_in1k/100.ra_in1k/140.ra_in1k",
                            default="")
    filter_head: bool = _help("load everything but the head from --pretrained (full fine-tune)", default=False)
    freeze: str = _help("none | backbone (train only the head, from cached backbone features)", default="none")
    extend_classes: bool = _help("class-incremental: keep the checkpoint's head rows, add rows for new classes", default=False)
    teacher: str = _help("distil from this model file (any format load_model reads, or --teacher-arch's weights)",
                         default="")
    teacher_arch: str = _help("the teacher's architecture when it is not a MobileNetV2: torchvision:NAME or timm:NAME",
                              default="")
    distill_loss: str = _help("kl (Hinton's, at a temperature) | dist (DIST's Pearson relations)", default="kl")
    distill_temperature: float = _help("softmax temperature of the distillation loss (0: 4 for kl, 1 for dist)",
                                       default=0.0)
    distill_weight: float = _help("weight of the distillation loss", default=1.0)
    task_loss_weight: float = _help("weight of the label loss beside the distillation loss", default=1.0)
    feature_cache: str = _help("folder for cached backbone features (default OUTPUT/feature_cache)", default="")
    feature_views: int = _help("augmented views per image in the feature cache (1: eval transform only)", default=1)
    feature_runtime: str = _help("engine that runs the frozen backbone over the images: auto (on a CPU the fastest "
                                 "installed, timed here) | torch | onnx | openvino", default="auto")
    # data
    train_crop_size: int = _help("training crop size in pixels (0: image-size); smaller than the eval crop for "
                                 "FixRes-style training (train 176, eval resize 232 and crop 224)", default=0)
    progressive_resize: str = _help("MIN:MAX: the training crop grows from MIN to MAX px over --progressive-ramp, per "
                                    "epoch; eval stays --image-size (docs: guides/recipes)", default="")
    progressive_ramp: str = _help("START:END epochs (fractions allowed) of the progressive ramp, within the run "
                                  "(default 0:EPOCHS-1: the whole run, the last epoch at MAX)", default="")
    progressive_multiple: int = _help("sizes on the progressive ramp are rounded to a multiple of this (32: the "
                                      "network's stride, FFCV's; MIN and MAX are kept as given)", default=32)
    interpolation: str = _help("bilinear | bicubic: resampling of the training crop and the eval resize (travels "
                               "in the checkpoint)", default="bilinear")
    exif: str = _help("apply | ignore: photos turned upright by their EXIF orientation (as viewers show them), or "
                      "as stored (the seed's); travels in the checkpoint", default="apply")
    auto_augment: str = _help("none | ta_wide | augmix | imagenet (AutoAugment) | a timm RandAugment string such as "
                              "rand-m9-mstd0.5 (needs timm): a policy per image (docs: guides/recipes)", default="none")
    random_erase: float = _help("probability of erasing a random rectangle of each normalised training image",
                                default=0.0)
    random_erase_mode: str = _help("pixel (normal noise per pixel, timm's) | const (0, the mean colour after "
                                   "normalisation, torchvision's)", default="pixel")
    mixup_alpha: float = _help("mixup's Beta(alpha, alpha) (0: off)", default=0.0)
    cutmix_alpha: float = _help("cutmix's Beta(alpha, alpha) (0: off)", default=0.0)
    mix_prob: float = _help("probability that a batch is mixed (mixup or cutmix)", default=1.0)
    mix_switch_prob: float = _help("with both mixup and cutmix on: probability that a mixed batch uses cutmix",
                                   default=0.5)
    repeated_aug: int = _help("repeated augmentation: each image this many times per epoch, each copy augmented "
                              "apart, the copies spread across ranks (timm's RepeatAugSampler; 1: off; needs timm)",
                              default=1)
    class_weights: str = _help("loss weight per class: auto (inverse frequency) or a file (JSON list or mapping, or "
                               "one number a line)", default="")
    balanced_sampler: bool = _help("draw training images class-balanced (with replacement)", default=False)
    color_jitter: float = _help("brightness/contrast/saturation jitter of the train transform", default=0.4)
    min_scale: float = _help("smallest RandomResizedCrop area fraction", default=0.08)
    workers: int = _help("data loader worker processes", default=4)
    data_backend: str = _help("pil: DataLoader workers decode and augment each image with PIL | device: workers "
                              "only read file bytes, the training device decodes the batch (nvJPEG on CUDA) and "
                              "augments it there", default="pil")
    shard_info: str = _help("the shard manifest (_info.json, a path or URL) when --data is a shard pattern or pipe: "
                            "command with none beside its shards", default="")
    shuffle_buffer: int = _help("shard streams: samples each loader worker holds to shuffle (0: none)", default=1000)
    skip_bad_shards: bool = _help("go on without a shard that cannot be read (warned) instead of stopping",
                                  default=False)
    in_memory: bool = _help("decode the dataset once into memory and augment whole batches (small datasets such as "
                            "Fashion-MNIST; refused above 8 GiB)", default=False)
    # precision, speed, tracking
    amp: str = _help("auto | off | bf16 | fp16 (auto: bf16 on GPUs that support it; on a CPU fp32, or bf16 where this "
                     "CPU was timed training this model at this batch and size >= 1.15x faster in it)", default="auto")
    channels_last: bool = _help("run convolutions in channels-last memory format", default=True)
    compile: bool = _help("torch.compile the network the loop trains (about a minute of compiling first; not used "
                          "by head-only training)", default=False)
    dist_timeout: int = _help("seconds a rank waits for the others in a collective before the job ends (a dead rank "
                              "or node stops the job this long after it died)", default=300)
    ema: float = _help("exponential moving average decay of the weights (0: off)", default=0.0)
    ema_every: int = _help("optimizer steps between EMA updates (the decay applies per update)", default=1)
    ema_warmup: bool = _help("ramp the EMA decay up from 0 over the first updates (timm's: "
                             "1 - (1 + updates)^(-2/3), capped at --ema)", default=False)
    seed: int = _help("random seed", default=1)
    # checkpoints and eval
    resume: str = _help("checkpoint to resume from, or 'auto' for OUTPUT/checkpoints/last.pt", default="")
    save_every: int = _help("save a numbered checkpoint every N epochs", default=1)
    keep_max: int = _help("numbered checkpoints kept (oldest deleted first)", default=10)
    eval_every: int = _help("evaluate on val every N epochs (0: never)", default=1)
    eval_tta: str = _help("test-time augmentation of that eval: none, or flip (each image and its mirror, logits "
                          "averaged; twice the eval's work)", default="none")
    tensorboard: bool = _help("also write TensorBoard event files", default=False)
    log_every: int = _help("write the seed's step line every N steps (the last step of an epoch always)", default=1)

    def __post_init__(self):
        checks = [
            (self.epochs >= 1, "`epochs` must be >= 1"),
            (self.dist_timeout >= 1, "`dist_timeout` must be >= 1 (seconds)"),
            (self.batch_size >= 1, "`batch_size` must be >= 1"),
            (self.width_mult >= 0, "`width_mult` must be > 0 (or 0: from `pretrained`)"),
            (self.num_classes >= 0, "`num_classes` must be >= 0"),
            (0 <= self.label_smoothing < 1, "`label_smoothing` must be in [0, 1)"),
            (self.warmup_epochs >= 0, "`warmup_epochs` must be >= 0"),
            (self.warmup_epochs <= self.epochs, "`warmup_epochs` must not exceed `epochs`"),
            (self.freeze in ("none", "backbone"), f"`freeze` must be none or backbone, got {self.freeze!r}"),
            (self.amp in ("auto", "off", "bf16", "fp16"), f"`amp` must be auto, off, bf16 or fp16, got {self.amp!r}"),
            (not self.filter_head or bool(self.pretrained), "`filter_head` needs `pretrained`"),
            (not self.extend_classes or bool(self.pretrained), "`extend_classes` needs `pretrained`"),
            (not (self.extend_classes and self.filter_head), "`extend_classes` keeps the head; it conflicts with `filter_head`"),
            (self.freeze == "none" or bool(self.pretrained), "`freeze` backbone needs `pretrained` (a trained backbone)"),
            (0 <= self.ema < 1, "`ema` must be in [0, 1)"),
            (self.save_every >= 1 and self.keep_max >= 1, "`save_every` and `keep_max` must be >= 1"),
            (self.eval_every >= 0 and self.workers >= 0 and self.max_steps >= 0,
             "`eval_every`, `workers` and `max_steps` must be >= 0"),
            (self.eval_tta in ("none", "flip"), f"`eval_tta` must be none or flip, got {self.eval_tta!r}"),
            (self.feature_views >= 1, "`feature_views` must be >= 1"),
            (self.feature_runtime in ("auto", "torch", "onnx", "openvino"),
             f"`feature_runtime` must be auto, torch, onnx or openvino, got {self.feature_runtime!r}"),
            (self.log_every >= 1 and self.ema_every >= 1, "`log_every` and `ema_every` must be >= 1"),
            (self.image_size >= 16, "`image_size` must be >= 16"),
            (self.resize_size == 0 or self.resize_size >= self.image_size, "`resize_size` must be >= `image_size`"),
            (0 <= self.dropout < 1, "`dropout` must be in [0, 1)"),
            (self.lr_scaling in ("none", "linear"), f"`lr_scaling` must be none or linear, got {self.lr_scaling!r}"),
            (self.lr_reference_batch >= 0, "`lr_reference_batch` must be >= 0"),
            (self.weight_decay_on in WEIGHT_DECAY_SETS,
             f"`weight_decay_on` must be seed, weights or all, got {self.weight_decay_on!r}"),
            (self.train_crop_size == 0 or self.train_crop_size >= 16, "`train_crop_size` must be >= 16 (or 0)"),
            (self.interpolation in ("bilinear", "bicubic"),
             f"`interpolation` must be bilinear or bicubic, got {self.interpolation!r}"),
            (self.exif in EXIF_MODES, f"`exif` must be apply or ignore, got {self.exif!r}"),
            (self.auto_augment == "none" or self.auto_augment in TORCHVISION_POLICIES
             or bool(RAND_AUGMENT.match(self.auto_augment)),
             f"`auto_augment` must be none, ta_wide, augmix, imagenet or a RandAugment string such as "
             f"rand-m9-mstd0.5, got {self.auto_augment!r}"),
            (0 <= self.random_erase <= 1, "`random_erase` must be a probability in [0, 1]"),
            (self.random_erase_mode in ("pixel", "const"),
             f"`random_erase_mode` must be pixel or const, got {self.random_erase_mode!r}"),
            (self.mixup_alpha >= 0 and self.cutmix_alpha >= 0, "`mixup_alpha` and `cutmix_alpha` must be >= 0"),
            (0 <= self.mix_prob <= 1 and 0 <= self.mix_switch_prob <= 1,
             "`mix_prob` and `mix_switch_prob` must be probabilities in [0, 1]"),
            (self.repeated_aug >= 1, "`repeated_aug` must be >= 1"),
            (self.freeze == "none" or not (self.mixup_alpha or self.cutmix_alpha or self.random_erase
                                           or self.auto_augment != "none" or self.repeated_aug > 1),
             "`freeze` backbone trains on cached features: `auto_augment`, `random_erase`, `mixup_alpha`, "
             "`cutmix_alpha` and `repeated_aug` work on images only"),
            (self.optimizer in OPTIMIZERS, f"`optimizer` must be {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"),
            (self.opt_eps >= 0, "`opt_eps` must be >= 0"),
            (self.lr_schedule in ("cosine", "linear", "step"),
             f"`lr_schedule` must be cosine, linear or step, got {self.lr_schedule!r}"),
            (self.decay_epochs > 0 and self.decay_rate > 0, "`decay_epochs` and `decay_rate` must be > 0"),
            (self.clip_grad_norm >= 0, "`clip_grad_norm` must be >= 0"),
            (0 <= self.drop_path < 1, "`drop_path` must be in [0, 1)"),
            (self.distill_loss in ("kl", "dist"), f"`distill_loss` must be kl or dist, got {self.distill_loss!r}"),
            (self.distill_temperature >= 0 and self.distill_weight >= 0 and self.task_loss_weight >= 0,
             "`distill_temperature`, `distill_weight` and `task_loss_weight` must be >= 0"),
            (not self.teacher_arch or bool(self.teacher), "`teacher_arch` needs `teacher` (the file of its weights)"),
            (not (self.balanced_sampler and self.repeated_aug > 1), "`balanced_sampler` and `repeated_aug` both order "
             "the epoch; use one"),
            (self.data_backend in ("pil", "device"), f"`data_backend` must be pil or device, got {self.data_backend!r}"),
            (self.shuffle_buffer >= 0, "`shuffle_buffer` must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        self._check_progressive()

    def _check_progressive(self) -> None:
        if not self.progressive_resize:
            if self.progressive_ramp:
                raise UserError("`progressive_ramp` needs `progressive_resize` MIN:MAX")
            return
        low, high = self.progressive_sizes
        start, end = self.progressive_ramp_epochs
        checks = [
            (low >= 16, f"`progressive_resize` {low}:{high}: MIN must be >= 16 px (the smallest crop the network "
                        "takes here, as --train-crop-size)"),
            (low <= high, f"`progressive_resize` {low}:{high}: MIN must not exceed MAX"),
            (0 <= start <= end <= self.epochs, f"`progressive_ramp` {start:g}:{end:g} must lie within the run: "
                                               f"0 <= START <= END <= epochs ({self.epochs})"),
            (self.progressive_multiple >= 1, "`progressive_multiple` must be >= 1"),
            (not self.train_crop_size, "`progressive_resize` sets the training crop per epoch; drop "
                                       "`train_crop_size`"),
            (self.freeze == "none", "`progressive_resize` resizes training crops; `freeze` backbone trains on "
                                    "features cached at one size"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    @property
    def progressive_sizes(self) -> tuple[int, int]:
        """(MIN, MAX) of `progressive_resize`."""
        return _pair(self.progressive_resize, int, "progressive_resize", "MIN:MAX such as 32:48")

    @property
    def train_sizes(self) -> tuple[int, int]:
        """The smallest and largest training crop of the run: progressive resizing's (MIN, MAX), else the one fixed
        size (`train_crop_size`, or the eval crop `image_size`) twice."""
        if self.progressive_resize:
            return self.progressive_sizes
        size = self.train_crop_size or self.image_size
        return size, size

    @property
    def progressive_ramp_epochs(self) -> tuple[float, float]:
        """(START, END) epochs of the ramp: `progressive_ramp`, or the whole run (0 to the last epoch's start)."""
        if not self.progressive_ramp:
            return 0.0, float(max(self.epochs - 1, 0))
        return _pair(self.progressive_ramp, float, "progressive_ramp", "START:END epochs such as 2:6.5")

    @property
    def preprocess(self) -> Preprocess:
        resize = self.resize_size or Preprocess.for_image_size(self.image_size).resize_size
        return Preprocess(self.image_size, resize, interpolation=self.interpolation, exif=self.exif)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _pair(text: str, kind: type, option: str, form: str) -> tuple:
    """Two numbers written A:B."""
    parts = str(text).split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        return kind(parts[0]), kind(parts[1])
    except ValueError:
        raise UserError(f"`{option}` must be {form}, got {text!r} (quote it in YAML)") from None


def _field_type(cls, name: str) -> type:
    hint = typing.get_type_hints(cls)[name]
    if isinstance(hint, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def upgrade_legacy_options(values: dict[str, Any], source: str) -> tuple[dict[str, Any], list[str]]:
    """Options that older configs and checkpoints carry, in today's terms, with a one-line notice for each.
    `decay_bn_bias` true decayed every parameter (`weight_decay_on` all); false spared every one-dimensional
    parameter, BatchNorm's and the classifier's bias (`weight_decay_on` weights)."""
    values, notes = dict(values), []
    if "decay_bn_bias" in values:
        legacy = values.pop("decay_bn_bias")
        mapped = "all" if legacy else "weights"
        if "weight_decay_on" in values:
            notes.append(f"{source}: decay_bn_bias {legacy} ignored, weight_decay_on {values['weight_decay_on']} "
                         "is also given")
        else:
            values["weight_decay_on"] = mapped
            notes.append(f"{source}: decay_bn_bias {legacy} is read as weight_decay_on {mapped} (the option was "
                         "replaced; the default is now seed)")
    return values, notes


def build_config(cls, file: str | Path | None = None, overrides: dict[str, Any] | None = None, notify: bool = True):
    """Defaults, then the YAML file's values, then `overrides` (from flags). Unknown keys are refused; legacy ones
    are read in today's terms, with a notice on stderr unless `notify` is off."""
    values: dict[str, Any] = {}
    if file:
        values.update(read_yaml(file))
    values.update(overrides or {})
    if cls is TrainConfig:
        values, notes = upgrade_legacy_options(values, str(file or "options"))
        for note in notes if notify else ():
            print(f"mobilenetv2: notice: {note}", file=sys.stderr)
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise UserError(f"unknown option(s) {', '.join(unknown)} in {file or 'overrides'}")
    typed = {}
    for key, value in values.items():
        wanted = _field_type(cls, key)
        try:
            if wanted is bool and not isinstance(value, bool):
                raise ValueError
            typed[key] = wanted(value) if wanted is not bool else value
        except (TypeError, ValueError):
            raise UserError(f"option {key!r}: {value!r} is not a {wanted.__name__}") from None
    return cls(**typed)
