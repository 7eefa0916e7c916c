"""`eval --tta`: the views each mode averages, a mirror-symmetric image gains nothing from flipping, flip-crops
cuts its crops from the resized square, and the same counts alone and under torchrun."""

import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import one_line_exit_2, torchrun
from mobilenetv2 import MobileNetV2, save_model
from mobilenetv2.cli import main
from mobilenetv2.config import Preprocess
from mobilenetv2.evaluation import with_tta

CLASSES = ["astronaut", "chelsea", "coffee"]


def test_each_mode_averages_its_views():
    seen = []

    def recording(images):
        seen.append(images.clone())
        return images.mean(dim=(2, 3))[:, :2] * 0 + len(seen)  # logits 1, 2, 3, ... per call

    images = torch.arange(2 * 3 * 6 * 8, dtype=torch.float32).view(2, 3, 6, 8)
    assert with_tta(recording, "none", 4) is recording
    assert torch.equal(with_tta(recording, "flip", 4)(images), torch.full((2, 2), 1.5))
    assert torch.equal(seen[0], images) and torch.equal(seen[1], images.flip(-1))
    seen.clear()
    assert torch.equal(with_tta(recording, "flip-crops", 4)(images), torch.full((2, 2), 5.5))  # mean of 1..10
    crops = [images[..., :4, :4], images[..., :4, 4:], images[..., 2:, :4], images[..., 2:, 4:], images[..., 1:5, 2:6]]
    assert len(seen) == 10
    for index, crop in enumerate(crops):
        assert torch.equal(seen[2 * index], crop) and torch.equal(seen[2 * index + 1], crop.flip(-1))
    with pytest.raises(ValueError):
        with_tta(recording, "flip-crops", 7)(images)


def _calibrated_model(photos, resize_size):
    """A small network whose BatchNorm statistics come from real photos, so its logits depend on the image."""
    torch.manual_seed(0)
    model = MobileNetV2(num_classes=3, width_mult=0.25, class_names=CLASSES,
                        preprocess=Preprocess(image_size=32, resize_size=resize_size))
    batch = torch.stack([torch.from_numpy(np.ascontiguousarray(photos[name][:64:2, :64:2])).permute(2, 0, 1)
                         for name in CLASSES]).float() / 255
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
    torch.nn.init.normal_(model.head.classifier.weight, std=1.0)
    with torch.no_grad():
        model.train()((batch - 0.45) / 0.225)
    return model.eval()


def _folder(root, photos, symmetric):
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for i, top in enumerate((0, 30, 60)):
            crop = photos[name][top:top + 32, top:top + 32].copy()
            if symmetric:
                crop[:, 16:] = crop[:, :16][:, ::-1]
            Image.fromarray(crop).save(root / name / f"{i}.png")
    return root


def _eval(capsys, folder, checkpoint, tta, report):
    assert main(["eval", "--data", str(folder), "--checkpoint", str(checkpoint), "--workers", "0", "--runtime",
                 "torch", "--tta", tta, "--json", str(report)]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("result:"))
    return json.loads(report.read_text()), line


def test_flip_on_mirror_symmetric_images_equals_plain_eval(photos, tmp_path, capsys):
    checkpoint = tmp_path / "model.pt"
    save_model(_calibrated_model(photos, 32), checkpoint)
    symmetric, ordinary = _folder(tmp_path / "sym", photos, True), _folder(tmp_path / "plain", photos, False)
    plain, line = _eval(capsys, symmetric, checkpoint, "none", tmp_path / "a.json")
    flipped, flip_line = _eval(capsys, symmetric, checkpoint, "flip", tmp_path / "b.json")
    assert "tta=" not in line and flip_line.endswith("tta=flip") and flipped["tta"] == "flip"
    assert flipped["count"] == plain["count"] == 9
    assert flipped["loss"] == pytest.approx(plain["loss"], rel=1e-6)
    assert flipped["confusion_matrix"] == plain["confusion_matrix"]
    # on photos that are not symmetric the mirror is another view, and the averaged logits differ
    plain, _ = _eval(capsys, ordinary, checkpoint, "none", tmp_path / "c.json")
    flipped, _ = _eval(capsys, ordinary, checkpoint, "flip", tmp_path / "d.json")
    assert abs(flipped["loss"] - plain["loss"]) > 1e-4


def test_flip_crops_alone_and_under_torchrun(photos, tmp_path, capsys):
    checkpoint = tmp_path / "model.pt"
    save_model(_calibrated_model(photos, 40), checkpoint)  # crops of 32 from the 40 px square
    folder = _folder(tmp_path / "data", photos, False)
    plain, _ = _eval(capsys, folder, checkpoint, "none", tmp_path / "plain.json")
    crops, line = _eval(capsys, folder, checkpoint, "flip-crops", tmp_path / "crops.json")
    assert line.endswith("tta=flip-crops") and crops["count"] == plain["count"] == 9
    assert abs(crops["loss"] - plain["loss"]) > 1e-4
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "mobilenetv2", "eval", "--data", str(folder), "--checkpoint", str(checkpoint), "--workers", "0",
               "--runtime", "torch", "--tta", "flip-crops", "--batch-size", "2", "--json", str(tmp_path / "ddp.json")]
    result = torchrun(command, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    ddp = json.loads((tmp_path / "ddp.json").read_text())
    assert ddp["count"] == 9 and ddp["confusion_matrix"] == crops["confusion_matrix"]
    assert ddp["loss"] == pytest.approx(crops["loss"], rel=1e-5)


def test_an_unknown_tta_mode_is_one_line_exit_2(photos, tmp_path, capsys):
    checkpoint = tmp_path / "model.pt"
    save_model(_calibrated_model(photos, 32), checkpoint)
    line = one_line_exit_2(capsys, ["eval", "--data", str(_folder(tmp_path / "d", photos, False)), "--checkpoint",
                                    str(checkpoint), "--tta", "rotate"])
    assert "tta" in line


@pytest.mark.parametrize("in_memory", [False, True])
def test_the_per_epoch_eval_with_flip_is_eval_tta_flip_of_the_checkpoint(dataset, tmp_path, capsys, in_memory):
    """`train --eval-tta flip`: the epoch record's top-1 is what `eval --tta flip` gives the checkpoint it saved, and
    differs from the plain eval's count on real photos (the mirrors change answers)."""
    from conftest import TINY_TRAIN, last_eval

    run = tmp_path / "run"
    assert main(["train", "--data", str(dataset), "--output", str(run), *TINY_TRAIN, "--epochs", "1",
                 "--batch-size", "8", "--lr-max", "0.02", "--eval-tta", "flip",
                 *(["--in-memory"] if in_memory else [])]) == 0
    record = last_eval(run)
    capsys.readouterr()
    results = {}
    for mode in ("none", "flip"):
        assert main(["eval", "--data", str(dataset), "--checkpoint", str(run / "checkpoints" / "last.pt"),
                     "--runtime", "torch", "--workers", "0", "--batch-size", "8", "--tta", mode,
                     "--json", str(tmp_path / f"{mode}.json")]) == 0
        results[mode] = json.loads((tmp_path / f"{mode}.json").read_text())
    assert record["eval_top1"] == results["flip"]["top1"] and record["eval_loss"] == pytest.approx(
        results["flip"]["loss"], rel=1e-4)
    assert results["flip"]["loss"] != results["none"]["loss"]
    err = one_line_exit_2(capsys, ["train", "--data", str(dataset), "--output", str(tmp_path / "bad"), *TINY_TRAIN,
                                   "--eval-tta", "flip-crops"])
    assert "`eval_tta` must be none or flip" in err or "--eval-tta must be none or flip" in err
