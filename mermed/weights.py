"""Continual pretraining from given weights: load a DINO, MAE or timm ViT checkpoint, or a MerMED exported encoder,
into a timm backbone.

Files are read without executing anything: safetensors, or ``torch.load(weights_only=True)``, which refuses any
pickled object other than tensors and plain containers. Everything that does not fit the backbone is either a
known head (dropped, and reported) or an error that names the keys, so that a checkpoint of another architecture
never loads partially.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed
from torch import nn

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# Checkpoint dicts that hold the weights one level down; DINO's teacher is the model its authors evaluate.
WRAPPER_KEYS = ("teacher", "student", "model", "state_dict")
# Keys of projection/classifier heads and of pretraining-only parts (MAE's decoder, iBOT's mask token).
_HEAD_NAMES = ("head", "head_dist", "fc_norm", "pre_logits", "attn_pool", "mask_token", "last_layer")
_HEAD_PREFIXES = ("decoder",)
_SHOWN = 8


@dataclass(frozen=True)
class LoadReport:
    """What ``load_backbone_weights`` did; pos_embed grids are (rows, cols) of patches, None when not resampled."""

    loaded: int
    dropped: tuple[str, ...] = ()
    pos_embed_from: tuple[int, int] | None = None
    pos_embed_to: tuple[int, int] | None = None


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > _SHOWN else shown


def _unpickle_reason(err: BaseException) -> str:
    """The line of torch's long weights_only message that says what was refused (e.g. the class it met)."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(err).__name__)
    return line.split(" Please use", 1)[0]


def read_state_dict(path: str | Path, key: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file as a flat ``name -> tensor`` dict on CPU.

    Wrapper dicts (``teacher``, ``student``, ``model``, ``state_dict``, in that preference, or ``key`` when given)
    are unwrapped and DDP's ``module.`` prefix is stripped, so DINO's, MAE's and timm's published layouts all come
    out as plain module names. Raises ValueError on a file that is not a state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            obj: object = load_file(str(path))
        except SafetensorError as err:
            raise ValueError(f"{path.name} is not a readable safetensors file: {err}") from None
    elif path.suffix in TORCH_SUFFIXES:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
            raise ValueError(
                f"{path.name} cannot be loaded with weights_only=True, which unpickles tensors and plain containers "
                f"only: {_unpickle_reason(err)}"
            ) from None
    else:
        raise ValueError(
            f"unsupported checkpoint type {path.suffix!r}: use .safetensors or {', '.join(TORCH_SUFFIXES)}"
        )

    trail = []
    if key is not None:
        if not (isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping)):
            top = _names(sorted(map(str, obj))) if isinstance(obj, Mapping) else type(obj).__name__
            raise ValueError(f"{path.name} has no {key!r} dict to load (it holds {top})")
        obj, trail = obj[key], [key]
    while isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = obj[inner]
        trail.append(inner)
    where = "".join(f"[{k!r}]" for k in trail)
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{path.name}{where} is not a state dict (a {type(obj).__name__}, expected name -> tensor)")
    others = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor) or not isinstance(k, str))
    if others:
        raise ValueError(f"{path.name}{where} is not a state dict: {_names(others)} are not named tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _is_head(name: str) -> bool:
    first = name.split(".", 1)[0]
    return first in _HEAD_NAMES or first.startswith(_HEAD_PREFIXES)


def load_backbone_weights(backbone: nn.Module, path: str | Path, key: str | None = None) -> LoadReport:
    """Load a checkpoint's backbone weights into a timm ViT, in place, all or nothing.

    A ``backbone.`` prefix (DINO's MultiCropWrapper, MerMED's MultiCropEncoder) is stripped; head keys the backbone
    lacks are dropped; ``pos_embed`` is resampled with timm to the backbone's patch grid. Missing weights,
    unexpected non-head weights and other shape mismatches raise ValueError naming the keys.
    """
    raw = read_state_dict(path, key)
    outer: list[str] = []
    if any(k.startswith("backbone.") for k in raw):
        # A wrapper's checkpoint: whatever sits beside its backbone (the projection head) is not ours to load.
        outer = [k for k in raw if not k.startswith("backbone.")]
        raw = {k.removeprefix("backbone."): v for k, v in raw.items() if k.startswith("backbone.")}
    expected = backbone.state_dict()
    dropped = sorted(outer + [k for k in raw.keys() - expected.keys() if _is_head(k)])
    unexpected = sorted(raw.keys() - expected.keys() - set(dropped))
    missing = sorted(expected.keys() - raw.keys())
    state = {k: v for k, v in raw.items() if k in expected}

    grids: tuple[tuple[int, int], tuple[int, int]] | None = None
    theirs, ours = state.get("pos_embed"), expected.get("pos_embed")
    if theirs is not None and ours is not None and theirs.ndim == ours.ndim == 3 and theirs.shape != ours.shape:
        # timm's own rule: prefix tokens have positions unless the model adds them after the embedding.
        prefix = 0 if getattr(backbone, "no_embed_class", False) else int(getattr(backbone, "num_prefix_tokens", 1))
        patches = theirs.shape[1] - prefix
        side = math.isqrt(max(patches, 0))
        if patches > 0 and side * side == patches and theirs.shape[-1] == ours.shape[-1]:
            rows, cols = (int(n) for n in backbone.patch_embed.grid_size)
            state["pos_embed"] = resample_abs_pos_embed(theirs, [rows, cols], [side, side], num_prefix_tokens=prefix)
            grids = ((side, side), (rows, cols))

    mismatched = sorted(k for k, v in state.items() if v.shape != expected[k].shape)
    problems = []
    if missing:
        problems.append(f"missing backbone weights: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected weights (not in the backbone, not a head): {_names(unexpected)}")
    if mismatched:
        shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in mismatched]
        problems.append(f"shape mismatch (checkpoint vs backbone): {_names(shapes)}")
    if problems:
        raise ValueError(f"{Path(path).name} does not fit the backbone: " + "; ".join(problems))

    backbone.load_state_dict(state, strict=True)
    return LoadReport(
        loaded=len(state),
        dropped=tuple(dropped),
        pos_embed_from=grids[0] if grids else None,
        pos_embed_to=grids[1] if grids else None,
    )


__all__ = ["LoadReport", "load_backbone_weights", "read_state_dict"]
