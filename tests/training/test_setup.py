"""Model setup per mode: full fine-tune, incremental, width taken from the pretrained checkpoint."""

import torch

from mobilenetv2 import load_model
from mobilenetv2.cli import main

from conftest import MS_CHECKPOINT, train


def test_full_finetune_from_mindspore_with_filter_head(dataset, tmp_path):
    run = tmp_path / "run"
    assert train(dataset, run, "--pretrained", str(MS_CHECKPOINT), "--filter-head", "--width-mult", "0.5",
                 "--max-steps", "1", "--lr-max", "0", "--epochs", "1") == 0
    source, tuned = load_model(MS_CHECKPOINT), load_model(run / "checkpoints" / "last.pt")
    assert tuned.num_classes == 3 and source.num_classes == 10
    for key, value in source.state_dict().items():
        if key.startswith("backbone.") and key.endswith(".weight") and value.dim() == 4:
            assert torch.equal(value, tuned.state_dict()[key]), key


def test_incremental_learning_continues_the_whole_network(dataset, tmp_path):
    first = tmp_path / "first"
    assert train(dataset, first, "--epochs", "1") == 0
    second = tmp_path / "second"
    assert train(dataset, second, "--pretrained", str(first / "checkpoints/last.pt"), "--epochs", "1",
                 "--lr-max", "0", "--max-steps", "1") == 0
    before, after = load_model(first / "checkpoints/last.pt"), load_model(second / "checkpoints/last.pt")
    torch.testing.assert_close(after.head.classifier.weight, before.head.classifier.weight, atol=0, rtol=0)


def test_width_comes_from_the_pretrained_checkpoint_when_not_given(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(dataset), "--output", str(run), "--pretrained", str(MS_CHECKPOINT),
                 "--filter-head", "--image-size", "32", "--batch-size", "8", "--workers", "0", "--max-steps", "1",
                 "--epochs", "1"]) == 0
    assert load_model(run / "checkpoints" / "last.pt").width_mult == 0.5
    assert "width_mult: 0.5" in (run / "config.yaml").read_text()
    # an explicit width that disagrees is still refused, naming the flag
    assert main(["train", "--data", str(dataset), "--output", str(tmp_path / "other"), "--pretrained",
                 str(MS_CHECKPOINT), "--filter-head", "--width-mult", "1.0", "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "has width 0.5 but --width-mult is 1.0" in err and "`" not in err
    assert not (tmp_path / "other").exists()


def test_without_a_checkpoint_the_width_is_the_seed_default(dataset):
    from mobilenetv2.config import TrainConfig
    from mobilenetv2.training.setup import resolve_config

    assert resolve_config(TrainConfig(data=str(dataset)), None).width_mult == 1.0
    assert resolve_config(TrainConfig(data=str(dataset), width_mult=0.35), None).width_mult == 0.35
