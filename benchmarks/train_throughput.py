"""Training images/s: our train step (as the loop runs it) against torchvision's mobilenet_v2 in a plain eager
PyTorch loop (NCHW, fp32, CrossEntropyLoss, SGD, PyTorch's defaults), same batches, same process, at two shapes:
ImageNet's (224 px, batch 32, width 1.0) and the demo's (48 px, batch 128, width 0.5). Ours in fp32 and bf16
autocast, channels-last and NCHW, eager and torch.compile'd (inductor, training mode).

The workload learns: crops of real photos labelled by photo, so each variant's loss is printed at its first and
last step (it must fall). Timing: rotating best-of-N windows (benchmarks/timing.py). The CPU is named in the first
line, as `bench` names it. Process-wide settings our CPU runtime makes (glibc keeping freed memory, see
cpu_memory.py) hold for the torchvision loop too once they are made, so on a CPU the ratios leave out what those
settings are worth; denormal flushing is the exception, switched per step.

    python benchmarks/train_throughput.py [--shapes 224,demo] [--no-compile] [--seconds 4] [--rounds 3]
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torchvision

from mobilenetv2.config import TrainConfig
from mobilenetv2.model import InvertedResidual, MobileNetV2
from mobilenetv2.runtime import setup
from mobilenetv2.training.loop import train_step
from mobilenetv2.training.recipe import build_loss, build_optimizer
from timing import best_rates, cpu_line, timing_parser

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "cat", "immunohistochemistry", "hubble_deep_field")


def photo_batches(batch_size: int, size: int, count: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` batches of random crops of real photos, each labelled with its photo (8 classes)."""
    from skimage import data
    from torchvision.transforms import v2 as T

    transform = T.Compose([T.ToImage(), T.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True),
                           T.ToDtype(torch.float32, scale=True), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    photos = []
    for name in PHOTOS:
        photo = getattr(data, name)()
        photos.append(np.stack([photo] * 3, -1) if photo.ndim == 2 else photo[..., :3])
    generator = np.random.default_rng(0)
    batches = []
    for _ in range(count):
        labels = torch.from_numpy(generator.integers(0, len(photos), batch_size))
        batches.append((torch.stack([transform(photos[i]) for i in labels.tolist()]), labels))
    return batches


class Variant:
    """A model training on the shared batches in turn, remembering its first and latest loss."""

    def __init__(self, step, batches):
        self.step, self.batches, self.calls, self.losses = step, batches, 0, []

    def __call__(self):
        images, labels = self.batches[self.calls % len(self.batches)]
        self.calls += 1
        self.losses.append(float(self.step(images, labels)))


def baseline(device: torch.device, batches, num_classes: int, width: float) -> Variant:
    """torchvision's mobilenet_v2 in a plain eager loop: NCHW, fp32, CrossEntropyLoss, SGD, PyTorch's defaults."""
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=num_classes, width_mult=width).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=4e-5)
    criterion = torch.nn.CrossEntropyLoss()

    def step(images, labels):
        torch.set_flush_denormal(False)
        loss = criterion(model(images.to(device)), labels.to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.detach()

    return Variant(step, batches)


def ours(device_name: str, amp: str, batches, num_classes: int, width: float, channels_last: bool = True,
         compile_model: bool = False, stock: tuple[str, ...] = ()) -> Variant:
    """Our train step as the loop runs it (runtime.setup's decisions, the seed's loss and optimizer); `stock` names
    the CPU-path switches of model.InvertedResidual to turn off (owning_relu6, depthwise_small_maps), so that what
    they switch runs through stock autograd."""
    runtime = setup(device_name, amp, channels_last=channels_last, compile_model=compile_model)
    torch.manual_seed(0)
    network = MobileNetV2(num_classes=num_classes, width_mult=width)
    for block in network.modules():
        if isinstance(block, InvertedResidual):
            for switch in stock:
                setattr(block, switch, False)
    model = runtime.prepare_model(network).train()
    optimizer = build_optimizer(model, TrainConfig(lr_init=0.01, amp=amp), runtime.device)  # as the loop builds it
    scaler = runtime.grad_scaler()
    trainable = runtime.wrap_distributed(model)
    criterion = build_loss(TrainConfig(), num_classes)
    flush_denormal = runtime.device.type == "cpu"  # what runtime.setup decides; the baseline sets its own each step

    def step(images, labels):
        torch.set_flush_denormal(flush_denormal)
        return train_step(trainable, images, labels, criterion, optimizer, scaler, runtime)[0]

    return Variant(step, batches)


SHAPES = {  # name: (image size, batch, width, classes)
    "224": (224, 32, 1.0, len(PHOTOS)),
    "demo": (48, 128, 0.5, len(PHOTOS)),  # configs/fashion_mnist.yaml's network and batch
    "tiny": (32, 8, 0.25, len(PHOTOS)),  # for the suite: that the script runs
}


def main() -> None:
    parser = timing_parser(__doc__.splitlines()[0], seconds=4.0)
    parser.add_argument("--shapes", default="224,demo", help="224 (batch 32, width 1.0) and/or demo (48 px, batch "
                        "128, width 0.5)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rows")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(cpu_line(f"device {device}", f"best of {args.rounds} windows of {args.seconds:g} s",
                   f"crops of {len(PHOTOS)} real photos"), flush=True)
    for shape in args.shapes.split(","):
        size, batch, width, classes = SHAPES[shape]
        batches = photo_batches(batch, size)
        runs = {"baseline": baseline(device, batches, classes, width),
                "fp32": ours(args.device, "off", batches, classes, width),
                "fp32_stock_relu6": ours(args.device, "off", batches, classes, width, stock=("owning_relu6",)),
                "fp32_stock_depthwise": ours(args.device, "off", batches, classes, width,
                                             stock=("depthwise_small_maps",)),
                "fp32_nchw": ours(args.device, "off", batches, classes, width, channels_last=False),
                "bf16": ours(args.device, "bf16", batches, classes, width)}
        if not args.no_compile:
            started = time.perf_counter()
            runs["fp32_compile"] = ours(args.device, "off", batches, classes, width, compile_model=True)
            runs["bf16_compile"] = ours(args.device, "bf16", batches, classes, width, compile_model=True)
            for name in ("fp32_compile", "bf16_compile"):
                runs[name]()  # compiles here, not in a timed window
            compiled = time.perf_counter() - started
        rates = best_rates(runs, batch, args.seconds, args.rounds, sync)
        print(f"\n{shape}: {size} px, batch {batch}, width {width}" +
              (f" (compiling both: {compiled:.0f} s)" if not args.no_compile else ""))
        print("| variant | images/s | vs torchvision eager | loss, first step -> last 5 |\n|---|---|---|---|")
        labels = {"baseline": "torchvision eager, NCHW fp32, PyTorch defaults",
                  "fp32": "ours fp32, channels-last (the CPU default)", "fp32_nchw": "ours fp32, NCHW",
                  "fp32_stock_relu6": "ours fp32, channels-last, stock ReLU6 autograd",
                  "fp32_stock_depthwise": "ours fp32, channels-last, stock depthwise weight gradient",
                  "bf16": "ours bf16 autocast, channels-last", "fp32_compile": "ours fp32, torch.compile",
                  "bf16_compile": "ours bf16, torch.compile"}
        for key, run in runs.items():
            print(f"| {labels[key]} | {rates[key]:.1f} | {rates[key] / rates['baseline']:.2f}x | "
                  f"{run.losses[0]:.3f} -> {np.mean(run.losses[-5:]):.3f} ({run.calls} steps) |", flush=True)


if __name__ == "__main__":
    main()
