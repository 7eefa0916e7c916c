"""The export check judges a file against eager float32's own error: an ill-conditioned network (BatchNorm scales in
the tens over tiny variances, logits in the tens) is not refused for rounding noise eager shares, a healthy network
keeps today's bound, and `--runtime auto` answers in torch where the export it would run fails its check."""

import re

import pytest
import torch

from mobilenetv2 import MobileNetV2, save_model
from mobilenetv2.cli import main
from mobilenetv2.engines import onnx_files
from mobilenetv2.preprocess import Preprocess

from conftest import FIVE_CLASSES, one_line_exit_2, subset


def ill_conditioned() -> MobileNetV2:
    """As a run at the seed's rate and batch 16 ends: BatchNorm scales up to 10 over variances down to 0.01, head
    weights ten times their initial size."""
    torch.manual_seed(0)
    model = MobileNetV2(num_classes=5, width_mult=0.5, class_names=FIVE_CLASSES,
                        preprocess=Preprocess(image_size=64, resize_size=64)).eval()
    draw = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.weight.data = torch.empty(n).uniform_(-10, 10, generator=draw)
            module.bias.data = torch.randn(n, generator=draw)
            module.running_var.data = torch.empty(n).uniform_(0.01, 1, generator=draw)
            module.running_mean.data = torch.randn(n, generator=draw) * 0.5
    model.head.classifier.weight.data *= 10
    return model


@pytest.fixture(scope="module")
def ill(tmp_path_factory):
    path = tmp_path_factory.mktemp("ill") / "ill.pt"
    save_model(ill_conditioned(), path)
    return path


def _difference(out: str) -> float:
    return max(float(value) for value in re.findall(r"max abs difference ([0-9.e+-]+)", out))


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_an_ill_conditioned_network_exports_within_a_multiple_of_eager_float32s_own_error(ill, tmp_path, capsys,
                                                                                        monkeypatch, fmt):
    model = ill_conditioned()
    images = onnx_files.check_images(model, 4)
    with torch.no_grad():
        scale = float(model(images).abs().max())
    noise = onnx_files.float32_error(model, images)
    assert noise > onnx_files.TOLERANCE * scale  # eager float32 is itself further from float64 than the old bound
    output = tmp_path / f"ill.{fmt}"
    assert main(["export", "--checkpoint", str(ill), "--format", fmt, "--output", str(output),
                 "--onnx-exporter", "legacy"]) == 0
    out = capsys.readouterr().out
    assert "as the network is ill-conditioned" in out and output.is_file()
    if fmt == "onnx":  # the file itself is as far from eager as eager is from float64: the old bound refused it
        assert _difference(out) > onnx_files.TOLERANCE * scale
    monkeypatch.setattr(onnx_files, "NOISE_MULTIPLE", 0)  # the fault: the bound ignores float32's own error
    if fmt == "onnx":
        assert main(["export", "--checkpoint", str(ill), "--format", fmt, "--output", str(tmp_path / "again.onnx"),
                     "--onnx-exporter", "legacy"]) == 1
        assert "check failed" in capsys.readouterr().err and not (tmp_path / "again.onnx").exists()


def test_a_healthy_network_keeps_the_strict_bound(converted, tmp_path, capsys):
    from mobilenetv2 import load_model

    model = load_model(converted).eval()
    images = onnx_files.check_images(model, 4)
    with torch.no_grad():
        scale = float(model(images).abs().max())
    assert onnx_files.NOISE_MULTIPLE * onnx_files.float32_error(model, images) < onnx_files.TOLERANCE * max(1, scale)
    assert main(["export", "--checkpoint", str(converted), "--format", "onnx", "--output", str(tmp_path / "m.onnx"),
                 "--onnx-exporter", "legacy"]) == 0
    assert "ill-conditioned" not in capsys.readouterr().out


@pytest.fixture(scope="module")
def five_data(fashion, tmp_path_factory):
    return subset(fashion, tmp_path_factory.mktemp("five") / "data", FIVE_CLASSES)


def test_runtime_auto_answers_in_torch_where_the_cached_export_fails_its_check(ill, five_data, tmp_path, capsys,
                                                                                monkeypatch):
    checkpoint = tmp_path / "ill.pt"
    checkpoint.write_bytes(ill.read_bytes())  # its own folder: the export cache goes beside it
    evaluate = ["eval", "--data", str(five_data), "--checkpoint", str(checkpoint), "--workers", "0"]
    assert main([*evaluate, "--runtime", "torch"]) == 0
    expected = [line for line in capsys.readouterr().out.splitlines() if line.startswith("result:")][0]
    monkeypatch.setattr(onnx_files, "NOISE_MULTIPLE", 0)  # the cached export now fails its check
    assert main([*evaluate, "--runtime", "auto"]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "runs" in warnings[0] and "in torch" in warnings[0] and "differs" in warnings[0]
    answer = [line for line in captured.out.splitlines() if line.startswith("result:")][0]
    assert answer.split(" ckpt=")[0] == expected.split(" ckpt=")[0]  # the same counts as eager's
    err = one_line_exit_2(capsys, [*evaluate, "--runtime", "onnx"])  # asked for by name: the error stands
    assert "differs from eager PyTorch" in err
