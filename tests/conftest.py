"""Shared fixtures and helpers: real photos from scikit-image / scikit-learn, tiny ImageFolder trees, real
Fashion-MNIST subsets, the MindSpore fixture, and short CLI runs on tiny widths and resolutions."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mobilenetv2.cli import main

if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers on two cores: one thread each, no oversubscription
    torch.set_num_threads(1)

FIXTURES = Path(__file__).parent / "fixtures"
MS_CHECKPOINT = FIXTURES / "ms_mobilenetv2_w0.5_c10.ckpt"
MS_INPUT = np.load(FIXTURES / "ms_input_w0.5_c10.npy")
MS_LOGITS = np.load(FIXTURES / "ms_logits_w0.5_c10.npy")
REPO = Path(__file__).resolve().parents[1]
# float32 summation order alone moves logits by ~1e-5 of their scale (fixtures/README.md)
PARITY_TOLERANCE = 1e-4


def parity_error(actual) -> float:
    """Largest |actual - MindSpore's logits|, relative to max(1, logit scale)."""
    actual = actual.detach().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    return float(np.abs(actual - MS_LOGITS).max() / max(1.0, float(np.abs(MS_LOGITS).max())))


def fp16_rounded(path):
    """The model at `path` with every floating-point tensor rounded through fp16 (what fp16 storage keeps)."""
    from mobilenetv2 import load_model

    model = load_model(path)
    state = {k: v.half().float() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    return model


def assert_parity(actual) -> None:
    """`actual` reproduces the seed's logits for the fixture's two photos."""
    assert np.asarray(actual).shape == MS_LOGITS.shape
    error = parity_error(actual)
    assert error <= PARITY_TOLERANCE, f"relative error {error:.3g}"


def pytest_configure(config):
    """One short temporary folder for the whole run, removed at its end: what libraries leave in the temporary
    folder (torchrun's agent folders, converters' scratch packages and models, pytest's own folders) would otherwise
    pile up in /tmp, a few dozen entries a run. Set once by the process that starts the test workers, who inherit it;
    short, because a Unix socket's path (multiprocessing's, Chromium's) has at most 107 bytes."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None and "MOBILENETV2_TESTS_TMPDIR" not in os.environ:
        folder = tempfile.mkdtemp(prefix="mnv2-tests-", dir="/tmp")
        os.environ["MOBILENETV2_TESTS_TMPDIR"] = os.environ["TMPDIR"] = tempfile.tempdir = folder
        config.stash[_TMPDIR] = folder


def pytest_unconfigure(config):
    import multiprocessing.util

    folder = config.stash.get(_TMPDIR, None)
    if folder:
        # at exit, after multiprocessing has removed its own folder inside ours (a run without xdist forks from here)
        multiprocessing.util.Finalize(None, shutil.rmtree, args=(folder,), kwargs={"ignore_errors": True},
                                      exitpriority=-200)
        os.environ.pop("MOBILENETV2_TESTS_TMPDIR", None)


_TMPDIR = pytest.StashKey[str]()
_TREE = pytest.StashKey[set]()
_WRITTEN = pytest.StashKey[list]()


def files_in_tree() -> set[str] | None:
    """Every file under src/ and tests/ that git does not track, ignored ones included (bytecode aside), or None
    outside a git checkout."""
    import subprocess

    try:
        listed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--ignored", "--", "src",
                                 "tests"], cwd=REPO, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if listed.returncode != 0:
        return None
    return {line[3:] for line in listed.stdout.splitlines()
            if line[:2] in ("??", "!!") and "__pycache__/" not in line and not line.endswith(".egg-info/")}


def pytest_sessionstart(session):
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        session.config.stash[_TREE] = files_in_tree()


def pytest_sessionfinish(session, exitstatus):
    """The suite is hermetic: a test that leaves a file under src/ or tests/ (a fixture's export beside it, a cache)
    fails the run, naming the files."""
    before = session.config.stash.get(_TREE, None)
    if before is None or os.environ.get("PYTEST_XDIST_WORKER") is not None:
        return
    new = sorted((files_in_tree() or set()) - before)
    if new:
        session.config.stash[_WRITTEN] = new
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    written = config.stash.get(_WRITTEN, None)
    if written:
        terminalreporter.section("written into the source tree", red=True)
        terminalreporter.write_line(f"FAILED: the suite left {len(written)} file(s) under src/ or tests/: "
                                    + ", ".join(written[:10]), red=True)


# The heaviest files first (seconds of test time per file on the AVX2 VM, 2026-12-07: 131, 100, 87, 62, 47, ...):
# xdist's loadfile scheduling hands out files in collection order, so with these last (alphabetically most are) one
# worker could still be running a long file while the other has nothing left.
HEAVY_FIRST = ("deploy/test_quantize.py", "test_benchmarks.py", "test_docs.py", "deploy/test_litert.py",
               "training/test_distributed_failures.py", "deploy/test_mindir.py", "training/test_interruptions.py",
               "test_scripts.py", "deploy/test_predict.py", "test_two_nodes.py", "training/test_head_cache.py",
               "deploy/test_coreml.py", "data/test_streams.py", "test_demo.py")


def pytest_collection_modifyitems(config, items):
    tests, rank = Path(__file__).parent, {name: index for index, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).relative_to(tests).as_posix(), len(rank)))  # stable


def real_photos() -> dict[str, np.ndarray]:
    """Real RGB photos, by name."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    photos = {name: getattr(data, name)() for name in ("astronaut", "chelsea", "coffee", "rocket")}
    china, flower = load_sample_images().images
    photos.update(china=china, flower=flower)
    return photos


def write_image_folder(root: Path, per_class: int = 6, size: int = 48, seed: int = 0, classes=None) -> Path:
    """An ImageFolder whose classes are real photos; each image is a random crop of its class's photo."""
    rng = np.random.default_rng(seed)
    photos = real_photos()
    classes = classes or ["astronaut", "chelsea", "coffee"]
    for name in classes:
        photo = photos[name]
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        h, w = photo.shape[:2]
        for i in range(per_class):
            crop = int(min(h, w) * rng.uniform(0.5, 0.9))
            y, x = rng.integers(0, h - crop + 1), rng.integers(0, w - crop + 1)
            Image.fromarray(photo[y:y + crop, x:x + crop]).resize((size, size)).save(folder / f"{name}_{i:03d}.jpg")
    return root


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    return real_photos()


def photo_batch(photos: dict[str, np.ndarray], size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Six real photos resized to size x size, (6, 3, size, size) in [0, 1], and a label each (five classes)."""
    images = [np.asarray(Image.fromarray(photos[name]).resize((size, size)), dtype=np.float32) / 255
              for name in ("astronaut", "chelsea", "coffee", "rocket", "china", "flower")]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.tensor([0, 1, 2, 3, 4, 0])


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """A tiny dataset root: train/ (3 classes x 8 images) and val/ (3 classes x 5 images)."""
    root = tmp_path_factory.mktemp("dataset")
    write_image_folder(root / "train", per_class=8, seed=0)
    write_image_folder(root / "val", per_class=5, seed=1)
    return root


FASHION_FILES = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


@pytest.fixture(scope="session")
def fashion(tmp_path_factory) -> Path:
    """Real Fashion-MNIST: 10 classes, 40 train and 20 val images each (`make test` installs the Debian package)."""
    from mobilenetv2.data.fashion_mnist import write_fashion_mnist

    assert FASHION_FILES.is_file(), "install dataset-fashion-mnist (make test does it as root)"
    return write_fashion_mnist(tmp_path_factory.mktemp("fashion"), per_class=40, val_per_class=20)


def subset(source: Path, target: Path, classes: list[str]) -> Path:
    import shutil

    for split in ("train", "val"):
        for name in classes:
            shutil.copytree(source / split / name, target / split / name)
    return target


FIVE_CLASSES = ["Bag", "Sandal", "Sneaker", "T-shirt_top", "Trouser"]
TINY_TRAIN = ["--width-mult", "0.25", "--image-size", "32", "--workers", "0", "--log-every", "1000"]


@pytest.fixture(scope="session")
def pretrained_five(fashion, tmp_path_factory) -> Path:
    """A network trained from scratch on five Fashion-MNIST classes (its checkpoint carries the class names).
    Under xdist the workers share one: the first to ask trains it in this session's temp folder, the others wait on
    a lock and read it (each worker trains on one thread, so any of them would train the same network)."""
    from filelock import FileLock

    shared = os.environ.get("PYTEST_XDIST_WORKER") is not None
    base = tmp_path_factory.getbasetemp().parent if shared else tmp_path_factory.mktemp("pretrained-alone")
    root, checkpoint = base / "pretrained", base / "pretrained" / "run" / "checkpoints" / "last.pt"
    with FileLock(str(base / "pretrained.lock")):
        if not checkpoint.is_file():
            shutil.rmtree(root, ignore_errors=True)  # a worker that died half-way
            data = subset(fashion, root / "data", FIVE_CLASSES)
            # in memory: ten seconds. Five classes from 200 images at 32 px vary with the seed and the thread count
            # (71-93 % top-1 over seeds 1-3); seed 2 gave 93 % on one thread (as under xdist) and 87 % on two
            assert main(["train", "--data", str(data), "--output", str(root / "run"), *TINY_TRAIN, "--batch-size", "20",
                         "--epochs", "20", "--lr-max", "0.03", "--min-scale", "0.5", "--color-jitter", "0",
                         "--eval-every", "20", "--in-memory", "--seed", "2"]) == 0
    return checkpoint


def randomise_batchnorm(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BN statistics and affine parameters, so a mis-mapped BN tensor shows in the logits."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=generator) * 0.1)
    return model.eval()


def logits(model, images):
    with torch.no_grad():
        return model.eval()(images)


def run_convert(capsys, source, tmp_path):
    """`mobilenetv2 convert SOURCE` must fail: exit 2, one line, no output file. Returns the line."""
    code = main(["convert", str(source), "--output", str(tmp_path / "out.pt")])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out.pt").exists()
    return err


# ------------------------------------------------------------------ shared by several test modules

TINY = ["--width-mult", "0.25", "--image-size", "32", "--batch-size", "8", "--workers", "0", "--lr-max", "0.05",
        "--color-jitter", "0.4"]


def train(dataset, output, *extra):
    return main(["train", "--data", str(dataset), "--output", str(output), *TINY, *extra])


def assert_same_weights(first_run, second_run):
    """Two runs' last checkpoints hold bit-identical weights (the EMA's and the raw ones)."""
    first = torch.load(first_run / "checkpoints/last.pt", weights_only=True)
    second = torch.load(second_run / "checkpoints/last.pt", weights_only=True)
    assert first["global_step"] == second["global_step"]
    for part in ("model", "train_model"):
        different = [key for key, value in first.get(part, {}).items() if not torch.equal(value, second[part][key])]
        assert different == [], (part, different[:3])


def records(run, kind):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def head_only(data, output, pretrained, *extra):
    return main(["train", "--data", str(data), "--output", str(output), "--pretrained", str(pretrained),
                 "--freeze", "backbone", *TINY_TRAIN, "--batch-size", "16", "--lr-max", "0.1", *extra])


@pytest.fixture
def three_new(fashion, tmp_path):
    return subset(fashion, tmp_path / "data", ["Coat", "Dress", "Ankle_boot"])


def last_eval(run):
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in epochs if r["type"] == "epoch"][-1]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    path = tmp_path_factory.mktemp("converted") / "ms.pt"
    assert main(["convert", str(MS_CHECKPOINT), "--output", str(path)]) == 0
    return path


# ------------------------------------------------------------------ real processes of our code, started fast

_FORKSERVER = None


def _in_child(stdout_path: str | None, stderr_path: str | None, body, *args) -> None:
    """A forked child's life: its output into files (or nowhere), one torch thread (as the xdist workers run), then
    `body(*args)`; an exception or sys.exit gives its exit code."""
    import multiprocessing
    import sys

    for fd, path in ((1, stdout_path or os.devnull), (2, stderr_path or os.devnull)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", buffering=1, closefd=False)
    torch.set_num_threads(1)
    multiprocessing.set_start_method("fork", force=True)  # as a fresh interpreter's loader workers start (the
    # forkserver child would otherwise inherit forkserver as its default and pay a new server per loader)
    body(*args)


def _cli(argv: list[str], env: dict | None = None, cwd: str | None = None) -> None:
    import sys

    os.environ.update(env or {})  # read by what the command imports from here on (nothing preloaded reads them)
    if cwd:
        os.chdir(cwd)
    sys.exit(main(argv))


def _script(script: str, argv: list[str]) -> None:
    import runpy
    import sys

    os.chdir(Path(script).parent)
    sys.path.insert(0, str(Path(script).parent))
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")


def _torchrun(argv: list[str], env: dict | None) -> None:
    os.environ.update(env or {})  # what the workers inherit (they write into the agent's output files)
    from torch.distributed.run import main as torchrun_main

    torchrun_main(argv)  # a failed job raises: exit code 1, as the torchrun command's


def forked(target, *args):
    """`target(*args)` in a process of its own (a multiprocessing.Process: pid, kill(), terminate(), join(),
    exitcode), forked from a server process that imported torch and the package once: a real process for kills,
    signals and benchmarks, without the five seconds a fresh interpreter spends importing torch on a small VM."""
    import multiprocessing

    global _FORKSERVER
    if _FORKSERVER is None:
        _FORKSERVER = multiprocessing.get_context("forkserver")
        _FORKSERVER.set_forkserver_preload(["torch", "torchvision", "mobilenetv2.cli", "mobilenetv2.training.run",
                                            "conftest"])
    process = _FORKSERVER.Process(target=target, args=args)  # not daemonic: it may start loader workers
    process.start()
    return process


def _completed(command: list[str], timeout: float, body, *args):
    """`body(*args)` in a forked child to its end (killed after `timeout` seconds): a subprocess.CompletedProcess
    named `command`, with what the child wrote to stdout and stderr."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        out, err = Path(folder) / "out", Path(folder) / "err"
        process = forked(_in_child, str(out), str(err), body, *args)
        process.join(timeout)
        if process.exitcode is None:
            process.kill()
            process.join()
        return subprocess.CompletedProcess(command, process.exitcode, out.read_text(), err.read_text())


def cli_process(argv: list[str], stderr_path: Path | None = None):
    """`mobilenetv2 ARGV` in a forked process (see `forked`), its stderr into `stderr_path` (else nowhere)."""
    return forked(_in_child, None, stderr_path and str(stderr_path), _cli, list(argv))


def cli_run(argv: list[str], env: dict | None = None, cwd: Path | None = None, timeout: float = 300):
    """`mobilenetv2 ARGV` run to its end in a forked process (see `forked`) with `env` added to its environment."""
    return _completed(argv, timeout, _cli, list(argv), env, cwd and str(cwd))


def torchrun(command: list[str], timeout: float = 300, env: dict | None = None):
    """`python -m torch.distributed.run ARGS` (`command`, as a subprocess would take it) with torchrun's agent forked
    from the torch-importing server (see `forked`; the workers are fresh interpreters, as torchrun starts them),
    with the agent's and the workers' output."""
    import sys

    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"], command[:3]
    return _completed(command, timeout, _torchrun, command[3:], env)


def run_script(script: Path, *argv: str, timeout: float = 300) -> str:
    """`python SCRIPT ARGV` from the script's folder in a forked process (see `forked`): its stdout; an exit code
    other than 0 fails with the end of its stderr."""
    result = _completed([str(script), *argv], timeout, _script, str(script), list(argv))
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-2000:]}"
    return result.stdout


def skip_unless_installed(module: str, reason: str):
    """A mark skipping tests where `module` is not installed, found without importing it: every xdist worker collects
    every file, and coremltools and litert-torch take 3-6 s each to import (this suite's collection: 16 s of which 9 s
    were those two)."""
    import importlib.util

    return pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=reason)


def openvino_present(monkeypatch, present: bool) -> None:
    """OpenVINO installed or not as the engine chooser sees it, whatever this machine has: when `present`, ONNX
    Runtime stands in for it."""
    from mobilenetv2.engines import choose

    monkeypatch.setattr(choose, "installed", lambda engine: engine != "openvino" or present)
    monkeypatch.setitem(choose.ENGINE_RUNNERS, "openvino", choose.ENGINE_RUNNERS["onnx"])


def one_line_exit_2(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    return err



# ------------------------------------------------------------------ networks for the export formats' checks


def calibrated_network(width: float, size: int = 64, classes: tuple[str, ...] = ("astronaut", "chelsea", "coffee")):
    """A network whose logits depend on the photo: BatchNorm affine terms drawn, statistics measured on real photos
    (a fresh network's BatchNorm would give every photo nearly the same answer, which a parity check cannot use)."""
    from mobilenetv2 import MobileNetV2
    from mobilenetv2.engines.onnx_files import check_images
    from mobilenetv2.preprocess import Preprocess

    torch.manual_seed(int(width * 100))
    model = MobileNetV2(num_classes=len(classes), width_mult=width, class_names=list(classes),
                        preprocess=Preprocess(image_size=size, resize_size=size + size // 8))
    draw = torch.Generator().manual_seed(7)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data = torch.empty(module.num_features).uniform_(0.5, 1.5, generator=draw)
            module.bias.data = torch.randn(module.num_features, generator=draw) * 0.2
            module.momentum = None  # a cumulative average over the photos
    model.train()
    with torch.no_grad():
        model(check_images(model, 4))
    model.eval()
    with torch.no_grad():
        logits = model(check_images(model, 4))
    assert float((logits[0] - logits[1]).abs().max()) > 0.05 * float(logits.abs().max())  # photo-dependent
    return model


def swapped_colours(model):
    """`model` with its stem reading BGR as RGB: the wrong channel order in copied weights."""
    import copy

    wrong = copy.deepcopy(model)
    stem = next(m for m in wrong.modules() if isinstance(m, torch.nn.Conv2d))
    stem.weight.data = stem.weight.data.flip(1)
    return wrong
