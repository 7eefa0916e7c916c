"""The seed's transforms: decoding a JPEG at reduced size changes the resampling source, never the distribution."""

import numpy as np
import pytest
import torch
from PIL import Image

from mobilenetv2.config import Preprocess
from mobilenetv2.data import batched, transforms
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


def same_draw_errors(first, second, paths, draws: int) -> list[float]:
    """`pixel_error` of first(path) against second(path), both run with the same seed, for `draws` seeds."""
    errors = []
    for draw in range(draws):
        path = paths[draw % len(paths)]
        torch.manual_seed(draw)
        a = first(path)
        torch.manual_seed(draw)
        errors.append(pixel_error(a, second(path)))
    return errors


def test_reduced_decode_keeps_every_training_crop(large_jpegs, monkeypatch):
    pipeline = transforms.train_transform(Preprocess.for_image_size(96), min_scale=0.08, color_jitter=0.4)
    scales = []
    original = transforms._draft
    monkeypatch.setattr(transforms, "_draft", lambda image, scale: scales.append(original(image, scale)) or scales[-1])
    errors = same_draw_errors(lambda path: pipeline.finish(pipeline.decode(path)),
                              lambda path: pipeline(decode_rgb(path)), large_jpegs, 90)  # vs a full-size decode
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


@pytest.fixture(scope="module")
def photo_jpegs(photos, tmp_path_factory):
    """Real photos at their own size (about ImageNet's), where training crops are decoded in full."""
    folder = tmp_path_factory.mktemp("photo_jpegs")
    paths = []
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        path = folder / f"{name}.jpg"
        Image.fromarray(photos[name]).save(path, quality=90)
        paths.append(path)
    return paths


def torchvision_train(preprocess: Preprocess):
    from torchvision.transforms import v2 as T

    return T.Compose([T.RandomResizedCrop(preprocess.image_size, antialias=True), T.RandomHorizontalFlip(),
                      T.ColorJitter(0.4, 0.4, 0.4), T.ToImage(), T.ToDtype(torch.float32, scale=True),
                      T.Normalize(preprocess.mean, preprocess.std)])


def test_training_images_are_torchvisions_with_the_same_draws(photo_jpegs):
    """Our train pipeline (uint8 crop, flip and jitter, decoded from the file) makes the same random draws as
    torchvision's standard one on a full PIL decode, in the same order, so with one seed both give the same image."""
    preprocess = Preprocess.for_image_size(224)
    ours, reference = transforms.train_transform(preprocess), torchvision_train(preprocess)
    errors = same_draw_errors(lambda path: ours.finish(ours.decode(path)), lambda path: reference(decode_rgb(path)),
                              photo_jpegs, 80)
    # measured: 0.06 gray levels on average, 1.6 at worst (two JPEG decoders, two resampling kernels)
    assert np.mean(errors) < 0.3 and max(errors) < 3.0, (np.mean(errors), max(errors))


@pytest.mark.parametrize("order", [[0, 1, 2, 3], [1, 0, 3, 2], [2, 1, 0, 3], [3, 2, 0, 1]])
def test_jitter_is_pils_arithmetic(photos, order):
    """Brightness and contrast composed into one table give what PIL's ImageEnhance steps give one after another."""
    from torchvision.transforms.v2 import functional as TF

    image = Image.fromarray(photos["coffee"])
    factors = {0: 1.31, 1: 0.68, 2: 1.22}
    expected = image
    for step in order:
        expected = {0: TF.adjust_brightness, 1: TF.adjust_contrast, 2: TF.adjust_saturation,
                    3: lambda im, _factor: im}[step](expected, factors.get(step, 0))
    got = np.asarray(transforms.jitter_image(image, order, factors[0], factors[1], factors[2]), dtype=int)
    difference = np.abs(got - np.asarray(expected, dtype=int))
    assert difference.max() <= 2 and (difference == 0).mean() > 0.99, (difference.max(), (difference == 0).mean())


def test_uint8_output_is_the_normalised_output(photo_jpegs):
    preprocess = Preprocess.for_image_size(96)
    raw = transforms.train_transform(preprocess, normalized=False)
    normalised = transforms.train_transform(preprocess)
    torch.manual_seed(3)
    pixels = torch.stack([raw.finish(raw.decode(path)) for path in photo_jpegs])
    torch.manual_seed(3)
    expected = torch.stack([normalised.finish(normalised.decode(path)) for path in photo_jpegs])
    assert pixels.dtype == torch.uint8 and pixels.shape == (4, 3, 96, 96)
    torch.testing.assert_close(batched.normalize_bytes(pixels, preprocess), expected)
    torch.testing.assert_close(batched.normalize_bytes(pixels, preprocess),
                               batched.normalize(pixels.float() / 255, preprocess), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["png", "gray.jpg", "cmyk.jpg"])
def test_every_decoder_path_gives_the_same_crop(photos, tmp_path, kind):
    """Files decode_jpeg does not take (PNG) or might read differently (greyscale, CMYK JPEG) give the crop PIL's
    decode of the same file gives."""
    image = Image.fromarray(photos["astronaut"])
    image = {"png": image, "gray.jpg": image.convert("L"), "cmyk.jpg": image.convert("CMYK")}[kind]
    path = tmp_path / f"photo.{kind}"
    image.save(path)
    pipeline = transforms.train_transform(Preprocess.for_image_size(128), min_scale=0.5, normalized=False)
    for seed in range(6):
        torch.manual_seed(seed)
        from_file = pipeline.finish(pipeline.decode(path)).int()
        torch.manual_seed(seed)
        from_pil = pipeline(decode_rgb(path)).int()
        # measured: PNG 0 (the same decoder), greyscale JPEG under 0.5, CMYK JPEG up to 1.2 (colour conversions differ)
        assert (from_file - from_pil).abs().float().mean() < 2.0, (kind, seed)


# ImageNet's common sizes (odd sides, both orientations) and small odd ones; every output size a run may train at
PROPERTY_SIZES = [(333, 500), (500, 333), (375, 500), (500, 375), (667, 1001), (1001, 667), (37, 91), (91, 37),
                  (65, 48), (224, 224)]
PROPERTY_OUTPUTS = [16, 32, 48, 96, 128, 160, 224]


@pytest.mark.parametrize("kind", ["jpg", "png"])
def test_no_valid_image_is_refused_by_the_crop_at_any_size_draw_or_output(photos, tmp_path, kind):
    """The DCT-reduced decode rounds each side up on its own (333 px at 1/2 is 167): a crop box mapped with the
    width's ratio alone passed the reduced image's bottom edge for up to 2 % of draws at these sizes. Every draw of
    every size must give the output size."""
    draws = 100 if kind == "jpg" else 4  # PNG has no reduced decode; a few draws show it takes the same path
    refused = []
    for width, height in PROPERTY_SIZES:
        path = tmp_path / f"{width}x{height}.{kind}"
        Image.fromarray(photos["astronaut"]).resize((width, height), Image.BICUBIC).save(path)
        for size in PROPERTY_OUTPUTS:
            crop = transforms.SeedRandomResizedCrop(size, (0.08, 1.0), "bilinear")
            torch.manual_seed(width * 7 + height * 13 + size)
            for draw in range(draws):
                try:
                    out = crop.from_file(path)
                except ValueError as exc:  # what the worker reported as an unreadable image
                    refused.append((width, height, size, draw, str(exc)))
                    continue
                assert out.shape == (3, size, size) and out.dtype == torch.uint8
    assert refused == [], f"{len(refused)} refused, first {refused[:3]}"
