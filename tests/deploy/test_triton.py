"""`export --format triton`: a Triton model repository entry whose config Triton's own schema parses, whose ONNX
model answers as the checkpoint does at any batch, with the class names as labels; re-exporting replaces it."""

import numpy as np
import pytest
import torch

from conftest import one_line_exit_2
from mobilenetv2 import MobileNetV2, save_model
from mobilenetv2.cli import main
from mobilenetv2.config import Preprocess
from mobilenetv2.deploy import triton

pytest.importorskip("tritonclient")
# the entry's ONNX model is our checked export (tested with the default exporter in test_export.py): here through the
# exporter that takes a second, not ten
FAST = ["--onnx-exporter", "legacy"]


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = MobileNetV2(num_classes=4, width_mult=0.25, class_names=["w", "x", "y", "z"],
                        preprocess=Preprocess(image_size=32, resize_size=36))
    path = tmp_path / "model.pt"
    save_model(model, path)
    return path, model.eval()


def test_the_repository_entry_parses_with_tritons_schema_and_runs_any_batch(checkpoint, tmp_path, capsys):
    import onnxruntime
    from google.protobuf import text_format

    path, model = checkpoint
    repository = tmp_path / "repository"
    assert main(["export", "--checkpoint", str(path), "--format", "triton", "--output",
                 str(repository / "fashion"), *FAST]) == 0
    out = capsys.readouterr().out
    assert "Triton's ModelConfig schema" in out and "onnxruntime (legacy exporter" in out
    entry = repository / "fashion"
    assert sorted(p.relative_to(entry).as_posix() for p in entry.rglob("*") if p.is_file()) == \
        ["1/model.onnx", "config.pbtxt", "labels.txt"]
    config = text_format.Parse((entry / "config.pbtxt").read_text(), triton.model_config_schema().ModelConfig())
    assert (config.name, config.platform, config.max_batch_size) == ("fashion", "onnxruntime_onnx", 32)
    assert list(config.input[0].dims) == [3, 32, 32] and list(config.output[0].dims) == [4]
    assert config.output[0].label_filename == "labels.txt" and config.HasField("dynamic_batching")
    assert (entry / "labels.txt").read_text().split() == ["w", "x", "y", "z"]
    session = onnxruntime.InferenceSession(str(entry / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    images = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        expected = model(images).numpy()
    assert np.allclose(session.run(["logits"], {"input": images.numpy()})[0], expected, atol=1e-4)
    # again, into the same folder, with another batch limit: replaced whole
    (entry / "stale.txt").write_text("from before")
    assert main(["export", "--checkpoint", str(path), "--format", "triton", "--output", str(entry),
                 "--batch-size", "8", *FAST]) == 0
    assert not (entry / "stale.txt").exists() and "max_batch_size: 8" in (entry / "config.pbtxt").read_text()
    assert not [p for p in repository.iterdir() if p.name != "fashion"]  # no temp folders left


def test_a_config_that_the_schema_reads_otherwise_fails_the_check(checkpoint, tmp_path, monkeypatch, capsys):
    path, _ = checkpoint
    original = triton.config_text
    monkeypatch.setattr(triton, "config_text", lambda *a: original(*a).replace("dims: 4\n", "dims: 5\n"))
    assert main(["export", "--checkpoint", str(path), "--format", "triton", "--output", str(tmp_path / "m"),
                 *FAST]) == 1
    assert "differs in output" in capsys.readouterr().err and not (tmp_path / "m").exists()
    monkeypatch.setattr(triton, "config_text", lambda *a: original(*a).replace("platform:", "platfrom:"))
    assert main(["export", "--checkpoint", str(path), "--format", "triton", "--output", str(tmp_path / "m"),
                 *FAST]) == 1
    assert "refuses config.pbtxt" in capsys.readouterr().err and not (tmp_path / "m").exists()


def test_without_tritonclient_the_export_is_refused_in_one_line(checkpoint, tmp_path, monkeypatch, capsys):
    import importlib.util

    path, _ = checkpoint
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tritonclient" else real(name, *a))
    line = one_line_exit_2(capsys, ["export", "--checkpoint", str(path), "--format", "triton", "--output",
                                    str(tmp_path / "m")])
    assert "mobilenetv2[triton]" in line and not (tmp_path / "m").exists()
