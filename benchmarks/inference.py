"""Inference images/s on CPU: torch eager (NCHW and channels-last) against onnxruntime, at batch 1 and 32, same run.

    python benchmarks/inference.py [--width 1.0] [--image-size 224] [--seconds 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from mobilenetv2 import MobileNetV2
from mobilenetv2.config import Preprocess
from mobilenetv2.export import export_onnx


def rate(run, batch: int, seconds: float) -> float:
    run()
    run()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        run()
        count += batch
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    import onnxruntime

    torch.manual_seed(0)
    model = MobileNetV2(num_classes=1000, width_mult=args.width).eval()
    model.preprocess = Preprocess.for_image_size(args.image_size)
    model.class_names = None
    channels_last = MobileNetV2(num_classes=1000, width_mult=args.width).eval()
    channels_last.load_state_dict(model.state_dict())
    channels_last = channels_last.to(memory_format=torch.channels_last)
    print(f"width {args.width}, {args.image_size} px, torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(model, path, dynamic_batch=True)
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for batch in (1, 32):
            images = torch.randn(batch, 3, args.image_size, args.image_size)
            images_cl = images.contiguous(memory_format=torch.channels_last)
            array = images.numpy()
            with torch.inference_mode():
                eager = rate(lambda: model(images), batch, args.seconds)
                eager_cl = rate(lambda: channels_last(images_cl), batch, args.seconds)
            ort = rate(lambda: session.run(None, {"input": array}), batch, args.seconds)
            print(f"batch {batch:2d}: eager NCHW {eager:7.1f}/s, eager channels-last {eager_cl:7.1f}/s "
                  f"({eager_cl / eager:.2f}x), onnxruntime {ort:7.1f}/s ({ort / eager:.2f}x vs eager NCHW)")


if __name__ == "__main__":
    main()
