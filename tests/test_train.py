"""`mobilenetv2 train` end to end on CPU with tiny settings on real photos."""

import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from mobilenetv2 import load_model
from mobilenetv2.checkpoint import atomic_write
from mobilenetv2.cli import main

from conftest import MS_CHECKPOINT

TINY = ["--width-mult", "0.25", "--image-size", "32", "--batch-size", "8", "--workers", "0", "--lr-max", "0.05",
        "--color-jitter", "0.4"]


def train(dataset, output, *extra):
    return main(["train", "--data", str(dataset), "--output", str(output), *TINY, *extra])


def records(run, kind):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def seed_get_lr(lr_init, lr_end, lr_max, warmup_epochs, total_epochs, steps_per_epoch):
    """The seed's get_lr, written out as it lists the rates."""
    total_steps = steps_per_epoch * total_epochs
    warmup_steps = steps_per_epoch * warmup_epochs
    rates = []
    for i in range(total_steps):
        if i < warmup_steps:
            lr = lr_init + (lr_max - lr_init) * i / warmup_steps
        else:
            lr = lr_end + (lr_max - lr_end) * (1. + math.cos(math.pi * (i - warmup_steps) / (total_steps - warmup_steps))) / 2.
        rates.append(max(lr, 0.0))
    return rates


def test_scratch_run_writes_logs_metrics_and_checkpoints(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(dataset, run, "--epochs", "3", "--keep-max", "2", "--warmup-epochs", "1", "--lr-init", "0.01") == 0
    out = capsys.readouterr().out
    step = re.compile(r"^epoch: \[ {2}[0-2]/ {2}3\], step:\[ {4}[0-2]/ {4}3\], loss:\[\d+\.\d{3}/\d+\.\d{3}\], "
                      r"time:\[\d+\.\d{3}\], lr:\[\d\.\d{3}\]$")
    epoch = re.compile(r"^epoch time: \d+\.\d{3}, per step time: \d+\.\d{3}, avg loss: \d+\.\d{3}, "
                       r"eval_acc: [01]\.\d{4}, best_acc: [01]\.\d{4}$")
    lines = out.splitlines()
    assert sum(bool(step.match(line)) for line in lines) == 9
    assert sum(bool(epoch.match(line)) for line in lines) == 3
    assert (run / "train.log").read_text().count("epoch time:") == 3
    # keep-max 2: the two newest numbered checkpoints, plus last and best
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["best.pt", "last.pt", "mobilenetv2-2_3.pt", "mobilenetv2-3_3.pt"]
    # the learning rate per step is the seed's get_lr
    logged = [r["lr"] for r in records(run, "step")]
    expected = seed_get_lr(0.01, 0.0, 0.05, 1, 3, 3)
    assert logged == pytest.approx(expected, abs=1e-12)
    assert logged[0] == pytest.approx(0.01) and max(logged) == pytest.approx(0.05)
    epochs = records(run, "epoch")
    assert [r["eval_count"] for r in epochs] == [15, 15, 15]
    assert all({"loss", "lr", "images_per_s", "data_wait_s"} <= set(r) for r in records(run, "step"))
    config = (run / "config.yaml").read_text()
    assert "width_mult: 0.25" in config and "warmup_epochs: 1.0" in config
    model = load_model(run / "checkpoints" / "best.pt")
    assert model.class_names == ["astronaut", "chelsea", "coffee"]
    assert model.preprocess.image_size == 32


def test_training_checkpoint_is_plain_data_with_full_state(dataset, tmp_path):
    run = tmp_path / "run"
    assert train(dataset, run, "--epochs", "1", "--ema", "0.9") == 0
    payload = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert {"model", "train_model", "optimizer", "scaler", "rng", "epoch", "global_step", "config", "preprocess"} <= set(payload)
    assert payload["epoch"] == 1 and payload["global_step"] == 3


def test_resume_gives_identical_weights(dataset, tmp_path):
    common = ["--epochs", "3", "--ema", "0.5", "--seed", "7"]
    assert train(dataset, tmp_path / "straight", *common) == 0
    assert train(dataset, tmp_path / "split", *common, "--max-steps", "3") == 0
    assert torch.load(tmp_path / "split/checkpoints/last.pt", weights_only=True)["epoch"] == 1
    assert train(dataset, tmp_path / "split", *common, "--resume", "auto") == 0
    straight = torch.load(tmp_path / "straight/checkpoints/last.pt", weights_only=True)
    split = torch.load(tmp_path / "split/checkpoints/last.pt", weights_only=True)
    for part in ("model", "train_model"):
        for key, value in straight[part].items():
            assert torch.equal(value, split[part][key]), (part, key)
    assert records(tmp_path / "split", "step")[-1]["global_step"] == 8
    assert [r["global_step"] for r in records(tmp_path / "split", "step")] == list(range(9))


def test_metrics_have_every_step_while_log_lines_are_thinned(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(dataset, run, "--epochs", "2", "--log-every", "2") == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch: [")]
    assert [line.split("step:[")[1][:5].strip() for line in lines] == ["0", "2", "0", "2"]
    assert len(records(run, "step")) == 6


def test_full_finetune_from_mindspore_with_filter_head(dataset, tmp_path):
    run = tmp_path / "run"
    assert train(dataset, run, "--pretrained", str(MS_CHECKPOINT), "--filter-head", "--width-mult", "0.5",
                 "--max-steps", "1", "--lr-max", "0", "--epochs", "1") == 0
    source, tuned = load_model(MS_CHECKPOINT), load_model(run / "checkpoints" / "last.pt")
    assert tuned.num_classes == 3 and source.num_classes == 10
    for key, value in source.state_dict().items():
        if key.startswith("backbone.") and key.endswith(".weight") and value.dim() == 4:
            assert torch.equal(value, tuned.state_dict()[key]), key


def test_incremental_learning_continues_the_whole_network(dataset, tmp_path):
    first = tmp_path / "first"
    assert train(dataset, first, "--epochs", "1") == 0
    second = tmp_path / "second"
    assert train(dataset, second, "--pretrained", str(first / "checkpoints/last.pt"), "--epochs", "1",
                 "--lr-max", "0", "--max-steps", "1") == 0
    before, after = load_model(first / "checkpoints/last.pt"), load_model(second / "checkpoints/last.pt")
    torch.testing.assert_close(after.head.classifier.weight, before.head.classifier.weight, atol=0, rtol=0)


def test_unreadable_image_is_skipped_and_counted(dataset, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    (data / "train" / "coffee" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    assert train(data, tmp_path / "run", "--epochs", "1") == 0
    assert "skipped 1 unreadable image" in capsys.readouterr().out


def test_a_batch_of_only_unreadable_images_keeps_the_schedule(tmp_path, capsys):
    from conftest import write_image_folder

    data = tmp_path / "data"
    write_image_folder(data / "train", per_class=3, seed=3, classes=["chelsea", "coffee"])
    for folder in (data / "train").iterdir():
        for image in sorted(folder.iterdir())[1:]:
            image.write_bytes(b"not an image")  # 4 of 6 unreadable: some batches of 2 hold none that decode
    assert main(["train", "--data", str(data), "--output", str(tmp_path / "run"), *TINY, "--batch-size", "2",
                 "--epochs", "2", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert "skipped 8 unreadable image" in out  # 4 per epoch
    payload = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert payload["epoch"] == 2 and payload["global_step"] == 6


def test_fp16_on_cpu_and_lr_finite(dataset, tmp_path):
    assert train(dataset, tmp_path / "bf16", "--epochs", "1", "--amp", "bf16", "--max-steps", "2") == 0
    losses = [r["loss"] for r in records(tmp_path / "bf16", "step")]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)


def test_atomic_write_never_destroys_the_last_good_file(tmp_path):
    target = tmp_path / "last.pt"
    target.write_bytes(b"good")

    def crash(handle):
        handle.write(b"half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(target, crash)
    assert target.read_bytes() == b"good"
    assert list(tmp_path.iterdir()) == [target]


@pytest.mark.parametrize("case", ["missing", "no_classes", "empty_class", "width", "conflict", "freeze_alone", "bad_amp",
                                  "no_gpu", "bad_config"])
def test_bad_input_one_line_exit_2_nothing_written(dataset, tmp_path, capsys, case):
    data = dataset
    extra = []
    if case == "missing":
        data = tmp_path / "nowhere"
    elif case == "no_classes":
        data = tmp_path / "flat"
        (data / "train").mkdir(parents=True)
    elif case == "empty_class":
        data = tmp_path / "data"
        shutil.copytree(dataset, data)
        (data / "train" / "empty").mkdir()
    elif case == "width":
        extra = ["--pretrained", str(MS_CHECKPOINT), "--filter-head"]  # checkpoint is 0.5, TINY asks 0.25
    elif case == "conflict":
        extra = ["--filter-head"]
    elif case == "freeze_alone":
        extra = ["--freeze", "backbone"]
    elif case == "bad_amp":
        extra = ["--amp", "fp8"]
    elif case == "no_gpu":
        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
        extra = ["--device", "cuda"]
    elif case == "bad_config":
        (tmp_path / "recipe.yaml").write_text("epochs: 3\nlearning_rate: 0.1\n")
        extra = ["--config", str(tmp_path / "recipe.yaml")]
    run = tmp_path / "run"
    assert train(data, run, *extra) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "error" in err
    assert not run.exists()


def test_torchrun_two_processes_train_and_evaluate_exactly(dataset, tmp_path):
    from mobilenetv2 import data as data_module
    from mobilenetv2.runtime import setup
    from mobilenetv2.train import evaluate

    run = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "mobilenetv2", "train", "--data", str(dataset), "--output", str(run), *TINY,
               "--batch-size", "4", "--epochs", "2", "--amp", "off"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (run / "train.log").read_text().count("epoch time:") == 2  # rank 0 alone writes
    last_epoch = records(run, "epoch")[-1]
    assert last_epoch["eval_count"] == 15  # 15 val images over 2 ranks: none padded, none dropped
    assert records(run, "step")[0]["images_per_s"] > 0
    model = load_model(run / "checkpoints" / "last.pt")
    val = data_module.image_folder(dataset / "val", data_module.eval_transform(model.preprocess))
    single = evaluate(model, data_module.eval_loader(val, 4, 0), setup("cpu", "off"), 3)
    assert single.count == 15
    assert single.top1 == pytest.approx(last_epoch["eval_top1"], abs=1e-9)
