"""Typed configs: the strict base every stage's config builds on, its YAML loading, and ingest's own config.

Every config is a pydantic model with ``extra="forbid"``: a misspelt or mistyped field fails when the config is
loaded, with the field's dotted path in the message, before any data is read or any compute is spent. The
pretraining and probe configs (``mermed.config``, ``mermed.probe.config``) build on ``StrictModel`` from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ingest.labels import OPTIONAL_COLUMNS, REQUIRED_COLUMNS
from ingest.schema import KNOWN_MODALITIES


class ConfigError(ValueError):
    """A config that cannot be used; the message names the offending field."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------------------------- ingest


class Window(StrictModel):
    """A display window in Hounsfield units (CT) or stored values."""

    center: float
    width: float = Field(gt=0)


class DicomConfig(StrictModel):
    # The three CT windows become the three channels of the stored image (lung, mediastinum, bone).
    ct_windows: tuple[Window, Window, Window] = (
        Window(center=-600, width=1500),
        Window(center=40, width=400),
        Window(center=400, width=1800),
    )
    # Keep every n-th frame of multi-frame objects, and every n-th B-scan of vendor OCT volumes (``vendor_oct``).
    frame_stride: int = Field(default=1, ge=1)
    # Keep PatientSex and PatientAge binned to decades as row attributes (subgroup metrics). Off by default:
    # they are quasi-identifiers, to be kept only where the data's governance allows it.
    demographics: bool = False
    max_frames: int = Field(default=10_000, ge=1)

    def kept_frames(self, n_frames: int) -> range:
        """The frames of an ``n_frames`` object (a DICOM multi-frame, a vendor OCT volume) that become rows."""
        return range(0, n_frames, self.frame_stride)[: self.max_frames]


class WsiConfig(StrictModel):
    target_mpp: float = Field(default=0.5, gt=0)  # micrometres per pixel of the stored tiles
    tile_size: int = Field(default=224, ge=16)
    min_tissue: float = Field(default=0.5, ge=0, le=1)  # tiles under this tissue fraction are dropped
    max_tiles_per_slide: int = Field(default=1000, ge=1)
    thumbnail_size: int = Field(default=1024, ge=64)
    seed: int = 0
    assumed_mpp: float = Field(default=0.5, gt=0)  # for slides that do not record their resolution


class VendorOctConfig(StrictModel):
    """Vendor OCT files read through oct-converter (``ingest.vendor_oct``)."""

    # Zeiss Cirrus .img files are raw volumes without a header: the B-scan is zeiss_depth x A-scans, the A-scans
    # read from the export's name ("Macular Cube 512x128" has 512) unless set here.
    zeiss_depth: int = Field(default=1024, ge=1)
    zeiss_ascans: int | None = Field(default=None, ge=1)
    # A file whose reading takes longer is quarantined: a damaged file can send a parser round a loop for ever.
    max_seconds: float = Field(default=600.0, gt=0)


class ImageConfig(StrictModel):
    max_pixels: int = Field(default=200_000_000, ge=1)  # decompression-bomb guard (declared width*height)
    fundus_crop: bool = True  # crop colour fundus photos to the circular field of view


AttributeName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$", max_length=64)]


class IngestConfig(StrictModel):
    dataset: str = "default"
    modality: Literal[("auto", *KNOWN_MODALITIES)] = "auto"
    shard_bytes: int = Field(default=256 * 1024**2, ge=1024)
    row_group_rows: int = Field(default=256, ge=1)
    image_format: Literal["png", "jpeg"] = "png"  # photos and tiles may be stored as JPEG
    jpeg_quality: int = Field(default=95, ge=50, le=100)
    val_fraction: float = Field(default=0.1, ge=0, lt=1)
    test_fraction: float = Field(default=0.1, ge=0, lt=1)
    deduplicate: bool = True
    # Attempts a read task gets when its worker process dies (a native crash, the OOM killer). After them the
    # task's inputs are read again one per task, and a file whose own task dies as often is quarantined.
    read_attempts: int = Field(default=3, ge=1, le=10)
    # Label-CSV columns kept as string row attributes for subgroup metrics (e.g. [sex, age_group, site]); any
    # other extra column is an error, so that no free-text column reaches the shards unasked.
    attributes: list[AttributeName] = Field(default=[], max_length=32)
    dicom: DicomConfig = DicomConfig()
    wsi: WsiConfig = WsiConfig()
    image: ImageConfig = ImageConfig()
    vendor_oct: VendorOctConfig = VendorOctConfig()

    @model_validator(mode="after")
    def _fractions(self) -> IngestConfig:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be below 1")
        taken = sorted(set(self.attributes) & {*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS})
        if taken:
            raise ValueError(f"attributes: {', '.join(taken)} are label-CSV columns of their own")
        return self


# --------------------------------------------------------------------------------------------- loading

ConfigT = TypeVar("ConfigT", bound=BaseModel)


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"{field}: {e['msg']}")
    return "; ".join(lines)


def parse_config(cls: type[ConfigT], data: dict[str, Any], source: str = "config") -> ConfigT:
    """Validate ``data`` as ``cls``; raise ConfigError naming every bad field."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"invalid {source}: {_describe(err)}") from None


def load_config(cls: type[ConfigT], path: str | Path, overrides: dict[str, Any] | None = None) -> ConfigT:
    """Load a YAML file as ``cls``, applying dotted-key overrides (``{"optim.lr": 1e-4}``)."""
    text = Path(path).read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"invalid {path}: not YAML ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"invalid {path}: the top level must be a mapping")
    for key, value in (overrides or {}).items():
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return parse_config(cls, data, source=str(path))


__all__ = [
    "ConfigError",
    "DicomConfig",
    "ImageConfig",
    "IngestConfig",
    "StrictModel",
    "VendorOctConfig",
    "Window",
    "WsiConfig",
    "load_config",
    "parse_config",
]
