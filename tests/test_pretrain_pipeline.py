"""Pretraining on Ray Train from real shards: two CPU workers, MLflow, checkpoints, resume and fallback."""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
import pytest

from ingest.pipeline import run_ingest
from ingest.samples import make_sample_corpus
from mermed.config import IngestConfig, PretrainConfig, load_config
from mermed.models import load_encoder
from pipelines.pretrain import run_pretrain

ROOT = Path(__file__).resolve().parents[1]
KEY = b"pretrain-test-key-0123456789abcdef"


def tiny_config(**overrides) -> PretrainConfig:
    base = {
        "run.steps": 4,
        "run.checkpoint_every": 2,
        "run.log_every": 1,
        "optim.batch_size_per_worker": 6,
        "optim.warmup_steps": 1,
        "optim.freeze_last_layer_steps": 1,
        "memory.size": 64,
        "model.out_dim": 128,
    }
    return load_config(PretrainConfig, ROOT / "configs" / "pretrain_tiny.yaml", base | overrides)


@pytest.fixture(scope="module")
def shards(ray_session, tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    info = make_sample_corpus(raw, per_class=2, size=64, seed=1)
    out = tmp_path_factory.mktemp("shards")
    # three modalities of unequal size: balanced batches must cycle the small ones
    inputs = [str(info.root / m) for m in ("derm", "oct", "path")]
    run_ingest(inputs, str(out), IngestConfig(), labels_csv=str(info.labels_csv), key=KEY)
    return str(out)


def _history(uri: str, run_id: str, key: str) -> list:
    return mlflow.MlflowClient(uri).get_metric_history(run_id, key)


def test_two_workers_train_checkpoint_resume_and_fallback(shards, tmp_path):
    storage = str(tmp_path / "runs")
    cfg = tiny_config()
    first = run_pretrain(cfg, [shards], storage, "tiny", workers=2, max_failures=0)
    assert first.steps == 4
    run_dir = tmp_path / "runs" / "tiny"
    checkpoints = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) == 2  # steps 2 and 4
    encoder, info = load_encoder(run_dir / "encoder.safetensors")
    assert info.model_name == cfg.model.name and info.img_size == cfg.crops.global_size

    losses = _history(first.tracking_uri, first.mlflow_run_id, "loss")
    assert sorted(m.step for m in losses) == [1, 2, 3, 4] and all(math.isfinite(m.value) for m in losses)
    for key in (
        "dino_loss",
        "memory_loss",
        "lr",
        "wd",
        "momentum",
        "teacher_temp",
        "memory_fill",
        "teacher_entropy",
        "embedding_std",
        "images_per_s",
        "count_DERM",
        "count_OCT",
        "count_PATH",
    ):
        assert _history(first.tracking_uri, first.mlflow_run_id, key), key
    counts = [
        _history(first.tracking_uri, first.mlflow_run_id, f"count_{m}")[-1].value for m in ("DERM", "OCT", "PATH")
    ]
    assert sum(counts) == 6 and max(counts) - min(counts) <= 1
    params = mlflow.MlflowClient(first.tracking_uri).get_run(first.mlflow_run_id).data.params
    assert params["model.name"] == cfg.model.name and params["memory.size"] == "64"

    # Same name, more steps: resumes at step 4 in the same MLflow run.
    resumed = run_pretrain(tiny_config(**{"run.steps": 6}), [shards], storage, "tiny", workers=2, max_failures=0)
    assert resumed.mlflow_run_id == first.mlflow_run_id and resumed.steps == 6
    steps = [m.step for m in _history(first.tracking_uri, first.mlflow_run_id, "loss")]
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]

    # A truncated latest checkpoint: the run falls back to the previous one (step 4) and redoes steps 5-6.
    latest = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())[-1] / "state" / "state.safetensors"
    latest.write_bytes(latest.read_bytes()[:1000])
    again = run_pretrain(tiny_config(**{"run.steps": 8}), [shards], storage, "tiny", workers=2, max_failures=0)
    assert again.steps == 8
    steps = [m.step for m in _history(first.tracking_uri, first.mlflow_run_id, "loss")]
    assert steps.count(5) == 2 and steps.count(6) == 2 and 8 in steps


def test_bad_config_and_inputs_fail_before_compute(shards, tmp_path):
    from mermed.config import ConfigError

    with pytest.raises(ConfigError, match="optim.batch_size_per_worker"):
        tiny_config(**{"optim.batch_size_per_worker": "many"})
    with pytest.raises(ConfigError, match="memory"):
        tiny_config(**{"memory.n_blocks": 3})
    with pytest.raises(ValueError, match="below the number of modalities"):
        run_pretrain(tiny_config(**{"optim.batch_size_per_worker": 2}), [shards], str(tmp_path), "x")
    with pytest.raises(FileNotFoundError, match="_manifest.json"):
        run_pretrain(tiny_config(), [str(tmp_path / "nothing")], str(tmp_path), "x")
