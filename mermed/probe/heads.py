"""Downstream probes on frozen encoder features: heads, label parsing, training, label-efficiency subsets.

The paper scores the frozen encoder with a trainable MLP classifier per downstream dataset and reports AUROC.
Features are small (one vector per image), so probes train on CPU tensors; Ray Tune wraps ``fit_probe`` through
its ``report`` callback (pipelines/probe.py) and this module knows nothing of Ray.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from mermed.metrics import TASKS, Task, auroc
from mermed.probe.config import ProbeTrainConfig

Report = Callable[[int, dict[str, float]], None]


class Probe(nn.Module):
    """A head behind a fixed feature standardisation.

    The standardisation plays the role of a BatchNorm on the features (as in MAE/DINO linear probes), but with
    the exact moments of the training features kept as buffers: predictions do not depend on batch composition,
    and a saved state_dict predicts exactly as the trained probe did.
    """

    def __init__(self, in_dim: int, head: nn.Module, task: Task) -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, not {task!r}")
        self.task: Task = task
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        self.head = head

    def fit_standardization(self, x: torch.Tensor) -> None:
        """Take the per-feature mean and standard deviation of the training features (constant ones get 1)."""
        self.mean.copy_(x.mean(dim=0))
        std = x.std(dim=0, correction=0)
        self.std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((x - self.mean) / self.std)


class MLPProbe(Probe):
    """The paper's MLP classifier: Linear-GELU-Dropout-Linear on standardised features."""

    def __init__(
        self, in_dim: int, n_out: int, hidden: int = 512, dropout: float = 0.1, task: Task = "multiclass"
    ) -> None:
        head = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, n_out))
        super().__init__(in_dim, head, task)


class LinearProbe(Probe):
    """A linear classifier on standardised features: the usual lower bound for a frozen encoder."""

    def __init__(self, in_dim: int, n_out: int, task: Task = "multiclass") -> None:
        super().__init__(in_dim, nn.Linear(in_dim, n_out), task)


def build_probe(in_dim: int, n_out: int, task: Task, cfg: ProbeTrainConfig) -> Probe:
    """The head ``cfg`` names; ``n_out`` is 2 for binary (softmax over two logits), K or L otherwise."""
    if cfg.head == "mlp":
        return MLPProbe(in_dim, n_out, hidden=cfg.hidden, dropout=cfg.dropout, task=task)
    return LinearProbe(in_dim, n_out, task=task)


# --------------------------------------------------------------------------------------------- labels


def _sorted_names(names: set[str]) -> list[str]:
    """Numeric order when every name is a number ("2" before "10"), else lexicographic."""
    try:
        return sorted(names, key=float)
    except ValueError:
        return sorted(names)


def _parse_multilabel(text: str, row: int) -> set[str]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(f'row {row}: a multilabel label must be a JSON list, e.g. [0, 2] or ["a"]') from None
    if not isinstance(value, list) or not all(
        isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool)) for v in value
    ):
        raise ValueError(f"row {row}: a multilabel label must be a JSON list of label names or indices")
    return {str(v) for v in value}


def encode_labels(
    labels: Sequence[str | None], task: Task, classes: Sequence[str] | None = None, *, whole_split: bool = True
) -> tuple[np.ndarray, list[str]]:
    """Turn a shard's label strings into targets: (int64 (N,) class indices, or float32 (N, L) 0/1; classes).

    binary/multiclass: each label is a class name ("3", "benign"); classes are sorted (numerically when all
    are numbers) and binary's positive class is classes[1] (AUROC does not depend on which one is positive).
    multilabel: each label is a JSON list of the labels that are POSITIVE for the row, by name or index
    ("[0, 2]", "[\"effusion\"]", "[]" for none); a 0/1 vector is not accepted, since "[0, 1]" would be
    ambiguous. Pass the training split's ``classes`` when encoding val/test, so that indices agree.
    Raises ValueError on missing labels, unknown labels (with ``classes``), or single-class labels; a batch of
    a split (``whole_split=False``, with ``classes``) may be empty or single-class.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, not {task!r}")
    if not whole_split and classes is None:
        raise ValueError("encoding a batch needs the task's classes")
    if len(labels) == 0:
        if not whole_split:
            shape = (0, len(classes)) if task == "multilabel" else (0,)  # type: ignore[arg-type]
            return np.zeros(shape, np.float32 if task == "multilabel" else np.int64), list(classes)  # type: ignore[arg-type]
        raise ValueError("no labels")
    missing = sum(1 for s in labels if s is None or not s.strip())
    if missing:
        raise ValueError(f"{missing} of {len(labels)} labels are missing")
    names = [s.strip() for s in labels]  # type: ignore[union-attr]
    if task == "multilabel":
        sets = [_parse_multilabel(s, i) for i, s in enumerate(names)]
        known = list(classes) if classes is not None else _sorted_names(set().union(*sets))
        index = {c: k for k, c in enumerate(known)}
        targets = np.zeros((len(sets), len(known)), dtype=np.float32)
        for i, positives in enumerate(sets):
            unknown = positives - index.keys()
            if unknown:
                raise ValueError(f"row {i}: {len(unknown)} label(s) not among the {len(known)} known labels")
            targets[i, [index[p] for p in positives]] = 1.0
        positives_per_label = targets.sum(axis=0)
        if whole_split and not ((positives_per_label > 0) & (positives_per_label < len(sets))).any():
            raise ValueError("multilabel labels are single-class: no label is both present and absent")
        return targets, known
    known = list(classes) if classes is not None else _sorted_names(set(names))
    if task == "binary" and len(known) != 2:
        single = ": the labels are single-class" if len(known) < 2 else ""
        raise ValueError(f"a binary task needs exactly 2 classes, found {len(known)}{single}")
    index = {c: k for k, c in enumerate(known)}
    unknown_rows = [i for i, s in enumerate(names) if s not in index]
    if unknown_rows:
        raise ValueError(f"row {unknown_rows[0]}: label not among the {len(known)} known classes")
    targets = np.array([index[s] for s in names], dtype=np.int64)
    if whole_split and np.unique(targets).size < 2:
        raise ValueError(f"{task} labels are single-class: AUROC and training need at least 2 classes")
    return targets, known


def subsample_labels(y: np.ndarray, fraction: float, seed: int, task: Task) -> np.ndarray:
    """Sorted row indices of a stratified ``fraction`` of the training labels (label-efficiency runs).

    binary/multiclass: round(fraction * n_c) rows of each class c, at least one. multilabel: at least one
    positive and one negative row for every label that has both, then random rows up to round(fraction * N).
    """
    if not 0 < fraction <= 1:
        raise ValueError("fraction must be in (0, 1]")
    y = np.asarray(y)
    n = y.shape[0]
    if n == 0:
        raise ValueError("no labels to subsample")
    if fraction == 1:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    if task in ("binary", "multiclass"):
        picked = [
            rng.choice(rows, size=max(1, round(fraction * rows.size)), replace=False)
            for rows in (np.flatnonzero(y == c) for c in np.unique(y))
        ]
        return np.sort(np.concatenate(picked))
    if task != "multilabel":
        raise ValueError(f"task must be one of {', '.join(TASKS)}, not {task!r}")
    chosen = np.zeros(n, dtype=bool)
    for column in y.T.astype(bool):
        for rows in (np.flatnonzero(column), np.flatnonzero(~column)):
            if rows.size and rows.size < n and not chosen[rows].any():
                chosen[rng.choice(rows)] = True
    rest = np.flatnonzero(~chosen)
    extra = max(0, round(fraction * n) - int(chosen.sum()))
    chosen[rng.choice(rest, size=min(extra, rest.size), replace=False)] = True
    return np.flatnonzero(chosen)


# --------------------------------------------------------------------------------------------- training


def _n_outputs(task: Task, train_y: np.ndarray, val_y: np.ndarray, n_classes: int | None) -> int:
    if task == "binary":
        return 2
    if task == "multilabel":
        if train_y.ndim != 2 or val_y.ndim != 2 or train_y.shape[1] != val_y.shape[1]:
            raise ValueError(f"multilabel targets must be (N, L) with equal L, got {train_y.shape}, {val_y.shape}")
        return train_y.shape[1]
    largest = int(max(train_y.max(), val_y.max()))
    k = n_classes if n_classes is not None else largest + 1
    if k < 2 or largest >= k or min(train_y.min(), val_y.min()) < 0:
        raise ValueError(f"multiclass targets must be class indices in [0, {k}) with at least 2 classes")
    return k


def _loss(task: Task) -> nn.Module:
    return nn.BCEWithLogitsLoss() if task == "multilabel" else nn.CrossEntropyLoss()


def _probabilities(logits: torch.Tensor, task: Task) -> np.ndarray:
    if task == "multilabel":
        return torch.sigmoid(logits).numpy()
    probs = torch.softmax(logits, dim=1).numpy()
    return probs[:, 1] if task == "binary" else probs


def _targets(y: np.ndarray, task: Task) -> torch.Tensor:
    if task == "multilabel":
        return torch.tensor(np.asarray(y, dtype=np.float32))
    return torch.tensor(np.asarray(y, dtype=np.int64))


def _training_tensors(
    train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, task: Task
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """Checked float32 copies of the features (arrays from Ray's object store are read-only, which torch tensors
    cannot share) and the labels as arrays."""
    xt = torch.tensor(np.asarray(train_x, dtype=np.float32))
    xv = torch.tensor(np.asarray(val_x, dtype=np.float32))
    train_y, val_y = np.asarray(train_y), np.asarray(val_y)
    if xt.ndim != 2 or xv.ndim != 2 or xt.shape[1] != xv.shape[1]:
        raise ValueError(f"features must be (N, D) with equal D, got {tuple(xt.shape)}, {tuple(xv.shape)}")
    if xt.shape[0] != train_y.shape[0] or xv.shape[0] != val_y.shape[0]:
        raise ValueError("features and labels differ in their number of rows")
    if xt.shape[0] == 0 or xv.shape[0] == 0:
        raise ValueError("empty training or validation set")
    if not (torch.isfinite(xt).all() and torch.isfinite(xv).all()):
        raise ValueError("features contain NaN or infinite values")
    if task != "multilabel" and np.unique(train_y).size < 2:
        raise ValueError("the training labels are single-class")
    return xt, xv, train_y, val_y


def rung_epochs(grace_period: int, reduction_factor: int, last_epoch: int) -> frozenset[int]:
    """Successive halving's rungs: grace_period x reduction_factor^k, below ``last_epoch`` (ASHA's milestones)."""
    rungs, epoch = set(), grace_period
    while epoch < last_epoch:
        rungs.add(epoch)
        epoch *= reduction_factor
    return frozenset(rungs)


def fit_probes(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    task: Task,
    cfgs: Sequence[ProbeTrainConfig],
    report: Report | None = None,
    *,
    n_classes: int | None = None,
    halving: tuple[int, int] | None = None,
) -> list[tuple[Probe, list[dict[str, float]]]]:
    """Train one probe per config together, on the same minibatches; return each at its best validation AUROC
    with its per-epoch history.

    One step serves all the heads (a summed loss, one backward, one AdamW with a parameter group per head), so
    the per-step overhead is paid once; on CPU the heads' matmuls still dominate, and what makes a sweep of many
    heads cheap is ``halving``, which stops the weak ones early. Each head
    keeps its own init (its ``seed``), lr, weight decay and number of epochs; they share the batch size and the
    shuffling (the first config's seed). A head whose loss turns non-finite stops there (its best epoch so far
    stands); FloatingPointError only when every head diverges. ``halving=(grace_period, reduction_factor)``
    applies ASHA's rule to the heads themselves: at each rung (``rung_epochs``) only the best 1/reduction_factor
    of the heads still training (by their best val AUROC so far) go on, the others stop with their best epoch.

    ``report(epoch, metrics)`` runs after every epoch with the metrics of that epoch's best head
    ({"val_auroc", "val_loss", "train_loss", "head": its index in ``cfgs``}), for Ray Tune and ASHA. History
    rows are {"epoch", "train_loss", "val_loss", "val_auroc"}; each returned probe holds the weights of its
    epoch with the highest val AUROC (the earliest on ties), in eval mode. Same inputs and seeds, same probes;
    the caller's torch RNG state is left as it was. ``n_classes`` (multiclass) defaults to the largest index + 1.
    """
    if not cfgs:
        raise ValueError("no probe configs")
    if len({c.batch_size for c in cfgs}) > 1:
        raise ValueError("probes trained together share one batch_size")
    xt, xv, train_y, val_y = _training_tensors(train_x, train_y, val_x, val_y, task)
    n_out = _n_outputs(task, train_y, val_y, n_classes)
    yt, yv = _targets(train_y, task), _targets(val_y, task)
    loss_fn = _loss(task)
    histories: list[list[dict[str, float]]] = [[] for _ in cfgs]
    with torch.random.fork_rng(devices=[]):
        models = []
        for cfg in cfgs:
            torch.manual_seed(cfg.seed)  # this head's init; dropout draws from the stream after the last one
            models.append(build_probe(xt.shape[1], n_out, task, cfg))
            models[-1].fit_standardization(xt)
        pairs = zip(models, cfgs, strict=True)
        optimizer = torch.optim.AdamW(
            [{"params": m.parameters(), "lr": c.lr, "weight_decay": c.weight_decay} for m, c in pairs]
        )
        shuffle = torch.Generator().manual_seed(cfgs[0].seed)
        best = [(-math.inf, copy.deepcopy(m.state_dict())) for m in models]
        training = set(range(len(cfgs)))
        diverged: set[int] = set()
        last_epoch = max(c.epochs for c in cfgs)
        rungs = rung_epochs(*halving, last_epoch) if halving else frozenset()
        for epoch in range(1, last_epoch + 1):
            active = sorted(j for j in training if epoch <= cfgs[j].epochs)
            if not active:
                break
            totals = dict.fromkeys(active, 0.0)
            for j in active:
                models[j].train()
            for batch in torch.randperm(xt.shape[0], generator=shuffle).split(cfgs[0].batch_size):
                optimizer.zero_grad(set_to_none=True)  # heads left out keep no grad: AdamW skips them
                losses = torch.stack([loss_fn(models[j](xt[batch]), yt[batch]) for j in active])
                losses.sum().backward()
                optimizer.step()
                for j, loss in zip(active, losses.tolist(), strict=True):
                    totals[j] += loss * batch.numel()
            epoch_metrics = {}
            for j in active:
                models[j].eval()
                with torch.no_grad():
                    logits = models[j](xv)
                    val_loss = loss_fn(logits, yv).item()
                if not (math.isfinite(totals[j]) and math.isfinite(val_loss)):
                    training.discard(j)
                    diverged.add(j)
                    continue
                val_auroc = auroc(val_y, _probabilities(logits, task), task)
                epoch_metrics[j] = {"train_loss": totals[j] / xt.shape[0], "val_loss": val_loss, "val_auroc": val_auroc}
                histories[j].append({"epoch": epoch, **epoch_metrics[j]})
                if val_auroc > best[j][0]:
                    best[j] = (val_auroc, copy.deepcopy(models[j].state_dict()))
            if len(diverged) == len(cfgs):
                raise FloatingPointError(f"probe training diverged (non-finite loss) in epoch {epoch}; lower lr")
            if epoch in rungs:
                alive = sorted((j for j in active if j in training), key=lambda j: best[j][0], reverse=True)
                training -= set(alive[math.ceil(len(alive) / halving[1]) :])  # type: ignore[index]
            if report is not None and epoch_metrics:
                top = max(epoch_metrics, key=lambda j: epoch_metrics[j]["val_auroc"])
                report(epoch, {**epoch_metrics[top], "head": top})
    for model, (_, state) in zip(models, best, strict=True):
        model.load_state_dict(state)
        model.eval()
    return list(zip(models, histories, strict=True))


def fit_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    task: Task,
    cfg: ProbeTrainConfig,
    report: Report | None = None,
    *,
    n_classes: int | None = None,
) -> tuple[Probe, list[dict[str, float]]]:
    """One probe trained alone with AdamW on CPU: ``fit_probes`` with one config (see there)."""
    (fitted,) = fit_probes(train_x, train_y, val_x, val_y, task, [cfg], report, n_classes=n_classes)
    return fitted


def predict_scores(model: Probe, x: np.ndarray) -> np.ndarray:
    """Probabilities for ``metrics.auroc``: binary (N,) of classes[1], multiclass (N, K), multilabel (N, L)."""
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor(np.asarray(x, dtype=np.float32)))
    return _probabilities(logits, model.task)


__all__ = [
    "LinearProbe",
    "MLPProbe",
    "Probe",
    "Report",
    "build_probe",
    "encode_labels",
    "fit_probe",
    "fit_probes",
    "predict_scores",
    "rung_epochs",
    "subsample_labels",
]
