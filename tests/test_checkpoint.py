"""Our checkpoint format: a lossless save/load round trip, older versions, and hostile or broken files refused."""

import numpy as np
import pytest
import torch

from mobilenetv2 import MobileNetV2, load_model, save_model
from mobilenetv2.config import Preprocess
from mobilenetv2.errors import CheckpointError

from conftest import MS_CHECKPOINT, logits, randomise_batchnorm, run_convert


def _carrying_model() -> MobileNetV2:
    """A model whose every piece of metadata differs from the defaults."""
    preprocess = Preprocess(image_size=64, resize_size=73, resize_mode="squash", interpolation="bicubic",
                            mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    model = MobileNetV2(num_classes=3, width_mult=0.35, dropout=0.2, class_names=["a", "b", "c"],
                        preprocess=preprocess)
    return randomise_batchnorm(model, seed=5)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_save_load_save_load_keeps_everything(tmp_path, suffix):
    model = _carrying_model()
    first, second = tmp_path / f"first{suffix}", str(tmp_path / f"second{suffix}")  # Path and str alike
    save_model(model, first)
    loaded = load_model(first)
    save_model(loaded, second)
    again = load_model(second)
    for copy in (loaded, again):
        assert copy.metadata() == model.metadata()
        assert copy.class_names == ["a", "b", "c"] and copy.preprocess == model.preprocess
        assert (copy.width_mult, copy.dropout, copy.num_classes) == (0.35, 0.2, 3)
        images = torch.randn(1, 3, 64, 64)
        torch.testing.assert_close(logits(copy, images), logits(model, images), atol=0, rtol=0)
    if suffix == ".pt":
        raw = torch.load(first, weights_only=True)  # plain data only
        assert raw["config"]["width_mult"] == 0.35 and raw["version"] == 2


def test_class_names_must_fit_the_head():
    with pytest.raises(ValueError, match="2 class names for a 3-class model"):
        MobileNetV2(num_classes=3, class_names=["a", "b"])
    model = MobileNetV2(num_classes=2, width_mult=0.25)
    with pytest.raises(ValueError):
        model.class_names = ["only one"]
    model.class_names = ("x", "y")
    assert model.class_names == ["x", "y"]


def test_version_1_checkpoints_still_load(tmp_path):
    model = _carrying_model()
    record = {"format": "mobilenetv2", "version": 1, "config": {"num_classes": 3, "width_mult": 0.35},
              "class_names": ["a", "b", "c"], "preprocess": model.preprocess.to_dict(),
              "model": model.state_dict()}
    torch.save(record, tmp_path / "v1.pt")
    loaded = load_model(tmp_path / "v1.pt")
    assert loaded.class_names == ["a", "b", "c"] and loaded.preprocess == model.preprocess
    record["version"] = 99
    torch.save(record, tmp_path / "v99.pt")
    with pytest.raises(CheckpointError, match="newer mobilenetv2"):
        load_model(tmp_path / "v99.pt")


def test_asked_shape_must_agree(tmp_path):
    with pytest.raises(CheckpointError, match="classes"):
        load_model(MS_CHECKPOINT, num_classes=1000)
    with pytest.raises(CheckpointError, match="width"):
        load_model(MS_CHECKPOINT, width_mult=1.0)


def test_missing_file(tmp_path, capsys):
    assert "not found" in run_convert(capsys, tmp_path / "nope.ckpt", tmp_path)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".safetensors", ".bin"])
def test_random_bytes(tmp_path, capsys, suffix):
    (tmp_path / f"noise{suffix}").write_bytes(np.random.default_rng(0).bytes(4096))
    run_convert(capsys, tmp_path / f"noise{suffix}", tmp_path)


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
