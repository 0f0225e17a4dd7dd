"""The kNN monitor: DINO's weighted vote by hand, AUROC on separable features, teacher drift, and a short
Ray Train run that logs the monitor at step 0 and at each checkpoint (and not step 0 again when it resumes)."""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import tiny_config
from torch import nn

from ingest.config import IngestConfig
from ingest.pipeline import run_ingest
from mermed.augment import MultiCrop
from mermed.embedding_map import EmbeddingSample, embedding_report
from mermed.metrics import accuracy, auroc
from mermed.monitor import KnnMonitor, KnnSettings, MonitorError, check_tasks, initial_backbone, knn_scores
from mermed.probe.config import ProbeTask
from mermed.train import build_train_state
from pipelines.pretrain import run_pretrain


def test_knn_votes_are_weighted_by_similarity() -> None:
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])  # unit rows; classes 0, 1, 1
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    query = torch.tensor([[1.0, 0.0]])  # similarities 1, 0, 0.6
    # k = 3, T = 0.5: class 0 gets e^2, class 1 gets e^0 + e^1.2; the weighting outvotes the 2-to-1 majority.
    total = math.exp(2) + math.exp(0) + math.exp(1.2)
    scores = knn_scores(bank, targets, query, k=3, temperature=0.5)
    assert scores.tolist()[0] == pytest.approx([math.exp(2) / total, (1 + math.exp(1.2)) / total])
    # k = 2 keeps the two nearest (rows 0 and 2); a k beyond the bank uses all of it.
    pair = math.exp(2) + math.exp(1.2)
    assert knn_scores(bank, targets, query, k=2, temperature=0.5).tolist()[0] == pytest.approx(
        [math.exp(2) / pair, math.exp(1.2) / pair]
    )
    assert torch.allclose(knn_scores(bank, targets, query, k=50, temperature=0.5), scores)


def test_separable_features_score_auroc_one() -> None:
    gen = torch.Generator().manual_seed(0)

    def cluster(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % 3
        centres = torch.eye(3, 16) * 4
        return F.normalize(centres[y] + torch.randn(n, 16, generator=gen) * 0.3, dim=1), y

    bank, bank_y = cluster(60)
    queries, y = cluster(30)
    scores = knn_scores(bank, F.one_hot(bank_y, 3).float(), queries).numpy()
    assert scores.sum(axis=1) == pytest.approx(np.ones(30))
    assert auroc(y.numpy(), scores, "multiclass") > 0.99
    assert accuracy(y.numpy(), scores, "multiclass") == 1.0


def test_drift_is_zero_at_the_start_and_grows_with_a_change() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    norm = math.sqrt(sum(float(p.detach().pow(2).sum()) for p in model.parameters()))
    monitor = KnnMonitor([], model, img_size=32, device=torch.device("cpu"))
    assert monitor.drift(model) == 0.0
    with torch.no_grad():
        model[0].weight[0, 0] += 0.5
    assert monitor.drift(model) == pytest.approx(0.5 / norm)
    metrics = monitor(model)
    assert set(metrics) == {"teacher_drift", "monitor_s"} and metrics["teacher_drift"] > 0


def test_initial_backbone_rebuilds_step_zero_without_touching_the_rng() -> None:
    cfg = tiny_config()
    teacher = build_train_state(cfg).teacher.backbone.state_dict()
    before = torch.get_rng_state()
    rebuilt = initial_backbone(cfg).state_dict()
    assert torch.equal(torch.get_rng_state(), before)
    assert rebuilt.keys() == teacher.keys() and all(torch.equal(rebuilt[k], teacher[k]) for k in teacher)


# ----------------------------------------------------------------------------------------------- end to end


def _npz(path: Path, sizes: dict[str, int], seed: int) -> None:
    """A MedMNIST-style archive: bright images for label 1, dark for 0."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in sizes.items():
        labels = np.arange(n) % 2
        images = np.clip(np.where(labels[:, None, None], 170, 80) + rng.normal(0, 25, (n, 28, 28)), 0, 255)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images.astype(np.uint8), labels[:, None]
    path.parent.mkdir(parents=True)
    np.savez(path, **arrays)


@pytest.fixture(scope="module")
def corpora(fresh_ray, tmp_path_factory) -> tuple[str, str]:
    """Two ingest outputs: one with train/val/test (also the pretraining data), one without val rows."""
    root = tmp_path_factory.mktemp("monitor")
    outputs = []
    for name, sizes in (("full", {"train": 24, "val": 8, "test": 8}), ("noval", {"train": 16, "test": 8})):
        _npz(root / name / "octmnist.npz", sizes, seed=len(outputs))
        run_ingest([str(root / name)], str(root / f"{name}-shards"), IngestConfig(modality="OCT"))
        outputs.append(str(root / f"{name}-shards"))
    return outputs[0], outputs[1]


def _tasks(path: Path, tasks: dict[str, str]) -> Path:
    path.write_text(yaml.safe_dump({"tasks": [{"name": n, "data": d, "type": "binary"} for n, d in tasks.items()]}))
    return path


def test_bad_monitor_task_fails_before_training(corpora, tmp_path) -> None:
    full, _ = corpora
    with pytest.raises(MonitorError, match="monitor task m .*single-class"):
        check_tasks([ProbeTask(name="m", data=full, type="binary")], KnnSettings(train_rows=1))
    with pytest.raises(MonitorError, match="monitor task m: the shards have no column grade"):
        check_tasks([ProbeTask(name="m", data=full, type="binary", label="grade")], KnnSettings())
    tasks = _tasks(tmp_path / "tasks.yaml", {"m": str(tmp_path / "nothing")})
    with pytest.raises(MonitorError, match="monitor task m: .*_manifest.json"):
        run_pretrain(tiny_config(), [full], str(tmp_path / "runs"), "x", monitor=tasks)
    assert not (tmp_path / "runs").exists()


def test_pretrain_logs_the_monitor_at_step_zero_and_every_checkpoint(corpora, tmp_path) -> None:
    full, noval = corpora
    tasks = _tasks(tmp_path / "tasks.yaml", {"oct": full, "noval": noval})
    settings = KnnSettings(train_rows=16, eval_rows=8, batch_size=16)
    cfg = tiny_config(**{"run.steps": 4, "run.checkpoint_every": 2, "run.log_every": 2})
    storage = str(tmp_path / "runs")
    result = run_pretrain(cfg, [full], storage, "knn", max_failures=0, monitor=tasks, monitor_settings=settings)
    client = mlflow.MlflowClient(result.tracking_uri)

    def history(key: str) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(result.mlflow_run_id, key)}

    for task in ("oct", "noval"):
        assert sorted(history(f"knn_accuracy/{task}")) == [0, 2, 4]
        assert all(0 <= v <= 1 for v in history(f"knn_auroc/{task}").values())
    assert history("knn_auroc/oct")[0] > 0.8  # bright vs dark: separable even by the random-init teacher
    drift = history("teacher_drift")
    assert drift[0] == 0.0 and drift[2] > 0 and drift[4] > 0
    assert sorted(history("monitor_s")) == [0, 2, 4] and history("monitor_setup_s")
    tags = client.get_run(result.mlflow_run_id).data.tags
    assert (tags["monitor.oct.split"], tags["monitor.noval.split"]) == ("val", "test")

    # Resumed: no second step-0 point, and the drift is still measured from the step-0 teacher.
    cfg6 = tiny_config(**{"run.steps": 6, "run.checkpoint_every": 2, "run.log_every": 2})
    run_pretrain(cfg6, [full], storage, "knn", max_failures=0, monitor=tasks, monitor_settings=settings)
    steps = [m.step for m in client.get_metric_history(result.mlflow_run_id, "knn_accuracy/oct")]
    assert sorted(steps) == [0, 2, 4, 6]
    assert history("teacher_drift")[6] > 0


def test_embedding_report_matches_the_alignment_and_uniformity_formulas(tmp_path):
    """Wang & Isola's alignment E||f(x) - f(x+)||^2 over the two global views, and uniformity
    log E exp(-2 ||f(x) - f(y)||^2) over pairs of images, per modality and over all, recomputed here in numpy
    from the same views; the map is written."""
    rng = np.random.default_rng(0)
    n = 12
    sample = EmbeddingSample(
        pixels=rng.integers(0, 256, (n, 40, 40, 3), dtype=np.uint8),
        valid=np.tile(np.array([0, 0, 40, 40], np.int32), (n, 1)),
        modality=np.array(["CT"] * 5 + ["DERM"] * 7),
        label=np.array(["0", "1"] * 3 + [None] * 6, dtype=object),
    )
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 8, stride=8), nn.Flatten(), nn.LazyLinear(16))
    crops = MultiCrop.from_config(tiny_config().crops)
    normalization = {m: {"mean": [0.5] * 3, "std": [0.25] * 3} for m in ("CT", "DERM")}
    backbone(torch.zeros(1, 3, 32, 32))  # materialise the lazy layer
    metrics = embedding_report(backbone, sample, crops, normalization, tmp_path / "map.png", seed=3)

    images = torch.from_numpy(sample.pixels).permute(0, 3, 1, 2)
    grayscale = torch.tensor([True] * 5 + [False] * 7)  # CT is a grayscale modality, DERM is not
    mean, std = torch.full((n, 3), 0.5), torch.full((n, 3), 0.25)
    views = crops(
        images, grayscale, torch.Generator().manual_seed(3), valid=torch.from_numpy(sample.valid), mean=mean, std=std
    )
    with torch.no_grad():
        a, b = (F.normalize(backbone(v), dim=1).double().numpy() for v in views[:2])

    def uniformity(z):
        d2 = ((z[:, None] - z[None]) ** 2).sum(-1)[np.triu_indices(len(z), 1)]
        return math.log(np.exp(-2 * d2).mean())

    for m, rows in (("CT", slice(0, 5)), ("DERM", slice(5, 12))):
        assert metrics[f"alignment/{m}"] == pytest.approx(((a[rows] - b[rows]) ** 2).sum(1).mean(), rel=1e-5)
        assert metrics[f"uniformity/{m}"] == pytest.approx(uniformity(a[rows]), rel=1e-5)
    assert metrics["uniformity/all"] == pytest.approx(uniformity(a), rel=1e-5)
    assert (tmp_path / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
