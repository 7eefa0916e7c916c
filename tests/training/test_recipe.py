"""The recipe's pieces: which parameters weight decay applies to, through the command line into the optimizer
state; legacy `decay_bn_bias` configs, flags and checkpoints; resume keeping the set a run started with."""

from __future__ import annotations

import pytest
import torch

from mobilenetv2 import MobileNetV2
from mobilenetv2.config import TrainConfig, build_config
from mobilenetv2.training.recipe import build_optimizer

from conftest import REPO, train

CONVOLUTIONS = 52  # at any width: every convolution weight (none has a bias)
BATCHNORMS = 52  # one after every convolution, a scale and a shift each


def _group_sets(model, decay_on):
    groups = build_optimizer(model, TrainConfig(weight_decay=4e-5, weight_decay_on=decay_on)).param_groups
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    return [(group["weight_decay"], {names[id(p)] for p in group["params"]}) for group in groups]


def test_each_set_decays_exactly_its_parameters():
    model = MobileNetV2(num_classes=3, width_mult=0.25)
    batchnorm = {name for name, _ in model.named_parameters()
                 if isinstance(model.get_submodule(name.rsplit(".", 1)[0]), torch.nn.BatchNorm2d)}
    assert len(batchnorm) == 2 * BATCHNORMS
    everything = {name for name, _ in model.named_parameters()}
    classifier = {"head.classifier.weight", "head.classifier.bias"}

    (decay, decayed), (spare, spared) = _group_sets(model, "seed")
    assert (decay, spare) == (4e-5, 0.0) and spared == batchnorm
    assert classifier <= decayed and len(decayed) == CONVOLUTIONS + 2  # the seed decays the classifier's bias
    (_, decayed), (_, spared) = _group_sets(model, "weights")
    assert spared == batchnorm | {"head.classifier.bias"} and len(decayed) == CONVOLUTIONS + 1
    [(decay, decayed)] = _group_sets(model, "all")
    assert decay == 4e-5 and decayed == everything


def test_frozen_parameters_are_left_out_and_the_order_is_the_models():
    model = MobileNetV2(num_classes=3, width_mult=0.25)
    model.backbone.requires_grad_(False)
    [group] = build_optimizer(model, TrainConfig()).param_groups  # the head has no BatchNorm: one group
    assert group["params"] == [model.head.classifier.weight, model.head.classifier.bias]
    model.backbone.requires_grad_(True)
    decayed = build_optimizer(model, TrainConfig()).param_groups[0]["params"]
    in_order = [p for name, p in model.named_parameters() if any(p is q for q in decayed)]
    assert all(a is b for a, b in zip(decayed, in_order, strict=True))


def test_the_optimizer_is_fused_on_the_device_it_is_built_for():
    model = MobileNetV2(num_classes=3, width_mult=0.25)
    for device in (torch.device("cuda", 0), torch.device("cpu")):
        for name in ("sgd", "nesterov", "adamw"):
            assert build_optimizer(model, TrainConfig(optimizer=name), device).defaults["fused"] is True
    assert not build_optimizer(model, TrainConfig()).defaults["fused"]  # no device: torch's default
    # fused on the CPU: the same steps as torch's loop over tensors, to float rounding
    steps = []
    for device in (None, torch.device("cpu")):
        torch.manual_seed(0)
        trained = MobileNetV2(num_classes=3, width_mult=0.25)
        optimizer = build_optimizer(trained, TrainConfig(lr_init=0.1), device)
        generator = torch.Generator().manual_seed(1)
        for _ in range(5):
            for parameter in trained.parameters():
                parameter.grad = torch.randn(parameter.shape, generator=generator)
            optimizer.step()
        steps.append(torch.cat([p.detach().flatten() for p in trained.parameters()]))
    assert torch.allclose(*steps, rtol=1e-6, atol=1e-6)


def _saved_groups(run):
    saved = torch.load(run / "checkpoints/last.pt", weights_only=True)["optimizer"]["param_groups"]
    return [(group["weight_decay"], len(group["params"])) for group in saved]


@pytest.mark.parametrize("decay_on,groups", [("seed", [(4e-5, 54), (0.0, 104)]), ("weights", [(4e-5, 53), (0.0, 105)]),
                                             ("all", [(4e-5, 158)])])
def test_the_option_reaches_the_runs_optimizer_state(dataset, tmp_path, decay_on, groups):
    flags = [] if decay_on == "seed" else ["--weight-decay-on", decay_on]  # seed is the default
    assert train(dataset, tmp_path / "run", "--epochs", "1", "--max-steps", "1", *flags) == 0
    assert _saved_groups(tmp_path / "run") == groups
    assert f"weight_decay_on: {decay_on}" in (tmp_path / "run/config.yaml").read_text()


def test_an_unknown_set_is_one_line_exit_2(capsys, dataset, tmp_path):
    from conftest import one_line_exit_2

    err = one_line_exit_2(capsys, ["train", "--data", str(dataset), "--output", str(tmp_path / "run"),
                                   "--weight-decay-on", "bn"])
    assert "--weight-decay-on must be seed, weights or all, got 'bn'" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("legacy,mapped", [(True, "all"), (False, "weights")])
def test_legacy_decay_bn_bias_in_a_config_or_a_flag(tmp_path, capsys, legacy, mapped):
    recipe = tmp_path / "old.yaml"
    recipe.write_text((REPO / "configs/seed_gpu.yaml").read_text().replace("weight_decay_on: seed",
                                                                           f"decay_bn_bias: {str(legacy).lower()}"))
    assert build_config(TrainConfig, recipe).weight_decay_on == mapped
    assert build_config(TrainConfig, None, {"decay_bn_bias": legacy}).weight_decay_on == mapped
    notices = capsys.readouterr().err.strip().splitlines()
    assert len(notices) == 2 and all(f"read as weight_decay_on {mapped}" in line for line in notices)
    # given beside the new option, the new one wins
    assert build_config(TrainConfig, recipe, {"weight_decay_on": "seed"}).weight_decay_on == "seed"


def test_the_legacy_flag_trains_with_a_notice(dataset, tmp_path, capsys):
    assert train(dataset, tmp_path / "run", "--epochs", "1", "--max-steps", "1", "--no-decay-bn-bias") == 0
    assert "decay_bn_bias False is read as weight_decay_on weights" in capsys.readouterr().err
    assert _saved_groups(tmp_path / "run") == [(4e-5, 53), (0.0, 105)]


def test_resume_keeps_the_set_the_run_started_with(dataset, tmp_path, capsys):
    common = ["--epochs", "2", "--seed", "5"]
    assert train(dataset, tmp_path / "straight", *common, "--weight-decay-on", "weights") == 0
    assert train(dataset, tmp_path / "split", *common, "--weight-decay-on", "weights", "--max-steps", "4") == 0
    capsys.readouterr()
    assert train(dataset, tmp_path / "split", *common, "--resume", "auto") == 0  # the default (seed) not applied
    assert "resuming with weight_decay_on weights, the set the run was started with" in capsys.readouterr().out
    assert _saved_groups(tmp_path / "split") == [(4e-5, 53), (0.0, 105)]
    straight = torch.load(tmp_path / "straight/checkpoints/last.pt", weights_only=True)["model"]
    split = torch.load(tmp_path / "split/checkpoints/last.pt", weights_only=True)["model"]
    assert all(torch.equal(value, split[key]) for key, value in straight.items())


def test_a_checkpoint_from_before_the_option_resumes_as_it_was_started(dataset, tmp_path, capsys):
    """A run started when `decay_bn_bias: true` was the default: one optimizer group over everything."""
    run = tmp_path / "run"
    assert train(dataset, run, "--epochs", "2", "--weight-decay-on", "all", "--max-steps", "4") == 0
    last = run / "checkpoints/last.pt"
    record = torch.load(last, weights_only=True)
    del record["train_config"]["weight_decay_on"]
    record["train_config"]["decay_bn_bias"] = True
    torch.save(record, last)
    capsys.readouterr()
    assert train(dataset, run, "--epochs", "2", "--resume", "auto") == 0
    out = capsys.readouterr().out
    assert "decay_bn_bias True is read as weight_decay_on all" in out
    assert "resuming with weight_decay_on all" in out
    assert _saved_groups(run) == [(4e-5, 158)]


# ------------------------------------------------------------------ optimizers, schedules, clipping, EMA, drop path

def _photo_batches(photos, size=32, count=4, seed=0):
    """Batches of real photos (random crops, resized) with labels, the same on every call."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    names = sorted(photos)
    batches = []
    for _ in range(count):
        images, labels = [], []
        for label, name in enumerate(names[:3] * 2):
            photo = photos[name]
            h, w = photo.shape[:2]
            crop = int(min(h, w) * rng.uniform(0.5, 0.9))
            y, x = rng.integers(0, h - crop + 1), rng.integers(0, w - crop + 1)
            pixels = np.asarray(Image.fromarray(photo[y:y + crop, x:x + crop]).resize((size, size)), dtype=np.float32)
            images.append(torch.from_numpy(pixels / 255 - 0.5).permute(2, 0, 1))
            labels.append(label % 3)
        batches.append((torch.stack(images), torch.tensor(labels)))
    return batches


def test_rmsprop_tf_and_step_decay_match_timms_own_over_several_steps(photos):
    """Our rmsprop-tf + step schedule against timm's create_optimizer_v2('rmsproptf') + create_scheduler_v2('step')
    stepped per update, from the same weights on the same real photos: the same rates and the same weights."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    from mobilenetv2.training.recipe import build_loss, build_schedule

    steps_per_epoch, batches = 2, _photo_batches(photos, count=4)
    config = TrainConfig(optimizer="rmsprop-tf", opt_eps=1e-3, weight_decay=1e-5, weight_decay_on="weights",
                         lr_schedule="step", lr_init=1e-6, lr_max=0.016, warmup_epochs=1, decay_epochs=1.2,
                         decay_rate=0.5, epochs=4, batch_size=6)
    torch.manual_seed(0)
    ours = MobileNetV2(num_classes=3, width_mult=0.25).train()
    theirs = MobileNetV2(num_classes=3, width_mult=0.25).train()
    theirs.load_state_dict(ours.state_dict())
    optimizer, schedule = build_optimizer(ours, config), build_schedule(config, steps_per_epoch)
    # timm's EfficientNet recipe, as its train.py builds it: no decay on BatchNorm and biases
    timm_optimizer = create_optimizer_v2(theirs, "rmsproptf", lr=0.016, weight_decay=1e-5, momentum=0.9, eps=1e-3)
    timm_schedule, _ = create_scheduler_v2(timm_optimizer, "step", num_epochs=4, decay_epochs=1.2, decay_rate=0.5,
                                           warmup_epochs=1, warmup_lr=1e-6, step_on_epochs=False,
                                           updates_per_epoch=steps_per_epoch)
    criterion = build_loss(config, 3)
    rates = []
    for step in range(8):
        timm_schedule.step_update(step)
        for group in optimizer.param_groups:
            group["lr"] = schedule(step)
        rates.append((schedule(step), timm_optimizer.param_groups[0]["lr"]))
        images, labels = batches[step % len(batches)]
        for model, opt in ((ours, optimizer), (theirs, timm_optimizer)):
            opt.zero_grad()
            criterion(model(images), labels).backward()
            opt.step()
    assert len({ours_rate for ours_rate, _ in rates}) >= 4  # warmup and two decays were crossed
    for ours_rate, timm_rate in rates:
        assert ours_rate == pytest.approx(timm_rate, rel=1e-12)
    for (name, value), other in zip(ours.state_dict().items(), theirs.state_dict().values()):
        torch.testing.assert_close(value, other, rtol=1e-5, atol=1e-7, msg=name)
    assert not torch.equal(ours.head.classifier.weight, MobileNetV2(num_classes=3, width_mult=0.25).head.classifier.weight)


def test_each_optimizer_name_builds_its_optimizer():
    from timm.optim import RMSpropTF

    model = MobileNetV2(num_classes=3, width_mult=0.25)
    built = {name: build_optimizer(model, TrainConfig(optimizer=name, opt_eps=1e-3))
             for name in ("sgd", "nesterov", "rmsprop-tf", "adamw")}
    assert not built["sgd"].defaults["nesterov"] and built["nesterov"].defaults["nesterov"]
    assert isinstance(built["rmsprop-tf"], RMSpropTF) and built["rmsprop-tf"].defaults["eps"] == 1e-3
    assert isinstance(built["adamw"], torch.optim.AdamW) and built["adamw"].defaults["eps"] == 1e-3
    for optimizer in built.values():  # every optimizer keeps the weight-decay set
        assert [group["weight_decay"] for group in optimizer.param_groups] == [4e-5, 0.0]


@pytest.mark.parametrize("flags,message", [
    (["--optimizer", "lamb"], "--optimizer must be sgd, nesterov, rmsprop-tf, adamw, got 'lamb'"),
    (["--lr-schedule", "poly"], "--lr-schedule must be cosine, linear or step"),
    (["--decay-rate", "0"], "--decay-epochs and --decay-rate must be > 0"),
    (["--clip-grad-norm", "-1"], "--clip-grad-norm must be >= 0"),
    (["--drop-path", "1.5"], "--drop-path must be in [0, 1)"),
    (["--ema-every", "0"], "--ema-every must be >= 1"),
])
def test_bad_recipe_values_are_one_line_exit_2(capsys, dataset, tmp_path, flags, message):
    from conftest import one_line_exit_2

    err = one_line_exit_2(capsys, ["train", "--data", str(dataset), "--output", str(tmp_path / "run"), *flags])
    assert message in err and not (tmp_path / "run").exists()


def test_clip_grad_norm_bounds_the_update(photos):
    from mobilenetv2.runtime import Runtime
    from mobilenetv2.training.loop import train_step
    from mobilenetv2.training.recipe import build_loss

    images, labels = _photo_batches(photos, count=1)[0]
    runtime = Runtime(torch.device("cpu"), None)
    moved = {}
    for clip in (0.0, 0.05):
        torch.manual_seed(0)
        model = MobileNetV2(num_classes=3, width_mult=0.25).train()
        config = TrainConfig(lr_init=1.0, momentum=0.0, weight_decay=0.0, clip_grad_norm=clip)
        before = [p.detach().clone() for p in model.parameters()]
        train_step(model, images, labels, build_loss(config, 3), build_optimizer(model, config), runtime.grad_scaler(),
                   runtime, config.clip_grad_norm)
        moved[clip] = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)]).norm().item()
    assert moved[0.05] == pytest.approx(0.05, rel=1e-4)  # lr 1, no momentum: the update is the clipped gradient
    assert moved[0.0] > 0.2


def test_ema_every_n_steps_with_warmup_is_the_hand_computed_average(dataset, tmp_path):
    raw = {}
    for steps in (2, 4):
        assert train(dataset, tmp_path / f"s{steps}", "--epochs", "2", "--ema", "0.9", "--ema-every", "2",
                     "--ema-warmup", "--max-steps", str(steps), "--eval-every", "0") == 0
        raw[steps] = torch.load(tmp_path / f"s{steps}/checkpoints/last.pt", weights_only=True)
    w2, w4, ema = raw[2]["train_model"], raw[4]["train_model"], raw[4]["model"]
    decay = min(0.9, 1 - 2 ** (-2 / 3))  # the second update's warmed-up decay
    checked = 0
    for key, value in ema.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, decay * w2[key] + (1 - decay) * w4[key], rtol=1e-5, atol=1e-7, msg=key)
            checked += 1
    assert checked > 200 and raw[4]["ema_averaged"].item() == 2  # steps 2 and 4 updated it, 1 and 3 did not


def test_drop_path_is_training_only_and_scaled_by_depth(photos):
    from torchvision.ops import StochasticDepth

    images, _ = _photo_batches(photos, count=1)[0]
    torch.manual_seed(0)
    plain = MobileNetV2(num_classes=3, width_mult=0.25)
    dropping = MobileNetV2(num_classes=3, width_mult=0.25, drop_path=0.34)
    dropping.load_state_dict(plain.state_dict())  # no new parameters or buffers
    rates = [block.drop_path.p if isinstance(block.drop_path, StochasticDepth) else None
             for block in list(dropping.backbone)[1:-1]]
    assert len(rates) == 17 and rates[0] is None  # no residual in the first block
    assert [round(r, 6) for r in rates if r is not None] == [round(0.34 * k / 17, 6) for k, r in enumerate(rates) if r]
    torch.testing.assert_close(dropping.eval()(images), plain.eval()(images), rtol=0, atol=0)
    dropping.train()
    torch.manual_seed(1)
    first = dropping(images)
    torch.manual_seed(2)
    assert not torch.allclose(first, dropping(images))  # per-image draws in training
