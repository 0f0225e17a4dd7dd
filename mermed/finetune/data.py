"""A task's labelled rows as Ray Datasets for fine-tuning: labels encoded against the task's classes, decoded on
the CPU by Ray Data (letterboxed for training, the probe's square view for evaluation), augmented on the device by
the worker. Rows are named by a key that is stable across reads, so that label subsets, predictions of different
runs and their patients line up."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ingest.schema import SPLITS
from mermed.data import decode_letterbox, decode_square, open_shards
from mermed.probe.heads import encode_labels, subsample_labels
from mermed.probe.tasks import META_COLUMNS, ProbeError, TaskData, labelled_mask, patient_groups, task_shards

KEY_COLUMNS = ("source", "split", "frame", "tile_level", "tile_x", "tile_y")


def row_keys(table: pa.Table) -> np.ndarray:
    """One name per row, unique within a dataset: the input's pseudonym, split, frame and tile."""
    parts = [pc.fill_null(pc.cast(table[c], pa.string()), "-") for c in KEY_COLUMNS]
    return np.asarray(pc.binary_join_element_wise(*parts, "/").to_pylist(), dtype=object)


def _label_table(data: TaskData, columns: Sequence[str] = ()) -> pa.Table:
    """The task's labelled rows in the train/val/test splits, without images."""
    task = data.task
    wanted = list(dict.fromkeys([task.label, *META_COLUMNS, *KEY_COLUMNS, *columns]))
    table = task_shards(task, f"task {task.name}").to_table(columns=wanted)
    table = table.filter(labelled_mask(table[task.label]))
    return table.filter(pc.is_in(table["split"], pa.array(SPLITS)))


def train_subset(data: TaskData, fraction: float, seed: int) -> list[str] | None:
    """Keys of a stratified ``fraction`` of the training rows (subset ``seed``, as the probes draw it); None for
    all of them."""
    if fraction >= 1:
        return None
    table = _label_table(data)
    table = table.filter(pc.equal(table["split"], "train"))
    y, _ = encode_labels(pc.cast(table[data.task.label], pa.string()).to_pylist(), data.task.type, data.classes)
    rows = subsample_labels(y, fraction, seed, data.task.type)
    return sorted(row_keys(table)[rows].tolist())


def external_rows(data: TaskData, external: TaskData) -> int:
    """How many labelled rows of ``external`` (all splits) carry a class of ``data``; the others are left out.
    Raises ProbeError when none do or when the external set lacks a class the model predicts."""
    table = _label_table(external)
    labels = pc.cast(table[external.task.label], pa.string()).to_pylist()
    if data.task.type == "multilabel":
        return len(labels)
    known = set(data.classes)
    kept = sum(1 for label in labels if label.strip() in known)
    if not kept:
        raise ProbeError(f"task {data.task.name}: no row of its external set has one of its classes {data.classes}")
    return kept


ATTRIBUTE_PREFIX = "attr_"  # decoded rows carry each requested attribute as attr_<name> ("" where absent)


def _attribute_columns(batch: pa.Table, names: Sequence[str]) -> dict[str, np.ndarray]:
    values = [json.loads(a) if a else {} for a in batch["attributes"].to_pylist()] if names else []
    return {f"{ATTRIBUTE_PREFIX}{n}": np.asarray([str(v.get(n, "")) for v in values], dtype=object) for n in names}


def _encode(
    batch: pa.Table,
    *,
    label: str,
    kind: str,
    classes: list[str],
    known_only: bool,
    attributes: Sequence[str],
) -> dict[str, np.ndarray]:
    batch = batch.filter(labelled_mask(batch[label]))
    labels = [t.strip() for t in pc.cast(batch[label], pa.string()).to_pylist()]
    if known_only and kind != "multilabel":
        batch = batch.filter(pa.array([t in classes for t in labels], pa.bool_()))
        labels = [t for t in labels if t in classes]
    y, _ = encode_labels(labels, kind, classes, whole_split=False)
    groups = patient_groups(*(batch[c].to_pylist() for c in ("patient_id", "source", "split", "frame")))
    return {
        "image": np.asarray(batch["image"].to_pylist(), dtype=object),
        "modality": np.asarray(batch["modality"].to_pylist(), dtype=object),
        "target": y.astype(np.float32 if kind == "multilabel" else np.int64),
        "group": groups.astype(str),
        "key": row_keys(batch).astype(str),
        **_attribute_columns(batch, attributes),
    }


def _decode(batch: dict[str, np.ndarray], *, size: int, letterbox: bool) -> dict[str, np.ndarray]:
    """Encoded images to uint8 (N, size, size, 3), with the valid box (the whole square for the eval view)."""
    if letterbox:
        decoded = [decode_letterbox(b, size) for b in batch["image"]]
        pixels = [p for p, _ in decoded]
        valid = [v for _, v in decoded]
    else:
        pixels = [decode_square(b, size) for b in batch["image"]]
        valid = [np.array([0, 0, size, size], np.int32)] * len(pixels)
    n = len(pixels)
    rest = {k: v for k, v in batch.items() if k != "image"}
    return {
        **rest,
        "pixels": np.stack(pixels) if n else np.zeros((0, size, size, 3), np.uint8),
        "valid": np.stack(valid) if n else np.zeros((0, 4), np.int32),
    }


def encoded_rows(
    data: TaskData,
    splits: Sequence[str],
    *,
    classes: list[str],
    kind: str,
    known_only: bool = False,
    attributes: Sequence[str] = (),
):
    """The labelled rows of ``splits``, read, filtered and label-encoded once, still as encoded images, in the
    object store (spilled if need be): image, modality, target, group, key and attr_<name> per attribute.

    The job builds these once per task and every run of the task (label fractions, seeds, encoders) starts from
    them, instead of listing and reading the shards again per run and per epoch. ``classes`` and ``kind`` are the
    fine-tuned task's: an external set is encoded with them (``known_only`` drops its rows of other classes)."""
    task = data.task
    extra = ["attributes"] if attributes else []
    columns = list(dict.fromkeys(["image", "modality", task.label, *META_COLUMNS, *KEY_COLUMNS, *extra]))
    ds = open_shards([task.data], splits=splits, modality=task.modality, columns=columns)
    ds = ds.map_batches(
        _encode,
        batch_format="pyarrow",
        fn_kwargs={
            "label": task.label,
            "kind": kind,
            "classes": classes,
            "known_only": known_only,
            "attributes": list(attributes),
        },
    )
    return ds.materialize()


def _keep(batch: dict[str, np.ndarray], *, keys: frozenset[str]) -> dict[str, np.ndarray]:
    chosen = np.fromiter((k in keys for k in batch["key"]), bool, len(batch["key"]))
    return {name: column[chosen] for name, column in batch.items()}


def decoded_rows(encoded, *, size: int, train: bool, keep: Sequence[str] | None = None):
    """One run's view of ``encoded_rows``: only the ``keep`` keys (a label subset), decoded on every read
    (letterboxed for training, the probe's square view for evaluation)."""
    ds = encoded
    if keep is not None:
        ds = ds.map_batches(_keep, batch_format="numpy", fn_kwargs={"keys": frozenset(keep)})
    return ds.map_batches(_decode, batch_format="numpy", fn_kwargs={"size": size, "letterbox": train})


__all__ = ["ATTRIBUTE_PREFIX", "decoded_rows", "encoded_rows", "external_rows", "row_keys", "train_subset"]
