"""Images/s per core of the seed's transforms on real JPEGs, side by side in one run: torchvision's standard PIL
pipeline (full-size decode, then v2 transforms) against ours (the crop or resize chosen first, then a decode no
larger than it needs; training in uint8 up to the batch's normalisation) and our device backend run on the CPU
(decode_jpeg on a batch, batch transforms). Every path is timed per batch of 32, collated and normalised, so work
that ours moves from the workers to the batch is counted. One process, one thread: per-core figures.

    python benchmarks/data_pipeline.py [--images 400] [--size 500x375] [--seconds 4] [--rounds 3]
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torchvision import datasets
from torchvision.transforms import v2 as T

from mobilenetv2.config import Preprocess
from mobilenetv2.data.batched import normalize_bytes
from mobilenetv2.data.folders import collate_skipping, image_folder
from mobilenetv2.data.on_device import DeviceEvalTransform, DeviceTrainAugment, EncodedFolder, decode_batch
from mobilenetv2.data.synthetic import write_synthetic
from mobilenetv2.data.transforms import eval_transform, train_transform
from timing import best_rates, cpu_line, timing_parser


def standard_train(preprocess: Preprocess) -> T.Compose:
    return T.Compose([T.RandomResizedCrop(preprocess.image_size, antialias=True), T.RandomHorizontalFlip(),
                      T.ColorJitter(0.4, 0.4, 0.4), T.ToImage(), T.ToDtype(torch.float32, scale=True),
                      T.Normalize(preprocess.mean, preprocess.std)])


def standard_eval(preprocess: Preprocess) -> T.Compose:
    return T.Compose([T.Resize(preprocess.resize_size, antialias=True), T.CenterCrop(preprocess.image_size),
                      T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(preprocess.mean, preprocess.std)])


def device_batches(dataset, transform, batch_size: int = 32):
    """Our device backend on the CPU: bytes read, the batch decoded by decode_jpeg, transformed as a batch."""
    position = [0]

    def next_batch():
        items = [dataset[(position[0] + i) % len(dataset)] for i in range(batch_size)]
        position[0] += batch_size
        images, _failed = decode_batch([data for data, _label, _path in items], torch.device("cpu"))
        transform(images)

    return next_batch


def collated(dataset, preprocess: Preprocess | None = None, batch_size: int = 32):
    """One collated batch per call, round and round the dataset; uint8 batches normalised as the training device
    does (`preprocess` given)."""
    position = [0]

    def next_batch():
        items = [dataset[(position[0] + i) % len(dataset)] for i in range(batch_size)]
        position[0] += batch_size
        images, _labels, _skipped = collate_skipping(items)
        if preprocess is not None:
            normalize_bytes(images, preprocess)

    return next_batch


def main() -> None:
    parser = timing_parser(__doc__.splitlines()[0], seconds=4.0)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--size", default="500x375", help="typical JPEG size (ImageNet's average is about 500x375)")
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    print(cpu_line(), flush=True)
    torch.set_num_threads(1)
    preprocess = Preprocess.for_image_size(args.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        train = write_synthetic(Path(tmp) / "jpegs", images=args.images, size=args.size, val_fraction=0) / "train"
        runs = {
            "standard train": collated(datasets.ImageFolder(str(train), standard_train(preprocess))),
            "ours train": collated(image_folder(train, train_transform(preprocess, normalized=False)), preprocess),
            "standard eval": collated(datasets.ImageFolder(str(train), standard_eval(preprocess))),
            "ours eval": collated(image_folder(train, eval_transform(preprocess))),
        }
        rates = best_rates(runs, 32, args.seconds, args.rounds)
        encoded = image_folder(train, None, kind=EncodedFolder)
        rates.update(best_rates({"device train": device_batches(encoded, DeviceTrainAugment(preprocess)),
                                 "device eval": device_batches(encoded, DeviceEvalTransform(preprocess))},
                                32, args.seconds, args.rounds))
    print(f"{args.images} synthetic JPEGs of about {args.size}, output {args.image_size} px, one thread, "
          f"best of {args.rounds} windows of {args.seconds:g} s")
    for kind in ("train", "eval"):
        standard, ours, device = rates[f"standard {kind}"], rates[f"ours {kind}"], rates[f"device {kind}"]
        print(f"{kind:5s}: torchvision standard {standard:6.1f} images/s per core, ours pil {ours:6.1f} "
              f"({ours / standard:.2f}x), ours device backend on CPU {device:6.1f} ({device / standard:.2f}x)")


if __name__ == "__main__":
    main()
