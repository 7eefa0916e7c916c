"""Head-only fine-tuning (the seed's `--freeze_layer backbone`): three ways to train a new head on a backbone that
has learned something, same data, same process, each timed from images on disk to a trained head.

- naive: the frozen backbone runs on every image in every epoch;
- the seed's way: one backbone pass stores every image's features, then the head trains on them (what the seed
  does before its head-only epochs); the baseline that matters;
- ours: `--freeze backbone`: the keyed, memory-mapped feature cache (built here, key hashing included), the head
  trained through the one training loop, full-network checkpoints every epoch.

The backbone is first trained here on five Fashion-MNIST classes; the heads learn the other five. All three heads
are scored on the same held-out images, and their accuracies must agree.

    python benchmarks/head_finetune.py [--epochs 10] [--per-class 100] [--image-size 96] [--width 1.0]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from mobilenetv2 import load_model
from mobilenetv2.config import TrainConfig
from mobilenetv2.data import folders
from mobilenetv2.data.fashion_mnist import FASHION_MNIST_CLASSES, write_fashion_mnist
from mobilenetv2.data.transforms import eval_transform
from mobilenetv2.runtime import setup
from mobilenetv2.training.loop import train_step
from mobilenetv2.training.recipe import build_loss, build_optimizer
from mobilenetv2.training.run import run_training
from timing import cpu_line

PRETRAIN_CLASSES, NEW_CLASSES = FASHION_MNIST_CLASSES[:5], FASHION_MNIST_CLASSES[5:]


def class_subset(source: Path, target: Path, classes) -> Path:
    for split in ("train", "val"):
        (target / split).mkdir(parents=True)
        for name in classes:
            (target / split / name).symlink_to(source / split / name)
    return target


def loader(config: TrainConfig, split: str, shuffle: bool) -> torch.utils.data.DataLoader:
    dataset = folders.image_folder(Path(config.data) / split, eval_transform(config.preprocess))
    return torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, shuffle=shuffle, num_workers=config.workers,
                                       collate_fn=folders.collate_skipping)


@torch.no_grad()
def features(model, batches) -> tuple[torch.Tensor, torch.Tensor]:
    pooled, labels = [], []
    for images, batch_labels, _skipped in batches:
        pooled.append(model.features(images.contiguous(memory_format=torch.channels_last)))
        labels.append(batch_labels)
    return torch.cat(pooled), torch.cat(labels)


def fresh_head_model(config: TrainConfig):
    model = load_model(config.pretrained).to(memory_format=torch.channels_last).eval()
    torch.manual_seed(config.seed)
    model.head.classifier = torch.nn.Linear(model.num_features, len(NEW_CLASSES))
    model.backbone.requires_grad_(False)
    return model


def train_head(model, config: TrainConfig, epoch_batches, runtime) -> None:
    """The plain head loop both baselines share: SGD on the head, the seed's loss, constant rate."""
    optimizer, scaler = build_optimizer(model.head, config), runtime.grad_scaler()
    for group in optimizer.param_groups:
        group["lr"] = config.lr_max
    criterion = build_loss(config, len(NEW_CLASSES))
    for epoch in range(config.epochs):
        for inputs, labels in epoch_batches(epoch):
            train_step(model.head.classify if inputs.dim() == 2 else _frozen_forward(model), inputs, labels,
                       criterion, optimizer, scaler, runtime)


def _frozen_forward(model):
    def forward(images):
        with torch.no_grad():
            pooled = model.features(images)
        return model.head.classify(pooled)
    return forward


def naive(config: TrainConfig, runtime):
    model = fresh_head_model(config)
    train_loader = loader(config, "train", shuffle=True)
    start = time.perf_counter()
    train_head(model, config, lambda epoch: ((x, y) for x, y, _ in train_loader), runtime)
    return time.perf_counter() - start, model.head.classifier


def seed_way(config: TrainConfig, runtime):
    model = fresh_head_model(config)
    start = time.perf_counter()
    rows, labels = features(model, loader(config, "train", shuffle=False))  # one backbone pass

    def epoch_batches(epoch):
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(epoch))
        return ((rows[i], labels[i]) for i in order.split(config.batch_size))

    train_head(model, config, epoch_batches, runtime)
    return time.perf_counter() - start, model.head.classifier


def ours(config: TrainConfig):
    start = time.perf_counter()
    run_training(config)
    seconds = time.perf_counter() - start
    return seconds, load_model(Path(config.output) / "checkpoints" / "last.pt").head.classifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=100, help="train images per new class")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--pretrain-epochs", type=int, default=3)
    args = parser.parse_args()
    print(cpu_line(), flush=True)
    runtime = setup("cpu", "off", channels_last=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = write_fashion_mnist(tmp / "fm", per_class=max(400, args.per_class), val_per_class=100)
        started = time.perf_counter()
        pretrain = TrainConfig(data=str(class_subset(source, tmp / "old", PRETRAIN_CLASSES)), output=str(tmp / "pre"),
                               device="cpu", epochs=args.pretrain_epochs, batch_size=64, lr_max=0.1, warmup_epochs=0.5,
                               width_mult=args.width, image_size=args.image_size, resize_size=args.image_size,
                               min_scale=0.8, color_jitter=0.0, in_memory=True, workers=args.workers,
                               eval_every=args.pretrain_epochs, log_every=10_000, amp="off")
        state = run_training(pretrain)
        print(f"backbone: width {args.width} trained {args.pretrain_epochs} epochs on {', '.join(PRETRAIN_CLASSES)} "
              f"({5 * max(400, args.per_class):,} images, {args.image_size} px): {state.best_acc:.1%} top-1, {time.perf_counter() - started:.0f} s")
        new = write_fashion_mnist(tmp / "fm-new", per_class=args.per_class, val_per_class=100)
        config = TrainConfig(data=str(class_subset(new, tmp / "new", NEW_CLASSES)), output=str(tmp / "ours"),
                             device="cpu", epochs=args.epochs, batch_size=args.batch_size, lr_init=0.05, lr_max=0.05,
                             lr_end=0.05, pretrained=str(tmp / "pre" / "checkpoints" / "last.pt"), freeze="backbone",
                             image_size=args.image_size, resize_size=args.image_size, workers=args.workers,
                             eval_every=0, log_every=10_000, amp="off")
        print(f"head: {args.per_class * 5} images of {', '.join(NEW_CLASSES)}, {args.epochs} epochs, batch "
              f"{args.batch_size}, threads {torch.get_num_threads()}")
        results = {"naive (backbone every epoch)": naive(config, runtime),
                   "the seed's way (features once, in memory)": seed_way(config, runtime),
                   "ours (keyed feature cache, checkpoints)": ours(config)}
        val_rows, val_labels = features(fresh_head_model(config), loader(config, "val", shuffle=False))
        seed_seconds = results["the seed's way (features once, in memory)"][0]
        for name, (seconds, head) in results.items():
            with torch.no_grad():
                accuracy = (head(val_rows).argmax(1) == val_labels).float().mean().item()
            print(f"{name:44s}: {seconds:6.2f} s  {accuracy:6.1%} top-1 on {len(val_labels)} held-out images  "
                  f"speed vs the seed's way {seed_seconds / seconds:.2f}x")


if __name__ == "__main__":
    main()
