"""Training images/s: our train step (channels-last, the seed's loss and optimizer) against torchvision's
mobilenet_v2 in a plain PyTorch loop (NCHW, fp32, CrossEntropyLoss, SGD), same batch, same process.
Timing: rotating best-of-N windows (benchmarks/timing.py).

    python benchmarks/train_throughput.py [--batch-size 32] [--image-size 224] [--seconds 6] [--rounds 3]
"""

from __future__ import annotations

import argparse

import torch
import torchvision

from mobilenetv2.config import TrainConfig
from mobilenetv2.model import MobileNetV2
from mobilenetv2.runtime import setup
from mobilenetv2.training.loop import train_step
from mobilenetv2.training.loss import SeedLabelSmoothingLoss
from mobilenetv2.training.setup import make_optimizer
from timing import best_rates


def baseline_step(images, labels, device):
    model = torchvision.models.mobilenet_v2().to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=4e-5)
    criterion = torch.nn.CrossEntropyLoss()

    def step():
        torch.set_flush_denormal(False)  # a plain loop runs with PyTorch's defaults
        loss = criterion(model(images.to(device)), labels.to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def our_step(images, labels, device_name, amp):
    runtime = setup(device_name, amp, channels_last=True)
    model = runtime.prepare_model(MobileNetV2()).train()
    optimizer, scaler = make_optimizer(model, TrainConfig(lr_init=0.01, amp=amp)), runtime.grad_scaler()
    criterion = SeedLabelSmoothingLoss(0.1)
    flush_denormal = runtime.device.type == "cpu"  # what runtime.setup decided; the baseline resets it each step

    def step():
        torch.set_flush_denormal(flush_denormal)
        return train_step(model, images, labels, criterion, optimizer, scaler, runtime)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--seconds", type=float, default=6.0, help="length of one timed window")
    parser.add_argument("--rounds", type=int, default=3, help="windows per variant")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    labels = torch.randint(0, 1000, (args.batch_size,))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    runs = {"baseline": baseline_step(images, labels, device),
            "fp32": our_step(images, labels, args.device, "off"),
            "bf16": our_step(images, labels, args.device, "bf16")}
    rates = best_rates(runs, args.batch_size, args.seconds, args.rounds, sync)
    print(f"device {device}, batch {args.batch_size}, {args.image_size} px, threads {torch.get_num_threads()}, "
          f"best of {args.rounds} windows of {args.seconds:g} s")
    base = rates["baseline"]
    print(f"baseline torchvision NCHW fp32   : {base:8.1f} images/s")
    for key, label in (("fp32", "ours channels-last fp32"), ("bf16", "ours channels-last bf16 autocast")):
        print(f"{label:33s}: {rates[key]:8.1f} images/s  ratio {rates[key] / base:.2f}x")


if __name__ == "__main__":
    main()
