"""Probing a MedMNIST ``.npz`` as ingest writes it: one input holds every split and no patient ids, so each row
must be its own group (the whole file as one "patient" would sit in all three splits)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import yaml

from ingest.config import IngestConfig, parse_config
from ingest.pipeline import run_ingest
from mermed.models import build_backbone, export_encoder
from mermed.probe.config import ProbeConfig
from mermed.probe.tasks import patient_groups
from pipelines.probe import run_probe

MODEL, SIZE = "vit_tiny_patch16_224", 32
CFG = parse_config(
    ProbeConfig,
    {
        "trials": 1,
        "fractions": [1.0],
        "seeds": 1,
        "bootstrap": 50,
        "search": {"heads": ["linear"], "epochs": [3], "grace_period": 1, "batch_size": 64},
        "extract": {"batch_size": 32},
    },
)


def test_patient_groups_fall_back_to_input_split_and_frame() -> None:
    groups = patient_groups(
        ["p1", None, None, None, None],
        ["s1", "npz", "npz", "npz", "png"],
        ["train", "train", "val", "train", "test"],
        [None, 0, 0, 1, None],
    )
    assert groups.tolist() == ["p1", "npz/train/0", "npz/val/0", "npz/train/1", "png"]


def _split(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` noisy 28 px images, bright for label 1 and dark for 0 (separable even by random weights)."""
    labels = np.arange(n) % 2
    images = np.clip(np.where(labels[:, None, None], 170, 80) + rng.normal(0, 25, (n, 28, 28)), 0, 255)
    return images.astype(np.uint8), labels[:, None]


def test_medmnist_npz_probes_with_its_official_splits(fresh_ray, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 24), ("val", 8), ("test", 12)):
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = _split(rng, n)
    raw = tmp_path / "raw"
    raw.mkdir()
    np.savez(raw / "octmnist.npz", **arrays)
    shards = tmp_path / "shards"
    manifest = run_ingest([str(raw)], str(shards), IngestConfig(modality="OCT")).manifest
    assert manifest["splits"]["OCT"] == {"train": 24, "val": 8, "test": 12}

    encoder = tmp_path / "run" / "encoder.safetensors"
    export_encoder(build_backbone(MODEL, SIZE), encoder, model_name=MODEL, img_size=SIZE)
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(yaml.safe_dump({"tasks": [{"name": "octmnist", "data": str(shards), "type": "binary"}]}))

    result = run_probe(encoder, tasks, tmp_path / "out", CFG)
    (row,) = result.summary
    assert (row["task"], row["encoder"], row["modality"], int(row["n_test"])) == ("octmnist", "pretrained", "OCT", 12)
    assert math.isfinite(float(row["auroc"])) and float(row["auroc"]) > 0.8, row
