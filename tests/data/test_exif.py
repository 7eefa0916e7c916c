"""EXIF orientation: a photo stored sideways with its orientation tag (what a phone writes for a portrait photo) is
seen upright on every decoding path, as every viewer shows it; `exif: ignore` keeps the pixels as stored; a
malformed EXIF block still decodes.

Each oriented file holds the upright photo turned by the inverse of its orientation, so that applying the tag gives
the upright photo back: exactly for lossless formats, within JPEG's re-encoding noise for JPEG."""

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from conftest import cli_run, real_photos
from mobilenetv2.data import on_device
from mobilenetv2.data.folders import decode_rgb, image_folder
from mobilenetv2.data.orientation import TRANSPOSE, stored_box, upright_tensor
from mobilenetv2.data.transforms import eval_transform, train_transform
from mobilenetv2.preprocess import Preprocess

ORIENTATIONS = range(1, 9)
INVERSE = {1: None, 2: 2, 3: 3, 4: 4, 5: 5, 6: 8, 7: 7, 8: 6}  # the turn that stores an upright photo with the tag
PHOTOS = ("astronaut", "chelsea", "coffee")


def stored(upright: Image.Image, orientation: int) -> Image.Image:
    return upright if orientation == 1 else upright.transpose(TRANSPOSE[INVERSE[orientation]])


def save_oriented(upright: Image.Image, orientation: int, path, fmt: str = "JPEG", exif: bytes | None = None):
    tag = Image.Exif()
    tag[0x0112] = orientation
    options = {"quality": 95} if fmt == "JPEG" else {"lossless": True} if fmt == "WEBP" else {}
    stored(upright, orientation).save(path, fmt, exif=tag.tobytes() if exif is None else exif, **options)
    return path


def photo(name: str, size=(128, 96)) -> Image.Image:
    """A real photo, not square (a quarter turn changes its shape), small enough that no reduced decode happens,
    its sides multiples of 16 (JPEG's 4:2:0 blocks: the stored turn is re-encoded on the same block grid)."""
    return Image.fromarray(real_photos()[name]).resize(size, Image.BILINEAR)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF", "JPEG"])
def test_all_eight_orientations_decode_upright_in_every_format_pil_reads_the_tag_from(tmp_path, fmt):
    upright = photo("astronaut")
    for orientation in ORIENTATIONS:
        path = save_oriented(upright, orientation, tmp_path / f"o{orientation}.{fmt.lower()}", fmt)
        image = decode_rgb(path)
        assert image.size == upright.size, orientation
        with Image.open(path) as raw:  # PIL's own reading of the tag, as viewers apply it
            expected = np.asarray(ImageOps.exif_transpose(raw).convert("RGB"))
        assert np.array_equal(np.asarray(image), expected), orientation
        if fmt != "JPEG":
            assert np.array_equal(np.asarray(image), np.asarray(upright)), orientation
        as_stored = np.asarray(decode_rgb(path, exif=False))
        assert orientation == 1 or as_stored.shape != expected.shape or not np.array_equal(as_stored, expected)


def test_tensor_turns_and_crop_boxes_match_pil_for_every_orientation():
    upright = photo("chelsea", (37, 23))  # odd sides: an off-by-one in a flip shows
    for orientation in ORIENTATIONS:
        stored_pixels = torch.from_numpy(np.asarray(stored(upright, orientation))).permute(2, 0, 1)
        turned = upright_tensor(stored_pixels, orientation).permute(1, 2, 0).numpy()
        assert np.array_equal(turned, np.asarray(upright)), orientation
        top, left, height, width = 3, 5, 11, 20  # a box in the upright photo
        s_top, s_left, s_height, s_width = stored_box((top, left, height, width), (stored_pixels.shape[2],
                                                                                   stored_pixels.shape[1]), orientation)
        crop = upright_tensor(stored_pixels[:, s_top:s_top + s_height, s_left:s_left + s_width], orientation)
        assert np.array_equal(crop.permute(1, 2, 0).numpy(), np.asarray(upright)[top:top + height, left:left + width])


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_the_training_crop_and_the_eval_resize_see_the_photo_upright(tmp_path, fmt):
    """The same seed draws the same crop of the upright photo whatever the orientation (the draw is on the upright
    size); the eval resize is the upright photo's. Sizes cover the full decode and libjpeg's reduced one."""
    upright = photo("coffee", (200, 150))
    reference = tmp_path / f"upright.{fmt.lower()}"
    upright.save(reference, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    noise = 0 if fmt == "PNG" else 6  # mean absolute difference in 8-bit levels that JPEG re-encoding may cause
    for size in (48, 160):  # 48: a crop that may be decoded at 1/2 or 1/4 scale; 160: decoded full size
        preprocess = Preprocess(image_size=size, resize_size=size + size // 8)
        crop, resize = train_transform(preprocess, 0.3, 0.0, normalized=False), eval_transform(preprocess)
        for orientation in ORIENTATIONS:
            path = save_oriented(upright, orientation, tmp_path / f"o{orientation}.{fmt.lower()}", fmt)
            torch.manual_seed(orientation)
            expected = crop.geometry.from_file(reference).float()
            torch.manual_seed(orientation)
            got = crop.geometry.from_file(path).float()
            # a crop resampled in the stored orientation and then turned: rounding may differ by one level
            assert (got - expected).abs().mean() <= max(noise, 0.5), (size, orientation)
            want, have = resize.decode(reference), resize.decode(path)
            assert have.size == want.size
            difference = np.abs(np.asarray(have, dtype=float) - np.asarray(want, dtype=float)).mean()
            assert difference <= noise, (size, orientation)
            if orientation in (2, 5, 6, 7, 8):  # mirrored or turned: ignoring the tag is far off
                ignored = eval_transform(Preprocess(image_size=size, resize_size=size + size // 8, exif="ignore"))
                as_stored = np.asarray(ignored.decode(path), dtype=float)
                assert as_stored.shape != np.asarray(want).shape or np.abs(as_stored - np.asarray(want)).mean() > 10


def test_the_device_decoder_turns_each_image_as_pil_does(tmp_path):
    upright = photo("astronaut")
    paths = [save_oriented(upright, o, tmp_path / f"o{o}.jpg") for o in ORIENTATIONS]
    paths.append(save_oriented(upright, 6, tmp_path / "o6.png", "PNG"))  # PIL's fallback inside the batch
    encoded = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in paths]
    images, failed = on_device.decode_batch(encoded, torch.device("cpu"))
    assert not failed
    for path, image in zip(paths, images):
        with Image.open(path) as raw:
            pil = np.asarray(ImageOps.exif_transpose(raw).convert("RGB"), dtype=float)
        assert image.shape[1:] == pil.shape[:2]
        assert np.abs(image.permute(1, 2, 0).numpy() - pil).mean() < 1.5  # libjpeg-turbo against PIL's libjpeg
    as_stored, _ = on_device.decode_batch(encoded, torch.device("cpu"), exif=False)
    assert [tuple(i.shape[1:]) for i in as_stored[5:8]] == [(128, 96)] * 3  # 6, 7, 8 as stored: on their side


def test_a_malformed_exif_block_decodes_as_stored_with_a_warning_naming_the_file(tmp_path):
    upright = photo("chelsea")
    broken = save_oriented(upright, 6, tmp_path / "broken.jpg", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff")
    outside = save_oriented(upright, 6, tmp_path / "outside.jpg")
    data = outside.read_bytes()
    tag = Image.Exif()
    tag[0x0112] = 9  # not an orientation
    outside.write_bytes(data)
    stored(upright, 6).save(outside, "JPEG", quality=95, exif=tag.tobytes())
    for path in (broken, outside):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            image = decode_rgb(path)
            eval_transform(Preprocess(image_size=32, resize_size=36)).decode(path)
        assert image.size == (96, 128)  # as stored
        messages = [str(w.message) for w in caught]
        assert messages and all(path.name in m for m in messages), messages
    # in a training folder it is read, not skipped
    root = tmp_path / "tree" / "cat"
    root.mkdir(parents=True)
    broken.rename(root / "broken.jpg")
    dataset = image_folder(root.parent, eval_transform(Preprocess(image_size=32, resize_size=36)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert dataset[0] is not None


# ------------------------------------------------------------------ whole commands, a trained network


@pytest.fixture(scope="module")
def oriented(pretrained_five, fashion, tmp_path_factory):
    """Fashion-MNIST val photos (two per class of the five the network knows), 64 x 48 JPEGs: upright, and stored
    with each orientation, as folders `eval` reads. Beside each oriented file, as lossless PNG, its own pixels turned
    upright by the test (as decoded by PIL, and by libjpeg-turbo as the device backend decodes): the exact input the
    network must see."""
    from torchvision.io import decode_jpeg

    from conftest import FIVE_CLASSES

    root = tmp_path_factory.mktemp("exif")
    for name in FIVE_CLASSES:
        for index, source in enumerate(sorted((fashion / "val" / name).iterdir())[:2]):
            image = Image.open(source).convert("RGB").resize((64, 48), Image.BILINEAR)
            for orientation in ORIENTATIONS:
                stem = f"{index}_o{orientation}"
                for folder in ("upright", "turned", "exact-pil", "exact-device"):
                    (root / folder / "val" / name).mkdir(parents=True, exist_ok=True)
                image.save(root / "upright" / "val" / name / f"{stem}.jpg", quality=95)
                path = save_oriented(image, orientation, root / "turned" / "val" / name / f"{stem}.jpg")
                turn = Image.Transpose(TRANSPOSE[orientation]) if orientation > 1 else None
                pil = decode_rgb(path, exif=False)
                (pil.transpose(turn) if turn is not None else pil).save(root / "exact-pil" / "val" / name / f"{stem}.png")
                device = decode_jpeg(torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8))
                Image.fromarray(upright_tensor(device, orientation).permute(1, 2, 0).numpy()).save(
                    root / "exact-device" / "val" / name / f"{stem}.png")
    return pretrained_five, root


def _predictions(checkpoint, paths, *extra):
    result = cli_run(["predict", "--checkpoint", str(checkpoint), "--json", "--topk", "5", "--runtime", "torch",
                      *extra, *map(str, paths)])
    assert result.returncode == 0, result.stderr[-2000:]
    return [{p["class"]: p["probability"] for p in answer["predictions"]} for answer in json.loads(result.stdout)]


def _top1(answer: dict) -> str:
    return max(answer, key=answer.get)


def test_predict_gives_every_orientation_the_upright_photos_answer_and_ignore_does_not(oriented):
    checkpoint, root = oriented
    turned = sorted((root / "turned" / "val").rglob("*.jpg"))
    answers = _predictions(checkpoint, turned)
    exact = _predictions(checkpoint, [root / "exact-pil" / p.relative_to(root / "turned").with_suffix(".png")
                                      for p in turned])
    upright = _predictions(checkpoint, [root / "upright" / p.relative_to(root / "turned") for p in turned])
    for path, answer, pixels, photo_answer in zip(turned, answers, exact, upright):
        assert max(abs(answer[c] - pixels[c]) for c in answer) < 1e-5, path  # exactly its own pixels, upright
        assert _top1(answer) == _top1(photo_answer), path  # and the upright photo's answer, within JPEG's noise
        assert max(abs(answer[c] - photo_answer[c]) for c in answer) < 0.1, path
    ignored = _predictions(checkpoint, turned, "--exif", "ignore")
    changed = [p for p, a, b in zip(turned, ignored, upright) if _top1(a) != _top1(b)]
    assert len(changed) >= len(turned) // 4, "sideways, the network should get several wrong"
    assert all("_o1" not in p.name for p in changed)


@pytest.mark.parametrize("backend", ["pil", "device"])
def test_eval_counts_every_orientation_as_its_upright_pixels_on_folders_and_shards(oriented, tmp_path, backend):
    import shutil

    checkpoint, root = oriented

    def confusion(data, *extra):
        report = tmp_path / "report.json"
        result = cli_run(["eval", "--checkpoint", str(checkpoint), "--data", str(data), "--runtime", "torch",
                          "--workers", "0", "--data-backend", backend, "--json", str(report), *extra])
        assert result.returncode == 0, result.stderr[-2000:]
        answer = json.loads(report.read_text())  # the loss too: a small change in any logit shows there
        return answer["confusion_matrix"], round(answer["loss"], 5)

    exact = confusion(root / f"exact-{backend}")
    assert confusion(root / "turned") == exact
    assert confusion(root / "turned", "--exif", "ignore") != exact
    shutil.copytree(root / "turned" / "val", tmp_path / "tree" / "train")
    shards = tmp_path / "shards"
    assert cli_run(["data", "shard", str(tmp_path / "tree"), str(shards)]).returncode == 0
    assert confusion(shards) == exact


def test_in_memory_training_data_is_held_upright(oriented):
    from mobilenetv2.data import batched

    _checkpoint, root = oriented
    classes = sorted(p.name for p in (root / "turned" / "val").iterdir())
    held = {folder: batched.decode_all(image_folder(root / folder / "val", None, classes, exif=exif), 48, 0)[0]
            for folder, exif in (("turned", True), ("exact-pil", True))}
    assert torch.equal(held["turned"], held["exact-pil"])
    as_stored = batched.decode_all(image_folder(root / "turned" / "val", None, classes, exif=False), 48, 0)[0]
    assert not torch.equal(as_stored, held["exact-pil"])


def test_serve_classifies_a_sideways_photo_as_its_upright_pixels(oriented):
    pytest.importorskip("fastapi")
    from serving.live_server import Server

    checkpoint, root = oriented
    turned = sorted((root / "turned" / "val").rglob("*_o[3568].jpg"))[:12]
    exact = _predictions(checkpoint, [root / "exact-pil" / p.relative_to(root / "turned").with_suffix(".png")
                                      for p in turned])
    server = Server(checkpoint, "--runtime", "torch")
    try:
        for path, reference in zip(turned, exact):
            status, raw, _ = server.request("/v1/classify?topk=5", path.read_bytes(), {"Content-Type": "image/jpeg"})
            assert status == 200
            answer = {p["class"]: p["probability"] for p in json.loads(raw)["predictions"]}
            assert max(abs(answer[c] - reference[c]) for c in answer) < 1e-5, path
    finally:
        server.stop()


def test_exif_ignore_travels_from_training_into_the_checkpoint_and_predict_follows_it(oriented, tmp_path):
    from mobilenetv2.checkpoint import load_model

    _checkpoint, root = oriented
    data = tmp_path / "data"
    shutil_copy = __import__("shutil").copytree
    shutil_copy(root / "turned" / "val", data / "train")
    result = cli_run(["train", "--data", str(data), "--output", str(tmp_path / "run"), "--epochs", "1",
                      "--width-mult", "0.25", "--image-size", "32", "--batch-size", "8", "--workers", "0",
                      "--exif", "ignore", "--eval-every", "0", "--in-memory"])
    assert result.returncode == 0, result.stderr[-2000:]
    trained = tmp_path / "run" / "checkpoints" / "last.pt"
    assert load_model(trained).preprocess.exif == "ignore"
    sideways = sorted((data / "train").rglob("*_o6.jpg"))[:3]
    follows = _predictions(trained, sideways)
    assert follows == _predictions(trained, sideways, "--exif", "ignore")
    assert follows != _predictions(trained, sideways, "--exif", "apply")
