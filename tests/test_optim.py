"""Layer-wise lr decay parameter groups (BEiT/MAE's param_groups_lrd) on a tiny ViT and on the MerMED wrapper."""

from __future__ import annotations

import pytest
import torch

from mermed.models import MultiCropEncoder, ProjectionHead, build_backbone
from mermed.optim import param_groups

TINY = "vit_tiny_patch16_224"
DECAY = 0.8


@pytest.fixture(scope="module")
def model() -> MultiCropEncoder:
    torch.manual_seed(0)
    return MultiCropEncoder(
        build_backbone(TINY, 32, depth=2), ProjectionHead(192, prototypes=100, hidden=64, bottleneck=32)
    )


def by_name(model: torch.nn.Module, groups: list[dict]) -> dict[str, dict]:
    """Parameter name -> its group; fails unless every trainable parameter is in exactly one group."""
    group_of = {}
    for group in groups:
        for p in group["params"]:
            assert id(p) not in group_of, "a parameter is in two groups"
            group_of[id(p)] = group
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(group_of) == len(trainable)
    return {n: group_of[id(p)] for n, p in trainable.items()}


def test_layer_scales_and_weight_decay(model):
    groups = param_groups(model, layer_decay=DECAY)
    group = by_name(model, groups)
    scale = {n: g["lr_scale"] for n, g in group.items()}
    decays = {n: g["apply_weight_decay"] for n, g in group.items()}

    for name in ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"):
        assert scale[f"backbone.{name}"] == pytest.approx(DECAY**3), name
    for name, s in scale.items():
        if name.startswith("backbone.blocks.0."):
            assert s == pytest.approx(DECAY**2), name
        elif name.startswith("backbone.blocks.1."):
            assert s == pytest.approx(DECAY), name
        elif name.startswith(("backbone.norm.", "head.")):
            assert s == 1.0, name

    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        expect = p.ndim > 1 and leaf not in ("bias", "cls_token", "pos_embed")
        assert decays[name] is expect, name
        assert ("weight_decay" in group[name]) is not expect, name  # no-decay groups pin it at 0
        if not expect:
            assert group[name]["weight_decay"] == 0.0
    assert decays["backbone.blocks.0.attn.qkv.weight"] and decays["head.mlp.0.weight"]
    assert not decays["backbone.blocks.0.norm1.weight"] and not decays["backbone.norm.bias"]

    # (layer, decay?) groups, bottom first; the frozen prototype norms are in none of them.
    assert [g["name"] for g in groups] == [
        "layer0_decay",
        "layer0_no_decay",
        "layer1_decay",
        "layer1_no_decay",
        "layer2_decay",
        "layer2_no_decay",
        "layer3_decay",
        "layer3_no_decay",
    ]


def test_no_layer_decay_is_two_groups_at_one_lr(model):
    groups = param_groups(model)
    by_name(model, groups)
    assert [(g["name"], g["lr_scale"], g["apply_weight_decay"]) for g in groups] == [
        ("decay", 1.0, True),
        ("no_decay", 1.0, False),
    ]


def test_bare_timm_vit_with_a_classifier():
    torch.manual_seed(0)
    vit = build_backbone(TINY, 32, depth=2)
    vit.reset_classifier(10)
    scale = {n: g["lr_scale"] for n, g in by_name(vit, param_groups(vit, layer_decay=DECAY)).items()}
    assert scale["cls_token"] == pytest.approx(DECAY**3)
    assert scale["blocks.1.mlp.fc2.weight"] == pytest.approx(DECAY)
    assert scale["head.weight"] == scale["norm.weight"] == 1.0


def test_groups_drive_adamw(model):
    """The training step's recipe: lr times lr_scale, scheduled weight decay on the decaying groups only."""
    opt = torch.optim.AdamW(param_groups(model, layer_decay=DECAY), lr=0.0)
    for group in opt.param_groups:
        group["lr"] = 1e-3 * group["lr_scale"]
        if group["apply_weight_decay"]:
            group["weight_decay"] = 0.04
    lrs = sorted({round(g["lr"], 12) for g in opt.param_groups})
    assert lrs == sorted(round(1e-3 * DECAY**k, 12) for k in range(4))
    assert {g["weight_decay"] for g in opt.param_groups if not g["apply_weight_decay"]} == {0.0}


def test_bad_layer_decay():
    with pytest.raises(ValueError, match="layer_decay"):
        param_groups(torch.nn.Linear(2, 2), layer_decay=0.0)
    with pytest.raises(ValueError, match="needs a ViT with .blocks"):
        param_groups(torch.nn.Linear(2, 2), layer_decay=0.5)
