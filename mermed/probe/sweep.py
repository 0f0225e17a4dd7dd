"""Ray Tune sweeps of probe heads on cached features: random search with ASHA on the validation AUROC; the
features reach the trials once, through the object store."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mermed.probe.config import (
    ProbeConfig,
    ProbeSearchConfig,
    ProbeTrainConfig,
)
from mermed.probe.heads import fit_probe

log = logging.getLogger("mermed.probe")

HYPERPARAMETERS = ("head", "lr", "weight_decay", "hidden", "dropout", "epochs")  # what a sweep searches


@dataclass
class SweepData:
    """What every trial of a sweep trains on; it reaches them once, through the object store."""

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


def probe_trial(config: dict[str, Any], *, data: SweepData) -> None:
    """Tune function trainable: one probe fit, reporting the val AUROC every epoch (ASHA may stop it)."""
    from ray import tune

    cfg = train_config(config, data.batch_size, data.seed)
    fit_probe(
        data.train_x,
        data.train_y,
        data.val_x,
        data.val_y,
        data.task,  # type: ignore[arg-type]
        cfg,
        report=lambda epoch, metrics: tune.report({"epoch": epoch, **metrics}),
        n_classes=data.n_classes,
    )


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


def run_sweep(
    data: Any,
    cfg: ProbeConfig,
    *,
    name: str,
    storage_path: Path,
    callbacks: list,
    seed: int,
    trainable: Callable[..., None] = probe_trial,
) -> tuple[dict[str, Any], float]:
    """Random search with ASHA over ``cfg.search``; returns the best trial's config and its best val AUROC.

    ``trainable(config, data=data)`` runs one trial (bench/probe.py passes one that re-runs the encoder).
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    search = cfg.search
    # Ray's newer console output prints a configuration table per sweep even at verbose=0; the classic one is
    # silent there (this job logs one line per fit itself). An explicit setting in the environment wins.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trainable, data=data), {"cpu": 1}),
        param_space=search_space(search),
        tune_config=tune.TuneConfig(
            metric="val_auroc",
            mode="max",
            num_samples=cfg.trials,
            scheduler=ASHAScheduler(
                max_t=max(search.epochs),
                grace_period=search.grace_period,
                reduction_factor=search.reduction_factor,
            ),
            search_alg=BasicVariantGenerator(random_state=seed),
            trial_name_creator=lambda trial: f"{name}-{trial.trial_id}",
            trial_dirname_creator=lambda trial: trial.trial_id,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(name=name, storage_path=str(storage_path.resolve()), callbacks=callbacks, verbose=0),
    )
    grid = tuner.fit()
    if grid.errors:
        log.warning("sweep %s: %d of %d trials failed, e.g. %s", name, len(grid.errors), len(grid), grid.errors[0])
    if len(grid.errors) == len(grid):
        raise RuntimeError(f"sweep {name}: every trial failed; the first error: {grid.errors[0]}")
    best = grid.get_best_result(metric="val_auroc", mode="max", scope="all")
    return dict(best.config), float(best.metrics_dataframe["val_auroc"].max())
