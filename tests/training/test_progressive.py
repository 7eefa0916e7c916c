"""Progressive resizing and the linear schedule: the training crop's size per epoch follows the schedule on every
data path (read back from the batches the loop trains on), a resume in the middle of the ramp is bit-identical,
each epoch record names its size, the linear schedule's rates are the hand-computed ones, and bad values end in one
line with exit code 2."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, assert_same_weights, one_line_exit_2, real_photos, records
from mobilenetv2.cli import main
from mobilenetv2.config import TrainConfig
from mobilenetv2.data import shards
from mobilenetv2.training import loop
from mobilenetv2.training.schedule import LinearSchedule, ResolutionSchedule, schedule_for

# 4 epochs of 3 steps (24 images, batch 8); 16 px until epoch 1, up to 48 by epoch 3, rounded to 16 px:
# epoch 0 and 1 at 16, epoch 2 at 16 + 32 * (2 - 1) / (3 - 1) = 32, epoch 3 at 48
PROGRESSIVE = ["--epochs", "4", "--image-size", "48", "--progressive-resize", "16:48", "--progressive-ramp", "1:3",
               "--progressive-multiple", "16", "--seed", "5", "--ema", "0.5"]
EXPECTED_SIZES = [16, 16, 32, 48]
STEPS_PER_EPOCH = 3


@pytest.fixture(scope="module")
def odd_tree(tmp_path_factory):
    """Real photos cropped to odd and even, portrait and landscape sizes, as JPEG and PNG: 3 classes x 8 train and
    x 4 val."""
    root = tmp_path_factory.mktemp("odd_tree")
    rng = np.random.default_rng(11)
    photos = real_photos()
    for split, count in (("train", 8), ("val", 4)):
        for name in ("astronaut", "chelsea", "coffee"):
            folder = root / split / name
            folder.mkdir(parents=True)
            photo = photos[name]
            for i in range(count):
                width, height = (int(v) for v in rng.integers(37, 91, 2))
                crop = Image.fromarray(photo).resize((width, height))
                crop.save(folder / f"{name}_{i}.{'png' if i % 3 == 0 else 'jpg'}")
    return root


@pytest.fixture(scope="module")
def odd_shards(odd_tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("odd_shards") / "shards"
    shards.write_shards(odd_tree, out, shards.parse_size("64kB"))
    return out


PATHS = {"pil": [], "device": ["--data-backend", "device"], "in-memory": ["--in-memory"],
         "shards-pil": [], "shards-device": ["--data-backend", "device"]}


def _train_recording(monkeypatch, data, output, *extra):
    """Train with TINY settings, recording the side of every batch the loop steps on."""
    sizes = []
    real_step = loop.train_step

    def recording(trainable, inputs, labels, *args, **kwargs):
        assert inputs.shape[-1] == inputs.shape[-2]
        sizes.append(inputs.shape[-1])
        return real_step(trainable, inputs, labels, *args, **kwargs)

    monkeypatch.setattr(loop, "train_step", recording)
    code = main(["train", "--data", str(data), "--output", str(output), *TINY, *extra])
    monkeypatch.setattr(loop, "train_step", real_step)
    assert code == 0
    return sizes


@pytest.mark.parametrize("path", list(PATHS))
def test_crop_size_follows_the_schedule_and_a_resume_mid_ramp_is_bit_identical(path, odd_tree, odd_shards, tmp_path,
                                                                               monkeypatch, capsys):
    data = odd_shards if path.startswith("shards") else odd_tree
    common = [*PROGRESSIVE, *PATHS[path]]
    straight = _train_recording(monkeypatch, data, tmp_path / "straight", *common)
    per_epoch = [straight[i:i + STEPS_PER_EPOCH] for i in range(0, len(straight), STEPS_PER_EPOCH)]
    assert per_epoch == [[size] * STEPS_PER_EPOCH for size in EXPECTED_SIZES]
    out = capsys.readouterr().out
    assert "training size 16 px from epoch 1" in out and "training size 32 px from epoch 3" in out
    assert "training size 48 px from epoch 4" in out
    epochs = records(tmp_path / "straight", "epoch")
    assert [r["train_size"] for r in epochs] == EXPECTED_SIZES
    assert all(r["skipped_images"] == 0 for r in epochs)  # odd sizes, JPEG and PNG: nothing skipped
    assert epochs[-1]["eval_count"] == 12

    # stop inside the third epoch (32 px, mid-ramp), then resume: the same steps at the same sizes, the same weights
    first = _train_recording(monkeypatch, data, tmp_path / "split", *common, "--max-steps", "7")
    second = _train_recording(monkeypatch, data, tmp_path / "split", *common, "--resume", "auto")
    assert first + second == straight
    assert "training size 32 px from epoch 3" in capsys.readouterr().out  # the resumed run says where it is
    assert_same_weights(tmp_path / "straight", tmp_path / "split")


def test_without_progressive_resizing_every_epoch_records_the_fixed_crop(dataset, tmp_path, monkeypatch):
    sizes = _train_recording(monkeypatch, dataset, tmp_path / "run", "--epochs", "2", "--train-crop-size", "24")
    assert sizes == [24] * 6
    assert [r["train_size"] for r in records(tmp_path / "run", "epoch")] == [24, 24]


def test_resolution_schedule_by_hand():
    ffcv = ResolutionSchedule(160, 192, 65, 76, 32)  # FFCV's ResNet-50 88-epoch ImageNet config
    # 160 + 32 * (e - 65) / 11: 174.5 at 70 rounds to 160, 177.5 at 71 to 192
    assert [ffcv(e) for e in (0, 65, 66, 70, 71, 75, 76, 87)] == [160, 160, 160, 160, 192, 192, 192, 192]
    fine = ResolutionSchedule(32, 64, 0.5, 4.5, 8)  # fractional ramp: 36, 44, 52, 60 at epochs 1-4, halves up
    assert [fine(e) for e in range(6)] == [32, 40, 48, 56, 64, 64]
    assert [ResolutionSchedule(40, 40)(e) for e in range(3)] == [40, 40, 40]
    assert ResolutionSchedule(33, 47, 0, 2, 32)(1) == 33  # rounding never leaves [MIN, MAX]
    config = TrainConfig(epochs=5, progressive_resize="32:64", progressive_multiple=8)
    assert config.progressive_ramp_epochs == (0.0, 4.0)  # the default ramp ends at the last epoch: it trains at MAX


def test_linear_schedule_rates_by_hand(dataset, tmp_path):
    schedule = LinearSchedule(lr_init=0.01, lr_max=0.1, lr_end=0.001, warmup_epochs=0.5, total_epochs=2,
                              steps_per_epoch=4)
    by_hand = [0.01, 0.055, 0.1, 0.1 - 0.099 / 6, 0.1 - 0.099 * 2 / 6, 0.1 - 0.099 * 3 / 6, 0.1 - 0.099 * 4 / 6,
               0.1 - 0.099 * 5 / 6]
    assert [schedule(step) for step in range(8)] == pytest.approx(by_hand)
    assert LinearSchedule(0.0, 0.5, -1.0, 0, 1, 10)(9) == 0.0  # floored
    scaled = schedule_for(TrainConfig(lr_schedule="linear", lr_init=0.01, lr_max=0.1, lr_end=0.001, warmup_epochs=0.5,
                                      epochs=2, batch_size=16, lr_reference_batch=8, lr_scaling="linear"), 4)
    assert [scaled(step) for step in range(8)] == pytest.approx([2 * rate for rate in by_hand])
    # the loop steps at these rates: 24 images at batch 8 are 3 steps an epoch
    assert main(["train", "--data", str(dataset), "--output", str(tmp_path / "run"), *TINY, "--epochs", "2",
                 "--lr-schedule", "linear", "--lr-init", "0.01", "--lr-max", "0.1", "--lr-end", "0.001",
                 "--warmup-epochs", "1"]) == 0
    rates = [r["lr"] for r in records(tmp_path / "run", "step")]
    assert rates == pytest.approx([0.01, 0.04, 0.07, 0.1, 0.1 - 0.099 / 3, 0.1 - 0.099 * 2 / 3])


@pytest.mark.parametrize("flags,message", [
    (["--progressive-resize", "64:32"], "MIN must not exceed MAX"),
    (["--progressive-resize", "8:48"], "MIN must be >= 16 px"),
    (["--progressive-resize", "32:48", "--progressive-ramp", "1:5"], "must lie within the run"),
    (["--progressive-resize", "32:48", "--progressive-ramp", "3:1"], "must lie within the run"),
    (["--progressive-resize", "32:48", "--progressive-ramp=-1:2"], "must lie within the run"),
    (["--progressive-resize", "48"], "--progressive-resize must be MIN:MAX such as 32:48"),
    (["--progressive-resize", "32:x"], "--progressive-resize must be MIN:MAX such as 32:48"),
    (["--progressive-resize", "32:48", "--progressive-ramp", "a:b"], "--progressive-ramp must be START:END"),
    (["--progressive-ramp", "1:2"], "--progressive-ramp needs --progressive-resize"),
    (["--progressive-resize", "32:48", "--progressive-multiple", "0"], "--progressive-multiple must be >= 1"),
    (["--progressive-resize", "32:48", "--train-crop-size", "40"], "drop --train-crop-size"),
])
def test_bad_progressive_values_are_one_line_exit_2(capsys, dataset, tmp_path, flags, message):
    err = one_line_exit_2(capsys, ["train", "--data", str(dataset), "--output", str(tmp_path / "run"), "--epochs", "4",
                                   *flags])
    assert message in err and not (tmp_path / "run").exists()


def test_a_yaml_recipe_takes_the_quoted_form_and_refuses_the_unquoted_one(dataset, tmp_path, capsys):
    """YAML 1.1 reads an unquoted 32:48 as the base-60 integer 1968: refused with a hint, not misread."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("epochs: 2\nprogressive_resize: 32:48\n")
    err = one_line_exit_2(capsys, ["train", "--config", str(recipe), "--data", str(dataset)])
    assert "quote it in YAML" in err
    recipe.write_text("epochs: 2\nprogressive_resize: '16:32'\nprogressive_multiple: 8\nimage_size: 32\n"
                      "width_mult: 0.25\nbatch_size: 8\nworkers: 0\n")
    assert main(["train", "--config", str(recipe), "--data", str(dataset), "--output", str(tmp_path / "run")]) == 0
    assert [r["train_size"] for r in records(tmp_path / "run", "epoch")] == [16, 32]
