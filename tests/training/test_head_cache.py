"""Head-only training from the backbone-feature cache: frozen backbone, cache keying and reuse, augmented views, torchrun."""

import dataclasses
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch

from mobilenetv2 import load_model
from mobilenetv2.cli import main
from mobilenetv2.training import head_cache

from conftest import TINY_TRAIN, head_only, last_eval, torchrun


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
    # the written checkpoint is a full network: run on the images themselves it scores what the head scored on the
    # cached features, image for image
    report = run / "eval.json"
    assert main(["eval", "--data", str(three_new), "--checkpoint", str(run / "checkpoints" / "last.pt"),
                 "--workers", "0", "--json", str(report)]) == 0
    full = json.loads(report.read_text())
    assert full["count"] == 60 and full["top1"] == pytest.approx(result["eval_top1"], abs=1e-9)
    assert full["top5"] == pytest.approx(result["eval_top5"], abs=1e-9)


def test_cache_key_follows_every_input_it_depends_on(three_new, pretrained_five):
    from mobilenetv2.config import TrainConfig
    from mobilenetv2.data.folders import image_folder
    from mobilenetv2.data.transforms import eval_transform

    model = load_model(pretrained_five)
    config = TrainConfig(data=str(three_new), pretrained=str(pretrained_five), freeze="backbone", image_size=32)

    def key(model=model, config=config):
        splits = {"train": image_folder(three_new / "train", eval_transform(config.preprocess))}
        return head_cache.cache_key(model, splits, config)

    base = key()
    assert key() == base  # stable
    changed = {}
    nudged = load_model(pretrained_five)
    with torch.no_grad():
        nudged.backbone[5].conv[0][0].weight[0, 0, 0, 0] += 1e-3
    changed["backbone weights"] = key(model=nudged)
    head_only_change = load_model(pretrained_five)
    with torch.no_grad():
        head_only_change.head.classifier.weight.add_(1.0)
    assert key(model=head_only_change) == base  # the head is not what the cache holds
    for field, value in (("image_size", 48), ("resize_size", 40), ("min_scale", 0.5), ("color_jitter", 0.1),
                         ("feature_views", 2), ("seed", 2)):
        changed[field] = key(config=dataclasses.replace(config, **{field: value}))
    image = sorted((three_new / "train" / "Coat").iterdir())[0]
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    changed["file mtime"] = key()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert key() == base
    with image.open("ab") as handle:
        handle.write(b"\0")
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime, one byte longer
    changed["file size"] = key()
    assert {what: k for what, k in changed.items() if k == base} == {}
    assert len(set(changed.values())) == len(changed)


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
    assert "(360 train rows, backbone run by " in capsys.readouterr().out
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
    result = torchrun(command, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    one = next(single_cache.iterdir())
    two = next(ddp_cache.iterdir())
    assert one.name == two.name  # same key
    np.testing.assert_allclose(np.load(two / "train_features.npy"), np.load(one / "train_features.npy"), atol=1e-5)
    assert last_eval(tmp_path / "two")["eval_count"] == 60
