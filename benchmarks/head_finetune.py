"""Head-only fine-tuning: our cached-feature path (cache building included) against the naive way, where the frozen
backbone runs on every image in every epoch. Same data, same settings, same process.

    python benchmarks/head_finetune.py [--epochs 10] [--per-class 50] [--image-size 128] [--width 1.0]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from mobilenetv2 import MobileNetV2, save_model
from mobilenetv2.config import TrainConfig
from mobilenetv2.data import folders as data_module
from mobilenetv2.data.fashion_mnist import write_fashion_mnist
from mobilenetv2.data.transforms import eval_transform
from mobilenetv2.runtime import setup
from mobilenetv2.training.loop import train_step
from mobilenetv2.training.loss import SeedLabelSmoothingLoss
from mobilenetv2.training.run import run_training
from mobilenetv2.training.setup import make_optimizer


def naive(config: TrainConfig, pretrained: Path) -> float:
    """Frozen backbone forward on every image, every epoch; only the head gets gradients."""
    from mobilenetv2 import load_model

    runtime = setup(config.device, "off", channels_last=config.channels_last)
    model = runtime.prepare_model(load_model(pretrained))
    model.backbone.requires_grad_(False)
    dataset = data_module.image_folder(Path(config.data) / "train", eval_transform(config.preprocess))
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, shuffle=True, drop_last=True,
                                         num_workers=config.workers, collate_fn=data_module.collate_skipping)
    optimizer, scaler = make_optimizer(model, config), runtime.grad_scaler()
    criterion = SeedLabelSmoothingLoss(config.label_smoothing)

    class FrozenBackboneHead(torch.nn.Module):
        def forward(self, images):
            with torch.no_grad():
                pooled = model.features(images)
            return model.head.classify(pooled)

    trainable = FrozenBackboneHead()
    start = time.perf_counter()
    for _ in range(config.epochs):
        model.eval()
        for images, labels, _skipped in loader:
            train_step(trainable, images, labels, criterion, optimizer, scaler, runtime)
    return time.perf_counter() - start


def cached(config: TrainConfig) -> float:
    start = time.perf_counter()
    run_training(config)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_fashion_mnist(tmp / "data", per_class=args.per_class, val_per_class=1)
        torch.manual_seed(0)
        pretrained = tmp / "pretrained.pt"
        save_model(MobileNetV2(num_classes=10, width_mult=args.width), pretrained)
        config = TrainConfig(data=str(data), output=str(tmp / "run"), device="cpu", epochs=args.epochs,
                             batch_size=args.batch_size, lr_max=0.05, width_mult=args.width, pretrained=str(pretrained),
                             freeze="backbone", image_size=args.image_size, workers=args.workers, eval_every=0,
                             log_every=10_000, amp="off")
        images = args.per_class * 10
        print(f"{images} Fashion-MNIST images, {args.image_size} px, width {args.width}, {args.epochs} epochs, "
              f"batch {args.batch_size}, threads {torch.get_num_threads()}")
        naive_seconds = naive(config, pretrained)
        print(f"naive (backbone every epoch): {naive_seconds:7.2f} s")
        cached_seconds = cached(config)
        print(f"cached features (incl. build): {cached_seconds:7.2f} s")
        print(f"speedup: {naive_seconds / cached_seconds:.1f}x")


if __name__ == "__main__":
    main()
