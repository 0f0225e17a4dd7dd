"""The probe job's config and task files, strict like every stage's (see ``ingest.config``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ingest.config import StrictModel
from ingest.schema import KNOWN_MODALITIES
from mermed.config import TrackingConfig


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
    modality: Literal[KNOWN_MODALITIES] | None = None  # None: all rows
    # A second labelled dataset with the same labels, scored whole by the model fine-tuned on this one
    # (``mermed finetune``; external validation).
    external: str | None = Field(default=None, min_length=1)
    # Row attributes (ingest's ``attributes`` column: sex, age_group, site...) to report metrics per value of,
    # with the largest gap between values (``mermed finetune``; subgroup fairness).
    attributes: list[str] = Field(default=[], max_length=16)


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
    # torch's intra-op threads per actor; None: the cluster's CPUs shared among the actors. An actor reserves fewer
    # CPUs than that only to leave one to Ray Data's read tasks, which are light (decoding runs in the actor).
    threads_per_actor: int | None = Field(default=None, ge=1)
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU


class ProbeConfig(StrictModel):
    """A probe job: a Tune sweep per (task, encoder, label fraction, label subset), a refit, a test."""

    trials: int = Field(default=20, ge=1)  # heads drawn per sweep
    # Heads one Tune trial trains together; None: the sweep spread over the cluster's CPUs, one trial per CPU.
    heads_per_trial: int | None = Field(default=None, ge=1)
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


__all__ = [
    "ExtractConfig",
    "ProbeConfig",
    "ProbeSearchConfig",
    "ProbeTask",
    "ProbeTasksFile",
    "ProbeTrainConfig",
]
