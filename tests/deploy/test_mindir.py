"""export --format mindir: the seed's network in real MindSpore (its own environment, as `make test` builds it), the
MINDIR loaded back with GraphCell answering as eager PyTorch; the seed's export.py arguments through scripts/."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mobilenetv2 import save_model
from mobilenetv2.cli import main

from conftest import MS_CHECKPOINT, MS_INPUT, MS_LOGITS, REPO, calibrated_network, one_line_exit_2


def mindspore_python() -> str | None:
    """The python with MindSpore that `make test` names, or the repository's own MindSpore environment."""
    named = os.environ.get("MOBILENETV2_MINDSPORE_PYTHON")
    local = REPO / ".venv-mindspore" / "bin" / "python"
    return named or (str(local) if local.is_file() else None)


needs_mindspore = pytest.mark.skipif(mindspore_python() is None, reason="no MindSpore environment (make mindspore)")


@needs_mindspore
@pytest.mark.parametrize("width", [0.5, 1.0])
def test_the_mindir_runs_in_mindspore_as_eager_does(tmp_path, capsys, width):
    model = calibrated_network(width)
    save_model(model, tmp_path / "m.pt")
    relative = os.path.relpath(mindspore_python())  # as a user types it, from where they stand
    assert main(["export", "--checkpoint", str(tmp_path / "m.pt"), "--format", "mindir", "--mindspore-python",
                 relative]) == 0
    out = capsys.readouterr().out
    assert "MindSpore GraphCell" in out and "graph output: logits" in out
    # the file itself, loaded in MindSpore by a script of this test's own, on photos the export did not see
    from mobilenetv2.engines.onnx_files import check_images

    images = check_images(model, 4)[[3, 2]]
    np.save(tmp_path / "x.npy", images.numpy())
    script = ("import sys, numpy as np, mindspore as ms\nfrom mindspore import nn\n"
              "g = nn.GraphCell(ms.load(sys.argv[1]))\n"
              "np.save(sys.argv[3], np.concatenate([g(ms.Tensor(x[None])).asnumpy() for x in np.load(sys.argv[2])]))\n")
    result = subprocess.run([mindspore_python(), "-I", "-c", script, str(tmp_path / "m.mindir"),
                             str(tmp_path / "x.npy"), str(tmp_path / "y.npy")], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-1000:]
    with torch.no_grad():
        expected = model(images).numpy()
    assert np.abs(np.load(tmp_path / "y.npy") - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())


@needs_mindspore
def test_the_seeds_export_arguments_write_the_seeds_softmax_graph(tmp_path):
    """scripts/export.py on the seed's own checkpoint: the probabilities MindSpore's logits give."""
    env = {**os.environ, "MOBILENETV2_MINDSPORE_PYTHON": mindspore_python()}
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "export.py"), "--ckpt_file", str(MS_CHECKPOINT),
                             "--file_format", "MINDIR"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-1000:]
    assert "probabilities (the seed's Softmax head)" in result.stdout
    script = ("import sys, numpy as np, mindspore as ms\nfrom mindspore import nn\n"
              "g = nn.GraphCell(ms.load('mobilenetv2.mindir'))\n"
              "print(repr(np.concatenate([g(ms.Tensor(x[None])).asnumpy() for x in np.load(sys.argv[1])]).tolist()))\n")
    np.save(tmp_path / "x.npy", MS_INPUT)
    probs = subprocess.run([mindspore_python(), "-I", "-c", script, str(tmp_path / "x.npy")], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert probs.returncode == 0, probs.stderr[-1000:]
    expected = torch.softmax(torch.from_numpy(MS_LOGITS), 1).numpy()
    assert np.abs(np.array(eval(probs.stdout.strip().splitlines()[-1])) - expected).max() <= 1e-5
    air = subprocess.run([sys.executable, str(REPO / "scripts" / "export.py"), "--ckpt_file", str(MS_CHECKPOINT),
                          "--file_format", "AIR"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert air.returncode == 2 and "Ascend" in air.stderr


@needs_mindspore
def test_swapped_colours_in_the_copied_weights_fail_and_leave_nothing(tmp_path, capsys, monkeypatch):
    from mobilenetv2.interop import keymaps

    model = calibrated_network(0.5, size=32)
    save_model(model, tmp_path / "m.pt")
    to_mindspore = keymaps.to_mindspore_keys

    def swapped(state):  # the stem's input channels reversed on the way into the seed's layout
        renamed = dict(to_mindspore(state))
        renamed["features.0.features.0.weight"] = renamed["features.0.features.0.weight"].flip(1)
        return renamed

    monkeypatch.setattr(keymaps, "to_mindspore_keys", swapped)
    assert main(["export", "--checkpoint", str(tmp_path / "m.pt"), "--format", "mindir", "--mindspore-python",
                 mindspore_python()]) == 1
    assert "the MINDIR's logits differs from eager" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_no_mindspore_anywhere_is_one_line_saying_how_to_get_it(tmp_path, capsys, monkeypatch):
    """Whether or not the interpreter running the suite has MindSpore: its own is hidden, and the python given is
    one that surely has none (this one without its site-packages). The checkpoint is a copy in tmp_path, so that
    whatever an export wrote would land there, never in the source tree."""
    import shutil

    monkeypatch.delenv("MOBILENETV2_MINDSPORE_PYTHON", raising=False)
    from mobilenetv2.deploy import mindir

    monkeypatch.setattr(mindir, "mindspore_here", lambda: False)
    checkpoint = Path(shutil.copy(MS_CHECKPOINT, tmp_path / "seed.ckpt"))
    export = ["export", "--checkpoint", str(checkpoint), "--format", "mindir"]
    err = one_line_exit_2(capsys, export)
    assert "needs MindSpore" in err and "--mindspore-python" in err
    bare = tmp_path / "bare-python"
    bare.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')  # no site-packages: no MindSpore
    bare.chmod(0o755)
    err = one_line_exit_2(capsys, export + ["--mindspore-python", str(bare)])
    assert "has no MindSpore" in err
    err = one_line_exit_2(capsys, export + ["--mindspore-python", str(tmp_path / "nothing")])
    assert "not an executable file" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare-python", "seed.ckpt"]
