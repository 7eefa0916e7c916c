"""Images from the wild: odd but valid files are decoded (the same way on every path), broken ones are skipped and
counted with their path and reason, and nothing decodes an image larger than the pixel bound."""

import io
import os
import shutil
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import real_photos, records, train
from mobilenetv2.cli import main
from mobilenetv2.config import Preprocess
from mobilenetv2.data import folders, on_device
from mobilenetv2.data.transforms import eval_transform, train_transform

ODD = ["gray.jpg", "cmyk.jpg", "progressive.jpg", "gray16.png", "rgba.png", "palette_alpha.png", "exif_rotated.jpg",
       "photo.webp", "animated.gif", "photo.bmp", "photo.tiff", "UPPER.JPG", "one_pixel.png"]
BROKEN = ["truncated.jpg", "empty.jpg", "text.jpg", "page.png", "random.jpg", "bomb.png", "dangling.jpg"]


def write_odd(folder, photo: np.ndarray) -> dict[str, np.ndarray]:
    """The odd but valid files, each with the RGB pixels it should decode to (None: only its size is known)."""
    folder.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(photo)
    gray = image.convert("L")
    expected = {}
    gray.save(folder / "gray.jpg", quality=95)
    expected["gray.jpg"] = np.asarray(gray.convert("RGB"))
    image.convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    expected["cmyk.jpg"] = photo
    image.save(folder / "progressive.jpg", quality=95, progressive=True)
    expected["progressive.jpg"] = photo
    wide = (np.asarray(gray).astype(np.uint16) * 257)  # 16-bit: the 8-bit values scaled up exactly
    Image.fromarray(wide).save(folder / "gray16.png")
    expected["gray16.png"] = np.asarray(gray.convert("RGB"))
    rgba = image.convert("RGBA")
    alpha = np.full(photo.shape[:2], 255, np.uint8)
    alpha[:, : photo.shape[1] // 2] = 0  # left half transparent
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(folder / "rgba.png")
    composited = photo.copy()
    composited[:, : photo.shape[1] // 2] = 255
    expected["rgba.png"] = composited
    palette = image.quantize(64)
    palette.info["transparency"] = 0
    palette.save(folder / "palette_alpha.png", transparency=0)
    expected["palette_alpha.png"] = None
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": applied, as viewers show it (data/test_exif.py: all eight)
    image.save(folder / "exif_rotated.jpg", quality=95, exif=exif)
    expected["exif_rotated.jpg"] = np.asarray(image.transpose(Image.Transpose.ROTATE_270))
    image.save(folder / "photo.webp", lossless=True)
    expected["photo.webp"] = photo
    frames = [Image.new("RGB", (40, 30), (200, 30, 30)), Image.new("RGB", (40, 30), (30, 30, 200))]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:])
    expected["animated.gif"] = np.asarray(frames[0])  # the first frame
    image.save(folder / "photo.bmp")
    expected["photo.bmp"] = photo
    image.save(folder / "photo.tiff")
    expected["photo.tiff"] = photo
    image.save(folder / "UPPER.JPG", quality=95)
    expected["UPPER.JPG"] = photo
    Image.new("RGB", (1, 1), (10, 200, 30)).save(folder / "one_pixel.png")
    expected["one_pixel.png"] = np.array([[[10, 200, 30]]], np.uint8)
    return expected


def write_broken(folder, good_jpeg: bytes) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "truncated.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not an image\n")
    (folder / "page.png").write_text("<!doctype html><html><body>404 Not Found</body></html>")
    (folder / "random.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    Image.new("1", (10_000, 9_000)).save(folder / "bomb.png")  # 90 M pixels in a few kB
    os.symlink(folder / "no_such_file.jpg", folder / "dangling.jpg")


@pytest.fixture(scope="module")
def wild(photos, tmp_path_factory):
    root = tmp_path_factory.mktemp("wild")
    photo = np.asarray(Image.fromarray(photos["chelsea"]).resize((120, 90)))
    expected = write_odd(root / "odd", photo)
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, format="JPEG")
    write_broken(root / "broken", buffer.getvalue())
    return root, expected


@pytest.mark.parametrize("name", ODD)
def test_odd_files_decode_to_their_pixels(wild, name):
    root, expected = wild
    image = folders.decode_rgb(root / "odd" / name)
    assert image.mode == "RGB"
    pixels = np.asarray(image, dtype=int)
    if expected[name] is None:  # palette with a transparent entry: opaque pixels kept, the transparent one white
        with Image.open(root / "odd" / name) as original:
            transparent = np.asarray(original) == 0
        assert transparent.any() and (pixels[transparent] == 255).all()
        return
    assert pixels.shape == expected[name].shape
    # lossless formats exactly; JPEG re-encodings (and CMYK's colour conversion) within a few grey levels
    assert np.abs(pixels - expected[name]).mean() < 6, np.abs(pixels - expected[name]).mean()


@pytest.mark.parametrize("name", ODD)
def test_every_path_decodes_odd_files_alike(wild, name):
    """Eval from the file, train from the file and the device backend see the same image decode_rgb sees."""
    root, _expected = wild
    path = root / "odd" / name
    preprocess = Preprocess(image_size=32, resize_size=36)
    pipeline = eval_transform(preprocess)
    reference = pipeline(folders.decode_rgb(path))
    assert (pipeline.finish(pipeline.decode(path)) - reference).abs().mean() < 0.05
    decoded, failed = on_device.decode_batch([torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)],
                                             torch.device("cpu"))
    assert not failed
    on_device_image = on_device.DeviceEvalTransform(preprocess)(decoded)[0]
    assert (on_device_image - reference).abs().mean() < 0.1, name
    train = train_transform(preprocess, normalized=False)
    torch.manual_seed(0)
    from_file = train.finish(train.decode(path)).float()
    torch.manual_seed(0)
    from_image = train(folders.decode_rgb(path)).float()
    assert (from_file - from_image).abs().mean() < 3.0, name


@pytest.mark.parametrize("name", BROKEN)
def test_broken_files_are_refused_with_their_reason(wild, name):
    root, _expected = wild
    path = root / "broken" / name
    start = time.perf_counter()
    with pytest.raises(folders.DECODE_ERRORS) as caught:
        folders.decode_rgb(path)
    if name == "bomb.png":  # refused from the header: nothing decoded
        assert "more than the" in str(caught.value) and time.perf_counter() - start < 0.5
    pipeline = train_transform(Preprocess.for_image_size(32))
    with pytest.raises(folders.DECODE_ERRORS):
        pipeline.decode(path)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        dataset = folders.image_folder(root, pipeline)
        dataset.samples = [(str(path), 0)]
        assert dataset[0] is None
        encoded = folders.image_folder(root, None, kind=on_device.EncodedFolder)
        encoded.samples = [(str(path), 0)]
        batch = on_device.collate_encoded([encoded[0]])  # a header that reads stops only at the device's decode
        decoded = list(on_device.on_device([batch], on_device.DeviceEvalTransform(Preprocess.for_image_size(32)),
                                           torch.device("cpu")))
        assert decoded[0][1].tolist() == [] and decoded[0][2] == 1  # nothing kept, one skipped
    messages = [str(w.message) for w in seen if "skipping" in str(w.message)]
    assert len(messages) == 2 and all(f"skipping unreadable image {path}: " in m for m in messages), messages


@pytest.fixture(scope="module")
def wild_dataset(wild, dataset, tmp_path_factory):
    """The tiny dataset, with every odd file added to one class and every broken file to another."""
    root, _expected = wild
    target = tmp_path_factory.mktemp("wild_dataset")
    shutil.copytree(dataset, target, dirs_exist_ok=True, symlinks=True)
    for name in ODD:
        shutil.copy(root / "odd" / name, target / "train" / "chelsea" / name)
    for name in BROKEN:
        shutil.copy(root / "broken" / name, target / "train" / "coffee" / name, follow_symlinks=False)
    return target


@pytest.mark.parametrize("backend", ["pil", "device"])
def test_training_uses_the_odd_files_and_counts_the_broken_ones(wild_dataset, tmp_path, backend):
    run = tmp_path / backend
    # a gentle rate: at batch 4 the tiny set's default rate (0.05) reached losses of 18 and, on one CPU, NaN; what
    # is checked here is which files are read, not learning
    assert train(wild_dataset, run, "--epochs", "1", "--batch-size", "4", "--amp", "off", "--lr-max", "0.01",
                 "--data-backend", backend) == 0
    (epoch,) = records(run, "epoch")
    assert epoch["skipped_images"] == len(BROKEN)
    assert epoch["steps"] == (24 + len(ODD) + len(BROKEN)) // 4
    assert f"skipped {len(BROKEN)} unreadable image(s)" in (run / "train.log").read_text()


def test_a_class_of_only_broken_files_is_refused_before_training(wild, dataset, tmp_path, capsys):
    root, _expected = wild
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    shutil.copytree(root / "broken", data / "train" / "broken", symlinks=True)
    assert train(data, tmp_path / "run", "--epochs", "1") == 2
    err = capsys.readouterr().err
    assert "class folder" in err and "broken holds no readable images" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_predict_answers_the_good_files_and_names_each_bad_one(wild, tmp_path, capsys):
    from mobilenetv2 import MobileNetV2, save_model

    root, _expected = wild
    checkpoint = tmp_path / "model.pt"
    save_model(MobileNetV2(num_classes=3, width_mult=0.25, class_names=["a", "b", "c"]), checkpoint)
    good = [str(root / "odd" / name) for name in ("gray.jpg", "rgba.png", "one_pixel.png")]
    bad = [str(root / "broken" / name) for name in ("empty.jpg", "bomb.png", "dangling.jpg")]
    code = main(["predict", "--checkpoint", str(checkpoint), good[0], bad[0], good[1], bad[1], good[2], bad[2],
                 "--topk", "2"])
    out, err = capsys.readouterr()
    assert code == 2
    assert [line for line in out.splitlines() if not line.startswith(" ")] == good
    err_lines = err.strip().splitlines()
    assert len(err_lines) == 3 and all(path in line for path, line in zip(bad, err_lines)), err_lines
    assert "more than the" in err_lines[1]
    assert main(["predict", "--checkpoint", str(checkpoint), *good]) == 0


def _thin(path, size):
    Image.new("RGB", size, (90, 140, 200)).save(path)
    return path


def test_an_image_whose_resize_would_be_too_long_is_refused_before_it_is_resized_on_every_path(tmp_path, capsys):
    """100000 x 1 pixels pass the pixel limit, but the short-side resize would scale the 1-pixel side to the resize
    size and the long side to millions of pixels: predict names it (exit 2), eval skips and counts it on both data
    backends, and the transforms refuse it from its size, before any resampling."""
    from mobilenetv2 import MobileNetV2, save_model

    checkpoint = tmp_path / "model.pt"
    save_model(MobileNetV2(num_classes=2, width_mult=0.25, class_names=["a", "b"],
                           preprocess=Preprocess(image_size=32, resize_size=36)), checkpoint)
    root = tmp_path / "data" / "val"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        Image.fromarray(real_photos()["coffee"][:300, :400]).save(root / name / "good.jpg")
    wide, tall = _thin(root / "a" / "wide.png", (100_000, 1)), _thin(root / "b" / "tall.png", (1, 100_000))
    assert wide.stat().st_size < 1000  # a small file asking for gigabytes once resized
    for path in (wide, tall):
        with pytest.raises(folders.ImageTooLarge, match="longer than 16:1"):
            eval_transform(Preprocess(image_size=32, resize_size=36)).decode(path)
    assert main(["predict", "--checkpoint", str(checkpoint), str(wide)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "wide.png" in err and "longer than 16:1" in err
    for backend in ("pil", "device"):
        with pytest.warns(UserWarning, match="skipping unreadable image .*(wide|tall).png"):
            assert main(["eval", "--checkpoint", str(checkpoint), "--data", str(root.parent), "--runtime", "torch",
                         "--workers", "0", "--data-backend", backend]) == 0
        assert "evaluated 2 images, skipped 2 unreadable" in capsys.readouterr().out
    panorama = _thin(tmp_path / "panorama.png", (2400, 300))  # 8:1 still passes
    assert eval_transform(Preprocess(image_size=32, resize_size=36)).decode(panorama).size == (288, 36)
