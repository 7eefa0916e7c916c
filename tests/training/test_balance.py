"""Imbalanced data: class weights in the loss against hand computations (with smoothing and soft targets), the
weights `auto` and a file give, the class-balanced sampler, and both options through `train` on every data path."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import MS_CHECKPOINT, assert_same_weights, one_line_exit_2, train, TINY
from mobilenetv2.errors import UserError
from mobilenetv2.training.balance import BalancedSampler, class_weights, inverse_frequency, read_weights_file
from mobilenetv2.training.loss import SeedLabelSmoothingLoss

LOGITS = torch.tensor([[1.0, 0.5, -1.0], [0.2, 2.0, 0.1], [-0.3, 0.0, 1.5], [0.7, 0.7, 0.0]], dtype=torch.float64)
LABELS = torch.tensor([0, 1, 2, 2])
WEIGHTS = torch.tensor([2.0, 0.5, 1.0], dtype=torch.float64)


def _hand_loss(targets, weights):
    numerator = denominator = 0.0
    for row, target in zip(LOGITS.tolist(), targets):
        log_z = math.log(sum(math.exp(v) for v in row))
        for k, (value, t) in enumerate(zip(row, target)):
            numerator += weights[k] * t * (log_z - value)
            denominator += weights[k] * t
    return numerator / denominator


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_weighted_loss_matches_a_hand_computation(smoothing):
    off = smoothing / 2
    targets = [[1 - smoothing if k == y else off for k in range(3)] for y in LABELS.tolist()]
    loss = SeedLabelSmoothingLoss(smoothing, 3, WEIGHTS)(LOGITS, LABELS)
    assert loss.item() == pytest.approx(_hand_loss(targets, WEIGHTS.tolist()), rel=1e-12)
    if smoothing == 0:
        assert loss.item() == pytest.approx(F.cross_entropy(LOGITS, LABELS, weight=WEIGHTS).item(), rel=1e-12)


def test_weighted_loss_on_mixed_targets_and_equal_weights():
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.0, 1.0, 0.0], [0.2, 0.0, 0.8], [0.5, 0.5, 0.0]], dtype=torch.float64)
    smoothed = (soft * (1 - 0.1 - 0.05) + 0.05).tolist()
    loss = SeedLabelSmoothingLoss(0.1, 3, WEIGHTS)(LOGITS, soft)
    assert loss.item() == pytest.approx(_hand_loss(smoothed, WEIGHTS.tolist()), rel=1e-12)
    plain = SeedLabelSmoothingLoss(0.1, 3)(LOGITS, LABELS)
    assert SeedLabelSmoothingLoss(0.1, 3, torch.full((3,), 3.0))(LOGITS, LABELS).item() == pytest.approx(plain.item())
    assert SeedLabelSmoothingLoss(0.1, 3, WEIGHTS)(LOGITS, LABELS).item() != pytest.approx(plain.item())


def test_auto_weights_are_inverse_frequency():
    assert inverse_frequency(np.array([10, 30, 0])).tolist() == pytest.approx([2.0, 40 / 60, 1.0])
    weights = class_weights("auto", np.array([10, 30, 0]), ["a", "b", "c"])
    assert weights.dtype == torch.float32 and weights.tolist() == pytest.approx([2.0, 40 / 60, 1.0])
    assert class_weights("", np.array([1, 2]), ["a", "b"]) is None


@pytest.mark.parametrize("content,expected", [("[1, 2.5, 0]", [1, 2.5, 0]), ('{"b": 3}', [1, 3, 1]),
                                              ("0.5\n2\n\n1\n", [0.5, 2, 1])])
def test_weights_from_a_file(tmp_path, content, expected):
    path = tmp_path / "weights.json"
    path.write_text(content)
    assert read_weights_file(path, ["a", "b", "c"]).tolist() == expected


@pytest.mark.parametrize("content", ["[1, 2]", '{"z": 1}', "[1, -1, 1]", "[0, 0, 0]", '["x", 1, 1]', "[1, NaN, 1]",
                                     '"text"', "big"])
def test_bad_weight_files_are_refused(tmp_path, content):
    path = tmp_path / "weights.json"
    path.write_text("1\n" * 600_000 if content == "big" else content)
    with pytest.raises(UserError, match="class_weights"):
        read_weights_file(path, ["a", "b", "c"])


def test_the_balanced_sampler_draws_classes_equally_and_splits_across_ranks():
    labels = np.array([0] * 90 + [1] * 10)
    sampler = BalancedSampler(labels, seed=4)
    drawn = []
    for epoch in range(20):
        sampler.set_epoch(epoch)
        drawn += list(sampler)
    assert len(drawn) == 2000
    assert abs(np.mean(labels[drawn] == 1) - 0.5) < 0.05  # 10 % of the images, half of the draws
    sampler.set_epoch(3)
    again = BalancedSampler(labels, seed=4)
    again.set_epoch(3)
    assert list(sampler) == list(again)
    ranks = [BalancedSampler(labels, seed=4, rank=r, world_size=3) for r in range(3)]
    for rank in ranks:
        rank.set_epoch(3)
    parts = [list(rank) for rank in ranks]
    assert [len(part) for part in parts] == [34, 34, 34]
    interleaved = [part[i] for i in range(34) for part in parts]
    everything = BalancedSampler(labels, seed=4, world_size=1)
    everything.per_rank = 102
    everything.set_epoch(3)
    assert interleaved == list(everything)


@pytest.fixture(scope="module")
def imbalanced(dataset, tmp_path_factory):
    """`dataset` with one class cut to 2 training images of 8."""
    root = tmp_path_factory.mktemp("imbalanced") / "data"
    shutil.copytree(dataset, root)
    for path in sorted((root / "train" / "coffee").iterdir())[2:]:
        path.unlink()
    return root


@pytest.mark.parametrize("path", [[], ["--in-memory"], ["--data-backend", "device"],
                                  ["--pretrained", str(MS_CHECKPOINT), "--freeze", "backbone", "--width-mult", "0.5"]])
def test_class_weights_and_balanced_sampling_train_on_every_path(imbalanced, tmp_path, capsys, path):
    run = tmp_path / "run"
    assert train(imbalanced, run, "--epochs", "1", "--class-weights", "auto", "--balanced-sampler",
                 "--label-smoothing", "0.1", *path) == 0
    out = capsys.readouterr().out
    weights_line = next(line for line in out.splitlines() if line.startswith("class weights"))
    assert "coffee 3" in weights_line and "astronaut 0.75" in weights_line  # 18 images: 18 / (3 * 2), 18 / (3 * 8)
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    assert recorded["class_weights"] == "auto" and recorded["balanced_sampler"] is True


def test_class_weights_change_training_and_resume_stays_bit_identical(imbalanced, tmp_path):
    weights = tmp_path / "weights.json"
    weights.write_text(json.dumps({"coffee": 4.0}))
    common = ["--epochs", "2", "--seed", "5", "--in-memory", "--balanced-sampler", "--class-weights", str(weights)]
    assert train(imbalanced, tmp_path / "straight", *common) == 0
    assert train(imbalanced, tmp_path / "split", *common, "--max-steps", "3") == 0
    assert train(imbalanced, tmp_path / "split", *common, "--resume", "auto") == 0
    assert_same_weights(tmp_path / "straight", tmp_path / "split")
    assert train(imbalanced, tmp_path / "unweighted", *common[:-2]) == 0
    straight = torch.load(tmp_path / "straight/checkpoints/last.pt", weights_only=True)["model"]
    unweighted = torch.load(tmp_path / "unweighted/checkpoints/last.pt", weights_only=True)["model"]
    assert not torch.equal(straight["head.classifier.bias"], unweighted["head.classifier.bias"])


@pytest.mark.parametrize("extra", [["--class-weights", "nowhere.json"], ["--balanced-sampler", "--repeated-aug", "2"]])
def test_bad_balance_options_are_one_line_exit_2(dataset, tmp_path, capsys, extra):
    line = one_line_exit_2(capsys, ["train", "--data", str(dataset), "--output", str(tmp_path / "run"), *TINY,
                                    "--epochs", "1", *extra])
    assert "class-weights" in line or "balanced-sampler" in line
