"""Downstream metrics: AUROC (the paper's headline number), the authors' metric set, and a patient-level bootstrap CI.

The metric set of the published evaluation (``classification_metrics``, ``per_class_metrics``): AUROC and
AUPRC (macro one-vs-rest), accuracy, balanced accuracy, sensitivity, specificity, F1, Brier score and the
expected calibration error (15 bins, top-1 and class-wise), plus micro AUROC/AUPRC for multi-label tasks.
scikit-learn computes what it has; ECE, specificity and the bootstrap are ours. ``paired_comparison`` compares
two encoders over matched (task, fraction, seed) results with the Wilcoxon signed-rank test.

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


ECE_BINS = 15  # as the authors' evaluation


def predicted_labels(scores: np.ndarray, task: Task) -> np.ndarray:
    """Decisions from probabilities: binary (N,) and multilabel (N, L) at 0.5, multiclass (N, K) by argmax; a
    binary (N, 2) is read as its column 1."""
    s = np.asarray(scores, dtype=np.float64)
    if task == "multiclass":
        return np.argmax(s, axis=1)
    if task == "binary" and s.ndim == 2:
        s = s[:, 1]
    return (s >= 0.5).astype(np.int64)


def _binned_gaps(confidence: np.ndarray, outcome: np.ndarray, n_bins: int) -> tuple[np.ndarray, ...]:
    """Per equal-width bin of ``confidence`` in [0, 1]: mean confidence, observed frequency, row count."""
    bins = np.clip((confidence * n_bins).astype(np.int64), 0, n_bins - 1)  # 1.0 falls in the last bin
    count = np.bincount(bins, minlength=n_bins).astype(np.float64)
    safe = np.maximum(count, 1)
    mean_conf = np.bincount(bins, weights=confidence, minlength=n_bins) / safe
    frequency = np.bincount(bins, weights=outcome.astype(np.float64), minlength=n_bins) / safe
    return mean_conf, frequency, count


def reliability_bins(
    y_true: np.ndarray, scores: np.ndarray, task: Task, n_bins: int = ECE_BINS
) -> tuple[np.ndarray, ...]:
    """The reliability diagram's data, top-1 (multilabel: every label's decision): per bin of confidence, the
    mean confidence, the accuracy and the row count."""
    positive, s = _one_vs_rest(y_true, scores, task)
    if task == "multiclass":
        confidence = s.max(axis=1)
        correct = positive[np.arange(len(s)), s.argmax(axis=1)]
    else:  # a 0.5-threshold decision per column: confidence is the probability of the decided outcome
        confidence = np.maximum(s, 1 - s).ravel()
        correct = ((s >= 0.5) == positive).ravel()
    return _binned_gaps(confidence, correct, n_bins)


def expected_calibration_error(y_true: np.ndarray, scores: np.ndarray, task: Task, n_bins: int = ECE_BINS) -> float:
    """Top-1 ECE (Guo et al. 2017): sum over bins of |accuracy - confidence| weighted by the bin's share of rows."""
    conf, freq, count = reliability_bins(y_true, scores, task, n_bins)
    return float(np.sum(np.abs(freq - conf) * count) / count.sum())


def classwise_calibration_error(
    y_true: np.ndarray, scores: np.ndarray, task: Task, n_bins: int = ECE_BINS
) -> np.ndarray:
    """Per class (label) k, the ECE of p_k against "the row is of class k" (Kull et al. 2019); binary: one value."""
    positive, s = _one_vs_rest(y_true, scores, task)
    values = []
    for k in range(s.shape[1]):
        conf, freq, count = _binned_gaps(s[:, k], positive[:, k], n_bins)
        values.append(np.sum(np.abs(freq - conf) * count) / count.sum())
    return np.asarray(values)


def _confusion(positive: np.ndarray, decided: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per column: true positives, false positives, false negatives, true negatives."""
    tp = (positive & decided).sum(axis=0)
    fp = (~positive & decided).sum(axis=0)
    fn = (positive & ~decided).sum(axis=0)
    tn = (~positive & ~decided).sum(axis=0)
    return tp, fp, fn, tn


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.where(b > 0, a / np.maximum(b, 1), np.nan)


def per_class_metrics(y_true: np.ndarray, scores: np.ndarray, task: Task) -> dict[str, np.ndarray]:
    """One value per class (binary: the positive class only; multilabel: per label): AUROC, AUPRC, sensitivity,
    specificity, F1 (of the one-vs-rest decision) and the class-wise ECE. NaN where a class is absent."""
    from sklearn.metrics import average_precision_score

    positive, s = _one_vs_rest(y_true, scores, task)
    decided = predicted_labels(scores, task)
    decided = decided[:, None] == np.arange(s.shape[1]) if task == "multiclass" else decided.reshape(len(s), -1) == 1
    tp, fp, fn, tn = _confusion(positive, decided)
    both = positive.any(axis=0) & (~positive).any(axis=0)
    columns = _ranked(y_true, scores, task)
    ones = np.ones((1, len(s)))
    return {
        "auroc": np.array([c.auc(ones)[0] for c in columns]),
        "auprc": np.array(
            [average_precision_score(positive[:, k], s[:, k]) if both[k] else np.nan for k in range(s.shape[1])]
        ),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "ece": classwise_calibration_error(y_true, scores, task),
    }


def _nanmean(values: np.ndarray) -> float:
    return float(np.mean(values[~np.isnan(values)])) if (~np.isnan(values)).any() else float("nan")


def classification_metrics(y_true: np.ndarray, scores: np.ndarray, task: Task) -> dict[str, float]:
    """The published metric set for one model on one test set; scores are probabilities (see ``auroc``).

    Macro means over the classes (labels) where the metric is defined; binary tasks report the positive class.
    ``brier`` is the mean squared distance of the probability vector from the one-hot truth (binary: of p from y;
    multilabel: per label, averaged); ``ece`` is top-1, ``ece_classwise`` the mean class-wise ECE.
    """
    from sklearn.metrics import average_precision_score, balanced_accuracy_score

    positive, s = _one_vs_rest(y_true, scores, task)
    per_class = per_class_metrics(y_true, scores, task)
    if task == "multiclass":
        balanced = balanced_accuracy_score(np.asarray(y_true), predicted_labels(scores, task))
    else:
        balanced = _nanmean((per_class["sensitivity"] + per_class["specificity"]) / 2)
    result = {
        "auroc": auroc(y_true, scores, task),
        "auprc": _nanmean(per_class["auprc"]),
        "accuracy": accuracy(y_true, scores, task),
        "balanced_accuracy": float(balanced),
        "sensitivity": _nanmean(per_class["sensitivity"]),
        "specificity": _nanmean(per_class["specificity"]),
        "f1": _nanmean(per_class["f1"]),
        "brier": float(np.mean(np.sum((s - positive) ** 2, axis=1)) / (s.shape[1] if task == "multilabel" else 1)),
        "ece": expected_calibration_error(y_true, scores, task),
        "ece_classwise": _nanmean(per_class["ece"]),
    }
    if task == "multilabel":
        result["auroc_micro"] = float(
            _weighted_auroc([RankedColumn(positive.ravel(), s.ravel())], np.ones((1, s.size)))[0]
        )
        result["auprc_micro"] = float(average_precision_score(positive.ravel(), s.ravel()))
    return result


# What classification_metrics returns for every task, in report order (multilabel adds auroc_micro, auprc_micro).
METRICS = (
    "auroc", "auprc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "f1", "brier", "ece",
    "ece_classwise",
)  # fmt: skip


def paired_comparison(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Encoder A against encoder B on matched results (the same task, label fraction and seed in each pair):
    the mean and std of A - B, how often A wins, and the two-sided Wilcoxon signed-rank p-value (exact for small
    samples, scipy's choice), which assumes nothing about the differences' distribution."""
    from scipy.stats import wilcoxon

    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 1:
        raise ValueError(f"paired results need two equal-length 1-D sequences, got {x.shape} and {y.shape}")
    diff = x - y
    p = 1.0 if np.all(diff == 0) else float(wilcoxon(x, y, zero_method="wilcox").pvalue)
    return {
        "pairs": float(len(diff)),
        "mean_diff": float(diff.mean()),
        "std_diff": float(diff.std(ddof=1)) if len(diff) > 1 else float("nan"),
        "wins": float((diff > 0).sum()),
        "p_value": p,
    }


def metric_bootstrap_ci(
    y_true: np.ndarray,
    score_sets: Sequence[np.ndarray],
    task: Task,
    groups: np.ndarray | list[str],
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile CIs of every ``classification_metrics`` value, averaged over ``score_sets`` (models scored on
    the same rows, e.g. one per seed), resampling patients as ``bootstrap_ci`` does; resamples where a metric is
    undefined are skipped for it, and a metric undefined in more than 10% of them gets (NaN, NaN)."""
    g = np.asarray(groups, dtype=object).astype(str)
    _, patient_of_row = np.unique(g, return_inverse=True)
    rows_of = [np.flatnonzero(patient_of_row == p) for p in range(int(patient_of_row.max()) + 1)]
    rng = np.random.default_rng(seed)
    y = np.asarray(y_true)
    values: dict[str, list[float]] = {}
    for _ in range(n_boot):
        rows = np.concatenate([rows_of[p] for p in rng.integers(0, len(rows_of), len(rows_of))])
        try:
            per_model = [classification_metrics(y[rows], np.asarray(s)[rows], task) for s in score_sets]
        except ValueError:  # a resample with one class: AUROC (and the rest with it) undefined
            continue
        for name in per_model[0]:
            values.setdefault(name, []).append(float(np.mean([m[name] for m in per_model])))
    out = {}
    for name in (*METRICS, *(k for k in values if k not in METRICS)):
        v = np.asarray(values.get(name, []))
        v = v[~np.isnan(v)]
        out[name] = (
            tuple(float(q) for q in np.quantile(v, [alpha / 2, 1 - alpha / 2]))
            if v.size >= (1 - _MAX_UNDEFINED) * n_boot
            else (float("nan"), float("nan"))
        )
    return out  # type: ignore[return-value]


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


__all__ = [
    "ECE_BINS",
    "METRICS",
    "TASKS",
    "Task",
    "accuracy",
    "auroc",
    "bootstrap_ci",
    "classification_metrics",
    "classwise_calibration_error",
    "expected_calibration_error",
    "mean_bootstrap_ci",
    "metric_bootstrap_ci",
    "paired_comparison",
    "per_class_metrics",
    "predicted_labels",
    "reliability_bins",
]
