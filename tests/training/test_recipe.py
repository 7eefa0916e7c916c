"""The recipe's pieces: which parameters weight decay applies to, through the command line into the optimizer
state; legacy `decay_bn_bias` configs, flags and checkpoints; resume keeping the set a run started with."""

from __future__ import annotations

import pytest
import torch

from mobilenetv2 import MobileNetV2
from mobilenetv2.config import TrainConfig, build_config
from mobilenetv2.training.recipe import build_optimizer

from conftest import REPO, train

CONVOLUTIONS = 52  # at any width: every convolution weight (none has a bias)
BATCHNORMS = 52  # one after every convolution, a scale and a shift each


def _group_sets(model, decay_on):
    groups = build_optimizer(model, TrainConfig(weight_decay=4e-5, weight_decay_on=decay_on)).param_groups
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    return [(group["weight_decay"], {names[id(p)] for p in group["params"]}) for group in groups]


def test_each_set_decays_exactly_its_parameters():
    model = MobileNetV2(num_classes=3, width_mult=0.25)
    batchnorm = {name for name, _ in model.named_parameters()
                 if isinstance(model.get_submodule(name.rsplit(".", 1)[0]), torch.nn.BatchNorm2d)}
    assert len(batchnorm) == 2 * BATCHNORMS
    everything = {name for name, _ in model.named_parameters()}
    classifier = {"head.classifier.weight", "head.classifier.bias"}

    (decay, decayed), (spare, spared) = _group_sets(model, "seed")
    assert (decay, spare) == (4e-5, 0.0) and spared == batchnorm
    assert classifier <= decayed and len(decayed) == CONVOLUTIONS + 2  # the seed decays the classifier's bias
    (_, decayed), (_, spared) = _group_sets(model, "weights")
    assert spared == batchnorm | {"head.classifier.bias"} and len(decayed) == CONVOLUTIONS + 1
    [(decay, decayed)] = _group_sets(model, "all")
    assert decay == 4e-5 and decayed == everything


def test_frozen_parameters_are_left_out_and_the_order_is_the_models():
    model = MobileNetV2(num_classes=3, width_mult=0.25)
    model.backbone.requires_grad_(False)
    [group] = build_optimizer(model, TrainConfig()).param_groups  # the head has no BatchNorm: one group
    assert group["params"] == [model.head.classifier.weight, model.head.classifier.bias]
    model.backbone.requires_grad_(True)
    decayed = build_optimizer(model, TrainConfig()).param_groups[0]["params"]
    in_order = [p for name, p in model.named_parameters() if any(p is q for q in decayed)]
    assert all(a is b for a, b in zip(decayed, in_order, strict=True))


def test_the_optimizer_is_fused_on_cuda_only():
    model = MobileNetV2(num_classes=3, width_mult=0.25)
    assert build_optimizer(model, TrainConfig(), torch.device("cuda", 0)).defaults["fused"] is True
    assert not build_optimizer(model, TrainConfig(), torch.device("cpu")).defaults["fused"]


def _saved_groups(run):
    saved = torch.load(run / "checkpoints/last.pt", weights_only=True)["optimizer"]["param_groups"]
    return [(group["weight_decay"], len(group["params"])) for group in saved]


@pytest.mark.parametrize("decay_on,groups", [("seed", [(4e-5, 54), (0.0, 104)]), ("weights", [(4e-5, 53), (0.0, 105)]),
                                             ("all", [(4e-5, 158)])])
def test_the_option_reaches_the_runs_optimizer_state(dataset, tmp_path, decay_on, groups):
    flags = [] if decay_on == "seed" else ["--weight-decay-on", decay_on]  # seed is the default
    assert train(dataset, tmp_path / "run", "--epochs", "1", "--max-steps", "1", *flags) == 0
    assert _saved_groups(tmp_path / "run") == groups
    assert f"weight_decay_on: {decay_on}" in (tmp_path / "run/config.yaml").read_text()


def test_an_unknown_set_is_one_line_exit_2(capsys, dataset, tmp_path):
    from conftest import one_line_exit_2

    err = one_line_exit_2(capsys, ["train", "--data", str(dataset), "--output", str(tmp_path / "run"),
                                   "--weight-decay-on", "bn"])
    assert "--weight-decay-on must be seed, weights or all, got 'bn'" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("legacy,mapped", [(True, "all"), (False, "weights")])
def test_legacy_decay_bn_bias_in_a_config_or_a_flag(tmp_path, capsys, legacy, mapped):
    recipe = tmp_path / "old.yaml"
    recipe.write_text((REPO / "configs/seed_gpu.yaml").read_text().replace("weight_decay_on: seed",
                                                                           f"decay_bn_bias: {str(legacy).lower()}"))
    assert build_config(TrainConfig, recipe).weight_decay_on == mapped
    assert build_config(TrainConfig, None, {"decay_bn_bias": legacy}).weight_decay_on == mapped
    notices = capsys.readouterr().err.strip().splitlines()
    assert len(notices) == 2 and all(f"read as weight_decay_on {mapped}" in line for line in notices)
    # given beside the new option, the new one wins
    assert build_config(TrainConfig, recipe, {"weight_decay_on": "seed"}).weight_decay_on == "seed"


def test_the_legacy_flag_trains_with_a_notice(dataset, tmp_path, capsys):
    assert train(dataset, tmp_path / "run", "--epochs", "1", "--max-steps", "1", "--no-decay-bn-bias") == 0
    assert "decay_bn_bias False is read as weight_decay_on weights" in capsys.readouterr().err
    assert _saved_groups(tmp_path / "run") == [(4e-5, 53), (0.0, 105)]


def test_resume_keeps_the_set_the_run_started_with(dataset, tmp_path, capsys):
    common = ["--epochs", "2", "--seed", "5"]
    assert train(dataset, tmp_path / "straight", *common, "--weight-decay-on", "weights") == 0
    assert train(dataset, tmp_path / "split", *common, "--weight-decay-on", "weights", "--max-steps", "4") == 0
    capsys.readouterr()
    assert train(dataset, tmp_path / "split", *common, "--resume", "auto") == 0  # the default (seed) not applied
    assert "resuming with weight_decay_on weights, the set the run was started with" in capsys.readouterr().out
    assert _saved_groups(tmp_path / "split") == [(4e-5, 53), (0.0, 105)]
    straight = torch.load(tmp_path / "straight/checkpoints/last.pt", weights_only=True)["model"]
    split = torch.load(tmp_path / "split/checkpoints/last.pt", weights_only=True)["model"]
    assert all(torch.equal(value, split[key]) for key, value in straight.items())


def test_a_checkpoint_from_before_the_option_resumes_as_it_was_started(dataset, tmp_path, capsys):
    """A run started when `decay_bn_bias: true` was the default: one optimizer group over everything."""
    run = tmp_path / "run"
    assert train(dataset, run, "--epochs", "2", "--weight-decay-on", "all", "--max-steps", "4") == 0
    last = run / "checkpoints/last.pt"
    record = torch.load(last, weights_only=True)
    del record["train_config"]["weight_decay_on"]
    record["train_config"]["decay_bn_bias"] = True
    torch.save(record, last)
    capsys.readouterr()
    assert train(dataset, run, "--epochs", "2", "--resume", "auto") == 0
    out = capsys.readouterr().out
    assert "decay_bn_bias True is read as weight_decay_on all" in out
    assert "resuming with weight_decay_on all" in out
    assert _saved_groups(run) == [(4e-5, 158)]
