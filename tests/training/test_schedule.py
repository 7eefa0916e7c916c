"""The seed's learning-rate schedule and its optional linear scaling."""

import math

import pytest

from mobilenetv2.cli import main
from mobilenetv2.training.schedule import SeedSchedule, lr_scale

from conftest import records


def test_schedule_warmup_cosine_and_floor():
    schedule = SeedSchedule(lr_init=0.1, lr_max=1.0, lr_end=0.0, warmup_epochs=2, total_epochs=10, steps_per_epoch=5)
    assert schedule(0) == pytest.approx(0.1)
    assert schedule(5) == pytest.approx(0.1 + 0.9 * 5 / 10)
    assert schedule(10) == pytest.approx(1.0)
    assert schedule(30) == pytest.approx((1 + math.cos(math.pi * 20 / 40)) / 2)
    assert schedule(49) > 0 and schedule(49) < 0.01
    negative = SeedSchedule(0.0, 0.5, -1.0, 0, 1, 10)
    assert negative(9) == 0.0  # floored


def test_linear_scaling_is_offered_never_imposed(dataset, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("batch_size: 16\nlr_max: 0.08\nepochs: 1\nimage_size: 32\nwidth_mult: 0.25\nworkers: 0\n")
    common = ["train", "--config", str(recipe), "--data", str(dataset), "--max-steps", "2"]
    assert main([*common, "--output", str(tmp_path / "seed"), "--batch-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "batch size 8 differs from the recipe's 16: lr_max 0.08 used as given" in out
    assert "would use 0.04" in out
    assert max(r["lr"] for r in records(tmp_path / "seed", "step")) == pytest.approx(0.08)
    assert main([*common, "--output", str(tmp_path / "linear"), "--batch-size", "8", "--lr-scaling", "linear"]) == 0
    assert "scaled linearly by 8/16, lr_max 0.08 -> 0.04" in capsys.readouterr().out
    assert max(r["lr"] for r in records(tmp_path / "linear", "step")) == pytest.approx(0.04)
    # the recipe's own batch: nothing to say, nothing scaled
    assert main([*common, "--output", str(tmp_path / "same"), "--lr-scaling", "linear"]) == 0
    assert "differs from the recipe" not in capsys.readouterr().out
    assert max(r["lr"] for r in records(tmp_path / "same", "step")) == pytest.approx(0.08)


def test_lr_scale_factor():
    assert lr_scale(256, 128, "linear") == 2.0
    assert lr_scale(256, 128, "none") == 1.0
    assert lr_scale(256, 0, "linear") == 1.0


def test_a_diverging_run_says_so_once_and_names_the_fix(dataset, tmp_path, capsys):
    """A newcomer's run: the seed's rate (0.8, tuned for a batch of 150) at batch 8 on real photos. The loss climbs
    far above a uniform guess's; the log says the run diverges and names --lr-scaling linear with its rate, once.
    Scaled, the same run converges and says nothing."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("batch_size: 150\nlr_max: 0.8\nimage_size: 32\nwidth_mult: 0.25\nworkers: 0\nlog_every: 1\n")
    common = ["train", "--config", str(recipe), "--data", str(dataset), "--batch-size", "8", "--epochs", "3"]
    assert main([*common, "--output", str(tmp_path / "seed")]) == 0
    out = capsys.readouterr().out
    losses = [r["loss"] for r in records(tmp_path / "seed", "step")]
    assert max(losses) > 4 * math.log(3)  # it did diverge
    assert out.count("training is diverging") == 1
    assert "--lr-max 0.8 was tuned for a batch of 150 and is used as given at batch 8" in out
    assert "add --lr-scaling linear (lr_max 0.04267)" in out
    assert main([*common, "--output", str(tmp_path / "linear"), "--lr-scaling", "linear"]) == 0
    assert max(r["loss"] for r in records(tmp_path / "linear", "step")) < 4 * math.log(3)
    assert "diverging" not in capsys.readouterr().out
