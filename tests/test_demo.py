"""The main job end to end on a Fashion-MNIST subset."""

import json

from mobilenetv2.cli import main

from conftest import REPO


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
