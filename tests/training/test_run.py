"""`run_training`: bad input refused before anything is written; the caller's random state left alone."""

import shutil

import pytest
import torch


from conftest import MS_CHECKPOINT, train


@pytest.mark.parametrize("case", ["missing", "no_classes", "empty_class", "width", "conflict", "freeze_alone", "bad_amp",
                                  "no_gpu", "bad_config"])
def test_bad_input_one_line_exit_2_nothing_written(dataset, tmp_path, capsys, case):
    data = dataset
    extra = []
    if case == "missing":
        data = tmp_path / "nowhere"
    elif case == "no_classes":
        data = tmp_path / "flat"
        (data / "train").mkdir(parents=True)
    elif case == "empty_class":
        data = tmp_path / "data"
        shutil.copytree(dataset, data)
        (data / "train" / "empty").mkdir()
    elif case == "width":
        extra = ["--pretrained", str(MS_CHECKPOINT), "--filter-head"]  # checkpoint is 0.5, TINY asks 0.25
    elif case == "conflict":
        extra = ["--filter-head"]
    elif case == "freeze_alone":
        extra = ["--freeze", "backbone"]
    elif case == "bad_amp":
        extra = ["--amp", "fp8"]
    elif case == "no_gpu":
        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
        extra = ["--device", "cuda"]
    elif case == "bad_config":
        (tmp_path / "recipe.yaml").write_text("epochs: 3\nlearning_rate: 0.1\n")
        extra = ["--config", str(tmp_path / "recipe.yaml")]
    run = tmp_path / "run"
    assert train(data, run, *extra) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "error" in err
    assert not run.exists()


def test_run_training_leaves_the_callers_random_state_alone(dataset, tmp_path):
    import random

    import numpy as np

    from mobilenetv2 import TrainConfig, run_training

    config = TrainConfig(data=str(dataset), output=str(tmp_path / "run"), width_mult=0.25, image_size=32,
                         batch_size=8, workers=0, epochs=1, max_steps=2, seed=5)
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    state = run_training(config)
    assert state.global_step == 2
    assert torch.equal(torch.rand(3), expected[0]) and (random.random(), np.random.rand()) == expected[1:]
