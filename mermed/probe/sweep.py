"""Ray Tune sweeps of probe heads on cached features: random search on the validation AUROC, every cell of a
probe job (task, encoder, label fraction, label subset) in one Tune experiment.

A head on cached features trains in a second or two, less than Tune's cost of a trial or of an experiment, so
the features of every cell reach the trials once, through the object store, each Tune trial trains a batch of
sampled heads of one cell together (``fit_probes``), and the job pays Tune's fixed cost once, not per cell.
ASHA stops weak trials when the experiment has a single cell; across cells its rungs would compare AUROCs of
different tasks, so there every trial runs its epochs (each head still keeps its best epoch)."""

from __future__ import annotations

import collections
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ingest.progress import Progress
from mermed.config import TrackingConfig
from mermed.probe.config import (
    ProbeConfig,
    ProbeSearchConfig,
    ProbeTrainConfig,
)
from mermed.probe.heads import fit_probes, rung_epochs
from mermed.tracking import metric_batch, retry_here, unreachable, when_reachable

log = logging.getLogger("mermed.probe")

HYPERPARAMETERS = ("head", "lr", "weight_decay", "hidden", "dropout", "epochs")  # what a sweep searches


@dataclass
class SweepData:
    """What the trials of one cell train on; every cell's reaches them once, through the object store."""

    task: str
    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    n_classes: int
    batch_size: int
    seed: int


def train_config(config: dict[str, Any], batch_size: int, seed: int) -> ProbeTrainConfig:
    """A trial's sampled hyperparameters as the probe's config."""
    return ProbeTrainConfig(**{k: config[k] for k in HYPERPARAMETERS}, batch_size=batch_size, seed=seed)


def search_space(cfg: ProbeSearchConfig) -> dict[str, Any]:
    from ray import tune

    def span(bounds: tuple[float, float], log: bool) -> Any:
        lo, hi = bounds
        if lo == hi:
            return lo
        return tune.loguniform(lo, hi) if log else tune.uniform(lo, hi)

    return {
        "head": tune.choice(cfg.heads),
        "lr": span(cfg.lr, log=True),
        "weight_decay": span(cfg.weight_decay, log=True),
        "hidden": tune.choice(cfg.hidden),
        "dropout": span(cfg.dropout, log=False),
        "epochs": tune.choice(cfg.epochs),
    }


def probe_trial(config: dict[str, Any], *, cells: dict[str, SweepData], search: ProbeSearchConfig, asha: bool) -> None:
    """Tune function trainable: the trial's heads, of cell ``config["cell"]``, trained together, successive
    halving among them at ASHA's rungs (``search.grace_period``, ``search.reduction_factor``).

    It reports the best val AUROC so far (over its heads and epochs), with that head's index in
    ``config["heads"]`` and epoch, at the rungs when ASHA schedules the trials (``asha``) and at its end: a Tune
    report costs more than an epoch of a probe."""
    from ray import tune

    data = cells[config["cell"]]
    cfgs = [train_config(head, data.batch_size, data.seed) for head in config["heads"]]
    rungs = rung_epochs(search.grace_period, search.reduction_factor, max(c.epochs for c in cfgs)) if asha else ()
    best: dict[str, float] = {}
    reported = 0

    def report(epoch: int, metrics: dict[str, float]) -> None:
        nonlocal reported
        if not best or metrics["val_auroc"] > best["val_auroc"]:
            best.update(metrics, best_epoch=epoch)
        if epoch in rungs:
            tune.report({"epoch": epoch, **best})
            reported = epoch

    fitted = fit_probes(
        data.train_x,
        data.train_y,
        data.val_x,
        data.val_y,
        data.task,  # type: ignore[arg-type]
        cfgs,
        report,
        n_classes=data.n_classes,
        halving=(search.grace_period, search.reduction_factor),
    )
    last = max(len(history) for _, history in fitted)
    if last > reported:
        tune.report({"epoch": last, **best})


def heads_per_trial(cfg: ProbeConfig, n_cells: int, cpus: float) -> int:
    """How many of a cell's heads one Tune trial trains: ``cfg.heads_per_trial``, or as many as spread the job's
    heads evenly over the cluster's CPUs (one trial per CPU), at most a whole cell's."""
    if cfg.heads_per_trial is not None:
        return min(cfg.heads_per_trial, cfg.trials)
    return min(cfg.trials, math.ceil(cfg.trials * n_cells / max(1, int(cpus))))


def mlflow_logger(cell_tags: dict[str, dict[str, str]], tracking: TrackingConfig, **kwargs: Any):
    """Ray's ``MLflowLoggerCallback(**kwargs)`` (its set-up of the experiment), with each trial's nested run also
    tagged with its cell's tags (task, encoder, fraction, label subset): one Tune experiment holds every cell of
    the job. A trial's start, results and end go through MLflow's client, each call one request that raises when
    the server is away.

    A tracking server that goes away does not stop the sweep: the calls it cannot take are kept, in order, and
    sent again (every ``tracking.retry_s``, at the next Tune event) once it is back, with one warning each way;
    the experiment's end waits for them up to ``tracking.reconnect_timeout_s``.
    """
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    class CellTaggedLogger(MLflowLoggerCallback):
        def setup(self, *args, **kw) -> None:
            super().setup(*args, **kw)
            self._deferred: collections.deque = collections.deque()
            self._down_since: float | None = None
            self._next_try = 0.0

        def _client(self):
            import mlflow

            return mlflow.MlflowClient(self.tracking_uri)

        def _start(self, trial) -> None:
            """The trial's nested run, tagged with its cell's tags, and its config as params.

            Through the client, not Ray's ``mlflow_util``: that one takes a server it cannot reach for a run that
            does not exist and falls back to MLflow's active run (ending none, or logging to a new one), so a
            call made during an outage would seem to succeed."""
            from mlflow.entities import Param
            from ray.tune.utils import flatten_dict

            client = self._client()
            if trial not in self._trial_runs:
                tags = {**self.tags, **cell_tags[trial.config["cell"]], "trial_name": str(trial)}
                run = client.create_run(self.mlflow_util.experiment_id, run_name=str(trial), tags=tags)
                self._trial_runs[trial] = run.info.run_id
            params = [Param(k, str(v)) for k, v in flatten_dict(trial.config).items()]
            client.log_batch(self._trial_runs[trial], params=params)  # the same values again on a retry

        def _end(self, trial, failed: bool) -> None:
            self._client().set_terminated(self._trial_runs[trial], "FAILED" if failed else "FINISHED")

        def _send(self) -> None:
            """Send the kept calls in order; raises what stopped them (the server being away)."""
            while self._deferred:
                call, args = self._deferred[0]
                call(*args)
                self._deferred.popleft()
            if self._down_since is not None:
                log.warning("tracking server back after %.0f s", time.monotonic() - self._down_since)
                self._down_since = None

        def _call(self, call, *args) -> None:
            self._deferred.append((call, args))
            if time.monotonic() < self._next_try:
                return
            try:
                self._send()
            except Exception as err:
                if not unreachable(err):
                    raise
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    log.warning(
                        "tracking server unreachable (%s); the sweep goes on, its logs wait", type(err).__name__
                    )
                self._next_try = time.monotonic() + tracking.retry_s

        def log_trial_start(self, trial) -> None:
            self._call(self._start, trial)

        def _log_result(self, trial, result: dict) -> None:
            """A result's numbers in one ``log_batch``: all or nothing, so that a retry logs no metric twice."""
            from ray.tune.utils import flatten_dict

            numbers = {
                k: v
                for k, v in flatten_dict(result, delimiter="/").items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
            metrics = metric_batch(numbers, int(result["training_iteration"]))
            self._client().log_batch(self._trial_runs[trial], metrics=metrics)

        def log_trial_result(self, iteration: int, trial, result: dict) -> None:
            self._call(self._log_result, trial, dict(result))

        def log_trial_end(self, trial, failed: bool = False) -> None:
            self._call(self._end, trial, failed)

        def on_experiment_end(self, trials, **info) -> None:
            when_reachable(self._send, "the sweep's trial runs", tracking, warned=self._down_since is not None)
            super().on_experiment_end(trials, **info)

    retry_here()  # the callback retries; MLflow's own back-off would stall Tune
    return CellTaggedLogger(**kwargs)


def _trial_progress(total: int):
    """A Tune callback that logs the trials done of ``total`` every few seconds (Tune itself is silent here)."""
    from ray.tune import Callback

    class TrialProgress(Callback):
        def __init__(self) -> None:
            self.progress = Progress(log, "sweep", total, "trials")

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            self.progress.update()

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self.progress.update()

        def on_experiment_end(self, trials, **info) -> None:
            self.progress.close()

    return TrialProgress()


def run_sweeps(
    cells: dict[str, SweepData],
    cfg: ProbeConfig,
    *,
    name: str,
    storage_path: Path,
    callbacks: list,
) -> dict[str, tuple[dict[str, Any], float]]:
    """Random search over ``cfg.search`` for every cell: ``cfg.trials`` heads per cell (rounded up to whole
    trials) drawn by Tune; returns per cell its best head's config and that head's best val AUROC."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if not cells:
        raise ValueError("no cells to sweep")
    search = cfg.search
    # Ray's newer console output prints a configuration table per sweep even at verbose=0; the classic one is
    # silent there (this job logs one line per fit itself). An explicit setting in the environment wins.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    per_trial = heads_per_trial(cfg, len(cells), ray.cluster_resources().get("CPU", 1))
    asha = len(cells) == 1
    scheduler = (
        ASHAScheduler(
            time_attr="epoch",  # trials report at rungs only, so reports are not epochs
            max_t=max(search.epochs),
            grace_period=search.grace_period,
            reduction_factor=search.reduction_factor,
        )
        if asha
        else FIFOScheduler()
    )
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(probe_trial, cells=cells, search=search, asha=asha), {"cpu": 1}),
        param_space={
            "cell": tune.grid_search(sorted(cells)),
            "heads": [search_space(search) for _ in range(per_trial)],
        },
        tune_config=tune.TuneConfig(
            metric="val_auroc",
            mode="max",
            num_samples=math.ceil(cfg.trials / per_trial),
            scheduler=scheduler,
            search_alg=BasicVariantGenerator(random_state=cfg.seed),
            trial_name_creator=lambda trial: f"{trial.config['cell']}-{trial.trial_id}",
            trial_dirname_creator=lambda trial: trial.trial_id,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(storage_path.resolve()),
            # progress first: its closing line comes when the trials are done, not after a tracking outage
            callbacks=[_trial_progress(len(cells) * math.ceil(cfg.trials / per_trial)), *callbacks],
            verbose=0,
        ),
    )
    grid = tuner.fit()
    if grid.errors:
        log.warning("sweep %s: %d of %d trials failed, e.g. %s", name, len(grid.errors), len(grid), grid.errors[0])
    best: dict[str, tuple[dict[str, Any], float]] = {}
    for result in grid:
        if result.error is not None or not result.metrics or "val_auroc" not in result.metrics:
            continue
        top = result.metrics  # the last report holds the trial's best so far (ASHA may have stopped it earlier)
        cell = result.config["cell"]
        if cell not in best or top["val_auroc"] > best[cell][1]:
            best[cell] = (dict(result.config["heads"][int(top["head"])]), float(top["val_auroc"]))
    unswept = sorted(set(cells) - set(best))
    if unswept:
        first = grid.errors[0] if grid.errors else "no result"
        raise RuntimeError(f"sweep {name}: every trial of {', '.join(unswept)} failed; the first error: {first}")
    return best
