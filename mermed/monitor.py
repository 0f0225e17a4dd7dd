"""A kNN monitor of pretraining: how well the teacher's frozen features separate labelled tasks, at each checkpoint.

A probe sweep (``mermed probe``) is the real score but costs a job per encoder; this is DINO's cheap proxy
(``eval_knn.py``), run in the training process on a few thousand rows decoded once: the labelled train rows of
each task are the bank, its val rows (test where a task has none) are scored by a weighted vote of their k most
cosine-similar bank rows. With ``teacher_drift`` (how far the teacher moved from its step-0 weights) it shows
whether features improve, stall or collapse long before the run ends. No Ray here: the worker constructs it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import torch
import torch.nn.functional as F
from torch import nn

from ingest import storage
from ingest.config import load_config
from mermed.config import PretrainConfig
from mermed.data import decode_square
from mermed.metrics import accuracy, auroc
from mermed.normalize import Normalization, modality_mean_std
from mermed.probe.config import ProbeTask, ProbeTasksFile
from mermed.probe.heads import encode_labels
from mermed.probe.tasks import labelled_mask, task_shards

log = logging.getLogger("mermed.monitor")


class MonitorError(ValueError):
    """A monitor task that cannot be scored, found on the driver before training starts."""


@dataclass(frozen=True)
class KnnSettings:
    """DINO's kNN (k = 20, T = 0.07) on seeded subsets: the bank and the scored rows bound the monitor's cost."""

    k: int = 20
    temperature: float = 0.07
    train_rows: int = 2000  # the bank, per task
    eval_rows: int = 1000  # scored rows, per task
    batch_size: int = 256
    seed: int = 0


@dataclass(frozen=True)
class MonitorTask:
    """One task's rows in memory: decoded uint8 pixels (N, S, S, 3) and targets encoded against ``classes``."""

    task: ProbeTask
    classes: list[str]
    eval_split: str  # "val", or "test" when the task has no labelled val rows
    train_pixels: np.ndarray
    train_y: np.ndarray
    train_modality: list[str]
    eval_pixels: np.ndarray
    eval_y: np.ndarray
    eval_modality: list[str]


def load_tasks(path: str | Path) -> list[ProbeTask]:
    """The probe's task file, local ``data`` made absolute: Ray Train workers run in another directory."""
    tasks = load_config(ProbeTasksFile, path).tasks
    return [
        t if storage.is_remote(t.data) else t.model_copy(update={"data": str(Path(t.data).resolve())}) for t in tasks
    ]


def _subsample(rows: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    return rows if len(rows) <= limit else np.sort(rng.choice(rows, size=limit, replace=False))


@dataclass(frozen=True)
class _Selection:
    dataset: pads.Dataset  # rows indexed as its to_table() orders them
    classes: list[str]
    eval_split: str
    train_rows: np.ndarray
    train_y: np.ndarray
    train_modality: list[str]
    eval_rows: np.ndarray
    eval_y: np.ndarray
    eval_modality: list[str]


def _select(task: ProbeTask, settings: KnnSettings) -> _Selection:
    """The rows a task is scored on, from its label and split columns alone (no image is read)."""
    name = f"monitor task {task.name}"
    dataset = task_shards(task, name, MonitorError)
    if task.label not in dataset.schema.names:
        raise MonitorError(f"{name}: the shards have no column {task.label}")
    table = dataset.to_table(columns=list(dict.fromkeys([task.label, "split", "modality"])))
    labelled = labelled_mask(table[task.label]).to_numpy()
    split = np.asarray(table["split"].to_pylist(), dtype=object)
    labels = np.asarray(pc.cast(table[task.label], pa.string()).to_pylist(), dtype=object)
    train = np.flatnonzero(labelled & (split == "train"))
    eval_split = "val" if (labelled & (split == "val")).any() else "test"
    scored = np.flatnonzero(labelled & (split == eval_split))
    if not len(train) or not len(scored):
        raise MonitorError(f"{name}: needs labelled train rows and labelled val (or test) rows")
    if eval_split == "test":
        log.warning("%s: no labelled val rows; scoring its test rows", name)
    rng = np.random.default_rng(settings.seed)
    try:
        _, classes = encode_labels(labels[train].tolist(), task.type)  # of every training row, not just the bank's
        train, scored = _subsample(train, settings.train_rows, rng), _subsample(scored, settings.eval_rows, rng)
        train_y, _ = encode_labels(labels[train].tolist(), task.type, classes=classes)
        eval_y, _ = encode_labels(labels[scored].tolist(), task.type, classes=classes)
    except ValueError as err:
        raise MonitorError(f"{name} (train and {eval_split} rows): {err}") from None
    modality = np.asarray(table["modality"].to_pylist(), dtype=object)
    return _Selection(
        dataset,
        classes,
        eval_split,
        train,
        train_y,
        modality[train].tolist(),
        scored,
        eval_y,
        modality[scored].tolist(),
    )


def check_tasks(tasks: Sequence[ProbeTask], settings: KnnSettings) -> dict[str, str]:
    """Reject unusable tasks on the driver, before any compute; returns each task's scored split."""
    return {t.name: _select(t, settings).eval_split for t in tasks}


def read_task(task: ProbeTask, settings: KnnSettings, img_size: int) -> MonitorTask:
    """A task's selected rows, decoded like the probe decodes them (RGB, short side resized, centre crop)."""
    chosen = _select(task, settings)

    def pixels(rows: np.ndarray) -> np.ndarray:
        images = chosen.dataset.take(pa.array(rows), columns=["image"])["image"].to_pylist()
        return np.stack([decode_square(b, img_size) for b in images])

    return MonitorTask(
        task,
        chosen.classes,
        chosen.eval_split,
        pixels(chosen.train_rows),
        chosen.train_y,
        chosen.train_modality,
        pixels(chosen.eval_rows),
        chosen.eval_y,
        chosen.eval_modality,
    )


def knn_scores(
    bank: torch.Tensor,
    bank_targets: torch.Tensor,
    queries: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores (N, C) of DINO's weighted kNN: the ``k`` bank rows most cosine-similar to a query vote with
    weight exp(similarity / T) for their targets (one-hot, or 0/1 per label), the votes summing to one per query
    so that they rank across queries for AUROC (their argmax is DINO's prediction). Rows are L2-normalised."""
    k = min(k, len(bank))
    scores = []
    for q in queries.split(chunk):
        similarity, index = (q @ bank.T).topk(k, dim=1)
        weight = (similarity / temperature).exp()
        votes = (weight.unsqueeze(-1) * bank_targets[index]).sum(dim=1)
        scores.append(votes / weight.sum(dim=1, keepdim=True))
    return torch.cat(scores)


def _one_hot(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Vote targets: one-hot class indices; multilabel 0/1 rows as they are."""
    return y.astype(np.float32) if y.ndim == 2 else np.eye(n_classes, dtype=np.float32)[y]


def initial_backbone(cfg: PretrainConfig) -> nn.Module:
    """The teacher backbone as step 0 had it, for a resumed run's drift: ``build_train_state``'s initialisation
    under ``run.seed`` (the student's backbone, built first, which the teacher copies), then ``model.init``.
    Every RNG is forked so the resumed run's restored generators stay as they were."""
    from mermed.train import build_encoder
    from mermed.weights import load_backbone_weights

    with torch.random.fork_rng():
        torch.manual_seed(cfg.run.seed)
        backbone = build_encoder(cfg, cfg.model.drop_path).backbone
    if cfg.model.init:
        load_backbone_weights(backbone, cfg.model.init)
    return backbone


class KnnMonitor:
    """Decodes the tasks' rows once; each call embeds them with a backbone and returns the metrics to log:
    ``knn_accuracy/<task>``, ``knn_auroc/<task>`` (macro one-vs-rest), ``teacher_drift`` (relative L2 distance
    of the backbone's parameters from ``reference``, the step-0 weights) and ``monitor_s`` (the call's wall time).
    """

    def __init__(
        self,
        tasks: Sequence[ProbeTask],
        reference: nn.Module,
        *,
        img_size: int,
        device: torch.device,
        amp_dtype: torch.dtype | None = None,
        settings: KnnSettings = KnnSettings(),
        normalization: Normalization | None = None,
    ) -> None:
        started = time.perf_counter()
        self.settings, self.device, self.amp_dtype = settings, device, amp_dtype
        self.tasks = [read_task(t, settings, img_size) for t in tasks]
        self.reference = [p.detach().to(device, torch.float32, copy=True) for p in reference.parameters()]
        self.reference_norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(r, dtype=torch.float64) for r in self.reference])
        )
        self.normalization = normalization or {}  # per modality, as pretraining and the probe normalise
        self.setup_s = time.perf_counter() - started
        log.info(
            "kNN monitor: %s in %.1f s",
            ", ".join(f"{t.task.name} ({len(t.train_y)} train, {len(t.eval_y)} {t.eval_split})" for t in self.tasks),
            self.setup_s,
        )

    @property
    def eval_splits(self) -> dict[str, str]:
        return {t.task.name: t.eval_split for t in self.tasks}

    def drift(self, backbone: nn.Module) -> float:
        pairs = zip(backbone.parameters(), self.reference, strict=True)
        distance = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.detach() - r, dtype=torch.float64) for p, r in pairs])
        )
        return float(distance / self.reference_norm)

    def _embed(self, backbone: nn.Module, pixels: np.ndarray, modalities: list[str]) -> torch.Tensor:
        features = []
        for start in range(0, len(pixels), self.settings.batch_size):
            end = start + self.settings.batch_size
            x = torch.from_numpy(pixels[start:end]).to(self.device)
            mean, std = modality_mean_std(self.normalization, modalities[start:end], self.device)
            x = (x.permute(0, 3, 1, 2).float() / 255 - mean[:, :, None, None]) / std[:, :, None, None]
            with torch.autocast(self.device.type, self.amp_dtype, enabled=self.amp_dtype is not None):
                features.append(F.normalize(backbone(x).float(), dim=1))
        return torch.cat(features)

    def __call__(self, backbone: nn.Module) -> dict[str, float]:
        started = time.perf_counter()
        metrics: dict[str, float] = {}
        training = backbone.training
        backbone.eval()
        try:
            with torch.no_grad():
                for t in self.tasks:
                    targets = torch.from_numpy(_one_hot(t.train_y, len(t.classes))).to(self.device)
                    scores = knn_scores(
                        self._embed(backbone, t.train_pixels, t.train_modality),
                        targets,
                        self._embed(backbone, t.eval_pixels, t.eval_modality),
                        self.settings.k,
                        self.settings.temperature,
                    )
                    scores = scores.cpu().numpy()
                    metrics[f"knn_accuracy/{t.task.name}"] = accuracy(t.eval_y, scores, t.task.type)
                    metrics[f"knn_auroc/{t.task.name}"] = auroc(t.eval_y, scores, t.task.type)
        finally:
            backbone.train(training)
        metrics["teacher_drift"] = self.drift(backbone)
        metrics["monitor_s"] = time.perf_counter() - started
        return metrics


__all__ = [
    "KnnMonitor",
    "KnnSettings",
    "MonitorError",
    "MonitorTask",
    "check_tasks",
    "initial_backbone",
    "knn_scores",
    "load_tasks",
    "read_task",
]
