"""Every checkpoint format users have, loaded through `load_model`, gives the source network's logits."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from mobilenetv2 import MobileNetV2, load_model, save_model
from mobilenetv2.cli import main
from mobilenetv2.errors import CheckpointError
from mobilenetv2.interop import mindspore

from conftest import FIXTURES, MS_CHECKPOINT


def randomise_batchnorm(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BN statistics and affine parameters, so a mis-mapped BN tensor shows in the logits."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=generator) * 0.1)
    return model.eval()


def logits(model, images):
    with torch.no_grad():
        return model.eval()(images)


def test_mindspore_fixture_reproduces_the_seed_logits():
    model = load_model(MS_CHECKPOINT)
    assert (model.width_mult, model.num_classes) == (0.5, 10)
    images = torch.from_numpy(np.load(FIXTURES / "ms_input_w0.5_c10.npy"))
    expected = np.load(FIXTURES / "ms_logits_w0.5_c10.npy")
    assert np.abs(logits(model, images).numpy() - expected).max() <= 1e-5


def test_mindspore_convert_command_and_ignored_optimizer_state(tmp_path, capsys):
    tensors = mindspore.read_checkpoint(MS_CHECKPOINT)
    meta = json.loads((FIXTURES / "ms_meta_w0.5_c10.json").read_text())
    assert sorted(tensors) == sorted(meta["keys"])
    # the seed's train-time layout: backbone./head. prefixes, fp16 weights, optimizer state beside them
    rewritten = {}
    for key, value in tensors.items():
        key = ("head.head.1." + key[len("dense."):]) if key.startswith("dense.") else "backbone." + key
        rewritten[key] = value.astype(np.float16) if value.dtype == np.float32 else value
        rewritten["moments." + key] = np.zeros_like(value)
    rewritten["learning_rate"] = np.array([0.1], dtype=np.float32)
    rewritten["global_step"] = np.array([7], dtype=np.int32)
    source = tmp_path / "train_layout.ckpt"
    mindspore.write_checkpoint(rewritten, source)
    assert main(["convert", str(source), "--output", str(tmp_path / "out.pt")]) == 0
    out = capsys.readouterr().out
    assert "ignored 264 non-weight entries" in out and "learning_rate" in out
    model = load_model(tmp_path / "out.pt")
    reference = load_model(MS_CHECKPOINT)
    images = torch.from_numpy(np.load(FIXTURES / "ms_input_w0.5_c10.npy"))
    # fp16 storage costs precision, never correctness
    torch.testing.assert_close(logits(model, images), logits(reference, images), atol=2e-2, rtol=0)


@pytest.mark.parametrize("head_prefix", ["dense.", "head.dense.", "head.1.", "head.head.1."])
def test_every_seed_head_layout(tmp_path, head_prefix):
    tensors = mindspore.read_checkpoint(MS_CHECKPOINT)
    renamed = {(head_prefix + k[6:]) if k.startswith("dense.") else k: v for k, v in tensors.items()}
    mindspore.write_checkpoint(renamed, tmp_path / "head.ckpt")
    reference = load_model(MS_CHECKPOINT)
    images = torch.from_numpy(np.load(FIXTURES / "ms_input_w0.5_c10.npy"))
    torch.testing.assert_close(logits(load_model(tmp_path / "head.ckpt"), images), logits(reference, images), atol=0, rtol=0)


@pytest.mark.parametrize("width", [0.5, 1.0, 1.4])
def test_torchvision_state_dict(tmp_path, width):
    import torchvision

    torch.manual_seed(1)
    source = randomise_batchnorm(torchvision.models.mobilenet_v2(num_classes=12, width_mult=width), seed=2)
    torch.save(source.state_dict(), tmp_path / "tv.pth")
    ours = load_model(tmp_path / "tv.pth")
    assert ours.width_mult == width and ours.num_classes == 12
    images = torch.randn(2, 3, 64, 64)
    assert (logits(ours, images) - logits(source, images)).abs().max() <= 1e-5


@pytest.mark.parametrize("variant,width", [("mobilenetv2_035", 0.35), ("mobilenetv2_050", 0.5),
                                           ("mobilenetv2_100", 1.0), ("mobilenetv2_140", 1.4)])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_state_dict(tmp_path, variant, width, suffix):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(3)
    source = randomise_batchnorm(timm.create_model(variant, pretrained=False, num_classes=9), seed=4)
    path = tmp_path / f"timm{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    ours = load_model(path)
    assert ours.width_mult == width
    images = torch.randn(2, 3, 64, 64)
    assert (logits(ours, images) - logits(source, images)).abs().max() <= 1e-5


@pytest.mark.parametrize("variant", ["mobilenetv2_110d", "mobilenetv2_120d"])
def test_timm_deeper_variants_are_refused(tmp_path, variant):
    import timm

    torch.save(timm.create_model(variant, pretrained=False).state_dict(), tmp_path / "deep.pth")
    with pytest.raises(CheckpointError, match="depth-multiplied variants"):
        load_model(tmp_path / "deep.pth")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_our_format_round_trip_keeps_metadata(tmp_path, suffix):
    from mobilenetv2.config import Preprocess

    model = randomise_batchnorm(MobileNetV2(num_classes=3, width_mult=0.35), seed=5)
    preprocess = Preprocess(image_size=64, resize_size=73, resize_mode="squash")
    path = tmp_path / f"model{suffix}"
    save_model(model, path, class_names=["a", "b", "c"], preprocess=preprocess)
    loaded = load_model(path)
    assert loaded.class_names == ["a", "b", "c"] and loaded.preprocess == preprocess
    assert loaded.width_mult == 0.35
    images = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(logits(loaded, images), logits(model, images), atol=0, rtol=0)
    if suffix == ".pt":
        raw = torch.load(path, weights_only=True)  # plain data only
        assert raw["config"] == {"num_classes": 3, "width_mult": 0.35}


def test_asked_shape_must_agree(tmp_path):
    with pytest.raises(CheckpointError, match="classes"):
        load_model(MS_CHECKPOINT, num_classes=1000)
    with pytest.raises(CheckpointError, match="width"):
        load_model(MS_CHECKPOINT, width_mult=1.0)


# ------------------------------------------------------------------ bad input: one line, exit 2

def run_convert(capsys, source, tmp_path):
    code = main(["convert", str(source), "--output", str(tmp_path / "out.pt")])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out.pt").exists()
    return err


def test_missing_file(tmp_path, capsys):
    assert "not found" in run_convert(capsys, tmp_path / "nope.ckpt", tmp_path)


def test_truncated_mindspore_checkpoint(tmp_path, capsys):
    data = MS_CHECKPOINT.read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    assert "MindSpore checkpoint" in run_convert(capsys, tmp_path / "cut.ckpt", tmp_path)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".safetensors", ".bin"])
def test_random_bytes(tmp_path, capsys, suffix):
    (tmp_path / f"noise{suffix}").write_bytes(np.random.default_rng(0).bytes(4096))
    run_convert(capsys, tmp_path / f"noise{suffix}", tmp_path)


def test_missing_tensor_is_named(tmp_path, capsys):
    tensors = mindspore.read_checkpoint(MS_CHECKPOINT)
    del tensors["features.5.conv.1.features.1.moving_variance"]
    mindspore.write_checkpoint(tensors, tmp_path / "missing.ckpt")
    assert "backbone.5.conv.1.1.running_var" in run_convert(capsys, tmp_path / "missing.ckpt", tmp_path)


def test_misshaped_tensor_is_named(tmp_path, capsys):
    tensors = mindspore.read_checkpoint(MS_CHECKPOINT)
    tensors["features.7.conv.2.weight"] = tensors["features.7.conv.2.weight"][:, :-1]
    mindspore.write_checkpoint(tensors, tmp_path / "shape.ckpt")
    assert "backbone.7.conv.2.weight" in run_convert(capsys, tmp_path / "shape.ckpt", tmp_path)


def test_unexpected_tensor_is_refused(tmp_path, capsys):
    tensors = mindspore.read_checkpoint(MS_CHECKPOINT)
    tensors["features.3.extra.weight"] = np.zeros(3, dtype=np.float32)
    mindspore.write_checkpoint(tensors, tmp_path / "extra.ckpt")
    assert "backbone.3.extra.weight" in run_convert(capsys, tmp_path / "extra.ckpt", tmp_path)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_pickle_with_code_is_refused_and_never_runs(tmp_path, capsys, suffix):
    marker = tmp_path / "code_ran"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": _Payload(str(marker))}, tmp_path / f"evil{suffix}")
    assert "refused" in run_convert(capsys, tmp_path / f"evil{suffix}", tmp_path)
    assert not marker.exists()


def test_cli_error_in_a_real_process_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mobilenetv2", "convert", str(tmp_path / "x.ckpt"), "-o",
                             str(tmp_path / "y.pt")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "not found" in result.stderr


def test_bad_flag_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "--no-such-flag"])
    assert exit_info.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
