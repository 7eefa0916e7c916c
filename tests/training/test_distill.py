"""Knowledge distillation: the KL and DIST losses against hand computations, the teacher frozen and in eval mode,
its preprocessing converted, resume with a teacher, and the bad inputs."""

import math

import numpy as np
import pytest
import torch

from conftest import MS_CHECKPOINT, TINY, assert_same_weights, one_line_exit_2, torchrun, train
from mobilenetv2.checkpoint import save_model
from mobilenetv2.config import Preprocess
from mobilenetv2.files import file_sha256
from mobilenetv2.model import MobileNetV2
from mobilenetv2.training import distill
from mobilenetv2.training.loss import SeedLabelSmoothingLoss

STUDENT = torch.tensor([[2.0, -1.0, 0.5, 0.0], [0.3, 0.2, -2.0, 1.5], [-0.5, 1.0, 1.0, 0.25]], dtype=torch.float64)
TEACHER = torch.tensor([[1.0, 0.0, 2.0, -1.0], [0.5, 0.5, -1.0, 3.0], [0.0, 2.5, -0.5, 0.5]], dtype=torch.float64)


def _softmax(row, t):
    exps = [math.exp(v / t) for v in row]
    return [e / sum(exps) for e in exps]


def _pearson(a, b):
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    return cov / (math.sqrt(sum((x - ma) ** 2 for x in a)) * math.sqrt(sum((y - mb) ** 2 for y in b)))


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0])
def test_kl_matches_a_hand_computation(t):
    total = 0.0
    for s_row, t_row in zip(STUDENT.tolist(), TEACHER.tolist()):
        p, q = _softmax(t_row, t), _softmax(s_row, t)
        total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    expected = total / len(STUDENT) * t * t
    assert distill.kl_distillation(STUDENT, TEACHER, t).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("t", [1.0, 3.0])
def test_dist_matches_a_hand_computation(t):
    p_s = [_softmax(row, t) for row in STUDENT.tolist()]
    p_t = [_softmax(row, t) for row in TEACHER.tolist()]
    inter = 1 - sum(_pearson(a, b) for a, b in zip(p_s, p_t)) / len(p_s)
    columns = range(len(p_s[0]))
    intra = 1 - sum(_pearson([r[c] for r in p_s], [r[c] for r in p_t]) for c in columns) / len(columns)
    expected = t * t * (inter + intra)
    assert distill.dist_distillation(STUDENT, TEACHER, t).item() == pytest.approx(expected, rel=1e-9)
    weighted = t * t * (0.5 * inter + 2.0 * intra)
    assert distill.dist_distillation(STUDENT, TEACHER, t, inter=0.5, intra=2.0).item() == pytest.approx(weighted, rel=1e-9)


@pytest.mark.parametrize("kind", ["kl", "dist"])
@pytest.mark.parametrize("t", [0.5, 1.0, 4.0, 10.0])
def test_a_teacher_identical_to_the_student_costs_nothing(kind, t):
    assert abs(distill.LOSSES[kind](STUDENT, STUDENT.clone(), t).item()) < 1e-12
    assert distill.LOSSES[kind](STUDENT, TEACHER, t).item() > 1e-3


def _tiny(seed=0, classes=3, **kwargs):
    torch.manual_seed(seed)
    return MobileNetV2(num_classes=classes, width_mult=0.25, **kwargs)


def test_the_loss_adds_weighted_terms_and_the_teacher_gets_no_gradient():
    network = _tiny(1)
    teacher = distill.Teacher(network, (0.5,) * 3, (0.25,) * 3, (0.5,) * 3, (0.25,) * 3, None)
    task = SeedLabelSmoothingLoss(0.1, 3)
    criterion = distill.DistillationLoss(task, teacher, "kl", 2.0, 0.7, 0.3)
    student = _tiny(2)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 1])
    logits = student(images)
    loss = criterion(logits, labels, images)
    with torch.no_grad():
        expected = 0.3 * task(logits, labels) + 0.7 * distill.kl_distillation(logits, network(images), 2.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert all(p.grad is None for p in network.parameters())
    assert all(p.grad is not None for p in student.parameters())
    teacher.train()
    assert not teacher.training and not network.training


def _calibrated(network, images):
    """BatchNorm statistics of `images` and logits of a trained network's scale, so outputs depend on the input."""
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # the plain mean over the calibration batch
    torch.nn.init.normal_(network.head.classifier.weight, std=1.0)
    with torch.no_grad():
        network.train()(images)
    return network.eval()


def test_a_teacher_with_another_mean_std_and_size_sees_what_its_own_preprocessing_gives(photos):
    raw = torch.from_numpy(np.stack([photos["astronaut"][:256, :256], photos["coffee"][:256, :256]])).permute(0, 3, 1, 2)
    raw = torch.nn.functional.interpolate(raw.float() / 255, size=(48, 48), mode="bilinear", antialias=True)
    student_mean, student_std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    teacher_mean, teacher_std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    as_student = (raw - torch.tensor(student_mean).view(1, 3, 1, 1)) / torch.tensor(student_std).view(1, 3, 1, 1)
    as_teacher = (raw - torch.tensor(teacher_mean).view(1, 3, 1, 1)) / torch.tensor(teacher_std).view(1, 3, 1, 1)
    own = torch.nn.functional.interpolate(as_teacher, size=(64, 64), mode="bilinear", antialias=True)
    network = _calibrated(_tiny(3), own)
    teacher = distill.Teacher(network, student_mean, student_std, teacher_mean, teacher_std, 64)
    with torch.no_grad():
        expected = network(own)
    scale = expected.abs().max().item()
    assert (expected[0] - expected[1]).abs().max() > 0.1 * scale  # the network's answer depends on the image
    assert torch.allclose(teacher(as_student), expected, atol=1e-3 * scale)  # float order: affine, then resize
    for wrong in [distill.Teacher(network, student_mean, student_std, student_mean, student_std, 64),
                  distill.Teacher(network, student_mean, student_std, teacher_mean, teacher_std, None)]:
        assert not torch.allclose(wrong(as_student), expected, atol=1e-2 * scale)


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """A teacher of another width, mean and std than the students below, for the three classes of `dataset`."""
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    model = _tiny(5, class_names=["astronaut", "chelsea", "coffee"],
                  preprocess=Preprocess(image_size=40, resize_size=48, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))
    save_model(model, path)
    return path


def test_the_teacher_stays_frozen_and_in_eval_mode_across_epochs(dataset, tmp_path, teacher_file, monkeypatch):
    seen, built = [], []
    original_forward, original_load = distill.Teacher.forward, distill.load_teacher

    def spying_forward(self, inputs):
        logits = original_forward(self, inputs)
        seen.append((self.training, self.network.training, logits.requires_grad, tuple(inputs.shape)))
        return logits

    def keeping_load(*args):
        loaded = original_load(*args)
        built.append(loaded[0])
        return loaded

    monkeypatch.setattr(distill.Teacher, "forward", spying_forward)
    monkeypatch.setattr("mobilenetv2.training.run.load_teacher", keeping_load)
    before = torch.load(teacher_file, weights_only=True)["model"]
    assert train(dataset, tmp_path / "run", "--epochs", "2", "--teacher", str(teacher_file), "--distill-loss",
                 "dist", "--width-mult", "0.35") == 0
    assert len(seen) == 6  # 3 steps per epoch
    assert [entry[:3] for entry in seen] == [(False, False, False)] * 6
    assert {shape[-1] for *_, shape in seen} == {32}  # the student's batch; the teacher resizes it to its 40 px
    after = built[0].network.state_dict()
    assert all(torch.equal(before[key], after[key].cpu()) for key in before)  # BatchNorm statistics included
    record = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)
    assert record["teacher"]["sha256"] == file_sha256(teacher_file)
    assert "teacher" not in str(list(record["model"]))


def test_distillation_changes_what_the_student_learns(dataset, tmp_path, teacher_file):
    common = ["--epochs", "1", "--seed", "4", "--color-jitter", "0"]
    assert train(dataset, tmp_path / "plain", *common) == 0
    assert train(dataset, tmp_path / "taught", *common, "--teacher", str(teacher_file)) == 0
    plain = torch.load(tmp_path / "plain/checkpoints/last.pt", weights_only=True)["model"]
    taught = torch.load(tmp_path / "taught/checkpoints/last.pt", weights_only=True)["model"]
    assert not torch.equal(plain["head.classifier.weight"], taught["head.classifier.weight"])


@pytest.mark.parametrize("extra", [[], ["--in-memory", "--mixup-alpha", "0.4", "--random-erase", "0.5"]])
def test_mid_epoch_resume_with_a_teacher_is_bit_identical(dataset, tmp_path, teacher_file, extra):
    base = ["--epochs", "2", "--seed", "3", "--ema", "0.5", *extra]
    distilling = ["--teacher", str(teacher_file), "--distill-loss", "dist", "--distill-temperature", "2"]
    assert train(dataset, tmp_path / "straight", *base, *distilling) == 0
    assert train(dataset, tmp_path / "split", *base, *distilling, "--max-steps", "4") == 0
    # the resumed run keeps the teacher and loss it started with, whatever the command line now says
    assert train(dataset, tmp_path / "split", *base, "--resume", "auto") == 0
    assert_same_weights(tmp_path / "straight", tmp_path / "split")


def test_resume_with_another_teacher_file_is_refused(dataset, tmp_path, teacher_file, capsys):
    import shutil

    teacher = shutil.copy(teacher_file, tmp_path / "teacher.pt")
    assert train(dataset, tmp_path / "run", "--epochs", "2", "--teacher", str(teacher), "--max-steps", "2") == 0
    other = tmp_path / "other.pt"
    save_model(_tiny(9, class_names=["astronaut", "chelsea", "coffee"]), other)
    resume = ["train", "--data", str(dataset), "--output", str(tmp_path / "run"), *TINY, "--epochs", "2",
              "--resume", "auto"]
    line = one_line_exit_2(capsys, [*resume, "--teacher", str(other)])
    assert "teacher" in line and "sha256" in line
    shutil.copy(other, teacher)  # the recorded path, other contents
    assert "sha256" in one_line_exit_2(capsys, resume)
    moved = shutil.copy(teacher_file, tmp_path / "moved.pt")  # the same contents elsewhere: fine
    assert train(dataset, tmp_path / "run", "--epochs", "2", "--resume", "auto", "--teacher", str(moved)) == 0


def test_a_torchvision_teacher_of_another_family(dataset, tmp_path):
    import torchvision

    torch.manual_seed(0)
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), path)
    assert train(dataset, tmp_path / "run", "--epochs", "1", "--teacher", str(path), "--teacher-arch",
                 "torchvision:resnet18") == 0


@pytest.mark.parametrize("case", ["classes", "arch", "arch-fit", "missing", "loss", "weight"])
def test_bad_distillation_input_one_line_exit_2(dataset, tmp_path, teacher_file, capsys, case):
    five = tmp_path / "five.pt"
    save_model(_tiny(1, classes=5), five)
    extra = {"classes": ["--teacher", str(five)],
             "arch": ["--teacher", str(teacher_file), "--teacher-arch", "caffe:alexnet"],
             "arch-fit": ["--teacher", str(teacher_file), "--teacher-arch", "torchvision:resnet18"],
             "missing": ["--teacher", str(tmp_path / "nowhere.pt")],
             "loss": ["--teacher", str(teacher_file), "--distill-loss", "mse"],
             "weight": ["--teacher", str(teacher_file), "--distill-weight", "-1"],
             }[case]
    line = one_line_exit_2(capsys, ["train", "--data", str(dataset), "--output", str(tmp_path / "run"), *TINY,
                                    "--epochs", "1", *extra])
    assert "teacher" in line or "distill" in line
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("extra", [["--mixup-alpha", "0.4", "--cutmix-alpha", "1.0", "--random-erase", "0.5"],
                                   ["--in-memory", "--mixup-alpha", "0.4"], ["--data-backend", "device"]])
def test_the_teacher_sees_the_batch_the_student_sees_after_mixing(dataset, tmp_path, monkeypatch, extra):
    from mobilenetv2 import model as model_module

    same_contract = tmp_path / "teacher.pt"
    save_model(_tiny(6, class_names=["astronaut", "chelsea", "coffee"], preprocess=Preprocess.for_image_size(32)),
               same_contract)
    batches = {True: [], False: []}  # training (the student) / eval (the teacher's network)
    original = model_module.MobileNetV2.forward

    def recording(self, images):
        if torch.is_grad_enabled() or not self.training:
            batches[self.training].append(images.detach().clone())
        return original(self, images)

    monkeypatch.setattr(model_module.MobileNetV2, "forward", recording)
    assert train(dataset, tmp_path / "run", "--epochs", "1", "--eval-every", "0", "--teacher", str(same_contract),
                 *extra) == 0
    student, teacher = batches[True], batches[False]
    assert len(student) == len(teacher) == 3
    assert all(torch.equal(s, t) for s, t in zip(student, teacher))


def test_head_only_training_caches_the_teachers_logits_beside_the_features(dataset, tmp_path, teacher_file):
    from mobilenetv2.data.folders import image_folder
    from mobilenetv2.data.transforms import eval_transform

    common = ["--epochs", "2", "--pretrained", str(MS_CHECKPOINT), "--freeze", "backbone", "--width-mult", "0.5",
              "--feature-runtime", "torch"]
    assert train(dataset, tmp_path / "plain", *common) == 0
    assert train(dataset, tmp_path / "taught", *common, "--teacher", str(teacher_file), "--distill-loss", "dist") == 0
    (folder,) = [p for p in (tmp_path / "taught" / "feature_cache").iterdir() if p.is_dir()]
    rows = np.load(folder / "train_features.npy")
    assert rows.shape == (24, 1280 + 3)  # MindSpore's width-0.5 backbone keeps 1280 features; 3 teacher logits
    student = torch.load(tmp_path / "taught/checkpoints/last.pt", weights_only=True)
    preprocess = Preprocess.from_dict(student["preprocess"])
    images = image_folder(dataset / "train", eval_transform(preprocess), ["astronaut", "chelsea", "coffee"])
    teacher = distill.load_teacher(
        distill.TrainConfig(teacher=str(teacher_file)),
        MobileNetV2(num_classes=3, width_mult=0.25, class_names=["astronaut", "chelsea", "coffee"],
                    preprocess=preprocess), distill.Runtime(torch.device("cpu"), None))[0]
    expected = teacher(torch.stack([images[i][0] for i in range(len(images))]))
    assert np.allclose(rows[:, 1280:], expected.numpy(), atol=1e-4 * float(expected.abs().max()))
    plain = torch.load(tmp_path / "plain/checkpoints/last.pt", weights_only=True)["model"]
    assert not torch.equal(plain["head.classifier.weight"], student["model"]["head.classifier.weight"])
    assert torch.equal(plain["backbone.0.0.weight"], student["model"]["backbone.0.0.weight"])  # still frozen


def test_distillation_under_torchrun_with_class_weights_and_balanced_sampling(dataset, tmp_path, teacher_file):
    import os
    import sys

    run = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "mobilenetv2", "train", "--data", str(dataset), "--output", str(run), *TINY, "--batch-size", "4",
               "--epochs", "1", "--teacher", str(teacher_file), "--distill-loss", "dist", "--class-weights", "auto",
               "--balanced-sampler"]
    result = torchrun(command, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    log = (run / "train.log").read_text()
    assert "distilling from" in log and log.count("epoch time:") == 1
    record = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert record["teacher"]["sha256"] == file_sha256(teacher_file) and record["global_step"] == 3
