"""DINO's multi-crop augmentation, batched on tensors so that it runs on the GPU next to the model.

Per-image PIL pipelines cost more CPU than a GPU step of a ViT-B; here every random parameter is a per-sample
tensor and each operation is one batched call. The few per-sample parameters are drawn from the given generator
on its device (or from the global CPU RNG) and moved to the images, so a seed fixes the views.

Differences from torchvision's per-image transforms, by design: crops are resampled with ``roi_align`` (bilinear
with adaptive area averaging, i.e. antialiased) instead of bicubic; crop boxes are continuous instead of rounded
to whole pixels; the four colour-jitter operations run in a fixed order (brightness, contrast, saturation, hue)
instead of a random one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from mermed.config import CropsConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# DINO's ColorJitter(0.4, 0.4, 0.2, 0.1) applied with p=0.8, RandomGrayscale(0.2), GaussianBlur radius 0.1-2.
BRIGHTNESS, CONTRAST, SATURATION, HUE, JITTER_P = 0.4, 0.4, 0.2, 0.1, 0.8
GRAYSCALE_P = 0.2
BLUR_SIGMA = (0.1, 2.0)
LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))
CROP_ATTEMPTS = 10
_LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class ViewGroup:
    """Views sharing a size and crop scale; ``blur_p``/``solarize_p`` hold one probability per view."""

    count: int
    size: int
    scale: tuple[float, float]
    blur_p: tuple[float, ...]
    solarize_p: tuple[float, ...]


class MultiCrop:
    """uint8 images (B, C, H, W), C in {1, 3} -> ``n_global`` + ``n_local`` normalised float views (B, 3, S, S).

    Global view 0 is always blurred; later global views are blurred with p=0.1 and solarised with p=0.2; local
    views are blurred with p=0.5 (DINO). Rows flagged in ``grayscale`` skip saturation and hue jitter, which would
    only invent colour (or mix the windows of CT images stored as three channels).
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
        self.groups = [
            ViewGroup(
                n_global,
                global_size,
                global_scale,
                blur_p=(1.0,) + (0.1,) * (n_global - 1),
                solarize_p=(0.0,) + (0.2,) * (n_global - 1),
            )
        ]
        if n_local:
            self.groups.append(ViewGroup(n_local, local_size, local_scale, (0.5,) * n_local, (0.0,) * n_local))

    @classmethod
    def from_config(cls, crops: CropsConfig) -> MultiCrop:
        return cls(
            crops.n_global, crops.n_local, crops.global_size, crops.local_size, crops.global_scale, crops.local_scale
        )

    @property
    def n_views(self) -> int:
        return sum(g.count for g in self.groups)

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
        device = images.device
        pixels = images.float().div_(255)
        gray = grayscale.to(device=device, dtype=torch.bool)
        views: list[torch.Tensor] = []
        for group in self.groups:
            x = self._group(pixels, gray, group, generator)
            views.extend(x.chunk(group.count))
        return views

    def _group(
        self, pixels: torch.Tensor, gray: torch.Tensor, group: ViewGroup, gen: torch.Generator | None
    ) -> torch.Tensor:
        """All views of one group at once: rows are view-major (view v of sample i is row v*B + i)."""
        b, _, h, w = pixels.shape
        n = group.count * b
        device = pixels.device

        def rand(*shape: int) -> torch.Tensor:
            return _rand(gen, *shape).to(device)

        def per_view(p: tuple[float, ...]) -> torch.Tensor:
            return torch.tensor(p).repeat_interleave(b).to(device)

        boxes = _crop_boxes(n, h, w, group.scale, gen).to(device)
        rois = torch.cat([torch.arange(b, device=device).repeat(group.count).float()[:, None], boxes], dim=1)
        x = roi_align(pixels, rois, output_size=group.size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        x = x.expand(-1, 3, -1, -1)
        gray_rows = gray.repeat(group.count)

        flip = rand(n) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)

        jitter = rand(n) < JITTER_P
        colour = jitter & ~gray_rows
        brightness = torch.where(jitter, 1 + BRIGHTNESS * (2 * rand(n) - 1), 1.0)
        contrast = torch.where(jitter, 1 + CONTRAST * (2 * rand(n) - 1), 1.0)
        saturation = torch.where(colour, 1 + SATURATION * (2 * rand(n) - 1), 1.0)
        hue = HUE * (2 * rand(n) - 1)
        x = (x * brightness[:, None, None, None]).clamp_(0, 1)
        x = _blend(x, _luma(x).mean(dim=(-3, -2, -1), keepdim=True), contrast)
        x = _blend(x, _luma(x), saturation)
        x = torch.where(colour[:, None, None, None], _shift_hue(x, hue), x)

        to_gray = rand(n) < GRAYSCALE_P
        x = torch.where(to_gray[:, None, None, None], _luma(x).expand(-1, 3, -1, -1), x)

        sigma = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * rand(n)
        blur = rand(n) < per_view(group.blur_p)
        x = _gaussian_blur(x, sigma, blur)

        solarize = (rand(n) < per_view(group.solarize_p))[:, None, None, None]
        x = torch.where(solarize & (x >= 128 / 255), 1 - x, x)

        mean = torch.tensor(IMAGENET_MEAN, device=device)[:, None, None]
        std = torch.tensor(IMAGENET_STD, device=device)[:, None, None]
        return (x - mean) / std


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


def _luma(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma (B, 1, H, W), as torchvision's rgb_to_grayscale."""
    r, g, b = x.unbind(dim=-3)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(-3)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = factor[:, None, None, None]
    return (f * x + (1 - f) * other).clamp_(0, 1)


def _shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``shift`` (fraction of a turn, per row) through HSV, as torchvision's adjust_hue."""
    r, g, b = x.unbind(dim=-3)
    v = x.amax(dim=-3)
    c = v - x.amin(dim=-3)
    s = torch.where(v > 0, c / v.clamp_min(1e-12), 0.0)
    cd = c.clamp_min(1e-12)
    h = torch.where(
        v == r,
        (g - b) / cd,
        torch.where(v == g, 2 + (b - r) / cd, 4 + (r - g) / cd),
    )
    h = torch.where(c > 0, h / 6, 0.0)
    h = torch.remainder(h + shift[:, None, None], 1.0)

    def channel(k0: float) -> torch.Tensor:
        k = torch.remainder(k0 + 6 * h, 6)
        return v - v * s * torch.clamp(torch.minimum(k, 4 - k), 0, 1)

    return torch.stack([channel(5), channel(3), channel(1)], dim=-3)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-row sigma; rows with ``apply`` False get an identity (delta)
    kernel, so one grouped convolution serves the whole batch."""
    n, c, h, w = x.shape
    radius = min(math.ceil(3 * BLUR_SIGMA[1]), h - 1, w - 1)
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-(taps[None, :] ** 2) / (2 * sigma[:, None] ** 2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    delta = (taps == 0).to(x.dtype).expand_as(kernel)
    kernel = torch.where(apply[:, None], kernel, delta).repeat_interleave(c, dim=0)  # (n*c, taps)
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), kernel[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "MultiCrop", "ViewGroup"]
