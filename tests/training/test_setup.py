"""`mobilenetv2 train` end to end on CPU with tiny settings on real photos."""

import torch

from mobilenetv2 import load_model

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
