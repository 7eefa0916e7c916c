"""The main job end to end on a Fashion-MNIST subset."""

import json
from pathlib import Path

from mobilenetv2.cli import main

from conftest import REPO


def test_make_demo_quick_reaches_its_stated_accuracy(tmp_path, capsys):
    """What `make demo-quick` runs (3,000 train / 1,000 test images); the README states 67-75 % top-1. A smoke run of
    360 steps lands anywhere in that range with the seed, the thread count and the CPU's arithmetic: seeds 1-4 gave
    72.3-74.7 % on two threads of an AVX2 CPU and seeds 1-3 66.8-73.3 % on one thread there (this test's setting,
    seed 1: 66.8 %); seed 1 gave 73.7 % on one thread of an AVX-512 CPU. Chance is 10 %; a run that does not learn
    stays near it."""
    output = tmp_path / "demo"
    assert main(["demo", "--quick", "--per-class", "300", "--val-per-class", "100", "--output", str(output),
                 "--config", str(REPO / "configs" / "fashion_mnist.yaml"), "--data", str(tmp_path / "fm"),
                 "--device", "cpu"]) == 0
    assert "demo: top-1" in capsys.readouterr().out
    summary = json.loads((output / "summary.json").read_text())
    assert summary["count"] == 1000
    assert summary["top1"] >= 0.60
    assert summary["onnx_top1"] == summary["top1"]
    assert any(line.startswith("onnxruntime (legacy exporter") and "vs eager, batch 3: max abs difference" in line
               for line in summary["onnx_check"])  # the fast exporter, while this torch has it
    report = (output / "report.md").read_text()
    # the recipe's flip TTA, in the epoch's eval and the report's alike
    assert summary["config"]["eval_tta"] == "flip"
    epochs = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in epochs if r["type"] == "epoch"][-1]["eval_top1"] == summary["top1"]
    assert f"top-1 on 1000 test images (flip TTA) | **{summary['top1']:.2%}**" in report
    assert "![curves](curves.png)" in report
    assert (output / "curves.png").stat().st_size > 10_000
    assert (output / "model.onnx").is_file()
    assert len(summary["predictions"]) == 6
    for prediction in summary["predictions"]:  # the true class is the image's own folder, not a guess
        assert prediction["true"] == Path(prediction["image"]).parent.name
        assert Path(prediction["image"]).parent.parent == tmp_path / "fm-300-100" / "val"
        probabilities = [p["probability"] for p in prediction["predictions"]]
        assert len(probabilities) == 3 and probabilities == sorted(probabilities, reverse=True)
    hits = sum(p["predictions"][0]["class"] == p["true"] for p in summary["predictions"])
    assert hits >= 2  # six test images at 67-75 % top-1: 2 to 5 of them measured over the runs above
