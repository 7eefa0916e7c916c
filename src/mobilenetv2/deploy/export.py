"""Exports: ONNX, TorchScript and MindSpore `.ckpt`, each checked against the eager model before it takes its name.

Each file is written under a temp name beside the target, run (onnxruntime, `torch.jit.load`, our MindSpore reader)
on real photos and compared with eager PyTorch; only a file that passes is renamed into place, so a failed check
leaves no file that looks valid. ONNX and TorchScript files carry the model's metadata record.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from mobilenetv2.deploy.formats import FORMATS, require_format
from mobilenetv2.deploy import triton
from mobilenetv2.deploy.checks import INT8_TOLERANCE, check_against_eager, int8_check
from mobilenetv2.engines.onnx_files import (ONNX_OPSET, TOLERANCE, ExportCheckError, check_images, compare,
                                            torch_onnx_export, write_onnx)
from mobilenetv2.errors import UserError
from mobilenetv2.files import temp_path_beside, write_error
from mobilenetv2.metadata import FORMAT_NAME
from mobilenetv2.model import MobileNetV2

__all__ = ["TOLERANCE", "ExportCheckError", "check_images", "compare", "export", "export_onnx", "WithSoftmax",
           "INT8_TOLERANCE"]


class WithSoftmax(nn.Module):
    """Logits and probabilities, as the seed's exported graph ends in a Softmax."""

    def __init__(self, model: MobileNetV2):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor):
        logits = self.model(images)
        return logits, torch.softmax(logits, dim=1)


def _check_batches(batch_size: int, dynamic_batch: bool) -> list[int]:
    return sorted({batch_size, 3} if dynamic_batch else {batch_size})


def export_onnx(model: MobileNetV2, temp: Path, *, batch_size: int = 1, dynamic_batch: bool = False,
                with_softmax: bool = False, onnx_exporter: str = "dynamo") -> list[str]:
    """ONNX through torch's current exporter (`torch.export`, opset 18; BatchNorm folded into the convolutions), the
    deprecated TorchScript-based one with `onnx_exporter="legacy"` (opset 17), or the faster of the two that this
    torch has with "auto" (for files the tool makes for its own engines: `engines.onnx_files.torch_onnx_export`)."""
    import onnx
    import onnxruntime

    network = (WithSoftmax(model) if with_softmax else model).eval()
    size = model.preprocess.image_size
    outputs = ["logits", "probs"] if with_softmax else ["logits"]
    used = torch_onnx_export(network, torch.zeros(batch_size, 3, size, size), temp, outputs, dynamic_batch,
                             onnx_exporter)
    proto = onnx.load(str(temp))
    entry = proto.metadata_props.add()
    entry.key, entry.value = FORMAT_NAME, json.dumps(model.metadata())
    proto.doc_string = "MobileNetV2 (mobilenetv2): input N x 3 x H x W float32, normalised as in metadata"
    write_onnx(proto, temp)
    session = onnxruntime.InferenceSession(str(temp), providers=["CPUExecutionProvider"])
    return check_against_eager(model, lambda images: session.run(None, {"input": images.numpy()}),
                                _check_batches(batch_size, dynamic_batch), with_softmax,
                                f"onnxruntime ({used} exporter, opset {ONNX_OPSET[used]})", "ONNX")


def export_torchscript(model: MobileNetV2, temp: Path, *, batch_size: int = 1, dynamic_batch: bool = False,
                       with_softmax: bool = False) -> list[str]:
    network = (WithSoftmax(model) if with_softmax else model).eval()
    size = model.preprocess.image_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.trace(network, torch.zeros(batch_size, 3, size, size))
        torch.jit.save(scripted, str(temp), _extra_files={f"{FORMAT_NAME}.json": json.dumps(model.metadata())})
        loaded = torch.jit.load(str(temp))

    def run(images):
        outputs = loaded(images)
        return [output.detach() for output in outputs] if with_softmax else [outputs.detach()]

    return check_against_eager(model, run, _check_batches(batch_size, dynamic_batch), with_softmax,
                                "torch.jit.load", "TorchScript")


def export_mindspore(model: MobileNetV2, temp: Path, **_options) -> list[str]:
    """The seed's key layout (`features.*`, `dense.*`) in MindSpore's protobuf format; read back and compared."""
    from mobilenetv2.checkpoint import read_weights
    from mobilenetv2.interop import keymaps, mindspore

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tensors = {k: v.numpy() for k, v in keymaps.to_mindspore_keys(state).items()}
    mindspore.write_checkpoint(tensors, temp)
    back = read_weights(temp).state_dict  # the temp name has no suffix, so the reader takes it as MindSpore
    for key, value in state.items():
        if not key.endswith("num_batches_tracked") and not torch.equal(back[key], value):
            raise ExportCheckError(f"MindSpore checkpoint tensor {key} does not read back bit-exactly")
    return [f"MindSpore checkpoint read back bit-exactly ({len(tensors)} tensors)"]


def _foreign_network(fmt: str, model: MobileNetV2) -> nn.Module:
    """The torchvision or timm network our weights go into: same width, same classes."""
    architecture = model.architecture()
    width, classes = architecture["width_mult"], model.num_classes
    if architecture["inverted_residual_setting"] is not None:
        raise UserError(f"a custom inverted_residual_setting has no {fmt} equivalent")
    if fmt == "torchvision":
        from torchvision.models import mobilenet_v2

        return mobilenet_v2(num_classes=classes, width_mult=width)
    try:
        import timm
    except ImportError:
        raise UserError("the timm export is checked with timm: pip install timm") from None
    name = f"mobilenetv2_{round(width * 100):03d}"
    if name not in timm.list_models("mobilenetv2_*"):
        raise UserError(f"timm has no {name} for width {width:g}; it has {', '.join(timm.list_models('mobilenetv2_*'))}")
    return timm.create_model(name, num_classes=classes, pretrained=False)


def _export_state_dict(fmt: str, model: MobileNetV2, temp: Path, suffix: str) -> list[str]:
    """Our weights under the other library's keys, loaded back into its own network strictly, logits compared."""
    from mobilenetv2.interop import keymaps

    network = _foreign_network(fmt, model).eval()
    layout = keymaps.TORCHVISION if fmt == "torchvision" else keymaps.timm_layout()
    ours = model.state_dict()
    state = {key: ours[layout.target_key(key)].detach().clone() for key in network.state_dict()}
    if suffix == ".safetensors":
        from safetensors.torch import load_file, save_file

        save_file(state, str(temp))
        loaded = load_file(str(temp))
    else:
        torch.save(state, temp)
        loaded = torch.load(temp, weights_only=True)
    network.load_state_dict(loaded, strict=True)
    network.eval()
    return check_against_eager(model, lambda images: [network(images)], [4], False, f"{fmt} (strict load)", fmt)


def export_torchvision(model: MobileNetV2, temp: Path, *, suffix: str = ".pth", **_options) -> list[str]:
    return _export_state_dict("torchvision", model, temp, suffix)


def export_timm(model: MobileNetV2, temp: Path, *, suffix: str = ".pth", **_options) -> list[str]:
    return _export_state_dict("timm", model, temp, suffix)


def export_pte(model: MobileNetV2, temp: Path, *, int8: bool = False, calibration=None, **_options) -> list[str]:
    """ExecuTorch (XNNPACK), batch 1; fp32 checked like ONNX (TOLERANCE), int8 within INT8_TOLERANCE."""
    from mobilenetv2.deploy.mobile import executorch_runner, export_executorch

    if int8 and calibration is None:
        raise UserError("int8 ExecuTorch export needs calibration images (`data`)")
    export_executorch(model, temp, int8=int8, calibration=calibration)
    run = executorch_runner(temp)
    if not int8:
        return check_against_eager(model, lambda images: [run(images)], [4], False, "ExecuTorch runtime",
                                    "ExecuTorch")
    return [int8_check(model, run, "ExecuTorch runtime")]


def export_triton(model: MobileNetV2, temp: Path, **options) -> list[str]:
    """A Triton model repository entry (deploy/triton.py) around our checked ONNX export."""
    return triton.write_entry(model, temp, export_onnx, **options)


def export(model: MobileNetV2, fmt: str, output: str | os.PathLike, **options) -> list[str]:
    """Write `model` as `fmt` to `output`, checked against eager PyTorch; returns the check's report lines.

    Options: `batch_size`, `dynamic_batch`, `with_softmax` (ONNX / TorchScript). Raises ExportCheckError (and
    leaves no file at `output`) when the written file disagrees with the model.
    """
    require_format(fmt)
    if options.get("batch_size", 1) < 1:
        raise UserError("`batch_size` must be >= 1")
    output = Path(output)
    if fmt in ("torchvision", "timm"):
        options = {"suffix": output.suffix, **options}
    if fmt == "triton":  # a folder: the model's name in the repository is the folder's
        options = {"name": output.name, **options}
    temp = temp_path_beside(output)
    try:
        reports = _writer(fmt)(model.eval(), temp, **options)
        _replace(temp, output)
    except OSError as exc:  # a full disk or a read-only folder, wherever the writer met it
        raise write_error(output, exc) from None
    finally:
        shutil.rmtree(temp, ignore_errors=True) if temp.is_dir() else temp.unlink(missing_ok=True)
    return reports


def _writer(fmt: str) -> Callable[..., list[str]]:
    """The write-and-check function of `fmt`: one here, or `module:function` in a module of deploy/ of its own."""
    module, _, name = FORMATS[fmt].writer.rpartition(":")
    return getattr(importlib.import_module(f"mobilenetv2.deploy.{module}"), name) if module else globals()[name]


def _replace(temp: Path, output: Path) -> None:
    """Put `temp` (a file, or a folder) at `output`; a folder already there is swapped out, then removed. An
    OpenVINO IR's folder puts its weights beside `output` first, then the graph, which names the export done."""
    if temp.is_dir() and (temp / "model.xml").is_file() and output.suffix == ".xml":
        os.replace(temp / "model.bin", output.with_suffix(".bin"))
        os.replace(temp / "model.xml", output)
        return
    if not (temp.is_dir() and output.is_dir()):
        os.replace(temp, output)
        return
    old = temp_path_beside(output)
    old.unlink()  # a free name; the folder moves there
    os.replace(output, old)
    os.replace(temp, output)
    shutil.rmtree(old, ignore_errors=True)
