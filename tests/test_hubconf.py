"""The torch.hub entry."""


import torch

from conftest import MS_CHECKPOINT, MS_INPUT, REPO, assert_parity


def test_torch_hub_entry(tmp_path):
    model = torch.hub.load(str(REPO), "mobilenet_v2", source="local", num_classes=10, width_mult=0.5,
                           weights=str(MS_CHECKPOINT))
    with torch.no_grad():
        assert_parity(model(torch.from_numpy(MS_INPUT)))
    backbone = torch.hub.load(str(REPO), "mobilenet_v2", source="local", width_mult=0.5, include_top=False)
    assert backbone(torch.zeros(1, 3, 64, 64)).shape == (1, 1280, 2, 2)
    fresh = torch.hub.load(str(REPO), "mobilenet_v2", source="local")
    assert sum(p.numel() for p in fresh.parameters()) == 3_504_872
