import math

import pytest
import torch

from mobilenetv2 import MobileNetV2, make_divisible


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
