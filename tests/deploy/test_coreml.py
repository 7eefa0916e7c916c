"""export --format coreml: an ML Program classifier package whose interface, labels, layers and own operations and
weights are checked on Linux (Core ML itself predicts on Apple platforms only, which the output says)."""

import contextlib
import io
import shutil

import pytest
import torch

from mobilenetv2 import save_model
from mobilenetv2.cli import main

from conftest import calibrated_network, skip_unless_installed, swapped_colours

pytestmark = skip_unless_installed("coremltools", "coremltools is not installed (pip install 'mobilenetv2[coreml]')")


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    """A width-0.5 network as fp16 (the default) and a width-1.0 one as fp32, each exported once (with what the
    export printed)."""
    folder = tmp_path_factory.mktemp("coreml")
    written = {}
    for width, precision in ((0.5, "fp16"), (1.0, "fp32")):
        model = calibrated_network(width)
        save_model(model, folder / f"w{width}.pt")
        extra = [] if precision == "fp16" else ["--precision", "fp32"]
        with contextlib.redirect_stdout(io.StringIO()) as out:
            assert main(["export", "--checkpoint", str(folder / f"w{width}.pt"), "--format", "coreml", *extra]) == 0
        written[width] = (model, folder / f"w{width}.mlpackage", precision, out.getvalue())
    return written


@pytest.mark.parametrize("width", [0.5, 1.0])
def test_the_package_is_a_classifier_whose_program_answers_as_eager(packages, width):
    from mobilenetv2.deploy import coreml
    from mobilenetv2.deploy.checks import fp16_weights_error
    from mobilenetv2.engines.onnx_files import check_images

    model, package, precision, _out = packages[width]
    spec, program = coreml.load_program(package)
    described = coreml.describe(spec)
    assert described["inputs"] == ["image"] and described["outputs"] == ["classLabel", "classLabel_probs"]
    assert described["image"] == (64, 64, "RGB") and coreml.labels_of(program) == model.class_names
    assert described["metadata"]["preprocess"]["std"] == list(model.preprocess.std)
    counts = coreml.inventory(program)
    assert counts["conv"] == 52 and counts["clip"] == 35 and "batch_norm" not in counts
    weights = {str(op.outputs[0].val.dtype) for op in program.functions["main"].operations
               if op.op_type == "const" and getattr(op.outputs[0].val, "ndim", 0) == 4}
    assert weights == {"float16" if precision == "fp16" else "float32"}
    images = check_images(model, 3)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (model.preprocess.mean, model.preprocess.std))
    pixels = (images * std + mean) * 255
    probs = torch.cat([coreml.run_program(program, p[None]) for p in pixels])
    with torch.no_grad():
        expected = torch.softmax(model(images), 1)
        wrong = torch.softmax(swapped_colours(model)(images), 1)
    shared = 0.0 if precision == "fp32" else fp16_weights_error(model, images, lambda x: torch.softmax(x, 1))
    assert float((probs - expected).abs().max()) <= max(1e-4 if precision == "fp32" else 5e-3, 4 * shared)
    assert float((probs - wrong).abs().max()) > 10 * float((probs - expected).abs().max())  # the check can tell


def test_the_output_says_core_mls_own_numbers_are_not_checked(packages):
    out = packages[0.5][3]
    assert "NOT checked: Core ML's own numbers" in out and "52 conv / 35 clip" in out


@pytest.mark.parametrize("fault", ["unfolded batchnorm", "swapped colours", "no mean in the contract"])
def test_a_planted_fault_fails_the_check_and_leaves_nothing(packages, tmp_path, capsys, monkeypatch, fault):
    import coremltools as ct

    from mobilenetv2.deploy import coreml

    model = calibrated_network(0.5, size=32)
    save_model(model, tmp_path / "m.pt")
    convert, original_ct_convert = coreml.convert, ct.convert
    if fault == "unfolded batchnorm":  # coremltools' passes off: BatchNorm stays an operation of its own
        monkeypatch.setattr(ct, "convert", lambda *a, **k: original_ct_convert(*a, **k,
                                                                               pass_pipeline=ct.PassPipeline.EMPTY))
    elif fault == "swapped colours":  # the good package stands in for the conversion of a colour-swapped checkpoint
        good, model = packages[0.5][1], swapped_colours(packages[0.5][0])
        save_model(model, tmp_path / "m.pt")
        monkeypatch.setattr(coreml, "convert", lambda m, path, precision: shutil.copytree(good, path))
    else:
        record = model.metadata()
        record["preprocess"].pop("mean")
        monkeypatch.setattr(coreml, "convert", lambda m, path, precision: convert(m, path, precision, record))
    assert main(["export", "--checkpoint", str(tmp_path / "m.pt"), "--format", "coreml"]) == 1
    err = capsys.readouterr().err
    expected = {"unfolded batchnorm": "batch_norm operations", "swapped colours": "probabilities differs",
                "no mean in the contract": "metadata is"}[fault]
    assert expected in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]
