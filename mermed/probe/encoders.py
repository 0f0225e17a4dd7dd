"""Frozen encoders to probe: the exported MerMED encoder and its baselines (random weights, local timm weights)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ingest import storage
from mermed.models import ENCODER_JSON, EncoderInfo, build_backbone, check_state_dict, embed_dim_of, load_encoder
from mermed.probe.tasks import ProbeError

log = logging.getLogger("mermed.probe")


@dataclass(frozen=True)
class Encoder:
    """A frozen encoder to probe: ``tag`` is its name in the tables (pretrained, random, or a timm name)."""

    tag: str
    model_name: str
    img_size: int
    embed_dim: int
    fingerprint: str  # sha256 of the architecture, input size, every weight and the normalisation
    weights: dict[str, torch.Tensor] = field(repr=False, compare=False)
    # Per-modality pixel statistics (EncoderInfo.normalization); baselines get the pretrained encoder's, so
    # that both sides of a comparison see the same inputs.
    normalization: dict[str, dict[str, list[float]]] = field(default_factory=dict, compare=False)


def _fingerprint(model_name: str, img_size: int, state: dict[str, torch.Tensor], normalization: dict) -> str:
    h = hashlib.sha256(f"{model_name}:{img_size}:{json.dumps(normalization, sort_keys=True)}".encode())
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _encoder(
    tag: str, model_name: str, img_size: int, model: torch.nn.Module, normalization: dict | None = None
) -> Encoder:
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    norm = normalization or {}
    fingerprint = _fingerprint(model_name, img_size, state, norm)
    return Encoder(tag, model_name, img_size, embed_dim_of(model), fingerprint, state, norm)


def random_encoder(model_name: str, img_size: int, seed: int, normalization: dict | None = None) -> Encoder:
    """The same architecture with random weights (timm's initialisation under ``seed``): the floor to beat."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _encoder("random", model_name, img_size, build_backbone(model_name, img_size), normalization)


def timm_encoder(model_name: str, path: str | Path, img_size: int, normalization: dict | None = None) -> Encoder:
    """A timm model with a local state dict (safetensors, or a torch file read with ``weights_only``).

    The classifier's weights are dropped and timm's own checkpoint filter adapts the position embedding to
    ``img_size``, so timm's published weights load as they are; anything else must match exactly.
    """
    import timm.models

    path = Path(path)
    if not path.is_file():
        raise ProbeError(f"baseline {model_name}: weights file {path.name} not found")
    try:
        model = build_backbone(model_name, img_size)
    except ValueError as err:
        raise ProbeError(f"baseline {model_name}: {err}") from None
    try:
        state = timm.models.load_state_dict(str(path), weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch, pickle and safetensors each raise their own
        raise ProbeError(f"baseline {model_name}: cannot read {path.name} as a state dict ({err})") from None
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except (KeyError, RuntimeError, ValueError) as err:
            raise ProbeError(f"baseline {model_name}: weights do not fit the architecture ({err})") from None
    classifier = model.pretrained_cfg.get("classifier") or ()
    own = model.state_dict().keys()
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    state = {k: v for k, v in state.items() if k in own or not k.startswith(tuple(f"{c}." for c in heads))}
    try:
        check_state_dict(model, {k: v.shape for k, v in state.items()}, f"baseline {model_name}")
    except ValueError as err:
        raise ProbeError(str(err)) from None
    model.load_state_dict(state, strict=True)
    return _encoder(model_name, model_name, img_size, model, normalization)


def _load_exported(encoder: str | Path) -> tuple[torch.nn.Module, EncoderInfo]:
    """``load_encoder`` for a local path or an s3:// URI (copied with its encoder.json into a temporary folder)."""
    if not storage.is_remote(str(encoder)):
        return load_encoder(encoder)
    fs, path = storage.filesystem(str(encoder))
    with tempfile.TemporaryDirectory() as tmp:
        for remote in (path, posixpath.join(posixpath.dirname(path), ENCODER_JSON)):
            if not fs.exists(remote):
                raise FileNotFoundError(f"{posixpath.basename(remote)} not found beside the encoder")
            fs.get(remote, os.path.join(tmp, posixpath.basename(remote)))
        return load_encoder(os.path.join(tmp, posixpath.basename(path)))


def load_encoders(encoder: str | Path, baselines: Sequence[str], baseline_seed: int = 0) -> list[Encoder]:
    """The exported encoder (tag ``pretrained``; local or s3://) and the baselines: ``random`` or
    ``TIMM_NAME=PATH`` (a local file)."""
    try:
        model, info = _load_exported(encoder)
    except (ValueError, FileNotFoundError) as err:
        raise ProbeError(f"--encoder: {err}") from None
    norm = info.normalization
    encoders = [_encoder("pretrained", info.model_name, info.img_size, model, norm)]
    for spec in baselines:
        if spec == "random":
            encoders.append(random_encoder(info.model_name, info.img_size, baseline_seed, norm))
            continue
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ProbeError(f"--baseline {spec!r}: expected 'random' or TIMM_NAME=PATH (a local weights file)")
        encoders.append(timm_encoder(name, path, info.img_size, norm))
    tags = [e.tag for e in encoders]
    repeated = sorted({t for t in tags if tags.count(t) > 1})
    if repeated:
        raise ProbeError(f"encoders repeat: {', '.join(repeated)}")
    return encoders
