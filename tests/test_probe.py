"""Probes on synthetic features: they learn what is learnable, nothing from noise, and deterministically."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ingest.config import ConfigError, load_config, parse_config
from mermed.metrics import auroc
from mermed.probe.config import ProbeTasksFile, ProbeTrainConfig
from mermed.probe.heads import (
    LinearProbe,
    MLPProbe,
    build_probe,
    encode_labels,
    fit_probe,
    fit_probes,
    predict_scores,
    rung_epochs,
    subsample_labels,
)

FAST = ProbeTrainConfig(hidden=32, epochs=15, batch_size=64, lr=3e-3, seed=0)


def _blobs(n: int, k: int, dim: int, seed: int, spread: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """k well-separated Gaussian clusters, with an offset and scale that the standardisation must undo."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(k, dim)) * spread
    y = rng.integers(0, k, n)
    x = centres[y] + rng.normal(size=(n, dim))
    return (50 + 10 * x).astype(np.float32), y


def _split(x: np.ndarray, y: np.ndarray, n_train: int, n_val: int) -> tuple[np.ndarray, ...]:
    """train, val and test rows in that order: (train_x, train_y, val_x, val_y, test_x, test_y)."""
    cut = n_train + n_val
    return x[:n_train], y[:n_train], x[n_train:cut], y[n_train:cut], x[cut:], y[cut:]


@pytest.mark.parametrize("head", ["mlp", "linear"])
@pytest.mark.parametrize(("task", "k"), [("binary", 2), ("multiclass", 4)])
def test_separable_features_reach_high_auroc(task: str, k: int, head: str) -> None:
    x, y = _blobs(900, k, 16, seed=1)
    tx, ty, vx, vy, sx, sy = _split(x, y, 400, 200)
    model, history = fit_probe(tx, ty, vx, vy, task, FAST.model_copy(update={"head": head}))  # type: ignore[arg-type]
    assert isinstance(model, MLPProbe if head == "mlp" else LinearProbe)
    assert auroc(sy, predict_scores(model, sx), task) > 0.99  # type: ignore[arg-type]
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_random_labels_give_chance_auroc() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(5200, 16)).astype(np.float32)
    y = rng.integers(0, 2, 5200)
    model, history = fit_probe(x[:600], y[:600], x[600:1200], y[600:1200], "binary", FAST)
    # 4000 test rows: the AUROC of an uninformative score has a standard deviation of about 0.009
    assert auroc(y[1200:], predict_scores(model, x[1200:]), "binary") == pytest.approx(0.5, abs=0.05)
    assert all(abs(h["val_auroc"] - 0.5) < 0.1 for h in history)


def test_multilabel_probe() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(900, 12)).astype(np.float32)
    y = (x[:, :3] + 0.3 * rng.normal(size=(900, 3)) > [0.0, 0.5, -0.5]).astype(np.float32)
    model, _ = fit_probe(x[:400], y[:400], x[400:600], y[400:600], "multilabel", FAST)
    scores = predict_scores(model, x[600:])
    assert scores.shape == (300, 3) and ((scores >= 0) & (scores <= 1)).all()
    assert auroc(y[600:], scores, "multilabel") > 0.95


def test_predict_scores_shapes_and_probabilities() -> None:
    x, y = _blobs(300, 3, 8, seed=4)
    model, _ = fit_probe(x[:200], y[:200], x[200:], y[200:], "multiclass", FAST.model_copy(update={"epochs": 2}))
    p = predict_scores(model, x[200:])
    assert p.shape == (100, 3)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-5)
    yb = (y == 0).astype(int)
    binary, _ = fit_probe(x[:200], yb[:200], x[200:], yb[200:], "binary", FAST.model_copy(update={"epochs": 2}))
    assert predict_scores(binary, x[200:]).shape == (100,)


def test_fit_is_deterministic_and_leaves_global_rng_alone() -> None:
    x, y = _blobs(400, 3, 8, seed=5, spread=1.0)
    args = (x[:250], y[:250], x[250:], y[250:], "multiclass")
    before = torch.get_rng_state()
    a, history_a = fit_probe(*args, FAST)  # type: ignore[arg-type]
    assert torch.equal(torch.get_rng_state(), before)
    b, history_b = fit_probe(*args, FAST)  # type: ignore[arg-type]
    assert history_a == history_b
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    _, history_c = fit_probe(*args, FAST.model_copy(update={"seed": 1}))  # type: ignore[arg-type]
    assert history_c != history_a


def test_report_each_epoch_and_keep_best_epoch() -> None:
    x, y = _blobs(400, 2, 8, seed=6, spread=0.1)  # overlapping: the probe overfits and val AUROC peaks early
    calls: list[tuple[int, dict[str, float]]] = []
    model, history = fit_probe(
        x[:200], y[:200], x[200:], y[200:], "binary", FAST, report=lambda e, m: calls.append((e, m))
    )
    assert [e for e, _ in calls] == list(range(1, FAST.epochs + 1))
    assert all(set(m) == {"train_loss", "val_loss", "val_auroc", "head"} and m["head"] == 0 for _, m in calls)
    assert [m["val_auroc"] for _, m in calls] == [h["val_auroc"] for h in history]
    best = max(h["val_auroc"] for h in history)
    assert history[-1]["val_auroc"] < best  # so the check below tells the best epoch from the last
    assert auroc(y[200:], predict_scores(model, x[200:]), "binary") == pytest.approx(best, abs=1e-9)


def test_saved_probe_predicts_the_same() -> None:
    """The standardisation statistics are buffers, so a state_dict alone rebuilds the probe."""
    x, y = _blobs(300, 3, 8, seed=7)
    model, _ = fit_probe(x[:200], y[:200], x[200:], y[200:], "multiclass", FAST.model_copy(update={"epochs": 3}))
    rebuilt = build_probe(8, 3, "multiclass", FAST)
    rebuilt.load_state_dict(model.state_dict())
    np.testing.assert_array_equal(predict_scores(rebuilt, x[200:]), predict_scores(model, x[200:]))
    assert not torch.equal(rebuilt.mean, torch.zeros(8))


def test_fit_rejects_bad_inputs() -> None:
    x, y = _blobs(100, 2, 4, seed=8)
    with pytest.raises(ValueError, match="number of rows"):
        fit_probe(x[:50], y[:40], x[50:], y[50:], "binary", FAST)
    with pytest.raises(ValueError, match="single-class"):
        fit_probe(x[:50], np.zeros(50, int), x[50:], y[50:], "binary", FAST)
    with pytest.raises(ValueError, match="equal D"):
        fit_probe(x[:50], y[:50], x[50:, :3], y[50:], "binary", FAST)
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fit_probe(bad[:50], y[:50], x[50:], y[50:], "binary", FAST)
    with pytest.raises(ValueError, match=r"class indices in \[0, 2\)"):
        fit_probe(x[:50], y[:50] * 2, x[50:], y[50:], "multiclass", FAST, n_classes=2)
    with pytest.raises(ValueError, match="single class"):  # val AUROC undefined
        fit_probe(x[:50], y[:50], x[50:], np.ones(50, int), "binary", FAST)


def test_divergence_is_an_error() -> None:
    x, y = _blobs(100, 2, 4, seed=9)
    with pytest.raises(FloatingPointError, match="diverged"):
        fit_probe(x[:50], y[:50], x[50:], y[50:], "binary", FAST.model_copy(update={"lr": 1e30}))


def test_heads_trained_together_are_the_heads_trained_alone() -> None:
    """Full-batch steps without dropout: each head of a batched fit follows its own lr, weight decay, init and
    epochs, as if it had been trained alone."""
    x, y = _blobs(300, 3, 8, seed=10, spread=1.0)
    full = {"batch_size": 300, "dropout": 0.0}
    cfgs = [
        FAST.model_copy(update={**full, "head": "linear", "lr": 1e-2, "weight_decay": 0.0, "epochs": 6, "seed": 0}),
        FAST.model_copy(update={**full, "head": "mlp", "lr": 3e-3, "weight_decay": 0.1, "epochs": 9, "seed": 1}),
        FAST.model_copy(update={**full, "head": "mlp", "hidden": 16, "lr": 1e-3, "epochs": 4, "seed": 2}),
    ]
    args = (x[:200], y[:200], x[200:], y[200:], "multiclass")
    reports: list[tuple[int, dict[str, float]]] = []
    together = fit_probes(*args, cfgs, report=lambda e, m: reports.append((e, m)))  # type: ignore[arg-type]
    for cfg, (model, history) in zip(cfgs, together, strict=True):
        alone, alone_history = fit_probe(*args, cfg)  # type: ignore[arg-type]
        assert len(history) == cfg.epochs
        for row, expected in zip(history, alone_history, strict=True):
            assert row == pytest.approx(expected, rel=1e-4, abs=1e-5)
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, alone.state_dict()[key], rtol=1e-4, atol=1e-5)
    assert [e for e, _ in reports] == list(range(1, 10))
    for epoch, metrics in reports:
        rows = {j: h[epoch - 1] for j, (_, h) in enumerate(together) if epoch <= len(h)}
        assert metrics["val_auroc"] == max(r["val_auroc"] for r in rows.values())
        assert rows[metrics["head"]]["val_auroc"] == metrics["val_auroc"]


def test_successive_halving_keeps_the_best_third_at_each_rung() -> None:
    x, y = _blobs(300, 2, 8, seed=11, spread=0.3)
    cfgs = [
        FAST.model_copy(update={"epochs": 10, "lr": lr, "seed": j}) for j, lr in enumerate(np.geomspace(1e-5, 1e-1, 9))
    ]
    assert rung_epochs(2, 3, 10) == {2, 6}
    fitted = fit_probes(x[:200], y[:200], x[200:], y[200:], "binary", cfgs, halving=(2, 3))
    lengths = [len(history) for _, history in fitted]
    assert sorted(lengths) == [2] * 6 + [6] * 2 + [10]
    best_at = {j: max(h["val_auroc"] for h in history[:2]) for j, (_, history) in enumerate(fitted)}
    went_on = {j for j, n in enumerate(lengths) if n > 2}
    assert min(best_at[j] for j in went_on) >= max(best_at[j] for j in set(best_at) - went_on)


def test_a_diverging_head_stops_and_the_others_train_on() -> None:
    x, y = _blobs(100, 2, 4, seed=9)
    cfgs = [FAST, FAST.model_copy(update={"lr": 1e30}), FAST.model_copy(update={"seed": 3})]
    (a, history_a), (_, history_bad), (_, history_c) = fit_probes(x[:50], y[:50], x[50:], y[50:], "binary", cfgs)
    assert len(history_a) == len(history_c) == FAST.epochs and len(history_bad) < FAST.epochs
    assert max(h["val_auroc"] for h in history_a) > 0.9
    with pytest.raises(ValueError, match="batch_size"):
        fit_probes(x[:50], y[:50], x[50:], y[50:], "binary", [FAST, FAST.model_copy(update={"batch_size": 8})])


# ----------------------------------------------------------------------------------------------- labels


def test_encode_labels_binary_and_multiclass() -> None:
    targets, classes = encode_labels(["10", "2", " 2", "1"], "multiclass")
    assert classes == ["1", "2", "10"]  # numeric order, whitespace ignored
    assert targets.tolist() == [2, 1, 1, 0] and targets.dtype == np.int64
    targets, classes = encode_labels(["malignant", "benign", "benign"], "binary")
    assert classes == ["benign", "malignant"] and targets.tolist() == [1, 0, 0]
    val, _ = encode_labels(["1", "10"], "multiclass", classes=["1", "2", "10"])
    assert val.tolist() == [0, 2]


def test_encode_labels_multilabel() -> None:
    targets, classes = encode_labels(["[0, 2]", "[]", "[1]", "[2, 2]"], "multilabel")
    assert classes == ["0", "1", "2"]
    assert targets.tolist() == [[1, 0, 1], [0, 0, 0], [0, 1, 0], [0, 0, 1]]
    targets, classes = encode_labels(['["effusion"]', '["atelectasis", "effusion"]', "[]"], "multilabel")
    assert classes == ["atelectasis", "effusion"]
    assert targets.tolist() == [[0, 1], [1, 1], [0, 0]]
    val, _ = encode_labels(['["effusion"]', "[]"], "multilabel", classes=["atelectasis", "effusion"])
    assert val.tolist() == [[0, 1], [0, 0]]


@pytest.mark.parametrize(
    ("labels", "task", "classes", "message"),
    [
        (["1", None, "0"], "binary", None, "1 of 3 labels are missing"),
        (["1", "", "0"], "multiclass", None, "missing"),
        ([], "binary", None, "no labels"),
        (["1", "1"], "binary", None, "exactly 2 classes"),
        (["a", "b", "c"], "binary", None, "exactly 2 classes"),
        (["a", "a"], "multiclass", None, "single-class"),
        (["a", "b"], "multiclass", ["a", "b"], None),
        (["a", "z"], "multiclass", ["a", "b"], "row 1: label not among"),
        (["[0", "[1]"], "multilabel", None, "row 0: .*JSON list"),
        (['{"a": 1}', "[1]"], "multilabel", None, "row 0: .*list of label names"),
        (["[true]", "[1]"], "multilabel", None, "list of label names"),
        (["[1]", "[1]"], "multilabel", None, "single-class"),
        (["[]", "[]"], "multilabel", None, "single-class"),
        (["[0]", "[3]"], "multilabel", ["0", "1"], "row 1: 1 label"),
        (["1", "0"], "ordinal", None, "task must be one of"),
    ],
)
def test_encode_labels_rejects(labels: list, task: str, classes: list | None, message: str | None) -> None:
    if message is None:
        encode_labels(labels, task, classes)  # type: ignore[arg-type]  # the control case is fine
        return
    with pytest.raises(ValueError, match=message):
        encode_labels(labels, task, classes)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------- subsets


def test_subsample_is_stratified_with_every_class() -> None:
    y = np.r_[np.zeros(1000, int), np.ones(300, int), np.full(5, 2)]
    np.random.default_rng(0).shuffle(y)
    for fraction in (0.01, 0.1):
        idx = subsample_labels(y, fraction, seed=0, task="multiclass")
        assert np.unique(idx).size == idx.size and (np.diff(idx) > 0).all()
        counts = np.bincount(y[idx], minlength=3)
        assert counts.tolist() == [round(fraction * 1000), round(fraction * 300), max(1, round(fraction * 5))]
    assert subsample_labels(y, 1.0, seed=0, task="multiclass").tolist() == list(range(y.size))
    a = subsample_labels(y, 0.1, seed=3, task="multiclass")
    assert a.tolist() == subsample_labels(y, 0.1, seed=3, task="multiclass").tolist()
    assert a.tolist() != subsample_labels(y, 0.1, seed=4, task="multiclass").tolist()
    with pytest.raises(ValueError, match="fraction"):
        subsample_labels(y, 0.0, seed=0, task="multiclass")


def test_subsample_multilabel_keeps_both_outcomes_of_each_label() -> None:
    rng = np.random.default_rng(1)
    y = (rng.random((2000, 4)) < [0.5, 0.05, 0.002, 0.999]).astype(int)
    for seed in range(5):
        idx = subsample_labels(y, 0.01, seed=seed, task="multilabel")
        assert idx.size == 20 and np.unique(idx).size == 20
        sub = y[idx]
        assert (sub.max(axis=0) == 1).all() and (sub.min(axis=0) == 0).all()


# ----------------------------------------------------------------------------------------------- config


def test_tasks_file_loads_and_names_a_typo(tmp_path) -> None:
    good = tmp_path / "TASKS.yaml"
    good.write_text(
        "tasks:\n"
        "  - {name: chest-14, data: s3://bucket/cxr14, type: multilabel, modality: CXR}\n"
        "  - {name: ham10000, data: /data/derm, type: multiclass, label: dx}\n"
    )
    tasks = load_config(ProbeTasksFile, good).tasks
    assert [t.name for t in tasks] == ["chest-14", "ham10000"]
    assert tasks[0].label == "label" and tasks[1].modality is None
    typo = tmp_path / "typo.yaml"
    typo.write_text("tasks:\n  - {name: a, data: /d, typ: binary}\n")
    with pytest.raises(ConfigError, match=r"tasks\.0\.typ"):
        load_config(ProbeTasksFile, typo)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"tasks": []}, "tasks"),
        ({"tasks": [{"name": "a", "data": "/d", "type": "binary"}] * 2}, "repeated: a"),
        ({"tasks": [{"name": "a", "data": "/d", "type": "regression"}]}, r"tasks\.0\.type"),
        ({"tasks": [{"name": "a/b", "data": "/d", "type": "binary"}]}, r"tasks\.0\.name"),
        ({"tasks": [{"name": "a", "data": "/d", "type": "binary", "modality": "XR"}]}, r"tasks\.0\.modality"),
    ],
)
def test_tasks_file_rejects(data: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        parse_config(ProbeTasksFile, data)


def test_train_config_rejects() -> None:
    with pytest.raises(ConfigError, match="head"):
        parse_config(ProbeTrainConfig, {"head": "transformer"})
    with pytest.raises(ConfigError, match="lr"):
        parse_config(ProbeTrainConfig, {"lr": 0})
    with pytest.raises(ConfigError, match="learning_rate"):
        parse_config(ProbeTrainConfig, {"learning_rate": 1e-3})
