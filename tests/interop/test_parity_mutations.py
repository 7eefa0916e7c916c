"""The parity checks can fail: each fault a weight reader or the network could have is planted on the real MindSpore
fixture, and the check that guards against it must then reject the result."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from mobilenetv2 import load_model

from conftest import MS_CHECKPOINT, MS_INPUT, PARITY_TOLERANCE, fp16_rounded, logits, parity_error

IMAGES = torch.from_numpy(MS_INPUT)


@pytest.fixture(scope="module")
def reference():
    return load_model(MS_CHECKPOINT)


def convs(model):
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def batchnorms(model):
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def mutated(reference, mutate):
    model = copy.deepcopy(reference)
    with torch.no_grad():
        mutate(model)
    return model


def test_the_unmutated_network_passes(reference):
    assert parity_error(logits(reference, IMAGES)) <= PARITY_TOLERANCE
    assert len(convs(reference)) == 52 and len(batchnorms(reference)) == 52


def test_shuffled_output_channels_of_any_conv_are_caught(reference):
    missed = []
    for index in range(52):
        def roll(model, index=index):
            weight = convs(model)[index].weight
            weight.copy_(weight.roll(1, dims=0))
        if parity_error(logits(mutated(reference, roll), IMAGES)) <= PARITY_TOLERANCE:
            missed.append(index)
    assert missed == []


def test_beta_moving_mean_swap_in_any_batchnorm_is_caught(reference):
    missed = []
    for index in range(52):
        def swap(model, index=index):
            bn = batchnorms(model)[index]
            bias = bn.bias.clone()
            bn.bias.copy_(bn.running_mean)
            bn.running_mean.copy_(bias)
        if parity_error(logits(mutated(reference, swap), IMAGES)) <= PARITY_TOLERANCE:
            missed.append(index)
    assert missed == []


def test_stem_without_padding_is_caught(reference):
    def no_padding(model):
        model.backbone[0][0].padding = (0, 0)
    assert parity_error(logits(mutated(reference, no_padding), IMAGES)) > PARITY_TOLERANCE


def test_relu_instead_of_relu6_in_early_blocks_is_caught(reference):
    def relu(model):
        for block in list(model.backbone)[:11]:
            for name, child in list(block.named_modules()):
                if isinstance(child, nn.ReLU6):
                    parent = block.get_submodule(name.rpartition(".")[0]) if "." in name else block
                    setattr(parent, name.rpartition(".")[2], nn.ReLU())
    model = mutated(reference, relu)
    assert not any(isinstance(m, nn.ReLU6) for block in list(model.backbone)[:11] for m in block.modules())
    assert parity_error(logits(model, IMAGES)) > PARITY_TOLERANCE


def test_an_output_that_ignores_its_input_is_caught(reference):
    first = logits(reference, IMAGES[:1])
    assert parity_error(first.expand(2, -1)) > PARITY_TOLERANCE  # right for one photo, the same for both


def test_the_fp16_check_catches_every_single_layer_swap():
    """The fp16 path is checked exactly against the fp16-rounded network; any swap must break that."""
    rounded = fp16_rounded(MS_CHECKPOINT)
    expected = logits(rounded, IMAGES)
    missed = []
    for index in range(52):
        model = copy.deepcopy(rounded)
        with torch.no_grad():
            bn = batchnorms(model)[index]
            bias = bn.bias.clone()
            bn.bias.copy_(bn.running_mean)
            bn.running_mean.copy_(bias)
        if torch.equal(logits(model, IMAGES), expected):
            missed.append(index)
    assert missed == []
    assert not np.array_equal(expected.numpy(), logits(load_model(MS_CHECKPOINT), IMAGES).numpy())
