"""The pretraining config (``configs/pretrain_*.yaml``), strict like every stage's (see ``ingest.config``)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from ingest.config import StrictModel

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
    out_dim: int = Field(default=65536, ge=2)  # K prototypes of the DINO head (objective: dino only)
    bottleneck: int = Field(default=256, ge=1)  # L2-normalised embedding width; also the memory's width
    hidden: int = Field(default=2048, ge=1)
    head_batch_norm: bool = True  # BatchNorm after each hidden layer of the head (SyncBatchNorm on multi-GPU)
    drop_path: float = Field(default=0.1, ge=0, lt=1)  # student only; the teacher runs without
    # Continual pretraining: backbone weights (safetensors, or .pth/.pt read with weights_only) loaded into
    # student and teacher before step 0; a resumed run ignores it. ``--init`` sets it.
    init: str | None = None


class CropsConfig(StrictModel):
    """The multi-crop views and their augmentation (``mermed.augment.MultiCrop``). The defaults are the published
    MerMED-FM recipe (the authors' DataAugmentationMerMED); ``DINO_AUGMENTATION`` below is DINO's."""

    n_global: int = Field(default=2, ge=1)
    n_local: int = Field(default=10, ge=0)
    global_size: int = Field(default=224, ge=8)
    local_size: int = Field(default=96, ge=8)
    global_scale: Scale = (0.2, 1.0)  # crop area as a fraction of the image (of its valid region when padded)
    local_scale: Scale = (0.05, 0.2)
    decode_size: int = Field(default=256, ge=8)  # shards are decoded and resized to this uint8 square first
    rotation_degrees: float = Field(default=30.0, ge=0, le=180)  # uniform in +-degrees, before the crop
    # Colour jitter strengths as torchvision's ColorJitter, applied together with probability jitter_p; saturation
    # and hue are skipped on grayscale modalities.
    brightness: float = Field(default=0.2, ge=0, le=1)
    contrast: float = Field(default=0.2, ge=0, le=1)
    saturation: float = Field(default=0.1, ge=0, le=1)
    hue: float = Field(default=0.02, ge=0, le=0.5)
    jitter_p: float = Field(default=0.8, ge=0, le=1)
    grayscale_p: float = Field(default=0.0, ge=0, le=1)  # random grayscale, after the jitter
    blur_sigma: tuple[float, float] = (0.1, 1.0)  # Gaussian blur sigma range, pixels of the view
    blur_p_global1: float = Field(default=1.0, ge=0, le=1)  # the first global view
    blur_p_global2: float = Field(default=0.1, ge=0, le=1)  # every later global view
    blur_p_local: float = Field(default=0.5, ge=0, le=1)
    solarize_p: float = Field(default=0.0, ge=0, le=1)  # the later global views, after the blur

    @model_validator(mode="after")
    def _sizes(self) -> CropsConfig:
        for name in ("global_scale", "local_scale"):
            try:
                _check_scale(getattr(self, name))
            except ValueError as err:
                raise ValueError(f"{name} {err}") from None
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"blur_sigma must satisfy 0 < low <= high, got {self.blur_sigma}")
        if self.n_global + self.n_local < 2:
            raise ValueError("n_global + n_local must be at least 2 (the loss compares different views)")
        if self.decode_size < self.global_size:
            raise ValueError(f"decode_size ({self.decode_size}) must be >= global_size ({self.global_size})")
        return self


# DINO's recipe (main_dino.py DataAugmentationDINO), which MerMED-FM's replaced: no rotation, stronger jitter,
# random grayscale, sigma up to 2, solarisation of the second global view. ``CropsConfig(**DINO_AUGMENTATION)``,
# or these keys under ``crops:`` in a YAML config (e.g. for ``loss.objective: dino`` runs).
DINO_AUGMENTATION: dict[str, float | tuple[float, float]] = {
    "global_scale": (0.4, 1.0),
    "local_scale": (0.05, 0.4),
    "rotation_degrees": 0.0,
    "brightness": 0.4,
    "contrast": 0.4,
    "saturation": 0.2,
    "hue": 0.1,
    "jitter_p": 0.8,
    "grayscale_p": 0.2,
    "blur_sigma": (0.1, 2.0),
    "blur_p_global1": 1.0,
    "blur_p_global2": 0.1,
    "blur_p_local": 0.5,
    "solarize_p": 0.2,
}


class PretrainLossConfig(StrictModel):
    # mermed: the published objective (the memory is the prototypes); dino: DINO's prototypes + centering, with
    # a memory-alignment term, kept as the ablation.
    objective: Literal["mermed", "dino"] = "mermed"
    koleo_weight: float = Field(default=0.0, ge=0)  # KoLeo on the student's global-view embeddings
    student_temp: float = Field(default=0.1, gt=0)
    teacher_temp: float = Field(default=0.04, gt=0)  # start of the warm-up
    final_teacher_temp: float = Field(default=0.07, gt=0)  # after warmup_teacher_temp_steps, flat
    warmup_teacher_temp_steps: int = Field(default=0, ge=0)
    # objective: dino only
    center_momentum: float = Field(default=0.9, ge=0, lt=1)
    memory_weight: float = Field(default=1.0, ge=0)  # 0 turns the memory alignment term off
    memory_student_temp: float = Field(default=0.1, gt=0)
    memory_teacher_temp: float = Field(default=0.05, gt=0)


class MemoryConfig(StrictModel):
    size: int = Field(default=65536, ge=0)  # 0 is the no-memory ablation (objective: dino only)
    n_blocks: int = Field(default=4, ge=1)  # mermed: a fresh random partition into blocks every step

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
    clip_grad: float = Field(default=1.0, ge=0)  # per-parameter norm clip as DINO; 0 disables
    layer_decay: float = Field(default=1.0, gt=0, le=1)  # layer-wise lr decay; 1.0 = off
    freeze_last_layer_steps: int = Field(default=0, ge=0)  # objective: dino only (the prototypes)
    momentum_teacher: float = Field(default=0.9995, ge=0, le=1)


def torch_threads(threads_per_worker: int | None, cpus_per_worker: float) -> int:
    """A Ray worker's torch intra-op threads: as configured, else its whole CPUs (at least one)."""
    return threads_per_worker or max(1, int(cpus_per_worker))


class RunConfig(StrictModel):
    steps: int = Field(default=1000, ge=1)
    checkpoint_every: int = Field(default=1000, ge=1)
    seed: int = 0
    log_every: int = Field(default=10, ge=1)
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    cpus_per_worker: float = Field(default=1.0, gt=0)  # leave CPUs to Ray Data's decoding on small machines
    # torch's intra-op threads per worker; None = cpus_per_worker. More than the worker's CPUs suits a small machine
    # whose streams fit data.stream_cache_mb: after the first pass Ray Data decodes nothing and its CPU sits idle.
    threads_per_worker: int | None = Field(default=None, ge=1)
    keep_checkpoints: int = Field(default=3, ge=1)  # older ones are the fallback for a corrupt latest one
    # Keep Ray Data's row order (slower): a resumed run then draws exactly the batches of an uninterrupted one.
    deterministic_data: bool = False
    # A directory where each worker appends the key of every row it trains on (step, modality, pass, key; a file
    # per worker process): an audit of what a run saw. None = no log.
    row_log_dir: str | None = None
    # torch.compile the student's and the teacher's backbones, in place (checkpoint keys do not change), one static
    # graph per crop resolution; the first steps pay the compilation (bench/train.py reports it).
    compile: bool = False
    # After the run: rows per modality whose teacher embeddings give the alignment/uniformity metrics and the
    # embedding map (mermed.embedding_map); 0 = skip.
    embedding_sample: int = Field(default=256, ge=0)

    @property
    def torch_threads(self) -> int:
        return torch_threads(self.threads_per_worker, self.cpus_per_worker)


class DataConfig(StrictModel):
    """How each worker reads its modalities' streams (``mermed.data``, ``pipelines/pretrain.py``)."""

    # Per modality and worker: a pass of up to this many MB of decoded rows is kept in memory and re-served permuted
    # (a new streaming pass costs seconds); 0 = never cache, every pass is streamed.
    stream_cache_mb: int = Field(default=256, ge=0)
    # Ray Data's local shuffle buffer in rows, per modality and worker, on top of the seeded shard order (a buffer of
    # decoded rows: 512 x 256 px is ~100 MB); 0 = rows in shard order.
    shuffle_buffer_rows: int = Field(default=512, ge=0)


class TrackingConfig(StrictModel):
    mlflow_uri: str | None = None  # None: MLFLOW_TRACKING_URI or a local sqlite store
    experiment: str = "mermed-pretrain"
    # While the tracking server is unreachable, metrics wait in memory (up to max_pending, newer ones are then
    # counted and dropped) and are retried every retry_s; the end of a run waits up to reconnect_timeout_s for
    # them and for its final status before it gives up (the encoder is written regardless).
    retry_s: float = Field(default=5.0, gt=0)
    max_pending: int = Field(default=1_000_000, ge=1000)
    reconnect_timeout_s: float = Field(default=600.0, ge=0)


class PretrainConfig(StrictModel):
    model: PretrainModelConfig = PretrainModelConfig()
    crops: CropsConfig = CropsConfig()
    loss: PretrainLossConfig = PretrainLossConfig()
    memory: MemoryConfig = MemoryConfig()
    optim: OptimConfig = OptimConfig()
    run: RunConfig = RunConfig()
    data: DataConfig = DataConfig()
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
        if self.loss.objective == "mermed" and self.memory.size < self.memory.n_blocks:
            raise ValueError("memory.size must be positive under loss.objective mermed (the memory is the prototypes)")
        return self


__all__ = [
    "DINO_AUGMENTATION",
    "CropsConfig",
    "DataConfig",
    "MemoryConfig",
    "OptimConfig",
    "PretrainConfig",
    "PretrainLossConfig",
    "PretrainModelConfig",
    "RunConfig",
    "TrackingConfig",
]
