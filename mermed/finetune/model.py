"""The fine-tuned classifier: the encoder's timm ViT with its weights, average pooling of the patch tokens, and a
new linear head (the authors' ``global_pool=avg``); and the last block's CLS attention for qualitative checks."""

from __future__ import annotations

import torch
from torch import nn

from mermed.models import build_backbone


def build_classifier(
    model_name: str, img_size: int, weights: dict[str, torch.Tensor], n_outputs: int, drop_path: float
) -> nn.Module:
    """The ViT with ``weights`` (an exported teacher, or a baseline's), pooled by the mean of its patch tokens
    after the pretrained final norm, with a freshly initialised ``n_outputs`` head (zero bias, small weights, as
    MAE's fine-tuning)."""
    model = build_backbone(model_name, img_size, drop_path_rate=drop_path)
    model.load_state_dict(weights, strict=True)
    model.reset_classifier(n_outputs, global_pool="avg")
    nn.init.trunc_normal_(model.head.weight, std=2e-5)
    nn.init.zeros_(model.head.bias)
    return model


@torch.no_grad()
def cls_attention(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, rows, cols) attention of the CLS token over the patch tokens in the last block, mean over heads.

    Computed from the block's own qkv projection (fused attention returns no weights), so the model runs as it
    is; the maps sum to 1 over the patches plus the prefix tokens."""
    inner = getattr(model, "module", model)
    captured: dict[str, torch.Tensor] = {}
    block = inner.blocks[-1]
    hook = block.attn.register_forward_hook(lambda _m, args, _out: captured.setdefault("x", args[0]))
    try:
        inner.forward_features(x)
    finally:
        hook.remove()
    tokens = captured["x"]
    attn = block.attn
    b, n, c = tokens.shape
    qkv = attn.qkv(tokens).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    weights = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, heads, 1, N)
    prefix = inner.num_prefix_tokens
    rows, cols = inner.patch_embed.dynamic_feat_size(x.shape[-2:])
    return weights.mean(dim=1)[:, 0, prefix:].reshape(b, rows, cols)


__all__ = ["build_classifier", "cls_attention"]
