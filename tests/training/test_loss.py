"""The seed's label-smoothed loss."""

import pytest
import torch

from mobilenetv2.training.loss import SeedLabelSmoothingLoss


def test_seed_label_smoothing_matches_the_formula():
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, 0.4]])
    labels = torch.tensor([0, 3])
    eps, k = 0.1, 4
    log_p = torch.log_softmax(logits, 1)
    expected = 0.0
    for row, label in enumerate(labels):
        for c in range(k):
            target = 1 - eps if c == label else eps / (k - 1)
            expected -= target * log_p[row, c].item()
    assert SeedLabelSmoothingLoss(eps, k)(logits, labels).item() == pytest.approx(expected / 2, rel=1e-6)
