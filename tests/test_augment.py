"""Batched multi-crop: shapes, determinism, the grayscale mask, and the building blocks against torchvision."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from mermed.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MultiCrop,
    _colour_transform,
    _crop_boxes,
    _gaussian_blur_,
)
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


def _jitter(x: torch.Tensor, **factors: float | bool) -> torch.Tensor:
    """``_colour_transform`` of 0-255 rows with one set of factors for every row (identity where not given)."""
    n = len(x)
    params = {"brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.0, "to_gray": False} | factors
    rows = {k: torch.full((n,), v, dtype=torch.bool if k == "to_gray" else torch.float32) for k, v in params.items()}
    return _colour_transform(x, **rows)


def test_colour_transform_matches_torchvision_brightness_contrast_saturation_and_grayscale():
    # Mid-range pixels and moderate factors, so torchvision's clamps between the steps never bite.
    x = 0.3 + 0.4 * torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    expected = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(x, 1.2), 0.8), 1.15)
    got = _jitter(x * 255, brightness=1.2, contrast=0.8, saturation=1.15)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    gray = _jitter(x * 255, brightness=1.2, contrast=0.8, saturation=1.15, to_gray=True)
    # torchvision weighs red 0.2989 where ITU-R 601 (and this module) say 0.299.
    torch.testing.assert_close(gray, TF.rgb_to_grayscale(expected).expand_as(gray), atol=2e-4, rtol=0)
    torch.testing.assert_close(_jitter(x * 255), x, atol=1e-6, rtol=0)


def test_hue_rotation_keeps_luma_and_grays_and_turns_the_hue():
    x = 0.2 + 0.6 * torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    weights = torch.tensor([0.299, 0.587, 0.114])[:, None, None]  # ITU-R 601 luma
    turned = _jitter(x * 255, hue=0.08)
    torch.testing.assert_close((weights * turned).sum(-3), (weights * x).sum(-3), atol=1e-5, rtol=0)
    torch.testing.assert_close(_jitter(turned * 255, hue=-0.08), x, atol=1e-5, rtol=0)
    moved = torch.remainder(_hue(turned) - _hue(x) + 0.5, 1.0) - 0.5  # signed change, fraction of a turn
    assert (moved.abs() > 0.02).float().mean() > 0.9
    grays = x[:, :1].expand(-1, 3, -1, -1)
    torch.testing.assert_close(_jitter(grays * 255, hue=0.1), grays, atol=1e-5, rtol=0)
    # A one-channel row is a gray RGB row.
    torch.testing.assert_close(_jitter(x[:, :1] * 255, brightness=1.1), _jitter(grays * 255, brightness=1.1))


def test_gaussian_blur_matches_torchvision_per_row_and_skips_unselected_rows():
    x = torch.rand(11, 3, 20, 20, generator=torch.Generator().manual_seed(0))
    sigma = torch.rand(11, generator=torch.Generator().manual_seed(1)) * 1.9 + 0.1
    rows = torch.tensor([0, 2, 3, 4, 5, 6, 7, 8, 10])  # more than one chunk, the last one partial
    sigma[0] = sigma[10] = 1.9  # each chunk's kernel reaches 6 px, torchvision's 13 taps
    out = _gaussian_blur_(x.clone(), sigma, rows)
    for i in rows.tolist():
        expected = TF.gaussian_blur(x[i], kernel_size=[13, 13], sigma=[float(sigma[i])] * 2)
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=0)
    for i in (1, 9):
        torch.testing.assert_close(out[i], x[i], atol=0, rtol=0)
    torch.testing.assert_close(_gaussian_blur_(x.clone(), sigma, rows[:0]), x, atol=0, rtol=0)


def test_bad_input_is_rejected():
    mc = small()
    with pytest.raises(ValueError, match="uint8"):
        mc(torch.zeros(2, 3, 40, 40))
    with pytest.raises(ValueError, match="uint8"):
        mc(torch.zeros(2, 4, 40, 40, dtype=torch.uint8))
    with pytest.raises(ValueError, match="grayscale"):
        mc(torch.zeros(2, 3, 40, 40, dtype=torch.uint8), grayscale=torch.zeros(3, dtype=torch.bool))
