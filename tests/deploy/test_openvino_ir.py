"""export --format openvino: an OpenVINO IR that OpenVINO runs as eager PyTorch does, read by eval and predict."""

import json

import numpy as np
import pytest
import torch

from mobilenetv2 import save_model
from mobilenetv2.cli import main
from mobilenetv2.engines.onnx_files import TOLERANCE, check_images

from conftest import calibrated_network, one_line_exit_2, swapped_colours

openvino = pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install 'mobilenetv2[openvino]')")


@pytest.mark.parametrize("width, precision", [(0.5, "fp32"), (1.0, "fp32"), (1.0, "fp16")])
def test_the_ir_runs_in_openvino_as_eager_does(tmp_path, capsys, width, precision):
    model = calibrated_network(width)
    save_model(model, tmp_path / "model.pt")
    output = tmp_path / "model.xml"
    assert main(["export", "--checkpoint", str(tmp_path / "model.pt"), "--format", "openvino", "--output", str(output),
                 "--precision", precision]) == 0
    assert f"OpenVINO ({precision} weights) vs eager, batch 3" in capsys.readouterr().out
    core = openvino.Core()  # the file itself, in OpenVINO, without our runner
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
