"""DINO's multi-crop augmentation, batched on tensors so that it runs on the GPU next to the model.

Per-image PIL pipelines cost more CPU than a GPU step of a ViT-B; here every random parameter is a per-sample
tensor and each operation is one batched call. The few per-sample parameters are drawn from the given generator
on its device (or from the global CPU RNG) and moved to the images, so a seed fixes the views.

Differences from torchvision's per-image transforms, by design, so that every stage is one batched pass:
crop, resize and flip are one bilinear ``grid_sample`` over continuous boxes (not bicubic on whole pixels; without
antialiasing, which the configs' decode sizes make moot: a view is at most ~1.7x smaller than its box); the
colour jitter runs in a fixed order (brightness, contrast, saturation, hue) and, with the random grayscale, is
one affine colour matrix per view, so the clamps between the steps fall away (one clamp at the end) and the hue
turns in the chroma plane of YIQ (as NVIDIA DALI's hsv operator does) rather than around the HSV hexcone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mermed.config import CropsConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# DINO's ColorJitter(0.4, 0.4, 0.2, 0.1) applied with p=0.8, RandomGrayscale(0.2), GaussianBlur radius 0.1-2.
BRIGHTNESS, CONTRAST, SATURATION, HUE, JITTER_P = 0.4, 0.4, 0.2, 0.1, 0.8
GRAYSCALE_P = 0.2
BLUR_SIGMA = (0.1, 2.0)
LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))
CROP_ATTEMPTS = 10
BLUR_CHUNK = 8
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


class MultiCrop:
    """uint8 images (B, C, H, W), C in {1, 3} -> ``n_global`` + ``n_local`` normalised float views (B, 3, S, S).

    Global view 0 is always blurred; later global views are blurred with p=0.1 and solarised with p=0.2; local
    views are blurred with p=0.5 (DINO). Rows flagged in ``grayscale`` skip saturation and hue jitter, which would
    only invent colour (or mix the windows of CT images stored as three channels).

    The views are made one at a time, each for the whole batch: a view is one allocation small enough for the
    allocator to reuse (glibc maps blocks over 32 MB afresh, and on the CPU those page faults cost as much as the
    arithmetic).
    """

    def __init__(
        self,
        n_global: int = 2,
        n_local: int = 10,
        global_size: int = 224,
        local_size: int = 96,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
    ):
        if n_global < 1 or n_local < 0:
            raise ValueError(f"need n_global >= 1 and n_local >= 0, got {n_global}, {n_local}")
        self.views = (
            [View(global_size, global_scale, blur_p=1.0, solarize_p=0.0)]
            + [View(global_size, global_scale, blur_p=0.1, solarize_p=0.2)] * (n_global - 1)
            + [View(local_size, local_scale, blur_p=0.5, solarize_p=0.0)] * n_local
        )

    @classmethod
    def from_config(cls, crops: CropsConfig) -> MultiCrop:
        return cls(
            crops.n_global, crops.n_local, crops.global_size, crops.local_size, crops.global_scale, crops.local_scale
        )

    @property
    def n_views(self) -> int:
        return len(self.views)

    def __call__(
        self,
        images: torch.Tensor,
        grayscale: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> list[torch.Tensor]:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"MultiCrop expects uint8 (B, 1|3, H, W), got {images.dtype} {tuple(images.shape)}")
        b = images.shape[0]
        if grayscale is None:
            grayscale = torch.zeros(b, dtype=torch.bool)
        if grayscale.shape != (b,):
            raise ValueError(f"grayscale must be a (B,) bool mask, got shape {tuple(grayscale.shape)}")
        pixels = images.float()  # 0-255: the colour transform scales to [0, 1] in its single pass
        gray = grayscale.to(device=images.device, dtype=torch.bool)
        return [_make_view(pixels, gray, view, generator) for view in self.views]


def _make_view(pixels: torch.Tensor, gray: torch.Tensor, view: View, gen: torch.Generator | None) -> torch.Tensor:
    """One view of every image (B, 3, S, S), normalised: crop + flip, colour, blur, solarise."""
    b, _, h, w = pixels.shape
    device = pixels.device

    def rand() -> torch.Tensor:
        return _rand(gen, b).to(device)

    boxes = _crop_boxes(b, h, w, view.scale, gen).to(device)
    flip = rand() < 0.5
    x = _crop_resize(pixels, boxes, flip, view.size)

    jitter = rand() < JITTER_P
    colour = jitter & ~gray
    brightness = torch.where(jitter, 1 + BRIGHTNESS * (2 * rand() - 1), 1.0)
    contrast = torch.where(jitter, 1 + CONTRAST * (2 * rand() - 1), 1.0)
    saturation = torch.where(colour, 1 + SATURATION * (2 * rand() - 1), 1.0)
    hue = torch.where(colour, HUE * (2 * rand() - 1), 0.0)
    to_gray = rand() < GRAYSCALE_P
    x = _colour_transform(x, brightness, contrast, saturation, hue, to_gray)

    sigma = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * rand()
    _gaussian_blur_(x, sigma, (rand() < view.blur_p).nonzero().squeeze(1))

    solarize = (rand() < view.solarize_p).nonzero().squeeze(1)
    if len(solarize):
        s = x[solarize]
        x[solarize] = torch.where(s >= 128 / 255, 1 - s, s)

    mean = torch.tensor(IMAGENET_MEAN, device=device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=device)[:, None, None]
    return x.sub_(mean).div_(std)


def _rand(gen: torch.Generator | None, *shape: int) -> torch.Tensor:
    """Uniform [0, 1) draws on the generator's own device (a CUDA generator cannot fill a CPU tensor)."""
    return torch.rand(*shape, generator=gen, device=gen.device if gen is not None else "cpu")


def _crop_boxes(n: int, h: int, w: int, scale: tuple[float, float], gen: torch.Generator | None) -> torch.Tensor:
    """(n, 4) x0, y0, x1, y1 boxes as torchvision's RandomResizedCrop samples them: up to 10 tries of an area
    fraction in ``scale`` and a log-uniform aspect ratio in [3/4, 4/3]; the first box that fits wins, else the
    whole image (torchvision's fallback for images of moderate aspect ratio)."""
    area = h * w * (scale[0] + (scale[1] - scale[0]) * _rand(gen, n, CROP_ATTEMPTS))
    ratio = torch.exp(LOG_RATIO[0] + (LOG_RATIO[1] - LOG_RATIO[0]) * _rand(gen, n, CROP_ATTEMPTS))
    cw, ch = torch.sqrt(area * ratio), torch.sqrt(area / ratio)
    fits = (cw <= w) & (ch <= h)
    first = fits.int().argmax(dim=1, keepdim=True)  # index of the first fitting try (0 when none fits)
    ok = fits.any(dim=1)
    cw = torch.where(ok, cw.gather(1, first).squeeze(1), float(w))
    ch = torch.where(ok, ch.gather(1, first).squeeze(1), float(h))
    x0 = (w - cw) * _rand(gen, n)
    y0 = (h - ch) * _rand(gen, n)
    return torch.stack([x0, y0, x0 + cw, y0 + ch], dim=1)


def _crop_resize(pixels: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
    """Box i of image i resampled to ``size`` px (bilinear), mirrored where ``flip``: the crop, the resize and
    the flip in one sampling pass over the output pixels. The boxes are axis-aligned, so the sampling grid is the
    outer product of one x and one y coordinate vector per image."""
    b, _, h, w = pixels.shape
    x0, y0, x1, y1 = (v[:, None] for v in boxes.unbind(1))
    centres = (torch.arange(size, device=pixels.device) + 0.5) / size  # output pixel centres in [0, 1]
    xs = 2 * (torch.where(flip[:, None], 1 - centres, centres) * (x1 - x0) + x0) / w - 1
    ys = 2 * (centres * (y1 - y0) + y0) / h - 1
    grid = torch.stack([xs[:, None, :].expand(b, size, size), ys[:, :, None].expand(b, size, size)], dim=-1)
    return F.grid_sample(pixels, grid, padding_mode="border", align_corners=False)


def _colour_transform(
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
    eye = torch.eye(3, device=x.device)
    luma = _RGB_TO_YIQ[0].to(x.device)
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
    return _YIQ_TO_RGB.to(shift.device) @ rotation @ _RGB_TO_YIQ.to(shift.device)


def _gaussian_blur_(x: torch.Tensor, sigma: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Blur ``x[rows]`` in place, with a sigma per row, ``BLUR_CHUNK`` rows per convolution (the last chunk
    padded by repeating a row, which rewrites the same values): a fixed convolution shape lets oneDNN reuse its
    kernels, and a chunk stays in cache. Rows go in order of sigma, so that a chunk of small sigmas gets a short
    kernel."""
    rows = rows[sigma[rows].argsort()]
    for chunk in rows.split(BLUR_CHUNK) if len(rows) else ():  # an empty tensor splits into one empty chunk
        chunk = torch.cat([chunk, chunk[-1:].expand(BLUR_CHUNK - len(chunk))])
        x[chunk] = _blur_rows(x[chunk], sigma[chunk])
    return x


def _blur_rows(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-row sigma and reflected borders, one grouped convolution per direction;
    the kernel reaches 3 sigma of the widest row, capped by the image for the reflect padding."""
    n, c, h, w = x.shape
    radius = min(math.ceil(3 * float(sigma.max())), h - 1, w - 1)
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-(taps[None, :] ** 2) / (2 * sigma[:, None] ** 2))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (n*c, taps)
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), kernel[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "MultiCrop", "View"]
