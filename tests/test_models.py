"""Backbone, DINO head, multi-crop wrapper, encoder export/import."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import save_file

from mermed.models import (
    ENCODER_FORMAT,
    MultiCropEncoder,
    ProjectionHead,
    build_backbone,
    export_encoder,
    load_encoder,
)

TINY = "vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return build_backbone(TINY, 32).eval()


def test_backbone_takes_both_crop_sizes_and_uses_fused_attention(backbone):
    assert backbone(torch.randn(2, 3, 32, 32)).shape == (2, 192)
    assert backbone(torch.randn(3, 3, 16, 16)).shape == (3, 192)
    attn = [m for m in backbone.modules() if hasattr(m, "fused_attn")]
    assert attn and all(m.fused_attn for m in attn)


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot build backbone"):
        build_backbone("no_such_model_xyz", 32)


def test_head_normalises_embedding_and_fixes_prototype_norms():
    torch.manual_seed(0)
    head = ProjectionHead(192, prototypes=50, hidden=64, bottleneck=16)
    logits, emb = head(torch.randn(7, 192) * 10)
    assert logits.shape == (7, 50) and emb.shape == (7, 16)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(7))
    g = head.last_layer.parametrizations.weight.original0
    assert not g.requires_grad and torch.equal(g, torch.ones_like(g))
    # Unit embeddings against unit-norm prototypes: every logit is a cosine.
    assert logits.abs().max() <= 1 + 1e-5
    torch.testing.assert_close(logits, emb @ torch.nn.functional.normalize(head.last_layer.weight, dim=1).T)


def test_multicrop_encoder_concatenates_in_view_order_with_one_call_per_resolution(backbone):
    torch.manual_seed(1)
    enc = MultiCropEncoder(backbone, ProjectionHead(192, prototypes=20, hidden=32, bottleneck=8)).eval()
    views = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)] + [torch.randn(2, 3, 16, 16) for _ in range(3)]
    calls = []
    hook = backbone.register_forward_hook(lambda m, inp, out: calls.append(inp[0].shape[0]))
    try:
        with torch.no_grad():
            logits, emb = enc(views)
    finally:
        hook.remove()
    assert calls == [4, 6]
    with torch.no_grad():
        separate = [enc.head(backbone(v)) for v in views]
    torch.testing.assert_close(logits, torch.cat([s[0] for s in separate]), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(emb, torch.cat([s[1] for s in separate]), atol=1e-5, rtol=1e-4)


def test_export_then_load_gives_the_same_encoder(backbone, tmp_path):
    path = tmp_path / "enc" / "encoder.safetensors"
    norm = {"CT": {"mean": [0.3, 0.3, 0.3], "std": [0.2, 0.2, 0.2]}}
    info = export_encoder(backbone, path, model_name=TINY, img_size=32, normalization=norm, mlflow_run_id="abc123")
    meta = json.loads((path.parent / "encoder.json").read_text())
    assert meta == {
        "model_name": TINY,
        "img_size": 32,
        "embed_dim": 192,
        "format": ENCODER_FORMAT,
        "normalization": norm,
        "mlflow_run_id": "abc123",
    }
    loaded, loaded_info = load_encoder(path)
    assert loaded_info == info and loaded_info.mean_std("CT") == ([0.3] * 3, [0.2] * 3)
    assert loaded_info.mean_std("MR") is None  # never seen: the caller falls back to ImageNet's
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), backbone(x), atol=0, rtol=0)


def test_plain_timm_loads_an_exported_encoder(tmp_path):
    """The README's lines for users' own code: timm alone, no mermed import needed, gives the same features."""
    name, size = "vit_tiny_patch16_224", 32
    path = tmp_path / "enc" / "encoder.safetensors"
    export_encoder(build_backbone(name, size), path, model_name=name, img_size=size)
    ours, _ = load_encoder(path)
    plain = timm.create_model(
        name, pretrained=True, num_classes=0, img_size=size, pretrained_cfg_overlay={"file": str(path)}
    ).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), ours(x))


def test_loading_weights_of_another_architecture_fails_before_compute(tmp_path):
    small = build_backbone("vit_small_patch16_224", 32)
    path = tmp_path / "encoder.safetensors"
    export_encoder(small, path, model_name="vit_small_patch16_224", img_size=32)
    meta_path = tmp_path / "encoder.json"
    meta = json.loads(meta_path.read_text())
    meta.update(model_name=TINY, embed_dim=192)  # json claims tiny, weights are small
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not match the architecture.*other shapes"):
        load_encoder(path)
    # Weights with extra and missing keys are reported as such.
    state = {k: v for k, v in build_backbone(TINY, 32).state_dict().items() if not k.startswith("norm.")}
    state["head.extra"] = torch.zeros(1)
    save_file(state, str(path))
    with pytest.raises(ValueError, match="missing keys.*unexpected keys"):
        load_encoder(path)


def test_load_encoder_needs_its_json(backbone, tmp_path):
    path = tmp_path / "encoder.safetensors"
    export_encoder(backbone, path, model_name=TINY, img_size=32)
    (tmp_path / "encoder.json").unlink()
    with pytest.raises(ValueError, match="encoder.json is missing"):
        load_encoder(path)


def test_published_head_has_batch_norm_and_no_prototypes():
    head = ProjectionHead(192, bottleneck=16, hidden=32, batch_norm=True)
    kinds = [type(m).__name__ for m in head.mlp]
    assert kinds == ["Linear", "BatchNorm1d", "GELU", "Linear", "BatchNorm1d", "GELU", "Linear"]
    logits, emb = head(torch.randn(5, 192))
    assert logits is None and head.last_layer is None
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(5))
