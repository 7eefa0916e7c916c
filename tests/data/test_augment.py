"""The recipes' augmentations on real photos, on every data path: each changes the training batch and leaves the
eval alone, draws apart per image, follows the seed whatever the worker count; mixup/cutmix targets by hand; the
repeated-augmentation sampler; whole runs with every option, resumed mid-epoch; the recipe configs."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch

from mobilenetv2 import MobileNetV2
from mobilenetv2.config import TrainConfig, build_config
from mobilenetv2.data import augment
from mobilenetv2.data.folders import find_splits
from mobilenetv2.runtime import Runtime
from mobilenetv2.training.loss import SeedLabelSmoothingLoss
from mobilenetv2.training.tasks import device_task, image_task, memory_task

from conftest import REPO, assert_same_weights, one_line_exit_2, photo_batch, torchrun, train

TASKS = {"pil": image_task, "device": device_task, "in-memory": memory_task}
POLICIES = ["ta_wide", "augmix", "imagenet", "rand-m9-mstd0.5"]


def _config(dataset, **changes) -> TrainConfig:
    base = TrainConfig(data=str(dataset), width_mult=0.25, image_size=32, batch_size=8, workers=0, seed=3,
                       color_jitter=0.0, min_scale=0.5)
    return dataclasses.replace(base, **changes)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _epoch(kind, config, tmp_path, epoch=0, skip=0):
    """One epoch of training batches from the path `kind`, the global generators seeded as a run seeds them."""
    splits = find_splits(config.data)
    model = MobileNetV2(num_classes=3, width_mult=0.25, class_names=splits.classes, preprocess=config.preprocess)
    task = TASKS[kind](config, model, splits, Runtime(torch.device("cpu"), None), tmp_path)
    _seed_everything(config.seed)
    inputs, labels = [], []
    for batch, batch_labels, _skipped in task.train_batches(epoch, skip):
        inputs.append(batch)
        labels.append(batch_labels)
    return torch.cat(inputs), torch.cat(labels), task, model


def _changed(a: torch.Tensor, b: torch.Tensor) -> float:
    """The fraction of images that differ visibly (mean absolute difference over 0.05 in normalised units)."""
    return float(((a - b).abs().flatten(1).mean(1) > 0.05).float().mean())


@pytest.mark.parametrize("kind", TASKS)
@pytest.mark.parametrize("policy", POLICIES)
def test_each_policy_changes_the_training_batch_and_not_the_eval(dataset, tmp_path, kind, policy):
    plain, plain_labels, plain_task, model = _epoch(kind, _config(dataset), tmp_path)
    augmented, labels, task, _ = _epoch(kind, _config(dataset, auto_augment=policy), tmp_path)
    assert torch.equal(labels, plain_labels) and augmented.shape == plain.shape
    assert _changed(augmented, plain) >= 0.5, policy
    model.eval()
    before, after = plain_task.evaluate(model), task.evaluate(model)
    assert (after.count, after.top1, after.loss) == (before.count, before.top1, before.loss)


@pytest.mark.parametrize("kind", TASKS)
def test_the_train_crop_size_is_separate_from_the_eval_size(dataset, tmp_path, kind):
    config = _config(dataset, train_crop_size=24, image_size=32, resize_size=40)
    images, _labels, task, model = _epoch(kind, config, tmp_path)
    assert images.shape[-2:] == (24, 24)
    assert task.evaluate(model.eval()).count == 15  # eval still runs at the contract's 40 -> 32


@pytest.mark.parametrize("policy", POLICIES)
def test_a_policy_draws_apart_for_each_image_of_a_batch(photos, policy):
    """The same photo eight times in one batch comes out at least five different ways."""
    from PIL import Image

    photo = np.asarray(Image.fromarray(photos["chelsea"]).resize((48, 48)))
    batch = torch.from_numpy(photo).permute(2, 0, 1).float().div(255).expand(8, -1, -1, -1).contiguous()
    _seed_everything(0)
    out = augment.ImagePolicy(policy, 48, (0.485, 0.456, 0.406), "bilinear").on_batch(batch)
    assert out.shape == batch.shape and out.dtype == batch.dtype
    distinct = {tuple(image.flatten()[::97].tolist()) for image in out}
    assert len(distinct) >= 5, len(distinct)


@pytest.mark.parametrize("policy", ["ta_wide", "rand-m9-mstd0.5"])
def test_the_image_path_draws_follow_the_seed_never_the_worker_count(dataset, tmp_path, policy):
    config = _config(dataset, auto_augment=policy)
    first, _, _, _ = _epoch("pil", config, tmp_path)
    assert torch.equal(_epoch("pil", dataclasses.replace(config, workers=2), tmp_path)[0], first)
    assert torch.equal(_epoch("pil", config, tmp_path, skip=1)[0], first[8:])  # a resumed epoch
    assert not torch.equal(_epoch("pil", dataclasses.replace(config, seed=4), tmp_path)[0], first)


@pytest.mark.parametrize("kind", ["device", "in-memory"])
def test_the_batch_paths_draw_from_the_seed(dataset, tmp_path, kind):
    config = _config(dataset, auto_augment="rand-m9-mstd0.5")
    first, _, _, _ = _epoch(kind, config, tmp_path)
    assert torch.equal(_epoch(kind, dataclasses.replace(config, workers=2), tmp_path)[0], first)
    assert not torch.equal(_epoch(kind, dataclasses.replace(config, seed=4), tmp_path)[0], first)


def test_random_erasing_erases_a_rectangle_per_image(photos):
    from PIL import Image

    photo = np.asarray(Image.fromarray(photos["astronaut"]).resize((48, 48)), dtype=np.float32) / 255 - 0.5
    batch = torch.from_numpy(photo).permute(2, 0, 1).expand(8, -1, -1, -1).contiguous()
    _seed_everything(0)
    erased = augment.RandomErase(1.0, "const")(batch)
    masks = (erased != batch).any(dim=1)  # where each image was erased
    areas = masks.flatten(1).float().mean(1)
    assert ((areas > 0.01) & (areas < 0.4)).all(), areas  # every image, 2-33 % of it (a few pixels equal by chance)
    assert len({tuple(mask.flatten().nonzero().flatten()[:3].tolist()) for mask in masks}) >= 6  # apart per image
    assert (erased[~masks.unsqueeze(1).expand_as(erased)] == batch[~masks.unsqueeze(1).expand_as(batch)]).all()
    assert (erased.permute(1, 0, 2, 3)[:, masks] == 0).all()  # const: 0, the mean colour
    pixel = augment.RandomErase(1.0, "pixel")(batch)
    assert 0.5 < pixel[(pixel != batch)].std() < 1.5  # normal noise


def test_mixup_targets_sum_to_one_and_match_the_mix_of_the_images(photos):
    images, labels = photo_batch(photos)
    _seed_everything(1)
    mixed, targets = augment.BatchMixer(0.4, 0.0, 0.5, 1.0, 5)(images.clone(), labels)
    partner, partner_labels = images.roll(1, 0), labels.roll(1, 0)
    # the mixing weight, read back from the pixels by least squares: mixed - partner = lam * (images - partner)
    difference = (images - partner).flatten()
    lam = float(((mixed - partner).flatten() @ difference) / (difference @ difference))
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * partner, rtol=0, atol=1e-5)
    expected = torch.zeros(6, 5)
    expected[torch.arange(6), labels] += lam
    expected[torch.arange(6), partner_labels] += 1 - lam
    torch.testing.assert_close(targets, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(targets.sum(1), torch.ones(6))
    assert 0.01 < lam < 0.99  # a real mix, not one image


def test_cutmix_targets_are_the_pasted_area(photos):
    images, labels = photo_batch(photos)
    for seed in range(3):
        _seed_everything(seed)
        mixed, targets = augment.BatchMixer(0.0, 1.0, 0.5, 1.0, 5)(images.clone(), labels)
        pasted = (mixed != images).any(dim=1)[0]  # the box, as its pixels differ from the image's own
        partner_labels = labels.roll(1, 0)
        kept = 1 - float(pasted.float().mean())
        expected = torch.zeros(6, 5)
        expected[torch.arange(6), labels] += kept
        expected[torch.arange(6), partner_labels] += 1 - kept
        torch.testing.assert_close(targets, expected, rtol=0, atol=0.02)  # a pixel or two equal by chance
        torch.testing.assert_close(targets.sum(1), torch.ones(6))


def test_both_on_switches_and_a_mix_probability_skips_batches(photos):
    images, labels = photo_batch(photos)
    _seed_everything(0)
    mixer, kinds = augment.BatchMixer(0.4, 1.0, 0.5, 0.7, 5), []
    for _ in range(60):
        mixed, targets = mixer(images.clone(), labels)
        if not targets.is_floating_point():
            kinds.append("none")
            assert torch.equal(mixed, images)
        else:  # cutmix keeps pixels exactly; mixup changes nearly every one
            kinds.append("cutmix" if (mixed == images).float().mean() > 0.3 else "mixup")
    assert 8 <= kinds.count("none") <= 30 and kinds.count("cutmix") >= 8 and kinds.count("mixup") >= 8


def test_soft_targets_compose_with_the_seeds_smoothing():
    """A mix of two labels costs the same mix of their smoothed losses (smoothing is affine in the target)."""
    logits = torch.randn(6, 5, dtype=torch.float64)
    a, b = torch.tensor([0, 1, 2, 3, 4, 0]), torch.tensor([2, 2, 0, 1, 3, 4])
    lam = 0.3
    soft = lam * torch.nn.functional.one_hot(a, 5).double() + (1 - lam) * torch.nn.functional.one_hot(b, 5).double()
    loss = SeedLabelSmoothingLoss(0.1, 5)
    torch.testing.assert_close(loss(logits, soft), lam * loss(logits, a) + (1 - lam) * loss(logits, b))
    assert not torch.isclose(loss(logits, soft), loss(logits, a))


def test_repeated_augmentation_spreads_copies_across_ranks():
    from mobilenetv2.training.tasks import _RepeatedAugmentation

    shares = []
    for rank in (0, 1):
        sampler = _RepeatedAugmentation(300, 4, Runtime(torch.device("cpu"), None, rank=rank, world_size=2), seed=1)
        sampler.set_epoch(0)
        shares.append(list(sampler))
    assert [len(share) for share in shares] == [128, 128]  # timm's: 300 // 256 * 256 / 2 ranks
    for share in shares:  # each image's copies come in pairs to each rank
        counts = np.bincount(share, minlength=300)
        assert set(counts[counts > 0]) <= {2} or max(counts) <= 2
    both = np.bincount(shares[0] + shares[1], minlength=300)
    assert set(both[both > 0]) <= {4, 2}  # the copies, dealt across the ranks
    sampler = _RepeatedAugmentation(300, 4, Runtime(torch.device("cpu"), None), seed=2)
    sampler.set_epoch(0)
    assert list(sampler)[:64] != shares[0][:64]  # another seed, another order


def test_repeated_copies_on_the_image_path_draw_apart(dataset, tmp_path):
    images, labels, _, _ = _epoch("pil", _config(dataset, repeated_aug=4, min_scale=0.3), tmp_path)
    # four copies in a row of each image: the same label, different crops
    assert all(len(set(labels[i:i + 4].tolist())) == 1 for i in range(0, 16, 4))
    assert all(len({float(image.sum()) for image in images[i:i + 4]}) == 4 for i in range(0, 16, 4))


EVERY_OPTION = ["--auto-augment", "rand-m9-mstd0.5", "--random-erase", "0.5", "--mixup-alpha", "0.2",
                "--cutmix-alpha", "1.0", "--repeated-aug", "2", "--train-crop-size", "24", "--interpolation",
                "bicubic", "--drop-path", "0.1", "--ema", "0.9", "--ema-every", "2", "--ema-warmup", "--optimizer",
                "nesterov", "--clip-grad-norm", "5", "--lr-schedule", "step", "--decay-epochs", "0.5"]


@pytest.mark.parametrize("backend", [["--data-backend", "pil"], ["--data-backend", "device"], ["--in-memory"]])
def test_a_mid_epoch_resume_with_every_option_is_bit_identical(dataset, tmp_path, backend):
    common = ["--epochs", "2", "--seed", "3", "--eval-every", "0", *EVERY_OPTION, *backend]  # 3 steps per epoch
    assert train(dataset, tmp_path / "straight", *common) == 0
    assert train(dataset, tmp_path / "split", *common, "--max-steps", "4") == 0
    assert train(dataset, tmp_path / "split", *common, "--resume", "auto") == 0
    assert_same_weights(tmp_path / "straight", tmp_path / "split")


@pytest.mark.parametrize("recipe", ["torchvision_v2", "timm_ra", "cvnets"])
def test_each_recipe_config_runs_a_few_steps(dataset, tmp_path, recipe):
    config = build_config(TrainConfig, REPO / "configs" / f"{recipe}.yaml")
    assert config.epochs >= 300
    small = ["--config", str(REPO / "configs" / f"{recipe}.yaml"), "--epochs", "1", "--max-steps", "2",
             "--image-size", "32", "--resize-size", "36", "--train-crop-size", "28", "--batch-size", "8",
             "--warmup-epochs", "0.5", "--repeated-aug", str(min(config.repeated_aug, 2)), "--ema-every", "1"]
    assert main_train(dataset, tmp_path / "run", *small) == 0
    saved = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)
    assert saved["global_step"] == 2 and saved["train_config"]["optimizer"] == config.optimizer


def main_train(dataset, output, *extra):
    from mobilenetv2.cli import main

    return main(["train", "--data", str(dataset), "--output", str(output), "--width-mult", "0.25", "--workers", "0",
                 *extra])


@pytest.mark.parametrize("flags,message", [
    (["--auto-augment", "randaug"], "--auto-augment must be none, ta_wide, augmix, imagenet or a RandAugment"),
    (["--auto-augment", "rand-m9-zz3"], "is not a RandAugment string timm reads"),
    (["--mixup-alpha", "-0.2"], "--mixup-alpha and --cutmix-alpha must be >= 0"),
    (["--random-erase", "1.5"], "--random-erase must be a probability"),
    (["--repeated-aug", "0"], "--repeated-aug must be >= 1"),
    (["--interpolation", "lanczos"], "--interpolation must be bilinear or bicubic"),
])
def test_bad_augmentation_values_are_one_line_exit_2(capsys, dataset, tmp_path, flags, message):
    err = one_line_exit_2(capsys, ["train", "--data", str(dataset), "--output", str(tmp_path / "run"), "--workers",
                                   "0", "--width-mult", "0.25", "--image-size", "32", *flags])
    assert message in err


def test_every_option_under_torchrun(dataset, tmp_path):
    """Two ranks with every option, progressive resizing included: the repeated-augmentation sampler splits across
    them, eval counts each image once, the run's steps are what the sampler's share gives, and each epoch trains at
    its scheduled size on both ranks."""
    import os
    import sys

    run = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "mobilenetv2", "train", "--data", str(dataset), "--output", str(run), "--width-mult", "0.25",
               "--image-size", "32", "--workers", "0", "--batch-size", "4", "--epochs", "2", "--amp", "off",
               *EVERY_OPTION, "--train-crop-size", "0", "--progressive-resize", "24:32", "--progressive-ramp", "0:1",
               "--progressive-multiple", "8"]  # progressive resizing in place of the fixed train crop
    result = torchrun(command, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    from conftest import records

    epochs = records(run, "epoch")
    assert [epoch["train_size"] for epoch in epochs] == [24, 32]
    for epoch in epochs:
        assert epoch["eval_count"] == 15 and epoch["steps"] == 24 // 2 // 4  # timm's share: 24 images / 2 ranks


def test_image_options_are_refused_for_cached_features(capsys, dataset, tmp_path):
    from conftest import MS_CHECKPOINT

    err = one_line_exit_2(capsys, ["train", "--data", str(dataset), "--output", str(tmp_path / "run"), "--pretrained",
                                   str(MS_CHECKPOINT), "--freeze", "backbone", "--mixup-alpha", "0.2"])
    assert "--freeze backbone trains on cached features" in err and not (tmp_path / "run").exists()
