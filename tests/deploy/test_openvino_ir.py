"""export --format openvino: an OpenVINO IR that OpenVINO runs as eager PyTorch does, read by eval and predict."""

import json

import numpy as np
import pytest
import torch

from mobilenetv2 import save_model
from mobilenetv2.cli import main
from mobilenetv2.engines.onnx_files import (TOLERANCE, check_images, openvino_core, openvino_cpu_precision,
                                           openvino_has_bf16)

from conftest import calibrated_network, one_line_exit_2, swapped_colours

openvino = pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install 'mobilenetv2[openvino]')")


@pytest.mark.parametrize("width, precision", [(0.5, "fp32"), (1.0, "fp32"), (1.0, "fp16")])
def test_the_ir_runs_in_openvino_as_eager_does(tmp_path, capsys, width, precision):
    model = calibrated_network(width)
    save_model(model, tmp_path / "model.pt")
    output = tmp_path / "model.xml"
    assert main(["export", "--checkpoint", str(tmp_path / "model.pt"), "--format", "openvino", "--output", str(output),
                 "--precision", precision]) == 0
    out = capsys.readouterr().out
    assert f"OpenVINO ({precision} weights, f32 compute) vs eager, batch 3" in out
    assert f"OpenVINO's CPU default on this CPU is {openvino_cpu_precision()} compute" in out
    core = openvino_core()  # the file itself, in OpenVINO, without our runner (one Core a process: see there)
    network = core.read_model(str(output))
    compiled = core.compile_model(network, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    images = check_images(model, 4)
    with torch.no_grad():
        expected = model(images).numpy()
    actual = compiled(images.numpy())[compiled.output("logits")]
    from mobilenetv2.deploy.checks import fp16_weights_error

    shared = 0.0 if precision == "fp32" else 4 * fp16_weights_error(model, images)
    bound = max((TOLERANCE if precision == "fp32" else 5e-3) * max(1.0, float(np.abs(expected).max())), shared)
    assert float(np.abs(actual - expected).max()) <= bound
    record = json.loads(network.get_rt_info(["mobilenetv2"]).astype(str))
    assert record["preprocess"]["mean"] == list(model.preprocess.mean) and record["class_names"] == model.class_names
    weights = output.with_suffix(".bin").stat().st_size
    assert (weights < 0.6 * 4 * sum(p.numel() for p in model.parameters())) == (precision == "fp16")


def test_eval_and_predict_read_the_ir(tmp_path, capsys):
    from PIL import Image

    from conftest import real_photos

    model = calibrated_network(0.5)
    save_model(model, tmp_path / "model.pt")
    assert main(["export", "--checkpoint", str(tmp_path / "model.pt"), "--format", "openvino"]) == 0
    photo = tmp_path / "chelsea.jpg"
    Image.fromarray(real_photos()["chelsea"][:200, 50:351]).save(photo)  # odd-sized, not square
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(tmp_path / "model.xml"), str(photo), "--json"]) == 0
    ir_answer = json.loads(capsys.readouterr().out)[0]["predictions"]
    assert main(["predict", "--checkpoint", str(tmp_path / "model.pt"), "--runtime", "torch", str(photo), "--json"]) == 0
    eager_answer = json.loads(capsys.readouterr().out)[0]["predictions"]
    assert [p["class"] for p in ir_answer] == [p["class"] for p in eager_answer]
    assert ir_answer[0]["probability"] == pytest.approx(eager_answer[0]["probability"], abs=1e-4)
    one_line_exit_2(capsys, ["predict", "--checkpoint", str(tmp_path / "model.xml"), "--runtime", "onnx", str(photo)])


def test_a_wrong_network_or_a_contract_without_mean_fails_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    from mobilenetv2.deploy import openvino_ir

    model = calibrated_network(0.5)
    save_model(model, tmp_path / "model.pt")
    write_ir = openvino_ir.write_ir
    export = ["export", "--checkpoint", str(tmp_path / "model.pt"), "--format", "openvino"]
    monkeypatch.setattr(openvino_ir, "write_ir", lambda m, folder, precision: write_ir(swapped_colours(m), folder,
                                                                                       precision, m.metadata()))
    assert main(export) == 1
    assert "OpenVINO (fp32) logits at batch 1 differs" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # neither .xml nor .bin, nor a temp
    record = model.metadata()
    record["preprocess"] = {k: v for k, v in record["preprocess"].items() if k not in ("mean", "std")}
    monkeypatch.setattr(openvino_ir, "write_ir", lambda m, folder, precision: write_ir(m, folder, precision, record))
    assert main(export) == 1
    assert "metadata does not read back as written" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


BF16 = pytest.mark.skipif(not openvino_has_bf16(), reason="this CPU has no bf16 units: OpenVINO computes f32 here")


@BF16
def test_the_export_checks_openvinos_default_bf16_and_refuses_it_beyond_the_bf16_tolerance(tmp_path, capsys,
                                                                                          monkeypatch):
    from mobilenetv2.deploy import openvino_ir

    assert openvino_cpu_precision() == "bf16"  # what OpenVINO Model Server and benchmark_app run on this CPU
    model = calibrated_network(1.0, size=96)
    save_model(model, tmp_path / "model.pt")
    export = ["export", "--checkpoint", str(tmp_path / "model.pt"), "--format", "openvino"]
    assert main(export) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if "CPU default" in x][0]
    difference = float(line.split("max abs difference ")[1].split()[0])
    assert "bf16 compute" in line and "top-1" in line and "INFERENCE_PRECISION_HINT=f32" in line
    core = openvino_core()  # the same measure, taken with OpenVINO's defaults directly
    compiled = core.compile_model(core.read_model(str(tmp_path / "model.xml")), "CPU")
    images = check_images(model, 4)
    with torch.no_grad():
        expected = model(images).numpy()
    measured = float(np.abs(compiled(images.numpy())[compiled.output("logits")] - expected).max())
    assert difference == pytest.approx(measured, rel=1e-2) and difference > 10 * TOLERANCE * max(
        1.0, float(np.abs(expected).max()))  # bf16 is really what ran: far from f32's agreement
    monkeypatch.setattr(openvino_ir, "BF16_TOLERANCE", 1e-6)
    monkeypatch.setattr(openvino_ir, "bf16_compute_error", lambda *a: 0.0)
    assert main(export + ["--output", str(tmp_path / "tight.xml")]) == 1
    assert "OpenVINO's default bf16 compute differs" in capsys.readouterr().err
    assert not (tmp_path / "tight.xml").exists()


@BF16
def test_eval_predict_and_bench_run_openvino_at_the_precision_asked_and_say_which(pretrained_five, fashion, tmp_path,
                                                                                capsys):
    from conftest import FIVE_CLASSES, subset

    data = subset(fashion, tmp_path / "data", FIVE_CLASSES)
    accuracy = {}
    for precision in ("auto", "bf16"):
        assert main(["eval", "--checkpoint", str(pretrained_five), "--data", str(data), "--runtime", "openvino",
                     "--precision", precision, "--workers", "0"]) == 0
        line = capsys.readouterr().out.splitlines()[0]
        assert f"precision={'f32' if precision == 'auto' else 'bf16'} runtime=openvino" in line
        accuracy[precision] = float(line.split("'acc': ")[1].split(",")[0])
    assert abs(accuracy["bf16"] - accuracy["auto"]) <= 0.02  # 100 images: at most two answers change
    image = str(next((data / "val" / "Bag").iterdir()))
    assert main(["predict", "--checkpoint", str(pretrained_five), "--precision", "bf16", image]) == 0
    assert "runtime openvino, bf16 compute" in capsys.readouterr().err
    one_line_exit_2(capsys, ["predict", "--checkpoint", str(pretrained_five), "--precision", "bf16", "--runtime",
                             "onnx", image])
    assert main(["bench", "--checkpoint", str(pretrained_five), "--formats", "onnx,openvino,openvino-bf16",
                 "--batch-sizes", "4", "--seconds", "0.2", "--json"]) == 0
    rows = {row["runtime"]: row for row in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"onnx", "openvino", "openvino-bf16"}
    assert rows["openvino"]["top1_agreement"] == "16/16"
    agreeing, views = map(int, rows["openvino-bf16"]["top1_agreement"].split("/"))
    assert views == 16 and agreeing >= 14
