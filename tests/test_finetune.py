"""Full fine-tuning on Ray Train + Ray Tune with a tiny ViT on CPU: a 2-worker run that trains, scores, and
resumes after its worker is SIGKILLed; a Tune job of 2 tasks x 2 label fractions x 2 seeds that writes the summary
(the paired comparison between encoders is tested on its own, without the cost of a second encoder's runs),
with an external set scored by the model of its task and subgroup metrics by an ingested attribute."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import checkpoint_registered, killing

from ingest.config import IngestConfig, parse_config
from ingest.pipeline import run_ingest
from mermed.finetune import FinetuneConfig
from mermed.finetune.report import SUMMARY_COLUMNS
from mermed.metrics import METRICS
from mermed.models import build_backbone, export_encoder
from pipelines.finetune import run_finetune

MODEL, SIZE = "mermed_vit_tiny_patch8_depth6", 32


def _images(rng: np.random.Generator, n: int, bright: int, dark: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` noisy 28 px images, bright for label 1 and dark for 0."""
    labels = np.arange(n) % 2
    images = np.clip(np.where(labels[:, None, None], bright, dark) + rng.normal(0, 25, (n, 28, 28)), 0, 255)
    return images.astype(np.uint8), labels[:, None]


def _labelled_shards(tmp: Path, name: str, seed: int, bright: int = 170, dark: int = 80) -> Path:
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", 40), ("val", 12), ("test", 16)):
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = _images(rng, n, bright, dark)
    raw = tmp / f"raw-{name}"
    raw.mkdir()
    np.savez(raw / f"{name}.npz", **arrays)
    shards = tmp / f"shards-{name}"
    run_ingest([str(raw)], str(shards), parse_config(IngestConfig, {"modality": "OCT", "dataset": name}))
    return shards


def _png_shards_with_sex(tmp: Path, name: str, seed: int) -> Path:
    """The same kind of images as PNG files with a label CSV that carries a ``sex`` attribute column."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    raw = tmp / f"raw-{name}"
    raw.mkdir()
    lines = ["path,label,split,sex"]
    for split, n in (("train", 40), ("val", 12), ("test", 16)):
        images, labels = _images(rng, n, 150, 100)
        for i, (image, label) in enumerate(zip(images, labels[:, 0], strict=True)):
            Image.fromarray(image).save(raw / f"{split}{i}.png")
            lines.append(f"{split}{i}.png,{label},{split},{'FM'[i % 4 < 2]}")
    labels_csv = tmp / f"{name}.csv"
    labels_csv.write_text("\n".join(lines) + "\n")
    shards = tmp / f"shards-{name}"
    cfg = parse_config(IngestConfig, {"modality": "OCT", "dataset": name, "attributes": ["sex"]})
    run_ingest([str(raw)], str(shards), cfg, labels_csv=str(labels_csv))
    return shards


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("finetune")
    encoder = tmp / "run" / "encoder.safetensors"
    export_encoder(build_backbone(MODEL, SIZE), encoder, model_name=MODEL, img_size=SIZE)
    return {
        "encoder": encoder,
        "a": _labelled_shards(tmp, "octa", 0),
        "b": _png_shards_with_sex(tmp, "octb", 1),
        "external": _labelled_shards(tmp, "octx", 2, bright=160, dark=90),
    }


def _config(**overrides) -> FinetuneConfig:
    base = {
        "train": {"epochs": 3, "warmup_epochs": 1, "batch_size": 8, "base_lr": 2e-2, "drop_path": 0.0},
        "fractions": [1.0],
        "seeds": [0],
        # Small reservations: Ray Train under Tune leaves each finished run's placement group behind when Ray runs
        # without its dashboard (as this session's does); the next module's fresh Ray starts without them.
        "cpus_per_worker": 0.05,
        "max_concurrent_trials": 2,
        "bootstrap": 20,
        "attention_maps": 2,
    }
    return parse_config(FinetuneConfig, base | overrides)


def _tasks(path: Path, tasks: list[dict]) -> Path:
    path.write_text(yaml.safe_dump({"tasks": tasks}))
    return path


def _trial_epochs(out: Path) -> list[int]:
    """Epochs the runs reported to Tune so far (result.json of every trial)."""
    epochs = []
    for result in out.glob("tune/*/result.json"):
        for line in result.read_text().splitlines():
            row = json.loads(line)
            if "epoch" in row and row.get("scored") != 1:
                epochs.append(int(row["epoch"]))
    return epochs


def test_two_worker_run_trains_scores_and_resumes_after_a_killed_worker(fresh_ray, corpus, tmp_path):
    tasks = _tasks(tmp_path / "tasks.yaml", [{"name": "octa", "data": str(corpus["a"]), "type": "binary"}])
    out = tmp_path / "out"
    cfg = _config(workers_per_trial=2, max_failures=1, train={**_config().train.model_dump(), "epochs": 4})
    with killing("ray::RayTrainWorker", checkpoint_registered(str(out / "train" / "*"))) as killed:
        result = run_finetune(corpus["encoder"], tasks, out, cfg)
    assert killed, "the run ended before a worker could be killed"
    assert result.failed == 0
    (row,) = result.results
    assert row["task"] == "octa" and row["encoder"] == "pretrained" and 1 <= row["best_epoch"] <= 4
    assert row["auroc"] > 0.8, row  # bright vs dark: fine-tuning must learn it
    epochs = _trial_epochs(out)
    assert sorted(set(epochs)) == [1, 2, 3, 4]
    assert epochs.count(1) == 1, "the restarted run began again from scratch instead of its checkpoint"
    (summary,) = result.summary
    assert summary["n_test"] == 16 and summary["seeds"] == 1
    assert all(math.isfinite(summary[m]) for m in METRICS)


# Eight Ray Train runs, two at a time, each paying Ray Train's start (most of its time): 196 s on 2 quiet cores
# (337 s before the job encoded each task's sets once for all its runs), 347-743 s on CI before that.
@pytest.mark.timeout(1200)
def test_tune_job_of_two_tasks_two_fractions_two_seeds_writes_the_summary(fresh_ray, corpus, tmp_path):
    tasks = _tasks(
        tmp_path / "tasks.yaml",
        [
            {"name": "octa", "data": str(corpus["a"]), "type": "binary", "external": str(corpus["external"])},
            {"name": "octb", "data": str(corpus["b"]), "type": "binary", "attributes": ["sex"]},
        ],
    )
    out = tmp_path / "out"
    cfg = _config(fractions=[0.5, 1.0], seeds=[0, 1], train={**_config().train.model_dump(), "epochs": 2})
    result = run_finetune(corpus["encoder"], tasks, out, cfg)
    assert result.failed == 0
    runs = {(r["task"], r["encoder"], r["fraction"], r["seed"], r["test_set"]) for r in result.results}
    cells = [("pretrained", f, s) for f in (0.5, 1.0) for s in (0, 1)]
    expected = {(t, *c, "test") for t in ("octa", "octb") for c in cells} | {("octa", *c, "external") for c in cells}
    assert runs == expected
    assert {r["n_train"] for r in result.results} == {20, 40}  # a stratified half of the 40 training rows, and all
    with (out / "summary.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == SUMMARY_COLUMNS
    assert len(rows) == 2 * (2 + 1)  # per fraction: each task on its test set, plus octa's external set
    assert {r["seeds"] for r in rows} == {"2"}
    external = [r for r in rows if r["test_set"] == "external"]
    assert {int(r["n_test"]) for r in external} == {68}  # every labelled row of the external set
    for r in rows:
        assert float(r["auroc_lo"]) <= float(r["auroc"]) <= float(r["auroc_hi"]) or math.isnan(float(r["auroc_lo"]))
    text = (out / "summary.md").read_text()
    assert list(out.glob("attention_octa_*.png")) and list(out.glob("reliability/*.png"))
    with (out / "subgroups.csv").open() as fh:
        groups = list(csv.DictReader(fh))
    assert {(g["task"], g["attribute"], g["value"], g["n"]) for g in groups} == {("octb", "sex", v, "8") for v in "FM"}
    assert len(groups) == 2 * 2 * 2  # fractions x seeds x values
    assert "largest AUROC gap between sex groups" in text

    import mlflow

    client = mlflow.MlflowClient(result.tracking_uri)
    parent = client.get_run(result.parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'"
    )
    assert len(children) == len(result.results)
    assert all("test_ece" in c.data.metrics or "external_test_ece" in c.data.metrics for c in children)


def test_summary_and_paired_comparison_over_matched_runs():
    from scipy.stats import wilcoxon

    from mermed.finetune.report import Run, comparisons, markdown, summarize

    rng = np.random.default_rng(0)
    y = np.tile([0, 1], 20)
    groups, keys = np.arange(40).astype(str), np.array([f"k{i:02d}" for i in range(40)])

    def run(encoder: str, seed: int, signal: float) -> Run:
        scores = 1 / (1 + np.exp(-(signal * (2 * y - 1) + rng.normal(0, 1, y.size))))
        return Run("t", "binary", "OCT", encoder, 1.0, seed, "test", 40, 0.005, 0.65, 2, 0.9, y, scores, groups, keys)

    runs = [run("pretrained", s, 2.0) for s in range(5)] + [run("random", s, 0.3) for s in range(5)]
    rows = summarize(runs, n_boot=50)
    assert [(r["encoder"], r["seeds"]) for r in rows] == [("pretrained", 5), ("random", 5)]
    assert rows[0]["auroc"] == pytest.approx(np.mean([r.metrics["auroc"] for r in runs[:5]]))
    assert rows[0]["auroc_std"] == pytest.approx(np.std([r.metrics["auroc"] for r in runs[:5]], ddof=1))
    (compared,) = comparisons(runs)
    a, b = [r.metrics["auroc"] for r in runs[:5]], [r.metrics["auroc"] for r in runs[5:]]
    assert (compared["versus"], compared["pairs"], compared["wins"]) == ("random", 5, 5)
    assert compared["p_value"] == pytest.approx(wilcoxon(a, b).pvalue)
    assert "pretrained vs random" in markdown(rows, [compared])


def test_shipped_finetune_configs_load_and_nonsense_names_the_field():
    from ingest.config import ConfigError, load_config

    root = Path(__file__).resolve().parents[1] / "configs"
    published = load_config(FinetuneConfig, root / "finetune_vitb.yaml")
    assert (published.train.base_lr, published.train.layer_decay, published.train.epochs) == (5e-3, 0.65, 50)
    assert published.seeds == [0, 1, 42, 123, 2025] and published.fractions == [0.1, 0.3, 0.5, 1.0]
    load_config(FinetuneConfig, root / "finetune_tiny.yaml")
    with pytest.raises(ConfigError, match="train.crop_scale"):
        parse_config(FinetuneConfig, {"train": {"crop_scale": [0.9, 0.1]}})
    with pytest.raises(ConfigError, match="seeds"):
        parse_config(FinetuneConfig, {"seeds": [1, 1]})
