import copy
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import photo_batch
from mobilenetv2 import MobileNetV2, make_divisible
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


def _fast_and_stock(channels_last=True, **kwargs):
    """The same network twice: one trains through the owning ReLU6 (the default), one through stock autograd."""
    torch.manual_seed(0)
    fast = MobileNetV2(num_classes=3, width_mult=0.5, **kwargs)
    stock = copy.deepcopy(fast)
    for block in stock.modules():
        if isinstance(block, InvertedResidual):
            block.owning_relu6 = False
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return fast.to(memory_format=layout).train(), stock.to(memory_format=layout).train()


def _counting(monkeypatch):
    calls = []
    apply = model_module._ReLU6OwningGrad.apply
    monkeypatch.setattr(model_module._ReLU6OwningGrad, "apply", lambda x: calls.append(1) or apply(x))
    return calls


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


def test_owning_relu6_stays_out_of_eval_no_grad_and_tracing(photos, monkeypatch):
    calls = _counting(monkeypatch)
    images, _ = _photo_batch(photos, size=32)
    fast, _stock = _fast_and_stock()
    fast.eval()(images).sum().backward()
    with torch.no_grad():
        fast.train()(images)
    torch.jit.trace(fast, images, check_trace=False)
    assert calls == []


def test_torch_func_transforms_train_through_stock_relu6(photos, monkeypatch):
    calls = _counting(monkeypatch)
    images, labels = _photo_batch(photos, size=32)
    fast, stock = _fast_and_stock()
    grads = []
    for network in (fast, stock):
        params = {name: p.detach().clone() for name, p in network.named_parameters()}
        buffers = {name: b.clone() for name, b in network.named_buffers()}

        def loss(params, buffers, network=network):
            return F.cross_entropy(torch.func.functional_call(network, (params, buffers), (images,)), labels)

        grads.append(torch.func.grad(loss)(params, buffers))
    assert calls == [] and grads[0].keys() == grads[1].keys()
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


def test_owning_relu6_keeps_second_order_gradients(photos):
    images, labels = _photo_batch(photos, size=48)
    fast, stock = _fast_and_stock()
    penalties = []
    for network in (fast, stock):
        inputs = images.clone().requires_grad_()
        loss = F.cross_entropy(network(inputs), labels)
        (image_grad,) = torch.autograd.grad(loss, inputs, create_graph=True)
        (loss + image_grad.square().sum()).backward()  # a gradient penalty: differentiates through ReLU6's backward
        penalties.append([p.grad for p in network.parameters()])
    for ours, theirs in zip(*penalties):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
