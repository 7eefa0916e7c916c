"""One prepared GPU benchmark: training images/s at 224 px, batch 256, bf16, channels-last — from tensors already on
the GPU (model only; eager and torch.compile) and end to end from JPEG files (`--data-backend pil` with every core,
and `device`: nvJPEG) — eval images/s, and torchvision's mobilenet_v2 in a plain AMP loop as the baseline row.
Then a step at each training size of configs/seed_fast.yaml's progressive schedule, with the measured epoch-time
estimate of that recipe beside its image-pixel estimate (both against 224-px epochs).
Prints one table; writes gpu_suite.json to $OUT when set. `--cpu` runs everything small on the CPU (CI, laptops).

    PYTHONPATH=src python3 benchmarks/gpu_suite.py [--cpu] [--images 1500] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torchvision

from mobilenetv2.config import TrainConfig, build_config
from mobilenetv2.data import folders, on_device
from mobilenetv2.data.synthetic import write_synthetic
from mobilenetv2.data.transforms import eval_transform
from mobilenetv2.model import MobileNetV2
from mobilenetv2.runtime import Runtime
from mobilenetv2.training.loop import train_step
from mobilenetv2.training.run import run_training
from mobilenetv2.training.recipe import build_loss, build_optimizer
from mobilenetv2.training.schedule import resolution_for

SEED_FAST = Path(__file__).resolve().parent.parent / "configs" / "seed_fast.yaml"


# warm-up calls before each timing: three on a GPU (cuDNN's autotuning, the caching allocator); one on the CPU, where
# the run checks the code paths, not speed (each bf16 step there is a quarter of a second)
WARMUP = {"cuda": 3, "cpu": 1}


def timed(step, steps: int, sync, warmup: int) -> float:
    """Seconds for `steps` calls after `warmup` warm-up calls, synchronised at both ends."""
    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return time.perf_counter() - start


def model_only(runtime: Runtime, batch: int, size: int, steps: int, compile_model: bool, sync) -> float:
    model = runtime.prepare_model(MobileNetV2()).train()
    trainable = torch.compile(model) if compile_model else model
    optimizer, scaler = build_optimizer(model, TrainConfig(lr_init=0.01), runtime.device), runtime.grad_scaler()
    criterion = build_loss(TrainConfig(), model.num_classes)
    images = torch.randn(batch, 3, size, size, device=runtime.device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (batch,), device=runtime.device)
    return batch * steps / timed(lambda: train_step(trainable, images, labels, criterion, optimizer, scaler, runtime),
                                 steps, sync, WARMUP[runtime.device.type])


def torchvision_baseline(device: torch.device, amp_dtype, batch: int, size: int, steps: int, sync) -> float:
    model = torchvision.models.mobilenet_v2().to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=4e-5)
    criterion = torch.nn.CrossEntropyLoss()
    images, labels = torch.randn(batch, 3, size, size, device=device), torch.randint(0, 1000, (batch,), device=device)

    def step():
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = criterion(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return batch * steps / timed(step, steps, sync, WARMUP[device.type])


def end_to_end(data: Path, output: Path, backend: str, args, device: str) -> float:
    """Images/s of `mobilenetv2 train` from the JPEG files, over the logged intervals after the first."""
    config = TrainConfig(data=str(data), output=str(output), device=device, epochs=100, max_steps=args.steps,
                         batch_size=args.batch_size, image_size=args.image_size, workers=args.workers,
                         data_backend=backend, amp="bf16", eval_every=0, log_every=max(args.steps // 5, 1),
                         save_every=1000, width_mult=1.0)
    run_training(config)
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in lines if r["type"] == "step" and r["global_step"] >= config.log_every]
    return sum(rates) / max(len(rates), 1)


@torch.no_grad()
def eval_rate(data: Path, backend: str, runtime: Runtime, args) -> float:
    from mobilenetv2.config import Preprocess

    model = runtime.prepare_model(MobileNetV2()).eval()
    preprocess = Preprocess.for_image_size(args.image_size)
    if backend == "pil":
        dataset = folders.image_folder(data / "train", eval_transform(preprocess))
        loader = folders.eval_loader(dataset, args.batch_size, args.workers, pin_memory=runtime.device.type == "cuda")
        batches = ((images, labels, skipped) for images, labels, skipped in loader)
    else:
        dataset = folders.image_folder(data / "train", None, kind=on_device.EncodedFolder)
        loader = folders.eval_loader(dataset, args.batch_size, args.workers, collate=on_device.collate_encoded)
        batches = on_device.on_device(loader, on_device.DeviceEvalTransform(preprocess), runtime.device)
    count, start = 0, time.perf_counter()
    for images, labels, _skipped in batches:
        with runtime.autocast():
            model(runtime.to_input(images))
        count += len(labels)
    if runtime.device.type == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - start)


def seed_fast_sizes(runtime: Runtime, args, sync) -> dict[str, float]:
    """Model-only images/s at each training size of seed_fast.yaml and at its eval size, and that recipe's epochs
    in 224-px epochs by image-pixels and by these step times. On the CPU the sizes are divided by 7 (the code path)."""
    config = build_config(TrainConfig, SEED_FAST)
    sizes = [resolution_for(config)(epoch) for epoch in range(config.epochs)]
    scale = 1 if runtime.device.type == "cuda" else 7
    rates = {size: model_only(runtime, args.batch_size, size // scale, args.steps, False, sync)
             for size in sorted({*sizes, config.image_size})}
    full = rates[config.image_size]
    results = {f"train, GPU tensors, ours eager, seed_fast {size} px (/{scale})": rate for size, rate in rates.items()}
    pixels = sum((size / config.image_size) ** 2 for size in sizes)
    measured = sum(full / rates[size] for size in sizes)
    results[f"seed_fast's {config.epochs} by image-pixels, {config.image_size}-px epochs"] = pixels
    results[f"seed_fast's {config.epochs} by measured steps, {config.image_size}-px epochs"] = measured
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="small sizes on the CPU")
    parser.add_argument("--images", type=int, default=1500)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    args.batch_size, args.image_size = (256, 224) if cuda else (4, 32)  # on the CPU: the code paths, not speed
    args.workers = os.cpu_count() or 1 if cuda else 0
    if not cuda:
        args.images, args.steps = min(args.images, 16), min(args.steps, 3)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    runtime = Runtime(device, torch.bfloat16, channels_last=True)
    results, started = {}, time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_synthetic(tmp / "jpegs", images=args.images, size="500x375" if cuda else "96x72",
                               val_fraction=0)
        results["synthetic JPEGs written, s"] = time.perf_counter() - started
        results["train, GPU tensors, torchvision plain AMP loop (baseline)"] = torchvision_baseline(
            device, torch.bfloat16, args.batch_size, args.image_size, args.steps, sync)
        results["train, GPU tensors, ours eager"] = model_only(runtime, args.batch_size, args.image_size, args.steps,
                                                               False, sync)
        if not args.no_compile and cuda:
            compile_start = time.perf_counter()
            results["train, GPU tensors, ours torch.compile"] = model_only(runtime, args.batch_size, args.image_size,
                                                                           args.steps, True, sync)
            results["torch.compile warm-up, s"] = time.perf_counter() - compile_start
        for backend in ("pil", "device"):
            results[f"train end to end from JPEG, {backend}"] = end_to_end(data, tmp / f"run-{backend}", backend, args,
                                                                           str(device))
            results[f"eval from JPEG, {backend}"] = eval_rate(data, backend, runtime, args)
        results.update(seed_fast_sizes(runtime, args, sync))
    results["suite, s"] = time.perf_counter() - started
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    print(f"{name}, torch {torch.__version__}, torchvision {torchvision.__version__}, batch {args.batch_size}, "
          f"{args.image_size} px, bf16, channels-last, {args.workers} loader workers")
    baseline = results["train, GPU tensors, torchvision plain AMP loop (baseline)"]
    for key, value in results.items():
        unit = " s" if key.endswith(", s") else " epochs" if key.endswith("-px epochs") else None
        ratio = "" if unit else f"  {value / baseline:5.2f}x baseline"
        print(f"{key:66s} {value:10.1f}{unit or ' images/s'}{ratio}")
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "gpu_suite.json").write_text(json.dumps({"device": name, **results}, indent=2))


if __name__ == "__main__":
    main()
