"""DICOM files (CT, CR/DX, US, ophthalmic photography and tomography, skin photographs, MR, ...) to uint8 2D images.

A group of files from one directory is read together so that a CT series can be put in slice order: a slice's
``frame`` is its index along the slice normal. Multi-frame objects give one image per kept frame, ``frame`` being
the frame index. Only PatientID and StudyInstanceUID leave this module (as keys the pipeline pseudonymises);
names, dates and every other header value stay here.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pydicom.config
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, iter_pixels
from pydicom.pixels.utils import get_nr_frames
from pydicom.uid import (
    UID,
    DermoscopicPhotographyImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    OphthalmicPhotography8BitImageStorage,
    OphthalmicPhotography16BitImageStorage,
    OphthalmicTomographyImageStorage,
    VLPhotographicImageStorage,
    VLWholeSlideMicroscopyImageStorage,
)

from ingest import wsi
from ingest.config import IngestConfig
from ingest.image import crop_fundus, require_finite, scale_to_uint8
from ingest.schema import DecodeError, Image, InputError, ReadResult

# Value validation warnings quote the offending header value (a date, a name) into the logs: off in this process.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

# DICOM modality code -> the project's modality; other codes (MR, MG, NM, SM, ...) are kept as they are. OP is
# ophthalmic photography (fundus), OPT ophthalmic tomography (OCT), XC external-camera photography (skin).
MODALITIES = {"CT": "CT", "CR": "CXR", "DX": "CXR", "DR": "CXR", "US": "US", "OP": "CFP", "OPT": "OCT", "XC": "DERM"}
# SOP classes that say what an image is better than its Modality code does (a dermoscope's XC, a fundus camera
# that writes OT): they win over the code.
SOP_CLASS_MODALITIES = {
    OphthalmicPhotography8BitImageStorage: "CFP",
    OphthalmicPhotography16BitImageStorage: "CFP",
    OphthalmicTomographyImageStorage: "OCT",  # a multi-frame volume: one row per B-scan
    DermoscopicPhotographyImageStorage: "DERM",
    VLPhotographicImageStorage: "DERM",
}
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Enhanced multi-frame objects put rescale and window per frame in these functional groups.
FRAME_GROUPS = ("PixelValueTransformationSequence", "FrameVOILUTSequence")
# Samples per pixel that each photometric interpretation implies (PS3.3 C.7.6.3.1.2).
SAMPLES = {"MONOCHROME1": 1, "MONOCHROME2": 1, "PALETTE COLOR": 1, "RGB": 3, "HSV": 3, "ARGB": 4, "CMYK": 4}


class SlidePart(InputError):
    """An instance of a DICOM whole-slide image that gives no rows of its own (a lower level, a label image)."""


@dataclass
class _Header:
    index: int  # into the group's paths
    ds: Dataset  # read without pixel data
    single_frame: bool


def _dcmread(path: str, *, header_only: bool) -> Dataset:
    """Read a file as DICOM, also accepting old files without preamble and file meta that start with group 0008."""
    try:
        return dcmread(path, stop_before_pixels=header_only)
    except InvalidDicomError:
        pass
    except OSError as err:
        raise InputError(f"cannot read the file ({type(err).__name__})") from None
    except Exception as err:  # noqa: BLE001 - pydicom raises many kinds on a broken header
        raise DecodeError(f"DICOM header is corrupt ({type(err).__name__})") from None
    try:
        ds = dcmread(path, stop_before_pixels=header_only, force=True)
    except Exception:  # noqa: BLE001 - anything forced through the parser that breaks it is not DICOM
        raise InputError("not a DICOM file") from None
    if len(ds) == 0 or min(ds.keys()).group != 0x0008:
        raise InputError("not a DICOM file")
    return ds


def _transfer_syntax(ds: Dataset) -> UID | None:
    """The transfer syntax, inferred from how the file was parsed when its file meta does not state it.

    Only native (unencapsulated) pixel data can be decoded that way; compressed data without a stated syntax cannot.
    """
    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return UID(meta.TransferSyntaxUID)
    implicit, little = ds.original_encoding
    encapsulated = "PixelData" in ds and ds["PixelData"].is_undefined_length
    if implicit is None or encapsulated:
        return None
    uid = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    ds.ensure_file_meta()
    ds.file_meta.TransferSyntaxUID = uid
    return uid


def dicom_modality(ds: Dataset) -> str:
    """The project's modality for a header's SOP class, else its Modality code; ``OT`` (DICOM's "other") when
    absent or not a code (a CS value: up to 16 capitals, digits, spaces, underscores), so that a corrupt header
    names no modality."""
    by_class = SOP_CLASS_MODALITIES.get(str(ds.get("SOPClassUID") or ""))
    if by_class:
        return by_class
    code = str(ds.get("Modality") or "OT").strip().upper()
    return MODALITIES.get(code, code) if re.fullmatch(r"[A-Z0-9_ ]{1,16}", code) else "OT"


def _position(ds: Dataset) -> float | None:
    """Position of a slice along its normal (ImagePositionPatient projected on the ImageOrientationPatient normal).

    None when absent or unusable: ordering falls back, and a broken value never fails the other files.
    """
    try:
        orientation = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        position = np.asarray([float(v) for v in ds.ImagePositionPatient])
        if orientation.shape != (6,) or position.shape != (3,):
            return None
        along = float(np.dot(np.cross(orientation[:3], orientation[3:]), position))
    except Exception:  # noqa: BLE001 - any broken value: this key is not usable
        return None
    return along if math.isfinite(along) else None


def _instance_number(ds: Dataset) -> int | None:
    try:
        return int(ds.InstanceNumber)
    except Exception:  # noqa: BLE001 - as above
        return None


def _slice_order(series: list[_Header]) -> list[_Header]:
    """A series in slice order: by position along the normal, else by InstanceNumber, else as listed."""
    positions = [_position(h.ds) for h in series]
    if None not in positions:
        return [h for _, h in sorted(zip(positions, series, strict=True), key=lambda p: (p[0], p[1].index))]
    numbers = [_instance_number(h.ds) for h in series]
    if None not in numbers:
        return [h for _, h in sorted(zip(numbers, series, strict=True), key=lambda p: (p[0], p[1].index))]
    return sorted(series, key=lambda h: h.index)


def _frame_view(ds: Dataset, index: int) -> Dataset:
    """The pixel-value attributes that apply to one frame: the top level overlaid with the frame's functional groups.

    The image pixel, modality LUT and VOI LUT modules all live in group 0028, so a view holds only that group.
    """
    groups = [ds.get("SharedFunctionalGroupsSequence"), ds.get("PerFrameFunctionalGroupsSequence")]
    items = [
        groups[0][0] if groups[0] else None,
        groups[1][index] if groups[1] and index < len(groups[1]) else None,
    ]
    overrides = [item[k][0] for item in items if item is not None for k in FRAME_GROUPS if item.get(k)]
    if not overrides:
        return ds
    view = Dataset()
    view.file_meta = ds.file_meta
    for elem in ds.group_dataset(0x0028):
        view.add(elem)
    for override in overrides:
        view.update(override)
    return view


def _window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    return scale_to_uint8(values, center - width / 2, center + width / 2)


def _first(value: object) -> float:
    """First value of a possibly multi-valued DS element (WindowCenter may list several)."""
    return float(value[0] if isinstance(value, list | tuple | MultiValue) else value)


def _greyscale(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """Modality values -> uint8 through the header's VOI LUT or window, else the image's own range."""
    if ds.get("VOILUTSequence"):
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        return scale_to_uint8(apply_voi(np.rint(values).astype(np.int64), ds), 0, 2**bits - 1)
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        if width > 0 and math.isfinite(center) and math.isfinite(width):  # else the image's own range
            return _window(values, center, width)
    return scale_to_uint8(values, float(values.min()), float(values.max()))


def _to_uint8(arr: np.ndarray, ds: Dataset, modality: str, cfg: IngestConfig) -> np.ndarray:
    """One decoded frame (RGB already converted from YBR by pydicom) -> uint8 pixels for the shard."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if arr.ndim == 3:  # colour
        return arr if arr.dtype == np.uint8 else scale_to_uint8(arr, 0, 2 ** int(ds.BitsStored) - 1)
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)[..., :3]  # drop an alpha palette
        # Some writers put 8-bit entries in a 16-bit table: scale by what the table holds, not by its type.
        return rgb.astype(np.uint8) if rgb.max() <= 255 else scale_to_uint8(rgb, 0, 65535)
    with np.errstate(over="ignore", invalid="ignore"):  # a rescale that overflows is refused just below
        values = require_finite(apply_modality_lut(arr, ds))
    if modality == "CT":  # Hounsfield units through three windows -> three channels
        return np.stack([_window(values, w.center, w.width) for w in cfg.dicom.ct_windows], axis=-1)
    grey = _greyscale(values, ds)
    return 255 - grey if photometric == "MONOCHROME1" else grey


def _text(ds: Dataset, keyword: str) -> str | None:
    value = str(ds.get(keyword) or "").strip()
    return value or None


_SEXES = {"M": "M", "F": "F", "O": "O"}


def age_decade(age: str | None) -> str | None:
    """A DICOM Age String (``045Y``, ``006M``, ``003W``, ``010D``) as its decade of years (``40-49``), or None
    when absent or malformed; ages of 90 and over are one group (``90+``), as HIPAA's safe harbour asks."""
    if not age or len(age) != 4 or not age[:3].isdigit() or age[3] not in "DWMY":
        return None
    years = int(age[:3]) / {"D": 365.25, "W": 52.18, "M": 12, "Y": 1}[age[3]]
    if years >= 90:
        return "90+"
    low = int(years // 10) * 10
    return f"{low}-{low + 9}"


def demographics(ds: Dataset) -> dict[str, str] | None:
    """PatientSex and the decade of PatientAge as row attributes (``dicom.demographics``); nothing else."""
    sex = _SEXES.get((_text(ds, "PatientSex") or "").upper())
    found = {"sex": sex, "age_group": age_decade(_text(ds, "PatientAge"))}
    kept = {k: v for k, v in found.items() if v}
    return kept or None


def _message(err: Exception) -> str:
    """A library error as one short printable line (it may quote a corrupt header value byte for byte)."""
    return re.sub(r"[^\x20-\x7e]", "?", re.sub(r"\s+", " ", f"{type(err).__name__}: {err}"))[:300]


def _images(path: str, header: Dataset, frame: int | None, modality: str | None, cfg: IngestConfig) -> Iterator[Image]:
    """Decode one file; ``frame`` is the slice's index in its series, used when the file has a single frame."""
    ds = _dcmread(path, header_only=False)
    if not any(k in ds for k in PIXEL_KEYWORDS):
        if "Rows" in header:  # an image whose pixel data was cut off (pydicom drops an incomplete element)
            raise DecodeError("DICOM image has no pixel data: the file is probably truncated")
        raise InputError("DICOM object has no pixel data")
    photometric = str(ds.get("PhotometricInterpretation") or "").strip()
    samples = ds.get("SamplesPerPixel")
    expected = 3 if photometric.startswith("YBR") else SAMPLES.get(photometric)
    if expected is not None and samples is not None and samples != expected:
        # The pixel layout follows SamplesPerPixel: the other half of the header would be silently ignored.
        raise DecodeError(
            f"PhotometricInterpretation {photometric} needs {expected} samples per pixel, the header says {samples}"
        )
    syntax = _transfer_syntax(ds)
    # A corrupt UID is not echoed: its bytes may be anything.
    named = (
        f"{syntax} ({syntax.name})"
        if syntax and syntax.is_valid
        else "(not a valid UID)"
        if syntax
        else "(none stated)"
    )
    try:
        n_frames = get_nr_frames(ds, warn=False)
        indices = cfg.dicom.kept_frames(n_frames)
        declared = int(ds.Rows) * int(ds.Columns) * len(indices)
    except (AttributeError, TypeError, ValueError) as err:
        raise DecodeError(
            f"cannot decode pixel data with transfer syntax {named}: image size attributes are missing or invalid "
            f"({type(err).__name__})"
        ) from None
    if declared > cfg.image.max_pixels:
        raise InputError(f"DICOM object declares {declared} pixels to decode, above image.max_pixels")
    modality = modality or dicom_modality(ds)
    keys = {"patient_key": _text(ds, "PatientID"), "study_key": _text(ds, "StudyInstanceUID")}
    if cfg.dicom.demographics:
        keys["attributes"] = demographics(ds)
    try:
        for index, arr in zip(indices, iter_pixels(ds, indices=indices), strict=True):
            pixels = _to_uint8(arr, _frame_view(ds, index), modality, cfg)
            if modality == "CFP" and cfg.image.fundus_crop:  # as for fundus photos stored as image files
                pixels = crop_fundus(pixels)
            yield Image(pixels=pixels, modality=modality, frame=index if n_frames > 1 else frame, **keys)
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - every decoder failure is reported with its transfer syntax
        raise DecodeError(f"cannot decode pixel data with transfer syntax {named}: {_message(err)}") from None


def _input_error(err: Exception) -> InputError:
    """Our own errors as they are; anything else a corrupt header made a library raise, by its class only (its
    message may quote header values)."""
    return err if isinstance(err, InputError) else DecodeError(f"DICOM file is corrupt ({type(err).__name__})")


def _slide(paths: list[str], members: list[_Header], modality: str | None, cfg: IngestConfig) -> Iterator[ReadResult]:
    """A DICOM whole-slide image (SM): one instance per pyramid level, plus label and overview images, in one
    series. OpenSlide opens the base level and finds the other levels beside it (the unit is their folder); the
    tiles are the ones any slide gives (``wsi``). The other instances are accounted for by a quarantine row each:
    the levels are read through the base, and label and overview images are left out on purpose (a slide label
    often carries the patient's name as burned-in text)."""
    volumes = [h for h in members if "VOLUME" in _image_type(h.ds)]
    if not volumes:
        for h in members:
            yield h.index, InputError("DICOM whole-slide image series without a VOLUME (tiled level) instance")
        return
    base = max(volumes, key=lambda h: int(h.ds.get("TotalPixelMatrixColumns") or 0))
    keys = {"patient_key": _text(base.ds, "PatientID"), "study_key": _text(base.ds, "StudyInstanceUID")}
    try:
        for tile in wsi.read_one(paths[base.index], modality or "PATH", cfg):
            yield base.index, dataclasses.replace(tile, **keys)
    except Exception as err:  # noqa: BLE001 - the slide is quarantined, the rest of the folder is still read
        yield base.index, _input_error(err)
    for h in members:
        if h is base:
            continue
        kind = "a lower pyramid level" if h in volumes else f"a {'/'.join(_image_type(h.ds)[2:3]) or 'non-tiled'} image"
        reason = "read through the slide's base level" if h in volumes else "not ingested (may carry burned-in text)"
        yield h.index, SlidePart(f"{kind} of a DICOM whole-slide image: {reason}")


def _image_type(ds: Dataset) -> list[str]:
    value = ds.get("ImageType") or []
    return [str(v).upper() for v in (value if isinstance(value, MultiValue | list) else [value])]


def read(paths: list[str], modality: str | None, cfg: IngestConfig) -> Iterator[ReadResult]:
    """Read a directory's DICOM files: group them by series, order each series' slices, decode file by file."""
    series: dict[object, list[_Header]] = {}
    for i, path in enumerate(paths):
        try:
            ds = _dcmread(path, header_only=True)
            header = _Header(i, ds, single_frame=get_nr_frames(ds, warn=False) == 1)
            uid = _text(ds, "SeriesInstanceUID")
        except Exception as err:  # noqa: BLE001 - the file is quarantined, the others are still read
            yield i, _input_error(err)
            continue
        series.setdefault(uid or ("file", i), []).append(header)
    for members in series.values():
        if str(members[0].ds.get("SOPClassUID") or "") == VLWholeSlideMicroscopyImageStorage:
            yield from _slide(paths, members, modality, cfg)
            continue
        ordered = _slice_order(members)
        rank = {h.index: r for r, h in enumerate(h for h in ordered if h.single_frame)}
        for header in ordered:
            try:
                for image in _images(paths[header.index], header.ds, rank.get(header.index), modality, cfg):
                    yield header.index, image
            except Exception as err:  # noqa: BLE001 - as above
                yield header.index, _input_error(err)


__all__ = ["dicom_modality", "read"]
