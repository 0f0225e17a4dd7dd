"""Downstream metrics: AUROC (the paper's headline number), accuracy, and a patient-level bootstrap CI.

AUROC is the Mann-Whitney U statistic with midranks for ties, written over tie groups of the sorted scores so
that it also takes integer row weights: a bootstrap resample is the same rows with multiplicities, so all
resamples are scored at once on a (resamples x rows) weight matrix instead of re-sorting each one.
scikit-learn is only the reference in the tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import numpy as np

Task = Literal["binary", "multiclass", "multilabel"]
TASKS: tuple[str, ...] = get_args(Task)

# More undefined resamples than this fraction means a class has about two patients or fewer: the resamples
# that remain all hold the same few patients and their CI would be meaningless.
_MAX_UNDEFINED = 0.1

# Bootstrap weight matrices are processed in chunks of about this many elements (resamples x rows).
_CHUNK_ELEMENTS = 4_000_000


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, not {task!r}")


def _one_vs_rest(y_true: np.ndarray, scores: np.ndarray, task: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate inputs and return one-vs-rest columns: positives (N, K) bool and scores (N, K) float."""
    _check_task(task)
    y = np.asarray(y_true)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape[0] == 0 or s.size == 0:
        raise ValueError("empty input: y_true and scores need at least one row")
    if y.shape[0] != s.shape[0]:
        raise ValueError(f"y_true has {y.shape[0]} rows but scores has {s.shape[0]}")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    if task == "binary":
        if y.ndim != 1 or not (s.ndim == 1 or (s.ndim == 2 and s.shape[1] == 2)):
            raise ValueError(f"binary task needs y_true (N,) and scores (N,) or (N, 2), got {y.shape}, {s.shape}")
        if not np.isin(y, (0, 1)).all():
            raise ValueError("binary y_true must contain only 0 and 1")
        return (y == 1)[:, None], (s if s.ndim == 1 else s[:, 1])[:, None]
    if task == "multiclass":
        if y.ndim != 1 or s.ndim != 2 or s.shape[1] < 2:
            raise ValueError(f"multiclass task needs y_true (N,) and scores (N, K>=2), got {y.shape}, {s.shape}")
        if not np.isin(y, np.arange(s.shape[1])).all():
            raise ValueError(f"multiclass y_true must hold class indices in [0, {s.shape[1]})")
        return y[:, None] == np.arange(s.shape[1]), s
    if y.ndim != 2 or y.shape != s.shape:
        raise ValueError(f"multilabel task needs y_true and scores of the same (N, L) shape, got {y.shape}, {s.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("multilabel y_true must contain only 0 and 1")
    return y == 1, s


class RankedColumn:
    """One score column sorted once, with its tie groups, so that many weightings can be scored against it."""

    def __init__(self, positive: np.ndarray, score: np.ndarray) -> None:
        self.order = np.argsort(score, kind="stable")
        ranked = score[self.order]
        self.group_starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
        self.positive = positive[self.order]

    def auc(self, row_weights: np.ndarray) -> np.ndarray:
        """AUROC under each row of ``row_weights`` (B, N) (integer multiplicities); NaN where a class is absent.

        U = sum over tie groups g of pos_g * (neg below g + neg_g / 2), which equals the midrank sum of the
        positives minus n_pos (n_pos + 1) / 2.
        """
        w = row_weights[:, self.order]
        w_pos = w * self.positive
        pos = np.add.reduceat(w_pos, self.group_starts, axis=1)
        neg = np.add.reduceat(w - w_pos, self.group_starts, axis=1)
        below = np.cumsum(neg, axis=1) - neg
        u = (pos * (below + 0.5 * neg)).sum(axis=1)
        n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
        defined = (n_pos > 0) & (n_neg > 0)
        return np.where(defined, u / np.where(defined, n_pos * n_neg, 1.0), np.nan)


def _macro(per_column: np.ndarray) -> np.ndarray:
    """Mean over the defined (non-NaN) columns of (B, K); NaN for rows where none is defined."""
    defined = ~np.isnan(per_column)
    count = defined.sum(axis=1)
    total = np.where(defined, per_column, 0.0).sum(axis=1)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _weighted_auroc(columns: list[RankedColumn], row_weights: np.ndarray) -> np.ndarray:
    return _macro(np.stack([c.auc(row_weights) for c in columns], axis=1))


def _ranked(y_true: np.ndarray, scores: np.ndarray, task: str) -> list[RankedColumn]:
    positive, s = _one_vs_rest(y_true, scores, task)
    return [RankedColumn(positive[:, k], s[:, k]) for k in range(s.shape[1])]


def _undefined(task: str) -> ValueError:
    what = "no label has both positive and negative rows" if task == "multilabel" else "y_true has a single class"
    return ValueError(f"AUROC is undefined: {what}")


def auroc(y_true: np.ndarray, scores: np.ndarray, task: Task) -> float:
    """Area under the ROC curve.

    binary: y_true (N,) in {0, 1}, scores (N,) or (N, 2) (column 1 is the positive class).
    multiclass: y_true (N,) class indices, scores (N, K); macro one-vs-rest over the classes present in y_true.
    multilabel: y_true (N, L) in {0, 1}, scores (N, L); macro over labels with both classes present.
    Raises ValueError on empty or mismatched inputs and when no class (label) has both outcomes.
    """
    columns = _ranked(y_true, scores, task)
    value = _weighted_auroc(columns, np.ones((1, len(columns[0].order))))[0]
    if np.isnan(value):
        raise _undefined(task)
    return float(value)


def accuracy(y_true: np.ndarray, scores: np.ndarray, task: Task) -> float:
    """Fraction correct; scores are probabilities (binary (N,) thresholded at 0.5, (N, K) by argmax).

    multilabel: the mean over labels of the per-label accuracy at 0.5 (every label has N rows, so this is the
    mean over all N x L decisions).
    """
    positive, s = _one_vs_rest(y_true, scores, task)
    raw = np.asarray(scores)
    if task == "multiclass" or (task == "binary" and raw.ndim == 2):
        predicted = np.argmax(raw, axis=1)
        truth = np.asarray(y_true)
        return float(np.mean(predicted == truth))
    return float(np.mean((s >= 0.5) == positive))


def bootstrap_ci(
    y_true: np.ndarray,
    scores: np.ndarray,
    task: Task,
    groups: np.ndarray | list[str],
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile CI of the AUROC, resampling patients (``groups``: one pseudonym per row) with replacement.

    Rows of one patient are correlated, so resampling rows would understate the uncertainty; every row of a
    sampled patient comes along, as many times as the patient is drawn. Resamples where the AUROC is undefined
    (one class only) are skipped; if more than 10% are, the CI would be meaningless and ValueError is raised.
    """
    return mean_bootstrap_ci(y_true, [scores], task, groups, n_boot=n_boot, alpha=alpha, seed=seed)


def mean_bootstrap_ci(
    y_true: np.ndarray,
    score_sets: Sequence[np.ndarray],
    task: Task,
    groups: np.ndarray | list[str],
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """``bootstrap_ci`` of the mean AUROC of several models scored on the same rows (e.g. probes trained on
    different label subsets): each patient resample scores every model, so the CI is that of the mean."""
    if n_boot < 1:
        raise ValueError("n_boot must be at least 1")
    if not 0 < alpha < 1:
        raise ValueError("alpha must be in (0, 1)")
    if not score_sets:
        raise ValueError("no scores")
    models = [_ranked(y_true, s, task) for s in score_sets]
    n = len(models[0][0].order)
    if np.isnan(_weighted_auroc(models[0], np.ones((1, n)))[0]):
        raise _undefined(task)
    g = np.asarray(groups, dtype=object)
    if g.shape != (n,):
        raise ValueError(f"groups must have one entry per row ({n}), got shape {g.shape}")
    if any(x is None for x in g):
        raise ValueError("groups has missing values: every row needs a patient pseudonym")
    _, patient_of_row = np.unique(g.astype(str), return_inverse=True)
    n_patients = int(patient_of_row.max()) + 1
    rng = np.random.default_rng(seed)
    # How often each patient is drawn in each resample: n_patients draws with replacement.
    draws = rng.multinomial(n_patients, np.full(n_patients, 1.0 / n_patients), size=n_boot)
    chunk = max(1, _CHUNK_ELEMENTS // n)
    values = np.concatenate(
        [
            # NaN (undefined) depends on the labels and weights only, so it is the same for every model.
            np.mean([_weighted_auroc(columns, weights) for columns in models], axis=0)
            for weights in (draws[i : i + chunk][:, patient_of_row].astype(np.float64) for i in range(0, n_boot, chunk))
        ]
    )
    values = values[~np.isnan(values)]
    if values.size < (1 - _MAX_UNDEFINED) * n_boot:
        raise ValueError(
            f"AUROC is undefined in {n_boot - values.size} of {n_boot} patient resamples "
            "(a class has too few patients for a bootstrap CI)"
        )
    lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


__all__ = ["TASKS", "Task", "accuracy", "auroc", "bootstrap_ci", "mean_bootstrap_ci"]
