"""Sample raw files in the formats a hospital hands over, for the demo, the tests and the benchmarks.

Nothing is downloaded: every image is drawn here (a labelled corpus over the seven modalities, each with a visual
two-class structure a probe can learn), plus pydicom's own real test files. DICOM headers and some file names carry
planted PHI on purpose, and ``CorpusInfo.phi_strings`` lists every planted string, so tests can prove that none of
it reaches an output. Everything is deterministic under ``seed`` (DICOM UIDs included).
"""

from __future__ import annotations

import csv
import functools
import os
import shutil
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pydicom.uid as dcm_uid
import tifffile
from PIL import Image as PILImage
from PIL import ImageDraw, ImageFilter
from pydicom.dataset import Dataset, FileMetaDataset

# Folder name -> what the folder holds; the pipeline maps folder names to modalities.
MODALITY_DIRS = ("ct", "cxr", "us", "path", "cfp", "oct", "derm")

# Planted PHI vocabulary: names of 5+ letters so that scanning output bytes for them cannot match by chance.
_LAST = (
    "HARGREAVES",
    "OKONKWO",
    "LINDQVIST",
    "FITZWILLIAM",
    "ABERNATHY",
    "CASTELLANOS",
    "VANDERMEER",
    "MURAKAMI",
    "QUINTERO",
    "BLACKWOOD",
    "ESPOSITO",
    "WHITAKER",
    "NAKAGAWA",
    "DELACROIX",
    "KOWALCZYK",
    "THORNBURY",
)
_FIRST = (
    "JOSEPHINE",
    "MARGARET",
    "OLUWASEUN",
    "INGRID",
    "THEODORE",
    "BEATRIZ",
    "CORNELIUS",
    "YUKIKO",
    "ESPERANZA",
    "ROSALIND",
    "GIUSEPPE",
    "WINIFRED",
    "HIROSHI",
    "AUGUSTIN",
    "AGNIESZKA",
    "BARNABY",
)
_STREETS = ("Maplewood Avenue", "Cranberry Lane", "Old Mill Road", "Harbourview Terrace", "Juniper Court")
_CITIES = ("Springfield", "Lakewood Falls", "Port Ellison")
_INSTITUTIONS = ("SAINT HARGROVE MEMORIAL HOSPITAL", "NORTHBRIDGE UNIVERSITY MEDICAL CENTER")
_PHYSICIANS = ("PRENDERGAST^HELENA", "MONTGOMERY^ALISTAIR", "WOJCIECHOWSKI^TERESA")

_SOP_CLASS = {
    "CT": dcm_uid.CTImageStorage,
    "CR": dcm_uid.ComputedRadiographyImageStorage,
    "DX": dcm_uid.DigitalXRayImageStorageForPresentation,
    "US": dcm_uid.UltrasoundImageStorage,
    "OP": dcm_uid.OphthalmicPhotography8BitImageStorage,
    "OPT": dcm_uid.OphthalmicTomographyImageStorage,
    "XC": dcm_uid.VLPhotographicImageStorage,
}
_HU_OFFSET = 1024  # CT stores HU + 1024, declared as RescaleIntercept -1024
_CXR_MAX = 4095  # 12-bit radiographs
_PHI_NAME_EVERY = 4  # one sample in four gets a file name made of the patient's name and MRN
_DICOM_DIRS = ("ct", "cxr", "us")
# Folders of photographs and B-scans where one sample in four comes as DICOM instead of a picture file, as a hospital's
# eye clinic (OP fundus photos, OPT OCT volumes) and dermatology (XC photos) store them.
_SOMETIMES_DICOM = {"cfp": "OP", "oct": "OPT", "derm": "XC"}
_SOMETIMES_DICOM_AT = 1  # the sample index modulo _PHI_NAME_EVERY written as DICOM
_TOPCON_AT = 2  # ... and the OCT sample index written as a Topcon .fds file (B-scans and a fundus photo)


def _as_dicom(folder: str, index: int) -> bool:
    return folder in _DICOM_DIRS or (folder in _SOMETIMES_DICOM and index % _PHI_NAME_EVERY == _SOMETIMES_DICOM_AT)


def _as_topcon(folder: str, index: int) -> bool:
    return folder == "oct" and index % _PHI_NAME_EVERY == _TOPCON_AT


@dataclass
class CorpusInfo:
    """What ``make_sample_corpus`` wrote: where, how many files per modality folder, and every planted PHI string."""

    root: Path
    labels_csv: Path
    n_files: dict[str, int]
    phi_strings: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------------
# Drawing primitives (float images in [0, 1], shape (H, W))


@functools.lru_cache(maxsize=8)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates, cached and read-only because every generator (in several threads) shares them."""
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    yy.flags.writeable = xx.flags.writeable = False
    return yy, xx


def _ellipse(shape: tuple[int, int], cy: float, cx: float, ry: float, rx: float, soft: float = 0.0) -> np.ndarray:
    """Ellipse mask, 1 inside; ``soft`` is the fraction of the radius over which the edge fades to 0."""
    yy, xx = _grid(*shape)
    d = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
    if soft <= 0:
        return (d <= 1).astype(np.float32)
    return np.clip((1.0 - d) / soft, 0.0, 1.0)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Low-frequency noise in about [0, 1]: a coarse random grid upsampled bicubically (texture, blobs, shading)."""
    coarse = PILImage.fromarray(rng.random((cells, cells), dtype=np.float32), mode="F")
    return np.asarray(coarse.resize((shape[1], shape[0]), PILImage.BICUBIC))


def _draw_mask(shape: tuple[int, int], draw: Callable[[ImageDraw.ImageDraw], None], blur: float = 0.0) -> np.ndarray:
    """Rasterise PIL drawing calls (fill 255) into a float mask in [0, 1], optionally blurred."""
    canvas = PILImage.new("L", (shape[1], shape[0]), 0)
    draw(ImageDraw.Draw(canvas))
    if blur > 0:
        canvas = canvas.filter(ImageFilter.GaussianBlur(blur))
    return np.asarray(canvas, dtype=np.float32) / 255.0


def _blobs_mask(
    shape: tuple[int, int], ys: np.ndarray, xs: np.ndarray, rys: np.ndarray, rxs: np.ndarray, blur: float = 0.0
) -> np.ndarray:
    """Mask of many small filled ellipses (nuclei, exudates, haemorrhages), drawn by PIL: much faster than one
    dense array per blob."""

    def draw(d: ImageDraw.ImageDraw) -> None:
        for y, x, ry, rx in zip(ys, xs, rys, rxs, strict=True):
            d.ellipse((float(x - rx), float(y - ry), float(x + rx), float(y + ry)), fill=255)

    return _draw_mask(shape, draw, blur)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(img * 255.0 + 0.5, 0.0, 255.0).astype(np.uint8)


def _blend(base: np.ndarray, colour: Iterable[float], alpha: np.ndarray) -> np.ndarray:
    """Paint ``colour`` over an (H, W, 3) image with per-pixel opacity ``alpha``."""
    return base + (np.asarray(tuple(colour), dtype=np.float32) - base) * alpha[..., None]


def _noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian sensor noise, drawn in float32 (half the time and memory of float64 on slide-sized arrays)."""
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(sigma)


# ----------------------------------------------------------------------------------------------------------------
# Modality generators: (rng, size, positive class) -> pixels. Class 1 adds a finding of random position and size.


def _ct_volume(rng: np.random.Generator, n_slices: int, size: int, lesion: bool) -> np.ndarray:
    """Abdomen-like slices in HU: body, fat rim, liver, spine and aorta; class 1 adds a hyperdense liver lesion
    large enough to cross every slice of the series."""
    s = size
    shape = (s, s)
    cy, cx = s * rng.uniform(0.47, 0.53), s * rng.uniform(0.47, 0.53)
    ry, rx = s * rng.uniform(0.33, 0.4), s * rng.uniform(0.42, 0.47)
    liver_c = (cy - ry * 0.15, cx - rx * rng.uniform(0.35, 0.5))
    liver_r = (ry * rng.uniform(0.45, 0.6), rx * rng.uniform(0.35, 0.45))
    lesion_c = (liver_c[0] + liver_r[0] * rng.uniform(-0.4, 0.4), liver_c[1] + liver_r[1] * rng.uniform(-0.4, 0.4))
    lesion_r, lesion_aspect, lesion_hu = s * rng.uniform(0.07, 0.11), rng.uniform(0.85, 1.15), rng.uniform(110, 170)
    vol = np.empty((n_slices, s, s), dtype=np.float32)
    for k in range(n_slices):
        dz = (k - (n_slices - 1) / 2) / max(n_slices, 1)
        body = _ellipse(shape, cy, cx, ry * (1 - 0.05 * dz), rx, soft=0.02)
        inner = _ellipse(shape, cy, cx, ry * 0.9, rx * 0.92, soft=0.05)
        hu = -1000.0 + body * 900.0 + inner * 140.0  # air, fat (-100), soft tissue (+40)
        hu += 30.0 * _ellipse(shape, *liver_c, *liver_r, soft=0.1)
        hu += 650.0 * _ellipse(shape, cy + ry * 0.62, cx, s * 0.05, s * 0.06, soft=0.3)  # vertebra
        hu += 140.0 * _ellipse(shape, cy + ry * 0.35, cx + s * 0.03, s * 0.03, s * 0.03, soft=0.3)  # aorta
        if lesion:
            r = lesion_r * (1.0 - 0.4 * abs(dz))
            hu += lesion_hu * _ellipse(shape, *lesion_c, r, r * lesion_aspect, soft=0.35)
        hu += inner * 25.0 * (_smooth_noise(rng, shape, 12) - 0.5)
        vol[k] = hu + _noise(rng, shape, 12.0)
    return np.clip(vol, -1024.0, 3000.0)


def _cxr_image(rng: np.random.Generator, size: int, lesion: bool) -> np.ndarray:
    """Chest radiograph in presentation values (1 = dense): body, two lungs with ribs, heart; class 1 adds a
    lower-zone opacity (consolidation or effusion) in one lung, up to a random level."""
    s = size
    shape = (s, s)
    yy, xx = _grid(*shape)
    cx = s * rng.uniform(0.46, 0.54)
    img = 0.08 + 0.55 * _ellipse(shape, s * 0.58, cx, s * 0.6, s * rng.uniform(0.4, 0.46), soft=0.2)
    lungs = np.zeros(shape, np.float32)
    lung_geo = []
    for side in (-1, 1):
        lc = (s * rng.uniform(0.44, 0.5), cx + side * s * rng.uniform(0.16, 0.2))
        lr = (s * rng.uniform(0.27, 0.32), s * rng.uniform(0.11, 0.14))
        lung_geo.append((lc[0], lr[0], _ellipse(shape, *lc, *lr, soft=0.35)))
        lungs = np.maximum(lungs, lung_geo[-1][2])
    ribs = (np.sin(yy * (2 * np.pi / (s * 0.09)) + ((xx - cx) / s) ** 2 * 20.0) > 0.55).astype(np.float32)
    img += lungs * (0.08 * ribs - 0.42)
    img += 0.3 * _ellipse(shape, s * 0.62, cx + s * 0.04, s * 0.13, s * rng.uniform(0.13, 0.18), soft=0.5)
    if lesion:
        ly, lry, lung = lung_geo[rng.integers(2)]
        level = ly + lry * rng.uniform(-0.4, 0.2)
        img += rng.uniform(0.34, 0.44) * lung * np.clip((yy - level) / (s * 0.04), 0.0, 1.0)  # lung whited out
    img = img * rng.uniform(0.92, 1.06) + 0.06 * (_smooth_noise(rng, shape, 6) - 0.5)
    return np.clip(img + _noise(rng, shape, 0.025), 0.0, 1.0)


def _us_frames(rng: np.random.Generator, size: int, lesion: bool, n_frames: int = 1) -> np.ndarray:
    """RGB ultrasound (n_frames, H, W, 3): speckled tissue in a fan-shaped sector with a colour scale bar; class 1
    adds an anechoic cyst with posterior acoustic enhancement."""
    s = size
    shape = (s, s)
    yy, xx = _grid(*shape)
    r = np.hypot(yy - s * 0.02, xx - s * 0.5)
    theta = np.arctan2(xx - s * 0.5, yy - s * 0.02)
    sector = ((r > s * 0.1) & (r < s * 0.95) & (np.abs(theta) < 0.6)).astype(np.float32)
    echo = 0.45 + 0.3 * _smooth_noise(rng, shape, 6)
    echo += 0.2 * (np.sin(r / s * rng.uniform(14, 22) + rng.uniform(0, 6.3)) > 0.75)  # fascia-like layers
    echo *= 1.0 - 0.45 * r / s  # depth attenuation
    if lesion:
        depth, angle = s * rng.uniform(0.35, 0.7), rng.uniform(-0.3, 0.3)
        cy, cx = s * 0.02 + depth * np.cos(angle), s * 0.5 + depth * np.sin(angle)
        ry = s * rng.uniform(0.08, 0.12)
        rx = ry * rng.uniform(1.0, 1.5)
        cyst = _ellipse(shape, cy, cx, ry, rx, soft=0.25)
        enhance = np.clip((yy - cy) / (s * 0.3), 0, 1) * (np.abs(xx - cx) < rx * 0.8)  # brighter behind fluid
        echo = echo * (1.0 - 0.92 * cyst) * (1.0 + 0.45 * enhance * (1 - cyst))
    bar = ((xx >= s - 7) & (xx < s - 3) & (yy > s * 0.2) & (yy < s * 0.8)).astype(np.float32)
    bar_colour = np.stack([np.ones(shape), 1.0 - (yy - s * 0.2) / (s * 0.6), np.zeros(shape)], -1) * bar[..., None]
    frames = np.empty((n_frames, s, s, 3), dtype=np.uint8)
    for f in range(n_frames):
        speckle = rng.rayleigh(1.0, shape).astype(np.float32) / np.sqrt(np.pi / 2)
        gray = np.roll(echo, f * int(rng.integers(-2, 3)), axis=1) * speckle * sector * 0.85
        rgb = np.repeat(gray[..., None], 3, axis=-1) * (1 - bar[..., None]) + bar_colour
        frames[f] = _to_uint8(rgb)
    return frames


def _he_slide(rng: np.random.Generator, size: int, dense: bool) -> np.ndarray:
    """H&E-like RGB slide: pink stroma with purple nuclei on white glass; class 1 has dense, large, dark nuclei
    (a tumour-like field), class 0 sparse, small, pale ones."""
    s = size
    shape = (s, s)
    blob = _smooth_noise(rng, shape, 5)
    tissue = np.clip((blob - np.quantile(blob, rng.uniform(0.12, 0.3))) * 20.0, 0.0, 1.0)
    fibres = _smooth_noise(rng, shape, max(8, s // 24))
    stain = rng.uniform(0.92, 1.06, 3).astype(np.float32)
    stroma = np.stack([0.93 - 0.05 * fibres, 0.55 + 0.15 * fibres, 0.74 + 0.08 * fibres], -1) * stain
    density, radius, colour = (
        (rng.uniform(2.8e-3, 4.0e-3), (4.0, 8.0), (0.28, 0.12, 0.45))
        if dense
        else (rng.uniform(0.6e-3, 1.2e-3), (2.5, 4.5), (0.5, 0.3, 0.65))
    )
    n = int(density * s * s)
    ys, xs = rng.integers(0, s, (2, n))
    keep = tissue[ys, xs] > 0.5
    ry, rx = rng.uniform(*radius, (2, n))
    nuclei = _blobs_mask(shape, ys[keep], xs[keep], ry[keep], rx[keep], blur=0.8) * tissue
    rgb = _blend(stroma, (0.95, 0.95, 0.95), 1.0 - tissue)
    rgb = _blend(rgb, np.asarray(colour) * stain, nuclei * 0.9)
    return _to_uint8(rgb)  # no sensor noise: scanners' slides are smooth, and noise would triple the file size


def _fundus(rng: np.random.Generator, size: int, lesion: bool) -> np.ndarray:
    """Colour fundus photo: orange-red disc on black with optic disc, macula and vessels; class 1 adds yellow hard
    exudates near the macula and sometimes dark red haemorrhages."""
    s = size
    shape = (s, s)
    c = s / 2 + rng.uniform(-0.02, 0.02, 2) * s
    R = s * 0.46
    yy, xx = _grid(*shape)
    d = np.hypot(yy - c[0], xx - c[1]) / R
    base = np.asarray([0.82, 0.36, 0.12], np.float32) * rng.uniform(0.85, 1.1, 3).astype(np.float32)
    shade = (1.0 - 0.45 * d**2) * (1.0 + 0.12 * (_smooth_noise(rng, shape, 8) - 0.5))
    rgb = base * shade[..., None]
    side = rng.choice((-1, 1))  # left or right eye: the disc lies nasal to the macula
    disc = (c[0] + rng.uniform(-0.05, 0.05) * s, c[1] + side * s * 0.26)
    rgb = _blend(rgb, (1.0, 0.86, 0.55), _ellipse(shape, *disc, s * 0.07, s * 0.06, soft=0.4))
    macula = (c[0], c[1] - side * s * 0.02)
    rgb *= 1.0 - 0.25 * _ellipse(shape, *macula, s * 0.08, s * 0.08, soft=1.0)[..., None]
    width = max(1, round(s / 90))
    # Vessels: arcades leaving the disc above and below and bending around the macula (wide first pair).
    t = np.linspace(0.0, 1.0, 16)
    spreads = rng.uniform(0.6, 1.2, 6) * np.repeat([0.5, 0.7, 0.9], 2) * np.tile([-1, 1], 3)
    arcs = [np.stack([disc[1] - side * t * R * 1.1, disc[0] + R * sp * np.sin(t * 2.2)], -1) for sp in spreads]

    def vessels(draw: ImageDraw.ImageDraw) -> None:
        for k, arc in enumerate(arcs):
            draw.line(arc.ravel().tolist(), fill=255, width=width * (2 if k < 2 else 1), joint="curve")

    v = _draw_mask(shape, vessels, blur=0.6)
    rgb = rgb * (1.0 - v[..., None] * np.asarray([0.35, 0.65, 0.7], np.float32))
    if lesion:
        n = int(rng.integers(8, 18))
        r = rng.uniform(0.012, 0.03, n) * s + 0.5
        ey, ex = np.asarray(macula)[:, None] + rng.normal(0.0, s * 0.12, (2, n))
        rgb = _blend(rgb, (1.0, 0.92, 0.45), _blobs_mask(shape, ey, ex, r, r, blur=0.5))
        if rng.random() < 0.5:
            n = int(rng.integers(2, 6))
            r = rng.uniform(0.02, 0.04, n) * s
            hy, hx = c[:, None] + rng.normal(0.0, s * 0.18, (2, n))
            rgb = _blend(rgb, (0.4, 0.04, 0.02), _blobs_mask(shape, hy, hx, r, r, blur=0.8))
    fov = _ellipse(shape, c[0], c[1], R, R, soft=0.02)
    return _to_uint8((rgb + _noise(rng, (s, s, 3), 0.02)) * fov[..., None])


# OCT retinal layers from the inner surface down: (thickness as a fraction of the image height, reflectivity).
_OCT_LAYERS = (
    (0.025, 0.75),  # nerve fibre layer
    (0.05, 0.45),  # ganglion cell + inner plexiform
    (0.03, 0.22),  # inner nuclear
    (0.02, 0.5),  # outer plexiform
    (0.06, 0.18),  # outer nuclear
    (0.012, 0.8),  # ellipsoid zone
    (0.012, 0.35),  # interdigitation
    (0.022, 0.95),  # retinal pigment epithelium
)


def _oct_bscan(rng: np.random.Generator, size: int, fluid: bool) -> np.ndarray:
    """Grayscale OCT B-scan: curved reflective layers with a foveal pit over a fading choroid, with speckle;
    class 1 adds one to three intraretinal fluid cysts (dark, in the nuclear layers) that push the deeper layers
    down, thickening the retina as macular oedema does."""
    s = size
    shape = (s, s)
    yy, xx = _grid(*shape)
    xf = s * rng.uniform(0.4, 0.6)
    surface = s * (rng.uniform(0.31, 0.35) + rng.uniform(0.05, 0.15) * (xx / s - 0.5) ** 2)
    surface += s * 0.045 * np.exp(-(((xx - xf) / (s * 0.07)) ** 2))
    depth = (yy - surface) / s
    bounds = np.cumsum([t for t, _ in _OCT_LAYERS])
    cyst = np.zeros(shape, bool)
    for _ in range(int(rng.integers(1, 4)) if fluid else 0):
        fy = bounds[1] + (bounds[4] - bounds[1]) * rng.uniform(0.3, 0.7)
        fx = xf + s * rng.uniform(-0.18, 0.18)
        half = rng.uniform(0.04, 0.065) * np.sqrt(np.clip(1.0 - ((xx - fx) / (s * rng.uniform(0.08, 0.15))) ** 2, 0, 1))
        cyst |= (depth >= fy - half) & (depth < fy + half)
        depth = np.where(depth >= fy + half, depth - 2 * half, depth)  # tissue below moves down by the cyst
    refl = np.asarray([0.04] + [r for _, r in _OCT_LAYERS] + [0.0], np.float32)  # vitreous, layers, (choroid)
    img = refl[np.where(depth < 0, 0, 1 + np.searchsorted(bounds, depth, side="right"))]
    img += (depth >= bounds[-1]) * 0.45 * np.exp(-(depth - bounds[-1]) * 12.0)  # choroid fading with depth
    img[cyst] = 0.03
    speckle = rng.gamma(2.0, 0.5, shape).astype(np.float32)
    return _to_uint8(img * speckle * rng.uniform(0.85, 1.1) + (0.03 + _noise(rng, shape, 0.02)))


def _derm_photo(rng: np.random.Generator, size: int, malignant: bool) -> np.ndarray:
    """Dermoscopy-like skin photo: skin tone with shading and hairs, one lesion; class 0 a round uniform brown
    nevus, class 1 a larger irregular lesion with black and blue-grey regions."""
    s = size
    shape = (s, s)
    yy, xx = _grid(*shape)
    t = rng.uniform()
    skin = ((1 - t) * np.asarray([0.93, 0.78, 0.68]) + t * np.asarray([0.62, 0.42, 0.3])).astype(np.float32)
    g = rng.normal(size=2)
    light = 1.0 - 0.15 * ((yy * g[0] + xx * g[1]) / (s * np.hypot(*g)) + 0.5)
    rgb = skin * (light * (1 + 0.08 * (_smooth_noise(rng, shape, 10) - 0.5)))[..., None]
    cy, cx = s * (0.5 + rng.uniform(-0.12, 0.12, 2))
    # Border as a radius over angle: harmonics 2..7 with large amplitudes make it irregular.
    amp = rng.uniform(0.06, 0.16, 6) if malignant else np.r_[rng.uniform(0.0, 0.06), rng.uniform(0.0, 0.015, 5)]
    rad = s * (rng.uniform(0.16, 0.27) if malignant else rng.uniform(0.1, 0.18))
    ang = np.arctan2(yy - cy, xx - cx)
    harmonics = np.cos(np.arange(2, 8)[:, None, None] * ang + rng.uniform(0, 2 * np.pi, (6, 1, 1)))
    edge = rad * (1 + np.tensordot(amp.astype(np.float32), harmonics, axes=1))
    lesion = np.clip((edge - np.hypot(yy - cy, xx - cx)) / (s * 0.02), 0.0, 1.0)
    if malignant:
        regions = _smooth_noise(rng, shape, 5)
        rgb = _blend(rgb, (0.3, 0.18, 0.13), lesion)
        rgb = _blend(rgb, (0.1, 0.07, 0.07), lesion * (regions > 0.55))
        rgb = _blend(rgb, (0.42, 0.46, 0.55), lesion * (regions < 0.35) * 0.8)
    else:
        rgb = _blend(rgb, skin * np.asarray([0.68, 0.55, 0.5], np.float32), lesion * 0.9)
    hairs = rng.uniform(0, s, (int(rng.integers(0, 5)), 4))

    def draw_hairs(draw: ImageDraw.ImageDraw) -> None:
        for x0, y0, x1, y1 in hairs:
            draw.line((float(x0), float(y0), float(x1), float(y1)), fill=255, width=1)

    rgb = _blend(rgb, (0.15, 0.1, 0.08), _draw_mask(shape, draw_hairs) * 0.8)
    return _to_uint8(rgb + _noise(rng, (s, s, 3), 0.015))


# ----------------------------------------------------------------------------------------------------------------
# Writers


def _uid(rng: np.random.Generator) -> str:
    """A DICOM UID derived from ``rng`` so that the corpus is byte-for-byte reproducible under its seed."""
    return dcm_uid.generate_uid(entropy_srcs=[str(int(rng.integers(2**63)))])


def _new_dicom(
    modality: str,
    sop_class: str,
    *,
    patient_id: str,
    phi: dict[str, str],
    rng: np.random.Generator,
    study_uid: str | None = None,
    series_uid: str | None = None,
) -> Dataset:
    """A DICOM dataset with file meta, identity (planted PHI included) and UIDs, ready for pixel data."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = _uid(rng)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = dcm_uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.ImplementationClassUID = dcm_uid.PYDICOM_IMPLEMENTATION_UID
    ds.Modality = modality
    ds.PatientID = patient_id
    for keyword, value in phi.items():
        setattr(ds, keyword, value)
    ds.StudyInstanceUID = study_uid or _uid(rng)
    ds.SeriesInstanceUID = series_uid or _uid(rng)
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    return ds


def write_ct_series(
    dir: Path,
    n_slices: int,
    size: int,
    *,
    patient_id: str,
    phi: dict[str, str],
    rng: np.random.Generator,
    lesion: bool,
) -> list[Path]:
    """Write one axial CT series as ``dir/slice_XXX.dcm`` (int16, HU = pixel - 1024), with file names shuffled
    against slice position so that a reader must order slices by ImagePositionPatient. ``phi`` maps DICOM
    keywords to planted values. Returns the paths in name order."""
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    hu = _ct_volume(rng, n_slices, size, lesion)
    study_uid, series_uid, frame_uid = _uid(rng), _uid(rng), _uid(rng)
    spacing, thickness = 350.0 / size, 2.5
    z0 = float(rng.uniform(-400.0, 0.0))
    names = rng.permutation(n_slices)
    paths = []
    for k in range(n_slices):
        ds = _new_dicom(
            "CT", _SOP_CLASS["CT"], patient_id=patient_id, phi=phi, rng=rng, study_uid=study_uid, series_uid=series_uid
        )
        ds.FrameOfReferenceUID = frame_uid
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [-175.0, -175.0, z0 + k * thickness]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.SliceLocation = z0 + k * thickness
        ds.PixelSpacing = [spacing, spacing]
        ds.SliceThickness = thickness
        ds.set_pixel_data((hu[k] + _HU_OFFSET).astype(np.int16), "MONOCHROME2", 16, generate_instance_uid=False)
        ds.RescaleIntercept = -_HU_OFFSET
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter, ds.WindowWidth = 40, 400
        path = dir / f"slice_{names[k]:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return sorted(paths)


def write_dicom_image(
    path: Path,
    pixels: np.ndarray,
    *,
    modality: str,
    patient_id: str,
    phi: dict[str, str],
    rng: np.random.Generator,
    photometric: str | None = None,
) -> Path:
    """Write a CR/DX radiograph, a US image, an OP fundus photo, an OPT OCT volume or an XC skin photo as DICOM.

    CR/DX: ``pixels`` are 12-bit presentation values (higher = denser = brighter); MONOCHROME1 stores them inverted,
    as many CR devices do, so a reader that ignores the photometric interpretation shows a negative.
    US: uint8 RGB, (H, W, 3), or (frames, H, W, 3) for a multi-frame cine loop. OP, XC: uint8 RGB (H, W, 3).
    OPT: uint8 B-scans (frames, H, W).
    """
    pixels = np.asarray(pixels)
    if modality in ("CR", "DX"):
        photometric = photometric or "MONOCHROME2"
        if pixels.ndim != 2 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
            raise ValueError(f"{modality} needs 2D pixels and MONOCHROME1/2, got {pixels.shape} {photometric}")
        stored = np.clip(pixels, 0, _CXR_MAX).astype(np.uint16)
        if photometric == "MONOCHROME1":
            stored = _CXR_MAX - stored
        bits, sop_class = 12, _SOP_CLASS[modality]
    elif modality == "US":
        if pixels.dtype != np.uint8 or pixels.ndim not in (3, 4) or pixels.shape[-1] != 3:
            raise ValueError(f"US needs uint8 RGB pixels (H, W, 3) or (F, H, W, 3), got {pixels.dtype} {pixels.shape}")
        stored, photometric, bits = pixels, "RGB", 8
        sop_class = dcm_uid.UltrasoundMultiFrameImageStorage if pixels.ndim == 4 else _SOP_CLASS["US"]
    elif modality in ("OP", "XC"):
        if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[-1] != 3:
            raise ValueError(f"{modality} needs uint8 RGB pixels (H, W, 3), got {pixels.dtype} {pixels.shape}")
        stored, photometric, bits, sop_class = pixels, "RGB", 8, _SOP_CLASS[modality]
    elif modality == "OPT":
        if pixels.dtype != np.uint8 or pixels.ndim != 3:
            raise ValueError(f"OPT needs uint8 B-scans (frames, H, W), got {pixels.dtype} {pixels.shape}")
        stored, photometric, bits, sop_class = pixels, "MONOCHROME2", 8, _SOP_CLASS[modality]
    else:
        raise ValueError(f"write_dicom_image writes CR, DX, US, OP, OPT or XC, not {modality!r}")
    ds = _new_dicom(modality, sop_class, patient_id=patient_id, phi=phi, rng=rng)
    ds.set_pixel_data(stored, photometric, bits, generate_instance_uid=False)
    if modality == "US":
        if pixels.ndim == 4:
            ds.FrameTime = 33.3
    elif modality in ("CR", "DX"):
        ds.BodyPartExamined = "CHEST"
        ds.ViewPosition = "PA"
        ds.ImagerPixelSpacing = [0.14 * 2048 / pixels.shape[0]] * 2
        ds.WindowCenter, ds.WindowWidth = _CXR_MAX // 2 + 1, _CXR_MAX + 1
        if modality == "DX":
            ds.PresentationIntentType = "FOR PRESENTATION"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_dicom_slide(
    dir: Path,
    image_rgb: np.ndarray,
    *,
    patient_id: str,
    phi: dict[str, str],
    rng: np.random.Generator,
    tile: int = 256,
    levels: int = 2,
    mpp: float = 0.5,
) -> list[Path]:
    """Write a DICOM whole-slide image (VL Whole Slide Microscopy, SM) as ``dir/level_K.dcm`` (TILED_FULL,
    uncompressed, each level half the previous) plus ``dir/label.dcm``, a LABEL image showing the patient's name
    as a slide label would: the layout a scanner's DICOM export gives, and OpenSlide 4 opens. Returns the paths."""
    image_rgb = np.asarray(image_rgb)
    if image_rgb.dtype != np.uint8 or image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or levels < 1:
        raise ValueError(f"need uint8 (H, W, 3) pixels and levels >= 1, got {image_rgb.dtype} {image_rgb.shape}")
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid, frame_uid = _uid(rng), _uid(rng), _uid(rng)
    level = PILImage.fromarray(image_rgb)
    paths = []
    for k in range(levels + 1):
        label = k == levels
        ds = _new_dicom(
            "SM", dcm_uid.VLWholeSlideMicroscopyImageStorage,
            patient_id=patient_id, phi=phi, rng=rng, study_uid=study_uid, series_uid=series_uid,
        )  # fmt: skip
        ds.FrameOfReferenceUID = frame_uid
        ds.InstanceNumber = k + 1
        ds.TotalPixelMatrixFocalPlanes = ds.NumberOfOpticalPaths = 1
        path_item = Dataset()
        path_item.OpticalPathIdentifier = "1"
        ds.OpticalPathSequence = [path_item]
        if label:  # a photo of the slide's paper label: the name on it
            pixels = np.full((64, 192, 3), 255, np.uint8)
            draw = ImageDraw.Draw(img := PILImage.fromarray(pixels))
            draw.text((4, 24), phi.get("PatientName", patient_id), fill=(0, 0, 0))
            ds.ImageType = ["ORIGINAL", "PRIMARY", "LABEL", "NONE"]
            ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = img.width, img.height  # one frame, whole
            ds.DimensionOrganizationType = "TILED_FULL"
            ds.set_pixel_data(np.asarray(img), "RGB", 8, generate_instance_uid=False)
        else:
            if k:
                level = level.resize((max(1, level.width // 2), max(1, level.height // 2)), PILImage.Resampling.BOX)
            pixels = np.asarray(level)
            h, w = pixels.shape[:2]
            ny, nx = -(-h // tile), -(-w // tile)
            padded = np.zeros((ny * tile, nx * tile, 3), np.uint8)
            padded[:h, :w] = pixels
            frames = padded.reshape(ny, tile, nx, tile, 3).swapaxes(1, 2).reshape(ny * nx, tile, tile, 3)
            ds.ImageType = ["ORIGINAL" if k == 0 else "DERIVED", "PRIMARY", "VOLUME", "NONE" if k == 0 else "RESAMPLED"]
            ds.DimensionOrganizationType = "TILED_FULL"
            ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = w, h
            ds.set_pixel_data(frames, "RGB", 8, generate_instance_uid=False)
            measures = Dataset()
            measures.PixelSpacing = [mpp * 2**k / 1000] * 2  # millimetres, row then column
            measures.SliceThickness = 0.001
            shared = Dataset()
            shared.PixelMeasuresSequence = [measures]
            ds.SharedFunctionalGroupsSequence = [shared]
            ds.ImagedVolumeWidth, ds.ImagedVolumeHeight = w * mpp * 2**k / 1000, h * mpp * 2**k / 1000
        paths.append(dir / ("label.dcm" if label else f"level_{k}.dcm"))
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def write_pyramidal_tiff(
    path: Path, image_rgb: np.ndarray, *, tile: int = 256, levels: int = 3, mpp: float = 0.5
) -> Path:
    """Write a tiled pyramidal TIFF that OpenSlide opens as ``generic-tiff``: ``levels`` top-level pages, each half
    the previous, deflate-compressed, with resolution tags (pixels per cm) giving ``mpp`` micrometres per pixel."""
    image_rgb = np.asarray(image_rgb)
    if image_rgb.dtype != np.uint8 or image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or levels < 1:
        raise ValueError(f"need uint8 (H, W, 3) pixels and levels >= 1, got {image_rgb.dtype} {image_rgb.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    level = PILImage.fromarray(image_rgb)
    opts: dict[str, Any] = {
        "tile": (tile, tile),
        "photometric": "rgb",
        "compression": "zlib",
        "compressionargs": {"level": 1},
        "resolutionunit": "CENTIMETER",
        "metadata": None,
    }
    with tifffile.TiffWriter(path) as tif:
        for k in range(levels):
            px_per_cm = 1e4 / (mpp * 2**k)
            tif.write(np.asarray(level), resolution=(px_per_cm, px_per_cm), subfiletype=1 if k else 0, **opts)
            level = level.reduce(2)
    return path


def _fds_chunk(name: str, data: bytes) -> bytes:
    return bytes([len(name)]) + name.encode() + np.uint32(len(data)).tobytes() + data


def write_topcon_fds(
    path: Path,
    bscans: np.ndarray,
    fundus_rgb: np.ndarray | None = None,
    *,
    patient_id: str,
    name: tuple[str, str],
    birth_date: tuple[int, int, int],
    captured: tuple[int, int, int, int, int, int],
    eye: int = 0,
) -> Path:
    """Write a Topcon .fds OCT file: the FOCT header and the chunks a Topcon export has for one 3-D scan (the
    uint16 B-scans, scan geometry, capture info with date and eye, patient info with name and birth date, and an
    optional fundus photo), laid out by oct-converter's own structure definitions of the format (after uocte's
    description). ``bscans`` is (N, H, W) uint16; ``name`` is (first, last)."""
    from oct_converter.readers.binary_structs import fds_binary

    bscans = np.asarray(bscans)
    if bscans.dtype != np.uint16 or bscans.ndim != 3:
        raise ValueError(f"need uint16 (N, H, W) B-scans, got {bscans.dtype} {bscans.shape}")
    n, height, width = bscans.shape

    def record(struct, **values) -> bytes:  # a zeroed record with ``values`` filled in
        fields = struct.parse(bytes(struct.sizeof()))
        fields.update(values)
        return struct.build(fields)

    volume = bscans.transpose(2, 1, 0).ravel(order="F").astype("<u2").tobytes()  # the reader's (W, H, N), Fortran
    geometry = dict(width=width, height=height, bits_per_pixel=16, number_slices=n, size=len(volume))
    patient = dict(patient_id=patient_id, first_name=name[0], last_name=name[1], sex=2, birth_date=list(birth_date))
    spacing = dict(x_dimension_mm=6.0, y_dimension_mm=6.0, z_resolution_um=2.6)
    chunks = [
        _fds_chunk("@IMG_SCAN_03", record(fds_binary.oct_header, scan_mode=2, **geometry) + volume),
        _fds_chunk("@PARAM_SCAN_04", record(fds_binary.param_scan_04_header, **spacing)),
        _fds_chunk("@CAPTURE_INFO_02", record(fds_binary.capture_info_02_header, eye=eye, cap_date=list(captured))),
        _fds_chunk("@PATIENT_INFO_02", record(fds_binary.patient_info_02_header, **patient)),
    ]
    if fundus_rgb is not None:
        fundus_rgb = np.asarray(fundus_rgb, dtype=np.uint8)
        photo = fundus_rgb[:, :, ::-1].transpose(2, 1, 0).ravel(order="F").tobytes()  # BGR planes, Fortran
        header = record(fds_binary.fundus_header, width=fundus_rgb.shape[1], height=fundus_rgb.shape[0],
                        bits_per_pixel=24, number_slices=1, size=len(photo))  # fmt: skip
        chunks.append(_fds_chunk("@IMG_OBS", header + photo))
    head = fds_binary.header.build({"file_code": "FOCT", "file_type": "FDA", "major_ver": 3, "minor_ver": 1000})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(head + b"".join(chunks) + b"\0")
    return path


def write_zeiss_img(path: Path, bscans: np.ndarray) -> Path:
    """Write a Zeiss Cirrus .img volume: headerless uint8 samples, depth fastest, then A-scans, then B-scans (how
    Cirrus exports a cube). ``bscans`` is (N, depth, A-scans); the file name should carry the scan pattern
    (``..._Macular Cube 512x128_...``), as an export's does, for the reader to know the A-scans."""
    bscans = np.asarray(bscans)
    if bscans.dtype != np.uint8 or bscans.ndim != 3:
        raise ValueError(f"need uint8 (N, depth, A-scans) B-scans, got {bscans.dtype} {bscans.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bscans.transpose(1, 2, 0).ravel(order="F").tobytes())
    return path


def copy_pydicom_testdata(dest: Path, modalities: Iterable[str] = ("CT", "CR", "DX", "US")) -> list[Path]:
    """Copy pydicom's real test files of ``modalities`` that hold pixel data the installed decoders can decode
    (first frame decoded to be sure) into ``dest/<Modality>/``; real vendors' files exercise what we do not draw."""
    from pydicom.data import get_testdata_files
    from pydicom.pixels import pixel_array

    wanted = set(modalities)
    copied: list[Path] = []
    for src in sorted(get_testdata_files(), key=lambda p: Path(p).name):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(src, defer_size="1 KB")
                if ds.get("Modality") not in wanted or "PixelData" not in ds:
                    continue
                pixel_array(src, index=0)
            except Exception:  # noqa: BLE001 - not DICOM, or not decodable here: not a usable sample
                continue
        out_dir = Path(dest) / str(ds.Modality)
        name = Path(src).name if Path(src).suffix == ".dcm" else f"{Path(src).name}.dcm"
        if (out_dir / name).exists():  # same name in two test-data folders
            name = f"{Path(src).parent.name}_{name}"
        out_dir.mkdir(parents=True, exist_ok=True)
        copied.append(Path(shutil.copyfile(src, out_dir / name)))
    return copied


# ----------------------------------------------------------------------------------------------------------------
# The corpus


@dataclass
class _Patient:
    mrn: str
    phi: dict[str, str]  # DICOM keyword -> planted value
    name_stem: str  # LAST_FIRST_MRN, for file names that carry PHI


def _patients(rng: np.random.Generator, n: int) -> list[_Patient]:
    mrns = rng.choice(10**6, size=n, replace=False)
    names = rng.choice(len(_LAST) * len(_FIRST), size=n, replace=n > len(_LAST) * len(_FIRST))
    out = []
    for mrn_no, name_no in zip(mrns, names, strict=True):
        last, first = _LAST[name_no // len(_FIRST)], _FIRST[name_no % len(_FIRST)]
        mrn = f"MRN-{mrn_no:06d}"
        year, month, day = rng.integers(1940, 1996), rng.integers(1, 13), rng.integers(1, 29)
        phi = {
            "PatientName": f"{last}^{first}^{chr(65 + int(rng.integers(26)))}",
            "PatientBirthDate": f"{year}{month:02d}{day:02d}",
            "PatientAddress": f"{rng.integers(10, 9999)} {rng.choice(_STREETS)}, {rng.choice(_CITIES)}",
            "InstitutionName": str(rng.choice(_INSTITUTIONS)),
            "OtherPatientIDs": f"SSN-{rng.integers(100, 899)}-{rng.integers(10, 99)}-{rng.integers(1000, 9999)}",
        }
        out.append(_Patient(mrn, phi, f"{last}_{first}_{mrn}"))
    return out


def _save_png(path: Path, pixels: np.ndarray) -> None:
    PILImage.fromarray(pixels).save(path, format="PNG")


def _save_jpeg(path: Path, pixels: np.ndarray) -> None:
    PILImage.fromarray(pixels).save(path, format="JPEG", quality=92)


def make_sample_corpus(
    root: Path,
    *,
    per_class: int = 24,
    size: int = 128,
    seed: int = 0,
    ct_slices: int = 4,
    slide_size: int = 1024,
) -> CorpusInfo:
    """Write a labelled two-class corpus for all seven modalities under ``root`` plus ``root/labels.csv``.

    Layout: ``ct/<series>/slice_XXX.dcm``, ``cxr/<id>.dcm`` (CR/DX), ``us/<id>.dcm`` (RGB; one cine loop per
    class), ``path/<id>.tiff`` (pyramidal, ``slide_size`` square), ``cfp/<id>.png``, ``oct/<id>.png``,
    ``derm/<id>.jpg``, with one eye and skin sample in four as DICOM and one OCT sample in four as a Topcon
    ``.fds`` (three B-scans and a fundus photo); one sample in four is named after its patient (PHI in the
    path). ``per_class`` samples per class and modality (a sample is one CT series of ``ct_slices`` files, one
    slide, or one image file). Patients
    own several samples across modalities, so a patient-level split matters; the split column is left empty for
    the pipeline to fill. labels.csv has one row per file (path relative to root, label "0"/"1", split, raw MRN).
    """
    if per_class < 1 or size < 32 or slide_size < 256 or ct_slices < 2:
        raise ValueError("need per_class >= 1, size >= 32, slide_size >= 256, ct_slices >= 2")
    root = Path(root)
    rng = np.random.default_rng(seed)
    n_samples = len(MODALITY_DIRS) * 2 * per_class
    patients = _patients(rng, max(2, n_samples // 4))
    owner = rng.permutation(np.arange(n_samples) % len(patients))
    jobs: list[Callable[[], list[Path]]] = []
    meta: list[tuple[int, str]] = []  # (label, MRN) per job
    phi_strings: set[str] = set()
    for m, folder in enumerate(MODALITY_DIRS):
        mrng = np.random.default_rng([seed, m])
        labels = mrng.permutation(np.repeat([0, 1], per_class))  # file order says nothing about the class
        for i, label in enumerate(labels):
            patient = patients[owner[m * 2 * per_class + i]]
            phi_strings.add(patient.mrn)  # labels.csv carries it for every modality
            stem = f"{folder}_{i:04d}"
            if i % _PHI_NAME_EVERY == 0:
                stem = f"{patient.name_stem}_{i:04d}"
                phi_strings.update({stem, *patient.name_stem.split("_")})
            phi = {
                **patient.phi,
                "AccessionNumber": f"ACC{mrng.integers(10**7, 10**8)}",
                "ReferringPhysicianName": str(mrng.choice(_PHYSICIANS)),
            }
            if folder in _SOMETIMES_DICOM:  # eye and skin devices record when, and which eye
                phi["AcquisitionDateTime"] = f"2024{mrng.integers(1, 13):02d}{mrng.integers(1, 29):02d}093015"
            if _as_dicom(folder, i):
                phi_strings.update({*phi.values(), *phi["PatientName"].split("^")[:2]})
            elif _as_topcon(folder, i):  # what a Topcon file records: ID, names, birth date, scan time
                keys = ("PatientBirthDate", "AcquisitionDateTime")
                phi_strings.update({*(phi[k] for k in keys), *phi["PatientName"].split("^")[:2]})
            cine = i == int(np.argmax(labels == label))  # the first ultrasound of each class is a cine loop
            # Each sample draws from its own generator, so samples can be written in parallel, deterministically.
            jobs.append(functools.partial(
                _write_sample, folder, root / folder, stem, i, bool(label), cine, patient.mrn, phi,
                np.random.default_rng([seed, m, i]), size=size, ct_slices=ct_slices, slide_size=slide_size,
            ))  # fmt: skip
            meta.append((int(label), patient.mrn))
    # numpy, zlib and PIL release the GIL for the heavy parts (slides), so threads use the cores.
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        written = list(pool.map(lambda job: job(), jobs))
    rows = [
        (p.relative_to(root).as_posix(), label, mrn)
        for paths, (label, mrn) in zip(written, meta, strict=True)
        for p in paths
    ]
    phi_strings.update(p.name for paths in written for p in paths if any(n in p.name for n in phi_strings))

    labels_csv = root / "labels.csv"
    with labels_csv.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split", "patient_id"])
        for path, label, mrn in sorted(rows):
            writer.writerow([path, label, "", mrn])
    n_files = {d: sum(1 for p, _, _ in rows if p.startswith(f"{d}/")) for d in MODALITY_DIRS}
    return CorpusInfo(root, labels_csv, n_files, sorted(phi_strings))


def _write_sample(
    folder: str,
    out: Path,
    stem: str,
    index: int,
    positive: bool,
    cine: bool,
    mrn: str,
    phi: dict[str, str],
    rng: np.random.Generator,
    *,
    size: int,
    ct_slices: int,
    slide_size: int,
) -> list[Path]:
    """Draw and write one sample of a modality folder; returns the files written. ``index`` varies the CXR
    device and photometric interpretation, ``cine`` makes the ultrasound multi-frame."""
    out.mkdir(parents=True, exist_ok=True)
    ident: dict[str, Any] = {"patient_id": mrn, "phi": phi, "rng": rng}
    if folder == "ct":
        return write_ct_series(out / stem, ct_slices, size, lesion=positive, **ident)
    if folder == "cxr":
        device = "CR" if index % 2 else "DX"
        photometric = "MONOCHROME1" if index % 3 == 0 else "MONOCHROME2"
        pixels = np.round(_cxr_image(rng, size, positive) * _CXR_MAX)
        return [write_dicom_image(out / f"{stem}.dcm", pixels, modality=device, photometric=photometric, **ident)]
    if folder == "us":
        frames = _us_frames(rng, size, positive, n_frames=3 if cine else 1)
        return [write_dicom_image(out / f"{stem}.dcm", frames if cine else frames[0], modality="US", **ident)]
    if folder == "path":
        return [write_pyramidal_tiff(out / f"{stem}.tiff", _he_slide(rng, slide_size, positive))]
    if _as_topcon(folder, index):  # a volume of three B-scans in 16 bits, the fundus photo the device took with it
        bscans = np.stack([_oct_bscan(rng, size, positive) for _ in range(3)]).astype(np.uint16) * 257
        when = phi["AcquisitionDateTime"]
        birth = phi["PatientBirthDate"]
        last, first = phi["PatientName"].split("^")[:2]
        return [write_topcon_fds(
            out / f"{stem}.fds", bscans, _fundus(rng, size, positive), patient_id=mrn, name=(first, last),
            birth_date=(int(birth[:4]), int(birth[4:6]), int(birth[6:8])),
            captured=(int(when[:4]), *(int(when[k : k + 2]) for k in range(4, 14, 2))), eye=index % 2,
        )]  # fmt: skip
    if _as_dicom(folder, index):
        code = _SOMETIMES_DICOM[folder]
        if code == "OPT":  # a volume of three B-scans of the same eye
            pixels = np.stack([_oct_bscan(rng, size, positive) for _ in range(3)])
        else:
            pixels = (_fundus if code == "OP" else _derm_photo)(rng, size, positive)
        return [write_dicom_image(out / f"{stem}.dcm", pixels, modality=code, **ident)]
    draw, save, ext = {
        "cfp": (_fundus, _save_png, "png"),
        "oct": (_oct_bscan, _save_png, "png"),
        "derm": (_derm_photo, _save_jpeg, "jpg"),
    }[folder]
    path = out / f"{stem}.{ext}"
    save(path, draw(rng, size, positive))
    return [path]
