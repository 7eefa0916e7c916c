"""The batched data backend: DataLoader workers only read file bytes; the training device decodes the whole batch
(`torchvision.io.decode_jpeg`: nvJPEG on CUDA, libjpeg-turbo on CPU, so CI runs the same code) and applies the
seed's transforms there, each image with its own draw. Files that are not JPEG, or that the batch decoder refuses,
are decoded one by one with PIL; files nothing can decode are skipped and counted, as on the PIL path. Each image
is turned upright by its EXIF orientation (read from the header on the host, applied to the decoded pixels on the
device) unless the contract says `exif: ignore`, as on the PIL path.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import transforms as classic
from torchvision.io import ImageReadMode, decode_jpeg

from mobilenetv2.config import Preprocess
from mobilenetv2.data.batched import color_jitter, normalize
from mobilenetv2.data.folders import DECODE_ERRORS, SafeImageFolder, decode_rgb, open_image
from mobilenetv2.data.orientation import read_orientation, upright_tensor
from mobilenetv2.data.transforms import resize_target

MAX_FILE_BYTES = 64 << 20  # larger files are refused before they are read
JPEG_MAGIC = b"\xff\xd8"


class EncodedFolder(SafeImageFolder):
    """An ImageFolder whose items are (the file's bytes as uint8 1-D, label, path); decoding waits for the device.
    The worker reads the header only, so files that are no image, or too large, stop here."""

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            if os.path.getsize(path) > MAX_FILE_BYTES:
                raise OSError(f"larger than {MAX_FILE_BYTES} bytes")
            with open(path, "rb") as handle:
                data = handle.read()
            open_image(io.BytesIO(data)).close()  # the header: not an image, or too large, stops here
        except DECODE_ERRORS as exc:
            warnings.warn(f"skipping unreadable image {path}: {exc}", stacklevel=1)
            return None
        return torch.frombuffer(bytearray(data), dtype=torch.uint8), label, path


def collate_encoded(batch):
    """The readable items as a list of byte tensors, their labels, how many were skipped, and their paths."""
    good = [item for item in batch if item is not None]
    labels = torch.tensor([label for _, label, _ in good], dtype=torch.long)
    return [data for data, _, _ in good], labels, len(batch) - len(good), [path for _, _, path in good]


def _pil_decode(data: torch.Tensor, exif: bool) -> torch.Tensor:
    image = decode_rgb(io.BytesIO(data.numpy().tobytes()), exif)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def _orientation(data: torch.Tensor, name: str) -> int:
    """The EXIF orientation in an encoded image's header (1 where it has none or it cannot be read)."""
    try:
        with open_image(io.BytesIO(data.numpy().tobytes())) as image:
            return read_orientation(image, name)
    except DECODE_ERRORS:
        return 1


def decode_batch(encoded: list[torch.Tensor], device: torch.device, exif: bool = True,
                 names: list[str] | None = None, check=None) -> tuple[list[torch.Tensor], dict[int, str]]:
    """Decoded RGB images (uint8, 3 x H x W, on `device`), upright unless `exif` is False, and, for each item that
    could not be decoded (or that `check(image)` refuses with one of DECODE_ERRORS), its position and the reason.
    `names` name the items in warnings."""
    jpegs = [i for i, data in enumerate(encoded) if bytes(data[:2].tolist()) == JPEG_MAGIC]
    images: list[torch.Tensor | None] = [None] * len(encoded)
    if jpegs:
        try:
            decoded = decode_jpeg([encoded[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)
            for i, image in zip(jpegs, decoded):
                images[i] = upright_tensor(image, _orientation(encoded[i], names[i] if names else "image")
                                           if exif else 1)
        except RuntimeError:  # one bad file fails the whole call: decode those one by one below
            pass
    failed = {}
    for i, data in enumerate(encoded):
        try:
            if images[i] is None:
                images[i] = _pil_decode(data, exif).to(device, non_blocking=True)
            if check is not None:
                check(images[i])
        except DECODE_ERRORS as exc:
            images[i], failed[i] = None, str(exc) or exc.__class__.__name__
    return [image for image in images if image is not None], failed


class DeviceTrainAugment:
    """The seed's train transform on decoded images of any size, on their device: RandomResizedCrop drawn on each
    full-size image (torchvision's own draw), antialiased resize to `crop_size` (0: the contract's image size),
    flip, ColorJitter and normalisation as batch ops, and `policy` (per image) before normalisation when given."""

    def __init__(self, preprocess: Preprocess, min_scale: float = 0.08, jitter: float = 0.4, crop_size: int = 0,
                 policy=None):
        self.preprocess, self.scale, self.jitter = preprocess, (min_scale, 1.0), jitter
        self.size, self.policy = crop_size or preprocess.image_size, policy
        self.mode = "bicubic" if preprocess.interpolation == "bicubic" else "bilinear"

    def __call__(self, images: list[torch.Tensor]) -> torch.Tensor:
        crops = []
        for image in images:
            top, left, height, width = classic.RandomResizedCrop.get_params(image, self.scale, (3 / 4, 4 / 3))
            crop = image[None, :, top:top + height, left:left + width].float()
            crops.append(F.interpolate(crop, size=(self.size, self.size), mode=self.mode, align_corners=False,
                                       antialias=True))
        batch = torch.cat(crops).clamp_(0, 255) / 255
        flip = torch.rand(len(batch)) < 0.5
        batch = torch.where(flip.to(batch.device).view(-1, 1, 1, 1), batch.flip(-1), batch)
        if self.jitter > 0:
            batch = color_jitter(batch, self.jitter)
        if self.policy is not None:
            batch = self.policy.on_batch(batch)
        return normalize(batch, self.preprocess)


class DeviceEvalTransform:
    """Resize (shorter side, or squash) with antialiasing, centre crop, normalise: the eval transform, on the device."""

    def __init__(self, preprocess: Preprocess):
        self.preprocess = preprocess

    def check(self, image: torch.Tensor) -> None:
        """ImageTooLarge for an image whose resize would be too long (`transforms.resize_target`)."""
        resize_target(*image.shape[-2:], self.preprocess.resize_size, self.preprocess.resize_mode)

    def __call__(self, images: list[torch.Tensor]) -> torch.Tensor:
        size, crop = self.preprocess.resize_size, self.preprocess.image_size
        out = []
        for image in images:
            target = resize_target(*image.shape[-2:], size, self.preprocess.resize_mode)
            resized = F.interpolate(image[None].float(), size=target, mode="bilinear", align_corners=False,
                                    antialias=True)
            top, left = int(round((target[0] - crop) / 2)), int(round((target[1] - crop) / 2))  # as CenterCrop
            out.append(resized[:, :, top:top + crop, left:left + crop])
        return normalize(torch.cat(out).clamp_(0, 255) / 255, self.preprocess)


def on_device(batches, transform, device: torch.device):
    """(encoded list, labels, skipped, paths) batches -> (images on `device`, labels, skipped) through `transform`;
    files the decoders refuse are skipped with a warning naming them, and counted."""
    exif = transform.preprocess.upright
    for encoded, labels, skipped, paths in batches:
        images, failed = decode_batch(encoded, device, exif, paths, getattr(transform, "check", None))
        if failed:
            for i, reason in failed.items():
                warnings.warn(f"skipping unreadable image {paths[i]}: {reason}", stacklevel=1)
            keep = torch.ones(len(labels), dtype=torch.bool)
            keep[list(failed)] = False
            labels = labels[keep]
        if not images:
            yield torch.empty(0), labels, skipped + len(failed)
            continue
        yield transform(images), labels, skipped + len(failed)
