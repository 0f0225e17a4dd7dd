"""The fine-tuning job's config: the authors' published protocol (``configs/finetune_vitb.yaml``) by default."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ingest.config import StrictModel
from mermed.config import TrackingConfig, torch_threads
from mermed.probe.config import Range


class FinetuneTrainConfig(StrictModel):
    """One fine-tuning run (``mermed.finetune.worker``): the whole ViT and a new linear head, as MAE/MerMED."""

    base_lr: float = Field(default=5e-3, gt=0)  # scaled by the global batch / 256
    min_lr: float = Field(default=1e-6, ge=0)
    layer_decay: float = Field(default=0.65, gt=0, le=1)
    weight_decay: float = Field(default=0.05, ge=0)
    drop_path: float = Field(default=0.2, ge=0, lt=1)
    epochs: int = Field(default=50, ge=1)
    warmup_epochs: int = Field(default=5, ge=0)  # per-iteration linear warm-up, then cosine
    batch_size: int = Field(default=16, ge=1)  # per worker
    clip_grad: float = Field(default=0.0, ge=0)  # 0 = off (the authors' default)
    # The light train-time recipe on tensors: a random resized crop of the whole (letterboxed) image, a flip.
    crop_scale: tuple[float, float] = (0.2, 1.0)
    hflip: bool = True
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU

    @model_validator(mode="after")
    def _check(self) -> FinetuneTrainConfig:
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError("train.crop_scale must be [low, high] with 0 < low <= high <= 1")
        if self.warmup_epochs > self.epochs:
            raise ValueError("train.warmup_epochs must not exceed train.epochs")
        return self


class FinetuneSearchConfig(StrictModel):
    """An optional Ray Tune search per (task, fraction, seed) on the validation AUROC, ASHA-scheduled; the
    published protocol has none (``trials: 1`` uses ``train`` as it is)."""

    trials: int = Field(default=1, ge=1)
    base_lr: Range | None = None  # log-uniform
    layer_decay: Range | None = None  # uniform
    grace_period: int = Field(default=5, ge=1)  # epochs before ASHA may stop a trial
    reduction_factor: int = Field(default=3, ge=2)

    @model_validator(mode="after")
    def _check(self) -> FinetuneSearchConfig:
        if self.base_lr is not None and not 0 < self.base_lr[0] <= self.base_lr[1]:
            raise ValueError("search.base_lr must be [low, high] with 0 < low <= high")
        if self.layer_decay is not None and not 0 < self.layer_decay[0] <= self.layer_decay[1] <= 1:
            raise ValueError("search.layer_decay must be [low, high] within (0, 1]")
        if self.trials > 1 and self.base_lr is None and self.layer_decay is None:
            raise ValueError("search.trials > 1 needs search.base_lr or search.layer_decay to search")
        return self


class FinetuneConfig(StrictModel):
    """A job: one Ray Train run per (task, label fraction, seed[, search trial]), all scheduled by Ray Tune."""

    train: FinetuneTrainConfig = FinetuneTrainConfig()
    search: FinetuneSearchConfig = FinetuneSearchConfig()
    fractions: list[float] = Field(default=[0.1, 0.3, 0.5, 1.0], min_length=1)  # of the training labels
    seeds: list[int] = Field(default=[0, 1, 42, 123, 2025], min_length=1)  # label subset and training seed
    workers_per_trial: int = Field(default=1, ge=1)  # DDP workers of each run
    cpus_per_worker: float = Field(default=1.0, gt=0)
    threads_per_worker: int | None = Field(default=None, ge=1)  # torch threads; None = cpus_per_worker
    use_gpu: bool | None = None  # None: when the cluster has GPUs
    max_concurrent_trials: int | None = Field(default=None, ge=1)  # None: as many as the cluster fits
    max_failures: int = Field(default=2, ge=0)  # per run: restarts from its last epoch checkpoint
    baseline_seed: int = 0  # initialisation of the random-weights baseline
    bootstrap: int = Field(default=1000, ge=10)  # patient resamples for the 95% CI of the test AUROC
    attention_maps: int = Field(default=4, ge=0)  # test images per task with the last block's CLS attention
    tracking: TrackingConfig = TrackingConfig(experiment="mermed-finetune")

    @model_validator(mode="after")
    def _check(self) -> FinetuneConfig:
        if not all(0 < f <= 1 for f in self.fractions) or len(set(self.fractions)) != len(self.fractions):
            raise ValueError("fractions must be distinct values in (0, 1]")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds must not repeat")
        return self

    @property
    def torch_threads(self) -> int:
        return torch_threads(self.threads_per_worker, self.cpus_per_worker)


__all__ = ["FinetuneConfig", "FinetuneSearchConfig", "FinetuneTrainConfig"]
