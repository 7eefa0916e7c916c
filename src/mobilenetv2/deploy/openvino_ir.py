"""OpenVINO IR: `model.xml` (the graph, with our metadata record in its runtime info) and `model.bin` (the weights)
beside it, converted from our checked ONNX export (so the input is `input`, N x 3 x H x W with any batch, and the
output `logits`), fp32 weights by default or fp16 (`compress_to_fp16`, half the file; OpenVINO computes in f32 on a
CPU either way). `eval`, `predict` and `bench` read the `.xml`. OpenVINO is the [openvino] extra."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mobilenetv2.deploy.checks import BF16_TOLERANCE, FP16_TOLERANCE, bf16_compute_error, fp16_weights_error
from mobilenetv2.engines.onnx_files import ExportCheckError, check_images, compare, float32_error
from mobilenetv2.engines.onnx_files import check_onnx, installed, torch_onnx_export
from mobilenetv2.errors import UserError
from mobilenetv2.metadata import FORMAT_NAME
from mobilenetv2.model import MobileNetV2

PRECISIONS = ("fp32", "fp16")


def require_openvino() -> None:
    if not installed("openvino"):
        raise UserError("the openvino export needs OpenVINO: pip install 'mobilenetv2[openvino]'")


def write_ir(model: MobileNetV2, folder: Path, precision: str = "fp32", record: dict | None = None) -> Path:
    """`folder`/model.xml and model.bin for `model` (its metadata, or `record`, in the runtime info)."""
    require_openvino()
    if precision not in PRECISIONS:
        raise UserError(f"openvino `precision` must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    import openvino

    folder.mkdir(parents=True, exist_ok=True)
    size = model.preprocess.image_size
    onnx_file = folder / "graph.onnx"
    torch_onnx_export(model.eval(), torch.zeros(1, 3, size, size), onnx_file, ["logits"], True, "auto")
    check_onnx(onnx_file)  # through onnx.checker, as every ONNX file we write
    network = openvino.convert_model(str(onnx_file))
    onnx_file.unlink()
    network.set_rt_info(json.dumps(model.metadata() if record is None else record), [FORMAT_NAME])
    xml = folder / "model.xml"
    openvino.save_model(network, str(xml), compress_to_fp16=precision == "fp16")
    return xml


def export_openvino(model: MobileNetV2, temp: Path, *, precision: str = "auto", **_options) -> list[str]:
    """OpenVINO IR (deploy/py) in the folder `temp` (model.xml, model.bin; `export` moves them into
    place), run back with OpenVINO at batches 1 and 3: fp32 like ONNX, fp16 weights within FP16_TOLERANCE. Then as
    users run it: compiled with the CPU plugin's defaults (bf16 on CPUs with bf16 units), within BF16_TOLERANCE."""
    from mobilenetv2.engines.onnx_files import openvino_run, read_openvino_metadata

    precision = "fp32" if precision == "auto" else precision
    temp.unlink(missing_ok=True)  # a free name, held for the folder
    xml = write_ir(model, temp, precision)
    if read_openvino_metadata(xml)[1] != json.loads(json.dumps(model.metadata())):
        raise ExportCheckError("the OpenVINO IR's metadata does not read back as written")
    run, _batch = openvino_run(xml)
    tolerance = None if precision == "fp32" else FP16_TOLERANCE
    reports = []
    for batch in (1, 3):
        images = check_images(model, batch)
        with torch.no_grad():
            expected = model(images)
        noise = float32_error(model, images) if precision == "fp32" else fp16_weights_error(model, images)
        difference = compare(expected, run(images.numpy()), f"OpenVINO ({precision}) logits at batch {batch}",
                             tolerance, noise=noise)
        reports.append(f"OpenVINO ({precision} weights, f32 compute) vs eager, batch {batch}: max abs difference "
                       f"{difference:.3g}")
    return reports + [default_precision_report(model, xml)]


def default_precision_report(model: MobileNetV2, xml: Path) -> str:
    """The IR compiled with the CPU plugin's own defaults, as OpenVINO Model Server, benchmark_app and a plain
    `compile_model` run it, against eager on the check's four photos: one report line (ExportCheckError beyond
    BF16_TOLERANCE where the default is bf16)."""
    from mobilenetv2.engines.onnx_files import openvino_run

    run, _batch = openvino_run(xml, precision="default")
    if run.precision == "f32":
        return "OpenVINO's CPU default on this CPU is f32 compute: as checked above"
    images = check_images(model, 4)
    with torch.no_grad():
        expected = model(images)
    actual = run(images.numpy())
    difference = compare(expected, actual, f"OpenVINO's default {run.precision} compute", BF16_TOLERANCE,
                         noise=bf16_compute_error(model, images))
    agree = int((expected.argmax(1).numpy() == actual.argmax(1)).sum())
    return (f"OpenVINO's CPU default on this CPU is {run.precision} compute (OpenVINO Model Server, benchmark_app): "
            f"max abs difference {difference:.3g} at logit scale {float(expected.abs().max()):.3g}, top-1 "
            f"{agree}/{len(images)} photos as eager; pin f32 with INFERENCE_PRECISION_HINT=f32")
