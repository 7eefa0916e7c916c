"""The device data backend: bytes read by workers, decoded and augmented as a batch on the training device (here
the CPU: the same torchvision calls nvJPEG serves on CUDA)."""

import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mobilenetv2.config import Preprocess
from mobilenetv2.data import on_device
from mobilenetv2.data.folders import decode_rgb, image_folder
from mobilenetv2.data.transforms import eval_transform, train_transform

from conftest import TINY, records, torchrun

CPU = torch.device("cpu")
STD = torch.tensor(Preprocess().std).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def photo_files(photos, tmp_path_factory):
    """Real photos as JPEGs of several sizes, one PNG, and two files nothing can decode."""
    folder = tmp_path_factory.mktemp("files")
    paths = []
    for index, name in enumerate(("astronaut", "coffee", "chelsea", "rocket")):
        path = folder / f"{name}.jpg"
        image = Image.fromarray(photos[name])
        image.resize((image.width * (1 + index % 2), image.height * (1 + index % 2))).save(path, quality=90)
        paths.append(path)
    Image.fromarray(photos["china"]).save(folder / "china.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8" + os.urandom(500))  # JPEG magic, then noise
    (folder / "notes.jpg").write_text("not an image at all")
    return paths, folder / "china.png", [folder / "broken.jpg", folder / "notes.jpg"]


def encoded(paths):
    return [torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8) for path in paths]


def test_eval_matches_the_pil_path_on_real_photos(photo_files):
    jpegs, png, _bad = photo_files
    for mode in ("short", "squash"):
        preprocess = Preprocess(image_size=160, resize_size=182, resize_mode=mode)
        images, failed = on_device.decode_batch(encoded(jpegs + [png]), CPU)
        assert failed == {} and len(images) == 5
        ours = on_device.DeviceEvalTransform(preprocess)(images)
        pil = torch.stack([eval_transform(preprocess)(decode_rgb(path)) for path in jpegs + [png]])
        errors = ((ours - pil) * STD).abs().mean(dim=(1, 2, 3)) * 255  # gray levels per image
        assert ours.shape == pil.shape == (5, 3, 160, 160)
        assert float(errors.max()) < 2.0, errors


def test_files_nothing_can_decode_are_skipped_and_counted(photo_files):
    jpegs, png, bad = photo_files
    batch = encoded([bad[0], jpegs[0], png, bad[1]])
    images, failed = on_device.decode_batch(batch, CPU)
    assert list(failed) == [0, 3] and all(failed.values()) and len(images) == 2
    assert images[1].shape == (3,) + np.asarray(Image.open(png)).shape[:2]  # the PNG, decoded by PIL
    labels = torch.tensor([7, 1, 2, 9])
    names = [str(bad[0]), str(jpegs[0]), str(png), str(bad[1])]
    with pytest.warns(UserWarning) as seen:
        out = list(on_device.on_device([(batch, labels, 1, names)],
                                       on_device.DeviceEvalTransform(Preprocess.for_image_size(64)), CPU))
    skipped_lines = [str(w.message) for w in seen if 'skipping' in str(w.message)]
    assert [line.split(': ')[0] for line in skipped_lines] == [f'skipping unreadable image {names[0]}',
                                                              f'skipping unreadable image {names[3]}']
    (inputs, kept, skipped), = out
    assert kept.tolist() == [1, 2] and skipped == 3 and inputs.shape == (2, 3, 64, 64)


def test_training_draws_follow_the_pil_paths_distributions(photo_files):
    """Statistics over many draws (not one image): crop scale, flips and colour jitter alike on both paths."""
    path = photo_files[0][1]
    preprocess = Preprocess.for_image_size(64)
    pil_pipeline = train_transform(preprocess, min_scale=0.08, color_jitter=0.4)
    augment = on_device.DeviceTrainAugment(preprocess, min_scale=0.08, jitter=0.4)
    image = on_device.decode_batch(encoded([path]), CPU)[0][0]
    torch.manual_seed(0)
    ours = augment([image] * 400)
    pil = torch.stack([pil_pipeline(decode_rgb(path)) for _ in range(400)])

    def statistics(batch):
        pixels = batch * STD + torch.tensor(Preprocess().mean).view(1, 3, 1, 1)
        brightness = pixels.mean(dim=(1, 2, 3))
        contrast = pixels.std(dim=(1, 2, 3))
        left_heavy = (pixels[..., :32].mean(dim=(1, 2, 3)) > pixels[..., 32:].mean(dim=(1, 2, 3))).float()
        detail = (pixels[..., 1:] - pixels[..., :-1]).abs().mean(dim=(1, 2, 3))  # small crops, blown up, are smooth
        return brightness, contrast, left_heavy, detail

    # measured (ours / PIL): brightness 0.371 / 0.375, contrast 0.269 / 0.276, left-heavy 0.50 / 0.50,
    # detail 0.0329 / 0.0336 (with crops of 0.9-1.0 instead of 0.08-1, detail rose to 0.042)
    tolerance = {"brightness": 0.04, "contrast": 0.04, "left-heavy": 0.1, "detail": 0.003}
    for name, a, b in zip(tolerance, statistics(ours), statistics(pil)):
        assert float(a.mean()) == pytest.approx(float(b.mean()), abs=tolerance[name]), name
        assert float(a.std()) == pytest.approx(float(b.std()), abs=tolerance[name]), name


def test_labels_are_the_pil_paths_labels(dataset):
    classes = ["chelsea", "astronaut", "coffee"]  # a numbering other than the folders' order
    pil = image_folder(dataset / "val", None, classes)
    encoded_folder = image_folder(dataset / "val", None, classes, kind=on_device.EncodedFolder)
    assert [label for _, label, _ in encoded_folder] == pil.targets
    assert encoded_folder.samples == pil.samples


def test_torchrun_trains_and_evaluates_every_image_once(dataset, tmp_path):
    run = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "mobilenetv2", "train", "--data", str(dataset), "--output", str(run), *TINY,
               "--batch-size", "4", "--epochs", "1", "--amp", "off", "--data-backend", "device"]
    result = torchrun(command, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert records(run, "epoch")[-1]["eval_count"] == 15  # 15 val images over 2 ranks, none padded
