"""Depthwise weight gradients, layer by layer: the stock CPU kernel (oneDNN through `convolution_backward`) against
the batched matrix product that CPU training uses on the small maps where oneDNN has no depthwise kernel for it
(`cpu_autograd.DepthwiseTinyMapGrad`, `cpu_autograd.small_map`).

Every depthwise layer of the network at the chosen shape is timed both ways, taking turns, in channels-last (the CPU
default), up to 6x6 maps (the product grows with the square of the map; above that it is not timed); the last column
says which way training takes. The rule is one size for every CPU, so run this where a new
CPU turns up: with AVX2 kernels oneDNN falls back to a generic GEMM for the small maps (`ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2` shows the same kernels on an AVX-512 machine; `ONEDNN_VERBOSE=1` names them).
"""

from __future__ import annotations

import torch

from mobilenetv2.cpu_autograd import depthwise_weight_grad, small_map
from mobilenetv2.model import MobileNetV2
from timing import best_rates, cpu_line, timing_parser

SHAPES = {  # name: (image size, batch, width)
    "demo": (48, 128, 0.5),  # configs/fashion_mnist.yaml
    "quick": (32, 50, 0.35),  # demo --quick
    "224": (224, 32, 1.0),
    "tiny": (32, 8, 0.25),  # for the suite: that the script runs
}


def depthwise_layers(size: int, batch: int, width: float) -> list[tuple[torch.nn.Conv2d, torch.Size]]:
    """Each depthwise convolution of the network with the input shape it gets at `size` px."""
    network = MobileNetV2(num_classes=10, width_mult=width)
    seen = []
    hooks = [m.register_forward_hook(lambda m, inputs, _out: seen.append((m, inputs[0].shape)))
             for m in network.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    with torch.no_grad():
        network.eval()(torch.zeros(batch, 3, size, size))
    for hook in hooks:
        hook.remove()
    return seen


def main() -> None:
    parser = timing_parser(__doc__.splitlines()[0], seconds=0.3)
    parser.add_argument("--shapes", default="demo,quick,224", help=", ".join(SHAPES))
    args = parser.parse_args()
    print(cpu_line(f"best of {args.rounds} windows of {args.seconds:g} s", "channels-last, fp32"), flush=True)
    generator = torch.Generator().manual_seed(0)
    for shape in args.shapes.split(","):
        size, batch, width = SHAPES[shape]
        print(f"\n{shape}: {size} px, batch {batch}, width {width}")
        print("| input | stride | output map | stock ms | ours ms | ours vs stock | training takes |\n"
              "|---|---|---|---|---|---|---|")
        totals = {"stock": 0.0, "ours": 0.0, "chosen": 0.0}
        for conv, input_shape in depthwise_layers(size, batch, width):
            x = torch.randn(input_shape, generator=generator).contiguous(memory_format=torch.channels_last)
            weight = conv.weight.detach().contiguous(memory_format=torch.channels_last)
            out = torch.nn.functional.conv2d(x, weight, None, conv.stride, conv.padding, 1, conv.groups)
            grad = torch.randn(out.shape, generator=generator).contiguous(memory_format=torch.channels_last)
            runs = {
                "stock": lambda: torch.ops.aten.convolution_backward(
                    grad, x, weight, None, conv.stride, conv.padding, conv.dilation, False, (0, 0), conv.groups,
                    (False, True, False)),
                "ours": lambda: depthwise_weight_grad(x, grad, conv.stride, conv.padding, conv.kernel_size),
            }
            if input_shape[-2] * input_shape[-1] > 36:
                del runs["ours"]
            else:
                stock, ours = runs["stock"]()[1], runs["ours"]()
                error = (ours - stock).abs().max().item() / stock.abs().max().item()
                if error > 1e-4:
                    raise SystemExit(f"the two gradients differ at {tuple(input_shape)}: relative error {error:.1e}")
            rates = best_rates(runs, 1, args.seconds, args.rounds)
            ms = {name: 1e3 / rate for name, rate in rates.items()}
            rows, cols = out.shape[-2:]
            chosen = "ours" if small_map(conv, input_shape[-2], input_shape[-1]) else "stock"
            for name in ms:
                totals[name] += ms[name]
            totals["chosen"] += ms[chosen]
            ours_ms, ratio = (f"{ms['ours']:.3f}", f"{ms['stock'] / ms['ours']:.2f}x") if "ours" in ms else ("-", "-")
            print(f"| {tuple(input_shape)} | {conv.stride[0]} | {rows}x{cols} | {ms['stock']:.3f} | {ours_ms} "
                  f"| {ratio} | {chosen} |", flush=True)
        print(f"| all depthwise layers | | | {totals['stock']:.2f} | {totals['ours']:.2f} (where timed) | | "
              f"{totals['chosen']:.2f} ms: {totals['stock'] / totals['chosen']:.2f}x stock |")


if __name__ == "__main__":
    main()
