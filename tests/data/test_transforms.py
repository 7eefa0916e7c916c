"""The seed's transforms: decoding a JPEG at reduced size changes the resampling source, never the distribution."""

import numpy as np
import pytest
import torch
from PIL import Image

from mobilenetv2.config import Preprocess
from mobilenetv2.data import transforms
from mobilenetv2.data.folders import decode_rgb

STD = torch.tensor(Preprocess().std).view(3, 1, 1)


@pytest.fixture(scope="module")
def large_jpegs(photos, tmp_path_factory):
    """Real photos at the size of a large ImageNet image (the DCT-scaled decode pays off there)."""
    folder = tmp_path_factory.mktemp("jpegs")
    paths = []
    for name in ("astronaut", "coffee", "chelsea"):
        image = Image.fromarray(photos[name])
        path = folder / f"{name}.jpg"
        image.resize((image.width * 3, image.height * 3), Image.BICUBIC).save(path, quality=92)
        paths.append(path)
    return paths


def pixel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean |a - b| in 0-255 pixel units, from normalised tensors."""
    return float(((a - b) * STD).abs().mean() * 255)


def test_reduced_decode_keeps_every_training_crop(large_jpegs, monkeypatch):
    pipeline = transforms.train_transform(Preprocess.for_image_size(96), min_scale=0.08, color_jitter=0.4)
    scales = []
    original = transforms._draft
    monkeypatch.setattr(transforms, "_draft", lambda image, scale: scales.append(original(image, scale)) or scales[-1])
    errors = []
    for draw in range(90):
        path = large_jpegs[draw % len(large_jpegs)]
        torch.manual_seed(draw)
        reduced = pipeline.finish(pipeline.decode(path))
        torch.manual_seed(draw)
        full = pipeline(decode_rgb(path))  # the same draws on the full-size decode
        errors.append(pixel_error(reduced, full))
    reduced_count = sum(scale < 1 for scale in scales[::2])  # every other entry is the full decode's no-op
    assert reduced_count > 45  # most crops need far less than the full image
    # measured: 1.4 gray levels on average, 6.4 at worst (contrast jitter amplifies), below JPEG's own q92 noise
    assert np.mean(errors) < 2.0 and max(errors) < 8.0, (np.mean(errors), max(errors))


@pytest.mark.parametrize("mode", ["short", "squash"])
def test_reduced_decode_keeps_the_eval_image(large_jpegs, mode):
    pipeline = transforms.eval_transform(Preprocess(image_size=224, resize_size=256, resize_mode=mode))
    for path in large_jpegs:
        reduced = pipeline.finish(pipeline.decode(path))
        full = pipeline(decode_rgb(path))
        assert reduced.shape == full.shape == (3, 224, 224)
        assert pixel_error(reduced, full) < 1.5


def test_crops_follow_the_seeds_distribution(large_jpegs, monkeypatch):
    """The crop boxes, taken from the reduced decode, cover the same fractions of the image as torchvision's
    RandomResizedCrop draws on the full one (independent draws, compared as distributions)."""
    from torchvision import transforms as classic

    boxes = []
    original = Image.Image.resize

    def recording(self, size, resample=None, box=None, *args, **kwargs):
        boxes.append((box, self.size))
        return original(self, size, resample, box, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recording)
    crop = transforms.SeedRandomResizedCrop(64, (0.3, 1.0), "bilinear")
    torch.manual_seed(0)
    for _ in range(400):
        with Image.open(large_jpegs[0]) as image:
            crop(image)
    areas, ratios = [], []
    for (left, top, right, bottom), (width, height) in boxes:
        areas.append((right - left) * (bottom - top) / (width * height))
        ratios.append((right - left) / (bottom - top))
    with Image.open(large_jpegs[0]) as image:
        torch.manual_seed(1)
        reference = [classic.RandomResizedCrop.get_params(image, (0.3, 1.0), (3 / 4, 4 / 3)) for _ in range(2000)]
    expected_areas = [h * w / (image.width * image.height) for _top, _left, h, w in reference]
    expected_ratios = [w / h for _top, _left, h, w in reference]
    assert 0.3 - 0.01 <= min(areas) and max(areas) <= 1 + 1e-6
    assert np.mean(areas) == pytest.approx(np.mean(expected_areas), abs=0.03)
    assert np.std(areas) == pytest.approx(np.std(expected_areas), abs=0.03)
    assert min(ratios) >= 0.75 - 0.02 and max(ratios) <= 4 / 3 + 0.02
    assert np.mean(np.log(ratios)) == pytest.approx(np.mean(np.log(expected_ratios)), abs=0.03)
