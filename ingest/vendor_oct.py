"""Vendor OCT files through oct-converter: Topcon .fds/.fda, Heidelberg .e2e, Zeiss Cirrus .img.

Clinics export OCT in their device's own format more often than as DICOM. Each kept B-scan of each volume becomes
an OCT image (``frame`` its index in the volume, ``dicom.frame_stride`` and ``dicom.max_frames`` as for a DICOM
OPT volume), windowed to uint8 over the whole volume so that its B-scans stay comparable; the fundus photo such a
file carries, where it has one, becomes a CFP image. The format says what each image is, so no modality needs to
be configured. Only the patient ID leaves this module (as the key the pipeline pseudonymises) and the volume's own
ID (as the study key); names, birth dates, laterality and scan dates never leave the reader's objects.

oct-converter prints progress and file paths to stdout: that is swallowed. Its parsers follow offsets stored in
the file, so a damaged file may send one round a loop: reading stops after ``vendor_oct.max_seconds``.
"""

from __future__ import annotations

import contextlib
import io
import re
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ingest.config import IngestConfig
from ingest.image import crop_fundus, percentile_window, require_finite, scale_to_uint8
from ingest.schema import DecodeError, Image, InputError, per_file

# Not Bioptigen .oct: oct-converter's reader pads a short B-scan by repeating its bytes and keeps going after a read
# error, so a damaged file would be stored as plausible garbage.
EXTENSIONS = {".fds": "Topcon FDS", ".fda": "Topcon FDA", ".e2e": "Heidelberg E2E", ".img": "Zeiss IMG"}
# A Cirrus export names its scan pattern: "Macular Cube 512x128" is 128 B-scans of 512 A-scans.
_ZEISS_PATTERN = re.compile(r"(\d+)x(\d+)")


class TimeLimit(DecodeError):
    """Reading a file took longer than ``vendor_oct.max_seconds``."""


@dataclass
class _Deadline:
    seconds: float
    passed: bool = False  # the alarm went off (a parser may have wrapped our exception in one of its own)

    def error(self) -> TimeLimit:
        return TimeLimit(f"reading took longer than vendor_oct.max_seconds={self.seconds:g}; the file may be damaged")


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[_Deadline]:
    """Raise TimeLimit in this thread after ``seconds``, putting back a caller's own alarm (pytest-timeout's, say)
    afterwards. A no-op off the main thread, where signals cannot go, and under a caller's alarm that comes first."""
    deadline = _Deadline(seconds)
    pending = signal.getitimer(signal.ITIMER_REAL)
    if threading.current_thread() is not threading.main_thread() or 0 < pending[0] <= seconds:
        yield deadline
        return

    def expire(signum, frame):
        deadline.passed = True
        raise deadline.error()

    previous = signal.signal(signal.SIGALRM, expire)
    started = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, seconds, 1.0)  # again every second, should a parser swallow it
    try:
        yield deadline
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if pending[0]:
            left = max(pending[0] - (time.monotonic() - started), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, left, pending[1])


def _zeiss_ascans(path: str, cfg: IngestConfig) -> int:
    if cfg.vendor_oct.zeiss_ascans:
        return cfg.vendor_oct.zeiss_ascans
    match = _ZEISS_PATTERN.search(Path(path).name)
    if match is None:
        raise InputError(
            "a Zeiss .img volume has no header: keep the export's scan name (e.g. '512x128') in the file name "
            "or set vendor_oct.zeiss_ascans"
        )
    return int(match.group(1))


def _open(readers, path: str, cfg: IngestConfig) -> tuple[list, list[np.ndarray]]:
    """The file's OCT volumes (oct-converter's OCTVolumeWithMetaData) and fundus photos; ``readers`` is
    ``oct_converter.readers``."""
    suffix = Path(path).suffix.lower()
    if suffix == ".fds":
        reader = readers.FDS(path)
        fundus = [reader.read_fundus_image().image] if b"@IMG_OBS" in reader.chunk_dict else []
        return [reader.read_oct_volume()], fundus
    if suffix == ".fda":
        reader = readers.FDA(path)
        photo = reader.read_fundus_image() if b"@IMG_FUNDUS" in reader.chunk_dict else None
        return [reader.read_oct_volume()], [photo.image] if photo is not None else []
    if suffix == ".e2e":
        reader = readers.E2E(path)
        return reader.read_oct_volume(), [photo.image for photo in reader.read_fundus_image()]
    if suffix == ".img":
        depth, ascans = cfg.vendor_oct.zeiss_depth, _zeiss_ascans(path, cfg)
        size = Path(path).stat().st_size
        if size == 0 or size % (depth * ascans):
            raise InputError(f"a Zeiss .img of {size} bytes is not a whole number of {depth} x {ascans} B-scans")
        return [readers.IMG(path).read_oct_volume(rows=depth, cols=ascans)], []
    raise AssertionError(suffix)


def _grey(bscans: list[np.ndarray]) -> list[np.ndarray]:
    """B-scans as uint8, under one percentile window for the volume (vendors store 16-bit or float intensities)."""
    if all(b.dtype == np.uint8 for b in bscans):
        return bscans
    lo, hi = percentile_window(np.concatenate([b.ravel() for b in bscans]))
    return [scale_to_uint8(b, lo, hi) for b in bscans]


def _photo(values: np.ndarray) -> np.ndarray:
    """A fundus photo as uint8: values already on 0..255 (as float, say) are rounded, others windowed."""
    values = np.asarray(values)
    if values.ndim == 3 and values.shape[2] == 1:
        values = values[:, :, 0]
    if values.dtype == np.uint8:
        return values
    if float(require_finite(values).min()) >= 0 and float(values.max()) <= 255:
        return np.rint(values).astype(np.uint8)
    return scale_to_uint8(values, *percentile_window(values))


def read_one(path: str, modality: str | None, cfg: IngestConfig) -> Iterator[Image]:
    """Yield the B-scans of every volume of a vendor OCT file, then its fundus photos."""
    from oct_converter import readers  # its first import (OpenCV, matplotlib) takes seconds: not the file's

    with _time_limit(cfg.vendor_oct.max_seconds) as deadline, contextlib.redirect_stdout(io.StringIO()):
        try:
            volumes, photos = _open(readers, path, cfg)
        except (InputError, MemoryError):
            raise
        except Exception as err:  # noqa: BLE001 - the parsers' errors (construct, numpy, ValueError) vary by format
            if deadline.passed:  # construct turns an exception raised inside its parsing into a FormatFieldError
                raise deadline.error() from None
            name = EXTENSIONS[Path(path).suffix.lower()]
            if "fromstring" in str(err):  # not the file's fault: say what to install
                raise InputError(
                    f"oct-converter reads {name} with np.fromstring, gone in NumPy 2.3: use numpy<2.3"
                ) from None
            raise DecodeError(f"oct-converter could not read it as {name} ({type(err).__name__})") from None
    images = []
    for volume in volumes:
        bscans = [np.asarray(b) for b in volume.volume]
        kept = cfg.dicom.kept_frames(len(bscans))
        if not kept:
            continue
        patient = volume.patient_id
        for index, pixels in zip(kept, _grey([bscans[i] for i in kept]), strict=True):
            images.append(
                Image(
                    pixels=pixels,
                    modality="OCT",
                    frame=index,
                    patient_key=str(patient) if patient else None,
                    study_key=str(volume.volume_id) if volume.volume_id else None,
                )
            )
    patient = next((img.patient_key for img in images if img.patient_key), None)
    for values in photos:
        pixels = _photo(values)
        if pixels.ndim == 3 and cfg.image.fundus_crop:
            pixels = crop_fundus(pixels)
        images.append(Image(pixels=pixels, modality="CFP", patient_key=patient))
    if not images:
        raise InputError("the file holds no B-scan and no fundus photo")
    yield from images


read = per_file(read_one)

__all__ = ["EXTENSIONS", "TimeLimit", "read", "read_one"]
