"""The seed's recipes and shell scripts."""

import os
import subprocess
import sys

import pytest

from mobilenetv2.config import TrainConfig, build_config

from conftest import REPO


@pytest.mark.parametrize("name,values", [("seed_gpu", {"batch_size": 150, "epochs": 200, "lr_max": 0.8, "warmup_epochs": 0, "weight_decay_on": "seed"}),
                                         ("seed_ascend", {"batch_size": 256, "lr_max": 0.4, "warmup_epochs": 4, "weight_decay_on": "weights"}),
                                         ("seed_cpu", {"batch_size": 150, "epochs": 15, "lr_max": 0.03, "lr_end": 0.03, "weight_decay_on": "seed"})])
def test_seed_recipes(name, values):
    config = build_config(TrainConfig, REPO / "configs" / f"{name}.yaml")
    assert {k: getattr(config, k) for k in values} == values
    assert (config.momentum, config.weight_decay, config.label_smoothing) == (0.9, 4e-5, 0.1)


def test_seed_shell_scripts(dataset, tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "MOBILENETV2_ARGS": f"--epochs 1 --batch-size 8 --width-mult 0.25 --image-size 32 --workers 0 "
                               f"--output {tmp_path / 'run'}"}
    result = subprocess.run(["bash", str(REPO / "scripts/run_train.sh"), "CPU", str(dataset)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, (tmp_path / "train.log").read_text()[-2000:]
    assert "epoch time:" in (tmp_path / "train.log").read_text()
    assert "lr_max: 0.03" in (tmp_path / "run" / "config.yaml").read_text()  # the seed's CPU recipe
    env["MOBILENETV2_ARGS"] = "--workers 0"
    result = subprocess.run(["bash", str(REPO / "scripts/run_eval.sh"), "CPU", str(dataset),
                             str(tmp_path / "run/checkpoints/last.pt")], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=180)
    assert result.returncode == 0 and "result:{'acc': " in (tmp_path / "eval.log").read_text()
    bad = subprocess.run(["bash", str(REPO / "scripts/run_train.sh"), "TPU", str(dataset)], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "CPU or GPU" in bad.stderr


STUB = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$STUB_ARGS"
echo "${CUDA_VISIBLE_DEVICES:-}" > "$STUB_ARGS.devices"
"""


@pytest.mark.parametrize("argv,expected,devices", [
    (["run_train.sh", "CPU", "DATA", "CKPT", "backbone", "True"],
     ["-m", "mobilenetv2", "train", "--config", "configs/seed_cpu.yaml", "--data", "DATA", "--device", "cpu",
      "--freeze", "backbone", "--pretrained", "CKPT", "--filter-head", "--epochs", "1"], ""),
    (["run_train.sh", "CPU", "DATA"],
     ["-m", "mobilenetv2", "train", "--config", "configs/seed_cpu.yaml", "--data", "DATA", "--device", "cpu",
      "--freeze", "none", "--epochs", "1"], ""),
    (["run_train.sh", "GPU", "4", "0,1,2,3", "DATA", "CKPT", "none", "False"],
     ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4", "-m", "mobilenetv2", "train",
      "--config", "configs/seed_gpu.yaml", "--data", "DATA", "--device", "cuda", "--freeze", "none",
      "--pretrained", "CKPT", "--epochs", "1"], "0,1,2,3"),
    (["run_eval.sh", "GPU", "DATA", "CKPT"],
     ["-m", "mobilenetv2", "eval", "--data", "DATA", "--checkpoint", "CKPT", "--device", "cuda", "--epochs", "1"], ""),
])
def test_seed_script_arguments_map_onto_our_command(tmp_path, argv, expected, devices):
    """The seed's positional arguments, traced through a stand-in python that records what it was asked to run."""
    (tmp_path / "DATA").mkdir()
    stub = tmp_path / "python"
    stub.write_text(STUB)
    stub.chmod(0o755)
    env = {**os.environ, "PYTHON": str(stub), "STUB_ARGS": str(tmp_path / "args"), "MOBILENETV2_ARGS": "--epochs 1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    result = subprocess.run(["bash", str(REPO / "scripts" / argv[0]), *argv[1:]], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    recorded = (tmp_path / "args").read_text().splitlines()
    assert [arg.replace(str(REPO) + "/", "") for arg in recorded] == expected
    assert (tmp_path / "args.devices").read_text().strip() == devices


def test_slurm_script_runs_torchrun_with_rendezvous_and_resume(dataset, tmp_path):
    """The sbatch script as SLURM would run it on one node, with stand-ins for `srun` and `scontrol`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho localhost\n")
    for stub in ("srun", "scontrol"):
        (bin_dir / stub).chmod(0o755)
    run = tmp_path / "run"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "SLURM_JOB_NODELIST": "localhost", "SLURM_NNODES": "1", "SLURM_JOB_ID": "4242", "DATA": str(dataset),
           "OUTPUT": str(run), "GPUS_PER_NODE": "2", "RDZV_PORT": "29531", "DIST_TIMEOUT": "60"}
    tiny = ["--device", "cpu", "--amp", "off", "--epochs", "1", "--batch-size", "4", "--width-mult", "0.25",
            "--image-size", "32", "--workers", "0"]
    for attempt in range(2):  # the second run is a requeued job: it resumes and has nothing left to do
        result = subprocess.run(["bash", str(REPO / "scripts/slurm_train.sbatch"), *tiny], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, result.stderr[-2000:]
    log = (run / "train.log").read_text()
    assert "world size 2" in log and "data backend device" in log and "resumed from" in log
    assert "lr_max: 0.8" in (run / "config.yaml").read_text()  # the seed's GPU recipe
