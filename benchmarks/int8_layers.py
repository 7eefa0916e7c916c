"""Where int8 gains and where it does not: ONNX Runtime's kernel time per kind of layer, fp32 against int8 (all
layers, and the shipped recipe with the stem and first block in fp32), same model, same batch, same threads.

Kernel times come from ONNX Runtime's own profiler (median per node over the profiled runs); images/s are timed
without the profiler in rotating best-of-N windows (benchmarks/timing.py).

    python benchmarks/int8_layers.py [--checkpoint runs/demo/checkpoints/best.pt] [--width 0.5] [--image-size 48]
                                     [--batch-size 32] [--runs 100] [--seconds 2] [--rounds 3]
"""

from __future__ import annotations

import json
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

from mobilenetv2 import MobileNetV2, load_model
from mobilenetv2.config import Preprocess
from mobilenetv2.deploy.export import check_images, export_onnx
from mobilenetv2.deploy.quantize import fp32_modules, leading_convolutions, write_int8
from timing import best_rates, cpu_line, timing_parser

KINDS = ("stem", "depthwise", "pointwise", "other")


def layer_kinds(model: MobileNetV2) -> list[str]:
    """The kind of each convolution in forward order (the order the exporter writes them)."""
    convolutions = [layer for layer in model.modules() if isinstance(layer, torch.nn.Conv2d)]
    return ["stem" if index == 0 else "depthwise" if layer.groups > 1 else "pointwise"
            for index, layer in enumerate(convolutions)]


def session(path: Path, threads: int, profile_prefix: str | None = None):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    if profile_prefix:
        options.enable_profiling, options.profile_file_prefix = True, profile_prefix
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def kernel_ms(path: Path, kinds: list[str], images, threads: int, runs: int, folder: Path) -> dict[str, float]:
    """Milliseconds per batch in each kind of layer: the median of each node's kernel time, summed per kind.
    Convolution nodes (fp32 Conv or int8 QLinearConv) are matched to `kinds` in graph order."""
    profiled = session(path, threads, str(folder / path.stem))
    for _ in range(runs):
        profiled.run(["logits"], {"input": images})
    events = json.loads(Path(profiled.end_profiling()).read_text())
    durations, operators = defaultdict(list), {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            node = int(event["args"]["node_index"])
            durations[node].append(event["dur"])
            operators[node] = event["args"]["op_name"]
    convolutions = [node for node in sorted(durations) if operators[node] in ("Conv", "QLinearConv")]
    if len(convolutions) != len(kinds):
        raise SystemExit(f"{path.name}: {len(convolutions)} convolution nodes for {len(kinds)} convolutions")
    kind_of = dict(zip(convolutions, kinds))
    totals = dict.fromkeys(KINDS, 0.0)
    for node, times in durations.items():
        totals[kind_of.get(node, "other")] += statistics.median(times) / 1000
    return totals


def add_model_arguments(parser) -> None:
    """The model options the int8 benchmarks share: a checkpoint, or the demo's shape freshly initialised."""
    parser.add_argument("--checkpoint", help="a trained model (default: a freshly initialised one)")
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=32)


def model_from(args) -> MobileNetV2:
    """The model `add_model_arguments`' options name, in eval mode (a fresh one seeded 0)."""
    if args.checkpoint:
        return load_model(args.checkpoint).eval()
    torch.manual_seed(0)
    return MobileNetV2(num_classes=10, width_mult=args.width,
                       preprocess=Preprocess.for_image_size(args.image_size)).eval()


def main() -> None:
    parser = timing_parser(__doc__.splitlines()[0], seconds=2.0)
    add_model_arguments(parser)
    parser.add_argument("--runs", type=int, default=100, help="profiled runs per model")
    args = parser.parse_args()
    print(cpu_line(), flush=True)
    torch.manual_seed(0)
    model = model_from(args)
    threads = torch.get_num_threads()
    size = model.preprocess.image_size
    images = torch.randn(args.batch_size, 3, size, size).numpy()
    kinds = layer_kinds(model)
    print(f"width {model.width_mult}, {size} px, batch {args.batch_size}, {threads} threads; ONNX Runtime kernel "
          f"ms per batch (median per node over {args.runs} profiled runs)")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = {"fp32": folder / "fp32.onnx"}
        export_onnx(model, files["fp32"], batch_size=1, dynamic_batch=True, onnx_exporter="auto")
        calibration = [check_images(model, 8).numpy()]  # speed does not depend on the calibration
        for name, keep in (("int8 all", "none"), ("int8 stem fp32", "stem")):
            files[name] = folder / f"{keep}.int8.onnx"
            write_int8(files["fp32"], files[name], calibration,
                       fp32_convolutions=leading_convolutions(model, fp32_modules(model, keep)))
        table = {name: kernel_ms(path, kinds, images, threads, args.runs, folder) for name, path in files.items()}
        sessions = {name: session(path, threads) for name, path in files.items()}
        rates = best_rates({name: (lambda s=s: s.run(["logits"], {"input": images})) for name, s in sessions.items()},
                           args.batch_size, args.seconds, args.rounds)
    print(f"{'layers':<12}" + "".join(f"{name:>22}" for name in files) + "   (int8: speed-up over fp32)")
    for kind in (*KINDS, "total"):
        values = {name: sum(times.values()) if kind == "total" else times[kind] for name, times in table.items()}
        print(f"{kind:<12}" + "".join(f"{cell(values[name], values['fp32'], name):>22}" for name in files))
    print(f"{'images/s':<12}" + "".join(f"{cell(rates[name], rates['fp32'], name, rate=True):>22}" for name in files))


def cell(value: float, fp32: float, name: str, rate: bool = False) -> str:
    text = f"{value:.0f}" if rate else f"{value:.3f}"
    if name == "fp32" or not value:
        return text
    return f"{text} ({(value / fp32 if rate else fp32 / value):.2f}x)"

if __name__ == "__main__":
    main()
