"""One training step of the recipe against one step of the seed run by MindSpore (fixtures/mindspore_step/).

The step goes through the public recipe pieces, `build_optimizer` and `build_loss`, with the default config, in
float64 (PyTorch's float32 BatchNorm gradients at this batch are noisier than the comparison; README there). It is
compared per tensor as an update (after - before): loss, direction, size, and BatchNorm's running statistics. The
planted faults below show the comparison tells the seed's step from its near misses.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from mobilenetv2 import load_model
from mobilenetv2.checkpoint import read_weights
from mobilenetv2.config import TrainConfig
from mobilenetv2.training.loss import SeedLabelSmoothingLoss
from mobilenetv2.training.recipe import build_loss, build_optimizer

from conftest import FIXTURES

STEP = FIXTURES / "mindspore_step"
INIT = STEP / "ms_init_w0.5_c10.ckpt"
TAGS = ("", "_wd0.5")  # weight decay 4e-5 (the seed's) and 0.5 (which shows which parameters are decayed)
LOSS_TOLERANCE = 1e-5  # relative
MIN_COSINE = 0.995  # per tensor; 0.998 measured
SIZE_TOLERANCE = 0.02  # per tensor, relative; 0.44 % measured
STATISTICS_TOLERANCE = 1e-2  # running statistics' update, relative to its size
NOISE = 1e-3  # updates below this fraction of the median tensor's update are float32 noise in MindSpore's step


@dataclass
class StepComparison:
    loss: float
    reference_loss: float
    parameters: dict[str, tuple[float, float]]  # name -> (cosine, our size / MindSpore's size)
    statistics: dict[str, float]  # name -> |our update - MindSpore's| / |MindSpore's update|
    noise: dict[str, float]  # tensors whose MindSpore update is float32 noise -> our update / the median update

    def failures(self) -> list[str]:
        found = []
        if abs(self.loss / self.reference_loss - 1) > LOSS_TOLERANCE:
            found.append(f"loss {self.loss:.7f} vs {self.reference_loss:.7f}")
        found += [f"{name}: cosine {cosine:.4f}, size x{size:.4f}" for name, (cosine, size) in self.parameters.items()
                  if cosine < MIN_COSINE or abs(size - 1) > SIZE_TOLERANCE]
        found += [f"{name}: off by {error:.3g}" for name, error in self.statistics.items() if error > STATISTICS_TOLERANCE]
        found += [f"{name}: moved {size:.3g} of the median update, MindSpore's is noise"
                  for name, size in self.noise.items() if size > NOISE]
        return found


def _updates(before: dict, after: dict, names: list[str]) -> dict[str, torch.Tensor]:
    return {name: (after[name].double() - before[name]).flatten() for name in names}


def seed_step(tag: str, config_changes=None, criterion=None, model_change=None, optimizer_change=None) -> StepComparison:
    """One step of the default recipe from the fixture's weights on its batch, compared with MindSpore's."""
    meta = json.loads((STEP / f"ms_step_w0.5_c10{tag}.json").read_text())
    reference = read_weights(STEP / f"ms_step_w0.5_c10{tag}_after.ckpt").state_dict
    model = load_model(INIT).double().train()
    if model_change:
        model_change(model)
    config = TrainConfig(lr_init=meta["lrs"][0], weight_decay=meta["weight_decay"], momentum=meta["momentum"],
                         label_smoothing=meta["label_smoothing"], **(config_changes or {}))
    optimizer = build_optimizer(model, config)
    if optimizer_change:
        optimizer_change(optimizer)
    criterion = criterion or build_loss(config, model.num_classes)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    images = torch.from_numpy(np.load(STEP / "ms_step_input_w0.5_c10.npy")).double()
    loss = criterion(model(images), torch.tensor(meta["labels"]))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

    after = model.state_dict()
    parameter_names = [name for name, _ in model.named_parameters()]
    statistic_names = [name for name in after if name.endswith(("running_mean", "running_var"))]
    comparison = StepComparison(loss.item(), meta["losses"][0], {}, {}, {})
    for names, kind in ((parameter_names, "parameters"), (statistic_names, "statistics")):
        ours, theirs = _updates(before, after, names), _updates(before, reference, names)
        median = float(np.median([update.norm().item() for update in theirs.values()]))
        for name in names:
            size = theirs[name].norm().item()
            if size < NOISE * median:
                comparison.noise[name] = ours[name].norm().item() / median
            elif kind == "parameters":
                ours_size = ours[name].norm().item()
                cosine = (ours[name] @ theirs[name]).item() / max(ours_size * size, 1e-300)
                comparison.parameters[name] = (cosine, ours_size / size)
            else:
                comparison.statistics[name] = (ours[name] - theirs[name]).norm().item() / size
    return comparison


def test_the_fixture_exercises_what_it_claims():
    """Different photos, several labels, a non-zero classifier bias, and a weight decay that shows in the result."""
    images = np.load(STEP / "ms_step_input_w0.5_c10.npy")
    assert images.shape == (24, 3, 96, 96) and np.abs(images[0] - images[1]).max() > 1.0
    assert len(set(json.loads((STEP / "ms_step_w0.5_c10.json").read_text())["labels"])) == 10
    init = read_weights(INIT).state_dict
    assert init["head.classifier.bias"].abs().min() > 0
    small, large = (read_weights(STEP / f"ms_step_w0.5_c10{tag}_after.ckpt").state_dict for tag in TAGS)
    moved = (large["head.classifier.bias"] - small["head.classifier.bias"]).abs().max()
    assert moved > 0.01 * init["head.classifier.bias"].abs().max()
    assert torch.equal(large["backbone.0.1.weight"], small["backbone.0.1.weight"])  # BatchNorm's scale: not decayed


@pytest.mark.parametrize("tag", TAGS)
def test_one_step_of_the_default_recipe_is_the_seeds(tag):
    comparison = seed_step(tag)
    assert not comparison.failures(), comparison.failures()[:5]
    # nearly everything is compared; the rest are BatchNorm shifts the next BatchNorm normalises away (their
    # gradient is zero) and running means of channels whose mean is zero, which must stay put in our step too
    parameters = len(comparison.parameters) + sum(not name.endswith(("_mean", "_var")) for name in comparison.noise)
    assert parameters == 158 and len(comparison.parameters) >= 0.85 * parameters
    assert {"head.classifier.weight", "head.classifier.bias", "backbone.0.1.weight"} <= set(comparison.parameters)
    assert len(comparison.statistics) >= 52 + 17


class _OffValueOverK(SeedLabelSmoothingLoss):
    """A planted fault: the off value eps / K instead of the seed's eps / (K - 1)."""

    def forward(self, logits, labels):
        log_probs = torch.log_softmax(logits, dim=1)
        target = torch.full_like(log_probs, self.smoothing / self.num_classes).scatter_(1, labels[:, None],
                                                                                       1.0 - self.smoothing)
        return -(target * log_probs).sum(dim=1).mean()


def _without_weight_decay(optimizer):
    for group in optimizer.param_groups:
        group["weight_decay"] = 0.0


def _pytorch_momentum_09(model):
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 0.9  # MindSpore's 0.9 is PyTorch's 0.1


FAULTS = {
    "batchnorm decayed": {"config_changes": {"weight_decay_on": "all"}},
    "classifier bias spared": {"config_changes": {"weight_decay_on": "weights"}},
    "off value over K": {"criterion": _OffValueOverK(0.1, 10)},
    "weight decay left out of the step": {"optimizer_change": _without_weight_decay},
    "batchnorm momentum 0.9 in PyTorch's convention": {"model_change": _pytorch_momentum_09},
}


@pytest.mark.parametrize("fault", FAULTS)
def test_each_planted_fault_fails_the_comparison(fault):
    failures = [failure for tag in TAGS for failure in seed_step(tag, **FAULTS[fault]).failures()]
    assert failures, f"the comparison did not see: {fault}"


def test_recipe_pieces_are_what_the_loop_uses(monkeypatch, dataset, tmp_path):
    """The loop builds its optimizer and loss through the recipe (a hidden check of the recipe checks the loop)."""
    from mobilenetv2.training import loop

    built = []
    monkeypatch.setattr(loop, "build_optimizer", lambda *a, **k: built.append("optimizer") or build_optimizer(*a, **k))
    monkeypatch.setattr(loop, "build_loss", lambda *a, **k: built.append("loss") or build_loss(*a, **k))
    from conftest import train

    assert train(dataset, tmp_path / "run", "--epochs", "1", "--max-steps", "1") == 0
    assert sorted(built) == ["loss", "optimizer"]


def test_the_loss_keeps_float64_and_counts_its_classes():
    logits = torch.randn(4, 10, dtype=torch.float64)
    labels = torch.tensor([0, 3, 9, 3])
    criterion = build_loss(dataclasses.replace(TrainConfig(), label_smoothing=0.1), 10)
    assert criterion(logits, labels).dtype == torch.float64
    assert criterion(logits.half(), labels).dtype == torch.float32
    with pytest.raises(ValueError, match="10 classes"):
        criterion(torch.randn(4, 7), labels)
