"""Class-incremental learning (`--extend-classes`)."""

import torch

from mobilenetv2 import load_model
from mobilenetv2.cli import main

from conftest import FIVE_CLASSES, head_only, subset


def test_class_incremental_keeps_old_rows_and_old_accuracy(fashion, pretrained_five, tmp_path):
    from mobilenetv2.data import folders as data_module
    from mobilenetv2.data.transforms import eval_transform
    from mobilenetv2.evaluation import evaluate
    from mobilenetv2.runtime import setup

    classes = FIVE_CLASSES + ["Coat", "Pullover"]
    data = subset(fashion, tmp_path / "data", classes)
    run = tmp_path / "run"
    # a gentle rate: the new rows learn, the old ones move little (at 0.05 old-class accuracy fell 12 points)
    assert head_only(data, run, pretrained_five, "--extend-classes", "--epochs", "6", "--lr-max", "0.02") == 0
    old, new = load_model(pretrained_five), load_model(run / "checkpoints" / "last.pt")
    assert new.class_names == sorted(classes)
    # with a zero learning rate the old rows must come through exactly, at their classes' new positions
    zero = tmp_path / "zero"
    assert head_only(data, zero, pretrained_five, "--extend-classes", "--epochs", "1", "--lr-max", "0",
                     "--weight-decay", "0") == 0
    kept = load_model(zero / "checkpoints" / "last.pt")
    for old_index, name in enumerate(old.class_names):
        new_index = kept.class_names.index(name)
        assert torch.equal(kept.head.classifier.weight[new_index], old.head.classifier.weight[old_index])
        assert torch.equal(kept.head.classifier.bias[new_index], old.head.classifier.bias[old_index])

    def old_class_accuracy(model, wanted=FIVE_CLASSES):
        val = data_module.image_folder(data / "val", eval_transform(model.preprocess), model.class_names)
        val.samples = [s for s in val.samples if val.classes[s[1]] in wanted]
        result = evaluate(model, data_module.eval_loader(val, 50, 0), setup("cpu", "off"), model.num_classes)
        return result.top1

    before = old_class_accuracy(kept)  # the old head, inside the extended network, before training
    after = old_class_accuracy(new)
    assert before > 0.8
    assert after >= before - 0.08, (before, after)  # measured: 0.89 -> 0.83
    assert old_class_accuracy(new, ["Coat", "Pullover"]) >= 0.35  # measured 0.45; chance is 1/7


def test_extend_classes_needs_names(three_new, tmp_path, capsys):
    from conftest import MS_CHECKPOINT

    assert main(["train", "--data", str(three_new), "--output", str(tmp_path / "run"), "--pretrained",
                 str(MS_CHECKPOINT), "--extend-classes", "--width-mult", "0.5", "--workers", "0"]) == 2
    assert "class names" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
