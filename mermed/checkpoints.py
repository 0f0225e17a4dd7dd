"""A run's checkpoints in storage (local or s3://): resuming from the newest one that loads, exporting the encoder.

Ray Train writes each checkpoint as ``STORAGE/RUN/checkpoint_<time>/state/`` (``mermed.train.save_checkpoint``'s
files); this module reads them with fsspec alone, so the same fall-back serves a Ray Train worker and a bare loop.
"""

from __future__ import annotations

import logging
import os
import posixpath
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load, load_file, save_file
from torch import nn

from ingest import storage
from mermed.config import PretrainConfig
from mermed.models import build_backbone, export_encoder
from mermed.train import STATE_FILE, TrainState, load_checkpoint

log = logging.getLogger("mermed.checkpoints")

CHECKPOINT_DIR = "state"  # inside each Ray Train checkpoint folder
ENCODER_FILE = "encoder.safetensors"
SERVED_FILE = "served.safetensors"  # in CHECKPOINT_DIR: the rows each worker had served of its newest passes


def save_served(served: list[dict[str, tuple[int, np.ndarray]]], state_dir: Path) -> None:
    """Every worker's ``BalancedBatches.served()`` (in rank order) beside the state: what a run without
    ``run.deterministic_data`` resumes its interrupted passes from."""
    tensors = {f"keys/{m}/{r}": torch.from_numpy(keys) for r, per in enumerate(served) for m, (_, keys) in per.items()}
    tensors |= {f"pass/{m}": torch.tensor(epoch) for m, (epoch, _) in served[0].items()}
    save_file(tensors, str(Path(state_dir) / SERVED_FILE))


def load_served(fs, checkpoint: str) -> dict[str, tuple[int, list[np.ndarray]]]:
    """``save_served``'s record as {modality: (pass, keys served per rank)}; empty for a checkpoint without one."""
    try:
        with fs.open(posixpath.join(checkpoint, CHECKPOINT_DIR, SERVED_FILE), "rb") as fh:
            tensors = load(fh.read())
    except FileNotFoundError:
        return {}
    out: dict[str, tuple[int, list[np.ndarray]]] = {}
    for name in sorted(k for k in tensors if k.startswith("pass/")):
        m = name.split("/", 1)[1]
        ranks = sorted(int(k.rsplit("/", 1)[1]) for k in tensors if k.startswith(f"keys/{m}/"))
        out[m] = (int(tensors[name]), [tensors[f"keys/{m}/{r}"].numpy() for r in ranks])
    return out


def checkpoint_candidates(run_uri: str, latest: str | None = None) -> list[str]:
    """``latest`` (Ray Train's own view of the newest checkpoint) first, then the run's others, newest first."""
    fs, root = storage.filesystem(run_uri)
    found = []
    if fs.exists(root):
        found = sorted((p for p in fs.glob(posixpath.join(root, "checkpoint_*")) if fs.isdir(p)), reverse=True)
    ordered = [latest] if latest else []
    return ordered + [p for p in found if not latest or posixpath.normpath(p) != posixpath.normpath(latest)]


class CheckpointStorageError(OSError):
    """The checkpoint storage could not be read (not: a checkpoint is broken). A run stops on it rather than fall
    back to older checkpoints or to step 0, which would redo or lose the work the unreachable ones hold."""


def _load_from(state: TrainState, fs, path: str) -> None:
    state_dir = posixpath.join(path, CHECKPOINT_DIR)
    if not storage.is_remote(state_dir) and os.path.isdir(state_dir):
        load_checkpoint(state, state_dir)
        return
    with tempfile.TemporaryDirectory() as tmp:
        try:
            fs.get(state_dir + "/", tmp, recursive=True)
        except FileNotFoundError:
            raise  # an incomplete checkpoint: the previous one serves
        except Exception as err:
            raise CheckpointStorageError(f"cannot read checkpoint {path} ({type(err).__name__}: {err})") from err
        load_checkpoint(state, tmp)


def restore_newest(state: TrainState, run_uri: str, latest: str | None = None) -> str | None:
    """Load the newest checkpoint that loads into ``state``; a corrupt or truncated one is skipped with a warning,
    storage that cannot be read stops the run (``CheckpointStorageError``). Returns the checkpoint's path, or None
    when the run has none (a fresh start)."""
    fs, _ = storage.filesystem(run_uri)
    try:
        candidates = checkpoint_candidates(run_uri, latest)
    except Exception as err:
        raise CheckpointStorageError(f"cannot list the checkpoints of {run_uri} ({type(err).__name__}: {err})") from err
    for path in candidates:
        try:
            _load_from(state, fs, path)
            return path
        except CheckpointStorageError:
            raise
        except Exception as err:  # noqa: BLE001 - fall back to the previous checkpoint, whatever broke this one
            log.warning(
                "checkpoint %s cannot be loaded (%s: %s); trying the previous one",
                posixpath.basename(path),
                type(err).__name__,
                err,
            )
    return None


def teacher_backbone(state_dir: str | Path, cfg: PretrainConfig) -> nn.Module:
    """The teacher backbone of a checkpoint's ``state/`` folder (what a run exports), in eval mode."""
    tensors = load_file(str(Path(state_dir) / STATE_FILE))
    prefix = "teacher/backbone."
    backbone = build_backbone(cfg.model.name, cfg.crops.global_size)
    backbone.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True)
    return backbone.eval()


def export_teacher(
    backbone: nn.Module,
    cfg: PretrainConfig,
    run_uri: str,
    normalization: dict[str, dict[str, list[float]]],
    mlflow_run_id: str | None = None,
) -> str:
    """A teacher backbone as ``RUN/encoder.safetensors`` + ``encoder.json`` (which records the per-modality
    ``normalization`` the run trained with and its MLflow run)."""
    fs, root = storage.filesystem(run_uri)
    with tempfile.TemporaryDirectory() as tmp:
        export_encoder(
            backbone,
            Path(tmp) / ENCODER_FILE,
            model_name=cfg.model.name,
            img_size=cfg.crops.global_size,
            normalization=normalization,
            mlflow_run_id=mlflow_run_id,
        )
        for name in os.listdir(tmp):
            fs.put(os.path.join(tmp, name), posixpath.join(root, name))
    return storage.join(run_uri, ENCODER_FILE)


__all__ = [
    "CHECKPOINT_DIR",
    "ENCODER_FILE",
    "CheckpointStorageError",
    "checkpoint_candidates",
    "export_teacher",
    "restore_newest",
    "teacher_backbone",
]
