"""Training images/s: our train step (channels-last, the seed's loss and optimizer) against torchvision's
mobilenet_v2 in a plain PyTorch loop (NCHW, fp32, CrossEntropyLoss, SGD), same batch, same process.

    python benchmarks/train_throughput.py [--batch-size 32] [--image-size 224] [--steps 6] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision

from mobilenetv2.config import TrainConfig
from mobilenetv2.model import MobileNetV2
from mobilenetv2.runtime import setup
from mobilenetv2.train import SeedLabelSmoothingLoss, make_optimizer, train_step


def images_per_second(step, batch_size: int, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - start)


def baseline(images, labels, device, steps, warmup):
    model = torchvision.models.mobilenet_v2().to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=4e-5)
    criterion = torch.nn.CrossEntropyLoss()

    def step():
        loss = criterion(model(images.to(device)), labels.to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return images_per_second(step, len(images), steps, warmup, device)


def ours(images, labels, device_name, amp, steps, warmup):
    runtime = setup(device_name, amp, channels_last=True)
    config = TrainConfig(lr_init=0.01, amp=amp)
    model = runtime.prepare_model(MobileNetV2()).train()
    optimizer, scaler = make_optimizer(model, config), runtime.grad_scaler()
    criterion = SeedLabelSmoothingLoss(0.1)
    return images_per_second(lambda: train_step(model, images, labels, criterion, optimizer, scaler, runtime),
                             len(images), steps, warmup, runtime.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    labels = torch.randint(0, 1000, (args.batch_size,))
    base = baseline(images, labels, device, args.steps, args.warmup)
    print(f"device {device}, batch {args.batch_size}, {args.image_size} px, threads {torch.get_num_threads()}")
    print(f"baseline torchvision NCHW fp32: {base:8.1f} images/s")
    variants = [("off", "ours channels-last fp32")]
    variants.append(("bf16", "ours channels-last bf16 autocast"))
    for amp, label in variants:
        rate = ours(images, labels, args.device, amp, args.steps, args.warmup)
        print(f"{label:33s}: {rate:8.1f} images/s  ratio {rate / base:.2f}x")


if __name__ == "__main__":
    main()
