"""Batched multi-crop: shapes, determinism, the grayscale mask, and the building blocks against torchvision."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from mermed.augment import IMAGENET_MEAN, IMAGENET_STD, MultiCrop, _crop_boxes, _gaussian_blur, _shift_hue
from mermed.config import CropsConfig

MEAN = torch.tensor(IMAGENET_MEAN)[:, None, None]
STD = torch.tensor(IMAGENET_STD)[:, None, None]


def small() -> MultiCrop:
    return MultiCrop(n_global=2, n_local=3, global_size=32, local_size=16)


def test_views_have_the_configured_count_sizes_and_dtype():
    images = torch.randint(0, 256, (4, 3, 40, 48), dtype=torch.uint8)
    views = small()(images, generator=torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in views] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 3
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in views)
    crops = CropsConfig(n_global=2, n_local=3, global_size=32, local_size=16, decode_size=48)
    assert MultiCrop.from_config(crops).n_views == 5


def test_same_generator_seed_same_views_other_seed_other_views():
    images = torch.randint(0, 256, (3, 3, 40, 40), dtype=torch.uint8)
    mc = small()
    a = mc(images, generator=torch.Generator().manual_seed(7))
    b = mc(images, generator=torch.Generator().manual_seed(7))
    c = mc(images, generator=torch.Generator().manual_seed(8))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_black_single_channel_images_give_normalised_black_rgb():
    # Black stays black through crop, flip, jitter, grayscale, blur and solarisation (threshold 128).
    views = small()(torch.zeros(2, 1, 40, 40, dtype=torch.uint8), generator=torch.Generator().manual_seed(0))
    for v in views:
        torch.testing.assert_close(v, (-MEAN / STD).expand_as(v))


def _hue(rgb: torch.Tensor) -> torch.Tensor:
    """Hue (fraction of a turn) of (..., 3, H, W) pixels with distinct channel values."""
    r, g, b = rgb.unbind(-3)
    return torch.remainder(torch.atan2(3**0.5 * (g - b), 2 * r - g - b) / (2 * torch.pi), 1.0)


def test_grayscale_rows_keep_their_hue_colour_rows_get_hue_jitter():
    # A flat colour image: brightness and contrast scale and shift all channels alike, which keeps the hue;
    # only the hue jitter (and conversion to gray) can change it. Rows flagged grayscale must keep it.
    colour = torch.tensor([153, 115, 77], dtype=torch.uint8)[None, :, None, None]
    images = colour.expand(16, 3, 40, 40).contiguous()
    flagged = torch.arange(16) % 2 == 0
    mc = small()
    views = mc(images, grayscale=flagged, generator=torch.Generator().manual_seed(3))
    input_hue = _hue(colour.float() / 255).flatten()
    changed = {True: 0, False: 0}
    for i, v in enumerate(views):
        if i == 1:
            continue  # the second global view is solarised at times, which changes the hue
        rgb = v * STD + MEAN
        centre = rgb[:, :, rgb.shape[-2] // 2, rgb.shape[-1] // 2]  # (B, 3)
        is_gray = (centre.amax(dim=1) - centre.amin(dim=1)) < 1e-4
        hue_moved = ((_hue(centre[..., None, None]).flatten() - input_hue).abs() > 1e-3) & ~is_gray
        assert not (hue_moved & flagged).any(), f"view {i}: a grayscale-flagged row got hue jitter"
        for flag in (True, False):
            changed[flag] += int((hue_moved & (flagged == flag)).sum())
    assert changed[True] == 0 and changed[False] > 10


def test_crop_boxes_stay_inside_and_respect_the_scale():
    boxes = _crop_boxes(2000, 30, 50, (0.05, 0.4), torch.Generator().manual_seed(0))
    x0, y0, x1, y1 = boxes.unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= 50 + 1e-4).all() and (y1 <= 30 + 1e-4).all()
    area = (x1 - x0) * (y1 - y0) / (30 * 50)
    ratio = (x1 - x0) / (y1 - y0)
    assert (area >= 0.05 - 1e-5).all() and (area <= 0.4 + 1e-5).all()
    assert (ratio >= 3 / 4 - 1e-4).all() and (ratio <= 4 / 3 + 1e-4).all()


def test_hue_shift_matches_torchvision():
    x = torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    shift = torch.tensor([0.1, -0.1, 0.03, 0.0])
    expected = torch.stack([TF.adjust_hue(x[i], float(shift[i])) for i in range(4)])
    torch.testing.assert_close(_shift_hue(x, shift), expected, atol=1e-5, rtol=0)


def test_gaussian_blur_matches_torchvision_per_row_and_skips_unselected_rows():
    x = torch.rand(3, 3, 20, 20, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.5, 1.7, 1.0])
    apply = torch.tensor([True, True, False])
    out = _gaussian_blur(x, sigma, apply)
    for i in range(2):
        expected = TF.gaussian_blur(x[i], kernel_size=[13, 13], sigma=[float(sigma[i])] * 2)
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[2], x[2], atol=1e-6, rtol=0)


def test_bad_input_is_rejected():
    mc = small()
    with pytest.raises(ValueError, match="uint8"):
        mc(torch.zeros(2, 3, 40, 40))
    with pytest.raises(ValueError, match="uint8"):
        mc(torch.zeros(2, 4, 40, 40, dtype=torch.uint8))
    with pytest.raises(ValueError, match="grayscale"):
        mc(torch.zeros(2, 3, 40, 40, dtype=torch.uint8), grayscale=torch.zeros(3, dtype=torch.bool))
