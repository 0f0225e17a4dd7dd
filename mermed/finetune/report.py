"""Fine-tuning results: one ``Run`` per (task, encoder, fraction, seed), the summary over seeds with patient
CIs, paired comparisons between encoders, reliability diagrams and attention maps."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mermed.metrics import METRICS, classification_metrics, metric_bootstrap_ci, paired_comparison, reliability_bins

SUMMARY_KEYS = ("task", "modality", "encoder", "fraction", "seeds", "test_set", "n_test")
SUMMARY_COLUMNS = (
    *SUMMARY_KEYS,
    *(f"{m}{suffix}" for m in METRICS for suffix in ("", "_std", "_lo", "_hi")),
)
RESULT_COLUMNS = (
    "task", "encoder", "fraction", "seed", "test_set", "n_train", "base_lr", "layer_decay", "best_epoch",
    "val_auroc", *METRICS,
)  # fmt: skip


@dataclass
class Run:
    """One fine-tuning run's scored evaluation set (its test split, or the task's external set)."""

    task: str
    kind: str
    modality: str
    encoder: str
    fraction: float
    seed: int
    test_set: str  # "test" or "external"
    n_train: int
    base_lr: float
    layer_decay: float
    best_epoch: int
    val_auroc: float
    target: np.ndarray = field(repr=False)
    scores: np.ndarray = field(repr=False)
    groups: np.ndarray = field(repr=False)
    keys: np.ndarray = field(repr=False)
    attributes: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # name -> value per row
    metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.metrics:
            self.metrics = classification_metrics(self.target, self.scores, self.kind)  # type: ignore[arg-type]

    def row(self) -> dict[str, Any]:
        values = {**self.metrics, **{k: getattr(self, k) for k in RESULT_COLUMNS if hasattr(self, k)}}
        return {c: values[c] for c in RESULT_COLUMNS}


def summarize(runs: Sequence[Run], n_boot: int) -> list[dict[str, Any]]:
    """One row per (task, encoder, fraction, test set): mean and std over the seeds, and the 95% patient
    bootstrap CI of the seeds' mean."""
    cells: dict[tuple, list[Run]] = {}
    for r in runs:
        cells.setdefault((r.task, r.encoder, r.fraction, r.test_set), []).append(r)
    rows = []
    for (task, encoder, fraction, test_set), group in sorted(cells.items()):
        first = group[0]
        if any(not np.array_equal(r.keys, first.keys) for r in group):
            raise RuntimeError(f"{task}/{encoder}: the seeds' runs scored different {test_set} rows")
        cis = metric_bootstrap_ci(first.target, [r.scores for r in group], first.kind, first.groups, n_boot=n_boot)
        row: dict[str, Any] = {
            "task": task, "modality": first.modality, "encoder": encoder, "fraction": fraction,
            "seeds": len(group), "test_set": test_set, "n_test": len(first.target),
        }  # fmt: skip
        for m in METRICS:
            values = [r.metrics[m] for r in group]
            row[m] = statistics.fmean(values)
            row[f"{m}_std"] = statistics.stdev(values) if len(values) > 1 else math.nan
            row[f"{m}_lo"], row[f"{m}_hi"] = cis[m]
        rows.append(row)
    return rows


SUBGROUP_COLUMNS = (
    "task", "encoder", "fraction", "seed", "test_set", "attribute", "value", "n", "auroc", "accuracy", "sensitivity",
    "specificity", "ece",
)  # fmt: skip


def subgroups(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Metrics per value of each attribute the runs carry (rows without the attribute left out); NaN where a
    subgroup has a single class (AUROC, sensitivity or specificity undefined)."""
    rows = []
    for r in runs:
        for name, values in r.attributes.items():
            for value in sorted(set(values.tolist()) - {""}):
                rows_of = values == value
                try:
                    m = classification_metrics(r.target[rows_of], r.scores[rows_of], r.kind)  # type: ignore[arg-type]
                except ValueError:  # one class only in this subgroup
                    m = {}
                rows.append(
                    {
                        "task": r.task,
                        "encoder": r.encoder,
                        "fraction": r.fraction,
                        "seed": r.seed,
                        "test_set": r.test_set,
                        "attribute": name,
                        "value": value,
                        "n": int(rows_of.sum()),
                        **{k: m.get(k, math.nan) for k in SUBGROUP_COLUMNS[8:]},
                    }  # fmt: skip
                )
    return rows


def subgroup_gaps(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (task, encoder, fraction, test set, attribute): the largest AUROC gap between its values, as the mean
    and std over seeds."""
    cells: dict[tuple, dict[int, list[dict]]] = {}
    for row in rows:
        key = (row["task"], row["encoder"], row["fraction"], row["test_set"], row["attribute"])
        cells.setdefault(key, {}).setdefault(row["seed"], []).append(row)
    out = []
    for key, seeds in sorted(cells.items()):
        gaps = []
        for values in seeds.values():
            scored = [v["auroc"] for v in values if not math.isnan(v["auroc"])]
            if len(scored) >= 2:
                gaps.append(max(scored) - min(scored))
        if gaps:
            out.append(
                {
                    **dict(zip(("task", "encoder", "fraction", "test_set", "attribute"), key, strict=True)),
                    "auroc_gap": statistics.fmean(gaps),
                    "auroc_gap_std": statistics.stdev(gaps) if len(gaps) > 1 else math.nan,
                    "seeds": len(gaps),
                }
            )
    return out


def comparisons(runs: Sequence[Run], reference: str = "pretrained") -> list[dict[str, Any]]:
    """``reference`` against every other encoder on matched (task, fraction, seed) test AUROCs: Wilcoxon's
    signed-rank test over all pairs."""
    by_key = {(r.task, r.fraction, r.seed, r.test_set, r.encoder): r.metrics["auroc"] for r in runs}
    out = []
    for other in sorted({r.encoder for r in runs} - {reference}):
        matched = [k[:4] for k in sorted(by_key) if k[4] == reference and (*k[:4], other) in by_key]
        pairs = [(by_key[(*k, reference)], by_key[(*k, other)]) for k in matched]
        if pairs:
            a, b = zip(*pairs, strict=True)
            out.append({"encoder": reference, "versus": other, **paired_comparison(a, b)})
    return out


def markdown(
    rows: Sequence[dict[str, Any]], compared: Sequence[dict[str, Any]], gaps: Sequence[dict[str, Any]] = ()
) -> str:
    def cell(r: dict, m: str) -> str:
        if math.isnan(r[m]):
            return "n/a"
        spread = "" if math.isnan(r[f"{m}_std"]) else f" ± {r[f'{m}_std']:.3f}"
        return f"{r[m]:.3f}{spread}"

    shown = ("auroc", "auprc", "accuracy", "balanced_accuracy", "f1", "brier", "ece")
    lines = [
        "| task | modality | encoder | labels | test set | seeds | " + " | ".join(shown) + " | AUROC 95% CI |",
        "| --- | --- | --- | ---: | --- | ---: | " + " | ".join("---" for _ in shown) + " | --- |",
    ]
    for r in rows:
        ci = "n/a" if math.isnan(r["auroc_lo"]) else f"{r['auroc_lo']:.3f}-{r['auroc_hi']:.3f}"
        lines.append(
            f"| {r['task']} | {r['modality']} | {r['encoder']} | {100 * r['fraction']:g}% | {r['test_set']} | "
            f"{r['seeds']} | " + " | ".join(cell(r, m) for m in shown) + f" | {ci} |"
        )
    text = "\n".join(lines) + (
        "\n\nMean ± std over the seeds (each seed draws its own label subset and trains its own model); the CI is a "
        "patient bootstrap of the seeds' mean. AUROC/AUPRC macro one-vs-rest; ECE top-1, 15 bins.\n"
    )
    for c in compared:
        text += (
            f"\n{c['encoder']} vs {c['versus']}: mean test-AUROC difference {c['mean_diff']:+.3f} over "
            f"{int(c['pairs'])} matched (task, labels, seed) runs, {int(c['wins'])} wins, Wilcoxon signed-rank "
            f"p = {c['p_value']:.3g}\n"
        )
    for g in gaps:
        spread = "" if math.isnan(g["auroc_gap_std"]) else f" ± {g['auroc_gap_std']:.3f}"
        text += (
            f"\n{g['task']} ({g['test_set']}) {g['encoder']} {100 * g['fraction']:g}% labels: largest AUROC gap "
            f"between {g['attribute']} groups {g['auroc_gap']:.3f}{spread} ({g['seeds']} seeds; subgroups.csv)\n"
        )
    return text


def plot_reliability(path: Path, run: Run) -> None:
    """The reliability diagram of one run: accuracy against confidence per bin, and the bins' row counts."""
    from matplotlib.figure import Figure

    conf, accuracy, count = reliability_bins(run.target, run.scores, run.kind)  # type: ignore[arg-type]
    fig = Figure(figsize=(4.5, 4.5), dpi=110)
    ax = fig.subplots()
    edges = np.linspace(0, 1, len(count) + 1)
    used = count > 0
    ax.bar(edges[:-1][used], accuracy[used], width=1 / len(count), align="edge", edgecolor="black", alpha=0.7)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set(
        xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
        title=f"{run.task} {run.encoder} {run.fraction:.0%} s{run.seed}: ECE {run.metrics['ece']:.3f}",
    )  # fmt: skip
    fig.tight_layout()
    fig.savefig(path)


def plot_attention(path: Path, title: str, pixels: np.ndarray, maps: np.ndarray) -> None:
    """Test images with the last block's CLS attention over them (nearest-upsampled to the image)."""
    from matplotlib.figure import Figure

    n = len(pixels)
    fig = Figure(figsize=(2.2 * n, 2.4), dpi=110)
    axes = np.atleast_1d(fig.subplots(1, n))
    for ax, image, attention in zip(axes, pixels, maps, strict=True):
        ax.imshow(image)
        ax.imshow(attention, cmap="inferno", alpha=0.5, extent=(0, image.shape[1], image.shape[0], 0))
        ax.set_axis_off()
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


__all__ = [
    "RESULT_COLUMNS",
    "SUBGROUP_COLUMNS",
    "SUMMARY_COLUMNS",
    "Run",
    "comparisons",
    "markdown",
    "plot_attention",
    "plot_reliability",
    "subgroup_gaps",
    "subgroups",
    "summarize",
]
