"""Pretrain configs, the training step on CPU, EMA, and exact resume from a checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from mermed.augment import MultiCrop
from mermed.config import ConfigError, PretrainConfig, load_config, parse_config
from mermed.train import (
    build_train_state,
    clip_gradients,
    ema_update,
    load_checkpoint,
    param_groups,
    save_checkpoint,
    train_step,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def tiny_config(**sections) -> PretrainConfig:
    """ViT-Tiny at 32/16 px with a 64-prototype head and a 32-row memory: a CPU step takes ~0.1 s."""
    data = {
        "model": {"name": "vit_tiny_patch16_224", "out_dim": 64, "bottleneck": 16, "hidden": 32, "drop_path": 0.1},
        "crops": {"n_global": 2, "n_local": 2, "global_size": 32, "local_size": 16, "decode_size": 40},
        "loss": {"warmup_teacher_temp_steps": 3},
        "memory": {"size": 32, "n_blocks": 4},
        "optim": {"batch_size_per_worker": 4, "base_lr": 5e-3, "warmup_steps": 2, "freeze_last_layer_steps": 1},
        "run": {"steps": 10, "seed": 0, "precision": "fp32"},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return parse_config(PretrainConfig, data)


def batches(cfg: PretrainConfig, n: int, seed: int = 0) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    crop = MultiCrop.from_config(cfg.crops)
    size = cfg.crops.decode_size
    out = []
    for _ in range(n):
        images = torch.randint(
            0, 256, (cfg.optim.batch_size_per_worker, 3, size, size), dtype=torch.uint8, generator=gen
        )
        out.append(crop(images, generator=gen))
    return out


# --------------------------------------------------------------------------------------------- configs


def test_shipped_configs_load():
    vitb = load_config(PretrainConfig, CONFIGS / "pretrain_vitb.yaml")
    assert (vitb.model.name, vitb.model.out_dim, vitb.crops.n_local, vitb.memory.size) == (
        "vit_base_patch16_224",
        65536,
        10,
        65536,
    )
    tiny = load_config(PretrainConfig, CONFIGS / "pretrain_tiny.yaml")
    assert (tiny.model.name, tiny.crops.global_size, tiny.crops.local_size, tiny.model.out_dim) == (
        "vit_tiny_patch16_224",
        64,
        32,
        1024,
    )
    assert (tiny.memory.size, tiny.memory.n_blocks, tiny.optim.batch_size_per_worker) == (1024, 4, 16)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"memory": {"size": 100, "n_blocks": 3}}, "n_blocks"),
        ({"crops": {"global_size": 40}}, "crops.global_size"),
        ({"crops": {"local_scale": [0.5, 0.2]}}, "local_scale"),
        ({"crops": {"decode_size": 24}}, "decode_size"),
        ({"model": {"out_dim": 1}}, "model.out_dim"),
        ({"run": {"precision": "fp16"}}, "run.precision"),
        ({"optim": {"lr": 1e-3}}, "optim.lr"),
    ],
)
def test_nonsense_configs_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        tiny_config(**override)


# --------------------------------------------------------------------------------------------- pieces


def test_ema_update_math():
    torch.manual_seed(0)
    teacher, student = nn.Linear(3, 2), nn.Linear(3, 2)
    before = [p.detach().clone() for p in teacher.parameters()]
    ema_update(teacher, student, 0.9)
    for t, t0, s in zip(teacher.parameters(), before, student.parameters(), strict=True):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * s)
    ema_update(teacher, student, 1.0)  # momentum 1 (end of the schedule) freezes the teacher
    for t, t0, s in zip(teacher.parameters(), before, student.parameters(), strict=True):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * s)


def test_clip_gradients_is_per_parameter():
    a, b = nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([3.0, 4.0, 0.0, 0.0]), torch.tensor([0.3, 0.4])
    clip_gradients([a, b], 1.0)
    torch.testing.assert_close(a.grad.norm(), torch.tensor(1.0))  # 5 -> 1
    torch.testing.assert_close(b.grad, torch.tensor([0.3, 0.4]))  # 0.5 stays


def test_param_groups_exclude_biases_and_norms_from_weight_decay():
    state = build_train_state(tiny_config())
    decay, no_decay = param_groups(state.student)
    assert decay["name"] == "decay" and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in state.student.named_parameters()}
    assert all(not names[id(p)].endswith(".bias") and p.ndim > 1 for p in decay["params"])
    assert any("norm" in names[id(p)] for p in no_decay["params"])
    frozen_g = state.student.head.last_layer.parametrizations.weight.original0
    assert all(p is not frozen_g for g in (decay, no_decay) for p in g["params"])


# --------------------------------------------------------------------------------------------- steps


def test_a_few_cpu_steps_train_the_student_and_fill_the_memory():
    cfg = tiny_config()
    state = build_train_state(cfg)
    last_layer = state.student.head.last_layer.parametrizations.weight.original1
    initial_last = last_layer.detach().clone()
    initial_teacher = [p.detach().clone() for p in state.teacher.parameters()]
    fills, metrics = [], []
    for i, views in enumerate(batches(cfg, 4)):
        m = train_step(state, views)
        metrics.append(m)
        fills.append(m["memory_fill"])
        if i == 0:  # freeze_last_layer_steps = 1: the prototypes did not move in step 0
            assert torch.equal(last_layer, initial_last)
    assert state.step == 4
    assert all(math.isfinite(m[k]) for m in metrics for k in m)
    assert fills == [8 / 32, 16 / 32, 24 / 32, 1.0]
    assert metrics[0]["memory_loss"] == 0.0 and all(m["memory_loss"] > 0 for m in metrics[1:])
    for m in metrics:
        assert m["loss"] == pytest.approx(m["dino_loss"] + m["memory_loss"], rel=1e-5)
        assert 0 < m["teacher_entropy"] <= math.log(64) + 1e-4
        assert 0 < m["embedding_std"] < 1
    assert [m["lr"] for m in metrics[:2]] == [0.0, pytest.approx(5e-3 * 4 / 256)]
    assert metrics[0]["teacher_temp"] == pytest.approx(0.04) and metrics[3]["teacher_temp"] == pytest.approx(0.07)
    assert not torch.equal(last_layer, initial_last)
    assert all(not p.requires_grad for p in state.teacher.parameters())
    assert any(not torch.equal(p, p0) for p, p0 in zip(state.teacher.parameters(), initial_teacher, strict=True))
    with pytest.raises(ValueError, match="expects 4 views"):
        train_step(state, batches(cfg, 1)[0][:3])


def test_memory_ablation_has_no_memory_term():
    cfg = tiny_config(memory={"size": 0})
    state = build_train_state(cfg)
    for views in batches(cfg, 2):
        m = train_step(state, views)
        assert m["memory_loss"] == 0.0 and m["memory_fill"] == 0.0 and m["loss"] == m["dino_loss"]


def _snapshot(state) -> dict[str, torch.Tensor]:
    tensors, _ = state.state_dict()
    return {k: v for k, v in tensors.items() if not k.startswith("rng/")}


def test_resume_from_checkpoint_is_bit_identical(tmp_path):
    cfg = tiny_config()
    data = batches(cfg, 4)
    straight = build_train_state(cfg)
    for views in data[:2]:
        train_step(straight, views)
    save_checkpoint(straight, tmp_path / "ckpt")
    expected = [train_step(straight, views) for views in data[2:]]

    resumed = build_train_state(tiny_config(run={"seed": 1}))  # other initial weights, overwritten by the load
    torch.manual_seed(12345)  # and another RNG state, restored by the load (drop-path draws from it)
    load_checkpoint(resumed, tmp_path / "ckpt")
    assert resumed.step == 2
    got = [train_step(resumed, views) for views in data[2:]]
    assert got == expected
    a, b = _snapshot(straight), _snapshot(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("optimizer/") for k in a) and "memory/ptr" in a and "dino_loss/center" in a


def test_checkpoint_files_are_plain_and_replace_atomically(tmp_path):
    cfg = tiny_config()
    state = build_train_state(cfg)
    train_step(state, batches(cfg, 1)[0])
    target = tmp_path / "ckpt"
    target.mkdir()  # an existing (e.g. temporary) directory is replaced as a whole
    (target / "stale.txt").write_text("old")
    save_checkpoint(state, target)
    save_checkpoint(state, target)
    assert sorted(p.name for p in target.iterdir()) == ["meta.json", "state.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary leftovers
    meta = json.loads((target / "meta.json").read_text())
    assert meta["step"] == 1 and meta["model"]["name"] == "vit_tiny_patch16_224"
    (target / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match="meta.json"):
        load_checkpoint(state, target)


def test_checkpoint_of_another_architecture_is_refused_before_loading(tmp_path):
    cfg = tiny_config()
    state = build_train_state(cfg)
    save_checkpoint(state, tmp_path / "ckpt")
    other = build_train_state(tiny_config(model={"out_dim": 128}))
    before = _snapshot(other)
    with pytest.raises(ValueError, match="another architecture: model.out_dim"):
        load_checkpoint(other, tmp_path / "ckpt")
    after = _snapshot(other)
    assert all(torch.equal(before[k], after[k]) for k in before)
    # Shapes are checked too, whatever the metadata says.
    meta_path = tmp_path / "ckpt" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["model"]["out_dim"] = 128
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not match the architecture"):
        load_checkpoint(other, tmp_path / "ckpt")
