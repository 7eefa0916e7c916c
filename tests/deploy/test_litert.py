"""export --format tflite: LiteRT files that LiteRT's own Interpreter runs as eager PyTorch does (fp32), or close to
it with the top-1 kept (int8), carrying their contract and labels."""

import contextlib
import io
import json
import shutil
import sys
import zipfile

import numpy as np
import pytest
import torch

from mobilenetv2 import save_model
from mobilenetv2.cli import main
from mobilenetv2.engines.onnx_files import TOLERANCE, check_images, float32_error

from conftest import (FIVE_CLASSES, calibrated_network, one_line_exit_2, skip_unless_installed, subset,
                      swapped_colours)

pytestmark = skip_unless_installed("litert_torch", "litert-torch is not installed (pip install 'mobilenetv2[litert]')")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A width-0.5 network as NCHW and a width-1.0 one as NHWC, each exported once (12 s a conversion here)."""
    folder = tmp_path_factory.mktemp("litert")
    written = {}
    for width, layout in ((0.5, "nchw"), (1.0, "nhwc")):
        model = calibrated_network(width)
        save_model(model, folder / f"w{width}.pt")
        assert main(["export", "--checkpoint", str(folder / f"w{width}.pt"), "--format", "tflite", "--layout",
                     layout]) == 0
        written[width] = (model, folder / f"w{width}.tflite", layout)
    return written


def interpret(path, images: np.ndarray) -> np.ndarray:
    """The file in LiteRT's Interpreter, batch by batch as the file takes it (our runner is not used)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=1)
    source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    answers = []
    for image in images:
        interpreter.allocate_tensors()
        interpreter.set_tensor(source["index"], image[None])
        interpreter.invoke()
        answers.append(interpreter.get_tensor(target["index"]))
    return np.concatenate(answers)


@pytest.mark.parametrize("width", [0.5, 1.0])
def test_the_file_runs_in_litert_as_eager_does_and_carries_its_contract(files, width):
    model, path, layout = files[width]
    images = check_images(model, 4)
    with torch.no_grad():
        expected = model(images).numpy()
    given = images.permute(0, 2, 3, 1) if layout == "nhwc" else images
    actual = interpret(path, np.ascontiguousarray(given.numpy()))
    bound = max(TOLERANCE * max(1.0, float(np.abs(expected).max())), 4 * float32_error(model, images))
    assert float(np.abs(actual - expected).max()) <= bound
    with zipfile.ZipFile(path) as package:
        record = json.loads(package.read("mobilenetv2.json"))
        labels = package.read("labels.txt").decode().split()
    assert labels == model.class_names and record["litert"]["layout"] == layout
    assert record["preprocess"]["mean"] == list(model.preprocess.mean)


def test_a_failing_check_leaves_nothing_and_a_missing_runtime_is_one_line(files, tmp_path, capsys, monkeypatch):
    from mobilenetv2.deploy import litert

    model, good, _layout = files[0.5]
    save_model(model, tmp_path / "m.pt")
    export = ["export", "--checkpoint", str(tmp_path / "m.pt"), "--format", "tflite"]
    # the contract without the mean: the good file's conversion, its record losing the mean on the way in
    monkeypatch.setattr(litert, "convert", lambda m, path, **options: shutil.copyfile(good, path))
    attach = litert.attach_contract
    monkeypatch.setattr(litert, "attach_contract", lambda path, record, names: attach(
        path, {**record, "preprocess": {k: v for k, v in record["preprocess"].items() if k != "mean"}}, names))
    assert main(export) == 1
    assert "metadata does not read back as written" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "litert_torch", None)  # not installed
    err = one_line_exit_2(capsys, export)
    assert "pip install 'mobilenetv2[litert]'" in err


def test_swapped_colour_channels_fail_the_check(files, tmp_path, capsys, monkeypatch):
    """The file reads its channels in the other order than the checkpoint does: the good file stands in for the
    conversion of a checkpoint whose stem has its colours swapped (one conversion saved)."""
    from mobilenetv2.deploy import litert

    model, good, _layout = files[0.5]
    save_model(swapped_colours(model), tmp_path / "m.pt")
    monkeypatch.setattr(litert, "convert", lambda m, path, **options: shutil.copyfile(good, path))
    assert main(["export", "--checkpoint", str(tmp_path / "m.pt"), "--format", "tflite"]) == 1
    assert "LiteRT logits at batch 1 differs from eager" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


@pytest.fixture(scope="module")
def int8_five(fashion, pretrained_five, tmp_path_factory):
    data = subset(fashion, tmp_path_factory.mktemp("litert-data") / "data", FIVE_CLASSES)
    output = tmp_path_factory.mktemp("litert-int8") / "five.tflite"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["export", "--checkpoint", str(pretrained_five), "--format", "tflite", "--int8", "--data",
                     str(data), "--calibration-images", "64", "--output", str(output)]) == 0
    return data, output, out.getvalue()


def test_int8_keeps_the_top1_within_two_points_and_records_both(int8_five):
    data, output, out = int8_five
    count = len(list((data / "val").glob("*/*")))
    assert "LiteRT Interpreter (int8) vs eager, 4 photos" in out and f"top-1 on {count} val images" in out
    with zipfile.ZipFile(output) as package:
        quantization = json.loads(package.read("mobilenetv2.json"))["quantization"]
    assert quantization["evaluated_images"] == count and quantization["fp32_top1"] > 0.6
    assert abs(quantization["fp32_top1"] - quantization["int8_top1"]) <= 0.02
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(output))
    source = interpreter.get_input_details()[0]
    assert source["dtype"] == np.int8  # the whole graph in int8, as LiteRT's int8 models
    assert list(source["shape"][1:]) == [3, 32, 32]  # NCHW, the default layout


def test_bench_times_the_given_file_beside_onnx_on_the_same_threads(int8_five, files, pretrained_five, capsys):
    output = int8_five[1]
    assert main(["bench", "--checkpoint", str(pretrained_five), "--formats", "onnx,litert-int8", "--tflite",
                 str(output), "--batch-sizes", "1,4", "--seconds", "0.2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(row["runtime"], row["batch_size"]) for row in rows] == [
        (name, batch) for batch in (1, 4) for name in ("onnx", "litert-int8")]
    assert all(row["images_per_s"] > 0 and row["threads"] == torch.get_num_threads() for row in rows)
    # another network's file is refused before anything is timed
    err = one_line_exit_2(capsys, ["bench", "--checkpoint", str(pretrained_five), "--formats", "litert",
                                   "--tflite", str(files[0.5][1])])
    assert "LiteRT" in err or "not this checkpoint's network" in err
