"""The main job end to end on a Fashion-MNIST subset, the in-memory data path, plots and TensorBoard."""

import json
from pathlib import Path

import pytest
import torch

from mobilenetv2.cli import main
from mobilenetv2.config import Preprocess
from mobilenetv2.data import BatchAugment

REPO = Path(__file__).resolve().parents[1]


def test_quick_demo_end_to_end(tmp_path, capsys):
    output = tmp_path / "demo"
    assert main(["demo", "--quick", "--per-class", "30", "--val-per-class", "10", "--output", str(output),
                 "--config", str(REPO / "configs" / "fashion_mnist.yaml"), "--data", str(tmp_path / "fm"),
                 "--device", "cpu"]) == 0
    assert "demo: top-1" in capsys.readouterr().out
    summary = json.loads((output / "summary.json").read_text())
    assert summary["count"] == 100
    assert summary["onnx_top1"] == summary["top1"]
    assert any("onnxruntime vs eager, batch 3: max abs difference" in line for line in summary["onnx_check"])
    report = (output / "report.md").read_text()
    assert "top-1 on 100 test images" in report and "![curves](curves.png)" in report
    assert (output / "curves.png").stat().st_size > 10_000
    assert (output / "model.onnx").is_file()
    assert len(summary["predictions"]) == 6
    assert all(p["true"] in summary["per_class_accuracy"] for p in summary["predictions"])


def test_batch_augment_draws_per_image(photos):
    torch.manual_seed(0)
    image = torch.from_numpy(photos["chelsea"][:256, :256]).permute(2, 0, 1)
    batch = image.expand(8, -1, -1, -1).contiguous()
    out = BatchAugment(Preprocess.for_image_size(64), min_scale=0.3, color_jitter=0.4)(batch)
    assert out.shape == (8, 3, 64, 64) and out.dtype == torch.float32
    assert len({round(float(x.sum()), 3) for x in out}) == 8  # eight different draws
    # with no cropping, no flip chance and no jitter it is resize + normalise
    plain = BatchAugment(Preprocess(image_size=64, resize_size=64), min_scale=1.0, color_jitter=0.0)
    plain.log_ratio = (0.0, 0.0)  # whole-image crops only
    square = torch.nn.functional.interpolate(image[None].float() / 255, size=64, mode="bilinear", align_corners=False)
    mean, std = torch.tensor(Preprocess().mean).view(1, 3, 1, 1), torch.tensor(Preprocess().std).view(1, 3, 1, 1)
    expected = (square - mean) / std
    result = plain(image[None])
    flipped = result.flip(-1)
    assert min((result - expected).abs().max(), (flipped - expected).abs().max()) < 1e-4


def test_in_memory_training_matches_disk_labels_and_plots(fashion, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(fashion), "--output", str(run), "--in-memory", "--width-mult", "0.25",
                 "--image-size", "32", "--batch-size", "50", "--epochs", "2", "--lr-max", "0.05", "--workers", "0",
                 "--tensorboard", "--color-jitter", "0"]) == 0
    assert "400 training images decoded into memory" in capsys.readouterr().out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["type"] == "epoch"]
    assert [r["eval_count"] for r in epochs] == [200, 200]
    assert list((run / "tensorboard").iterdir())
    assert main(["plot", str(run), "--output", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 10_000


def test_fashion_mnist_writer_reuses_and_refuses_bad_files(tmp_path, capsys):
    from mobilenetv2.datasets import FASHION_MNIST_CLASSES, read_idx, write_fashion_mnist
    from mobilenetv2.errors import DataError

    out = write_fashion_mnist(tmp_path / "fm", per_class=3, val_per_class=2)
    files = sorted(out.glob("train/*/*.png"))
    assert len(files) == 30 and {p.parent.name for p in files} == set(FASHION_MNIST_CLASSES)
    stamp = files[0].stat().st_mtime_ns
    write_fashion_mnist(tmp_path / "fm", per_class=3, val_per_class=2)
    assert files[0].stat().st_mtime_ns == stamp  # written once, reused
    import gzip

    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as handle:
        handle.write(b"\x00\x00\x08\x03" + (10**7).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2)
    with pytest.raises(DataError, match="implausible"):
        read_idx(bad)
    assert main(["data", "fashion-mnist", str(tmp_path / "x"), "--source", str(tmp_path / "nowhere")]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err
