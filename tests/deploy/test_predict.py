"""`eval` and `predict`: exact counts alone and under torchrun, ONNX evaluation, class names and probabilities."""

import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mobilenetv2 import MobileNetV2, load_model, save_model
from mobilenetv2.cli import main

from conftest import FIVE_CLASSES, MS_CHECKPOINT, one_line_exit_2, subset, torchrun


@pytest.fixture(scope="module")
def five_data(fashion, tmp_path_factory):
    return subset(fashion, tmp_path_factory.mktemp("five") / "data", FIVE_CLASSES)


def result_line(out):
    line = next(line for line in out.splitlines() if line.startswith("result:"))
    return float(line.split("'acc': ")[1].split(",")[0]), line


def test_eval_counts_every_image_once_alone_and_under_torchrun(five_data, pretrained_five, tmp_path, capsys):
    # 100 val images, batch 7: neither 100 nor 50 per rank is a multiple of the batch
    report = tmp_path / "eval.json"
    assert main(["eval", "--data", str(five_data), "--checkpoint", str(pretrained_five), "--batch-size", "7",
                 "--workers", "0", "--json", str(report)]) == 0
    accuracy, line = result_line(capsys.readouterr().out)
    assert f"ckpt={pretrained_five} runtime=" in line and "'top5': " in line
    data = json.loads(report.read_text())
    assert data["count"] == 100 and data["top1"] == accuracy and accuracy > 0.4
    assert np.array(data["confusion_matrix"]).sum() == 100
    assert set(data["per_class_accuracy"]) == set(FIVE_CLASSES)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "mobilenetv2", "eval", "--data", str(five_data), "--checkpoint", str(pretrained_five),
               "--batch-size", "7", "--workers", "0", "--json", str(tmp_path / "ddp.json")]
    result = torchrun(command, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("result:") == 1  # rank 0 prints
    ddp = json.loads((tmp_path / "ddp.json").read_text())
    assert ddp["count"] == 100 and ddp["top1"] == accuracy
    assert ddp["confusion_matrix"] == data["confusion_matrix"]


def _wide_photos(root, photos):
    """Non-square real photos (twice as wide as tall): squash and shorter-side resizing see different pixels."""
    for name in ("astronaut", "chelsea", "coffee"):
        (root / name).mkdir(parents=True)
        photo = photos[name]
        for i, top in enumerate((0, 40, 80)):
            Image.fromarray(photo[top:top + 150, :300]).save(root / name / f"{i}.png")
    return root


def _manual_eval(model, folder, resize):
    """Mean cross-entropy and top-1, computed here with torchvision's transforms, image by image."""
    from torchvision.transforms import v2 as T

    size = model.preprocess.resize_size
    transform = T.Compose([T.Resize((size, size) if resize == "squash" else size, antialias=True),
                           T.CenterCrop(model.preprocess.image_size), T.ToImage(),
                           T.ToDtype(torch.float32, scale=True), T.Normalize(model.preprocess.mean, model.preprocess.std)])
    losses, correct = [], 0
    for label, name in enumerate(model.class_names[:3]):
        for path in sorted((folder / name).iterdir()):
            with torch.no_grad():
                output = model(transform(Image.open(path).convert("RGB"))[None])
            losses.append(torch.nn.functional.cross_entropy(output, torch.tensor([label])).item())
            correct += int(output.argmax() == label)
    return sum(losses) / len(losses), correct / len(losses)


@pytest.mark.parametrize("contract", ["short", "squash"])
def test_eval_resize_modes_loss_and_the_seed_folder_name(photos, tmp_path, capsys, contract):
    from mobilenetv2.config import Preprocess

    root = tmp_path / "seed_layout"
    _wide_photos(root / "validation_preprocess", photos)  # the seed's name for the val folder
    model = load_model(MS_CHECKPOINT)  # BatchNorm calibrated on real photos: its logits depend on the image
    model.class_names = ["astronaut", "chelsea", "coffee"] + [f"other_{i}" for i in range(7)]
    model.preprocess = Preprocess(image_size=96, resize_size=110, resize_mode=contract)
    save_model(model, tmp_path / "model.pt")
    reports = {}
    for mode in ("default", "short", "squash"):
        flags = [] if mode == "default" else ["--resize", mode]
        assert main(["eval", "--data", str(root), "--checkpoint", str(tmp_path / "model.pt"), "--workers", "0",
                     "--batch-size", "4", "--json", str(tmp_path / f"{mode}.json"), *flags]) == 0
        reports[mode] = json.loads((tmp_path / f"{mode}.json").read_text())
        assert reports[mode]["count"] == 9
    for mode in ("short", "squash"):
        loss, top1 = _manual_eval(model, root / "validation_preprocess", mode)
        assert reports[mode]["loss"] == pytest.approx(loss, rel=1e-5)
        assert reports[mode]["top1"] == pytest.approx(top1)
    assert abs(reports["short"]["loss"] - reports["squash"]["loss"]) > 1e-4  # the two modes really differ here
    assert reports["default"] == reports[contract]  # the default is the checkpoint's own contract


def test_eval_on_onnx_equals_eval_on_checkpoint(five_data, pretrained_five, tmp_path, capsys):
    onnx_path = tmp_path / "five.onnx"
    assert main(["export", "--checkpoint", str(pretrained_five), "--format", "onnx", "--output", str(onnx_path),
                 "--batch-size", "4", "--onnx-exporter", "legacy"]) == 0  # a fixed batch: eval pads the last chunk
    capsys.readouterr()
    results = []
    for checkpoint in (pretrained_five, onnx_path):
        assert main(["eval", "--data", str(five_data), "--checkpoint", str(checkpoint), "--batch-size", "9",
                     "--workers", "0", "--json", str(tmp_path / "r.json")]) == 0
        results.append(json.loads((tmp_path / "r.json").read_text()))
    assert results[0]["count"] == results[1]["count"] == 100
    assert results[0]["top1"] == results[1]["top1"]
    assert results[0]["confusion_matrix"] == results[1]["confusion_matrix"]


def test_several_models_in_one_pass_count_as_each_alone(five_data, pretrained_five):
    """evaluate_each reads the images once for all its models; each model's counts are those it gets alone."""
    from mobilenetv2.data.folders import eval_loader, image_folder
    from mobilenetv2.data.transforms import eval_transform
    from mobilenetv2.evaluation import evaluate, evaluate_each
    from mobilenetv2.runtime import setup

    trained = load_model(pretrained_five).eval()
    fresh = MobileNetV2(num_classes=5, width_mult=0.25).eval()  # answers otherwise: a mix-up cannot pass
    dataset = image_folder(five_data / "val", eval_transform(trained.preprocess), trained.class_names)
    runtime = setup("cpu", "off")
    together = evaluate_each([trained, fresh], eval_loader(dataset, 16, 0), runtime, 5)
    alone = [evaluate(model, eval_loader(dataset, 16, 0), runtime, 5) for model in (trained, fresh)]
    assert together[0].top1 > 0.5 and together[0].top1 != together[1].top1
    for both, single in zip(together, alone):
        assert (both.count, both.top1, both.top5, both.skipped) == (single.count, single.top1, single.top5,
                                                                     single.skipped)
        assert both.loss == pytest.approx(single.loss, rel=1e-6) and torch.equal(both.confusion, single.confusion)


def test_predict_on_real_photos(photos, tmp_path, capsys):
    torch.manual_seed(0)
    save_model(MobileNetV2(num_classes=1000, width_mult=0.25), tmp_path / "imagenet.pt")
    paths = []
    for name in ("astronaut", "chelsea"):
        Image.fromarray(photos[name]).save(tmp_path / f"{name}.jpg")
        paths.append(str(tmp_path / f"{name}.jpg"))
    assert main(["predict", "--checkpoint", str(tmp_path / "imagenet.pt"), *paths, "--topk", "5", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    from mobilenetv2.deploy.predict import imagenet_class_names

    names = imagenet_class_names()
    assert len(names) == 1000 and names[281] == "tabby"
    for result in results:
        probabilities = [p["probability"] for p in result["predictions"]]
        assert len(probabilities) == 5 and probabilities == sorted(probabilities, reverse=True)
        assert all(p["class"] == names[p["index"]] for p in result["predictions"])


def test_predict_probabilities_sum_to_one_with_checkpoint_names(pretrained_five, photos, tmp_path, capsys):
    Image.fromarray(photos["coffee"]).save(tmp_path / "coffee.png")
    assert main(["predict", "--checkpoint", str(pretrained_five), str(tmp_path / "coffee.png"), "--topk", "10",
                 "--json"]) == 0
    predictions = json.loads(capsys.readouterr().out)[0]["predictions"]
    assert sorted(p["class"] for p in predictions) == sorted(FIVE_CLASSES)
    assert sum(p["probability"] for p in predictions) == pytest.approx(1.0, abs=1e-5)


def test_bad_input_one_line_exit_2(converted, tmp_path, capsys):
    assert "image not found" in one_line_exit_2(capsys, ["predict", "--checkpoint", str(converted),
                                                         str(tmp_path / "missing.jpg")])
    (tmp_path / "notes.jpg").write_text("this is text, not an image")
    assert "not a readable image" in one_line_exit_2(capsys, ["predict", "--checkpoint", str(converted),
                                                              str(tmp_path / "notes.jpg")])
    assert "unknown export format" in one_line_exit_2(capsys, ["export", "--checkpoint", str(converted),
                                                               "--format", "mindir-air"])
    foreign = tmp_path / "foreign.onnx"
    torch.onnx.export(torch.nn.Linear(3, 2), (torch.zeros(1, 3),), str(foreign), dynamo=False)
    assert "without mobilenetv2 metadata" in one_line_exit_2(capsys, ["eval", "--data", str(tmp_path),
                                                                      "--checkpoint", str(foreign)])
    (tmp_path / "noise.onnx").write_bytes(os.urandom(256))
    one_line_exit_2(capsys, ["predict", "--checkpoint", str(tmp_path / "noise.onnx"), str(tmp_path / "notes.jpg")])
    assert "dataset folder not found" in one_line_exit_2(capsys, ["eval", "--data", str(tmp_path / "none"),
                                                                  "--checkpoint", str(converted)])


def test_predict_with_a_freshly_built_model(photos, tmp_path):
    from mobilenetv2 import MobileNetV2, predict

    Image.fromarray(photos["rocket"]).save(tmp_path / "rocket.png")
    torch.manual_seed(0)
    results = predict(MobileNetV2(num_classes=4, width_mult=0.25, class_names=list("abcd")),
                      [str(tmp_path / "rocket.png"), tmp_path / "rocket.png"], topk=2)
    assert [len(r["predictions"]) for r in results] == [2, 2]
    assert results[0]["predictions"] == results[1]["predictions"]
    assert {p["class"] for p in results[0]["predictions"]} <= set("abcd")


def test_tied_scores_give_the_same_top1_in_eval_predict_and_compare(five_data, tmp_path):
    """An int8 model's quantized logits tie often. eval, predict and eval --compare must name the same top-1 for the
    same logits (the lowest tied index, as argmax does); topk breaks ties its own way (index 2 first here)."""
    from mobilenetv2.deploy.predict import compare_models, predict
    from mobilenetv2.evaluation import evaluate
    from mobilenetv2.runtime import setup

    tied = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0]] * 4)
    labels = torch.tensor([1, 1, 2, 4])
    result = evaluate(lambda inputs: tied[: len(inputs)], [(torch.zeros(4, 1), labels, 0)], setup("cpu", "off"), 5)
    assert result.top1 == 0.5 and result.top5 == 1.0
    assert result.confusion[:, 1].sum() == 4  # every image predicted as class 1

    model = MobileNetV2(num_classes=5, width_mult=0.25, class_names=FIVE_CLASSES).eval()
    torch.nn.init.zeros_(model.head.classifier.weight)  # every class scores 0: a five-way tie
    torch.nn.init.zeros_(model.head.classifier.bias)
    image = next((five_data / "val" / FIVE_CLASSES[3]).iterdir())
    [answer] = predict(model, [image], topk=5)
    assert [row["index"] for row in answer["predictions"]] == [0, 1, 2, 3, 4]
    save_model(model, tmp_path / "tied.pt")
    agreement = compare_models(tmp_path / "tied.pt", tmp_path / "tied.pt", five_data / "val", workers=0)
    assert agreement.a_correct == 20  # class 0 named for all 100 images: its 20 are right
