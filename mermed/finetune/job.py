"""The fine-tuning job: each (task, encoder, label fraction, seed[, search trial]) is one Ray Train run (DDP over
its workers, GPU when present), and one Ray Tune experiment schedules them all across the cluster. Every run's test
predictions come back to the driver, which scores them (``mermed.metrics``), summarises them over seeds, compares
the encoders and logs it all to MLflow: a parent run per job, a nested run per fine-tuning run."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ingest.schema import SPLITS
from mermed.finetune.config import FinetuneConfig
from mermed.finetune.data import ATTRIBUTE_PREFIX, decoded_rows, encoded_rows, external_rows, train_subset
from mermed.finetune.report import (
    RESULT_COLUMNS,
    SUBGROUP_COLUMNS,
    SUMMARY_COLUMNS,
    Run,
    comparisons,
    markdown,
    plot_attention,
    plot_reliability,
    subgroup_gaps,
    subgroups,
    summarize,
)
from mermed.finetune.worker import EVAL_SETS, PREDICTIONS, RunSpec, finetune_worker, n_outputs
from mermed.probe.config import ProbeTask, ProbeTasksFile
from mermed.probe.encoders import Encoder, load_encoders
from mermed.probe.report import write_csv
from mermed.probe.tasks import ProbeError, TaskData, inspect_task, task_shards

log = logging.getLogger("mermed.finetune")

GRID = ("task", "encoder", "fraction", "seed")  # what identifies a run; Tune's grid
# The Tune trial only drives its Ray Train run (whose workers hold the real resources); Tune refuses an empty
# request, so it asks for a sliver of a CPU.
TRIAL_DRIVER_CPU = 0.01


@dataclass(frozen=True)
class FinetuneInputs:
    """A job's inputs, checked on the driver: encoders, tasks and their external sets."""

    encoders: list[Encoder]
    tasks: list[TaskData]
    external: dict[str, TaskData]  # task name -> its external set (labels of the task's classes)


def _external_task(task: ProbeTask) -> ProbeTask:
    return task.model_copy(update={"name": f"{task.name}-external", "data": task.external, "external": None})


def check_inputs(
    encoder: str | Path, tasks: str | Path, cfg: FinetuneConfig, baselines: Sequence[str] = ()
) -> FinetuneInputs:
    """Every input check before Ray starts any work (no image is decoded), as the probe job's."""
    from ingest.config import load_config

    task_list = load_config(ProbeTasksFile, tasks).tasks
    encoders = load_encoders(encoder, baselines, cfg.baseline_seed)
    datas = [inspect_task(t) for t in task_list]
    external = {}
    for data in datas:
        _check_attributes(data)
        if data.task.external:
            ext = _inspect_external(data)
            log.info(
                "task %s: external set %s, %d rows of its classes",
                data.task.name,
                ext.task.data,
                sum(ext.counts.values()),
            )
            external[data.task.name] = ext
        log.info("task %s: %s, classes %s, labelled rows %s", data.task.name, data.task.type, data.classes, data.counts)
    return FinetuneInputs(encoders, datas, external)


def _check_attributes(data: TaskData) -> None:
    """A task's attributes need the shards' attributes column (ingest's ``attributes`` or
    ``dicom.demographics``) and at least one test row carrying each of them."""
    import pyarrow.compute as pc

    if not data.task.attributes:
        return
    name = f"task {data.task.name}"
    dataset = task_shards(data.task, name)
    if "attributes" not in dataset.schema.names:
        raise ProbeError(f"{name}: its shards have no attributes column (ingest them with attributes: [...])")
    table = dataset.to_table(columns=["attributes", "split"])
    texts = table.filter(pc.equal(table["split"], "test"))["attributes"].to_pylist()
    present = set().union(*(json.loads(t) for t in texts if t))
    missing = [a for a in data.task.attributes if a not in present]
    if missing:
        raise ProbeError(f"{name}: no test row has attribute {', '.join(missing)}")


def _inspect_external(data: TaskData) -> TaskData:
    """The external set's own checks (labels, patients), then the rows that carry the task's classes."""
    ext = inspect_task(_external_task(data.task))
    kept = external_rows(data, ext)
    total = sum(ext.counts.values())
    if kept < total:
        log.warning(
            "task %s: %d of %d external rows have classes it does not predict; left out",
            data.task.name,
            total - kept,
            total,
        )
    return ext


@dataclass(frozen=True)
class _Shared:
    """What every Tune trial needs; it reaches them once, through the object store."""

    finetune: dict[str, Any]
    tasks: dict[str, TaskData]
    external: dict[str, TaskData]
    encoders: dict[str, dict[str, Any]]  # tag -> model_name, img_size, normalization, weights ([object ref])
    rows: dict[str, dict[str, Any]]  # task -> its train, val, test (and external) sets, as ``encoded_rows``
    storage: str
    use_gpu: bool


def _encoded_sets(data: TaskData, external: TaskData | None) -> dict[str, Any]:
    """A task's evaluation sets and whole training split, encoded once for all of its runs."""
    common = {"classes": data.classes, "kind": data.task.type}
    scored = {**common, "attributes": data.task.attributes}  # carried by the scored rows (every evaluation set)
    sets = {
        "train": encoded_rows(data, ["train"], **common),
        "val": encoded_rows(data, ["val"], **scored),
        "test": encoded_rows(data, ["test"], **scored),
    }
    if external is not None:
        sets["external"] = encoded_rows(external, SPLITS, known_only=True, **scored)
    return sets


def _run_trial(config: dict[str, Any], *, shared: _Shared) -> None:
    """Tune function trainable: builds one run's datasets and runs its Ray Train job, whose reports reach Tune
    (``TuneReportCallback``), so that Tune can schedule, stop and record it."""
    import ray.train
    import ray.tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = FinetuneConfig.model_validate(shared.finetune)
    data, enc = shared.tasks[config["task"]], shared.encoders[config["encoder"]]
    kind, classes = data.task.type, data.classes
    keep = train_subset(data, config["fraction"], config["seed"])
    datasets = {
        name: decoded_rows(rows, size=enc["img_size"], train=name == "train", keep=keep if name == "train" else None)
        for name, rows in shared.rows[config["task"]].items()
    }
    spec = RunSpec(
        task=config["task"],
        kind=kind,
        n_outputs=n_outputs(kind, classes),
        encoder=config["encoder"],
        model_name=enc["model_name"],
        img_size=enc["img_size"],
        normalization=enc["normalization"],
        fraction=config["fraction"],
        seed=config["seed"],
        train_rows=len(keep) if keep is not None else data.counts["train"],
        base_lr=config.get("base_lr", cfg.train.base_lr),
        layer_decay=config.get("layer_decay", cfg.train.layer_decay),
        attributes=tuple(data.task.attributes),
    )
    trainer = TorchTrainer(
        finetune_worker,
        train_loop_config={
            "finetune": shared.finetune,
            "spec": asdict(spec),
            "weights": enc["weights"],
            "datasets": sorted(datasets),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.workers_per_trial,
            use_gpu=shared.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker} | ({"GPU": 1} if shared.use_gpu else {}),
        ),
        run_config=ray.train.RunConfig(
            name=ray.tune.get_context().get_trial_id(),
            storage_path=shared.storage,
            callbacks=[TuneReportCallback()],
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        datasets=datasets,
        # Only the training rows are split over the workers; the first worker scores the evaluation sets whole
        # (no split coordinator per set: a run starts much faster, and scores need no gathering).
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    trainer.fit()


def _concurrency(cfg: FinetuneConfig, use_gpu: bool) -> int:
    """Runs that fit the cluster at once, leaving a whole CPU to Ray Data's reading (its tasks take one each:
    without it every run would wait for data for ever). Raises ValueError when not even one run fits."""
    import ray

    resources = ray.cluster_resources()
    cpus = resources.get("CPU", 0)
    per_run = cfg.workers_per_trial * cfg.cpus_per_worker + TRIAL_DRIVER_CPU
    fits = int((cpus - 1) // per_run)
    if fits < 1:
        raise ValueError(
            f"a fine-tuning run takes {per_run:g} CPUs (workers_per_trial x cpus_per_worker + {TRIAL_DRIVER_CPU}) "
            f"and Ray Data needs one more, but the cluster has {cpus:g}: lower cpus_per_worker or workers_per_trial"
        )
    if use_gpu:
        fits = min(fits, int(resources.get("GPU", 0)) // cfg.workers_per_trial)
    return min(fits, cfg.max_concurrent_trials or fits)


def _param_space(inputs: FinetuneInputs, cfg: FinetuneConfig) -> dict[str, Any]:
    from ray import tune

    space: dict[str, Any] = {
        "task": tune.grid_search([d.task.name for d in inputs.tasks]),
        "encoder": tune.grid_search([e.tag for e in inputs.encoders]),
        "fraction": tune.grid_search(sorted(cfg.fractions)),
        "seed": tune.grid_search(list(cfg.seeds)),
    }
    if cfg.search.base_lr:
        space["base_lr"] = tune.loguniform(*cfg.search.base_lr)
    if cfg.search.layer_decay:
        space["layer_decay"] = tune.uniform(*cfg.search.layer_decay)
    return space


def _scheduler(inputs: FinetuneInputs, cfg: FinetuneConfig):
    """ASHA on the validation AUROC when searching one (task, encoder, fraction, seed) cell; across cells it would
    stop one task's runs for another task's scores, so a multi-cell search runs every trial to the end."""
    from ray.tune.schedulers import ASHAScheduler

    cells = len(inputs.tasks) * len(inputs.encoders) * len(cfg.fractions) * len(cfg.seeds)
    if cfg.search.trials == 1:
        return None
    if cells > 1:
        log.warning("search: %d cells, so no early stopping (ASHA would compare different tasks)", cells)
        return None
    return ASHAScheduler(
        time_attr="epoch",
        max_t=cfg.train.epochs,
        grace_period=min(cfg.search.grace_period, cfg.train.epochs),
        reduction_factor=cfg.search.reduction_factor,
    )


def _best_trials(grid) -> list:
    """Per grid cell, the finished trial with the best validation AUROC (several only when searching)."""
    best: dict[tuple, Any] = {}
    for result in grid:
        if result.error or not (result.metrics or {}).get("scored"):
            continue
        key = tuple(result.config[k] for k in GRID)
        if key not in best or result.metrics["val_auroc"] > best[key].metrics["val_auroc"]:
            best[key] = result
    return [best[k] for k in sorted(best)]


def _runs_of(result, data: TaskData, modality: str) -> tuple[list[Run], dict[str, np.ndarray]]:
    """The scored evaluation sets of one finished trial, and its attention maps."""
    metrics, config = result.metrics, result.config
    with np.load(Path(metrics["checkpoint_path"]) / PREDICTIONS, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    runs = [
        Run(
            task=config["task"],
            kind=data.task.type,
            modality=modality,
            encoder=config["encoder"],
            fraction=config["fraction"],
            seed=config["seed"],
            test_set=name,
            n_train=int(metrics.get("train_rows", 0)),
            base_lr=float(config.get("base_lr", math.nan)),
            layer_decay=float(config.get("layer_decay", math.nan)),
            best_epoch=int(metrics["best_epoch"]),
            val_auroc=float(metrics["best_val_auroc"]),
            target=arrays[f"{name}_target"],
            scores=arrays[f"{name}_scores"],
            groups=arrays[f"{name}_group"],
            keys=arrays[f"{name}_key"],
            attributes={
                a: arrays[f"{name}_{ATTRIBUTE_PREFIX}{a}"]
                for a in data.task.attributes
                if f"{name}_{ATTRIBUTE_PREFIX}{a}" in arrays
            },
        )
        for name in EVAL_SETS
        if f"{name}_scores" in arrays
    ]
    return runs, {k: v for k, v in arrays.items() if k.startswith("attention_")}


@dataclass
class FinetuneResult:
    output: Path
    summary: list[dict[str, Any]]
    results: list[dict[str, Any]]
    comparisons: list[dict[str, Any]]
    parent_run_id: str
    tracking_uri: str
    failed: int  # grid cells without a finished run


def _log_nested(run: Run, history, out: Path, experiment_id: str, parent: str) -> None:
    import mlflow

    name = f"{run.task}-{run.encoder}-f{run.fraction:g}-s{run.seed}"
    with mlflow.start_run(experiment_id=experiment_id, run_name=name, nested=True, parent_run_id=parent):
        mlflow.log_params({"task": run.task, "encoder": run.encoder, "fraction": run.fraction, "seed": run.seed})
        if history is not None:
            for _, row in history.iterrows():
                if row.get("scored") != 1:  # the per-epoch reports, not the final one
                    step = int(row["epoch"])
                    mlflow.log_metrics({k: float(row[k]) for k in ("val_auroc", "train_loss") if k in row}, step=step)
        prefix = "" if run.test_set == "test" else "external_"
        mlflow.log_metrics({f"{prefix}test_{k}": v for k, v in run.metrics.items() if not math.isnan(v)})
        figure = out / "reliability" / f"{name}-{run.test_set}.png"
        figure.parent.mkdir(exist_ok=True)
        plot_reliability(figure, run)
        mlflow.log_artifact(str(figure))


def run_finetune_job(inputs: FinetuneInputs, output: str | Path, cfg: FinetuneConfig) -> FinetuneResult:
    """The whole job (see the module docstring) on the Ray cluster this process has joined."""
    import mlflow
    import ray
    from ray import tune

    from mermed.tracking import flatten_params, tracking_uri, ui_command, use_experiment

    out = Path(output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(cfg.tracking.mlflow_uri, out)
    experiment_id = use_experiment(cfg.tracking.experiment, uri, out)
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    concurrency = _concurrency(cfg, use_gpu)
    shared = _Shared(
        finetune=cfg.model_dump(),
        tasks={d.task.name: d for d in inputs.tasks},
        external=inputs.external,
        encoders={
            e.tag: {
                "model_name": e.model_name,
                "img_size": e.img_size,
                "normalization": e.normalization,
                "weights": [ray.put(e.weights)],  # wrapped: Ray passes a nested ref on as it is
            }
            for e in inputs.encoders
        },
        rows={d.task.name: _encoded_sets(d, inputs.external.get(d.task.name)) for d in inputs.tasks},
        storage=str(out / "train"),
        use_gpu=use_gpu,
    )
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"finetune-{time.strftime('%Y%m%d-%H%M%S')}") as parent:
        mlflow.log_params(
            flatten_params(
                {
                    "finetune": cfg.model_dump(),
                    "encoders": {e.tag: {"model": e.model_name, "sha256": e.fingerprint} for e in inputs.encoders},
                    "tasks": {d.task.name: {**d.task.model_dump(), "classes": d.classes} for d in inputs.tasks},
                }
            )
        )
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(_run_trial, shared=shared), {"cpu": TRIAL_DRIVER_CPU}),
            param_space=_param_space(inputs, cfg),
            tune_config=tune.TuneConfig(
                metric="val_auroc",
                mode="max",
                num_samples=cfg.search.trials,
                scheduler=_scheduler(inputs, cfg),
                max_concurrent_trials=concurrency,
                trial_dirname_creator=lambda trial: trial.trial_id,
            ),
            run_config=tune.RunConfig(name="tune", storage_path=str(out), verbose=0),
        )
        grid = tuner.fit()
        finished = _best_trials(grid)
        cells = len(inputs.tasks) * len(inputs.encoders) * len(cfg.fractions) * len(cfg.seeds)
        for error in grid.errors[:3]:
            log.error("finetune: a run failed: %s", error)
        runs: list[Run] = []
        for result in finished:
            data = shared.tasks[result.config["task"]]
            trial_runs, attention = _runs_of(result, data, data.modality)
            for run in trial_runs:
                _log_nested(run, result.metrics_dataframe, out, experiment_id, parent.info.run_id)
                log.info(
                    "%s / %s / %g labels / seed %d / %s: AUROC %.3f",
                    run.task,
                    run.encoder,
                    run.fraction,
                    run.seed,
                    run.test_set,
                    run.metrics["auroc"],
                )
            runs += trial_runs
            if attention and result.config["seed"] == cfg.seeds[0] and result.config["fraction"] == max(cfg.fractions):
                figure = out / f"attention_{data.task.name}_{result.config['encoder']}.png"
                title = f"{data.task.name}, {result.config['encoder']}: last-block CLS attention"
                plot_attention(figure, title, attention["attention_pixels"], attention["attention_maps"])
                mlflow.log_artifact(str(figure))
        summary = summarize(runs, cfg.bootstrap)
        compared = comparisons(runs)
        groups = subgroups(runs)
        if groups:
            write_csv(out / "subgroups.csv", groups, SUBGROUP_COLUMNS)
            mlflow.log_artifact(str(out / "subgroups.csv"))
        write_csv(out / "summary.csv", summary, SUMMARY_COLUMNS)
        write_csv(out / "results.csv", [r.row() for r in runs], RESULT_COLUMNS)
        (out / "summary.md").write_text(markdown(summary, compared, subgroup_gaps(groups)))
        for name in ("summary.csv", "summary.md", "results.csv"):
            mlflow.log_artifact(str(out / name))
    failed = cells - len(finished)
    if failed:
        log.error("finetune: %d of %d runs did not finish (see %s)", failed, cells, out / "tune")
    log.info("finetune: %s; browse with: %s", out / "summary.md", ui_command(uri))
    return FinetuneResult(out, summary, [r.row() for r in runs], compared, parent.info.run_id, uri, failed)


__all__ = ["FinetuneInputs", "FinetuneResult", "check_inputs", "run_finetune_job"]
