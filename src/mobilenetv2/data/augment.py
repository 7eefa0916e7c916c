"""The train-time policies past the seed's crop, flip and jitter, described once and applied by every data path:
an automatic augmentation policy per image (torchvision's TrivialAugment-Wide, AugMix and AutoAugment-ImageNet, or
timm's RandAugment from its config string such as `rand-m9-mstd0.5`), random erasing per image after normalisation
(torchvision's RandomErasing), and batch mixing (torchvision's MixUp and CutMix) with soft targets.

The image path (`--data-backend pil`) runs the policy in its DataLoader workers, one image at a time, under that
image's own seed; the device and in-memory paths run it on each image of the batch in the training process. Erasing
and mixing run in the training process on every path. Every draw comes from torch's, Python's or NumPy's global
generators of the process that makes it, so a run's draws follow from its seed, whatever the worker count, and a
resumed run (which restores those generators) draws what the uninterrupted one drew.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from mobilenetv2.config import TORCHVISION_POLICIES
from mobilenetv2.errors import UserError

_INTERPOLATION = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
                  "nearest": InterpolationMode.NEAREST}


def seeded_call(seed: int, function, *args):
    """`function(*args)` with torch's, Python's and NumPy's global generators seeded by `seed` (each draw of an
    augmentation comes from them), then put back as they were: the caller's streams are untouched."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            # the CPU generator alone: torch.manual_seed also queues a seed for every accelerator backend, and
            # without CUDA initialised each queued call records a stack trace (about a millisecond per image)
            torch.default_generator.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % (1 << 32))
            return function(*args)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


class ImagePolicy:
    """An automatic augmentation policy on one uint8 (3, H, W) image, returning uint8 (3, H, W) on its device."""

    def __init__(self, name: str, image_size: int, mean: tuple[float, float, float], interpolation: str):
        if name in TORCHVISION_POLICIES:
            mode = _INTERPOLATION[interpolation]
            self.policy = {"ta_wide": lambda: T.TrivialAugmentWide(interpolation=mode),
                           "augmix": lambda: T.AugMix(interpolation=mode),
                           "imagenet": lambda: T.AutoAugment(T.AutoAugmentPolicy.IMAGENET, interpolation=mode)}[name]()
            self.on_pil = False
        else:
            self.policy, self.on_pil = _timm_rand_augment(name, image_size, mean, interpolation), True

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if not self.on_pil:
            return self.policy(pixels)
        image = Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy())
        return torch.from_numpy(np.asarray(self.policy(image)).copy()).permute(2, 0, 1).to(pixels.device)

    def on_batch(self, batch: torch.Tensor) -> torch.Tensor:
        """The policy on each image of a float batch in [0, 1] (its own draw each), through 8-bit pixels."""
        pixels = batch.mul(255).round_().clamp_(0, 255).to(torch.uint8)
        return torch.stack([self(image) for image in pixels]).to(batch.dtype).div_(255)


def _timm_rand_augment(name: str, image_size: int, mean, interpolation: str):
    """timm's RandAugment with the hyper-parameters its transforms factory gives it (translation 45 % of the
    image, fill with the mean colour)."""
    try:
        from timm.data.auto_augment import rand_augment_transform
    except ImportError:
        raise UserError(f"`auto_augment` {name} is timm's RandAugment: pip install 'mobilenetv2[recipes]'") from None
    hparams = {"translate_const": int(image_size * 0.45), "img_mean": tuple(min(255, round(255 * x)) for x in mean),
               "interpolation": Image.BICUBIC if interpolation == "bicubic" else Image.BILINEAR}
    try:
        return rand_augment_transform(name, hparams)
    except (AssertionError, ValueError, KeyError, IndexError) as exc:
        raise UserError(f"`auto_augment` {name!r} is not a RandAugment string timm reads ({exc or 'bad part'})") from None


class RandomErase:
    """torchvision's RandomErasing on each image of a normalised batch, with its own draw: a rectangle of 2-33 % of
    the image, aspect 0.3-3.3, set to 0 (`const`, the mean colour after normalisation, as torchvision's recipe) or to
    normal noise per pixel (`pixel`, as timm's recipes)."""

    def __init__(self, probability: float, mode: str = "pixel"):
        self.erase = T.RandomErasing(p=probability, value="random" if mode == "pixel" else 0, inplace=True)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.clone()
        for image in batch:  # each a view: erased in place, one draw per image
            self.erase(image)
        return batch


@dataclass(frozen=True)
class BatchMixer:
    """MixUp or CutMix on a batch (torchvision's; one draw per batch, each image mixed with its neighbour) with
    probability `probability`; with both on, CutMix with probability `switch`. Mixed labels are soft targets
    (N, classes) whose rows sum to one; the seed's label smoothing then applies to them (loss.py)."""

    mixup_alpha: float
    cutmix_alpha: float
    switch: float
    probability: float
    num_classes: int

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if len(labels) < 2 or torch.rand(1).item() >= self.probability:
            return images, labels
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or torch.rand(1).item() < self.switch)
        mix = (T.CutMix(alpha=self.cutmix_alpha, num_classes=self.num_classes) if use_cutmix
               else T.MixUp(alpha=self.mixup_alpha, num_classes=self.num_classes))
        return mix(images, labels)


def batch_mixer(config, num_classes: int) -> BatchMixer | None:
    """The run's batch mixing, or None when mixup and cutmix are both off."""
    if not config.mixup_alpha and not config.cutmix_alpha:
        return None
    return BatchMixer(config.mixup_alpha, config.cutmix_alpha, config.mix_switch_prob, config.mix_prob, num_classes)


def image_policy(config, preprocess) -> ImagePolicy | None:
    """The run's per-image policy at the training crop size (the largest under progressive resizing), or None."""
    if config.auto_augment == "none":
        return None
    return ImagePolicy(config.auto_augment, config.train_sizes[1], preprocess.mean, preprocess.interpolation)


@dataclass(frozen=True)
class BatchOps:
    """What the training process does to every normalised batch, whichever path made it: erase, then mix."""

    erase: RandomErase | None
    mix: BatchMixer | None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.erase is not None:
            images = self.erase(images)
        if self.mix is not None:
            images, labels = self.mix(images, labels)
        return images, labels


def batch_ops(config, num_classes: int) -> BatchOps | None:
    """The run's erasing and mixing, or None when both are off."""
    erase = RandomErase(config.random_erase, config.random_erase_mode) if config.random_erase > 0 else None
    mix = batch_mixer(config, num_classes)
    return BatchOps(erase, mix) if erase is not None or mix is not None else None
