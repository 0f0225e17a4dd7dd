"""The probe job: input checks, features, a sweep per (task, encoder, label fraction, label subset), a refit
scored once on test with patient-bootstrap CIs, MLflow parent and nested runs."""

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
    plot_roc,
    summarize,
    write_csv,
)
from mermed.probe.sweep import SweepData, run_sweep, train_config
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
class Tracking:
    """Where the sweeps' trials go: nested runs under the job's parent run."""

    uri: str
    experiment: str
    parent_run_id: str
    storage_path: Path  # Ray Tune's experiment folders


def _fit_and_test(
    features: Features, data: TaskData, encoder: str, fraction: float, seed: int, cfg: ProbeConfig, tracking: Tracking
) -> Fit:
    """Sweep on a stratified ``fraction`` of the training labels (subset ``seed``), refit the best, test once."""
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    tags = {"task": data.task.name, "encoder": encoder, "fraction": str(fraction), "label_seed": str(seed)}
    callback = MLflowLoggerCallback(
        tracking_uri=tracking.uri,
        experiment_name=tracking.experiment,
        tags={"mlflow.parentRunId": tracking.parent_run_id, **tags},
        save_artifact=False,
    )
    name = f"{tracking.parent_run_id[:8]}-{data.task.name}-{encoder}-f{fraction:g}-s{seed}"
    task = data.task
    rows = subsample_labels(features.y["train"], fraction, seed, task.type)
    sweep_data = SweepData(
        task=task.type,
        train_x=features.x["train"][rows],
        train_y=features.y["train"][rows],
        val_x=features.x["val"],
        val_y=features.y["val"],
        n_classes=len(data.classes),
        batch_size=cfg.search.batch_size,
        seed=seed,
    )
    config, val_auroc = run_sweep(
        sweep_data, cfg, name=name, storage_path=tracking.storage_path, callbacks=[callback], seed=cfg.seed + seed
    )
    model, _ = fit_probe(
        sweep_data.train_x,
        sweep_data.train_y,
        sweep_data.val_x,
        sweep_data.val_y,
        task.type,
        train_config(config, cfg.search.batch_size, seed),
        n_classes=sweep_data.n_classes,
    )
    y, groups = features.y["test"], features.groups["test"]
    scores = predict_scores(model, features.x["test"])
    lo, hi = bootstrap_ci_or_nan(bootstrap_ci, y, scores, task.type, groups, n_boot=cfg.bootstrap)
    return Fit(
        task=task.name,
        modality=data.modality,
        encoder=encoder,
        fraction=fraction,
        seed=seed,
        n_train=len(rows),
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

    from mermed.tracking import flatten_params, tracking_uri, ui_command, use_experiment

    encoders, datas = inputs.encoders, inputs.tasks
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(cfg.tracking.mlflow_uri, out)
    experiment_id = use_experiment(cfg.tracking.experiment, uri, out)
    fits: list[Fit] = []
    reused: dict[str, bool] = {}
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"probe-{time.strftime('%Y%m%d-%H%M%S')}") as run:
        tracking = Tracking(uri, cfg.tracking.experiment, run.info.run_id, out / "tune")
        mlflow.log_params(
            flatten_params(
                {
                    "probe": cfg.model_dump(),
                    "encoders": {
                        e.tag: {"model": e.model_name, "img_size": e.img_size, "sha256": e.fingerprint}
                        for e in encoders
                    },
                    "tasks": {d.task.name: {**d.task.model_dump(), "classes": d.classes} for d in datas},
                }
            )
        )
        for data in datas:
            task = data.task
            for enc in encoders:
                path, reused[f"{enc.tag}/{task.name}"] = extract_features(enc, data, out, cfg.extract)
                features = load_features(path, data)
                for fraction in sorted(cfg.fractions):
                    for seed in range(cfg.seeds if fraction < 1 else 1):
                        fit = _fit_and_test(features, data, enc.tag, fraction, seed, cfg, tracking)
                        log.info(
                            "%s / %s / %g labels (subset %d): test AUROC %.3f (%.3f-%.3f), best %s",
                            *(task.name, enc.tag, fraction, seed, fit.auroc, fit.auroc_lo, fit.auroc_hi, fit.config),
                        )
                        fits.append(fit)
            roc = out / f"roc_{task.name}.png"
            plot_roc(roc, task.name, task.type, [f for f in fits if f.task == task.name and f.seed == 0])
            mlflow.log_artifact(str(roc))

        summary = summarize(fits, {d.task.name: d.task.type for d in datas}, cfg.bootstrap)
        results = [f.row() for f in fits]
        write_csv(out / "summary.csv", summary, SUMMARY_COLUMNS)
        write_csv(out / "results.csv", results, RESULT_COLUMNS)
        (out / "summary.md").write_text(markdown(summary, cfg.seeds))
        for r in summary:
            prefix = f"{r['task']}.{r['encoder']}.f{r['fraction']:g}"
            mlflow.log_metrics({f"{prefix}.test_{m}": r[m] for m in METRICS if not math.isnan(r[m])})
        for name in ("summary.csv", "summary.md", "results.csv"):
            mlflow.log_artifact(str(out / name))
    log.info("probe: %s; browse with: %s", out / "summary.md", ui_command(uri))
    return ProbeResult(out, summary, results, tracking.parent_run_id, uri, reused)


__all__ = ["ProbeInputs", "ProbeResult", "Tracking", "check_inputs", "run_probe_job"]
