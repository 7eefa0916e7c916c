"""Class-incremental learning (`--extend-classes`)."""

import torch

from mobilenetv2 import load_model
from mobilenetv2.cli import main

from conftest import FIVE_CLASSES, TINY_TRAIN, head_only, last_eval, subset


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
    assert before > 0.6
    assert after >= before - 0.08, (before, after)  # measured: 0.85 -> 0.87 (two threads), 0.93 -> 0.87 (one)
    # the new classes are learned: from (almost) never predicted to well above chance (1/7). Measured 0.42-0.48 on
    # AMD VMs, 0.30 on one thread of an Intel Xeon VM (the pretrained five-class network differs by CPU and threads)
    untrained = old_class_accuracy(kept, ["Coat", "Pullover"])
    learned = old_class_accuracy(new, ["Coat", "Pullover"])
    assert untrained <= 0.05 and learned >= 0.25, (untrained, learned)


def test_extend_classes_needs_names(three_new, tmp_path, capsys):
    from conftest import MS_CHECKPOINT

    assert main(["train", "--data", str(three_new), "--output", str(tmp_path / "run"), "--pretrained",
                 str(MS_CHECKPOINT), "--extend-classes", "--width-mult", "0.5", "--workers", "0"]) == 2
    assert "class names" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_extend_classes_with_full_training(fashion, pretrained_five, tmp_path):
    classes = FIVE_CLASSES + ["Coat", "Pullover"]
    data = subset(fashion, tmp_path / "data", classes)
    common = ["train", "--data", str(data), "--pretrained", str(pretrained_five), "--extend-classes", *TINY_TRAIN,
              "--batch-size", "20", "--weight-decay", "0", "--min-scale", "0.5", "--color-jitter", "0"]
    # at a zero rate the network comes through: old rows at their new places, every convolution as it was
    assert main([*common, "--output", str(tmp_path / "zero"), "--epochs", "1", "--max-steps", "1", "--lr-max", "0"]) == 0
    old, kept = load_model(pretrained_five), load_model(tmp_path / "zero" / "checkpoints" / "last.pt")
    assert kept.class_names == sorted(classes)
    for old_index, name in enumerate(old.class_names):
        assert torch.equal(kept.head.classifier.weight[kept.class_names.index(name)], old.head.classifier.weight[old_index])
    for key, value in old.backbone.state_dict().items():
        if key.endswith("weight") and value.dim() == 4:
            assert torch.equal(kept.backbone.state_dict()[key], value), key
    # trained, the whole network moves and the new classes are learned
    run = tmp_path / "run"
    assert main([*common, "--output", str(run), "--epochs", "4", "--lr-max", "0.02"]) == 0
    trained = load_model(run / "checkpoints" / "last.pt")
    assert not torch.equal(trained.backbone[3].conv[0][0].weight, old.backbone[3].conv[0][0].weight)
    result = last_eval(run)
    assert result["eval_count"] == 140 and result["eval_top1"] >= 0.5, result  # measured 0.56; chance is 1/7
