"""Per-modality pixel normalisation: every image is normalised by its modality's channel mean and std.

The statistics are measured exactly by ingest (``ingest.schema.modality_normalization`` over the manifests),
used by pretraining, recorded in the exported ``encoder.json`` and applied again by probes and the monitor, so
that downstream inputs look like the ones the encoder learnt from. A modality without statistics falls back to
ImageNet's, with a warning naming it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

log = logging.getLogger("mermed.normalize")

Normalization = Mapping[str, Mapping[str, Sequence[float]]]
_warned: set[str] = set()


def modality_mean_std(
    normalization: Normalization, modalities: Sequence[str], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3) mean and std in [0, 1] units for rows of the given modalities."""
    means, stds = [], []
    for modality in modalities:
        entry = normalization.get(modality)
        if entry is None:
            if modality not in _warned:
                _warned.add(modality)
                log.warning("no pixel statistics for modality %s: normalising it with ImageNet's", modality)
            means.append(IMAGENET_DEFAULT_MEAN)
            stds.append(IMAGENET_DEFAULT_STD)
        else:
            means.append(tuple(entry["mean"]))
            stds.append(tuple(entry["std"]))
    shape = (len(modalities), 3)
    mean = torch.tensor(means, dtype=torch.float32).reshape(shape)
    std = torch.tensor(stds, dtype=torch.float32).reshape(shape)
    return mean.to(device), std.to(device)


__all__ = ["Normalization", "modality_mean_std"]
