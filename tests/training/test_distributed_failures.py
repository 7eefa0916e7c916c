"""Distributed runs that lose a rank end quickly, restart by themselves under `torchrun --max-restarts`, and do not
stall when one rank's batch has nothing readable."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from conftest import TINY, records
from conftest import torchrun as forked_torchrun

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def torchrun(dataset, run, *extra, restarts: int = 0):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "--max-restarts", str(restarts), "--monitor-interval", "0.5",
            "-m", "mobilenetv2", "train", "--data", str(dataset), "--output", str(run), *TINY,
            "--batch-size", "4", "--amp", "off", "--dist-timeout", "20", *extra]


def worker_pids(agent: int) -> dict[int, int]:
    """rank -> pid of the workers an agent started (read from their environment)."""
    found = {}
    for child in Path("/proc").glob("[0-9]*"):
        try:
            if int((child / "stat").read_text().split(") ")[1].split()[1]) != agent:
                continue
            environ = dict(item.split("=", 1) for item in (child / "environ").read_text().split("\0") if "=" in item)
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in environ:
            found[int(environ["RANK"])] = int(child.name)
    return found


def wait_for_steps(run: Path, at_least: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run / "metrics.jsonl").exists() and len(records(run, "step")) >= at_least:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {at_least} steps in {timeout} s")


def test_a_killed_rank_ends_the_job_quickly(dataset, tmp_path):
    run = tmp_path / "run"
    agent = subprocess.Popen(torchrun(dataset, run, "--epochs", "200", "--log-every", "1"), env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_steps(run, 4)
    pids = worker_pids(agent.pid)
    assert sorted(pids) == [0, 1], pids
    os.kill(pids[1], signal.SIGKILL)
    killed = time.time()
    _out, err = agent.communicate(timeout=120)
    seconds = time.time() - killed
    print(f"job ended {seconds:.1f} s after rank 1 was killed, exit code {agent.returncode}")
    assert agent.returncode != 0 and seconds < 60, err[-2000:]


def test_torchrun_restarts_resume_from_the_last_checkpoint_by_themselves(dataset, tmp_path):
    common = ["--epochs", "8", "--log-every", "1", "--seed", "4"]
    straight = tmp_path / "straight"
    done = forked_torchrun(torchrun(dataset, straight, *common), timeout=300, env=ENV)
    assert done.returncode == 0, done.stderr[-2000:]
    run = tmp_path / "elastic"
    agent = subprocess.Popen(torchrun(dataset, run, *common, restarts=1), env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    wait_for_steps(run, 3 * 3 + 1)  # 3 steps per epoch: past the third checkpoint
    os.kill(worker_pids(agent.pid)[1], signal.SIGKILL)
    _out, err = agent.communicate(timeout=300)
    assert agent.returncode == 0, [line for line in err.splitlines() if "Error" in line or "error" in line][:10]
    log = (run / "train.log").read_text()
    assert "resumed from" in log and log.count("epoch time:") >= 8
    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 24
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_a_rank_whose_batch_is_unreadable_does_not_stall_the_others(dataset, tmp_path):
    """Half the training files are broken and batches hold 2: ranks often differ in whether they can step."""
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    for index, image in enumerate(sorted((data / "train").rglob("*.jpg"))):
        (image.parent / f"broken_{index}.jpg").write_bytes(b"not an image")
    result = forked_torchrun(torchrun(data, tmp_path / "run", "--epochs", "3", "--batch-size", "2"), timeout=240,
                             env=ENV)
    assert result.returncode == 0, result.stderr[-2000:]
    epochs = records(tmp_path / "run", "epoch")
    assert len(epochs) == 3 and epochs[-1]["skipped_images"] > 0
    assert any(epoch["steps"] < 12 for epoch in epochs)  # some batch places passed without a step on both ranks
