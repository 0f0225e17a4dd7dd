"""The probe stage end to end on a local Ray: features, Tune sweeps, refit, test AUROC with CIs, nested MLflow runs.

One job runs for the whole module (Ray Tune starts slowly); the checks share it. The data is a tiny ingest output
written here with pyarrow: bright vs dark noisy images (a structure even a random ViT separates), patients with
rows of both classes, patient-level splits, and unlabelled rows that no task may use.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from helpers import BRIGHT_DARK_SIZE, bright_dark_patients, write_ingest_output
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from ingest.config import parse_config
from mermed.metrics import bootstrap_ci, mean_bootstrap_ci
from mermed.models import build_backbone, export_encoder
from mermed.probe import Fit, ProbeError, extract_features, inspect_task, load_encoders, summarize
from mermed.probe.config import ProbeConfig
from mermed.probe.features import FEATURES_FILE, FEATURES_JSON, actor_pool
from mermed.probe.report import SUMMARY_COLUMNS
from pipelines.probe import run_probe

MODEL, SIZE = "vit_tiny_patch16_224", BRIGHT_DARK_SIZE
CFG = parse_config(
    ProbeConfig,
    {
        "trials": 2,
        "fractions": [0.5, 1.0],
        "seeds": 1,  # several label subsets: test_summary_means_over_label_subsets
        "bootstrap": 200,
        "search": {"epochs": [4], "grace_period": 2, "hidden": [32], "batch_size": 64},
        "extract": {"batch_size": 32},
    },
)


def _tasks(path: Path, tasks: list[dict]) -> Path:
    path.write_text(yaml.safe_dump({"tasks": tasks}))
    return path


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("run") / "encoder.safetensors"
    torch.manual_seed(7)  # timm draws from the global generator: the same "pretrained" weights every run (not the
    # random baseline's seed)
    export_encoder(build_backbone(MODEL, SIZE), path, model_name=MODEL, img_size=SIZE)
    return path


@pytest.fixture(scope="module")
def job(fresh_ray, tmp_path_factory, encoder_file):
    """One probe job: pretrained encoder + random baseline, fractions 0.5 and 1.0, two label subsets."""
    root = tmp_path_factory.mktemp("probe")
    data = write_ingest_output(root / "data", bright_dark_patients())
    tasks = _tasks(root / "tasks.yaml", [{"name": "bright", "data": str(data), "type": "binary"}])
    result = run_probe(encoder_file, tasks, root / "out", CFG, baselines=["random"])
    return result, data


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_summary_table(job) -> None:
    result, _ = job
    rows = _read_csv(result.output / "summary.csv")
    assert tuple(rows[0]) == SUMMARY_COLUMNS
    assert {(r["encoder"], float(r["fraction"])) for r in rows} == {
        (e, f) for e in ("pretrained", "random") for f in (0.5, 1.0)
    }
    for r in rows:
        auroc, lo, hi = float(r["auroc"]), float(r["auroc_lo"]), float(r["auroc_hi"])
        assert (r["task"], r["modality"], r["n_test"]) == ("bright", "CXR", "34")
        assert lo <= auroc <= hi
        assert auroc > 0.9, r  # bright vs dark is visible even to random weights
        assert 0.5 < float(r["accuracy"]) <= 1
    details = _read_csv(result.output / "results.csv")
    assert len(details) == 4
    assert {int(d["n_train"]) for d in details if float(d["fraction"]) == 0.5} == {32}  # half of 64, per class
    for d in details:
        summary = next(r for r in rows if (r["encoder"], r["fraction"]) == (d["encoder"], d["fraction"]))
        assert (d["auroc"], d["auroc_lo"], d["auroc_hi"]) == (
            summary["auroc"],
            summary["auroc_lo"],
            summary["auroc_hi"],
        )
        assert d["head"] in ("mlp", "linear") and int(d["epochs"]) == 4 and float(d["val_auroc"]) > 0.5
    markdown = (result.output / "summary.md").read_text()
    assert markdown.count("| bright | CXR |") == 4


def test_mlflow_parent_with_nested_trials(job) -> None:
    import mlflow

    result, _ = job
    mlflow.set_tracking_uri(result.tracking_uri)
    assert result.tracking_uri == f"sqlite:///{result.output.resolve()}/mlflow.db"
    parent = mlflow.get_run(result.parent_run_id)
    assert parent.data.metrics["bright.pretrained.f1.test_auroc"] > 0.9
    assert parent.data.params["probe.trials"] == "2"
    children = mlflow.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'"
    )
    # One Tune experiment for the job's 4 cells (2 encoders x 2 fractions): 8 heads on 2 CPUs, one trial a cell.
    assert len(children) == 4
    cells = set(zip(children["tags.encoder"], children["tags.fraction"], children["tags.task"], strict=True))
    assert cells == {(e, f, "bright") for e in ("pretrained", "random") for f in ("0.5", "1.0")}
    assert (children["params.heads"].str.count("'lr'") == 2).all()  # each trial trained its cell's 2 heads together
    assert children["metrics.val_auroc"].notna().all()
    assert (children["status"] == "FINISHED").all()
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(result.parent_run_id)}
    assert {"roc_bright.png", "label_efficiency_bright.png", "summary.csv", "summary.md", "results.csv"} <= artifacts
    for picture in ("roc_bright.png", "label_efficiency_bright.png"):
        assert (result.output / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_features_are_cached_and_split_by_patient(job, encoder_file) -> None:
    result, data = job
    assert result.reused == {"pretrained/bright": False, "random/bright": False}
    cache = next((result.output / "features" / "pretrained").iterdir())
    table = pq.read_table(cache / FEATURES_FILE)
    assert table.num_rows == 30 * 4 + 2  # the unlabelled rows are no part of the task
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 192)
    patients = {s: set(table.filter(pa.compute.equal(table["split"], s))["patient_id"].to_pylist()) for s in
                ("train", "val", "test")}  # fmt: skip
    assert not (patients["train"] & patients["val"] or patients["train"] & patients["test"])
    assert not patients["val"] & patients["test"]
    # A second run of the same (encoder, dataset) reads the cache instead of running the encoder.
    meta = cache / FEATURES_JSON
    before = meta.stat().st_mtime_ns
    pretrained = load_encoders(encoder_file, [])[0]
    assert json.loads(meta.read_text())["encoder"] == pretrained.fingerprint
    task = inspect_task(_task(data))  # another name, the same data: the same cache
    ((path, reused),) = extract_features(pretrained, [task], result.output, CFG.extract)
    assert (path, reused) == (cache, True)
    assert meta.stat().st_mtime_ns == before


def test_one_pipeline_fills_every_stale_cache_as_separate_runs_would(job, tmp_path: Path, encoder_file: Path) -> None:
    """Tasks of different data extracted in one call go through one pipeline; each cache holds the rows and
    embeddings its own extraction gives, two tasks of the same data share one, and a current cache among them is
    reused, not refilled."""
    _, data = job
    other = write_ingest_output(tmp_path / "other", bright_dark_patients(4, 2, 2), seed=3)
    tasks = [inspect_task(_task(d, name=n)) for d, n in ((data, "a"), (other, "b"), (data, "a2"))]
    pretrained = load_encoders(encoder_file, [])[0]

    def table(path: Path) -> pa.Table:
        return pq.read_table(path / FEATURES_FILE).sort_by([("source", "ascending"), ("frame", "ascending")])

    together = extract_features(pretrained, tasks, tmp_path / "together", CFG.extract)
    assert [reused for _, reused in together] == [False, False, False]
    assert together[2][0] == together[0][0], "the same encoder and data: one cache, filled once"
    assert [json.loads((p / FEATURES_JSON).read_text())["filled_with"] for p, _ in together] == [2, 2, 2]
    for task, (path, _) in zip(tasks[:2], together, strict=False):
        ((alone, _),) = extract_features(pretrained, [task], tmp_path / f"alone-{task.task.name}", CFG.extract)
        a, b = table(path), table(alone)
        assert a.num_rows == sum(task.counts.values())
        assert a.drop_columns(["embedding"]).equals(b.drop_columns(["embedding"]))
        ea, eb = (np.stack(t["embedding"].to_numpy(zero_copy_only=False)) for t in (a, b))
        np.testing.assert_allclose(ea, eb, rtol=0, atol=1e-5)
    shutil.rmtree(together[1][0])
    again = extract_features(pretrained, tasks, tmp_path / "together", CFG.extract)
    assert [reused for _, reused in again] == [True, False, True]


def _task(data: Path, **kw):
    from mermed.probe.config import ProbeTask

    return ProbeTask(**{"name": "t", "data": str(data), "type": "binary", **kw})


@pytest.mark.parametrize(
    ("cohort", "task", "message"),
    [
        ({k: (s, ["1"] * len(v)) for k, (s, v) in bright_dark_patients().items()}, "binary", "single-class"),
        ({k: (s, ["1"] * len(v)) for k, (s, v) in bright_dark_patients().items()}, "multiclass", "single-class"),
        (
            {k: v for k, v in bright_dark_patients().items() if v[0] != "test"},
            "binary",
            "the test split has no labelled rows",
        ),
        ({**bright_dark_patients(), "anon-test": ("test", ["1", "2"])}, "multiclass", "no training row has class 2"),
        ({**bright_dark_patients(), "train-p0": ("train", ["0", "1"]), "x": ("val", ["0", "1"])}, "binary", None),
    ],
    ids=["single-class", "single-class-multiclass", "empty-test-split", "class-not-in-train", "fine"],
)
def test_bad_tasks_fail_before_compute(tmp_path: Path, cohort, task: str, message: str | None) -> None:
    data = write_ingest_output(tmp_path / "data", cohort)
    if message is None:
        assert inspect_task(_task(data, type=task)).counts == {"train": 16 * 4 - 2, "val": 26, "test": 34}
        return
    with pytest.raises(ProbeError, match=message):
        inspect_task(_task(data, type=task))


def test_leaking_patients_and_missing_labels_are_rejected(tmp_path: Path) -> None:
    cohort = bright_dark_patients()
    data = write_ingest_output(tmp_path / "leak", cohort)
    table = pq.read_table(data / "modality=CXR/part-00000.parquet")
    patient = np.asarray(table["patient_id"].to_pylist(), dtype=object)
    patient[patient == "test-p0"] = "train-p0"  # one patient in train and in test
    pq.write_table(table.set_column(table.schema.get_field_index("patient_id"), "patient_id", pa.array(patient)),
                   data / "modality=CXR/part-00000.parquet")  # fmt: skip
    with pytest.raises(ProbeError, match="1 patients have rows in more than one split"):
        inspect_task(_task(data))
    with pytest.raises(ProbeError, match="no column diagnosis"):
        inspect_task(_task(data, label="diagnosis"))
    with pytest.raises(ProbeError, match="no shards of modality CT"):
        inspect_task(_task(data, modality="CT"))
    unlabelled = write_ingest_output(tmp_path / "none", {"p": ("train", [None, None])})
    with pytest.raises(ProbeError, match="no labelled rows"):
        inspect_task(_task(unlabelled))


def test_encoder_of_another_architecture_fails_before_compute(tmp_path: Path, encoder_file: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(encoder_file.parent, other)
    meta = json.loads((other / "encoder.json").read_text())
    (other / "encoder.json").write_text(json.dumps({**meta, "model_name": "vit_small_patch16_224", "embed_dim": 384}))
    with pytest.raises(ProbeError, match="does not match the architecture"):
        load_encoders(other / encoder_file.name, [])
    with pytest.raises(ProbeError, match="baseline vit_small_patch16_224 does not match the architecture"):
        load_encoders(encoder_file, [f"vit_small_patch16_224={encoder_file}"])
    with pytest.raises(ProbeError, match="expected 'random' or TIMM_NAME=PATH"):
        load_encoders(encoder_file, ["imagenet"])
    # A timm name with local weights of its own architecture is a valid baseline; the encoders differ.
    tiny = tmp_path / "tiny.safetensors"
    export_encoder(build_backbone(MODEL, SIZE), tiny, model_name=MODEL, img_size=SIZE)
    encoders = load_encoders(encoder_file, ["random", f"{MODEL}={tiny}"])
    assert [e.tag for e in encoders] == ["pretrained", "random", MODEL]
    assert len({e.fingerprint for e in encoders}) == 3


def test_cli_reports_bad_input_without_running(tmp_path: Path, encoder_file: Path) -> None:
    from pipelines.cli import app

    data = write_ingest_output(
        tmp_path / "data", {k: (s, ["0"] * len(v)) for k, (s, v) in bright_dark_patients().items()}
    )
    tasks = _tasks(tmp_path / "tasks.yaml", [{"name": "flat", "data": str(data), "type": "binary"}])
    out = tmp_path / "out"
    args = ["probe", "--encoder", str(encoder_file), "--tasks", str(tasks), "--output", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "task flat" in result.output and "single-class" in result.output
    assert not out.exists()  # nothing was started, nothing written
    result = CliRunner().invoke(app, [*args, "--fractions", "0.1,all"])
    assert result.exit_code == 2 and "--fractions" in result.output


def test_mean_bootstrap_ci_against_scikit_learn() -> None:
    """The CI of the mean AUROC of two models equals the percentile CI of sklearn AUROCs on the same resamples."""
    rng = np.random.default_rng(5)
    patient_of_row = np.repeat(np.arange(40), 3)
    names = np.array([f"p{i:02d}" for i in patient_of_row])  # sorted like the numbers: the same resamples
    y = rng.integers(0, 2, patient_of_row.size)
    a, b = y + rng.normal(0, 1.0, y.size), y + rng.normal(0, 2.0, y.size)
    lo, hi = mean_bootstrap_ci(y, [a, b], "binary", names, n_boot=300, seed=3)
    draws = np.random.default_rng(3).multinomial(40, np.full(40, 1 / 40), size=300)
    values = []
    for counts in draws:
        rows = np.repeat(np.arange(y.size), counts[patient_of_row])
        if np.unique(y[rows]).size == 2:
            values.append((roc_auc_score(y[rows], a[rows]) + roc_auc_score(y[rows], b[rows])) / 2)
    assert (lo, hi) == pytest.approx(tuple(np.quantile(values, [0.025, 0.975])), abs=1e-12)
    assert mean_bootstrap_ci(y, [a, a], "binary", names, seed=3) == bootstrap_ci(y, a, "binary", names, seed=3)


def test_summary_means_over_label_subsets() -> None:
    """Below 100% of the labels a summary row is the mean over subsets, with the patient CI of that mean."""
    rng = np.random.default_rng(0)
    groups = np.repeat([f"p{i:02d}" for i in range(30)], 2).astype(object)
    y = np.tile([0, 1], 30)
    common = {"task": "t", "modality": "CT", "encoder": "pretrained", "n_train": 6, "config": {}, "val_auroc": 0.9}
    fits = [
        Fit(
            **common,
            fraction=f,
            seed=seed,
            auroc=a,
            auroc_lo=0,
            auroc_hi=1,
            accuracy=acc,
            y_test=y,
            scores=y + rng.normal(0, sd, y.size),
            groups=groups,
        )  # fmt: skip
        for f, seed, a, acc, sd in [(0.1, 0, 0.7, 0.6, 2.0), (0.1, 1, 0.8, 0.7, 1.0), (1.0, 0, 0.9, 0.8, 0.5)]
    ]
    rows = summarize(fits, {"t": "binary"}, n_boot=100)
    assert [(r["fraction"], r["n_test"]) for r in rows] == [(0.1, 60), (1.0, 60)]
    assert (rows[0]["auroc"], rows[0]["accuracy"]) == pytest.approx((0.75, 0.65))
    ci = mean_bootstrap_ci(y, [fits[0].scores, fits[1].scores], "binary", groups, n_boot=100)
    assert (rows[0]["auroc_lo"], rows[0]["auroc_hi"]) == ci
    assert (rows[1]["auroc_lo"], rows[1]["auroc_hi"]) == bootstrap_ci(y, fits[2].scores, "binary", groups, n_boot=100)


def test_encoder_and_data_on_s3(s3_bucket: str, tmp_path: Path, encoder_file: Path) -> None:
    """An encoder exported to S3 and labelled shards on S3 are read as they are locally."""
    from ingest import storage

    fs, _ = storage.filesystem(f"s3://{s3_bucket}")
    fs.put(str(encoder_file.parent) + "/", f"{s3_bucket}/run/", recursive=True)
    data = write_ingest_output(tmp_path / "data", bright_dark_patients())
    fs.put(str(data) + "/", f"{s3_bucket}/data/", recursive=True)
    remote = load_encoders(f"s3://{s3_bucket}/run/{encoder_file.name}", [])[0]
    assert remote.fingerprint == load_encoders(encoder_file, [])[0].fingerprint
    assert inspect_task(_task(f"s3://{s3_bucket}/data")).counts == inspect_task(_task(data)).counts
    with pytest.raises(ProbeError, match="not found"):
        load_encoders(f"s3://{s3_bucket}/elsewhere/encoder.safetensors", [])


def test_encoder_actors_leave_a_cpu_for_reading(fresh_ray) -> None:
    """An actor pool reserving every CPU would starve Ray Data's read tasks: the pool is capped below that, while
    the actors' torch threads share out every CPU."""
    from mermed.probe.config import ExtractConfig

    assert actor_pool(ExtractConfig()) == (1, 0.0, 2)  # 2 CPUs: one actor, computing on both
    assert actor_pool(ExtractConfig(actors=2)) == (1, 0.0, 2)
    assert actor_pool(ExtractConfig(actors=4, cpus_per_actor=0.5)) == (2, 0.0, 1)
    assert actor_pool(ExtractConfig(threads_per_actor=1)) == (1, 0.0, 1)


def test_embed_writes_every_row_with_its_ids_and_reuses_the_cache(job, tmp_path: Path, encoder_file: Path) -> None:
    """`mermed embed`: every row of the ingest output (labelled or not) with its ids and split, the same
    embeddings the probe's cache holds for the labelled ones, and a second run that reuses the file."""
    from pipelines.cli import app

    result, data = job
    out = tmp_path / "embeddings"
    args = ["embed", "--encoder", str(encoder_file), "--data", str(data), "--output", str(out)]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    table = pq.read_table(out / FEATURES_FILE)
    shard = pq.read_table(data / "modality=CXR/part-00000.parquet")
    assert table.num_rows == shard.num_rows  # the unlabelled rows too
    assert sorted(table["source"].to_pylist()) == sorted(shard["source"].to_pylist())
    assert {"split", "patient_id", "study_id", "tile_x", "dataset", "label"} <= set(table.column_names)
    probe_cache = next((result.output / "features" / "pretrained").iterdir()) / FEATURES_FILE
    cached = {r["source"]: r["embedding"] for r in pq.read_table(probe_cache).to_pylist()}
    mine = {r["source"]: r["embedding"] for r in table.to_pylist() if r["source"] in cached}
    assert mine.keys() == cached.keys()
    assert all(np.allclose(mine[k], cached[k], atol=1e-5) for k in cached)
    second = CliRunner().invoke(app, args)
    assert second.exit_code == 0 and "(reused)" in second.output, second.output
    wrong = CliRunner().invoke(app, [*args, "--modality", "ct"])
    assert wrong.exit_code == 2 and "no rows of modality CT" in wrong.output
