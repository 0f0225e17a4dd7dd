"""Typed configs for every stage.

Every config is a pydantic model with ``extra="forbid"``: a misspelt or mistyped field fails when the config is
loaded, with the field's dotted path in the message, before any data is read or any compute is spent.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MODALITIES = ("CT", "CXR", "US", "PATH", "CFP", "OCT", "DERM")


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
    frame_stride: int = Field(default=1, ge=1)  # keep every n-th frame of multi-frame objects
    max_frames: int = Field(default=10_000, ge=1)


class WsiConfig(StrictModel):
    target_mpp: float = Field(default=0.5, gt=0)  # micrometres per pixel of the stored tiles
    tile_size: int = Field(default=224, ge=16)
    min_tissue: float = Field(default=0.5, ge=0, le=1)  # tiles under this tissue fraction are dropped
    max_tiles_per_slide: int = Field(default=1000, ge=1)
    thumbnail_size: int = Field(default=1024, ge=64)
    seed: int = 0
    assumed_mpp: float = Field(default=0.5, gt=0)  # for slides that do not record their resolution


class ImageConfig(StrictModel):
    max_pixels: int = Field(default=200_000_000, ge=1)  # decompression-bomb guard (declared width*height)
    fundus_crop: bool = True  # crop colour fundus photos to the circular field of view


class IngestConfig(StrictModel):
    dataset: str = "default"
    modality: Literal["auto", "CT", "CXR", "US", "PATH", "CFP", "OCT", "DERM", "MR"] = "auto"
    shard_bytes: int = Field(default=256 * 1024**2, ge=1024)
    row_group_rows: int = Field(default=256, ge=1)
    image_format: Literal["png", "jpeg"] = "png"  # photos and tiles may be stored as JPEG
    jpeg_quality: int = Field(default=95, ge=50, le=100)
    val_fraction: float = Field(default=0.1, ge=0, lt=1)
    test_fraction: float = Field(default=0.1, ge=0, lt=1)
    deduplicate: bool = True
    dicom: DicomConfig = DicomConfig()
    wsi: WsiConfig = WsiConfig()
    image: ImageConfig = ImageConfig()

    @model_validator(mode="after")
    def _fractions(self) -> IngestConfig:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be below 1")
        return self


# --------------------------------------------------------------------------------------------- pretrain
# MerMED-FM pretraining (DINO with a memory queue). Defaults are the paper's ViT-B numbers; configs/ overrides them.

Scale = tuple[float, float]


def _check_scale(scale: Scale) -> Scale:
    lo, hi = scale
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"must satisfy 0 < low <= high <= 1, got {scale}")
    return scale


class PretrainModelConfig(StrictModel):
    name: str = "vit_base_patch16_224"  # any timm ViT that accepts dynamic_img_size
    out_dim: int = Field(default=65536, ge=2)  # K prototypes of the DINO head
    bottleneck: int = Field(default=256, ge=1)  # L2-normalised embedding width; also the memory's width
    hidden: int = Field(default=2048, ge=1)
    drop_path: float = Field(default=0.1, ge=0, lt=1)  # student only; the teacher runs without


class CropsConfig(StrictModel):
    n_global: int = Field(default=2, ge=1)
    n_local: int = Field(default=10, ge=0)
    global_size: int = Field(default=224, ge=8)
    local_size: int = Field(default=96, ge=8)
    global_scale: Scale = (0.4, 1.0)
    local_scale: Scale = (0.05, 0.4)
    decode_size: int = Field(default=256, ge=8)  # shards are decoded and resized to this uint8 square first

    @model_validator(mode="after")
    def _sizes(self) -> CropsConfig:
        for name in ("global_scale", "local_scale"):
            try:
                _check_scale(getattr(self, name))
            except ValueError as err:
                raise ValueError(f"{name} {err}") from None
        if self.n_global + self.n_local < 2:
            raise ValueError("n_global + n_local must be at least 2 (the loss compares different views)")
        if self.decode_size < self.global_size:
            raise ValueError(f"decode_size ({self.decode_size}) must be >= global_size ({self.global_size})")
        return self


class PretrainLossConfig(StrictModel):
    student_temp: float = Field(default=0.1, gt=0)
    teacher_temp: float = Field(default=0.04, gt=0)  # start of the warm-up
    final_teacher_temp: float = Field(default=0.07, gt=0)  # after warmup_teacher_temp_steps, flat
    warmup_teacher_temp_steps: int = Field(default=0, ge=0)
    center_momentum: float = Field(default=0.9, ge=0, lt=1)
    memory_weight: float = Field(default=1.0, ge=0)  # 0 turns the memory alignment term off
    memory_student_temp: float = Field(default=0.1, gt=0)
    memory_teacher_temp: float = Field(default=0.05, gt=0)


class MemoryConfig(StrictModel):
    size: int = Field(default=65536, ge=0)  # 0 is the no-memory ablation
    n_blocks: int = Field(default=4, ge=1)

    @model_validator(mode="after")
    def _blocks(self) -> MemoryConfig:
        if self.size % self.n_blocks:
            raise ValueError(f"n_blocks ({self.n_blocks}) must divide size ({self.size})")
        return self


class OptimConfig(StrictModel):
    batch_size_per_worker: int = Field(default=64, ge=1)
    base_lr: float = Field(default=5e-4, gt=0)  # scaled by global_batch / 256
    min_lr: float = Field(default=1e-6, ge=0)
    warmup_steps: int = Field(default=0, ge=0)
    weight_decay: float = Field(default=0.04, ge=0)
    weight_decay_end: float = Field(default=0.4, ge=0)
    clip_grad: float = Field(default=3.0, ge=0)  # per-parameter norm clip as DINO; 0 disables
    freeze_last_layer_steps: int = Field(default=0, ge=0)
    momentum_teacher: float = Field(default=0.996, ge=0, le=1)


class RunConfig(StrictModel):
    steps: int = Field(default=1000, ge=1)
    checkpoint_every: int = Field(default=1000, ge=1)
    seed: int = 0
    log_every: int = Field(default=10, ge=1)
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    cpus_per_worker: float = Field(default=1.0, gt=0)  # leave CPUs to Ray Data's decoding on small machines
    keep_checkpoints: int = Field(default=3, ge=1)  # older ones are the fallback for a corrupt latest one
    # Keep Ray Data's row order (slower): a resumed run then draws exactly the batches of an uninterrupted one.
    deterministic_data: bool = False


class TrackingConfig(StrictModel):
    mlflow_uri: str | None = None  # None: MLFLOW_TRACKING_URI or a local sqlite store
    experiment: str = "mermed-pretrain"


class PretrainConfig(StrictModel):
    model: PretrainModelConfig = PretrainModelConfig()
    crops: CropsConfig = CropsConfig()
    loss: PretrainLossConfig = PretrainLossConfig()
    memory: MemoryConfig = MemoryConfig()
    optim: OptimConfig = OptimConfig()
    run: RunConfig = RunConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _consistent(self) -> PretrainConfig:
        patch = re.search(r"patch(\d+)", self.model.name)
        if patch:
            p = int(patch.group(1))
            for name in ("global_size", "local_size"):
                if getattr(self.crops, name) % p:
                    raise ValueError(f"crops.{name} must be a multiple of the patch size {p} of {self.model.name}")
        if self.optim.min_lr > self.optim.base_lr:
            raise ValueError("optim.min_lr must not exceed optim.base_lr")
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
    "MODALITIES",
    "ConfigError",
    "CropsConfig",
    "DicomConfig",
    "ImageConfig",
    "IngestConfig",
    "MemoryConfig",
    "OptimConfig",
    "PretrainConfig",
    "PretrainLossConfig",
    "PretrainModelConfig",
    "RunConfig",
    "StrictModel",
    "TrackingConfig",
    "WsiConfig",
    "Window",
    "load_config",
    "parse_config",
]


# --------------------------------------------------------------------------------------------- probe


class ProbeTrainConfig(StrictModel):
    """One probe fit on frozen features; lr, weight_decay, hidden and dropout are what Ray Tune searches."""

    head: Literal["mlp", "linear"] = "mlp"
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    hidden: int = Field(default=512, ge=1)  # MLP head only
    dropout: float = Field(default=0.1, ge=0, lt=1)  # MLP head only
    epochs: int = Field(default=50, ge=1)
    batch_size: int = Field(default=256, ge=1)  # at least the training set's size: full-batch
    seed: int = 0


class ProbeTask(StrictModel):
    """One downstream dataset: labelled shards and how to read their labels."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # becomes an MLflow run name and a path
    data: str = Field(min_length=1)  # labelled shard directory, local or s3://
    type: Literal["binary", "multiclass", "multilabel"]
    label: str = "label"  # shard column holding the label strings
    modality: Literal["CT", "CXR", "US", "PATH", "CFP", "OCT", "DERM", "MR"] | None = None  # None: all rows


class ProbeTasksFile(StrictModel):
    tasks: list[ProbeTask] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> ProbeTasksFile:
        names = [t.name for t in self.tasks]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"task names must be unique; repeated: {', '.join(repeated)}")
        return self


Range = tuple[float, float]


def _check_range(name: str, bounds: Range, log: bool) -> None:
    lo, hi = bounds
    if lo > hi or (log and lo <= 0) or lo < 0:
        raise ValueError(f"search.{name} must be [low, high] with {'0 < ' if log else '0 <= '}low <= high")


class ProbeSearchConfig(StrictModel):
    """Ray Tune's search space: every trial is a ProbeTrainConfig drawn from it (random search + ASHA)."""

    heads: list[Literal["mlp", "linear"]] = Field(default=["mlp", "linear"], min_length=1)
    lr: Range = (1e-4, 1e-2)  # log-uniform
    weight_decay: Range = (1e-6, 1e-2)  # log-uniform
    hidden: list[int] = Field(default=[256, 512, 1024], min_length=1)  # MLP head only
    dropout: Range = (0.0, 0.5)  # uniform; MLP head only
    epochs: list[int] = Field(default=[25, 50, 100], min_length=1)  # ASHA's max_t is the largest
    batch_size: int = Field(default=256, ge=1)
    grace_period: int = Field(default=5, ge=1)  # ASHA: epochs every trial runs before it may be stopped
    reduction_factor: int = Field(default=3, ge=2)

    @model_validator(mode="after")
    def _ranges(self) -> ProbeSearchConfig:
        _check_range("lr", self.lr, log=True)
        _check_range("weight_decay", self.weight_decay, log=True)
        _check_range("dropout", self.dropout, log=False)
        if self.dropout[1] >= 1:
            raise ValueError("search.dropout must stay below 1")
        if min(self.hidden) < 1 or min(self.epochs) < 1:
            raise ValueError("search.hidden and search.epochs must be positive")
        if self.grace_period > max(self.epochs):
            raise ValueError("search.grace_period must not exceed the largest search.epochs")
        return self


class ExtractConfig(StrictModel):
    """Feature extraction: a Ray Data actor pool, each actor holding the encoder once."""

    batch_size: int = Field(default=64, ge=1)
    actors: int | None = Field(default=None, ge=1)  # None: one per GPU, else one per 2 CPUs of the cluster
    cpus_per_actor: float = Field(default=1.0, gt=0)
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU


class ProbeConfig(StrictModel):
    """A probe job: a Tune sweep per (task, encoder, label fraction, label subset), a refit, a test."""

    trials: int = Field(default=20, ge=1)  # per sweep
    fractions: list[float] = Field(default=[0.01, 0.1, 1.0], min_length=1)  # of the training labels
    seeds: int = Field(default=3, ge=1)  # stratified label subsets per fraction below 1 (1.0 has only one)
    search: ProbeSearchConfig = ProbeSearchConfig()
    extract: ExtractConfig = ExtractConfig()
    bootstrap: int = Field(default=1000, ge=10)  # patient resamples for the 95% CI
    baseline_seed: int = 0  # initialisation of the random-weights baseline
    seed: int = 0  # search algorithm
    tracking: TrackingConfig = TrackingConfig(experiment="mermed-probe")

    @model_validator(mode="after")
    def _fractions(self) -> ProbeConfig:
        if not all(0 < f <= 1 for f in self.fractions):
            raise ValueError("fractions must be in (0, 1]")
        if len(set(self.fractions)) != len(self.fractions):
            raise ValueError("fractions must not repeat")
        return self


__all__ += [
    "ExtractConfig",
    "ProbeConfig",
    "ProbeSearchConfig",
    "ProbeTask",
    "ProbeTasksFile",
    "ProbeTrainConfig",
]
