"""The benchmark scripts run (tiny settings; their figures are not checked here, only that they are produced and
that each training workload learns)."""

import re
import subprocess
import sys

import pytest

from conftest import REPO, run_script


def run(script, *args):
    return run_script(REPO / "benchmarks" / script, *args)


def test_train_throughput_names_the_cpu_and_reports_each_variant_against_torchvision():
    from mobilenetv2.deploy.timing import cpu_description

    out = run("train_throughput.py", "--shapes", "tiny", "--no-compile", "--seconds", "0.3", "--rounds", "1")
    assert out.startswith(f"CPU: {cpu_description()}")
    rows = [line for line in out.splitlines() if line.startswith("| ") and "variant" not in line]
    assert any("stock ReLU6" in row for row in rows)  # the in-place ReLU6 path measured against stock autograd
    assert any("stock depthwise weight gradient" in row for row in rows)  # and the small-map depthwise weight gradient
    assert len(rows) == 6 and "torchvision eager" in rows[0] and "| 1.00x |" in rows[0]
    for row in rows:
        assert re.search(r"\| \d+\.\d \| \d+\.\d\dx \| \d+\.\d+ -> \d+\.\d+ \(\d+ steps\) \|$", row), row


@pytest.mark.parametrize("script,args,expected", [
    ("inference.py", ["--width", "0.25", "--image-size", "32", "--seconds", "0.2", "--rounds", "1"],
     "vs the faster torch row, channels-last"),
    ("data_pipeline.py", ["--images", "20", "--size", "120x90", "--image-size", "64", "--seconds", "0.2",
                          "--rounds", "1"], "torchvision standard"),
    ("int8_layers.py", ["--width", "0.25", "--image-size", "32", "--batch-size", "4", "--runs", "3", "--seconds",
                        "0.1", "--rounds", "1"], "int8 stem fp32"),
    ("int8_ceiling.py", ["--width", "0.25", "--image-size", "32", "--batch-size", "4", "--seconds", "0.1", "--rounds",
                         "1"], "int8 GEMM over fp32 GEMM"),
    ("shards.py", ["--images", "24", "--size", "120x90", "--image-size", "64", "--http-files", "16", "--rounds", "1",
                   "--latency-ms", "5", "--no-netns"], "| shards / files |"),
    ("cpu_memory.py", ["--shapes", "tiny", "--seconds", "0.2", "--rounds", "1"], "| glibc default | "),
    ("depthwise_grad.py", ["--shapes", "tiny", "--seconds", "0.02", "--rounds", "1"], "| 1x1 | "),
    ("head_finetune.py", ["--epochs", "1", "--per-class", "10", "--image-size", "32", "--width", "0.25",
                          "--pretrain-epochs", "1", "--workers", "0"], "the seed's way (features once, in memory)"),
])
def test_other_benchmarks_run(script, args, expected):
    output = run(script, *args)
    assert expected in output
    assert output.startswith("CPU: ") and "torch " in output.splitlines()[0]  # every figure names its CPU


def test_the_gpu_suite_runs_as_prepared_on_the_cpu(tmp_path):
    """What a lent GPU machine runs: the shell entry, our code from src/ on PYTHONPATH, JSON into $OUT."""
    import json
    import os

    # one thread, as the test workers run torch: two would contend with the other worker for two cores
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--cpu"], env=env, capture_output=True,
                            text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    for row in ("train, GPU tensors, torchvision plain AMP loop (baseline)", "train, GPU tensors, ours eager",
                "train end to end from JPEG, pil", "train end to end from JPEG, device", "eval from JPEG, device",
                *(f"train, GPU tensors, ours eager, seed_fast {size} px (/7)" for size in (160, 192, 224))):
        assert report[row] > 0, row
    # seed_fast.yaml's estimate: 72 epochs at 160 px and 18 at 192 px are 50.0 epochs at 224 px by image-pixels
    assert report["seed_fast's 90 by image-pixels, 224-px epochs"] == pytest.approx(
        (72 * 160 ** 2 + 18 * 192 ** 2) / 224 ** 2)
    assert report["seed_fast's 90 by measured steps, 224-px epochs"] > 0
    assert "x baseline" in result.stdout


def test_the_distillation_benchmark_trains_a_teacher_and_the_students(tmp_path):
    out = run("distill.py", "--data", str(tmp_path / "fm"), "--per-class", "12", "--val-per-class", "3",
              "--image-size", "32", "--epochs", "1", "--teacher-epochs", "1", "--teacher-width", "0.35",
              "--seconds", "0.2", "--rounds", "1")
    assert out.startswith("CPU: ")
    assert [line.split(" |")[0] for line in out.splitlines() if line.startswith("| ")] == [
        "| teacher (width 0.35, 1 epochs)", "| student plain (1 epochs)", "| student kl (1 epochs)",
        "| student dist (1 epochs)"]
    assert re.search(r"with the teacher's forward \d+ \(\d\.\d\dx\)", out)


def test_the_serving_load_benchmark_reports_each_concurrency(tmp_path):
    pytest.importorskip("fastapi")
    import torch

    from mobilenetv2 import MobileNetV2, save_model
    from mobilenetv2.config import Preprocess

    torch.manual_seed(0)
    checkpoint = tmp_path / "model.pt"
    save_model(MobileNetV2(num_classes=3, width_mult=0.25, class_names=["a", "b", "c"],
                           preprocess=Preprocess(image_size=32, resize_size=36)), checkpoint)
    out = run("serve_load.py", "--checkpoint", str(checkpoint), "--seconds", "0.5", "--concurrency", "1,4",
              "--max-batch", "8", "--bad-fraction", "0.3")
    rows = [line for line in out.splitlines() if re.match(r"\| [a-z-]+ \| \d+ \|", line)]
    protocols = ["classify", "http-json", "http-binary", "grpc"]
    assert [tuple(row.split(" | ")[:2]) for row in rows] == [
        (f"| {p}", c) for p in protocols for c in ("1", "4")] + [(f"| {p}", "4") for p in protocols]
    assert all(row.endswith("| 0 | 0 |") for row in rows), rows  # no errors, no 5xx, bad requests included
    assert all(int(row.split(" | ")[2].split()[0]) > 0 for row in rows[-4:]), rows  # bad ones were sent


def test_time_to_accuracy_trains_each_recipe_per_seed_and_reports_min_median_max(tmp_path, monkeypatch):
    """A smoke run (two epochs of 120 images at 32 px): every recipe trains once per seed, in turns, and the table
    gives each recipe's spread, its time against the first recipe's and its image-pixels from the recorded sizes."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the runs' processes, beside the other test worker
    out = run("time_to_accuracy.py", "--data", str(tmp_path / "fm"), "--per-class", "12", "--val-per-class", "3",
              "--seeds", "1,2", "--recipes", "demo-8-epochs,demo-progressive", "--", "--epochs", "2",
              "--width-mult", "0.25", "--image-size", "32", "--resize-size", "32", "--batch-size", "16",
              "--workers", "0")
    assert out.startswith("CPU: ")
    assert [line.split(":")[0] for line in out.splitlines() if " seed " in line] == [
        "demo-8-epochs seed 1", "demo-progressive seed 1", "demo-8-epochs seed 2", "demo-progressive seed 2"]
    assert "sizes [32, 32]" in out and "sizes [36, 48]" in out  # each recipe's epochs, as recorded (36:48, ramp 0:1)
    rows = {line.split(" | ")[0][2:]: line for line in out.splitlines() if line.startswith("| demo")}
    assert set(rows) == {"demo-8-epochs", "demo-progressive"} and "| 1.00x |" in rows["demo-8-epochs"]
    # 7 steps of 16 images an epoch: the baseline's two epochs at 32 px, the progressive one's at 36 then 48 px
    assert f"| {2 * 112 * 32 ** 2:.3g} | 1.00x |" in rows["demo-8-epochs"]
    assert f"| {112 * (36 ** 2 + 48 ** 2):.3g} | 1.76x |" in rows["demo-progressive"]
