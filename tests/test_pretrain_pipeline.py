"""Pretraining on Ray Train from real shards: two CPU workers, MLflow, checkpoints, resume and fallback."""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
import pytest
from helpers import tiny_config

from ingest.config import IngestConfig
from ingest.pipeline import run_ingest
from ingest.samples import make_sample_corpus
from mermed.config import PretrainConfig
from mermed.models import load_encoder
from pipelines.pretrain import run_pretrain

ROOT = Path(__file__).resolve().parents[1]
KEY = b"pretrain-test-key-0123456789abcdef"


PIPELINE = {
    "run.steps": 4,
    "run.checkpoint_every": 2,
    "run.log_every": 1,
    "optim.batch_size_per_worker": 6,
    "optim.warmup_steps": 1,
    "memory.size": 64,
}


def pipeline_config(**overrides) -> PretrainConfig:
    return tiny_config(**(PIPELINE | overrides))


@pytest.fixture(scope="module")
def shards(fresh_ray, tmp_path_factory):
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
    cfg = pipeline_config()
    first = run_pretrain(cfg, [shards], storage, "tiny", workers=2, max_failures=0)
    assert first.steps == 4
    run_dir = tmp_path / "runs" / "tiny"
    checkpoints = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) == 2  # steps 2 and 4
    encoder, info = load_encoder(run_dir / "encoder.safetensors")
    assert info.model_name == cfg.model.name and info.img_size == cfg.crops.global_size
    assert info.mlflow_run_id == first.mlflow_run_id

    losses = _history(first.tracking_uri, first.mlflow_run_id, "loss")
    assert sorted(m.step for m in losses) == [1, 2, 3, 4] and all(math.isfinite(m.value) for m in losses)
    for key in (
        "objective_loss",
        "koleo_loss",
        "teacher_entropy_ceiling",
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
    run = mlflow.MlflowClient(first.tracking_uri).get_run(first.mlflow_run_id)
    assert run.data.params["model.name"] == cfg.model.name and run.data.params["memory.size"] == "64"
    # the embedding map and its numbers, beside the encoder and in MLflow
    assert (run_dir / "embedding_map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    artifacts = {a.path for a in mlflow.MlflowClient(first.tracking_uri).list_artifacts(first.mlflow_run_id)}
    assert "embedding_map.png" in artifacts
    for m in ("DERM", "OCT", "PATH"):
        assert 0 <= run.data.metrics[f"alignment/{m}"] <= 4  # squared distance of unit vectors
        assert -4 <= run.data.metrics[f"uniformity/{m}"] <= 0
    assert -4 <= run.data.metrics["uniformity/all"] <= 0

    # Same name, more steps: resumes at step 4 in the same MLflow run.
    resumed = run_pretrain(pipeline_config(**{"run.steps": 6}), [shards], storage, "tiny", workers=2, max_failures=0)
    assert resumed.mlflow_run_id == first.mlflow_run_id and resumed.steps == 6
    steps = [m.step for m in _history(first.tracking_uri, first.mlflow_run_id, "loss")]
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]

    # A truncated latest checkpoint: the run falls back to the previous one (step 4) and redoes steps 5-6.
    latest = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())[-1] / "state" / "state.safetensors"
    latest.write_bytes(latest.read_bytes()[:1000])
    again = run_pretrain(pipeline_config(**{"run.steps": 8}), [shards], storage, "tiny", workers=2, max_failures=0)
    assert again.steps == 8
    steps = [m.step for m in _history(first.tracking_uri, first.mlflow_run_id, "loss")]
    assert steps.count(5) == 2 and steps.count(6) == 2 and 8 in steps


def test_two_workers_cross_pass_boundaries_of_a_streamed_modality(fresh_ray, tmp_path, monkeypatch):
    """PATH split over two workers and too big for the stream cache: each of its passes is a new Ray Data epoch,
    which starts only once both workers ask for it, so neither may reach a pass's end while the other waits in the
    gradient all-reduce. Counts that differed by rank (one worker drawing 7 PATH rows a step, the other 8) hung
    here at the third pass boundary, two steps apart, which even a batch prefetched one step ahead cannot bridge."""
    import pipelines.pretrain

    info = make_sample_corpus(tmp_path / "raw", per_class=2, size=64, seed=1)
    shards = str(tmp_path / "shards")  # two modalities: a rank-dependent extra image would go to one of them
    run_ingest([str(info.root / m) for m in ("derm", "path")], shards, IngestConfig(), key=KEY)
    monkeypatch.setattr(pipelines.pretrain, "SPLIT_MIN_ROWS_PER_WORKER", 8)  # split PATH (52 rows), not DERM (4)
    cfg = pipeline_config(
        **{
            "run.steps": 12,
            "run.checkpoint_every": 12,
            "optim.batch_size_per_worker": 15,  # 7 or 8 of PATH's 26 rows a worker: its passes start at 3, 7, 10
            "crops.decode_size": 128,  # 49 kB a row: DERM's 4 rows fit 1 MB, PATH's 26 do not
            "data.stream_cache_mb": 1,
        }
    )
    result = run_pretrain(cfg, [shards], str(tmp_path / "runs"), "passes", workers=2, include_test=True, max_failures=0)
    assert result.steps == 12
    path = _history(result.tracking_uri, result.mlflow_run_id, "epoch_PATH")
    assert max(e.value for e in path) == 3  # three pass boundaries, crossed by both workers
    derm = _history(result.tracking_uri, result.mlflow_run_id, "epoch_DERM")
    assert max(e.value for e in derm) > 3  # cached, a new permutation every pass
    waits = _history(result.tracking_uri, result.mlflow_run_id, "data_wait_s")
    assert len(waits) == 12 and all(w.value >= 0 for w in waits)


def test_bad_config_and_inputs_fail_before_compute(shards, tmp_path):
    from ingest.config import ConfigError

    with pytest.raises(ConfigError, match="optim.batch_size_per_worker"):
        pipeline_config(**{"optim.batch_size_per_worker": "many"})
    with pytest.raises(ConfigError, match="memory"):
        pipeline_config(**{"memory.n_blocks": 3})
    with pytest.raises(ValueError, match="below the number of modalities"):
        run_pretrain(pipeline_config(**{"optim.batch_size_per_worker": 2}), [shards], str(tmp_path), "x")
    with pytest.raises(FileNotFoundError, match="_manifest.json"):
        run_pretrain(pipeline_config(), [str(tmp_path / "nothing")], str(tmp_path), "x")


def test_init_weights_are_the_teacher_at_step_zero(shards, tmp_path):
    """``--init`` (model.init): with the teacher's momentum at 1 it never moves, so the exported encoder is the
    file's weights exactly (tests/test_train.py covers resampled position embeddings)."""
    import torch
    from safetensors.torch import save_file

    from mermed.models import build_backbone

    cfg = pipeline_config(**{"run.steps": 1, "run.checkpoint_every": 1, "optim.momentum_teacher": 1.0})
    torch.manual_seed(3)
    source = build_backbone(cfg.model.name, cfg.crops.global_size)
    path = tmp_path / "init.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    cfg = pipeline_config(
        **{"run.steps": 1, "run.checkpoint_every": 1, "optim.momentum_teacher": 1.0, "model.init": str(path)}
    )
    result = run_pretrain(cfg, [shards], str(tmp_path / "runs"), "init", max_failures=0)
    encoder, _ = load_encoder(result.encoder_uri)
    got = encoder.state_dict()
    assert got.keys() == source.state_dict().keys()
    assert all(torch.equal(got[k], v) for k, v in source.state_dict().items())
