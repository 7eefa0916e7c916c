"""Exports (ONNX, TorchScript, MindSpore) reproduce the source logits and carry the model's metadata."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mobilenetv2 import load_model
from mobilenetv2.cli import main
from mobilenetv2.errors import UserError
from mobilenetv2.interop import mindspore

from conftest import MS_CHECKPOINT, MS_INPUT, assert_parity

# the tests below check what every ONNX export shares (metadata, outputs, the check): through the exporter that takes
# a second, not ten; the default (dynamo) one is tested above and in the demo
FAST = ["--onnx-exporter", "legacy"]


@pytest.mark.parametrize("fmt, exporter", [("onnx", "dynamo"), ("onnx", "legacy"), ("torchscript", None)])
def test_exports_reproduce_the_mindspore_logits(converted, tmp_path, capsys, fmt, exporter):
    output = tmp_path / f"model.{fmt}"
    extra = ["--onnx-exporter", exporter] if exporter else []
    assert main(["export", "--checkpoint", str(converted), "--format", fmt, "--output", str(output),
                 "--dynamic-batch", *extra]) == 0
    out = capsys.readouterr().out
    assert "batch 1: max abs difference" in out and "batch 3: max abs difference" in out
    if fmt == "onnx":
        import onnx
        import onnxruntime

        proto = onnx.load(str(output))
        opset = {entry.domain: entry.version for entry in proto.opset_import}[""]
        assert opset == {"dynamo": 18, "legacy": 17}[exporter] and f"{exporter} exporter" in out
        if exporter == "dynamo":  # torch.export's graph, BatchNorm folded into the convolutions
            assert "BatchNormalization" not in {node.op_type for node in proto.graph.node}
        meta = {p.key: p.value for p in proto.metadata_props}
        contract = json.loads(meta["mobilenetv2"])
        assert contract["version"] == 2 and contract["config"]["num_classes"] == 10 and contract["preprocess"]["image_size"] == 224
        session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
        logits = session.run(None, {"input": MS_INPUT})[0]
        for batch in (1, 3):
            stacked = np.concatenate([MS_INPUT] * 2)[:batch]
            assert session.run(None, {"input": stacked})[0].shape == (batch, 10)
    else:
        loaded = torch.jit.load(str(output))
        logits = loaded(torch.from_numpy(MS_INPUT)).detach().numpy()
    assert_parity(logits)


def test_onnx_with_softmax_has_probs(converted, tmp_path):
    import onnxruntime

    output = tmp_path / "soft.onnx"
    assert main(["export", "--checkpoint", str(converted), "--format", "onnx", "--output", str(output),
                 "--with-softmax", "--batch-size", "2", *FAST]) == 0
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits", "probs"]
    logits, probs = session.run(None, {"input": MS_INPUT})
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(probs, torch.softmax(torch.from_numpy(logits), 1).numpy(), atol=1e-6)


def test_mindspore_export_round_trips_bit_exactly(converted, tmp_path):
    output = tmp_path / "back.ckpt"
    assert main(["export", "--checkpoint", str(converted), "--format", "mindspore", "--output", str(output)]) == 0
    original, exported = mindspore.read_checkpoint(MS_CHECKPOINT), mindspore.read_checkpoint(output)
    assert sorted(exported) == sorted(original)  # the seed's key layout, tensor for tensor
    for key, value in original.items():
        assert exported[key].dtype == value.dtype and np.array_equal(exported[key], value), key
    model = load_model(output)
    with torch.no_grad():
        assert_parity(model(torch.from_numpy(MS_INPUT)))


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "mindspore"])
def test_a_freshly_built_model_exports_with_its_metadata(tmp_path, fmt):
    from mobilenetv2 import MobileNetV2, export
    from mobilenetv2.config import Preprocess

    torch.manual_seed(0)
    model = MobileNetV2(num_classes=10, width_mult=0.25, preprocess=Preprocess.for_image_size(64))
    output = str(tmp_path / "sub" / f"m.{fmt}")  # a str path, in a folder that does not exist yet
    reports = export(model, fmt, output, **({"onnx_exporter": "legacy"} if fmt == "onnx" else {}))
    assert reports and Path(output).is_file()
    assert [p.name for p in (tmp_path / "sub").iterdir()] == [f"m.{fmt}"]  # no temp file left beside it
    if fmt == "onnx":
        import onnx

        meta = {p.key: p.value for p in onnx.load(output).metadata_props}
        assert json.loads(meta["mobilenetv2"]) == model.metadata()
    elif fmt == "torchscript":
        files = {"mobilenetv2.json": ""}
        torch.jit.load(output, _extra_files=files)
        assert json.loads(files["mobilenetv2.json"]) == model.metadata()


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_an_export_that_fails_its_check_exits_1_and_leaves_no_file(converted, tmp_path, capsys, monkeypatch, fmt):
    from mobilenetv2.engines import onnx_files

    output = tmp_path / f"model.{fmt}"
    output.write_bytes(b"the previous, good export")
    monkeypatch.setattr(onnx_files, "TOLERANCE", -1.0)  # no difference passes (every export check compares there)
    monkeypatch.setattr(onnx_files, "NOISE_MULTIPLE", -1.0)
    assert main(["export", "--checkpoint", str(converted), "--format", fmt, "--output", str(output),
                 *(FAST if fmt == "onnx" else [])]) == 1
    assert "check failed" in capsys.readouterr().err
    assert output.read_bytes() == b"the previous, good export"  # untouched
    assert [p.name for p in tmp_path.iterdir()] == [output.name]  # and no half-checked file beside it


def test_convert_class_names_travel_into_onnx_metadata(tmp_path, capsys):
    import onnx

    from mobilenetv2.deploy.predict import load_classifier

    names = [f"kind_{i}" for i in range(10)]
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    assert main(["convert", str(MS_CHECKPOINT), "-o", str(tmp_path / "named.pt"), "--class-names",
                 str(tmp_path / "names.txt")]) == 0
    assert load_model(tmp_path / "named.pt").class_names == names
    assert main(["export", "--checkpoint", str(tmp_path / "named.pt"), "--format", "onnx", *FAST]) == 0
    exported = tmp_path / "named.onnx"  # the default output: beside the checkpoint
    meta = {p.key: p.value for p in onnx.load(str(exported)).metadata_props}
    assert json.loads(meta["mobilenetv2"])["class_names"] == names
    assert load_classifier(exported).class_names == names
    (tmp_path / "short.txt").write_text("a\nb\n")
    capsys.readouterr()
    assert main(["convert", str(MS_CHECKPOINT), "-o", str(tmp_path / "bad.pt"), "--class-names",
                 str(tmp_path / "short.txt")]) == 2
    assert "2 class names; the model has 10 classes" in capsys.readouterr().err
    assert not (tmp_path / "bad.pt").exists()


def test_the_auto_exporter_takes_the_legacy_one_and_the_current_one_when_torch_has_no_legacy_one(monkeypatch,
                                                                                               tmp_path):
    from mobilenetv2 import MobileNetV2
    from mobilenetv2.engines.onnx_files import torch_onnx_export

    calls = []

    def export(network, args, path, *, dynamo, **_options):
        calls.append(dynamo)
        if not dynamo and legacy_gone:
            raise RuntimeError("this torch has no TorchScript-based ONNX exporter")

    monkeypatch.setattr(torch.onnx, "export", export)
    model, example = MobileNetV2(num_classes=3, width_mult=0.25), torch.zeros(1, 3, 32, 32)
    legacy_gone = False
    assert torch_onnx_export(model, example, tmp_path / "m.onnx", ["logits"], True, "auto") == "legacy"
    assert calls == [False]
    legacy_gone = True
    assert torch_onnx_export(model, example, tmp_path / "m.onnx", ["logits"], True, "auto") == "dynamo"
    assert calls == [False, False, True]
    with pytest.raises(RuntimeError, match="no TorchScript-based"):  # asked for by name: no quiet substitute
        torch_onnx_export(model, example, tmp_path / "m.onnx", ["logits"], True, "legacy")
    with pytest.raises(UserError, match="onnx_exporter"):
        torch_onnx_export(model, example, tmp_path / "m.onnx", ["logits"], True, "tracing")


def test_every_onnx_file_we_write_passes_onnx_checker_and_a_malformed_graph_is_refused(tmp_path, capsys, monkeypatch):
    import onnx

    from mobilenetv2 import MobileNetV2
    from mobilenetv2.checkpoint import save_model
    from mobilenetv2.engines import onnx_files
    from mobilenetv2.preprocess import Preprocess

    model = MobileNetV2(num_classes=3, width_mult=0.25, preprocess=Preprocess(image_size=32, resize_size=36))
    save_model(model, tmp_path / "m.pt")
    checked, real_check = [], onnx.checker.check_model
    monkeypatch.setattr(onnx.checker, "check_model", lambda proto, *a, **k: (checked.append(proto.graph.name),
                                                                              real_check(proto, *a, **k))[1])
    assert main(["export", "--checkpoint", str(tmp_path / "m.pt"), "--format", "onnx", *FAST]) == 0
    onnx_files.export_for_engines(model.eval(), tmp_path / "engine.onnx", torch.zeros(2, 3, 32, 32), {})
    assert len(checked) == 2
    # a graph whose node reads a tensor nothing defines: refused before the file is put in place
    real_export = onnx_files.torch_onnx_export

    def broken(*args):
        used = real_export(*args)
        proto = onnx.load(str(args[2]))
        proto.graph.node[0].input[0] = "nowhere"
        args[2].write_bytes(proto.SerializeToString())
        return used

    monkeypatch.setattr("mobilenetv2.deploy.export.torch_onnx_export", broken)
    output = tmp_path / "broken.onnx"
    assert main(["export", "--checkpoint", str(tmp_path / "m.pt"), "--format", "onnx", "--output", str(output),
                 *FAST]) == 1
    assert "onnx.checker refuses the ONNX graph" in capsys.readouterr().err and not output.exists()
