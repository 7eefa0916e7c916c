"""eval, predict, export, torch.hub and the seed's shell scripts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mobilenetv2 import MobileNetV2, load_model, save_model
from mobilenetv2.cli import main
from mobilenetv2.config import TrainConfig, build_config
from mobilenetv2.interop import mindspore

from conftest import FIXTURES, MS_CHECKPOINT, FIVE_CLASSES, subset

REPO = Path(__file__).resolve().parents[1]
MS_INPUT = np.load(FIXTURES / "ms_input_w0.5_c10.npy")
MS_LOGITS = np.load(FIXTURES / "ms_logits_w0.5_c10.npy")


def one_line_exit_2(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    path = tmp_path_factory.mktemp("converted") / "ms.pt"
    assert main(["convert", str(MS_CHECKPOINT), "--output", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def five_data(fashion, tmp_path_factory):
    return subset(fashion, tmp_path_factory.mktemp("five") / "data", FIVE_CLASSES)


def result_line(out):
    line = next(line for line in out.splitlines() if line.startswith("result:"))
    return float(line.split("'acc': ")[1].split(",")[0]), line


def test_eval_counts_every_image_once_alone_and_under_torchrun(five_data, pretrained_five, tmp_path, capsys):
    # 100 val images, batch 7: neither 100 nor 50 per rank is a multiple of the batch
    report = tmp_path / "eval.json"
    assert main(["eval", "--data", str(five_data), "--checkpoint", str(pretrained_five), "--batch-size", "7",
                 "--workers", "0", "--json", str(report)]) == 0
    accuracy, line = result_line(capsys.readouterr().out)
    assert line.endswith(f"ckpt={pretrained_five}") and "'top5': " in line
    data = json.loads(report.read_text())
    assert data["count"] == 100 and data["top1"] == accuracy and accuracy > 0.4
    assert np.array(data["confusion_matrix"]).sum() == 100
    assert set(data["per_class_accuracy"]) == set(FIVE_CLASSES)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "mobilenetv2", "eval", "--data", str(five_data), "--checkpoint", str(pretrained_five),
               "--batch-size", "7", "--workers", "0", "--json", str(tmp_path / "ddp.json")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("result:") == 1  # rank 0 prints
    ddp = json.loads((tmp_path / "ddp.json").read_text())
    assert ddp["count"] == 100 and ddp["top1"] == accuracy
    assert ddp["confusion_matrix"] == data["confusion_matrix"]


def test_eval_squash_resize_and_validation_preprocess_folder(five_data, pretrained_five, tmp_path, capsys):
    root = tmp_path / "seed_layout"
    root.mkdir()
    (root / "validation_preprocess").symlink_to(five_data / "val")
    assert main(["eval", "--data", str(root), "--checkpoint", str(pretrained_five), "--resize", "squash",
                 "--workers", "0"]) == 0
    assert "evaluated 100 images" in capsys.readouterr().out


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exports_reproduce_the_mindspore_logits(converted, tmp_path, capsys, fmt):
    output = tmp_path / f"model.{fmt}"
    assert main(["export", "--checkpoint", str(converted), "--format", fmt, "--output", str(output),
                 "--dynamic-batch"]) == 0
    out = capsys.readouterr().out
    assert "batch 1: max abs difference" in out and "batch 3: max abs difference" in out
    if fmt == "onnx":
        import onnx
        import onnxruntime

        meta = {p.key: p.value for p in onnx.load(str(output)).metadata_props}
        contract = json.loads(meta["mobilenetv2"])
        assert contract["num_classes"] == 10 and contract["preprocess"]["image_size"] == 224
        session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
        logits = session.run(None, {"input": MS_INPUT})[0]
        for batch in (1, 3):
            stacked = np.concatenate([MS_INPUT] * 2)[:batch]
            assert session.run(None, {"input": stacked})[0].shape == (batch, 10)
    else:
        loaded = torch.jit.load(str(output))
        logits = loaded(torch.from_numpy(MS_INPUT)).detach().numpy()
    assert np.abs(logits - MS_LOGITS).max() <= 1e-4


def test_onnx_with_softmax_has_probs(converted, tmp_path):
    import onnxruntime

    output = tmp_path / "soft.onnx"
    assert main(["export", "--checkpoint", str(converted), "--format", "onnx", "--output", str(output),
                 "--with-softmax", "--batch-size", "2"]) == 0
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits", "probs"]
    logits, probs = session.run(None, {"input": MS_INPUT})
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(probs, torch.softmax(torch.from_numpy(logits), 1).numpy(), atol=1e-6)


def test_eval_on_onnx_equals_eval_on_checkpoint(five_data, pretrained_five, tmp_path, capsys):
    onnx_path = tmp_path / "five.onnx"
    assert main(["export", "--checkpoint", str(pretrained_five), "--format", "onnx", "--output", str(onnx_path),
                 "--batch-size", "4"]) == 0  # a fixed batch: eval pads the last chunk
    capsys.readouterr()
    results = []
    for checkpoint in (pretrained_five, onnx_path):
        assert main(["eval", "--data", str(five_data), "--checkpoint", str(checkpoint), "--batch-size", "9",
                     "--workers", "0", "--json", str(tmp_path / "r.json")]) == 0
        results.append(json.loads((tmp_path / "r.json").read_text()))
    assert results[0]["count"] == results[1]["count"] == 100
    assert results[0]["top1"] == results[1]["top1"]
    assert results[0]["confusion_matrix"] == results[1]["confusion_matrix"]


def test_mindspore_export_round_trips_bit_exactly(converted, tmp_path):
    output = tmp_path / "back.ckpt"
    assert main(["export", "--checkpoint", str(converted), "--format", "mindspore", "--output", str(output)]) == 0
    original, exported = mindspore.read_checkpoint(MS_CHECKPOINT), mindspore.read_checkpoint(output)
    assert sorted(exported) == sorted(original)  # the seed's key layout, tensor for tensor
    for key, value in original.items():
        assert exported[key].dtype == value.dtype and np.array_equal(exported[key], value), key
    model = load_model(output)
    with torch.no_grad():
        assert np.abs(model(torch.from_numpy(MS_INPUT)).numpy() - MS_LOGITS).max() <= 1e-5


def test_predict_on_real_photos(photos, tmp_path, capsys):
    torch.manual_seed(0)
    save_model(MobileNetV2(num_classes=1000, width_mult=0.25), tmp_path / "imagenet.pt")
    paths = []
    for name in ("astronaut", "chelsea"):
        Image.fromarray(photos[name]).save(tmp_path / f"{name}.jpg")
        paths.append(str(tmp_path / f"{name}.jpg"))
    assert main(["predict", "--checkpoint", str(tmp_path / "imagenet.pt"), *paths, "--topk", "5", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    from mobilenetv2.predict import imagenet_class_names

    names = imagenet_class_names()
    assert len(names) == 1000 and names[281] == "tabby"
    for result in results:
        probabilities = [p["probability"] for p in result["predictions"]]
        assert len(probabilities) == 5 and probabilities == sorted(probabilities, reverse=True)
        assert all(p["class"] == names[p["index"]] for p in result["predictions"])


def test_predict_probabilities_sum_to_one_with_checkpoint_names(pretrained_five, photos, tmp_path, capsys):
    Image.fromarray(photos["coffee"]).save(tmp_path / "coffee.png")
    assert main(["predict", "--checkpoint", str(pretrained_five), str(tmp_path / "coffee.png"), "--topk", "10",
                 "--json"]) == 0
    predictions = json.loads(capsys.readouterr().out)[0]["predictions"]
    assert sorted(p["class"] for p in predictions) == sorted(FIVE_CLASSES)
    assert sum(p["probability"] for p in predictions) == pytest.approx(1.0, abs=1e-5)


def test_bad_input_one_line_exit_2(converted, tmp_path, capsys):
    assert "image not found" in one_line_exit_2(capsys, ["predict", "--checkpoint", str(converted),
                                                         str(tmp_path / "missing.jpg")])
    (tmp_path / "notes.jpg").write_text("this is text, not an image")
    assert "not a readable image" in one_line_exit_2(capsys, ["predict", "--checkpoint", str(converted),
                                                              str(tmp_path / "notes.jpg")])
    assert "unknown export format" in one_line_exit_2(capsys, ["export", "--checkpoint", str(converted),
                                                               "--format", "tflite"])
    foreign = tmp_path / "foreign.onnx"
    torch.onnx.export(torch.nn.Linear(3, 2), (torch.zeros(1, 3),), str(foreign), dynamo=False)
    assert "without mobilenetv2 metadata" in one_line_exit_2(capsys, ["eval", "--data", str(tmp_path),
                                                                      "--checkpoint", str(foreign)])
    (tmp_path / "noise.onnx").write_bytes(os.urandom(256))
    one_line_exit_2(capsys, ["predict", "--checkpoint", str(tmp_path / "noise.onnx"), str(tmp_path / "notes.jpg")])
    assert "dataset folder not found" in one_line_exit_2(capsys, ["eval", "--data", str(tmp_path / "none"),
                                                                  "--checkpoint", str(converted)])


def test_torch_hub_entry(tmp_path):
    model = torch.hub.load(str(REPO), "mobilenet_v2", source="local", num_classes=10, width_mult=0.5,
                           weights=str(MS_CHECKPOINT))
    with torch.no_grad():
        assert np.abs(model(torch.from_numpy(MS_INPUT)).numpy() - MS_LOGITS).max() <= 1e-5
    backbone = torch.hub.load(str(REPO), "mobilenet_v2", source="local", width_mult=0.5, include_top=False)
    assert backbone(torch.zeros(1, 3, 64, 64)).shape == (1, 1280, 2, 2)
    fresh = torch.hub.load(str(REPO), "mobilenet_v2", source="local")
    assert sum(p.numel() for p in fresh.parameters()) == 3_504_872


@pytest.mark.parametrize("name,values", [("seed_gpu", {"batch_size": 150, "epochs": 200, "lr_max": 0.8, "warmup_epochs": 0}),
                                         ("seed_ascend", {"batch_size": 256, "lr_max": 0.4, "warmup_epochs": 4, "decay_bn_bias": False}),
                                         ("seed_cpu", {"batch_size": 150, "epochs": 15, "lr_max": 0.03, "lr_end": 0.03})])
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
