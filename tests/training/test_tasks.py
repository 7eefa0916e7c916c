"""The in-memory training task, plots and TensorBoard."""

import json

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
    assert list((run / "tensorboard").iterdir())
    assert main(["plot", str(run), "--output", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 10_000
