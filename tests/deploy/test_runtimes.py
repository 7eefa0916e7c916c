"""Inference engines: every engine gives `eval` the same counts, the cached export follows the checkpoint's bytes,
`auto` takes the engine timed fastest (once), and head-only training's backbone runs in the engine chosen."""

import json
import shutil

import numpy as np
import pytest
import torch

from mobilenetv2 import load_model, save_model
from mobilenetv2.cli import main
from mobilenetv2.engines import choose as runtimes
from mobilenetv2.deploy.export import check_images

from conftest import FIVE_CLASSES, head_only, one_line_exit_2, openvino_present, subset

# OpenVINO is an optional extra ([openvino]), not in the test extra: its rows run where it is installed
OPENVINO = ["openvino"] if runtimes.installed("openvino") else []
needs_openvino = pytest.mark.skipif(not OPENVINO, reason="OpenVINO is not installed (pip install 'mobilenetv2[openvino]')")


@pytest.fixture(scope="module")
def five_data(fashion, tmp_path_factory):
    return subset(fashion, tmp_path_factory.mktemp("five") / "data", FIVE_CLASSES)


@pytest.fixture
def checkpoint(pretrained_five, tmp_path):
    """A private copy: the export cache is written beside it."""
    path = tmp_path / "model" / "five.pt"
    path.parent.mkdir()
    shutil.copy(pretrained_five, path)
    return path


def _eval(capsys, tmp_path, data, checkpoint, *extra):
    report = tmp_path / f"eval{len(list(tmp_path.glob('eval*.json')))}.json"
    assert main(["eval", "--data", str(data), "--checkpoint", str(checkpoint), "--batch-size", "16", "--workers", "0",
                 "--json", str(report), *extra]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("result:"))
    return line, json.loads(report.read_text())


def test_every_engine_and_data_backend_counts_alike(five_data, checkpoint, tmp_path, capsys):
    results = {}
    for engine in ("torch", "onnx", *OPENVINO, "auto"):
        for backend in ("pil", "device"):
            line, report = _eval(capsys, tmp_path, five_data, checkpoint, "--runtime", engine,
                                 "--data-backend", backend)
            ran = line.rsplit("runtime=", 1)[1]
            assert ran == report["runtime"] and (ran == engine or engine == "auto"), line
            assert report["data_backend"] == backend and report["count"] == 100
            results[engine, backend] = report
    for backend in ("pil", "device"):
        reference = results["torch", backend]
        assert reference["top1"] > 0.5  # a model that has learned: the counts below are not all-wrong alike
        for engine in ("onnx", *OPENVINO, "auto"):
            report = results[engine, backend]
            assert report["confusion_matrix"] == reference["confusion_matrix"], (engine, backend)
            assert report["top1"] == reference["top1"] and report["top5"] == reference["top5"]
            assert report["loss"] == pytest.approx(reference["loss"], rel=1e-5)
    # the device backend decodes and resizes with other code: the same images, nearly the same answers
    assert abs(results["torch", "device"]["top1"] - results["torch", "pil"]["top1"]) <= 0.03
    assert results["torch", "device"]["loss"] != results["torch", "pil"]["loss"]  # ... by another path


def test_cached_export_reused_then_rebuilt_when_the_checkpoint_changes(checkpoint):
    model = load_model(checkpoint)
    images = check_images(model, 4)
    first = runtimes.load_classifier(checkpoint, runtime_name="onnx")
    cached = list((checkpoint.parent / runtimes.CACHE_FOLDER).glob("*.onnx"))
    assert first.runtime == "onnx" and len(cached) == 1
    written = cached[0].stat().st_mtime_ns
    again = runtimes.load_classifier(checkpoint, runtime_name="onnx")
    assert cached[0].stat().st_mtime_ns == written  # read, not written again
    torch.testing.assert_close(again.forward(images), model(images).detach(), rtol=1e-4, atol=1e-4)

    with torch.no_grad():  # new weights under the same file name
        model.head.classifier.weight.mul_(-2.0)
    save_model(model, checkpoint)
    changed = runtimes.load_classifier(checkpoint, runtime_name="onnx")
    now = list((checkpoint.parent / runtimes.CACHE_FOLDER).glob("*.onnx"))
    assert len(now) == 1 and now[0] != cached[0]  # the old contents' export is gone
    torch.testing.assert_close(changed.forward(images), model(images).detach(), rtol=1e-4, atol=1e-4)

    now[0].write_bytes(now[0].read_bytes()[:1000])  # a damaged cache file is written again, not trusted
    repaired = runtimes.load_classifier(checkpoint, runtime_name="onnx")
    torch.testing.assert_close(repaired.forward(images), model(images).detach(), rtol=1e-4, atol=1e-4)


def test_cache_goes_to_the_user_cache_when_the_folder_refuses(checkpoint, tmp_path, monkeypatch):
    (checkpoint.parent / runtimes.CACHE_FOLDER).write_text("a file where the folder would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    classifier = runtimes.load_classifier(checkpoint, runtime_name="onnx")
    assert classifier.runtime == "onnx"
    assert len(list((tmp_path / "user-cache" / "mobilenetv2").glob("five.pt.*.onnx"))) == 1


def test_auto_takes_the_engine_timed_fastest_and_times_once(checkpoint, monkeypatch):
    timed = []

    def fake_time(candidates, size, batch):
        timed.append(sorted(candidates))
        return {name: (1000.0 if name == "onnx" else 10.0) for name in candidates}

    openvino_present(monkeypatch, False)
    monkeypatch.setattr(runtimes, "_time", fake_time)
    assert runtimes.load_classifier(checkpoint).runtime == "onnx"
    assert timed == [["onnx", "torch"]]  # the engines installed
    record = next((checkpoint.parent / runtimes.CACHE_FOLDER).glob("*.timing.json"))
    (key, rates), = json.loads(record.read_text()).items()
    assert "threads" in key and "batch 16" in key and rates["onnx"] == 1000.0
    assert runtimes.load_classifier(checkpoint).runtime == "onnx"
    assert len(timed) == 1  # the second load read the record
    assert runtimes.load_classifier(checkpoint, batch_size=4).runtime == "onnx"
    assert len(timed) == 2  # another batch size is another timing

    def torch_fastest(candidates, size, batch):
        return {name: (1000.0 if name == "torch" else 10.0) for name in candidates}

    record.unlink()
    monkeypatch.setattr(runtimes, "_time", torch_fastest)
    assert runtimes.load_classifier(checkpoint).runtime == "torch"


def test_auto_times_openvino_once_installed(checkpoint, monkeypatch):
    timed = []

    def openvino_fastest(candidates, size, batch):
        timed.append(sorted(candidates))
        return {name: (1000.0 if name == "openvino" else 10.0) for name in candidates}

    monkeypatch.setattr(runtimes, "_time", openvino_fastest)
    openvino_present(monkeypatch, False)
    runtimes.load_classifier(checkpoint)
    assert timed == [["onnx", "torch"]]
    openvino_present(monkeypatch, True)  # installed since: the kept timing no longer covers every engine
    chosen = runtimes.load_classifier(checkpoint)
    assert chosen.runtime == "openvino" and timed[1] == ["onnx", "openvino", "torch"]
    model = load_model(checkpoint)
    images = check_images(model, 3)
    torch.testing.assert_close(chosen.forward(images), model(images).detach(), rtol=1e-4, atol=1e-4)
    assert runtimes.load_classifier(checkpoint).runtime == "openvino" and len(timed) == 2  # read from the record


def test_auto_is_torch_on_a_gpu_and_cpu_engines_refuse_one(checkpoint):
    # any device but the CPU takes torch under auto ("meta": a device this CPU-only machine has)
    assert runtimes.load_classifier(checkpoint, torch.device("meta")).runtime == "torch"
    with pytest.raises(runtimes.UserError, match="runs on the CPU"):
        runtimes.load_classifier(checkpoint, torch.device("cuda"), runtime_name="onnx")
    assert not (checkpoint.parent / runtimes.CACHE_FOLDER).exists()  # nothing exported for a GPU run


def test_bad_runtime_choices_end_in_one_line(five_data, checkpoint, tmp_path, capsys):
    err = one_line_exit_2(capsys, ["eval", "--data", str(five_data), "--checkpoint", str(checkpoint),
                                   "--runtime", "tensorrt"])
    assert "unknown --runtime 'tensorrt'" in err
    err = one_line_exit_2(capsys, ["eval", "--data", str(five_data), "--checkpoint", str(checkpoint),
                                   "--data-backend", "dali"])
    assert "--data-backend" in err
    exported = tmp_path / "five.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--output", str(exported),
                 "--dynamic-batch", "--onnx-exporter", "legacy"]) == 0  # the file is the means here
    err = one_line_exit_2(capsys, ["predict", "--checkpoint", str(exported), "--runtime", "torch",
                                   str(next((five_data / "val" / "Bag").iterdir()))])
    assert "is an ONNX file" in err


@needs_openvino
def test_predict_and_compare_name_their_engines(five_data, checkpoint, capsys):
    images = [str(next((five_data / "val" / name).iterdir())) for name in FIVE_CLASSES]
    answers = {}
    for engine in ("torch", "onnx", "openvino"):
        assert main(["predict", "--checkpoint", str(checkpoint), "--runtime", engine, "--json", *images]) == 0
        answers[engine] = json.loads(capsys.readouterr().out)
    for engine in ("onnx", "openvino"):
        for ours, theirs in zip(answers[engine], answers["torch"]):
            assert [p["class"] for p in ours["predictions"]] == [p["class"] for p in theirs["predictions"]]
            assert ours["predictions"][0]["probability"] == pytest.approx(theirs["predictions"][0]["probability"],
                                                                          abs=1e-5)
    assert main(["eval", "--data", str(five_data), "--compare", str(checkpoint), str(checkpoint), "--runtime",
                 "openvino", "--workers", "0"]) == 0
    assert "(runtime A openvino, B openvino)" in capsys.readouterr().out


def test_head_only_features_from_each_engine_agree(three_new, pretrained_five, tmp_path, capsys):
    features = {}
    for engine in ("torch", "onnx", *OPENVINO):
        cache = tmp_path / f"cache-{engine}"
        assert head_only(three_new, tmp_path / engine, pretrained_five, "--epochs", "1", "--feature-cache",
                         str(cache), "--feature-runtime", engine) == 0
        folder = next(cache.iterdir())
        assert json.loads((folder / "complete.json").read_text())["runtime"] == engine
        assert f"backbone run by {engine}" in capsys.readouterr().out
        features[engine] = np.load(folder / "train_features.npy")
    scale = np.abs(features["torch"]).max()
    assert scale > 0.1
    for engine in ("onnx", *OPENVINO):
        np.testing.assert_allclose(features[engine], features["torch"], atol=1e-4 * scale)
    err = one_line_exit_2(capsys, ["train", "--data", str(three_new), "--output", str(tmp_path / "bad"),
                                   "--feature-runtime", "tpu"])
    assert "--feature-runtime" in err


def test_onnx_file_given_runs_in_either_engine(checkpoint, tmp_path):
    exported = tmp_path / "five.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--output", str(exported),
                 "--batch-size", "2", "--onnx-exporter", "legacy"]) == 0  # a fixed batch of 2: chunks, the last padded
    model = load_model(checkpoint)
    images = check_images(model, 5)
    for engine in ("onnx", *OPENVINO):
        classifier = runtimes.load_classifier(exported, runtime_name=engine)
        assert classifier.runtime == engine
        torch.testing.assert_close(classifier.forward(images), model(images).detach(), rtol=1e-4, atol=1e-4)
