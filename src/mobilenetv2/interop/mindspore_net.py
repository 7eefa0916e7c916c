"""The seed's MobileNetV2 written in `mindspore.nn`, exported to MINDIR and run back with MindSpore's GraphCell.

It needs only mindspore and numpy (never torch, nor the rest of this package), so `export --format mindir` can run it
in a MindSpore environment of its own as a child process, talking through plain files: the seed-layout `.ckpt` we
write (`features.*`, `dense.*`), an input batch and the logits as `.npy`. Run as a script:

    python mindspore_net.py --checkpoint W.ckpt --classes N --width W --size S --input X.npy --output M.mindir
        --logits Y.npy [--softmax]

Exit 0 with Y.npy written, or 1 with one line on stderr saying what failed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SETTING = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def make_divisible(value: float, divisor: int = 8) -> int:
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def build(classes: int, width: float, softmax: bool):
    """The seed's network (its `MobileNetV2Backbone` + `MobileNetV2Head`) under the seed's parameter names; with
    `softmax`, its head ends in the Softmax the seed's export writes."""
    from mindspore import nn, ops

    class ConvBNReLU(nn.Cell):
        def __init__(self, inputs, outputs, kernel=3, stride=1, groups=1):
            super().__init__()
            conv = nn.Conv2d(inputs, outputs, kernel, stride, pad_mode="pad", padding=(kernel - 1) // 2,
                             group=groups, has_bias=False)
            self.features = nn.SequentialCell([conv, nn.BatchNorm2d(outputs), nn.ReLU6()])

        def construct(self, x):
            return self.features(x)

    class InvertedResidual(nn.Cell):
        def __init__(self, inputs, outputs, stride, expand):
            super().__init__()
            hidden = int(round(inputs * expand))
            self.use_residual = stride == 1 and inputs == outputs
            layers = [ConvBNReLU(inputs, hidden, kernel=1)] if expand != 1 else []
            layers += [ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
                       nn.Conv2d(hidden, outputs, 1, 1, has_bias=False), nn.BatchNorm2d(outputs)]
            self.conv = nn.SequentialCell(layers)

        def construct(self, x):
            return x + self.conv(x) if self.use_residual else self.conv(x)

    class MobileNetV2(nn.Cell):
        def __init__(self):
            super().__init__()
            channels = make_divisible(32 * width)
            layers = [ConvBNReLU(3, channels, stride=2)]
            for expand, c, repeats, stride in SETTING:
                outputs = make_divisible(c * width)
                for index in range(repeats):
                    layers.append(InvertedResidual(channels, outputs, stride if index == 0 else 1, expand))
                    channels = outputs
            last = make_divisible(1280 * max(1.0, width))
            layers.append(ConvBNReLU(channels, last, kernel=1))
            self.features = nn.SequentialCell(layers)
            self.mean = ops.ReduceMean(keep_dims=False)
            self.dense = nn.Dense(last, classes, has_bias=True)
            self.softmax = nn.Softmax() if softmax else None

        def construct(self, x):
            logits = self.dense(self.mean(self.features(x), (2, 3)))
            return self.softmax(logits) if self.softmax is not None else logits

    return MobileNetV2()


def export_and_run(checkpoint: Path, classes: int, width: float, size: int, inputs: Path, output: Path,
                   logits: Path, softmax: bool = False) -> None:
    """Load `checkpoint` into the seed's network (every parameter, strictly), export it to MINDIR at `output`
    (batch 1), load that file back and write its answers for the images in `inputs` to `logits`."""
    import mindspore as ms
    import numpy as np
    from mindspore import nn

    network = build(classes, width, softmax)
    missing, unused = ms.load_param_into_net(network, ms.load_checkpoint(str(checkpoint)), strict_load=True)
    if missing or unused:
        raise ValueError(f"the checkpoint does not fit the seed's network: missing {missing[:3]}, unused {unused[:3]}")
    network.set_train(False)
    ms.export(network, ms.Tensor(np.zeros((1, 3, size, size), np.float32)), file_name=str(output.with_suffix("")),
              file_format="MINDIR")
    graph = nn.GraphCell(ms.load(str(output)))
    images = np.load(inputs, allow_pickle=False).astype(np.float32)
    answers = [graph(ms.Tensor(image[None])).asnumpy() for image in images]  # the graph is exported for batch 1
    np.save(logits, np.concatenate(answers), allow_pickle=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("checkpoint", "input", "output", "logits"):
        parser.add_argument(f"--{name}", type=Path, required=True)
    parser.add_argument("--classes", type=int, required=True)
    parser.add_argument("--width", type=float, required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--softmax", action="store_true")
    args = parser.parse_args(argv)
    try:
        export_and_run(args.checkpoint, args.classes, args.width, args.size, args.input, args.output, args.logits,
                       args.softmax)
    except Exception as exc:  # noqa: BLE001 - one line for the parent, whatever MindSpore raised
        print(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
