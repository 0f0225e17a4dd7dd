"""The shard contract, the one place both sides of it import: the Arrow row schema, the modality and split
vocabularies, the names of the manifest and quarantine files, reading a manifest, and how pixels become a stored
image and back. Ingest writes shards by it; pretraining and probes (``mermed``) read them by it.

Readers never see the schema: they yield ``Image`` (decoded pixels plus what the file says about them) or raise.
The pipeline turns an ``Image`` into a row, pseudonymising identifiers on the way.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import io
import json
import posixpath
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from PIL import Image as PILImage

from ingest import storage

INGEST_VERSION = f"mermed-ingest/{importlib.metadata.version('mermed')}"

# The seven modalities of the method; rows of other modalities (e.g. MR) are kept and named in the manifest.
MODALITIES = ("CT", "CXR", "US", "PATH", "CFP", "OCT", "DERM")
KNOWN_MODALITIES = (*MODALITIES, "MR")
# Stored as (pseudo-)grayscale: colour jitter on saturation/hue is meaningless for them.
GRAYSCALE_MODALITIES = frozenset({"CT", "CXR", "US", "OCT", "MR"})
SPLITS = ("train", "val", "test")  # patient-level

MANIFEST = "_manifest.json"  # written last: its presence commits an ingest output
QUARANTINE = "_quarantine.parquet"

ROW_SCHEMA = pa.schema(
    [
        ("image", pa.binary()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("channels", pa.int32()),
        ("modality", pa.string()),
        ("dataset", pa.string()),
        ("source", pa.string()),
        ("frame", pa.int32()),
        ("tile_x", pa.int32()),
        ("tile_y", pa.int32()),
        ("tile_level", pa.int32()),
        ("mpp", pa.float32()),
        ("patient_id", pa.string()),
        ("study_id", pa.string()),
        ("label", pa.string()),
        ("split", pa.string()),
        # JSON object of string attributes for subgroup metrics (label-CSV columns named in ``attributes``, and
        # DICOM sex and age decade when ``dicom.demographics``); null when there are none.
        ("attributes", pa.string()),
        ("pixel_sha256", pa.string()),
        ("ingest_version", pa.string()),
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("stage", pa.string()),
        ("error_class", pa.string()),
        ("message", pa.string()),
    ]
)


class InputError(Exception):
    """An input that cannot be ingested; the message is shown to the operator and must carry no PHI."""

    stage = "read"


class DecodeError(InputError):
    stage = "decode"


@dataclass
class Image:
    """One 2D image as a reader yields it: uint8 pixels plus what the file says about them.

    ``patient_key``/``study_key`` are raw identifiers from the file (e.g. DICOM PatientID); the pipeline replaces
    them by keyed pseudonyms and never writes them.
    """

    pixels: np.ndarray  # uint8, (H, W) or (H, W, 3)
    modality: str
    frame: int | None = None
    tile_x: int | None = None
    tile_y: int | None = None
    tile_level: int | None = None
    mpp: float | None = None
    patient_key: str | None = None
    study_key: str | None = None
    label: str | None = None
    split: str | None = None
    attributes: dict[str, str] | None = None  # already coarse (e.g. age decade): written as they are
    encoding: Literal["png", "jpeg"] | None = None  # None: the run's default

    def __post_init__(self) -> None:
        p = self.pixels
        if p.dtype != np.uint8 or p.ndim not in (2, 3) or (p.ndim == 3 and p.shape[2] not in (1, 3)):
            raise DecodeError(f"reader produced pixels of dtype {p.dtype} and shape {p.shape}, not uint8 HxW[x3]")
        if p.shape[0] < 1 or p.shape[1] < 1:
            raise DecodeError(f"empty image of shape {p.shape}")
        if p.ndim == 3 and p.shape[2] == 1:
            self.pixels = p[:, :, 0]


def pixel_sha256(pixels: np.ndarray) -> str:
    """Hash of the decoded pixels and their shape, so that identical images in different files deduplicate."""
    h = hashlib.sha256()
    h.update(np.asarray(pixels.shape, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(pixels).tobytes())
    return h.hexdigest()


def encode_image(pixels: np.ndarray, fmt: Literal["png", "jpeg"] = "png", quality: int = 95) -> bytes:
    """Encode uint8 pixels losslessly (PNG) or as JPEG for photos and tiles."""
    buf = io.BytesIO()
    img = PILImage.fromarray(pixels)
    if fmt == "png":
        img.save(buf, format="PNG", compress_level=1)
    else:
        img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@dataclass(frozen=True)
class PixelMoments:
    """Exact per-channel sums of a modality's pixels (in [0, 1], grayscale counted as three equal channels):
    what the manifest keeps so that means and standard deviations can be merged across ingest outputs."""

    total: tuple[float, float, float]
    squares: tuple[float, float, float]
    pixels: int

    @classmethod
    def of(cls, pixels: np.ndarray) -> PixelMoments:
        x = pixels.astype(np.float64).reshape(-1, 1 if pixels.ndim == 2 else pixels.shape[-1]) / 255.0
        x = np.broadcast_to(x, (x.shape[0], 3))
        return cls(tuple(x.sum(axis=0)), tuple(np.square(x).sum(axis=0)), x.shape[0])

    def __add__(self, other: PixelMoments) -> PixelMoments:
        return PixelMoments(
            tuple(a + b for a, b in zip(self.total, other.total, strict=True)),
            tuple(a + b for a, b in zip(self.squares, other.squares, strict=True)),
            self.pixels + other.pixels,
        )

    def to_manifest(self) -> dict:
        """Plain JSON values (the manifest in memory equals the one read back)."""
        return {
            "total": [float(x) for x in self.total],
            "squares": [float(x) for x in self.squares],
            "pixels": self.pixels,
        }

    def mean_std(self) -> tuple[list[float], list[float]]:
        mean = np.asarray(self.total) / max(self.pixels, 1)
        var = np.asarray(self.squares) / max(self.pixels, 1) - mean**2
        return mean.tolist(), np.sqrt(np.maximum(var, 1e-12)).tolist()


def modality_normalization(manifests: list[dict]) -> dict[str, dict[str, list[float]]]:
    """``{modality: {"mean": [r, g, b], "std": [r, g, b]}}`` over the ingest outputs' pixels (the manifests'
    ``pixel_moments``); a modality none of them measured is absent."""
    merged: dict[str, PixelMoments] = {}
    for manifest in manifests:
        for modality, m in manifest.get("pixel_moments", {}).items():
            moments = PixelMoments(tuple(m["total"]), tuple(m["squares"]), int(m["pixels"]))
            merged[modality] = merged[modality] + moments if modality in merged else moments
    return {m: dict(zip(("mean", "std"), v.mean_std(), strict=True)) for m, v in sorted(merged.items())}


def read_manifest(data: str) -> dict:
    """The manifest of an ingest output (local or s3://): what was ingested, the shards, the per-modality counts."""
    fs, root = storage.filesystem(data)
    path = posixpath.join(root, MANIFEST)
    if not fs.exists(path):
        raise FileNotFoundError(f"{data} has no {MANIFEST}: is it an ingest output (mermed ingest)?")
    with fs.open(path, "rb") as fh:
        return json.loads(fh.read())


def decode_image(data: bytes) -> np.ndarray:
    """Decode a stored image back to uint8 pixels (H, W) or (H, W, 3)."""
    with PILImage.open(io.BytesIO(data)) as img:
        return np.asarray(img)


# A reader takes a group of input files (one file, or a directory's DICOM files so a series can be ordered) and
# yields (index into the group, Image) for every image, or (index, exception) once for a file that failed.
ReadResult = tuple[int, "Image | Exception"]


def per_file(read_one: Callable[..., Iterator[Image]]) -> Callable[..., Iterator[ReadResult]]:
    """Adapt a one-file reader ``read_one(path, modality, cfg)`` to the group contract, isolating failures."""

    @functools.wraps(read_one)
    def read(paths: list[str], modality: str | None, cfg: Any) -> Iterator[ReadResult]:
        for i, path in enumerate(paths):
            try:
                for image in read_one(path, modality, cfg):
                    yield i, image
            except Exception as err:  # noqa: BLE001 - every failure becomes a quarantine row, never a crash
                yield i, err

    return read
