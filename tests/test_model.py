import copy
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import photo_batch
from mobilenetv2 import MobileNetV2, make_divisible
from mobilenetv2 import cpu_autograd
from mobilenetv2 import model as model_module
from mobilenetv2.model import InvertedResidual


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_match_the_seed():
    assert count(MobileNetV2(num_classes=1000, width_mult=1.0)) == 3_504_872
    assert count(MobileNetV2(num_classes=10, width_mult=0.5)) == 700_490


def test_make_divisible_never_rounds_down_more_than_ten_percent():
    assert make_divisible(32 * 0.35) == 16  # 11.2 -> 8 would lose 29 %
    assert make_divisible(1280 * 1.4) == 1792
    assert make_divisible(24 * 0.5) == 16
    assert make_divisible(96 * 0.75) == 72


@pytest.mark.parametrize("width,features", [(1.0, 1280), (0.5, 1280), (1.4, 1792)])
def test_backbone_and_head_split(width, features):
    model = MobileNetV2(num_classes=7, width_mult=width).eval()
    images = torch.randn(2, 3, 64, 64)
    feature_map = model.backbone(images)
    assert feature_map.shape == (2, features, 2, 2)
    pooled = model.features(images)
    assert pooled.shape == (2, features)
    torch.testing.assert_close(model.head(feature_map), model(images))
    torch.testing.assert_close(model.head.classify(pooled), model(images))
    assert len(model.backbone) == 19  # stem + 17 inverted residual blocks + last 1x1 conv


@pytest.mark.parametrize("size", [32, 64, 224])
def test_forward_at_several_resolutions(size):
    model = MobileNetV2(num_classes=5, width_mult=0.25).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, size, size))
    assert logits.shape == (1, 5) and torch.isfinite(logits).all()


def test_seed_initialisation():
    torch.manual_seed(0)
    model = MobileNetV2(num_classes=1000)
    stem = model.backbone[0][0]
    expected_std = math.sqrt(2.0 / (3 * 3 * stem.out_channels))
    assert abs(stem.weight.std().item() - expected_std) / expected_std < 0.1
    last_conv = model.backbone[18][0]
    expected_std = math.sqrt(2.0 / last_conv.out_channels)
    assert abs(last_conv.weight.std().item() - expected_std) / expected_std < 0.05
    assert abs(model.head.classifier.weight.std().item() - 0.01) < 0.001
    assert torch.all(model.head.classifier.bias == 0)
    bn = model.backbone[0][1]
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    assert bn.eps == 1e-5 and bn.momentum == 0.1


def test_residual_only_where_shapes_match():
    model = MobileNetV2(width_mult=1.0)
    residual = [block.use_residual for block in list(model.backbone)[1:18]]
    # per stage, repeats after the first keep their shape
    assert residual == [False, False, True, False, True, True, False, True, True, True, False, True, True,
                        False, True, True, False]


def test_invalid_arguments_are_refused():
    with pytest.raises(ValueError):
        MobileNetV2(num_classes=0)
    with pytest.raises(ValueError):
        MobileNetV2(width_mult=0)


# --- CPU training runs each block's ReLU6 in place on both passes (model._ReLU6OwningGrad) ---

def _photo_batch(photos, size=64):
    """Real photos, normalised, with labels of three classes."""
    images, labels = photo_batch(photos, size)
    return (images - 0.45) / 0.225, labels % 3


def _fast_and_stock(channels_last=True, off=("owning_relu6",), **kwargs):
    """The same network twice: one trains through the CPU path (the default), one with the switches `off` off, so
    what they switch runs through stock autograd."""
    torch.manual_seed(0)
    fast = MobileNetV2(num_classes=3, width_mult=0.5, **kwargs)
    stock = copy.deepcopy(fast)
    for block in stock.modules():
        if isinstance(block, InvertedResidual):
            for switch in off:
                setattr(block, switch, False)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return fast.to(memory_format=layout).train(), stock.to(memory_format=layout).train()


def _counting(monkeypatch, function=cpu_autograd.ReLU6OwningGrad):
    calls = []
    apply = function.apply
    monkeypatch.setattr(function, "apply", lambda *args: calls.append(1) or apply(*args))
    return calls


def _counting_both(monkeypatch):
    return _counting(monkeypatch), _counting(monkeypatch, cpu_autograd.DepthwiseTinyMapGrad)


@pytest.mark.parametrize("channels_last,drop_path,size,bf16", [
    (True, 0.0, 64, False), (False, 0.0, 64, False), (True, 0.3, 64, False),
    (True, 0.0, 32, False),  # 32 px: the last blocks' maps are 1x1
    (True, 0.0, 64, True),  # under bf16 autocast, as `--amp bf16` trains on a CPU
])
def test_owning_relu6_trains_exactly_as_stock_relu6(photos, monkeypatch, channels_last, drop_path, size, bf16):
    calls = _counting(monkeypatch)
    images, labels = _photo_batch(photos, size)
    fast, stock = _fast_and_stock(channels_last, drop_path=drop_path)
    results = []
    for network in (fast, stock):
        torch.manual_seed(1)  # the same images dropped by stochastic depth
        inputs = images.clone().requires_grad_()
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            logits = network(inputs)
        F.cross_entropy(logits.float(), labels).backward()
        results.append((logits.detach(), inputs.grad, [p.grad for p in network.parameters()], list(network.buffers())))
    inner = sum(isinstance(m, model_module.ConvBNReLU) for block in fast.modules()
                if isinstance(block, InvertedResidual) for m in block.conv)
    # the fast network took the in-place path in every block (at 32 px all but the 1x1 maps), the stock one never
    assert inner == 33 and (len(calls) == inner if size == 64 else 0 < len(calls) < inner)
    (logits, image_grad, grads, buffers), (stock_logits, stock_image_grad, stock_grads, stock_buffers) = results
    assert torch.equal(logits, stock_logits) and torch.equal(image_grad, stock_image_grad)
    assert all(torch.equal(a, b) for a, b in zip(grads, stock_grads))
    assert all(torch.equal(a, b) for a, b in zip(buffers, stock_buffers))  # BatchNorm statistics too


def test_the_cpu_path_stays_out_of_eval_no_grad_and_tracing(photos, monkeypatch):
    relu6_calls, depthwise_calls = _counting_both(monkeypatch)
    images, _ = _photo_batch(photos, size=32)
    fast, _stock = _fast_and_stock()
    fast.eval()(images).sum().backward()
    with torch.no_grad():
        fast.train()(images)
    torch.jit.trace(fast, images, check_trace=False)
    assert relu6_calls == [] and depthwise_calls == []
    fast(images).sum().backward()  # and it is there in training, or the above proves nothing
    assert relu6_calls and depthwise_calls


def test_torch_func_transforms_train_through_stock_autograd(photos, monkeypatch):
    relu6_calls, depthwise_calls = _counting_both(monkeypatch)
    images, labels = _photo_batch(photos, size=32)
    fast, stock = _fast_and_stock(off=("owning_relu6", "depthwise_small_maps"))
    grads = []
    for network in (fast, stock):
        params = {name: p.detach().clone() for name, p in network.named_parameters()}
        buffers = {name: b.clone() for name, b in network.named_buffers()}

        def loss(params, buffers, network=network):
            return F.cross_entropy(torch.func.functional_call(network, (params, buffers), (images,)), labels)

        grads.append(torch.func.grad(loss)(params, buffers))
    assert relu6_calls == depthwise_calls == [] and grads[0].keys() == grads[1].keys()
    assert all(torch.equal(grads[0][name], grads[1][name]) for name in grads[0])


def _grad_cam_hooks(network, kept):
    """What a Grad-CAM tool does: keep (not copy) the gradients of an inner activation, here the output of a block's
    expansion layer, seen from that layer and from the next layer's input."""
    block = network.backbone[2].conv

    def keep_output(module, inputs, output):
        output.register_hook(kept.append)

    def keep_input(module, inputs):
        inputs[0].register_hook(kept.append)

    block[0].register_forward_hook(keep_output)
    block[1].register_forward_pre_hook(keep_input)


def test_a_hook_inside_a_block_sees_the_true_gradient(photos):
    images, labels = _photo_batch(photos)
    kept = {"fast": [], "stock": []}
    fast, stock = _fast_and_stock()
    for name, network in (("fast", fast), ("stock", stock)):
        _grad_cam_hooks(network, kept[name])
        F.cross_entropy(network(images), labels).backward()
    assert len(kept["fast"]) == len(kept["stock"]) == 2
    for ours, theirs in zip(kept["fast"], kept["stock"]):
        assert torch.equal(ours, theirs)
        assert (ours != 0).float().mean() > 0.5  # gradients of the activation, not yet masked by ReLU6's derivative


def test_the_cpu_path_keeps_second_order_gradients(photos, monkeypatch):
    relu6_calls, depthwise_calls = _counting_both(monkeypatch)
    images, labels = _photo_batch(photos, size=48)  # 2x2 maps in the last blocks: the small-map depthwise gradient too
    fast, stock = _fast_and_stock(off=("owning_relu6", "depthwise_small_maps"))
    penalties = []
    for network in (fast, stock):
        inputs = images.clone().requires_grad_()
        loss = F.cross_entropy(network(inputs), labels)
        (image_grad,) = torch.autograd.grad(loss, inputs, create_graph=True)
        (loss + image_grad.square().sum()).backward()  # a gradient penalty: differentiates through both backwards
        penalties.append([p.grad for p in network.parameters()])
    assert relu6_calls and len(depthwise_calls) == 4
    for ours, theirs in zip(*penalties):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


# --- CPU training computes a depthwise weight gradient as a matrix product on maps oneDNN has no kernel for ---

@pytest.mark.parametrize("channels_last,size,taken", [
    (True, 48, 4),  # the demo's size: the last 4 depthwise layers (3x3 at stride 2, then 2x2)
    (False, 48, 4),
    (True, 32, 10),  # 2x2 and 1x1 maps (and a 4x4 one at stride 2, which keeps the stock kernel)
    (True, 80, 0),  # 3x3 at stride 1 at the least: stock
])
def test_depthwise_small_maps_trains_as_stock_does(photos, monkeypatch, channels_last, size, taken):
    calls = _counting(monkeypatch, cpu_autograd.DepthwiseTinyMapGrad)
    images, labels = _photo_batch(photos, size)
    fast, stock = _fast_and_stock(channels_last, off=("depthwise_small_maps",))
    results = []
    for network in (fast, stock):
        inputs = images.clone().requires_grad_()
        logits = network(inputs)
        F.cross_entropy(logits, labels).backward()
        results.append((logits.detach(), inputs.grad, dict(network.named_parameters()), list(network.buffers())))
    assert len(calls) == taken
    (logits, image_grad, params, buffers), (stock_logits, stock_image_grad, stock_params, stock_buffers) = results
    # the forward and every gradient but the depthwise weights' are stock kernels: equal bit for bit
    assert torch.equal(logits, stock_logits) and torch.equal(image_grad, stock_image_grad)
    assert all(torch.equal(a, b) for a, b in zip(buffers, stock_buffers))
    depthwise = {f"{name}.weight" for name, m in fast.named_modules()
                 if isinstance(m, torch.nn.Conv2d) and m.groups > 1}
    for name, param in params.items():
        theirs = stock_params[name].grad
        if name in depthwise:  # the same sums from the same tensors, in another order
            torch.testing.assert_close(param.grad, theirs, rtol=0, atol=1e-5 * theirs.abs().max().item(), msg=name)
        else:
            assert torch.equal(param.grad, theirs), name


@pytest.mark.parametrize("height,width,stride", [(2, 2, 1), (1, 1, 1), (2, 2, 2), (2, 1, 1), (3, 3, 2), (5, 4, 1)])
@pytest.mark.parametrize("channels_last", [True, False])
def test_depthwise_weight_grad_is_as_accurate_as_stock(photos, height, width, stride, channels_last):
    """The batched product against oneDNN's kernel and float64, on real pixels: 48 channels of small patches of
    photos (both kernels are given the same float32 tensors; float64 is the truth)."""
    images, _ = photo_batch(photos, 64)  # (6, 3, 64, 64)
    patches = images.unfold(2, height, 16).unfold(3, width, 16)  # (6, 3, 4, 4, height, width)
    x = patches.permute(0, 2, 1, 3, 4, 5).reshape(6, 48, height, width)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = ((x - 0.45) / 0.225).contiguous(memory_format=layout)
    weight = torch.randn(48, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    out = F.conv2d(x, weight, None, stride, 1, 1, 48)
    grad = (out.tanh() - 0.1 * out).contiguous(memory_format=layout)  # a gradient that depends on the input

    def onednn(grad, x, weight):
        return torch.ops.aten.convolution_backward(grad, x, weight, None, (stride,) * 2, (1, 1), (1, 1), False,
                                                   (0, 0), 48, (False, True, False))[1]

    ours = cpu_autograd.depthwise_weight_grad(x, grad, (stride, stride), (1, 1), (3, 3))
    stock, truth = onednn(grad, x, weight), onednn(grad.double(), x.double(), weight.double())
    scale = truth.abs().max().item()
    assert ours.shape == truth.shape and scale > 1.0
    assert (ours.double() - truth).abs().max().item() <= max(4 * (stock.double() - truth).abs().max().item(),
                                                             1e-6 * scale)


def test_depthwise_small_maps_stays_out_of_autocast(photos, monkeypatch):
    calls = _counting(monkeypatch, cpu_autograd.DepthwiseTinyMapGrad)
    images, labels = _photo_batch(photos, size=48)
    fast, _stock = _fast_and_stock()
    with torch.autocast("cpu", torch.bfloat16):
        logits = fast(images)
        # a float32 map reaching a depthwise layer under autocast (here the blocks' inputs are bfloat16 already)
        conv = fast.backbone[16].conv[1][0]
        small = images[:, :1, :2, :2].expand(-1, conv.in_channels, -1, -1).contiguous().requires_grad_()
        out = cpu_autograd.depthwise(conv, small)
    (F.cross_entropy(logits.float(), labels) + out.float().mean()).backward()
    assert calls == [] and all(p.grad is not None for p in fast.parameters()) and small.grad is not None


@pytest.mark.parametrize("bias,padding_mode", [(True, "zeros"), (False, "reflect")])
def test_a_depthwise_layer_with_a_bias_or_another_padding_keeps_its_module(photos, bias, padding_mode):
    """`depthwise` stands for `conv(x)`: a layer the product does not model (a bias, non-zero padding) is left whole."""
    images, _ = _photo_batch(photos, size=32)
    conv = torch.nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=bias, padding_mode=padding_mode)
    if bias:
        torch.nn.init.normal_(conv.bias)  # a bias the output shows
    small = images[:, :1, :2, :2].expand(-1, 16, -1, -1).contiguous()
    assert cpu_autograd.small_map(conv, 2, 2)
    assert torch.equal(cpu_autograd.depthwise(conv, small), conv(small))
