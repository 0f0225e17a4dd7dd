"""Photos and scans stored as ordinary image files: PNG, JPEG, TIFF (non-slide) and BMP.

Fundus, OCT and dermatoscopy collections come this way. Every page of a multi-page TIFF (an OCT volume, say)
becomes one image with its page index as ``frame``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import numpy as np
from PIL import Image as PILImage
from PIL import ImageSequence, UnidentifiedImageError

from ingest.config import IngestConfig
from ingest.schema import DecodeError, Image, InputError, per_file

FORMATS = ("PNG", "JPEG", "TIFF", "BMP")
FUNDUS_THRESHOLD = 20  # grey level above which a pixel is inside the fundus camera's field of view


def require_finite(values: np.ndarray) -> np.ndarray:
    """Refuse NaN and infinite pixel values: no window maps them to a meaningful grey, and a cast would give
    platform-dependent garbage. An input with them is quarantined rather than stored as a black or noisy image."""
    if values.dtype.kind in "fc" and not np.isfinite(values).all():
        bad = int(values.size - np.count_nonzero(np.isfinite(values)))
        raise DecodeError(f"{bad} of {values.size} pixel values are NaN or infinite")
    return values


def scale_to_uint8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map ``[lo, hi]`` linearly onto 0..255, clipping outside; a constant image becomes black.

    ``values`` must be finite. float32 halves the memory traffic; float64 data or a window beyond float32's range
    is computed in float64, and a window wider than float64 can hold is halved first (the same mapping).
    """
    if not hi > lo:  # also a NaN bound
        return np.zeros(values.shape, dtype=np.uint8)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise DecodeError(f"display window [{lo}, {hi}] is not finite")
    if not math.isfinite(hi - lo):
        return scale_to_uint8(values / 2, lo / 2, hi / 2)
    ftype = np.float64 if values.dtype == np.float64 or max(abs(lo), abs(hi)) > 1e30 else np.float32
    out = (values.astype(ftype) - ftype(lo)) * ftype(255.0 / (hi - lo))
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def percentile_window(values: np.ndarray) -> tuple[float, float]:
    """The 0.5/99.5 percentile window deeper greyscale is stored under: a few hot or dead pixels do not set it."""
    lo, hi = np.percentile(require_finite(values), [0.5, 99.5])
    return float(lo), float(hi)


def flatten_alpha(img: PILImage.Image) -> PILImage.Image:
    """Composite an image with transparency on white: transparent pixels often hold arbitrary colours."""
    grey = img.mode in ("LA", "La")
    rgba = img.convert("LA" if grey else "RGBA")
    background = PILImage.new(rgba.mode, rgba.size, (255, 255) if grey else (255, 255, 255, 255))
    background.alpha_composite(rgba)
    return background.convert("L" if grey else "RGB")


def to_uint8_pixels(img: PILImage.Image) -> np.ndarray:
    """Decoded PIL image -> uint8 (H, W) or (H, W, 3); deeper greyscale is windowed at 0.5/99.5 percentiles."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        return np.asarray(flatten_alpha(img.convert("RGBA") if img.mode == "PA" else img))
    if img.mode == "L":
        return np.asarray(img)
    if img.mode == "1":
        return np.asarray(img.convert("L"))
    if img.mode.startswith("I") or img.mode == "F":  # 16/32-bit integer or float greyscale
        values = np.asarray(img)
        return scale_to_uint8(values, *percentile_window(values))
    return np.asarray(img.convert("RGB"))


def crop_fundus(pixels: np.ndarray) -> np.ndarray:
    """Crop a colour fundus photo to the bounding box of its bright circular field of view.

    Rows and columns count as inside when more than 1% of their pixels are above ``FUNDUS_THRESHOLD``, so that
    JPEG noise and stray labels in the black surround do not widen the box. An all-dark photo is kept whole.
    """
    grey = pixels if pixels.ndim == 2 else pixels.max(axis=2)
    bright = grey > FUNDUS_THRESHOLD
    rows = np.flatnonzero(bright.mean(axis=1) > 0.01)
    cols = np.flatnonzero(bright.mean(axis=0) > 0.01)
    if rows.size == 0 or cols.size == 0:
        return pixels
    return pixels[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _open(path: str) -> PILImage.Image:
    """Open an image file, reading its header only."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)  # our own limit applies below
            img = PILImage.open(path, formats=FORMATS)
    except PILImage.DecompressionBombError:
        raise InputError("image declares more pixels than the decompression-bomb limit allows") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        # PIL's messages name the file, so they are not passed on.
        raise InputError("not a PNG, JPEG, TIFF or BMP image") from None
    return img


def read_one(path: str, modality: str | None, cfg: IngestConfig) -> Iterator[Image]:
    """Yield one uint8 image per page of a PNG/JPEG/TIFF/BMP file."""
    if modality is None:
        raise InputError("image files carry no modality; configure one")
    max_pixels = cfg.image.max_pixels
    with _open(path) as img:
        n_pages = getattr(img, "n_frames", 1)
        for index, page in enumerate(ImageSequence.Iterator(img)):
            width, height = page.size  # declared in the header: checked before any pixel is decoded
            if width * height > max_pixels:
                raise InputError(f"image declares {width * height} pixels, above image.max_pixels={max_pixels}")
            try:
                page.load()
            except (OSError, SyntaxError, ValueError) as err:
                raise DecodeError(f"image data is truncated or corrupt ({type(err).__name__})") from None
            pixels = to_uint8_pixels(page)
            if modality == "CFP" and cfg.image.fundus_crop:
                pixels = crop_fundus(pixels)
            yield Image(pixels=pixels, modality=modality, frame=index if n_pages > 1 else None)


read = per_file(read_one)

__all__ = [
    "crop_fundus",
    "flatten_alpha",
    "percentile_window",
    "read",
    "read_one",
    "require_finite",
    "scale_to_uint8",
    "to_uint8_pixels",
]
