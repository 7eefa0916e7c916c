"""MINDIR, the seed's own export format (MindSpore Lite's on phones): our weights in the seed's network written in
MindSpore (interop/mindspore_net.py), exported with `mindspore.export`, loaded back with `mindspore.load` + GraphCell
and run on real photos against eager PyTorch. MindSpore is never a dependency: it is imported here when this
environment has it (the [mindspore] extra), or it runs as a child process in the python that `--mindspore-python` or
$MOBILENETV2_MINDSPORE_PYTHON names (MindSpore needs protobuf >= 7, which tritonclient refuses, so it usually lives in
an environment of its own). The two sides talk through plain files: the seed-layout `.ckpt` we write, `.npy` arrays.

The graph ends in logits by default, as every export of ours; `with_softmax` writes the seed's exported head instead
(its `export.py` ends the graph in a Softmax: one output, the probabilities), which `scripts/export.py` does."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from mobilenetv2.deploy.checks import noise_note
from mobilenetv2.engines.onnx_files import ExportCheckError, check_images, compare, float32_error
from mobilenetv2.errors import UserError, first_line
from mobilenetv2.model import MobileNetV2

PYTHON_VARIABLE = "MOBILENETV2_MINDSPORE_PYTHON"
CHILD = Path(__file__).resolve().parent.parent / "interop" / "mindspore_net.py"
CHILD_SECONDS = 600  # MindSpore's import, graph compilation and export: about 15 s on a 2-core CPU
HOW = ("python3 -m venv ~/.mindspore && ~/.mindspore/bin/pip install mindspore numpy, then pass --mindspore-python "
       f"~/.mindspore/bin/python (or set {PYTHON_VARIABLE})")


def mindspore_here() -> bool:
    return importlib.util.find_spec("mindspore") is not None


def mindspore_python(python: str | None = None) -> str | None:
    """The interpreter to run MindSpore in: `python`, else $MOBILENETV2_MINDSPORE_PYTHON, else None when this
    environment imports MindSpore itself; UserError when there is none."""
    chosen = python or os.environ.get(PYTHON_VARIABLE)
    if chosen:
        if not (Path(chosen).is_file() and os.access(chosen, os.X_OK)):
            raise UserError(f"--mindspore-python {chosen}: not an executable file")
        return os.path.abspath(chosen)  # the child runs in a temp folder; a venv's link must stay a link
    if mindspore_here():
        return None
    raise UserError(f"the mindir export needs MindSpore, which is not installed here: {HOW}")


def _run(model: MobileNetV2, folder: Path, images: np.ndarray, with_softmax: bool, python: str | None) -> Path:
    """Write the seed-layout checkpoint, export and run it in MindSpore; the MINDIR's path (its answers beside)."""
    from mobilenetv2.interop import keymaps, mindspore

    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    checkpoint, inputs = folder / "weights.ckpt", folder / "images.npy"
    mindspore.write_checkpoint({k: v.numpy() for k, v in keymaps.to_mindspore_keys(state).items()}, checkpoint)
    np.save(inputs, images, allow_pickle=False)
    output, answers = folder / "model.mindir", folder / "answers.npy"
    arguments = ["--checkpoint", str(checkpoint), "--classes", str(model.num_classes), "--width",
                 repr(float(model.width_mult)), "--size", str(model.preprocess.image_size), "--input", str(inputs),
                 "--output", str(output), "--logits", str(answers), *(["--softmax"] if with_softmax else [])]
    if python is None:
        from mobilenetv2.interop import mindspore_net

        try:
            mindspore_net.export_and_run(checkpoint, model.num_classes, float(model.width_mult),
                                         model.preprocess.image_size, inputs, output, answers, with_softmax)
        except Exception as exc:  # noqa: BLE001 - MindSpore's own errors, in one line
            raise ExportCheckError(f"MindSpore could not export or run the network: {first_line(exc, 200)}") from None
        return output
    try:  # isolated (-I): neither PYTHONPATH nor the script's folder, whose mindspore.py (our reader) would shadow it
        result = subprocess.run([python, "-I", str(CHILD), *arguments], capture_output=True, text=True,
                                timeout=CHILD_SECONDS, cwd=folder)
    except subprocess.TimeoutExpired:
        raise ExportCheckError(f"MindSpore in {python} took more than {CHILD_SECONDS} s") from None
    last = (result.stderr.strip().splitlines() or ["no message"])[-1][:300]
    if result.returncode != 0 and "No module named 'mindspore'" in last:
        raise UserError(f"--mindspore-python {python} has no MindSpore: {HOW}")
    if result.returncode != 0:
        raise ExportCheckError(f"MindSpore in {python} could not export or run the network: {last}")
    return output


def export_mindir(model: MobileNetV2, temp: Path, *, with_softmax: bool = False, python: str | None = None,
                  **_options) -> list[str]:
    """MINDIR of `model` at `temp`, checked: the file loaded back in MindSpore answers as eager PyTorch on 3 photos
    (logits, or probabilities `with_softmax`), within the export tolerance."""
    if model.architecture()["inverted_residual_setting"] is not None:
        raise UserError("a custom inverted_residual_setting has no equivalent in the seed's MindSpore network")
    python = mindspore_python(python)
    images = check_images(model, 3)
    with torch.no_grad():
        expected = model(images)
    noise = float32_error(model, images)
    with tempfile.TemporaryDirectory(dir=temp.parent, prefix=".mindir.") as folder:
        written = _run(model, Path(folder), images.numpy(), with_softmax, python)
        answers = np.load(Path(folder) / "answers.npy", allow_pickle=False)
        what = "probabilities" if with_softmax else "logits"
        reference = torch.softmax(expected, 1) if with_softmax else expected
        difference = compare(reference, answers, f"the MINDIR's {what}", noise=0.0 if with_softmax else noise)
        os.chmod(written, 0o644)  # MindSpore writes its files read-only
        os.replace(written, temp)
    where = "this environment" if python is None else python
    return [f"MindSpore GraphCell ({where}) vs eager, 3 photos: max abs difference in {what} {difference:.3g}"
            + ("" if with_softmax else noise_note(expected, noise)),
            "graph output: " + ("probabilities (the seed's Softmax head)" if with_softmax else "logits")]
