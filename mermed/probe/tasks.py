"""Labelled tasks: what a probe or fine-tuning job checks on the driver before any compute (labels, splits,
patients), from the shards' label columns alone."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ingest import storage
from ingest.schema import SPLITS, read_manifest
from mermed.data import shard_uris
from mermed.probe.config import (
    ProbeTask,
)
from mermed.probe.heads import encode_labels

log = logging.getLogger("mermed.probe")

FEATURES_VERSION = "mermed-features/2"  # bump when preprocessing or the file layout changes
META_COLUMNS = ("split", "modality", "patient_id", "source", "frame")


class ProbeError(ValueError):
    """Input a probe job cannot use, found before any compute; the message names the task or the encoder."""


def labelled_mask(column: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Rows that carry a label: shards also hold unlabelled (pretraining) rows, which no task uses."""
    text = pc.cast(column, pa.string())
    return pc.fill_null(pc.not_equal(pc.utf8_trim_whitespace(text), ""), False)


def patient_groups(
    patient_id: Sequence[str | None],
    source: Sequence[str | None],
    split: Sequence[str | None],
    frame: Sequence[int | str | None],
) -> np.ndarray:
    """Bootstrap and leakage groups: the patient pseudonym. A row without one is its own group (its input's
    pseudonym, split and frame): one MedMNIST ``.npz`` is one input holding a whole dataset, its ``frame`` the
    index within each split. A row without a frame either (a 2D image; a slide's tiles) is grouped by its input.
    """
    return np.array(
        [
            p if p is not None else s if f is None else f"{s}/{sp}/{f}"
            for p, s, sp, f in zip(patient_id, source, split, frame, strict=True)
        ],
        dtype=object,
    )


def _two_classes(y: np.ndarray, task: str) -> bool:
    if task == "multilabel":
        positives = y.sum(axis=0)
        return bool(((positives > 0) & (positives < y.shape[0])).any())
    return np.unique(y).size >= 2


@dataclass(frozen=True)
class TaskData:
    """What the checks found for one task: its classes, labelled rows per split, and its cache key."""

    task: ProbeTask
    key: str  # cache directory: hash of ``identity``
    identity: dict[str, Any]
    classes: list[str]
    counts: dict[str, int]
    modalities: list[str]

    @property
    def modality(self) -> str:
        return self.task.modality or "+".join(self.modalities)


def _data_uri(data: str) -> str:
    return data if storage.is_remote(data) else str(Path(data).resolve())


def task_shards(task: ProbeTask, name: str, error: type[ValueError] = ProbeError):
    """The task's committed shards (of its modality) as one pyarrow dataset, for reading columns without images;
    ``error`` names ``name`` when there are none."""
    import pyarrow.dataset as pads

    try:
        uris = shard_uris([task.data], task.modality)
    except (FileNotFoundError, KeyError) as err:
        raise error(f"{name}: {err}") from None
    if not uris:
        raise error(f"{name}: no shards{f' of modality {task.modality}' if task.modality else ''} in its data")
    fs, _ = storage.filesystem(uris[0])
    return pads.dataset(
        [storage.filesystem(u)[1] for u in uris], filesystem=storage.arrow_filesystem(fs), format="parquet"
    )


def inspect_task(task: ProbeTask) -> TaskData:
    """Read the label, split and patient columns (no images) and reject a task that cannot be probed."""
    name = f"task {task.name}"
    try:
        manifest = read_manifest(task.data)
    except FileNotFoundError as err:
        raise ProbeError(f"{name}: {err}") from None
    dataset = task_shards(task, name)
    missing = sorted({task.label, *META_COLUMNS} - set(dataset.schema.names))
    if missing:
        raise ProbeError(f"{name}: the shards have no column {', '.join(missing)}")
    table = dataset.to_table(columns=list(dict.fromkeys([task.label, *META_COLUMNS])))
    table = table.filter(labelled_mask(table[task.label]))
    if table.num_rows == 0:
        raise ProbeError(f"{name}: no labelled rows (column {task.label!r} is empty in every row)")
    outside = table.num_rows - int(pc.sum(pc.is_in(table["split"], pa.array(SPLITS))).as_py() or 0)
    if outside:
        log.warning("%s: %d labelled rows are in no train/val/test split and are left out", name, outside)
    table = table.filter(pc.is_in(table["split"], pa.array(SPLITS)))
    labels = pc.cast(table[task.label], pa.string()).to_pylist()
    split = np.asarray(table["split"].to_pylist(), dtype=object)
    try:
        y, classes = encode_labels(labels, task.type)
    except ValueError as err:
        raise ProbeError(f"{name}: {err}") from None
    counts = {s: int((split == s).sum()) for s in SPLITS}
    for s in SPLITS:
        if counts[s] == 0:
            raise ProbeError(f"{name}: the {s} split has no labelled rows")
        if not _two_classes(y[split == s], task.type):
            raise ProbeError(f"{name}: the labels of the {s} split are single-class (training and AUROC need two)")
    train = y[split == "train"]
    untrained = [c for k, c in enumerate(classes) if not (train[:, k] if train.ndim == 2 else train == k).any()]
    if untrained:
        raise ProbeError(f"{name}: no training row has class {', '.join(untrained)} (a probe cannot learn it)")
    groups = patient_groups(*(table[c].to_pylist() for c in ("patient_id", "source", "split", "frame")))
    splits_of: dict[str, set[str]] = {}
    for g, s in zip(groups, split, strict=True):
        splits_of.setdefault(g, set()).add(s)
    leaking = sum(1 for s in splits_of.values() if len(s) > 1)
    if leaking:
        raise ProbeError(f"{name}: {leaking} patients have rows in more than one split (splits must be by patient)")
    identity = {
        "version": FEATURES_VERSION,
        "data": _data_uri(task.data),
        "modality": task.modality,
        "label": task.label,
        "shards": manifest.get("shards"),
        "rows": manifest.get("rows"),
        "config_hash": manifest.get("config_hash"),
        "inputs_hash": manifest.get("inputs_hash"),
        "finished": manifest.get("finished"),
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    modalities = sorted(set(table["modality"].to_pylist()))
    return TaskData(task, key, identity, classes, counts, modalities)
