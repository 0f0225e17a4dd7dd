"""Whole-slide images (SVS, NDPI, MRXS, pyramidal TIFF, ...) through OpenSlide, as tissue tiles at a fixed resolution.

Tiles are ``tile_size`` pixels at ``target_mpp`` micrometres per pixel whatever the scanner's resolution, read from
the finest pyramid level that is not coarser than the target and resized. Background is dropped with an Otsu
threshold on the saturation of a thumbnail (stained tissue is coloured, glass is grey or white), capped at
``GLASS_SATURATION``: on a slide that is mostly tissue, Otsu splits the tissue itself (pale eosin from dense
nuclei) and would call half of it glass.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import openslide
from PIL import Image as PILImage

from ingest.config import IngestConfig, WsiConfig
from ingest.image import flatten_alpha
from ingest.schema import DecodeError, Image, InputError, per_file

TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")  # classic and BigTIFF, both byte orders
GLASS_SATURATION = 25  # HSV saturation (0-255) above which a pixel is stained; glass and white stay below ~15


def is_slide(path: str) -> bool:
    """Whether OpenSlide recognises the file, so the pipeline routes it here rather than to the image reader."""
    try:
        return openslide.OpenSlide.detect_format(path) is not None
    except openslide.OpenSlideError:
        return False


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold for uint8 values: the level that maximises the between-class variance."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    weight_low = np.cumsum(hist)
    weight_high = weight_low[-1] - weight_low
    mass_low = np.cumsum(hist * np.arange(256))
    mean_low = mass_low / np.maximum(weight_low, 1)
    mean_high = (mass_low[-1] - mass_low) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(np.argmax(between))  # pixels above this level are the upper class


def tissue_mask(thumbnail: PILImage.Image) -> np.ndarray:
    """Boolean mask of the pixels whose HSV saturation is above the Otsu threshold, capped at GLASS_SATURATION."""
    saturation = np.asarray(thumbnail.convert("RGB").convert("HSV"))[:, :, 1]
    return saturation > min(otsu_threshold(saturation), GLASS_SATURATION)


def slide_mpp(slide: openslide.OpenSlide, cfg: WsiConfig) -> float:
    """Micrometres per level-0 pixel as the slide records it, else the configured assumption."""
    try:
        mpp = float(slide.properties[openslide.PROPERTY_NAME_MPP_X])
    except (KeyError, ValueError):
        return cfg.assumed_mpp
    return mpp if math.isfinite(mpp) and mpp > 0 else cfg.assumed_mpp


def tile_grid(slide: openslide.OpenSlide, cfg: WsiConfig) -> tuple[list[tuple[int, int]], float, int]:
    """Level-0 corners of the tissue tiles (row-major, capped), the level-0 tile side and the level to read from."""
    width, height = slide.dimensions
    side = cfg.tile_size * cfg.target_mpp / slide_mpp(slide, cfg)  # tile side in level-0 pixels
    # The finest level whose resolution is not coarser than the target (a level's downsample <= side / tile_size).
    level = max(
        (i for i, d in enumerate(slide.level_downsamples) if d <= side / cfg.tile_size * (1 + 1e-6)),
        default=0,
    )
    thumbnail = slide.get_thumbnail((cfg.thumbnail_size, cfg.thumbnail_size))
    mask = tissue_mask(thumbnail)
    sy, sx = mask.shape[0] / height, mask.shape[1] / width
    corners = []
    for y in np.arange(0, height - side + 1e-6, side):
        for x in np.arange(0, width - side + 1e-6, side):
            window = mask[int(y * sy) : math.ceil((y + side) * sy), int(x * sx) : math.ceil((x + side) * sx)]
            if window.size and window.mean() >= cfg.min_tissue:
                corners.append((int(round(x)), int(round(y))))
    if len(corners) > cfg.max_tiles_per_slide:
        rng = np.random.default_rng([cfg.seed, width, height])
        keep = np.sort(rng.choice(len(corners), size=cfg.max_tiles_per_slide, replace=False))
        corners = [corners[i] for i in keep]
    return corners, side, level


def read_one(path: str, modality: str | None, cfg: IngestConfig) -> Iterator[Image]:
    """Yield the slide's tissue tiles as RGB uint8 images with their level-0 coordinates."""
    wsi = cfg.wsi
    try:
        slide = openslide.OpenSlide(path)
    except openslide.OpenSlideUnsupportedFormatError:
        with open(path, "rb") as fh:
            tiff = fh.read(4) in TIFF_MAGIC
        detail = " (a TIFF that is not tiled, or is truncated)" if tiff else ""
        raise InputError(f"not a whole-slide image OpenSlide can read{detail}") from None
    except openslide.OpenSlideError:  # OpenSlide's own messages can name the file: not passed on
        raise DecodeError("OpenSlide cannot open the slide") from None
    with slide:
        try:
            corners, side, level = tile_grid(slide, wsi)
        except openslide.OpenSlideError:
            raise DecodeError("OpenSlide cannot read the slide's thumbnail") from None
        if not corners:
            raise InputError(f"no tile has tissue fraction >= wsi.min_tissue={wsi.min_tissue}")
        size = max(1, round(side / slide.level_downsamples[level]))  # tile side in pixels of the level read
        for x, y in corners:
            try:
                region = slide.read_region((x, y), level, (size, size))
            except openslide.OpenSlideError:
                raise DecodeError("OpenSlide cannot read a tile of the slide") from None
            tile = flatten_alpha(region)  # outside the scanned area is transparent: white, like glass
            if tile.size != (wsi.tile_size, wsi.tile_size):
                tile = tile.resize((wsi.tile_size, wsi.tile_size), PILImage.Resampling.LANCZOS)
            yield Image(
                pixels=np.asarray(tile),
                modality=modality or "PATH",
                tile_x=x,
                tile_y=y,
                tile_level=level,
                mpp=wsi.target_mpp,
                encoding="jpeg",
            )


read = per_file(read_one)

__all__ = ["is_slide", "otsu_threshold", "read", "read_one", "slide_mpp", "tile_grid", "tissue_mask"]
