"""Check a `mobilenetv2 export --format mindspore` file with real MindSpore (never a dependency of the package).

Run it from a separate virtual environment:
    python3 -m venv /tmp/msvenv && /tmp/msvenv/bin/pip install mindspore==2.10.0
    /tmp/msvenv/bin/python tools/check_mindspore_export.py EXPORT.ckpt INPUT.npy EXPECTED_LOGITS.npy [CLASSES WIDTH]
It builds the seed's network in MindSpore, loads the checkpoint with `load_checkpoint` / `load_param_into_net`,
runs it in eval mode and prints the largest difference from the expected logits.
"""
import sys
import numpy as np
import mindspore as ms
from mindspore import nn, ops

def make_divisible(v, d=8):
    n = max(d, int(v + d / 2) // d * d)
    return n + d if n < 0.9 * v else n

class ConvBNReLU(nn.Cell):
    def __init__(self, i, o, k=3, s=1, g=1):
        super().__init__()
        p = (k - 1) // 2
        conv = nn.Conv2d(i, o, k, s, pad_mode="pad", padding=p, group=g, has_bias=False)
        self.features = nn.SequentialCell([conv, nn.BatchNorm2d(o), nn.ReLU6()])
    def construct(self, x):
        return self.features(x)

class InvertedResidual(nn.Cell):
    def __init__(self, i, o, s, t):
        super().__init__()
        h = int(round(i * t))
        self.res = s == 1 and i == o
        layers = [ConvBNReLU(i, h, k=1)] if t != 1 else []
        layers += [ConvBNReLU(h, h, s=s, g=h), nn.Conv2d(h, o, 1, 1, has_bias=False), nn.BatchNorm2d(o)]
        self.conv = nn.SequentialCell(layers)
    def construct(self, x):
        return x + self.conv(x) if self.res else self.conv(x)

class Net(nn.Cell):
    def __init__(self, classes, w):
        super().__init__()
        c = make_divisible(32 * w)
        layers = [ConvBNReLU(3, c, s=2)]
        for t, ch, n, s in [(1,16,1,1),(6,24,2,2),(6,32,3,2),(6,64,4,2),(6,96,3,1),(6,160,3,2),(6,320,1,1)]:
            o = make_divisible(ch * w)
            for k in range(n):
                layers.append(InvertedResidual(c, o, s if k == 0 else 1, t)); c = o
        last = make_divisible(1280 * max(1.0, w))
        layers.append(ConvBNReLU(c, last, k=1))
        self.features = nn.SequentialCell(layers)
        self.dense = nn.Dense(last, classes, has_bias=True)
        self.mean = ops.ReduceMean(keep_dims=False)
    def construct(self, x):
        return self.dense(self.mean(self.features(x), (2, 3)))

ckpt, inputs, logits = sys.argv[1:4]
classes, width = (int(sys.argv[4]), float(sys.argv[5])) if len(sys.argv) > 5 else (10, 0.5)
net = Net(classes, width)
params = ms.load_checkpoint(ckpt)
missing = ms.load_param_into_net(net, params)
print("not loaded:", missing)
net.set_train(False)
out = net(ms.Tensor(np.load(inputs))).asnumpy()
print("max abs difference vs the seed's logits:", np.abs(out - np.load(logits)).max())
