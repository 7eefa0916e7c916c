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


def test_no_decay_bn_bias_exempts_exactly_batchnorm_and_biases(dataset, tmp_path):
    from mobilenetv2 import MobileNetV2
    from mobilenetv2.config import TrainConfig
    from mobilenetv2.training.setup import make_optimizer

    model = MobileNetV2(num_classes=3, width_mult=0.25)
    exempt = {id(p) for name, p in model.named_parameters() if p.ndim == 1}
    assert len(exempt) == 52 * 2 + 1  # every BatchNorm's weight and bias, and the classifier's bias
    groups = make_optimizer(model, TrainConfig(decay_bn_bias=False, weight_decay=4e-5)).param_groups
    assert [g["weight_decay"] for g in groups] == [4e-5, 0.0]
    assert {id(p) for p in groups[1]["params"]} == exempt
    assert len(groups[0]["params"]) == 52 + 1  # convolutions and the classifier's weight
    assert len(make_optimizer(model, TrainConfig()).param_groups) == 1  # the seed's GPU path decays all
    # through the command line, into the run's optimizer state
    assert main(["train", "--data", str(dataset), "--output", str(tmp_path / "run"), "--width-mult", "0.25",
                 "--image-size", "32", "--batch-size", "8", "--workers", "0", "--epochs", "1", "--max-steps", "1",
                 "--no-decay-bn-bias"]) == 0
    saved = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [(g["weight_decay"], len(g["params"])) for g in saved] == [(4e-5, 53), (0.0, 105)]


def test_the_optimizer_is_fused_on_cuda_only():
    from mobilenetv2 import MobileNetV2
    from mobilenetv2.config import TrainConfig
    from mobilenetv2.training.setup import make_optimizer

    model = MobileNetV2(num_classes=3, width_mult=0.25)
    assert make_optimizer(model, TrainConfig(), torch.device("cuda", 0)).defaults["fused"] is True
    assert not make_optimizer(model, TrainConfig(), torch.device("cpu")).defaults["fused"]
