"""Loading published/own ViT checkpoints into a timm backbone: layouts, head dropping, pos_embed resampling, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from mermed.models import MultiCropEncoder, ProjectionHead, build_backbone
from mermed.weights import LoadReport, load_backbone_weights, read_state_dict

TINY = "vit_tiny_patch16_224"
UNPICKLED: list[str] = []


def tiny(seed: int, img_size: int = 32, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_backbone(TINY, img_size, depth=2, **kw)


def tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same(module: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = module.state_dict()
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=k)


@pytest.fixture(scope="module")
def source() -> dict[str, torch.Tensor]:
    return tensors(tiny(0))


@pytest.fixture
def target(source) -> torch.nn.Module:
    model = tiny(1)
    assert not torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"], source["blocks.0.attn.qkv.weight"])
    return model


def test_timm_state_dict_in_safetensors(tmp_path: Path, source, target):
    save_file(source, str(tmp_path / "vit.safetensors"))
    report = load_backbone_weights(target, tmp_path / "vit.safetensors")
    assert report == LoadReport(loaded=len(source))
    assert_same(target, source)


def test_dino_teacher_checkpoint_drops_its_head(tmp_path: Path, source, target):
    head = {
        "module.head.mlp.0.weight": torch.randn(64, 192),
        "module.head.mlp.0.bias": torch.randn(64),
        "module.head.last_layer.weight_g": torch.ones(100, 1),
        "module.head.last_layer.weight_v": torch.randn(100, 64),
    }
    teacher = {f"module.backbone.{k}": v for k, v in source.items()} | head
    student = {f"module.backbone.{k}": torch.zeros_like(v) for k, v in source.items()} | head
    torch.save({"student": student, "teacher": teacher, "epoch": 100}, tmp_path / "checkpoint.pth")

    report = load_backbone_weights(target, tmp_path / "checkpoint.pth")
    assert report.loaded == len(source)
    assert report.dropped == tuple(sorted(k.removeprefix("module.") for k in head))
    assert_same(target, source)  # the teacher, not the zeroed student

    load_backbone_weights(target, tmp_path / "checkpoint.pth", key="student")
    assert not target.state_dict()["blocks.0.attn.qkv.weight"].any()


def test_model_wrapper_with_a_classifier(tmp_path: Path, source, target):
    classifier = {"head.weight": torch.randn(10, 192), "head.bias": torch.randn(10)}
    torch.save({"model": source | classifier}, tmp_path / "mae.pt")
    report = load_backbone_weights(target, tmp_path / "mae.pt")
    assert report.dropped == ("head.bias", "head.weight")
    assert_same(target, source)


def test_mermed_encoder_state_dict_drops_the_projection_head(tmp_path: Path, source, target):
    wrapper = MultiCropEncoder(tiny(0), ProjectionHead(192, prototypes=100, hidden=64, bottleneck=32))
    save_file(tensors(wrapper), str(tmp_path / "student.safetensors"))
    report = load_backbone_weights(target, tmp_path / "student.safetensors")
    assert report.dropped and all(k.startswith("head.") for k in report.dropped)
    assert_same(target, source)


def test_pos_embed_is_resampled_to_the_backbone_grid(tmp_path: Path, target):
    bigger = tensors(tiny(0, img_size=64))  # a 4x4 patch grid, the target has 2x2
    save_file(bigger, str(tmp_path / "vit64.safetensors"))
    report = load_backbone_weights(target, tmp_path / "vit64.safetensors")
    assert (report.pos_embed_from, report.pos_embed_to) == ((4, 4), (2, 2))
    expected = bigger | {"pos_embed": resample_abs_pos_embed(bigger["pos_embed"], [2, 2], num_prefix_tokens=1)}
    assert target.state_dict()["pos_embed"].shape == (1, 1 + 2 * 2, 192)
    assert_same(target, expected)


def test_missing_blocks_are_named_and_nothing_is_loaded(tmp_path: Path, source, target):
    before = tensors(target)
    save_file({k: v for k, v in source.items() if not k.startswith("blocks.1.")}, str(tmp_path / "short.safetensors"))
    with pytest.raises(ValueError, match=r"missing backbone weights: blocks\.1\.attn\.proj\.bias, .*\(12 in all\)"):
        load_backbone_weights(target, tmp_path / "short.safetensors")
    assert_same(target, before)


def test_shape_mismatch_names_the_key(tmp_path: Path, source, target):
    before = tensors(target)
    bad = source | {"blocks.0.mlp.fc1.weight": source["blocks.0.mlp.fc1.weight"][:100]}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"shape mismatch .*blocks\.0\.mlp\.fc1\.weight \(100, 192\) vs \(768, 192\)"):
        load_backbone_weights(target, tmp_path / "bad.safetensors")
    assert_same(target, before)


def test_weights_of_a_deeper_model_are_not_silently_dropped(tmp_path: Path, target):
    save_file(tensors(build_backbone(TINY, 32, depth=3)), str(tmp_path / "deep.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected weights .*blocks\.2\."):
        load_backbone_weights(target, tmp_path / "deep.safetensors")


def _record(tag: str) -> str:
    UNPICKLED.append(tag)
    return tag


class Payload:
    """Unpickling this would call ``_record``: weights_only must refuse it before that happens."""

    def __reduce__(self):
        return (_record, ("executed",))


def test_pickled_objects_are_refused_not_executed(tmp_path: Path, source, target):
    torch.save({"model": source, "config": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match=r"weights_only=True.*_record"):
        load_backbone_weights(target, tmp_path / "evil.pth")
    assert UNPICKLED == []


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        ([torch.zeros(1)], r"is not a state dict \(a list"),
        ({"optimizer": {"state": {}}, "epoch": 3}, r"not a state dict: epoch, optimizer are not named tensors"),
        ({}, r"is not a state dict \(a dict"),
    ],
)
def test_files_that_are_not_state_dicts(tmp_path: Path, payload, match):
    torch.save(payload, tmp_path / "x.pth")
    with pytest.raises(ValueError, match=match):
        read_state_dict(tmp_path / "x.pth")


def test_read_state_dict_errors(tmp_path: Path, source):
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        read_state_dict(tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="unsupported checkpoint type '.npz'"):
        (tmp_path / "w.npz").write_bytes(b"")
        read_state_dict(tmp_path / "w.npz")
    with pytest.raises(FileNotFoundError):
        read_state_dict(tmp_path / "absent.pth")
    torch.save({"model": source}, tmp_path / "m.pth")
    with pytest.raises(ValueError, match="has no 'teacher' dict"):
        read_state_dict(tmp_path / "m.pth", key="teacher")
