"""The shard row: its Arrow schema, what readers yield, and how pixels become a stored image.

Readers never see the schema: they yield ``Image`` (decoded pixels plus what the file says about them) or raise.
The pipeline turns an ``Image`` into a row, pseudonymising identifiers on the way.
"""

from __future__ import annotations

import functools
import hashlib
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from PIL import Image as PILImage

from mermed import __version__

INGEST_VERSION = f"mermed-ingest/{__version__}"

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
