"""The in-memory training task, plots and TensorBoard."""

import json

import numpy as np
import pytest
import torch

from mobilenetv2.cli import main


def test_in_memory_training_matches_disk_labels_and_plots(fashion, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(fashion), "--output", str(run), "--in-memory", "--width-mult", "0.25",
                 "--image-size", "32", "--batch-size", "50", "--epochs", "2", "--lr-max", "0.05", "--workers", "0",
                 "--tensorboard", "--color-jitter", "0"]) == 0
    assert "400 training images decoded into memory" in capsys.readouterr().out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["type"] == "epoch"]
    assert [r["eval_count"] for r in epochs] == [200, 200]
    # the checkpoint, evaluated from the image files on disk, scores exactly what the in-memory eval reported:
    # same labels, same pixels
    assert main(["eval", "--data", str(fashion), "--checkpoint", str(run / "checkpoints" / "last.pt"), "--workers", "0",
                 "--json", str(tmp_path / "disk.json")]) == 0
    disk = json.loads((tmp_path / "disk.json").read_text())
    assert disk["count"] == 200 and disk["top1"] == pytest.approx(epochs[-1]["eval_top1"], abs=1e-9)
    assert disk["loss"] == pytest.approx(epochs[-1]["eval_loss"], rel=1e-5)
    assert list((run / "tensorboard").iterdir())
    assert main(["plot", str(run), "--output", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 10_000


def test_decoded_dataset_keeps_each_files_label_and_pixels(fashion):
    from PIL import Image

    from mobilenetv2.data.batched import decode_all
    from mobilenetv2.data.folders import image_folder

    dataset = image_folder(fashion / "val", None)
    images, labels, skipped = decode_all(dataset, 28, workers=0)
    assert skipped == 0 and labels.tolist() == dataset.targets
    for index in (0, 57, len(dataset) - 1):
        path, label = dataset.samples[index]
        pixels = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
        assert torch.equal(images[index], pixels) and labels[index] == label


def test_image_augmentation_follows_epoch_and_item_never_worker_count(dataset, tmp_path):
    import dataclasses

    from mobilenetv2 import MobileNetV2
    from mobilenetv2.config import TrainConfig
    from mobilenetv2.data.folders import find_splits
    from mobilenetv2.runtime import Runtime
    from mobilenetv2.training.tasks import image_task

    config = TrainConfig(data=str(dataset), width_mult=0.25, image_size=32, batch_size=8, workers=0, seed=3)
    splits = find_splits(dataset)
    model = MobileNetV2(num_classes=3, width_mult=0.25, class_names=splits.classes, preprocess=config.preprocess)

    def epoch_images(workers, epoch, skip=0):
        task = image_task(dataclasses.replace(config, workers=workers), model, splits,
                          Runtime(torch.device("cpu"), None), tmp_path)
        return torch.cat([inputs for inputs, _labels, _skipped in task.train_batches(epoch, skip)])

    first = epoch_images(0, 0)
    torch.rand(5)  # the global stream moves on; the draws must not
    assert torch.equal(epoch_images(0, 0), first)
    assert torch.equal(epoch_images(2, 0), first)  # two worker processes draw the same
    assert torch.equal(epoch_images(0, 0, skip=1), first[8:])  # a resumed epoch sees the rest unchanged
    def drawn(images):  # the epoch's images as a set, whatever their order
        return sorted(round(float(image.sum()), 3) for image in images)

    assert drawn(epoch_images(0, 0)) == drawn(first)
    assert drawn(epoch_images(0, 1)) != drawn(first)  # a new epoch draws new crops, not the same ones reordered
