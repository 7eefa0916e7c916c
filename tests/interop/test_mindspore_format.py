"""MindSpore `.ckpt` files: the seed's logits reproduced, every head layout, optimizer state ignored, damaged files refused."""

import json

import numpy as np
import pytest
import torch

from mobilenetv2 import load_model
from mobilenetv2.cli import main
from mobilenetv2.interop import mindspore

from conftest import FIXTURES, MS_CHECKPOINT, MS_INPUT, MS_LOGITS, assert_parity, fp16_rounded, logits, run_convert


def test_the_fixture_depends_on_its_input():
    """A reference whose output ignores its input proves nothing: the two photos' logits must differ."""
    scale = max(1.0, float(np.abs(MS_LOGITS).max()))
    assert np.abs(MS_LOGITS[0] - MS_LOGITS[1]).max() > 0.1 * scale
    assert np.abs(MS_INPUT[0] - MS_INPUT[1]).max() > 1.0


def test_mindspore_fixture_reproduces_the_seed_logits():
    model = load_model(MS_CHECKPOINT)
    assert (model.width_mult, model.num_classes) == (0.5, 10)
    assert_parity(logits(model, torch.from_numpy(MS_INPUT)))


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
    # fp16 storage costs precision, never correctness: the result is exactly the fp32 network with every stored
    # tensor rounded through fp16
    images = torch.from_numpy(MS_INPUT)
    assert torch.equal(logits(load_model(tmp_path / "out.pt"), images), logits(fp16_rounded(MS_CHECKPOINT), images))


@pytest.mark.parametrize("head_prefix", ["dense.", "head.dense.", "head.1.", "head.head.1."])
def test_every_seed_head_layout(tmp_path, head_prefix):
    tensors = mindspore.read_checkpoint(MS_CHECKPOINT)
    renamed = {(head_prefix + k[6:]) if k.startswith("dense.") else k: v for k, v in tensors.items()}
    mindspore.write_checkpoint(renamed, tmp_path / "head.ckpt")
    reference = load_model(MS_CHECKPOINT)
    images = torch.from_numpy(np.load(FIXTURES / "ms_input_w0.5_c10.npy"))
    torch.testing.assert_close(logits(load_model(tmp_path / "head.ckpt"), images), logits(reference, images), atol=0, rtol=0)


def test_truncated_mindspore_checkpoint(tmp_path, capsys):
    data = MS_CHECKPOINT.read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    assert "MindSpore checkpoint" in run_convert(capsys, tmp_path / "cut.ckpt", tmp_path)


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
