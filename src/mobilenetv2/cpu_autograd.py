"""Autograd functions for training the network on a CPU, where PyTorch's stock kernels waste time: ReLU6 in place
on both passes, and the weight gradient of a depthwise convolution on the small maps oneDNN has no depthwise kernel
for. Each computes what stock autograd computes; `model.InvertedResidual` decides where they may run.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F


class ReLU6OwningGrad(torch.autograd.Function):
    """ReLU6 for an activation only its block reads. Forward clamps in place (the BatchNorm output it gets is read
    by nothing else); backward masks the incoming gradient in place, since the next convolution's backward hands
    it a fresh tensor nobody else holds. Same arithmetic as `nn.ReLU6(inplace=True)`, two tensor-sized memory
    passes less per layer: `hardtanh_` with autograd clones its input first, and its backward allocates a new one."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x.clamp_(0.0, 6.0)
        ctx.mark_dirty(x)
        ctx.save_for_backward(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (result,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the gradient itself is differentiated, so leave it whole
            return torch.ops.aten.hardtanh_backward(grad, result, 0.0, 6.0)
        return torch.ops.aten.hardtanh_backward.grad_input(grad, result, 0.0, 6.0, grad_input=grad)


class DepthwiseTinyMapGrad(torch.autograd.Function):
    """A depthwise convolution whose weight gradient is a batched matrix product (`depthwise_weight_grad`), for the
    small maps where oneDNN has no depthwise weight-gradient kernel (`small_map`): there it takes a generic GEMM (AVX2
    at 2x2, every CPU at 1x1; 2-20 ms a layer at the demo's shapes) or a generic convolution (AVX-512 at 2x2, 3x3 at
    stride 2; about 1-2 ms), where the product takes 0.03-0.4 ms on a 2-core VM
    (`benchmarks/depthwise_grad.py`). The forward and the input gradient are the stock kernels; the weight gradient is
    the same sum in another order (float noise)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int],
                padding: tuple[int, int]) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.geometry = stride, padding
        return F.conv2d(x, weight, None, stride, padding, 1, weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        stride, padding = ctx.geometry
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(grad, x, weight, None, stride, padding, (1, 1), False, (0, 0),
                                                         weight.shape[0], (True, False, False))[0]
        if ctx.needs_input_grad[1]:
            grad_weight = depthwise_weight_grad(x, grad, stride, padding, weight.shape[-2:])
        return grad_x, grad_weight, None, None


def depthwise_weight_grad(x: torch.Tensor, grad: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
                          kernel: Sequence[int]) -> torch.Tensor:
    """d(loss)/d(weight) of a depthwise convolution on a small map: every input position times every output position,
    summed over the batch per channel (one batched matrix product), then each tap sums the pairs it connects."""
    batch, channels, height, width = x.shape
    rows, cols = grad.shape[-2:]
    inputs = x.permute(1, 2, 3, 0).contiguous().view(channels, height * width, batch)
    grads = grad.permute(1, 0, 2, 3).contiguous().view(channels, batch, rows * cols)
    pairs = torch.bmm(inputs, grads).view(channels, -1)
    taps = _tap_pairs(height, width, rows, cols, tuple(stride), tuple(padding), tuple(kernel))
    return (pairs @ taps.to(pairs)).view(channels, 1, *kernel)


@functools.lru_cache(maxsize=64)
def _tap_pairs(height: int, width: int, rows: int, cols: int, stride: tuple[int, int], padding: tuple[int, int],
               kernel: tuple[int, int]) -> torch.Tensor:
    """(input position, output position) x tap: 1 where the tap joins the two (0 for the padding)."""
    pairs = torch.zeros(height, width, rows, cols, *kernel)
    for row, col, i, j in itertools.product(range(rows), range(cols), range(kernel[0]), range(kernel[1])):
        y, x = row * stride[0] + i - padding[0], col * stride[1] + j - padding[1]
        if 0 <= y < height and 0 <= x < width:
            pairs[y, x, row, col, i, j] = 1.0
    return pairs.view(height * width * rows * cols, kernel[0] * kernel[1])


def small_map(conv: nn.Conv2d, height: int, width: int) -> bool:
    """Whether a depthwise layer on a height x width map is where oneDNN has no depthwise weight-gradient kernel:
    a map no larger than the kernel giving an output of 2x2 or less (`ONEDNN_VERBOSE=1` names the kernels). There
    DepthwiseTinyMapGrad was faster with AVX2 and AVX-512 kernels, channels-last and NCHW, at every shape measured;
    from a 4x4 map, or a 3x3 one at stride 1, oneDNN's depthwise kernel is (`benchmarks/depthwise_grad.py`)."""
    (kernel_rows, kernel_cols), (step_rows, step_cols) = conv.kernel_size, conv.stride
    rows = (height + 2 * conv.padding[0] - kernel_rows) // step_rows + 1
    cols = (width + 2 * conv.padding[1] - kernel_cols) // step_cols + 1
    return height <= kernel_rows and width <= kernel_cols and rows * cols <= 4


def depthwise(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)` for a block's depthwise layer, through DepthwiseTinyMapGrad on a `small_map` (which knows neither a
    bias nor a padding mode other than zeros: a layer with either keeps its module)."""
    if (not small_map(conv, x.shape[-2], x.shape[-1]) or x.dtype != conv.weight.dtype
            or torch.is_autocast_enabled("cpu") or conv.dilation != (1, 1) or conv.bias is not None
            or conv.padding_mode != "zeros"):
        return conv(x)
    return DepthwiseTinyMapGrad.apply(x, conv.weight, conv.stride, conv.padding)
