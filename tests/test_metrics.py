"""AUROC, accuracy and the patient bootstrap against scikit-learn, on random and tied inputs."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, roc_auc_score

from mermed.metrics import (
    METRICS,
    RankedColumn,
    accuracy,
    auroc,
    bootstrap_ci,
    classification_metrics,
    classwise_calibration_error,
    expected_calibration_error,
    metric_bootstrap_ci,
    paired_comparison,
    per_class_metrics,
)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _binary(n: int, seed: int, signal: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return y, rng.normal(size=n) + signal * y


# ----------------------------------------------------------------------------------------------- AUROC


@pytest.mark.parametrize("decimals", [None, 1, 0])  # continuous, some ties, heavy ties
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_matches_sklearn(seed: int, decimals: int | None) -> None:
    y, s = _binary(500, seed)
    if decimals is not None:
        s = np.round(s, decimals)
    assert auroc(y, s, "binary") == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    two_columns = np.stack([1 - s, s], axis=1)
    assert auroc(y, two_columns, "binary") == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert auroc(y.astype(bool), s, "binary") == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_binary_known_values() -> None:
    assert auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4], "binary") == 1.0
    assert auroc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1], "binary") == 0.0
    assert auroc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5], "binary") == 0.5  # all tied: midranks


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_multiclass_matches_sklearn_ovr_macro(seed: int, tied: bool) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, 600)
    logits = rng.normal(size=(600, 4)) + 1.5 * np.eye(4)[y]
    p = _softmax(np.round(logits) if tied else logits)
    expected = roc_auc_score(y, p, multi_class="ovr", average="macro")
    assert auroc(y, p, "multiclass") == pytest.approx(expected, abs=1e-12)


def test_multiclass_averages_over_present_classes_only() -> None:
    rng = np.random.default_rng(3)
    y = rng.choice([0, 1, 3], 300)  # class 2 never occurs
    p = _softmax(rng.normal(size=(300, 4)) + np.eye(4)[y])
    expected = np.mean([roc_auc_score(y == k, p[:, k]) for k in (0, 1, 3)])
    assert auroc(y, p, "multiclass") == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("tied", [False, True])
def test_multilabel_matches_sklearn_macro(tied: bool) -> None:
    rng = np.random.default_rng(4)
    y = (rng.random((400, 5)) < [0.1, 0.3, 0.5, 0.7, 0.05]).astype(int)
    s = rng.normal(size=(400, 5)) + y
    if tied:
        s = np.round(s)
    expected = roc_auc_score(y, s, average="macro")
    assert auroc(y, s, "multilabel") == pytest.approx(expected, abs=1e-12)


def test_multilabel_skips_labels_with_one_class() -> None:
    rng = np.random.default_rng(5)
    y = (rng.random((200, 4)) < 0.4).astype(int)
    y[:, 1] = 0  # never positive
    y[:, 3] = 1  # always positive
    s = rng.normal(size=(200, 4)) + y
    expected = roc_auc_score(y[:, [0, 2]], s[:, [0, 2]], average="macro")
    assert auroc(y, s, "multilabel") == pytest.approx(expected, abs=1e-12)


def test_weighted_auc_matches_sklearn_sample_weight() -> None:
    """The bootstrap scores all resamples through these integer weights: check them row by row."""
    rng = np.random.default_rng(6)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.normal(size=300) + y, 1)
    weights = rng.integers(0, 4, size=(20, 300)).astype(float)  # zeros: rows not drawn
    got = RankedColumn(y == 1, s).auc(weights)
    expected = [roc_auc_score(y, s, sample_weight=w) for w in weights]
    np.testing.assert_allclose(got, expected, atol=1e-12)
    only_negatives = np.where(y == 1, 0.0, 1.0)[None, :]
    assert np.isnan(RankedColumn(y == 1, s).auc(only_negatives)[0])


@pytest.mark.parametrize(
    ("y", "s", "task", "message"),
    [
        ([1, 1, 1], [0.1, 0.2, 0.3], "binary", "single class"),
        ([2, 2, 2], np.full((3, 3), 1 / 3), "multiclass", "single class"),
        ([[0, 1], [0, 1]], [[0.1, 0.2], [0.3, 0.4]], "multilabel", "no label has both"),
        ([], [], "binary", "empty"),
        ([0, 1], [0.1, 0.2, 0.3], "binary", "rows"),
        ([0, 1, 2], [0.1, 0.2, 0.3], "binary", "only 0 and 1"),
        ([0, 1], [0.1, np.nan], "binary", "NaN"),
        ([0, 1, 5], np.full((3, 3), 1 / 3), "multiclass", "class indices"),
        ([0, 1, 2], [0.1, 0.2, 0.3], "multiclass", "multiclass task needs"),
        ([[0, 1], [1, 0]], [0.1, 0.2], "multilabel", "of the same"),
        ([0, 1], [0.1, 0.2], "regression", "task must be one of"),
    ],
)
def test_bad_inputs_raise(y: list, s: list, task: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        auroc(np.asarray(y), np.asarray(s), task)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------- accuracy


def test_accuracy_matches_sklearn() -> None:
    rng = np.random.default_rng(7)
    y, s = _binary(300, 7)
    p = 1 / (1 + np.exp(-s))
    assert accuracy(y, p, "binary") == pytest.approx(accuracy_score(y, p >= 0.5))
    assert accuracy(y, np.stack([1 - p, p], 1), "binary") == pytest.approx(accuracy_score(y, p >= 0.5))
    yc = rng.integers(0, 3, 300)
    pc = _softmax(rng.normal(size=(300, 3)) + np.eye(3)[yc])
    assert accuracy(yc, pc, "multiclass") == pytest.approx(accuracy_score(yc, pc.argmax(1)))
    ym = (rng.random((300, 4)) < 0.3).astype(int)
    pm = 1 / (1 + np.exp(-(rng.normal(size=(300, 4)) + 2 * ym - 1)))
    per_label = [accuracy_score(ym[:, j], pm[:, j] >= 0.5) for j in range(4)]
    assert accuracy(ym, pm, "multilabel") == pytest.approx(np.mean(per_label))


# ----------------------------------------------------------------------------------------------- bootstrap


def test_ci_contains_point_estimate_and_narrows_with_n() -> None:
    widths = []
    for n in (200, 5000):
        y, s = _binary(n, 8)
        groups = [f"p{i}" for i in range(n)]
        lo, hi = bootstrap_ci(y, s, "binary", groups, n_boot=500)
        assert lo < auroc(y, s, "binary") < hi
        widths.append(hi - lo)
    # the width scales as 1/sqrt(N): a 25-fold N gives about a fifth
    assert widths[1] < 0.35 * widths[0]


def test_ci_is_deterministic_under_seed() -> None:
    y, s = _binary(300, 9)
    groups = np.arange(300) // 3
    assert bootstrap_ci(y, s, "binary", groups, seed=1) == bootstrap_ci(y, s, "binary", groups, seed=1)
    assert bootstrap_ci(y, s, "binary", groups, seed=1) != bootstrap_ci(y, s, "binary", groups, seed=2)


def test_ci_resamples_patients_not_rows() -> None:
    """Copies of a patient's rows add no information: grouped by patient, the CI is exactly that of one row per
    patient; treating each copy as its own patient would shrink it by about sqrt(copies)."""
    y, s = _binary(400, 10)
    patients = np.array([f"patient-{i}" for i in range(400)])
    one_row_each = bootstrap_ci(y, s, "binary", patients)
    copies = 6
    order = np.random.default_rng(0).permutation(400 * copies)  # copies need not be adjacent
    y6, s6, p6 = (np.repeat(a, copies)[order] for a in (y, s, patients))
    assert bootstrap_ci(y6, s6, "binary", p6) == pytest.approx(one_row_each, abs=1e-12)
    lo, hi = bootstrap_ci(y6, s6, "binary", np.arange(y6.size))  # wrongly: every row a patient
    assert hi - lo < 0.6 * (one_row_each[1] - one_row_each[0])


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_ci_for_multiclass_and_multilabel(task: str) -> None:
    rng = np.random.default_rng(11)
    if task == "multiclass":
        y = rng.integers(0, 3, 600)
        s = _softmax(rng.normal(size=(600, 3)) + np.eye(3)[y])
    else:
        y = (rng.random((600, 3)) < 0.3).astype(int)
        s = rng.normal(size=(600, 3)) + y
    lo, hi = bootstrap_ci(y, s, task, np.arange(600) // 2, n_boot=300)  # type: ignore[arg-type]
    assert lo < auroc(y, s, task) < hi  # type: ignore[arg-type]
    assert 0.02 < hi - lo < 0.2


def test_ci_skips_undefined_resamples_but_refuses_too_few_patients() -> None:
    rng = np.random.default_rng(12)
    negatives = 60
    # 5 positive patients: about e^-5 = 0.7% of resamples have none, which are skipped
    y = np.r_[np.zeros(negatives, int), np.ones(5, int)]
    s = rng.normal(size=y.size) + y
    lo, hi = bootstrap_ci(y, s, "binary", np.arange(y.size))
    assert 0 <= lo < hi <= 1
    # all positives from one patient: a third of the resamples have no positive
    groups = np.r_[np.arange(negatives), np.full(5, negatives)]
    with pytest.raises(ValueError, match="too few patients"):
        bootstrap_ci(y, s, "binary", groups)


def test_ci_bad_groups_raise() -> None:
    y, s = _binary(10, 13)
    with pytest.raises(ValueError, match="one entry per row"):
        bootstrap_ci(y, s, "binary", np.arange(9))
    with pytest.raises(ValueError, match="missing values"):
        bootstrap_ci(y, s, "binary", ["a"] * 9 + [None])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="single class"):
        bootstrap_ci(np.ones(10, int), s, "binary", np.arange(10))


# ----------------------------------------------------------------------------------------------- the published set


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


@pytest.mark.parametrize("seed", [0, 1])
def test_binary_metric_set_matches_sklearn(seed: int) -> None:
    from sklearn import metrics as sk

    y, z = _binary(300, seed)
    p = _sigmoid(z)
    got = classification_metrics(y, p, "binary")
    decided = (p >= 0.5).astype(int)
    tn, fp, fn, tp = sk.confusion_matrix(y, decided).ravel()
    assert tuple(got) == METRICS
    assert got["auroc"] == pytest.approx(sk.roc_auc_score(y, p))
    assert got["auprc"] == pytest.approx(sk.average_precision_score(y, p))
    assert got["accuracy"] == pytest.approx(sk.accuracy_score(y, decided))
    assert got["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(y, decided))
    assert got["sensitivity"] == pytest.approx(sk.recall_score(y, decided))
    assert got["specificity"] == pytest.approx(tn / (tn + fp))
    assert got["f1"] == pytest.approx(sk.f1_score(y, decided))
    assert got["brier"] == pytest.approx(sk.brier_score_loss(y, p))


@pytest.mark.parametrize("seed", [0, 1])
def test_multiclass_metric_set_matches_sklearn(seed: int) -> None:
    from sklearn import metrics as sk

    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, 400)
    p = _softmax(rng.normal(size=(400, 4)) + 1.5 * np.eye(4)[y])
    got = classification_metrics(y, p, "multiclass")
    decided = p.argmax(axis=1)
    matrices = sk.multilabel_confusion_matrix(y, decided)  # per class: [[tn, fp], [fn, tp]]
    specificity = np.mean([m[0, 0] / (m[0, 0] + m[0, 1]) for m in matrices])
    assert got["auroc"] == pytest.approx(sk.roc_auc_score(y, p, multi_class="ovr", average="macro"))
    assert got["auprc"] == pytest.approx(sk.average_precision_score(np.eye(4)[y], p, average="macro"))
    assert got["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(y, decided))
    assert got["sensitivity"] == pytest.approx(sk.recall_score(y, decided, average="macro"))
    assert got["specificity"] == pytest.approx(specificity)
    assert got["f1"] == pytest.approx(sk.f1_score(y, decided, average="macro"))
    assert got["brier"] == pytest.approx(np.mean(np.sum((p - np.eye(4)[y]) ** 2, axis=1)))
    per_class = per_class_metrics(y, p, "multiclass")
    assert per_class["f1"] == pytest.approx(sk.f1_score(y, decided, average=None))


def test_multilabel_adds_micro_averages() -> None:
    from sklearn import metrics as sk

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, (200, 3))
    p = _sigmoid(rng.normal(size=(200, 3)) + 2 * y - 1)
    got = classification_metrics(y, p, "multilabel")
    assert got["auroc"] == pytest.approx(sk.roc_auc_score(y, p, average="macro"))
    assert got["auroc_micro"] == pytest.approx(sk.roc_auc_score(y, p, average="micro"))
    assert got["auprc_micro"] == pytest.approx(sk.average_precision_score(y, p, average="micro"))
    assert got["f1"] == pytest.approx(sk.f1_score(y, (p >= 0.5).astype(int), average="macro"))


def test_ece_by_hand() -> None:
    # Binary, 15 bins. Confidences max(p, 1-p): 0.9, 0.9, 0.6, 0.6 (bins 13 and 9); decisions 1, 1, 0, 1.
    y = np.array([1, 0, 0, 0])
    p = np.array([0.9, 0.9, 0.4, 0.6])
    # bin of 0.9: accuracy 1/2, confidence 0.9 -> gap 0.4, weight 1/2; bin of 0.6: accuracy 1/2, gap 0.1, weight 1/2
    assert expected_calibration_error(y, p, "binary") == pytest.approx(0.5 * 0.4 + 0.5 * 0.1)
    # Perfectly calibrated within each bin: 10 rows at 0.8 of which 8 are positive.
    assert expected_calibration_error(np.array([1] * 8 + [0] * 2), np.full(10, 0.8), "binary") == pytest.approx(0)
    # Multiclass top-1: a confident wrong row and a confident right row.
    y3 = np.array([0, 1])
    p3 = np.array([[0.9, 0.05, 0.05], [0.9, 0.05, 0.05]])
    assert expected_calibration_error(y3, p3, "multiclass") == pytest.approx(0.4)  # one bin: |0.5 - 0.9|
    # Class-wise ECE of class 0: p_0 = 0.9 twice, one positive -> 0.4; classes 1, 2: p = 0.05, freq 1/2, 0 -> 0.45, 0.05
    assert classwise_calibration_error(y3, p3, "multiclass") == pytest.approx([0.4, 0.45, 0.05])


def test_paired_comparison_is_wilcoxon() -> None:
    from scipy.stats import wilcoxon

    a = [0.81, 0.85, 0.79, 0.90, 0.88, 0.84]
    b = [0.78, 0.86, 0.70, 0.85, 0.80, 0.83]
    got = paired_comparison(a, b)
    assert got["p_value"] == pytest.approx(wilcoxon(a, b).pvalue)
    assert (got["pairs"], got["wins"]) == (6, 5)
    assert got["mean_diff"] == pytest.approx(np.mean(np.subtract(a, b)))
    assert paired_comparison([0.5, 0.6], [0.5, 0.6])["p_value"] == 1.0
    with pytest.raises(ValueError, match="equal-length"):
        paired_comparison([0.5], [0.5, 0.6])


def test_metric_bootstrap_ci_brackets_the_estimate() -> None:
    y, z = _binary(200, 4, signal=1.5)
    p = _sigmoid(z)
    groups = np.repeat(np.arange(100), 2).astype(str)
    cis = metric_bootstrap_ci(y, [p], "binary", groups, n_boot=200)
    point = classification_metrics(y, p, "binary")
    assert set(cis) == set(METRICS)
    for name in METRICS:
        lo, hi = cis[name]
        assert lo <= point[name] <= hi, name
    assert cis["auroc"][0] == pytest.approx(bootstrap_ci(y, p, "binary", groups, n_boot=200)[0], abs=0.03)
