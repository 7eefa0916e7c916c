"""Head-only training from the backbone-feature cache: frozen backbone, cache keying and reuse, augmented views, torchrun."""

import os
import shutil
import subprocess
import sys

import numpy as np
import torch

from mobilenetv2 import load_model
from mobilenetv2.training import head_cache

from conftest import TINY_TRAIN, head_only, last_eval


def test_backbone_frozen_bit_for_bit_and_head_learns(three_new, pretrained_five, tmp_path, capsys):
    run = tmp_path / "run"
    assert head_only(three_new, run, pretrained_five, "--epochs", "15") == 0
    assert "feature cache built" in capsys.readouterr().out
    before, after = load_model(pretrained_five), load_model(run / "checkpoints" / "last.pt")
    for key, value in before.backbone.state_dict().items():
        assert torch.equal(value, after.backbone.state_dict()[key]), key
    assert after.num_classes == 3 and after.class_names == ["Ankle_boot", "Coat", "Dress"]
    result = last_eval(run)
    assert result["eval_count"] == 60
    assert result["eval_top1"] >= 0.6  # chance is 1/3
    # the written checkpoint is a full network that eval-mode inference agrees with
    assert not torch.equal(before.head.classifier.weight[:3], after.head.classifier.weight)


def test_cache_reused_rebuilt_on_change_never_after_crash(three_new, pretrained_five, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    common = ["--epochs", "1", "--feature-cache", str(cache)]
    assert head_only(three_new, tmp_path / "a", pretrained_five, *common) == 0
    assert "feature cache built" in capsys.readouterr().out
    assert head_only(three_new, tmp_path / "b", pretrained_five, *common) == 0
    assert "feature cache reused" in capsys.readouterr().out
    # a new file changes the key
    shutil.copy(next((three_new / "train" / "Coat").iterdir()), three_new / "train" / "Coat" / "copy.png")
    assert head_only(three_new, tmp_path / "c", pretrained_five, *common) == 0
    assert "feature cache built" in capsys.readouterr().out
    assert len([p for p in cache.iterdir() if not p.name.endswith(".partial")]) == 2
    # a crash mid-extraction leaves a partial cache that the next run does not reuse
    (three_new / "train" / "Coat" / "copy.png").unlink()
    shutil.rmtree(cache)
    calls = []
    original = head_cache._extract

    def crash_after_first(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while extracting val
        return original(*args, **kwargs)

    monkeypatch.setattr(head_cache, "_extract", crash_after_first)
    assert head_only(three_new, tmp_path / "d", pretrained_five, *common) == 130
    assert [p.name.endswith(".partial") for p in cache.iterdir()] == [True]
    monkeypatch.setattr(head_cache, "_extract", original)
    capsys.readouterr()
    assert head_only(three_new, tmp_path / "e", pretrained_five, *common) == 0
    assert "feature cache built" in capsys.readouterr().out


def test_augmented_views(three_new, pretrained_five, tmp_path, capsys):
    assert head_only(three_new, tmp_path / "run", pretrained_five, "--epochs", "2", "--feature-views", "3",
                     "--feature-cache", str(tmp_path / "cache")) == 0
    assert "(360 train rows)" in capsys.readouterr().out
    folder = next(p for p in (tmp_path / "cache").iterdir())
    rows = np.load(folder / "train_features.npy")
    assert rows.shape[0] == 360
    assert not np.allclose(rows[0], rows[1])  # two views of one image differ


def test_torchrun_splits_extraction_and_matches_one_process(three_new, pretrained_five, tmp_path):
    single_cache, ddp_cache = tmp_path / "single", tmp_path / "ddp"
    assert head_only(three_new, tmp_path / "one", pretrained_five, "--epochs", "1", "--feature-cache",
                     str(single_cache)) == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "mobilenetv2", "train", "--data", str(three_new), "--output", str(tmp_path / "two"),
               "--pretrained", str(pretrained_five), "--freeze", "backbone", *TINY_TRAIN, "--batch-size", "16",
               "--epochs", "1", "--feature-cache", str(ddp_cache), "--lr-max", "0.1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    one = next(single_cache.iterdir())
    two = next(ddp_cache.iterdir())
    assert one.name == two.name  # same key
    np.testing.assert_allclose(np.load(two / "train_features.npy"), np.load(one / "train_features.npy"), atol=1e-5)
    assert last_eval(tmp_path / "two")["eval_count"] == 60
