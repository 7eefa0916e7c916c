"""The training loop, end to end through `mobilenetv2 train` on tiny settings and real photos."""

import math
import os
import re
import shutil
import sys

import pytest
import torch

from mobilenetv2 import load_model
from mobilenetv2.cli import main
from mobilenetv2.runtime import Runtime
from mobilenetv2.training.loop import train_step
from mobilenetv2.training.loss import SeedLabelSmoothingLoss

from conftest import TINY, records, torchrun, train


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


def test_metrics_have_every_step_while_log_lines_are_thinned(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(dataset, run, "--epochs", "2", "--log-every", "2") == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch: [")]
    assert [line.split("step:[")[1][:5].strip() for line in lines] == ["0", "2", "0", "2"]
    assert len(records(run, "step")) == 6


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


def test_bf16_on_cpu_really_computes_in_bf16(dataset, tmp_path, capsys):
    assert train(dataset, tmp_path / "bf16", "--epochs", "1", "--amp", "bf16", "--max-steps", "2") == 0
    assert "amp torch.bfloat16" in capsys.readouterr().out
    assert train(dataset, tmp_path / "fp32", "--epochs", "1", "--amp", "off", "--max-steps", "2") == 0
    assert "amp off" in capsys.readouterr().out
    bf16, fp32 = ([r["loss"] for r in records(tmp_path / run, "step")] for run in ("bf16", "fp32"))
    assert len(bf16) == 2 and all(math.isfinite(v) for v in bf16)
    # the same first batch and weights: bf16 rounding moves the loss a little, never much (measured on this tiny
    # width-0.25, 32 px network over seeds 0-3: 0.4-6 %)
    assert bf16[0] != fp32[0] and bf16[0] == pytest.approx(fp32[0], rel=0.1)


def test_fp16_on_cpu_is_refused_in_one_line(dataset, tmp_path, capsys):
    assert train(dataset, tmp_path / "fp16", "--amp", "fp16") == 2
    assert "--amp fp16 needs a GPU" in capsys.readouterr().err


def test_torchrun_two_processes_train_and_evaluate_exactly(dataset, tmp_path):
    from mobilenetv2.data import folders as data_module
    from mobilenetv2.data.transforms import eval_transform
    from mobilenetv2.evaluation import evaluate
    from mobilenetv2.runtime import setup

    run = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "mobilenetv2", "train", "--data", str(dataset), "--output", str(run), *TINY,
               "--batch-size", "4", "--epochs", "2", "--amp", "off"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = torchrun(command, timeout=180, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (run / "train.log").read_text().count("epoch time:") == 2  # rank 0 alone writes
    last_epoch = records(run, "epoch")[-1]
    assert last_epoch["eval_count"] == 15  # 15 val images over 2 ranks: none padded, none dropped
    assert records(run, "step")[0]["images_per_s"] > 0
    model = load_model(run / "checkpoints" / "last.pt")
    val = data_module.image_folder(dataset / "val", eval_transform(model.preprocess))
    single = evaluate(model, data_module.eval_loader(val, 4, 0), setup("cpu", "off"), 3)
    assert single.count == 15
    assert single.top1 == pytest.approx(last_epoch["eval_top1"], abs=1e-9)
    # the loss moves with any difference in the network, where a top-1 over 15 images may not: every rank evaluated
    # the network rank 0 saved (BatchNorm's running statistics included, which each rank's last step updates on its own)
    assert single.loss == pytest.approx(last_epoch["eval_loss"], rel=1e-5)


def test_fp16_overflow_skips_the_step_and_is_counted():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    state = Runtime(torch.device("cpu"), torch.float16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = state.grad_scaler()
    criterion = SeedLabelSmoothingLoss(0.1, 3)
    before = model.weight.detach().clone()
    _, overflowed = train_step(model, torch.full((2, 4), float("inf")), torch.tensor([0, 1]), criterion, optimizer,
                               scaler, state)
    assert overflowed and torch.equal(model.weight, before)
    _, overflowed = train_step(model, torch.randn(2, 4), torch.tensor([0, 1]), criterion, optimizer, scaler, state)
    assert not overflowed and not torch.equal(model.weight, before)


def test_ema_weights_are_the_hand_computed_average(dataset, tmp_path):
    decay = 0.7
    raw = {}
    for steps in (1, 2, 3):  # one deterministic trajectory, stopped after each step
        assert train(dataset, tmp_path / f"s{steps}", "--epochs", "1", "--ema", str(decay), "--max-steps",
                     str(steps), "--eval-every", "0") == 0
        raw[steps] = torch.load(tmp_path / f"s{steps}/checkpoints/last.pt", weights_only=True)
    w1, w2, w3 = (raw[k]["train_model"] for k in (1, 2, 3))
    ema = raw[3]["model"]
    checked = 0
    for key, value in ema.items():
        if not value.is_floating_point():
            continue
        # the first update copies; each later one is decay * average + (1 - decay) * weights
        expected = decay * (decay * w1[key] + (1 - decay) * w2[key]) + (1 - decay) * w3[key]
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-7, msg=key)
        checked += 1
    assert checked > 200 and not torch.equal(ema["head.classifier.weight"], w3["head.classifier.weight"])
    assert raw[3]["ema_averaged"].item() == 3


def test_the_loop_reads_values_back_once_per_log_interval(dataset, tmp_path, monkeypatch):
    """A host-device sync per step stalls a fast GPU: the loop's own reads happen once per logged line."""
    import sys

    from mobilenetv2.training import loop

    reads = []
    for name in ("item", "tolist"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, **kwargs):
            if sys._getframe(1).f_code.co_filename == loop.__file__:
                reads.append(sys._getframe(1).f_code.co_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    run = tmp_path / "run"
    assert train(dataset, run, "--epochs", "2", "--batch-size", "2", "--log-every", "5", "--eval-every", "0") == 0
    steps = records(run, "step")
    assert [r["global_step"] for r in steps] == list(range(24))  # still a record for every step
    assert len({r["loss"] for r in steps}) > 20 and all(r["images_per_s"] > 0 for r in steps)
    # 12 steps per epoch, lines at steps 0, 5, 10 and 11: 4 reads per epoch, plus the epoch's mean loss
    assert sorted(reads) == sorted(["_flush"] * 8 + ["_end_epoch"] * 2), reads
