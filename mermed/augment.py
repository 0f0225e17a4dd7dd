"""MerMED-FM's multi-crop augmentation, batched on tensors so that it runs on the GPU next to the model.

Per-image PIL pipelines cost more CPU than a GPU step of a ViT-B; here every random parameter is a per-sample
tensor and each operation is one batched call. The few per-sample parameters are drawn from the given generator
on its device (or from the global CPU RNG) and moved to the images, so a seed fixes the views. On a GPU the path
never waits for the device: no ``.item()`` or ``nonzero()``, the module's constants are copied once per device and
the caller's small tensors without blocking.

The recipe is ``CropsConfig``'s; its defaults are the published one (the authors' DataAugmentationMerMED): per
view a rotation of up to 30 degrees, then RandomResizedCrop, flip, colour jitter with p=0.8 and Gaussian blur,
no solarisation or random grayscale. DINO's recipe is ``mermed.config.DINO_AUGMENTATION``.

Differences from torchvision's per-image transforms, by design, so that every stage is one batched pass:
rotation, crop, resize and flip are one bilinear ``grid_sample`` over continuous angles and boxes (torchvision
rotates with nearest-neighbour sampling, then crops whole pixels and resizes bicubically: two resamplings where
this makes one; without antialiasing, which the configs' decode sizes make moot: a view is at most ~1.7x smaller
than its box). The rotation's zero fill is read through bilinear sampling, so its edge is one pixel soft; on
padded images (``valid``) it is read from the padding, which must therefore be zero. The colour jitter runs in a
fixed order (brightness, contrast, saturation, hue) and, with the random grayscale, is one affine colour matrix
per view, so the clamps between the steps fall away (one clamp at the end) and the hue turns in the chroma plane
of YIQ (as NVIDIA DALI's hsv operator does) rather than around the HSV hexcone.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD

from mermed.config import CropsConfig

LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))
CROP_ATTEMPTS = 10
BLUR_CHUNK = 8
SOLARIZE_THRESHOLD = 128 / 255
# RGB -> YIQ (NTSC); the Y row is ITU-R 601 luma, which the colour transform also uses for gray.
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


@dataclass(frozen=True)
class View:
    """One view of every image: output size, crop area fraction and the chances of blur and solarisation."""

    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float


@dataclass(frozen=True)
class Recipe:
    """What every view shares: the rotation range, colour jitter strengths and chance, random grayscale, blur
    sigmas (``CropsConfig``'s fields of the same names)."""

    rotation_degrees: float
    brightness: float
    contrast: float
    saturation: float
    hue: float
    jitter_p: float
    grayscale_p: float
    blur_sigma: tuple[float, float]


class MultiCrop:
    """uint8 images (B, C, H, W), C in {1, 3} -> one normalised float tensor (B, 3, S, S) per view.

    Rows flagged in ``grayscale`` skip saturation and hue jitter, which would only invent colour (or mix the
    windows of CT images stored as three channels). ``valid`` (B, 4) gives each row's image region as x0, y0, x1,
    y1 in pixels of the input tensor, for images resized on their long side and zero-padded to the square: boxes
    are drawn inside it with the area scale relative to it, and it is rotated about its own centre, as the
    recipe's transforms on the unpadded image would. ``mean`` and ``std`` (B, 3), in [0, 1] units, normalise each
    row after the colour operations (its modality's statistics; a one-channel statistic repeated three times);
    ImageNet's when not given. Pass them on the images' device: they are copied otherwise.

    The views are made one at a time, each for the whole batch: a view is one allocation small enough for the
    allocator to reuse (glibc maps blocks over 32 MB afresh, and on the CPU those page faults cost as much as the
    arithmetic).
    """

    def __init__(self, views: Sequence[View], recipe: Recipe):
        if not views:
            raise ValueError("MultiCrop needs at least one view")
        self.views = list(views)
        self.recipe = recipe

    @classmethod
    def from_config(cls, crops: CropsConfig) -> MultiCrop:
        """Global view 1, the later global views (which alone may be solarised), then the local views."""
        views = (
            [View(crops.global_size, crops.global_scale, crops.blur_p_global1, 0.0)]
            + [View(crops.global_size, crops.global_scale, crops.blur_p_global2, crops.solarize_p)]
            * (crops.n_global - 1)
            + [View(crops.local_size, crops.local_scale, crops.blur_p_local, 0.0)] * crops.n_local
        )
        recipe = Recipe(
            crops.rotation_degrees,
            crops.brightness,
            crops.contrast,
            crops.saturation,
            crops.hue,
            crops.jitter_p,
            crops.grayscale_p,
            crops.blur_sigma,
        )
        return cls(views, recipe)

    @property
    def n_views(self) -> int:
        return len(self.views)

    def __call__(
        self,
        images: torch.Tensor,
        grayscale: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        *,
        valid: torch.Tensor | None = None,
        mean: torch.Tensor | None = None,
        std: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"MultiCrop expects uint8 (B, 1|3, H, W), got {images.dtype} {tuple(images.shape)}")
        b, _, h, w = images.shape
        device = images.device
        if grayscale is None:
            grayscale = torch.zeros(b, dtype=torch.bool, device=device)
        if grayscale.shape != (b,):
            raise ValueError(f"grayscale must be a (B,) bool mask, got shape {tuple(grayscale.shape)}")
        for name, value, width in (("valid", valid, 4), ("mean", mean, 3), ("std", std, 3)):
            if value is not None and value.shape != (b, width):
                raise ValueError(f"{name} must be ({b}, {width}), got shape {tuple(value.shape)}")
        if valid is None:
            region = torch.zeros(b, 4, device=device)
            region[:, 2], region[:, 3] = w, h
        else:
            region = valid.to(device, torch.float32, non_blocking=True)
        constants = _constants(device)
        mean = constants.mean.expand(b, 3) if mean is None else mean.to(device, torch.float32, non_blocking=True)
        std = constants.std.expand(b, 3) if std is None else std.to(device, torch.float32, non_blocking=True)
        ctx = _Batch(
            pixels=images.float(),  # 0-255: the colour transform scales to [0, 1] in its single pass
            gray=grayscale.to(device, torch.bool, non_blocking=True),
            region=region,
            valid=region if valid is not None else None,
            mean=mean[:, :, None, None],
            std=std[:, :, None, None],
            gen=generator,
        )
        return [_make_view(ctx, view, self.recipe) for view in self.views]


@dataclass(frozen=True)
class _Batch:
    """One call's inputs, on the images' device."""

    pixels: torch.Tensor  # (B, C, H, W) float 0-255
    gray: torch.Tensor  # (B,) bool
    region: torch.Tensor  # (B, 4) the image inside the tensor, pixels
    valid: torch.Tensor | None  # the same where given, None where it is the whole tensor
    mean: torch.Tensor  # (B, 3, 1, 1)
    std: torch.Tensor
    gen: torch.Generator | None


@dataclass(frozen=True)
class _Constants:
    rgb_to_yiq: torch.Tensor
    yiq_to_rgb: torch.Tensor
    mean: torch.Tensor  # (1, 3) ImageNet
    std: torch.Tensor


@functools.cache
def _constants(device: torch.device) -> _Constants:
    """The module's constants on ``device``, copied once: a host-to-device copy waits for the GPU's queue."""
    return _Constants(
        _RGB_TO_YIQ.to(device),
        _YIQ_TO_RGB.to(device),
        torch.tensor([IMAGENET_MEAN], device=device),
        torch.tensor([IMAGENET_STD], device=device),
    )


def _make_view(ctx: _Batch, view: View, recipe: Recipe) -> torch.Tensor:
    """One view of every image (B, 3, S, S), normalised: rotate + crop + flip, colour, blur, solarise."""
    pixels, gen = ctx.pixels, ctx.gen
    b, device = len(pixels), pixels.device

    def rand() -> torch.Tensor:
        return _rand(gen, b).to(device)

    angle = recipe.rotation_degrees * (2 * rand() - 1) if recipe.rotation_degrees else None
    boxes = crop_boxes(ctx.region, view.scale, gen)
    flip = rand() < 0.5
    x = crop_resize(pixels, boxes, flip, view.size, angle, ctx.valid)

    jitter = rand() < recipe.jitter_p
    colour = jitter & ~ctx.gray
    brightness = torch.where(jitter, 1 + recipe.brightness * (2 * rand() - 1), 1.0)
    contrast = torch.where(jitter, 1 + recipe.contrast * (2 * rand() - 1), 1.0)
    saturation = torch.where(colour, 1 + recipe.saturation * (2 * rand() - 1), 1.0)
    hue = torch.where(colour, recipe.hue * (2 * rand() - 1), 0.0)
    to_gray = rand() < recipe.grayscale_p
    x = colour_transform(x, brightness, contrast, saturation, hue, to_gray)

    lo, hi = recipe.blur_sigma
    sigma = lo + (hi - lo) * rand()
    blur = rand() < view.blur_p
    # The CPU works on just the rows that drew blur or solarisation; a GPU does all rows and masks, as asking
    # which rows they are would wait for it.
    on_cpu = device.type == "cpu"
    x = blur_chunks_(x, sigma, blur.nonzero().squeeze(1)) if on_cpu else blur_masked(x, sigma, blur, hi)
    if view.solarize_p:
        solarize = rand() < view.solarize_p
        x = solarize_rows_(x, solarize.nonzero().squeeze(1)) if on_cpu else solarize_masked(x, solarize)
    return x.sub_(ctx.mean).div_(ctx.std)


def _rand(gen: torch.Generator | None, *shape: int) -> torch.Tensor:
    """Uniform [0, 1) draws on the generator's own device (a CUDA generator cannot fill a CPU tensor)."""
    return torch.rand(*shape, generator=gen, device=gen.device if gen is not None else "cpu")


def crop_boxes(region: torch.Tensor, scale: tuple[float, float], gen: torch.Generator | None) -> torch.Tensor:
    """(n, 4) x0, y0, x1, y1 boxes inside the (n, 4) regions, as torchvision's RandomResizedCrop samples them on
    each region: up to 10 tries of an area fraction in ``scale`` and a log-uniform aspect ratio in [3/4, 4/3];
    the first box that fits wins, else the largest centred box of aspect ratio within those bounds."""
    n, device = len(region), region.device
    rx0, ry0, rx1, ry1 = region.unbind(1)
    w, h = rx1 - rx0, ry1 - ry0
    area = (w * h)[:, None] * (scale[0] + (scale[1] - scale[0]) * _rand(gen, n, CROP_ATTEMPTS).to(device))
    ratio = torch.exp(LOG_RATIO[0] + (LOG_RATIO[1] - LOG_RATIO[0]) * _rand(gen, n, CROP_ATTEMPTS).to(device))
    cw, ch = torch.sqrt(area * ratio), torch.sqrt(area / ratio)
    fits = (cw <= w[:, None]) & (ch <= h[:, None])
    first = fits.int().argmax(dim=1, keepdim=True)  # index of the first fitting try (0 when none fits)
    ok = fits.any(dim=1)
    max_ratio = math.exp(LOG_RATIO[1])
    cw = torch.where(ok, cw.gather(1, first).squeeze(1), torch.minimum(w, h * max_ratio))
    ch = torch.where(ok, ch.gather(1, first).squeeze(1), torch.minimum(h, w * max_ratio))
    offset = torch.where(ok[:, None], _rand(gen, n, 2).to(device), 0.5)
    x0 = rx0 + (w - cw) * offset[:, 0]
    y0 = ry0 + (h - ch) * offset[:, 1]
    return torch.stack([x0, y0, x0 + cw, y0 + ch], dim=1)


def crop_resize(
    pixels: torch.Tensor,
    boxes: torch.Tensor,
    flip: torch.Tensor,
    size: int,
    angle: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Box i of image i resampled to ``size`` px (bilinear), mirrored where ``flip``, after turning the image
    (``valid`` region i, or the whole tensor) counter-clockwise by ``angle`` degrees about its centre, as
    torchvision's ``rotate``: rotation, crop, resize and flip in one sampling pass over the output pixels, zero
    outside the image. Without rotation the samples stay inside the valid region (the border of the tensor when
    None), so the padding around it is never read.

    The grid is an affine map of the output pixel centres, written in one pass as the sum of a term per output
    column and one per output row (``affine_grid``'s batched matmul costs as much as ``grid_sample``)."""
    b, _, h, w = pixels.shape
    x0, y0, x1, y1 = boxes.unbind(1)
    t = (torch.arange(size, device=pixels.device) + 0.5) / size  # output pixel centres in [0, 1]
    px = torch.where(flip, x1, x0)[:, None] + torch.where(flip, x0 - x1, x1 - x0)[:, None] * t  # per column
    py = y0[:, None] + (y1 - y0)[:, None] * t  # per row
    if angle is None:
        if valid is not None:  # pixel centres of the region's edges: bilinear never reaches past them
            px = torch.clamp(px, valid[:, 0:1] + 0.5, valid[:, 2:3] - 0.5)
            py = torch.clamp(py, valid[:, 1:2] + 0.5, valid[:, 3:4] - 0.5)
        col = (px, torch.zeros_like(px))
        row = (torch.zeros_like(py), py)
    else:
        if valid is None:
            cx, cy = w / 2, h / 2
        else:
            cx, cy = (valid[:, 0:1] + valid[:, 2:3]) / 2, (valid[:, 1:2] + valid[:, 3:4]) / 2
        theta = torch.deg2rad(angle)[:, None]
        cos, sin = torch.cos(theta), torch.sin(theta)
        # Source of the rotated image's point p: c + R(-angle) (p - c), image y pointing down.
        col = (cx + cos * (px - cx), sin * (px - cx))
        row = (-sin * (py - cy), cy + cos * (py - cy))
    grid = torch.empty(b, size, size, 2, device=pixels.device)
    for axis, extent in ((0, w), (1, h)):  # to grid_sample's [-1, 1] (align_corners=False)
        torch.add((2 / extent * col[axis] - 1)[:, None, :], (2 / extent * row[axis])[:, :, None], out=grid[..., axis])
    padding = "border" if angle is None and valid is None else "zeros"
    return F.grid_sample(pixels, grid, padding_mode=padding, align_corners=False)


def colour_transform(
    x: torch.Tensor,
    brightness: torch.Tensor,
    contrast: torch.Tensor,
    saturation: torch.Tensor,
    hue: torch.Tensor,
    to_gray: torch.Tensor,
) -> torch.Tensor:
    """Colour jitter then random grayscale of 0-255 rows (n, 1|3, H, W) -> (n, 3, H, W) RGB in [0, 1], as one
    3x3 matrix and offset per row applied in a single pass. Brightness, contrast (towards the row's mean luma),
    saturation (towards each pixel's luma), the hue rotation and grayscale are all affine in RGB, so they compose
    exactly; a one-channel row enters as three equal channels."""
    n, channels = x.shape[:2]
    constants = _constants(x.device)
    eye = torch.eye(3, device=x.device)
    luma = constants.rgb_to_yiq[0]
    to_luma = luma.expand(3, 3)  # every output channel <- the luma of the input
    f = saturation[:, None, None]
    matrix = torch.where(to_gray[:, None, None], to_luma, eye) @ _hue_rotation(hue) @ (f * eye + (1 - f) * to_luma)
    matrix = matrix * (brightness * contrast)[:, None, None]
    pixel_mean = x.mean(dim=(-2, -1))
    if channels == 1:
        matrix, mean_luma = matrix.sum(dim=2, keepdim=True), pixel_mean[:, 0]
    else:
        mean_luma = pixel_mean @ luma
    offset = (1 - contrast) * brightness * mean_luma  # contrast pulls towards the mean luma
    out = torch.bmm(matrix / 255, x.flatten(2)).add_(offset[:, None, None] / 255)
    return out.clamp_(0, 1).unflatten(2, x.shape[-2:])


def _hue_rotation(shift: torch.Tensor) -> torch.Tensor:
    """(n, 3, 3) RGB matrices rotating the chroma plane of YIQ by ``shift`` turns: luma and grays stay, hue turns."""
    angle = 2 * math.pi * shift
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.zeros(len(shift), 3, 3, device=shift.device)
    rotation[:, 0, 0] = 1
    rotation[:, 1, 1], rotation[:, 1, 2], rotation[:, 2, 1], rotation[:, 2, 2] = cos, -sin, sin, cos
    constants = _constants(shift.device)
    return constants.yiq_to_rgb @ rotation @ constants.rgb_to_yiq


def solarize_rows_(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """PIL's solarisation (threshold 128) of ``x[rows]``, in place."""
    s = x[rows]
    x[rows] = torch.where(s >= SOLARIZE_THRESHOLD, 1 - s, s)
    return x


def solarize_masked(x: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """PIL's solarisation of the rows where ``selected``."""
    return torch.where(selected[:, None, None, None] & (x >= SOLARIZE_THRESHOLD), 1 - x, x)


def blur_chunks_(x: torch.Tensor, sigma: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The CPU blur: ``x[rows]`` in place, with a sigma per row, ``BLUR_CHUNK`` rows per convolution (the last
    chunk padded by repeating a row, which rewrites the same values): a fixed convolution shape lets oneDNN reuse
    its kernels, and a chunk stays in cache. Rows go in order of sigma, so that a chunk of small sigmas gets a
    short kernel. (Its row indices and kernel lengths are host values, which on a GPU would wait for the device.)"""
    _, _, h, w = x.shape
    rows = rows[sigma[rows].argsort()]
    for chunk in rows.split(BLUR_CHUNK) if len(rows) else ():  # an empty tensor splits into one empty chunk
        chunk = torch.cat([chunk, chunk[-1:].expand(BLUR_CHUNK - len(chunk))])
        radius = min(math.ceil(3 * float(sigma[chunk].max())), h - 1, w - 1)
        x[chunk] = _blur_rows(x[chunk], sigma[chunk], radius)
    return x


def blur_masked(x: torch.Tensor, sigma: torch.Tensor, selected: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """The GPU blur: every row blurred with a kernel long enough for ``max_sigma``, kept where ``selected``; the
    spare arithmetic costs a GPU less than waiting for it to say which rows to blur."""
    _, _, h, w = x.shape
    radius = min(math.ceil(3 * max_sigma), h - 1, w - 1)
    return torch.where(selected[:, None, None, None], _blur_rows(x, sigma, radius), x)


def _blur_rows(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-row sigma and reflected borders, ``radius`` taps either side, one
    grouped convolution per direction."""
    n, c, h, w = x.shape
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-(taps[None, :] ** 2) / (2 * sigma[:, None] ** 2))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (n*c, taps)
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), kernel[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MultiCrop",
    "Recipe",
    "View",
    "blur_chunks_",
    "blur_masked",
    "colour_transform",
    "crop_boxes",
    "crop_resize",
    "solarize_masked",
    "solarize_rows_",
]
