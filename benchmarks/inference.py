"""Inference images/s on CPU: torch eager (NCHW and channels-last) against onnxruntime, at batch 1 and 32, same run.
onnxruntime's headline ratio is against channels-last eager, the memory format torch runs MobileNetV2 fastest in.

Timing: rotating best-of-N windows (benchmarks/timing.py).

    python benchmarks/inference.py [--width 1.0] [--image-size 224] [--seconds 2] [--rounds 3]
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from mobilenetv2 import MobileNetV2
from mobilenetv2.config import Preprocess
from mobilenetv2.deploy.export import export_onnx
from timing import best_rates, cpu_line, timing_parser


def main() -> None:
    parser = timing_parser(__doc__.splitlines()[0], seconds=2.0)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    print(cpu_line(), flush=True)
    import onnxruntime

    torch.manual_seed(0)
    model = MobileNetV2(num_classes=1000, width_mult=args.width,
                        preprocess=Preprocess.for_image_size(args.image_size)).eval()
    channels_last = MobileNetV2(num_classes=1000, width_mult=args.width).eval()
    channels_last.load_state_dict(model.state_dict())
    channels_last = channels_last.to(memory_format=torch.channels_last)
    print(f"width {args.width}, {args.image_size} px, torch threads {torch.get_num_threads()}, "
          f"best of {args.rounds} windows of {args.seconds:g} s")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(model, path, dynamic_batch=True, onnx_exporter="auto")
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = torch.get_num_threads()  # the same cores as torch
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for batch in (1, 32):
            images = torch.randn(batch, 3, args.image_size, args.image_size)
            images_cl = images.contiguous(memory_format=torch.channels_last)
            array = images.numpy()
            with torch.inference_mode():
                rates = best_rates({"eager": lambda: model(images), "eager_cl": lambda: channels_last(images_cl),
                                    "ort": lambda: session.run(None, {"input": array})}, batch, args.seconds,
                                   args.rounds)
            eager = rates["eager"]
            print(f"batch {batch:2d}: eager NCHW {eager:7.1f}/s, eager channels-last {rates['eager_cl']:7.1f}/s "
                  f"({rates['eager_cl'] / eager:.2f}x), onnxruntime {rates['ort']:7.1f}/s "
                  f"({rates['ort'] / rates['eager_cl']:.2f}x vs the faster torch row, channels-last; "
                  f"{rates['ort'] / eager:.2f}x vs NCHW)")


if __name__ == "__main__":
    main()
