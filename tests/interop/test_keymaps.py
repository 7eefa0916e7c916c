"""torchvision and timm state dicts renamed onto our keys give their source network's logits."""

import pytest
import torch

from mobilenetv2 import load_model
from mobilenetv2.errors import CheckpointError

from conftest import logits, randomise_batchnorm


@pytest.mark.parametrize("width", [0.5, 1.0, 1.4])
def test_torchvision_state_dict(tmp_path, width):
    import torchvision

    torch.manual_seed(1)
    source = randomise_batchnorm(torchvision.models.mobilenet_v2(num_classes=12, width_mult=width), seed=2)
    torch.save(source.state_dict(), tmp_path / "tv.pth")
    ours = load_model(tmp_path / "tv.pth")
    assert ours.width_mult == width and ours.num_classes == 12
    images = torch.randn(2, 3, 64, 64)
    assert (logits(ours, images) - logits(source, images)).abs().max() <= 1e-5


@pytest.mark.parametrize("variant,width", [("mobilenetv2_035", 0.35), ("mobilenetv2_050", 0.5),
                                           ("mobilenetv2_100", 1.0), ("mobilenetv2_140", 1.4)])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_state_dict(tmp_path, variant, width, suffix):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(3)
    source = randomise_batchnorm(timm.create_model(variant, pretrained=False, num_classes=9), seed=4)
    path = tmp_path / f"timm{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    ours = load_model(path)
    assert ours.width_mult == width
    images = torch.randn(2, 3, 64, 64)
    assert (logits(ours, images) - logits(source, images)).abs().max() <= 1e-5


@pytest.mark.parametrize("variant", ["mobilenetv2_110d", "mobilenetv2_120d"])
def test_timm_deeper_variants_are_refused(tmp_path, variant):
    import timm

    torch.save(timm.create_model(variant, pretrained=False).state_dict(), tmp_path / "deep.pth")
    with pytest.raises(CheckpointError, match="depth-multiplied variants"):
        load_model(tmp_path / "deep.pth")
