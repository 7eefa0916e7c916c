"""`mobilenetv2 average`: copies of one checkpoint average back to it exactly, two checkpoints average element by
element (EMA and raw weights each with their own kind, BatchNorm statistics too), `--last N RUN_DIR`, and refusals."""

import shutil

import pytest
import torch

from conftest import one_line_exit_2, train
from mobilenetv2 import MobileNetV2, load_model, save_model
from mobilenetv2.cli import main


@pytest.fixture(scope="module")
def run(dataset, tmp_path_factory):
    """Three epochs with an EMA, a numbered checkpoint after each."""
    folder = tmp_path_factory.mktemp("average") / "run"
    assert train(dataset, folder, "--epochs", "3", "--ema", "0.5", "--save-every", "1", "--keep-max", "3") == 0
    return folder


def _record(path):
    return torch.load(path, weights_only=True)


def test_copies_of_one_checkpoint_average_back_to_it_exactly(run, tmp_path, capsys):
    source = run / "checkpoints" / "mobilenetv2-3_3.pt"
    copies = [shutil.copy(source, tmp_path / f"copy{i}.pt") for i in range(3)]
    assert main(["average", *map(str, copies), "--output", str(tmp_path / "mean.pt")]) == 0
    original, mean = _record(source), _record(tmp_path / "mean.pt")
    for part in ("model", "train_model"):
        assert mean[part].keys() == original[part].keys()
        assert all(torch.equal(mean[part][key], original[part][key]) for key in original[part])
    assert (mean["class_names"], mean["preprocess"], mean["config"]) == \
        (original["class_names"], original["preprocess"], original["config"])
    assert "optimizer" not in mean


def test_two_checkpoints_average_element_by_element_and_last_n_picks_the_newest(run, dataset, tmp_path, capsys):
    assert main(["average", "--last", "2", str(run), "--output", str(tmp_path / "mean.pt"), "--data", str(dataset),
                 "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "mobilenetv2-2_3.pt" in out and "mobilenetv2-3_3.pt" in out and "mobilenetv2-1_3.pt" not in out
    assert "result:{'acc': " in out
    a, b = (_record(run / "checkpoints" / f"mobilenetv2-{e}_3.pt") for e in (2, 3))
    mean = _record(tmp_path / "mean.pt")
    for part in ("model", "train_model"):
        for key, value in mean[part].items():
            if value.is_floating_point():
                assert torch.allclose(value, (a[part][key].double() + b[part][key].double()).float() / 2, atol=1e-7)
            else:
                assert torch.equal(value, (a[part][key] + b[part][key]) // 2)
    running = "backbone.0.1.running_var"
    assert not torch.equal(a["model"][running], b["model"][running])  # the statistics differ and are averaged too
    assert load_model(tmp_path / "mean.pt").class_names == ["astronaut", "chelsea", "coffee"]


@pytest.mark.parametrize("case", ["width", "classes", "one", "last-too-many", "last-bad", "neither"])
def test_averaging_what_does_not_average_is_one_line_exit_2(run, tmp_path, capsys, case):
    last = run / "checkpoints" / "last.pt"
    other = tmp_path / "other.pt"
    if case == "width":
        save_model(MobileNetV2(num_classes=3, width_mult=0.5, class_names=["astronaut", "chelsea", "coffee"]), other)
    else:
        save_model(MobileNetV2(num_classes=3, width_mult=0.25, class_names=["a", "b", "c"]), other)
    argv = {"width": [str(last), str(other)], "classes": [str(last), str(other)], "one": [str(last)],
            "last-too-many": ["--last", "5", str(run)], "last-bad": ["--last", "two", str(run)], "neither": []}[case]
    line = one_line_exit_2(capsys, ["average", *argv, "--output", str(tmp_path / "mean.pt")])
    assert "Traceback" not in line
    assert not (tmp_path / "mean.pt").exists()

