"""Training images/s: our train step (channels-last, the seed's loss and optimizer) against torchvision's
mobilenet_v2 in a plain PyTorch loop (NCHW, fp32, CrossEntropyLoss, SGD), same batches, same process.

Two baselines: PyTorch's defaults, and the same loop with denormal flushing on (what our CPU runtime turns on), so
the share of our own code is visible apart from that one flag. The workload learns: crops of real photos labelled
by photo, so each variant's loss is printed at its first and last step (it must fall).
Timing: rotating best-of-N windows (benchmarks/timing.py).

    python benchmarks/train_throughput.py [--batch-size 32] [--image-size 224] [--seconds 6] [--rounds 3]
"""

from __future__ import annotations


import numpy as np
import torch
import torchvision

from mobilenetv2.config import TrainConfig
from mobilenetv2.model import MobileNetV2
from mobilenetv2.runtime import setup
from mobilenetv2.training.loop import train_step
from mobilenetv2.training.recipe import build_loss, build_optimizer
from timing import best_rates, timing_parser

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


def baseline(device: torch.device, batches, flush_denormal: bool) -> Variant:
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=len(PHOTOS)).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=4e-5)
    criterion = torch.nn.CrossEntropyLoss()

    def step(images, labels):
        torch.set_flush_denormal(flush_denormal)
        loss = criterion(model(images.to(device)), labels.to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.detach()

    return Variant(step, batches)


def ours(device_name: str, amp: str, batches) -> Variant:
    runtime = setup(device_name, amp, channels_last=True)
    torch.manual_seed(0)
    model = runtime.prepare_model(MobileNetV2(num_classes=len(PHOTOS))).train()
    optimizer, scaler = build_optimizer(model, TrainConfig(lr_init=0.01, amp=amp)), runtime.grad_scaler()
    criterion = build_loss(TrainConfig(), len(PHOTOS))
    flush_denormal = runtime.device.type == "cpu"  # what runtime.setup decides; the baselines set their own each step

    def step(images, labels):
        torch.set_flush_denormal(flush_denormal)
        return train_step(model, images, labels, criterion, optimizer, scaler, runtime)[0]

    return Variant(step, batches)


def main() -> None:
    parser = timing_parser(__doc__.splitlines()[0], seconds=6.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    batches = photo_batches(args.batch_size, args.image_size)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    runs = {"baseline": baseline(device, batches, flush_denormal=False),
            "baseline_flush": baseline(device, batches, flush_denormal=device.type == "cpu"),
            "fp32": ours(args.device, "off", batches),
            "bf16": ours(args.device, "bf16", batches)}
    rates = best_rates(runs, args.batch_size, args.seconds, args.rounds, sync)
    print(f"device {device}, batch {args.batch_size}, {args.image_size} px, threads {torch.get_num_threads()}, "
          f"best of {args.rounds} windows of {args.seconds:g} s; crops of {len(PHOTOS)} real photos")
    labels = {"baseline": "baseline torchvision NCHW fp32, PyTorch defaults",
              "baseline_flush": "baseline, denormals flushed (our flag)",
              "fp32": "ours channels-last fp32 (the default)",
              "bf16": "ours channels-last bf16 autocast"}
    for key, label in labels.items():
        run = runs[key]
        print(f"{label:48s}: {rates[key]:7.1f} images/s  vs defaults {rates[key] / rates['baseline']:.2f}x  "
              f"vs same flag {rates[key] / rates['baseline_flush']:.2f}x  loss {run.losses[0]:.3f} -> "
              f"{np.mean(run.losses[-5:]):.3f} over {run.calls} steps")


if __name__ == "__main__":
    main()
