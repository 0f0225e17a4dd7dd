"""The networks: a timm ViT backbone, the projection head, the multi-crop wrapper, and encoder export/import.

The backbone is exported alone (safetensors + ``encoder.json``) because the probe stage and users need only the
frozen encoder, never the head or the teacher.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from timm.models import register_model
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

ENCODER_FORMAT = "mermed-encoder/1"
ENCODER_JSON = "encoder.json"


@register_model
def mermed_vit_tiny_patch8_depth6(pretrained: bool = False, **kwargs) -> nn.Module:
    """ViT-Tiny's width with 8 px patches and 6 blocks: enough tokens per small CPU-sized view (36 at 48 px, where
    16 px patches give 9) at half the depth, for configs/pretrain_cpu.yaml. Registered with timm, so it is a
    model name like any other (``import mermed.models`` first)."""
    from timm.models.vision_transformer import vit_tiny_patch16_224

    return vit_tiny_patch16_224(pretrained=pretrained, **{"patch_size": 8, "depth": 6, **kwargs})


def build_backbone(name: str, img_size: int, **kw) -> nn.Module:
    """A randomly initialised timm model that returns the pooled (CLS) feature of width ``embed_dim``.

    ``dynamic_img_size`` interpolates the position embedding, so one model serves both global and local crops.
    Fused attention (torch SDPA) is forced on even when ``TIMM_FUSED_ATTN`` turned it off, because the
    unfused path materialises every attention matrix.
    """
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, img_size=img_size, dynamic_img_size=True, **kw)
    except (RuntimeError, TypeError) as err:  # unknown name, or a family without dynamic_img_size
        raise ValueError(f"cannot build backbone {name!r} at img_size={img_size}: {err}") from None
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = True
    return model


def embed_dim_of(backbone: nn.Module) -> int:
    return int(getattr(backbone, "embed_dim", None) or backbone.num_features)


class ProjectionHead(nn.Module):
    """MLP (``hidden`` wide, optional BatchNorm, GELU) -> L2-normalised ``bottleneck`` embedding.

    That embedding is what the MerMED objective compares with its memory. With ``prototypes`` > 0 a
    weight-normalised layer of that many prototypes follows (DINO's head, ``norm_last_layer=True``), for the
    ``dino`` ablation. Returns (prototype logits or None, embedding).
    """

    def __init__(
        self,
        in_dim: int,
        bottleneck: int = 256,
        hidden: int = 2048,
        n_layers: int = 3,
        batch_norm: bool = False,
        prototypes: int = 0,
    ):
        super().__init__()
        dims = [in_dim] + [hidden] * (n_layers - 1) + [bottleneck]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            layers.append(nn.Linear(a, b))
            if i < n_layers - 1:
                layers += [nn.BatchNorm1d(b), nn.GELU()] if batch_norm else [nn.GELU()]
        self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer: nn.Module | None = None
        if prototypes:
            self.last_layer = weight_norm(nn.Linear(bottleneck, prototypes, bias=False))
            # The prototype norms stay at 1 (DINO freezes weight_g): only directions are learnt, which keeps
            # the logits bounded by 1 / temperature.
            g = self.last_layer.parametrizations.weight.original0
            with torch.no_grad():
                g.fill_(1.0)
            g.requires_grad_(False)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        emb = F.normalize(self.mlp(x), dim=-1)
        return (self.last_layer(emb) if self.last_layer is not None else None), emb


class MultiCropEncoder(nn.Module):
    """Backbone + head over a list of views; one backbone call per run of equal-resolution views (DINO's
    MultiCropWrapper), one head call for all. Outputs are concatenated in view order: rows ``v*B:(v+1)*B``
    belong to view ``v``."""

    def __init__(self, backbone: nn.Module, head: ProjectionHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, views: Sequence[torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor]:
        if not views:
            raise ValueError("MultiCropEncoder needs at least one view")
        feats = []
        start = 0
        while start < len(views):
            end = start + 1
            while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
                end += 1
            feats.append(self.backbone(torch.cat(list(views[start:end]))))
            start = end
        return self.head(torch.cat(feats))


# --------------------------------------------------------------------------------------------- export


@dataclass(frozen=True)
class EncoderInfo:
    model_name: str
    img_size: int
    embed_dim: int
    format: str = ENCODER_FORMAT
    # The pixel statistics the encoder was trained with, per modality ({"CT": {"mean": [...], "std": [...]}}):
    # downstream code normalises each image by its modality's, as pretraining did.
    normalization: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    mlflow_run_id: str | None = None  # the pretraining run that produced the weights, where one did

    def mean_std(self, modality: str) -> tuple[list[float], list[float]] | None:
        """The modality's (mean, std) in [0, 1] units, or None when the encoder never saw it."""
        entry = self.normalization.get(modality)
        return (entry["mean"], entry["std"]) if entry else None


def check_state_dict(module: nn.Module, shapes: Mapping[str, Sequence[int]], what: str) -> None:
    """Raise ValueError when ``shapes`` (name -> shape) is not exactly ``module``'s state dict.

    Checked before loading so that a checkpoint of another architecture fails with a readable message instead
    of a size-mismatch traceback, or, worse, a partial load.
    """
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    got = {k: tuple(v) for k, v in shapes.items()}
    missing = sorted(expected.keys() - got.keys())
    unexpected = sorted(got.keys() - expected.keys())
    mismatched = sorted(k for k in expected.keys() & got.keys() if expected[k] != got[k])
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                parts.append(f"{len(keys)} {label} keys (e.g. {', '.join(keys[:3])})")
        if mismatched:
            k = mismatched[0]
            parts.append(f"{len(mismatched)} keys with other shapes (e.g. {k}: {got[k]} vs {expected[k]})")
        raise ValueError(f"{what} does not match the architecture: {'; '.join(parts)}")


def export_encoder(
    backbone: nn.Module,
    path: str | Path,
    *,
    model_name: str,
    img_size: int,
    normalization: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
    mlflow_run_id: str | None = None,
) -> EncoderInfo:
    """Write the backbone's weights to ``path`` (safetensors) and its description to ``encoder.json`` beside it.

    The weights are timm's own state dict, so plain timm loads them too (README, "The encoder in your code")."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in backbone.state_dict().items()}
    norm = {m: {k: [float(x) for x in v] for k, v in s.items()} for m, s in (normalization or {}).items()}
    info = EncoderInfo(model_name, img_size, embed_dim_of(backbone), normalization=norm, mlflow_run_id=mlflow_run_id)
    save_file(tensors, str(path), metadata={"format": ENCODER_FORMAT, "model_name": model_name})
    (path.parent / ENCODER_JSON).write_text(json.dumps(asdict(info), indent=2) + "\n")
    return info


def load_encoder(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, EncoderInfo]:
    """Rebuild an exported backbone with timm and load its weights strictly; returns it in eval mode."""
    path = Path(path)
    meta_path = path.parent / ENCODER_JSON
    if not path.is_file():
        raise FileNotFoundError(f"encoder weights not found: {path.name}")
    if not meta_path.is_file():
        raise ValueError(f"{ENCODER_JSON} is missing beside {path.name}; was it written by export_encoder?")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != ENCODER_FORMAT:
        raise ValueError(f"unsupported encoder format {meta.get('format')!r} (expected {ENCODER_FORMAT})")
    info = EncoderInfo(**meta)
    model = build_backbone(info.model_name, info.img_size)
    if embed_dim_of(model) != info.embed_dim:
        raise ValueError(f"{info.model_name} has embed_dim {embed_dim_of(model)}, encoder.json says {info.embed_dim}")
    with safe_open(str(path), framework="pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    check_state_dict(model, shapes, f"encoder {path.name}")
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.to(device).eval(), info


__all__ = [
    "ENCODER_FORMAT",
    "EncoderInfo",
    "MultiCropEncoder",
    "ProjectionHead",
    "build_backbone",
    "check_state_dict",
    "embed_dim_of",
    "export_encoder",
    "load_encoder",
]
