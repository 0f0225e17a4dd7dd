"""Probe results: one ``Fit`` per sweep, the summary tables (CSV, Markdown) and ROC plots."""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mermed.metrics import METRICS, classification_metrics, mean_bootstrap_ci
from mermed.probe.sweep import HYPERPARAMETERS

log = logging.getLogger("mermed.probe")

# The rest of the published metric set (mermed.metrics), as means over label subsets like AUROC and accuracy.
OTHER_METRICS = tuple(m for m in METRICS if m not in ("auroc", "accuracy"))
SUMMARY_COLUMNS = (
    "task",
    "modality",
    "encoder",
    "fraction",
    "auroc",
    "auroc_lo",
    "auroc_hi",
    "accuracy",
    *OTHER_METRICS,
    "n_test",
)
RESULT_COLUMNS = (
    "task",
    "modality",
    "encoder",
    "fraction",
    "seed",
    "n_train",
    "head",
    "lr",
    "weight_decay",
    "hidden",
    "dropout",
    "epochs",
    "val_auroc",
    "auroc",
    "auroc_lo",
    "auroc_hi",
    "accuracy",
    *OTHER_METRICS,
    "n_test",
)


@dataclass
class Fit:
    """One sweep's outcome: the refit probe's test scores and the configuration it was trained with."""

    task: str
    modality: str
    encoder: str
    fraction: float
    seed: int
    n_train: int
    config: dict[str, Any]
    val_auroc: float
    auroc: float
    auroc_lo: float
    auroc_hi: float
    accuracy: float
    y_test: np.ndarray = field(repr=False)
    scores: np.ndarray = field(repr=False)
    groups: np.ndarray = field(repr=False)
    task_type: str = "binary"
    metrics: dict[str, float] = field(default_factory=dict)  # the published set on the test split

    def __post_init__(self) -> None:
        if not self.metrics:
            self.metrics = classification_metrics(self.y_test, self.scores, self.task_type)  # type: ignore[arg-type]

    def row(self) -> dict[str, Any]:
        """The row of results.csv."""
        values = {
            **self.metrics,
            **{k: self.config[k] for k in HYPERPARAMETERS},
            "auroc": self.auroc,
            "accuracy": self.accuracy,
            "n_test": len(self.y_test),
        }
        return {c: values[c] if c in values else getattr(self, c) for c in RESULT_COLUMNS}


def bootstrap_ci_or_nan(fn, *args, **kwargs) -> tuple[float, float]:
    """A bootstrap CI, or NaNs (with a warning) when too few patients of a class make it meaningless."""
    try:
        return fn(*args, **kwargs)
    except ValueError as err:
        log.warning("no confidence interval: %s", err)
        return math.nan, math.nan


def summarize(fits: Sequence[Fit], task_types: dict[str, str], n_boot: int) -> list[dict[str, Any]]:
    """One row per (task, encoder, fraction): means over label subsets, and the patient CI of the mean."""
    cells: dict[tuple[str, str, float], list[Fit]] = {}
    for f in fits:
        cells.setdefault((f.task, f.encoder, f.fraction), []).append(f)
    rows = []
    for (task, encoder, fraction), group in cells.items():
        first = group[0]
        lo, hi = bootstrap_ci_or_nan(
            mean_bootstrap_ci,
            first.y_test,
            [f.scores for f in group],
            task_types[task],
            first.groups,
            n_boot=n_boot,
        )
        values = {
            "task": task,
            "modality": first.modality,
            "encoder": encoder,
            "fraction": fraction,
            "auroc": float(np.mean([f.auroc for f in group])),
            "auroc_lo": lo,
            "auroc_hi": hi,
            "accuracy": float(np.mean([f.accuracy for f in group])),
            **{m: float(np.mean([f.metrics[m] for f in group])) for m in OTHER_METRICS},
            "n_test": len(first.y_test),
        }
        rows.append({c: values[c] for c in SUMMARY_COLUMNS})
    return rows


def write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)


def markdown(rows: Sequence[dict[str, Any]], seeds: int) -> str:
    def num(v: float) -> str:
        return "n/a" if math.isnan(v) else f"{v:.3f}"

    lines = [
        "| task | modality | encoder | labels | AUROC (95% CI) | accuracy | n test |",
        "| --- | --- | --- | ---: | --- | ---: | ---: |",
    ]
    for r in rows:
        auroc_ci = f"{num(r['auroc'])} ({num(r['auroc_lo'])}-{num(r['auroc_hi'])})"
        lines.append(
            f"| {r['task']} | {r['modality']} | {r['encoder']} | {100 * r['fraction']:g}% | {auroc_ci} | "
            f"{num(r['accuracy'])} | {r['n_test']} |"
        )
    note = "\nAUROC: macro one-vs-rest for multi-class and multi-label tasks; 95% CI by bootstrap over patients."
    if any(r["fraction"] < 1 for r in rows):
        note += f" Below 100% of the labels: the mean over stratified label subsets ({seeds}; see results.csv)."
    return "\n".join(lines) + "\n" + note + "\n"


def _roc_points(y: np.ndarray, scores: np.ndarray, task: str) -> tuple[np.ndarray, np.ndarray]:
    """The ROC curve; for multi-class and multi-label the macro average of the one-vs-rest curves."""
    from sklearn.metrics import roc_curve

    if task == "binary":
        fpr, tpr, _ = roc_curve(y, scores)
        return fpr, tpr
    positives = y[:, None] == np.arange(scores.shape[1]) if task == "multiclass" else y.astype(bool)
    grid = np.linspace(0, 1, 201)
    curves = [
        np.interp(grid, *roc_curve(positives[:, k], scores[:, k])[:2])
        for k in range(scores.shape[1])
        if 0 < positives[:, k].sum() < len(y)
    ]
    return grid, np.mean(curves, axis=0)


def plot_roc(path: Path, task: str, task_type: str, fits: Sequence[Fit]) -> None:
    """One PNG per task: a curve per encoder and label fraction (the first label subset)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 5), dpi=110)
    ax = fig.subplots()
    for f in fits:
        fpr, tpr = _roc_points(f.y_test, f.scores, task_type)
        ax.plot(fpr, tpr, label=f"{f.encoder}, {f.fraction:.0%} labels (AUROC {f.auroc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{task} ({task_type})")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def plot_label_efficiency(path: Path, task: str, summary: Sequence[dict[str, Any]]) -> None:
    """The paper's label-efficiency figure for one task: test AUROC against the fraction of training labels, a
    line per encoder with its patient-bootstrap CI as a band (where the test set gives one)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4), dpi=110)
    ax = fig.subplots()
    for encoder in sorted({r["encoder"] for r in summary if r["task"] == task}):
        rows = sorted(
            (r for r in summary if r["task"] == task and r["encoder"] == encoder), key=lambda r: r["fraction"]
        )
        x = [r["fraction"] for r in rows]
        (line,) = ax.plot(x, [r["auroc"] for r in rows], marker="o", label=encoder)
        ax.fill_between(
            x, [r["auroc_lo"] for r in rows], [r["auroc_hi"] for r in rows], color=line.get_color(), alpha=0.2
        )
    ax.set_xscale("log")
    fractions = sorted({r["fraction"] for r in summary if r["task"] == task})
    ax.set_xticks(fractions, [f"{f:g}" for f in fractions])  # the fractions run, not powers of ten
    ax.minorticks_off()
    ax.set(xlabel="fraction of training labels", ylabel="test AUROC", title=f"{task}: label efficiency")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
