"""Batched multi-crop: the recipe's config, shapes, determinism, the grayscale mask, rotation, valid regions,
per-row normalisation, and the building blocks against torchvision."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from mermed.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MultiCrop,
    View,
    blur_chunks_,
    blur_masked,
    colour_transform,
    crop_boxes,
    crop_resize,
    solarize_masked,
    solarize_rows_,
)
from mermed.config import DINO_AUGMENTATION, CropsConfig

MEAN = torch.tensor(IMAGENET_MEAN)[:, None, None]
STD = torch.tensor(IMAGENET_STD)[:, None, None]
SMALL = {"n_global": 2, "n_local": 3, "global_size": 32, "local_size": 16, "decode_size": 32}
RECIPES = {"mermed": {}, "dino": DINO_AUGMENTATION}


def small(**recipe: object) -> MultiCrop:
    return MultiCrop.from_config(CropsConfig(**SMALL, **recipe))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_config_defaults_are_the_published_mermed_recipe():
    # The authors' DataAugmentationMerMED (pretraining/main_mermed.py) and its argument defaults.
    published = {
        "n_global": 2,
        "n_local": 10,
        "global_size": 224,
        "local_size": 96,
        "global_scale": (0.2, 1.0),
        "local_scale": (0.05, 0.2),
        "rotation_degrees": 30.0,
        "brightness": 0.2,
        "contrast": 0.2,
        "saturation": 0.1,
        "hue": 0.02,
        "jitter_p": 0.8,
        "grayscale_p": 0.0,
        "blur_sigma": (0.1, 1.0),
        "blur_p_global1": 1.0,
        "blur_p_global2": 0.1,
        "blur_p_local": 0.5,
        "solarize_p": 0.0,
    }
    assert CropsConfig().model_dump(exclude={"decode_size"}) == published
    views = MultiCrop.from_config(CropsConfig()).views
    assert (
        views
        == [View(224, (0.2, 1.0), 1.0, 0.0), View(224, (0.2, 1.0), 0.1, 0.0)] + [View(96, (0.05, 0.2), 0.5, 0.0)] * 10
    )


def test_dino_recipe_is_reachable_through_config_values():
    crops = CropsConfig(**DINO_AUGMENTATION, n_global=3)
    mc = MultiCrop.from_config(crops)
    assert mc.views[:3] == [View(224, (0.4, 1.0), 1.0, 0.0)] + [View(224, (0.4, 1.0), 0.1, 0.2)] * 2
    assert (mc.recipe.rotation_degrees, mc.recipe.grayscale_p, mc.recipe.blur_sigma) == (0.0, 0.2, (0.1, 2.0))
    assert (mc.recipe.brightness, mc.recipe.contrast, mc.recipe.saturation, mc.recipe.hue) == (0.4, 0.4, 0.2, 0.1)
    with pytest.raises(ValueError, match="blur_sigma"):
        CropsConfig(blur_sigma=(1.0, 0.5))


@pytest.mark.parametrize("recipe", RECIPES)
def test_views_have_the_configured_count_sizes_and_dtype(recipe: str):
    images = torch.randint(0, 256, (4, 3, 40, 48), dtype=torch.uint8)
    mc = small(**RECIPES[recipe])
    views = mc(images, generator=gen())
    assert mc.n_views == 5
    assert [tuple(v.shape) for v in views] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 3
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in views)


def test_same_generator_seed_same_views_other_seed_other_views():
    images = torch.randint(0, 256, (3, 3, 40, 40), dtype=torch.uint8)
    mc = small()
    a, b, c = mc(images, generator=gen(7)), mc(images, generator=gen(7)), mc(images, generator=gen(8))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("recipe", RECIPES)
def test_black_single_channel_images_give_normalised_black_rgb(recipe: str):
    # Black stays black through rotation (zero fill), crop, flip, jitter, grayscale, blur and solarisation.
    views = small(**RECIPES[recipe])(torch.zeros(2, 1, 40, 40, dtype=torch.uint8), generator=gen())
    for v in views:
        torch.testing.assert_close(v, (-MEAN / STD).expand_as(v))


def _hue(rgb: torch.Tensor) -> torch.Tensor:
    """Hue (fraction of a turn) of (..., 3, H, W) pixels with distinct channel values."""
    r, g, b = rgb.unbind(-3)
    return torch.remainder(torch.atan2(3**0.5 * (g - b), 2 * r - g - b) / (2 * torch.pi), 1.0)


@pytest.mark.parametrize("recipe", RECIPES)
def test_grayscale_rows_keep_their_hue_colour_rows_get_hue_jitter(recipe: str):
    # A flat colour image: brightness and contrast scale and shift all channels alike, which keeps the hue;
    # only the hue jitter (and conversion to gray) can change it. Rows flagged grayscale must keep it. Pixels of
    # the rotation's fill come out gray and are skipped.
    colour = torch.tensor([153, 115, 77], dtype=torch.uint8)[None, :, None, None]
    images = colour.expand(16, 3, 40, 40).contiguous()
    flagged = torch.arange(16) % 2 == 0
    mc = small(**RECIPES[recipe])
    views = mc(images, grayscale=flagged, generator=gen(3))
    input_hue = _hue(colour.float() / 255).flatten()
    changed = {True: 0, False: 0}
    for view, v in zip(mc.views, views, strict=True):
        if view.solarize_p:
            continue  # solarisation changes the hue
        rgb = v * STD + MEAN
        centre = rgb[:, :, rgb.shape[-2] // 2, rgb.shape[-1] // 2]  # (B, 3)
        is_gray = (centre.amax(dim=1) - centre.amin(dim=1)) < 1e-4
        hue_moved = ((_hue(centre[..., None, None]).flatten() - input_hue).abs() > 1e-3) & ~is_gray
        assert not (hue_moved & flagged).any(), "a grayscale-flagged row got hue jitter"
        for flag in (True, False):
            changed[flag] += int((hue_moved & (flagged == flag)).sum())
    assert changed[True] == 0 and changed[False] > 10


def test_crop_boxes_stay_inside_the_region_and_respect_the_scale():
    region = torch.tensor([[5.0, 2.0, 55.0, 32.0]]).expand(2000, 4)  # 50 x 30 px at (5, 2)
    x0, y0, x1, y1 = crop_boxes(region, (0.05, 0.4), gen()).unbind(1)
    assert (x0 >= 5).all() and (y0 >= 2).all() and (x1 <= 55 + 1e-4).all() and (y1 <= 32 + 1e-4).all()
    area = (x1 - x0) * (y1 - y0) / (30 * 50)
    ratio = (x1 - x0) / (y1 - y0)
    assert (area >= 0.05 - 1e-5).all() and (area <= 0.4 + 1e-5).all()
    assert (ratio >= 3 / 4 - 1e-4).all() and (ratio <= 4 / 3 + 1e-4).all()


def test_crop_boxes_fall_back_to_torchvisions_centre_crop():
    # No try of 90-100% of a 4 x 100 strip fits: the fallback is the centred box of aspect ratio 3/4.
    boxes = crop_boxes(torch.tensor([[10.0, 0.0, 14.0, 100.0], [0.0, 10.0, 100.0, 14.0]]), (0.9, 1.0), gen())
    h = 4 * 4 / 3
    expected = torch.tensor([[10.0, 50 - h / 2, 14.0, 50 + h / 2], [50 - h / 2, 10.0, 50 + h / 2, 14.0]])
    torch.testing.assert_close(boxes, expected)


def _old_crop_resize(pixels: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
    """The crop before rotation was added: an axis-aligned outer-product grid, border padding."""
    b, _, h, w = pixels.shape
    x0, y0, x1, y1 = (v[:, None] for v in boxes.unbind(1))
    centres = (torch.arange(size) + 0.5) / size
    xs = 2 * (torch.where(flip[:, None], 1 - centres, centres) * (x1 - x0) + x0) / w - 1
    ys = 2 * (centres * (y1 - y0) + y0) / h - 1
    grid = torch.stack([xs[:, None, :].expand(b, size, size), ys[:, :, None].expand(b, size, size)], dim=-1)
    return F.grid_sample(pixels, grid, padding_mode="border", align_corners=False)


def test_rotation_zero_reproduces_the_old_crop():
    pixels = torch.rand(64, 3, 30, 40, generator=gen(0)) * 255
    boxes = crop_boxes(torch.tensor([[0.0, 0.0, 40.0, 30.0]]).expand(64, 4), (0.05, 1.0), gen(1))
    flip = torch.rand(64, generator=gen(2)) < 0.5
    old = _old_crop_resize(pixels, boxes, flip, 24)
    torch.testing.assert_close(crop_resize(pixels, boxes, flip, 24), old, atol=1e-2, rtol=0)  # of 0-255
    # The rotation path at angle 0 agrees too, but for its zero fill beyond the tensor's edge pixel centres.
    inner = crop_boxes(torch.tensor([[1.0, 1.0, 39.0, 29.0]]).expand(64, 4), (0.05, 1.0), gen(1))
    rotated = crop_resize(pixels, inner, flip, 24, angle=torch.zeros(64))
    torch.testing.assert_close(rotated, _old_crop_resize(pixels, inner, flip, 24), atol=1e-2, rtol=0)


@pytest.mark.parametrize("padded", [False, True])
def test_rotation_by_90_degrees_of_the_whole_image_is_rot90(padded: bool):
    image = torch.rand(2, 3, 20, 20, generator=gen(0)) * 255
    expected = torch.rot90(image, 1, dims=(-2, -1))  # counter-clockwise, as torchvision's rotate(90)
    torch.testing.assert_close(TF.rotate(image, 90.0), expected)
    valid = None
    if padded:  # the same image at (7, 3) in a larger tensor padded with 255
        tensor = torch.full((2, 3, 30, 32), 255.0)
        tensor[:, :, 3:23, 7:27] = image
        image, valid = tensor, torch.tensor([[7.0, 3.0, 27.0, 23.0]]).expand(2, 4)
    boxes = valid if padded else torch.tensor([[0.0, 0.0, 20.0, 20.0]]).expand(2, 4)
    out = crop_resize(image, boxes, torch.zeros(2, dtype=torch.bool), 20, angle=torch.full((2,), 90.0), valid=valid)
    torch.testing.assert_close(out[..., 1:-1, 1:-1], expected[..., 1:-1, 1:-1], atol=1e-3, rtol=0)


def test_rotation_matches_torchvision_rotate_on_a_smooth_image():
    yy, xx = torch.meshgrid(torch.arange(48.0), torch.arange(48.0), indexing="ij")
    image = (128 + 100 * torch.sin(xx / 7) * torch.cos(yy / 9)).expand(1, 3, 48, 48)
    out = crop_resize(image, torch.tensor([[0.0, 0.0, 48.0, 48.0]]), torch.tensor([False]), 48, torch.tensor([-25.0]))
    expected = TF.rotate(image, -25.0, interpolation=TF.InterpolationMode.BILINEAR)  # zero fill included
    torch.testing.assert_close(out, expected, atol=0.05, rtol=0)


def _padded(images: torch.Tensor, sentinel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of ``images`` (B, C, h, w) placed at its own offset in a 48 x 48 tensor filled with ``sentinel``."""
    b, c, h, w = images.shape
    out = torch.full((b, c, 48, 48), sentinel, dtype=torch.uint8)
    offsets = torch.randint(0, 48 - max(h, w) + 1, (b, 2), generator=gen(5))
    for i, (x, y) in enumerate(offsets.tolist()):
        out[i, :, y : y + h, x : x + w] = images[i]
    valid = torch.cat([offsets, offsets + torch.tensor([w, h])], dim=1).float()
    return out, valid


@pytest.mark.parametrize("channels", [1, 3])
def test_views_of_padded_images_never_read_the_padding_without_rotation(channels: int):
    # Flat images: jitter and blur keep each row flat, so one sentinel pixel read would break the flatness.
    flat = torch.randint(0, 100, (24, channels, 1, 1), dtype=torch.uint8, generator=gen(4)).expand(-1, -1, 18, 34)
    images, valid = _padded(flat, sentinel=255)
    mc = small(rotation_degrees=0.0)
    for v in mc(images, generator=gen(6), valid=valid):
        spread = v.amax(dim=(-2, -1)) - v.amin(dim=(-2, -1))
        assert spread.max() < 1e-4


def test_rotated_views_of_a_zero_padded_image_are_the_views_of_the_image():
    # The box scale is relative to the valid region and the rotation turns about its centre: with zero padding
    # (the rotation's fill), padded and unpadded images give the same views.
    images = torch.randint(0, 256, (6, 3, 26, 40), dtype=torch.uint8, generator=gen(2))
    padded, valid = _padded(images, sentinel=0)
    mc = small()
    for a, b in zip(mc(images, generator=gen(9)), mc(padded, generator=gen(9), valid=valid), strict=True):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=0)


def test_per_row_normalisation_uses_the_given_statistics():
    images = torch.randint(0, 256, (4, 3, 40, 40), dtype=torch.uint8, generator=gen(1))
    mean = torch.rand(4, 3, generator=gen(2)) * 0.5 + 0.2
    std = torch.rand(4, 3, generator=gen(3)) * 0.2 + 0.1
    mc = small()
    default = mc(images, generator=gen(4))
    given = mc(images, generator=gen(4), mean=mean, std=std)
    for d, g in zip(default, given, strict=True):
        rgb = d * STD + MEAN  # the views in [0, 1] before normalisation
        torch.testing.assert_close(g, (rgb - mean[..., None, None]) / std[..., None, None], atol=1e-4, rtol=0)


def _jitter(x: torch.Tensor, **factors: float | bool) -> torch.Tensor:
    """``colour_transform`` of 0-255 rows with one set of factors for every row (identity where not given)."""
    n = len(x)
    params = {"brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.0, "to_gray": False} | factors
    rows = {k: torch.full((n,), v, dtype=torch.bool if k == "to_gray" else torch.float32) for k, v in params.items()}
    return colour_transform(x, **rows)


def test_colour_transform_matches_torchvision_brightness_contrast_saturation_and_grayscale():
    # Mid-range pixels and moderate factors, so torchvision's clamps between the steps never bite.
    x = 0.3 + 0.4 * torch.rand(4, 3, 12, 12, generator=gen(0))
    expected = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(x, 1.2), 0.8), 1.15)
    got = _jitter(x * 255, brightness=1.2, contrast=0.8, saturation=1.15)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    gray = _jitter(x * 255, brightness=1.2, contrast=0.8, saturation=1.15, to_gray=True)
    # torchvision weighs red 0.2989 where ITU-R 601 (and this module) say 0.299.
    torch.testing.assert_close(gray, TF.rgb_to_grayscale(expected).expand_as(gray), atol=2e-4, rtol=0)
    torch.testing.assert_close(_jitter(x * 255), x, atol=1e-6, rtol=0)


def test_hue_rotation_keeps_luma_and_grays_and_turns_the_hue():
    x = 0.2 + 0.6 * torch.rand(4, 3, 12, 12, generator=gen(1))
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
    x = torch.rand(11, 3, 20, 20, generator=gen(0))
    sigma = torch.rand(11, generator=gen(1)) * 1.9 + 0.1
    rows = torch.tensor([0, 2, 3, 4, 5, 6, 7, 8, 10])  # more than one chunk, the last one partial
    sigma[0] = sigma[10] = 1.9  # each chunk's kernel reaches 6 px, torchvision's 13 taps
    selected = torch.zeros(11, dtype=torch.bool)
    selected[rows] = True
    chunked = blur_chunks_(x.clone(), sigma, rows)
    masked = blur_masked(x, sigma, selected, max_sigma=2.0)  # the GPU's form: a 6 px kernel for every row
    for i in rows.tolist():
        expected = TF.gaussian_blur(x[i], kernel_size=[13, 13], sigma=[float(sigma[i])] * 2)
        torch.testing.assert_close(chunked[i], expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(masked[i], expected, atol=1e-4, rtol=0)
    for i in (1, 9):
        torch.testing.assert_close(chunked[i], x[i], atol=0, rtol=0)
        torch.testing.assert_close(masked[i], x[i], atol=0, rtol=0)
    torch.testing.assert_close(blur_chunks_(x.clone(), sigma, rows[:0]), x, atol=0, rtol=0)


def test_solarisation_inverts_the_bright_pixels_of_the_selected_rows_only():
    x = torch.rand(6, 3, 8, 8, generator=gen(0))
    selected = torch.tensor([True, False, True, True, False, False])
    expected = x.clone()
    expected[selected] = torch.where(x[selected] >= 128 / 255, 1 - x[selected], x[selected])
    torch.testing.assert_close(solarize_rows_(x.clone(), selected.nonzero().squeeze(1)), expected, atol=0, rtol=0)
    torch.testing.assert_close(solarize_masked(x, selected), expected, atol=0, rtol=0)
    assert math.isclose(float(expected[1].sum()), float(x[1].sum()))


def test_bad_input_is_rejected():
    mc = small()
    images = torch.zeros(2, 3, 40, 40, dtype=torch.uint8)
    with pytest.raises(ValueError, match="uint8"):
        mc(torch.zeros(2, 3, 40, 40))
    with pytest.raises(ValueError, match="uint8"):
        mc(torch.zeros(2, 4, 40, 40, dtype=torch.uint8))
    with pytest.raises(ValueError, match="grayscale"):
        mc(images, grayscale=torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="valid"):
        mc(images, valid=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="mean"):
        mc(images, mean=torch.zeros(2, 1), std=torch.ones(2, 3))
    with pytest.raises(ValueError, match="at least one view"):
        MultiCrop([], mc.recipe)
