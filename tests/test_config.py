"""Configuration: flag > config file > default, typed values, unknown keys refused."""

import pytest
import yaml

from mobilenetv2.cli import main
from mobilenetv2.config import TrainConfig, build_config
from mobilenetv2.errors import UserError


def test_flag_beats_file_beats_default(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("epochs: 3\nlr_max: 0.2\nbatch-size: 16\nema: 0.5\n")
    config = build_config(TrainConfig, recipe, {"epochs": 5, "ema": 0.0})
    assert config.epochs == 5 and config.ema == 0.0  # flags win, a falsy flag too
    assert config.lr_max == 0.2 and config.batch_size == 16  # the file fills what flags leave (dashes allowed)
    assert config.momentum == TrainConfig().momentum == 0.9  # defaults fill the rest
    with pytest.raises(UserError, match="unknown option"):
        build_config(TrainConfig, recipe, {"learning_rate": 0.1})
    with pytest.raises(UserError, match="is not a int"):
        build_config(TrainConfig, None, {"epochs": "many"})


def test_the_command_line_writes_the_resolved_config(dataset, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("epochs: 3\nlr_max: 0.02\nimage_size: 32\nwidth_mult: 0.25\nbatch_size: 8\n")
    run = tmp_path / "run"
    assert main(["train", "--config", str(recipe), "--data", str(dataset), "--output", str(run), "--epochs", "1",
                 "--workers", "0", "--max-steps", "1"]) == 0
    written = yaml.safe_load((run / "config.yaml").read_text())
    assert (written["epochs"], written["lr_max"], written["momentum"]) == (1, 0.02, 0.9)
    assert build_config(TrainConfig, run / "config.yaml") == build_config(TrainConfig, run / "config.yaml")
