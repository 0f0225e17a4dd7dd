"""The probe job: input checks, features, one Tune experiment sweeping every (task, encoder, label fraction,
label subset) cell, a refit per cell scored once on test with patient-bootstrap CIs, MLflow parent and nested
runs."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mermed.metrics import accuracy, auroc, bootstrap_ci
from mermed.probe.config import (
    ProbeConfig,
    ProbeTasksFile,
)
from mermed.probe.encoders import Encoder, load_encoders
from mermed.probe.features import Features, extract_features, load_features
from mermed.probe.heads import fit_probe, predict_scores, subsample_labels
from mermed.probe.report import (
    RESULT_COLUMNS,
    SUMMARY_COLUMNS,
    Fit,
    bootstrap_ci_or_nan,
    markdown,
    plot_label_efficiency,
    plot_roc,
    summarize,
    write_csv,
)
from mermed.probe.sweep import SweepData, mlflow_logger, run_sweeps, train_config
from mermed.probe.tasks import TaskData, inspect_task

log = logging.getLogger("mermed.probe")

METRICS = ("auroc", "auroc_lo", "auroc_hi", "accuracy")  # logged on the parent run per task/encoder/fraction


@dataclass
class ProbeResult:
    output: Path
    summary: list[dict[str, Any]]
    results: list[dict[str, Any]]
    parent_run_id: str
    tracking_uri: str
    reused: dict[str, bool]  # "<encoder>/<task>" -> features came from the cache


@dataclass(frozen=True)
class Cell:
    """One sweep of the job: a task's features under one encoder, on a stratified ``fraction`` of the training
    labels (subset ``seed``)."""

    data: TaskData
    encoder: str
    fraction: float
    seed: int
    features: Features

    @property
    def name(self) -> str:
        return f"{self.data.task.name}-{self.encoder}-f{self.fraction:g}-s{self.seed}"

    @property
    def tags(self) -> dict[str, str]:
        return {
            "task": self.data.task.name,
            "encoder": self.encoder,
            "fraction": str(self.fraction),
            "label_seed": str(self.seed),
        }

    def sweep_data(self, batch_size: int) -> SweepData:
        rows = subsample_labels(self.features.y["train"], self.fraction, self.seed, self.data.task.type)
        x, y = self.features.x, self.features.y
        n_classes = len(self.data.classes)
        return SweepData(self.data.task.type, x["train"][rows], y["train"][rows], x["val"], y["val"], n_classes,
                         batch_size, self.seed)  # fmt: skip


def _refit_and_test(cell: Cell, data: SweepData, config: dict[str, Any], val_auroc: float, cfg: ProbeConfig) -> Fit:
    """The cell's best head refitted on its training labels and scored once on the test split."""
    task = cell.data.task
    model, _ = fit_probe(
        data.train_x,
        data.train_y,
        data.val_x,
        data.val_y,
        task.type,
        train_config(config, cfg.search.batch_size, cell.seed),
        n_classes=data.n_classes,
    )
    y, groups = cell.features.y["test"], cell.features.groups["test"]
    scores = predict_scores(model, cell.features.x["test"])
    lo, hi = bootstrap_ci_or_nan(bootstrap_ci, y, scores, task.type, groups, n_boot=cfg.bootstrap)
    return Fit(
        task=task.name,
        modality=cell.data.modality,
        encoder=cell.encoder,
        fraction=cell.fraction,
        seed=cell.seed,
        n_train=len(data.train_y),
        config=config,
        val_auroc=val_auroc,
        auroc=auroc(y, scores, task.type),
        auroc_lo=lo,
        auroc_hi=hi,
        accuracy=accuracy(y, scores, task.type),
        y_test=y,
        scores=scores,
        groups=groups,
        task_type=task.type,
    )


def _sweep_and_test(cells: list[Cell], cfg: ProbeConfig, out: Path, tracking_uri: str, run_id: str) -> list[Fit]:
    """Every cell's sweep in one Tune experiment (trials as nested MLflow runs under ``run_id``), then the refit
    and test of each cell's best head."""
    sweep_data = {cell.name: cell.sweep_data(cfg.search.batch_size) for cell in cells}
    logger = mlflow_logger(
        {cell.name: cell.tags for cell in cells},
        cfg.tracking,
        tracking_uri=tracking_uri,
        experiment_name=cfg.tracking.experiment,
        tags={"mlflow.parentRunId": run_id},
        save_artifact=False,
    )
    started = time.perf_counter()
    best = run_sweeps(sweep_data, cfg, name=f"{run_id[:8]}-probe", storage_path=out / "tune", callbacks=[logger])
    log.info("probe: %d sweeps of %d heads in %.1f s", len(cells), cfg.trials, time.perf_counter() - started)
    fits = []
    for cell in cells:
        config, val_auroc = best[cell.name]
        fit = _refit_and_test(cell, sweep_data[cell.name], config, val_auroc, cfg)
        log.info(
            "%s / %s / %g labels (subset %d): test AUROC %.3f (%.3f-%.3f), best %s",
            *(fit.task, fit.encoder, fit.fraction, fit.seed, fit.auroc, fit.auroc_lo, fit.auroc_hi, fit.config),
        )
        fits.append(fit)
    return fits


@dataclass(frozen=True)
class ProbeInputs:
    """A probe job's inputs, checked: the encoders' shapes and the tasks' labels, splits and patients."""

    encoders: list[Encoder]
    tasks: list[TaskData]


def check_inputs(
    encoder: str | Path, tasks: str | Path, cfg: ProbeConfig, baselines: Sequence[str] = ()
) -> ProbeInputs:
    """Every input check, on the driver, before Ray starts any work (no image is decoded)."""
    from ingest.config import load_config

    task_list = load_config(ProbeTasksFile, tasks).tasks
    encoders = load_encoders(encoder, baselines, cfg.baseline_seed)
    datas = [inspect_task(t) for t in task_list]
    for d in datas:
        log.info("task %s: %s, classes %s, labelled rows %s", d.task.name, d.task.type, d.classes, d.counts)
        if d.task.external or d.task.attributes:
            log.warning("task %s: external and attributes are scored by `mermed finetune`, not by probes", d.task.name)
    return ProbeInputs(encoders, datas)


def run_probe_job(inputs: ProbeInputs, output: str | Path, cfg: ProbeConfig) -> ProbeResult:
    """The whole probe job (see the module docstring) on the Ray cluster this process has joined."""
    import mlflow

    from mermed.tracking import (
        flatten_params,
        log_params,
        metric_batch,
        tracking_uri,
        ui_command,
        use_experiment,
        when_reachable,
    )

    encoders, datas = inputs.encoders, inputs.tasks
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(cfg.tracking.mlflow_uri, out)
    experiment_id = use_experiment(cfg.tracking.experiment, uri, out)
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(experiment_id, run_name=f"probe-{time.strftime('%Y%m%d-%H%M%S')}").info.run_id
    params = {
        "probe": cfg.model_dump(),
        "encoders": {e.tag: {"model": e.model_name, "img_size": e.img_size, "sha256": e.fingerprint} for e in encoders},
        "tasks": {d.task.name: {**d.task.model_dump(), "classes": d.classes} for d in datas},
    }
    log_params(client, run_id, flatten_params(params))
    reused: dict[str, bool] = {}
    try:
        caches = {}
        for enc in encoders:  # one pipeline per encoder over every task's rows
            for data, (path, fresh) in zip(datas, extract_features(enc, datas, out, cfg.extract), strict=True):
                caches[enc.tag, data.task.name], reused[f"{enc.tag}/{data.task.name}"] = path, fresh
        cells = []
        for data in datas:
            for enc in encoders:
                features = load_features(caches[enc.tag, data.task.name], data)
                cells += [
                    Cell(data, enc.tag, fraction, seed, features)
                    for fraction in sorted(cfg.fractions)
                    for seed in range(cfg.seeds if fraction < 1 else 1)
                ]
        fits = _sweep_and_test(cells, cfg, out, uri, run_id)
        artifacts = []
        for data in datas:
            task = data.task
            artifacts.append(out / f"roc_{task.name}.png")
            plot_roc(artifacts[-1], task.name, task.type, [f for f in fits if f.task == task.name and f.seed == 0])
        summary = summarize(fits, {d.task.name: d.task.type for d in datas}, cfg.bootstrap)
        for data in datas:
            artifacts.append(out / f"label_efficiency_{data.task.name}.png")
            plot_label_efficiency(artifacts[-1], data.task.name, summary)
        results = [f.row() for f in fits]
        write_csv(out / "summary.csv", summary, SUMMARY_COLUMNS)
        write_csv(out / "results.csv", results, RESULT_COLUMNS)
        (out / "summary.md").write_text(markdown(summary, cfg.seeds))
        artifacts += [out / name for name in ("summary.csv", "summary.md", "results.csv")]
    except BaseException:
        when_reachable(lambda: client.set_terminated(run_id, "FAILED"), "the probe run's failure", cfg.tracking)
        raise
    metrics = {
        f"{r['task']}.{r['encoder']}.f{r['fraction']:g}.test_{m}": r[m]
        for r in summary
        for m in METRICS
        if not math.isnan(r[m])
    }

    def record() -> None:
        client.log_batch(run_id, metrics=metric_batch(metrics, 0))
        for path in artifacts:
            client.log_artifact(run_id, str(path))
        client.set_terminated(run_id)

    # the results are on disk whatever happens; MLflow gets them once it is reachable
    when_reachable(record, "the probe results", cfg.tracking)
    log.info("probe: %s; browse with: %s", out / "summary.md", ui_command(uri))
    return ProbeResult(out, summary, results, run_id, uri, reused)


__all__ = ["Cell", "ProbeInputs", "ProbeResult", "check_inputs", "run_probe_job"]
