"""What int8 gains on this CPU with nothing around it: the model's pointwise convolutions as bare GEMMs, fp32 (MatMul:
MLAS SGEMM) against int8 (MatMulInteger: MLAS's uint8 x int8 GEMM, no requantization), same shapes, same threads,
same run.

The pointwise convolutions are most of MobileNetV2's arithmetic and the part int8 speeds up most. Where even this
ratio is under 2x, an int8 model reaching 2x fp32 would need int8 kernels faster than ONNX Runtime's own GEMM
(benchmarks/int8_layers.py gives the in-model kernel times to set beside it).

    python benchmarks/int8_ceiling.py [--checkpoint runs/demo/checkpoints/best.pt] [--width 0.5] [--image-size 48]
                                      [--batch-size 32] [--seconds 1] [--rounds 5]
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from int8_layers import add_model_arguments, model_from
from mobilenetv2 import MobileNetV2
from timing import best_rates, cpu_line, timing_parser


def pointwise_shapes(model: MobileNetV2) -> list[tuple[int, int, int, int]]:
    """(height, width, input channels, output channels) of each 1x1 convolution."""
    shapes, hooks = [], []
    for layer in model.modules():
        if isinstance(layer, torch.nn.Conv2d) and layer.kernel_size == (1, 1) and layer.groups == 1:
            hooks.append(layer.register_forward_hook(lambda layer, inputs, output: shapes.append(
                (*output.shape[2:], layer.in_channels, layer.out_channels))))
    size = model.preprocess.image_size
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    return shapes


def pointwise_graph(shapes: list[tuple[int, int, int, int]], batch_size: int, int8: bool,
                    path: Path) -> dict[str, np.ndarray]:
    """One ONNX graph holding every pointwise layer of `shapes` side by side as GEMMs, fp32 or `int8`, inputs fed
    and weights constant; returns its feed."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inputs, outputs, weights, feed = [], [], [], [], {}
    for index, (height, width, inner, columns) in enumerate(shapes):
        rows = batch_size * height * width
        if int8:
            feed[f"a{index}"] = rng.integers(0, 256, (rows, inner), dtype=np.uint8)
            weight = rng.integers(-127, 128, (inner, columns), dtype=np.int8)
            nodes.append(helper.make_node("MatMulInteger", [f"a{index}", f"w{index}"], [f"y{index}"]))
        else:
            feed[f"a{index}"] = rng.standard_normal((rows, inner), dtype=np.float32)
            weight = rng.standard_normal((inner, columns), dtype=np.float32)
            nodes.append(helper.make_node("MatMul", [f"a{index}", f"w{index}"], [f"y{index}"]))
        element = TensorProto.UINT8 if int8 else TensorProto.FLOAT
        inputs.append(helper.make_tensor_value_info(f"a{index}", element, [rows, inner]))
        outputs.append(helper.make_tensor_value_info(f"y{index}", TensorProto.INT32 if int8 else TensorProto.FLOAT,
                                                     [rows, columns]))
        weights.append(numpy_helper.from_array(weight, f"w{index}"))
    graph = helper.make_graph(nodes, "pointwise", inputs, outputs, weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return feed


def main() -> None:
    parser = timing_parser(__doc__.splitlines()[0], seconds=1.0)
    parser.set_defaults(rounds=5)
    add_model_arguments(parser)
    args = parser.parse_args()
    print(cpu_line(), flush=True)
    import onnxruntime

    model = model_from(args)
    shapes = pointwise_shapes(model)
    threads = torch.get_num_threads()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, int8 in (("fp32 MatMul", False), ("int8 MatMulInteger", True)):
            path = Path(tmp) / f"{int8}.onnx"
            feed = pointwise_graph(shapes, args.batch_size, int8, path)
            session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            runs[name] = lambda session=session, feed=feed: session.run(None, feed)
        rates = best_rates(runs, args.batch_size, args.seconds, args.rounds)
    macs = sum(height * width * inner * columns for height, width, inner, columns in shapes)
    print(f"width {model.width_mult}, {model.preprocess.image_size} px, batch {args.batch_size}, {threads} threads: "
          f"{len(shapes)} pointwise GEMMs, {macs / 1e6:.2f} M multiply-adds per image")
    for name, rate in rates.items():
        print(f"{name:<20} {rate:>10.0f} images/s  {rate * macs / 1e9:6.1f} G multiply-adds/s")
    print(f"int8 GEMM over fp32 GEMM: {rates['int8 MatMulInteger'] / rates['fp32 MatMul']:.2f}x")


if __name__ == "__main__":
    main()
