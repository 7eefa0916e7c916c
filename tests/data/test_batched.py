"""Whole-batch augmentation of in-memory datasets."""

import torch

from mobilenetv2.config import Preprocess
from mobilenetv2.data.batched import BatchAugment


def test_batch_augment_draws_per_image(photos):
    torch.manual_seed(0)
    image = torch.from_numpy(photos["chelsea"][:256, :256]).permute(2, 0, 1)
    batch = image.expand(8, -1, -1, -1).contiguous()
    out = BatchAugment(Preprocess.for_image_size(64), min_scale=0.3, color_jitter=0.4)(batch)
    assert out.shape == (8, 3, 64, 64) and out.dtype == torch.float32
    assert len({round(float(x.sum()), 3) for x in out}) == 8  # eight different draws
    # with no cropping, no flip chance and no jitter it is resize + normalise
    plain = BatchAugment(Preprocess(image_size=64, resize_size=64), min_scale=1.0, color_jitter=0.0)
    plain.log_ratio = (0.0, 0.0)  # whole-image crops only
    square = torch.nn.functional.interpolate(image[None].float() / 255, size=64, mode="bilinear", align_corners=False)
    mean, std = torch.tensor(Preprocess().mean).view(1, 3, 1, 1), torch.tensor(Preprocess().std).view(1, 3, 1, 1)
    expected = (square - mean) / std
    result = plain(image[None])
    flipped = result.flip(-1)
    assert min((result - expected).abs().max(), (flipped - expected).abs().max()) < 1e-4
