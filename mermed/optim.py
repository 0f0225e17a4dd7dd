"""AdamW parameter groups with layer-wise learning-rate decay (BEiT/MAE's ``param_groups_lrd``, as MerMED uses).

Continual pretraining from published weights keeps the early layers close to what they learnt: layer ``d`` of a
ViT with ``L`` blocks trains at ``lr * layer_decay ** (L + 1 - d)``, where the patch embedding and the prefix
tokens are layer 0, ``blocks.b`` is layer ``b + 1`` and everything above (final norm, projection head) is ``L + 1``.
The optimizer cannot apply the scales itself: the training step sets ``group["lr"] = lr * group["lr_scale"]`` and
the scheduled weight decay on the groups whose ``apply_weight_decay`` is true.
"""

from __future__ import annotations

from typing import Any

from torch import nn

# ViT parameters that are embeddings, not weight matrices: decaying them towards zero only hurts.
NO_DECAY_NAMES = frozenset({"cls_token", "reg_token", "dist_token", "pos_embed", "mask_token"})


def _backbone_name(model: nn.Module, name: str) -> str | None:
    """``name`` relative to the backbone, or None for a parameter outside it (the wrapper's head)."""
    if not hasattr(model, "backbone"):
        return name
    return name.removeprefix("backbone.") if name.startswith("backbone.") else None


def layer_id(name: str | None, depth: int) -> int:
    """The depth of a backbone parameter (None: outside the backbone) in a ViT of ``depth`` blocks."""
    if name is None:
        return depth + 1
    if name.startswith("blocks."):
        return int(name.split(".", 2)[1]) + 1
    if name.startswith("patch_embed.") or name in NO_DECAY_NAMES:
        return 0
    return depth + 1


def param_groups(model: nn.Module, layer_decay: float = 1.0) -> list[dict[str, Any]]:
    """AdamW groups of ``model`` (a bare timm ViT, or a wrapper with ``.backbone`` and ``.head``).

    Weight decay applies to weight matrices only: never to biases, norm scales or other 1-d parameters, nor to the
    position embedding and prefix tokens. Each group carries ``lr_scale`` and ``apply_weight_decay``; groups that
    do not decay also carry ``weight_decay=0.0``. With ``layer_decay == 1`` every scale is 1 and the groups
    collapse to two, ``decay`` then ``no_decay``; otherwise they are ``layer{d}_decay`` / ``layer{d}_no_decay``,
    bottom layer first, so that the order (which checkpoints rely on) depends only on the architecture.
    """
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    backbone = getattr(model, "backbone", model)
    blocks = getattr(backbone, "blocks", None)
    if layer_decay != 1.0 and blocks is None:
        raise ValueError(f"layer-wise lr decay needs a ViT with .blocks; {type(backbone).__name__} has none")
    depth = len(blocks) if blocks is not None else 0

    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        inner = _backbone_name(model, name)
        leaf = name.rsplit(".", 1)[-1]
        decays = p.ndim > 1 and not name.endswith(".bias") and leaf not in NO_DECAY_NAMES
        layer = layer_id(inner, depth) if layer_decay != 1.0 else depth + 1
        if (layer, decays) not in groups:
            tag = "decay" if decays else "no_decay"
            group: dict[str, Any] = {
                "params": [],
                "name": tag if layer_decay == 1.0 else f"layer{layer}_{tag}",
                "lr_scale": layer_decay ** (depth + 1 - layer),
                "apply_weight_decay": decays,
            }
            if not decays:
                group["weight_decay"] = 0.0
            groups[(layer, decays)] = group
        groups[(layer, decays)]["params"].append(p)
    return [groups[k] for k in sorted(groups, key=lambda k: (k[0], not k[1]))]


__all__ = ["NO_DECAY_NAMES", "layer_id", "param_groups"]
