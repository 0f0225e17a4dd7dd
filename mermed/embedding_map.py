"""After pretraining: how the teacher spreads the modalities (the paper's summary asks to check that balancing does).

For a sample of each modality's rows: the alignment and uniformity of its embeddings (Wang & Isola, 2020) on two
global views drawn by the run's own multi-crop (alignment: mean squared distance between the two views of an
image, lower is more invariant; uniformity: log mean exp(-2 d^2) over pairs of images, lower is more spread out
on the sphere), the same uniformity over all modalities together, and a 2-D map of the sample (PCA of the unit
embeddings) coloured by modality and, where rows carry labels, by label. PCA rather than UMAP: no extra
dependency, and a linear map whose distances mean the same everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads
import torch
import torch.nn.functional as F
from torch import nn

from ingest import storage
from ingest.schema import GRAYSCALE_MODALITIES
from mermed.augment import MultiCrop
from mermed.data import decode_letterbox, shard_uris
from mermed.normalize import Normalization, modality_mean_std


@dataclass
class EmbeddingSample:
    """Decoded rows of several modalities, as the training loop decodes them."""

    pixels: np.ndarray  # (N, S, S, 3) uint8, letterboxed
    valid: np.ndarray  # (N, 4) boxes
    modality: np.ndarray  # (N,) str
    label: np.ndarray  # (N,) object: the row's label, or None


def sample_rows(
    data: Sequence[str], modalities: Sequence[str], per_modality: int, splits: Sequence[str], size: int, seed: int
) -> EmbeddingSample:
    """Up to ``per_modality`` rows of each modality, drawn at random (seeded) from the first ``4 x per_modality``
    rows of its shards in ``splits`` (reading a whole modality's images for a picture would cost a pass)."""
    rng = np.random.default_rng(seed)
    pixels, valid, modality, label = [], [], [], []
    for m in modalities:
        uris = shard_uris(data, m)
        fs, _ = storage.filesystem(uris[0])
        dataset = pads.dataset(
            [storage.filesystem(u)[1] for u in uris], filesystem=storage.arrow_filesystem(fs), format="parquet"
        )
        rows: list[dict] = []
        wanted = pc.field("split").isin(list(splits))
        for batch in dataset.to_batches(columns=["image", "label"], filter=wanted, batch_size=256):
            rows += batch.to_pylist()
            if len(rows) >= 4 * per_modality:
                break
        for i in sorted(rng.choice(len(rows), min(per_modality, len(rows)), replace=False)):
            p, v = decode_letterbox(rows[i]["image"], size)
            pixels.append(p)
            valid.append(v)
            modality.append(m)
            label.append(rows[i]["label"] or None)
    return EmbeddingSample(
        np.stack(pixels), np.stack(valid), np.asarray(modality, dtype=str), np.asarray(label, dtype=object)
    )


def _embed(backbone: nn.Module, views: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat(
            [F.normalize(backbone(views[i : i + batch_size]).float(), dim=1) for i in range(0, len(views), batch_size)]
        )


def _uniformity(z: torch.Tensor) -> float:
    if len(z) < 2:
        return float("nan")
    d2 = torch.pdist(z.double()).pow(2)
    return float(torch.log(torch.exp(-2 * d2).mean()))


def embedding_report(
    backbone: nn.Module,
    sample: EmbeddingSample,
    crops: MultiCrop,
    normalization: Normalization,
    picture: Path,
    seed: int = 0,
) -> dict[str, float]:
    """The metrics (``alignment/<M>``, ``uniformity/<M>``, ``uniformity/all``) of the sample's embeddings, and
    their map written to ``picture`` (PNG)."""
    backbone = backbone.eval()
    device = next(backbone.parameters()).device
    images = torch.from_numpy(sample.pixels).permute(0, 3, 1, 2).to(device)
    grayscale = torch.from_numpy(np.isin(sample.modality, list(GRAYSCALE_MODALITIES))).to(device)
    mean, std = modality_mean_std(normalization, list(sample.modality), device)
    generator = torch.Generator(device).manual_seed(seed)
    views = crops(images, grayscale, generator, valid=torch.from_numpy(sample.valid), mean=mean, std=std)
    a, b = _embed(backbone, views[0]), _embed(backbone, views[1])
    metrics: dict[str, float] = {}
    for m in sorted(set(sample.modality)):
        rows = torch.from_numpy(sample.modality == m).to(device)
        metrics[f"alignment/{m}"] = float((a[rows] - b[rows]).pow(2).sum(dim=1).mean())
        metrics[f"uniformity/{m}"] = _uniformity(a[rows])
    metrics["uniformity/all"] = _uniformity(a)
    _plot(picture, a.cpu().numpy(), sample)
    return metrics


def _plot(path: Path, z: np.ndarray, sample: EmbeddingSample) -> None:
    from matplotlib.figure import Figure

    centred = z - z.mean(axis=0)
    _, _, axes = np.linalg.svd(centred, full_matrices=False)
    xy = centred @ axes[:2].T
    labelled = np.array([v is not None for v in sample.label])
    fig = Figure(figsize=(11 if labelled.any() else 5.5, 5), dpi=110)
    panels = fig.subplots(1, 2 if labelled.any() else 1, squeeze=False)[0]
    colours = {m: f"C{i % 10}" for i, m in enumerate(sorted(set(sample.modality)))}  # the same in both panels
    for m, colour in colours.items():
        rows = sample.modality == m
        panels[0].scatter(xy[rows, 0], xy[rows, 1], s=6, alpha=0.7, color=colour, label=m)
    panels[0].set(title="teacher embeddings by modality (PCA)", xlabel="PC 1", ylabel="PC 2")
    panels[0].legend(fontsize=7, markerscale=2)
    if labelled.any():
        for m in sorted(set(sample.modality[labelled])):
            values = sorted({str(v) for v in sample.label[labelled & (sample.modality == m)]})
            for value, marker in zip(values, "o^sxD*+v<>", strict=False):  # a marker per label, a colour per modality
                rows = labelled & (sample.modality == m) & (sample.label.astype(str) == value)
                panels[1].scatter(
                    xy[rows, 0], xy[rows, 1], s=9, alpha=0.7, color=colours[m], marker=marker, label=f"{m}: {value}"
                )
        panels[1].set(title="by label, where rows have one", xlabel="PC 1", ylabel="PC 2")
        panels[1].legend(fontsize=6, markerscale=2, ncol=2)
    fig.tight_layout()
    fig.savefig(path)


__all__ = ["EmbeddingSample", "embedding_report", "sample_rows"]
