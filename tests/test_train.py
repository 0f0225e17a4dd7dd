"""Pretrain configs, the training step on CPU, EMA, and exact resume from a checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import tiny_config
from torch import nn

from ingest.config import ConfigError, load_config
from mermed.augment import MultiCrop
from mermed.config import PretrainConfig
from mermed.train import (
    build_train_state,
    clip_gradients,
    ema_update,
    init_from_weights,
    load_checkpoint,
    save_checkpoint,
    train_step,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def batches(cfg: PretrainConfig, n: int, seed: int = 0) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
    """``n`` (views, modality ids) batches of random images from two modalities."""
    gen = torch.Generator().manual_seed(seed)
    crop = MultiCrop.from_config(cfg.crops)
    size, batch = cfg.crops.decode_size, cfg.optim.batch_size_per_worker
    out = []
    for _ in range(n):
        images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=gen)
        out.append((crop(images, generator=gen), torch.arange(batch) % 2))
    return out


def step(state, batch, step_seed: int = 0) -> dict[str, float]:
    views, ids = batch
    return train_step(state, views, ids, generator=torch.Generator().manual_seed(step_seed + state.step))


# --------------------------------------------------------------------------------------------- configs


def test_shipped_configs_load():
    vitb = load_config(PretrainConfig, CONFIGS / "pretrain_vitb.yaml")
    # The published run: 8 x 128 images, base lr 5e-5, layer decay 0.8, memory 65,536 in blocks of 16,384.
    assert (vitb.model.name, vitb.loss.objective, vitb.crops.n_local, vitb.memory.size, vitb.memory.n_blocks) == (
        "vit_base_patch16_224",
        "mermed",
        10,
        65536,
        4,
    )
    assert (vitb.optim.batch_size_per_worker, vitb.optim.base_lr, vitb.optim.layer_decay) == (128, 5e-5, 0.8)
    assert (vitb.optim.momentum_teacher, vitb.optim.clip_grad, vitb.model.head_batch_norm) == (0.9995, 1.0, True)
    assert (vitb.crops.global_scale, vitb.crops.local_scale) == ((0.2, 1.0), (0.05, 0.2))
    tiny = load_config(PretrainConfig, CONFIGS / "pretrain_tiny.yaml")
    assert (tiny.model.name, tiny.crops.global_size, tiny.crops.local_size) == ("vit_tiny_patch16_224", 64, 32)
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


def test_layer_decay_scales_each_groups_lr_and_decays_weights_only():
    cfg = tiny_config(optim={"layer_decay": 0.5, "warmup_steps": 0})
    state = build_train_state(cfg)
    m = step(state, batches(cfg, 1)[0])
    depth = len(state.student.backbone.blocks)
    lrs = {g["name"]: g["lr"] for g in state.optimizer.param_groups}
    assert lrs["layer0_decay"] == pytest.approx(m["lr"] * 0.5 ** (depth + 1))
    assert lrs[f"layer{depth + 1}_decay"] == pytest.approx(m["lr"])
    assert {g["weight_decay"] for g in state.optimizer.param_groups if not g["apply_weight_decay"]} == {0.0}
    assert {g["weight_decay"] for g in state.optimizer.param_groups if g["apply_weight_decay"]} == {m["wd"]}


# --------------------------------------------------------------------------------------------- steps


def test_a_few_cpu_steps_of_the_published_objective():
    cfg = tiny_config()
    state = build_train_state(cfg)
    assert state.student.head.last_layer is None  # the memory is the prototypes
    initial_teacher = [p.detach().clone() for p in state.teacher.parameters()]
    data = batches(cfg, 6)
    metrics = [step(state, b) for b in data]
    assert state.step == 6
    assert all(math.isfinite(m[k]) for m in metrics for k in m)
    for m in metrics:
        assert m["loss"] == pytest.approx(m["objective_loss"], rel=1e-6) and m["koleo_loss"] == 0.0
        assert 0 < m["teacher_entropy"] <= m["teacher_entropy_ceiling"] + 1e-4
        assert 0 < m["embedding_std"] < 1
    # The memory is full from the start (random unit vectors); each step enqueues the second global view's
    # teacher embeddings with their modalities: 6 steps x 4 rows fill 24 of 32 slots with known modalities.
    assert all(m["memory_fill"] == 1.0 for m in metrics)
    assert metrics[-1]["memory_share_CT"] + metrics[-1]["memory_share_CXR"] == pytest.approx(24 / 32)
    assert torch.equal(state.memory.modality[:24], torch.arange(24) % 2)
    assert [m["lr"] for m in metrics[:2]] == [0.0, pytest.approx(5e-3 * 4 / 256)]
    assert all(not p.requires_grad for p in state.teacher.parameters())
    assert any(not torch.equal(p, p0) for p, p0 in zip(state.teacher.parameters(), initial_teacher, strict=True))
    with pytest.raises(ValueError, match="expects 4 views"):
        train_step(state, data[0][0][:3], data[0][1])


def test_koleo_term_is_added_with_its_weight():
    cfg = tiny_config(loss={"koleo_weight": 0.5})
    m = step(build_train_state(cfg), batches(cfg, 1)[0])
    assert m["koleo_loss"] != 0 and m["loss"] == pytest.approx(m["objective_loss"] + 0.5 * m["koleo_loss"], rel=1e-5)


def test_steps_without_monitors_read_nothing_back_and_train_the_same():
    cfg = tiny_config()
    data = batches(cfg, 3)
    watched = build_train_state(cfg)  # each build seeds the global RNG that drop-path draws from
    for b in data:
        step(watched, b)
    quiet = build_train_state(cfg)
    for b in data:
        got = train_step(quiet, *b, generator=torch.Generator().manual_seed(quiet.step), monitors=False)
        assert set(got) == {"lr", "wd", "momentum", "teacher_temp"}
    a, b = _snapshot(watched), _snapshot(quiet)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_few_cpu_steps_of_the_dino_ablation():
    cfg = tiny_config(loss={"objective": "dino"}, model={"out_dim": 64})
    state = build_train_state(cfg)
    last_layer = state.student.head.last_layer.parametrizations.weight.original1
    initial_last = last_layer.detach().clone()
    fills, metrics = [], []
    for i, b in enumerate(batches(cfg, 4)):
        m = step(state, b)
        metrics.append(m)
        fills.append(m["memory_fill"])
        if i == 0:  # freeze_last_layer_steps = 1: the prototypes did not move in step 0
            assert torch.equal(last_layer, initial_last)
    assert all(math.isfinite(m[k]) for m in metrics for k in m)
    assert fills == [8 / 32, 16 / 32, 24 / 32, 1.0]
    for m in metrics:
        assert 0 < m["teacher_entropy"] <= math.log(64) + 1e-4 and m["teacher_entropy_ceiling"] == pytest.approx(
            math.log(64)
        )
    assert metrics[0]["teacher_temp"] == pytest.approx(0.04) and metrics[3]["teacher_temp"] == pytest.approx(0.07)
    assert not torch.equal(last_layer, initial_last)


def test_memory_ablation_has_no_memory_term():
    cfg = tiny_config(loss={"objective": "dino"}, memory={"size": 0})
    state = build_train_state(cfg)
    for b in batches(cfg, 2):
        m = step(state, b)
        assert m["memory_fill"] == 0.0 and m["loss"] == pytest.approx(m["objective_loss"])


def test_init_from_weights_starts_student_and_teacher_from_the_file(tmp_path):
    from safetensors.torch import save_file

    from mermed.models import build_backbone

    torch.manual_seed(7)
    source = build_backbone("vit_tiny_patch16_224", 64)  # another input size: position embeddings resampled
    path = tmp_path / "init.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    cfg = tiny_config()
    state = build_train_state(cfg)
    init_from_weights(state, str(path))
    for name, value in source.state_dict().items():
        if name != "pos_embed":
            assert torch.equal(state.teacher.backbone.state_dict()[name], value), name
            assert torch.equal(state.student.backbone.state_dict()[name], value), name
    assert state.teacher.backbone.pos_embed.shape[1] == 1 + (cfg.crops.global_size // 16) ** 2


def _snapshot(state) -> dict[str, torch.Tensor]:
    tensors, _ = state.state_dict()
    return {k: v for k, v in tensors.items() if not k.startswith("rng/")}


def test_compiled_backbones_train_as_the_eager_ones():
    """``run.compile`` (torch.compile, inductor on CPU): the same losses and weights after two steps as eager, and
    the same checkpoint keys. Drop-path is off: compiled random ops draw from another generator."""
    cfg = tiny_config(model={"drop_path": 0.0})
    data = batches(cfg, 2)
    eager, compiled = (
        build_train_state(cfg),
        build_train_state(cfg.model_copy(update={"run": cfg.run.model_copy(update={"compile": True})})),
    )
    for b in data:
        expected, got = step(eager, b), step(compiled, b)
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-4)
    a, b = _snapshot(eager), _snapshot(compiled)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-3)  # AdamW magnifies tiny gradient noise


def test_resume_from_checkpoint_is_bit_identical(tmp_path):
    cfg = tiny_config()
    data = batches(cfg, 4)
    straight = build_train_state(cfg)
    for b in data[:2]:
        step(straight, b)
    save_checkpoint(straight, tmp_path / "ckpt")
    expected = [step(straight, b) for b in data[2:]]

    resumed = build_train_state(tiny_config(run={"seed": 1}))  # other initial weights, overwritten by the load
    torch.manual_seed(12345)  # and another RNG state, restored by the load (drop-path draws from it)
    load_checkpoint(resumed, tmp_path / "ckpt")
    assert resumed.step == 2
    got = [step(resumed, b) for b in data[2:]]
    assert got == expected
    a, b = _snapshot(straight), _snapshot(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("optimizer/") for k in a) and "memory/ptr" in a and "memory/modality" in a


def test_checkpoint_files_are_plain_and_replace_atomically(tmp_path):
    cfg = tiny_config()
    state = build_train_state(cfg)
    step(state, batches(cfg, 1)[0])
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
    other = build_train_state(tiny_config(model={"bottleneck": 8}))
    before = _snapshot(other)
    with pytest.raises(ValueError, match="another architecture: model.bottleneck"):
        load_checkpoint(other, tmp_path / "ckpt")
    after = _snapshot(other)
    assert all(torch.equal(before[k], after[k]) for k in before)
    # Shapes are checked too, whatever the metadata says.
    meta_path = tmp_path / "ckpt" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["model"]["bottleneck"] = 8
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not match the architecture"):
        load_checkpoint(other, tmp_path / "ckpt")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (runs where a GPU is lent)")
def test_a_cuda_step_without_monitors_never_syncs_with_the_host():
    """The whole step (augmentation, forward, losses, backward, EMA, memory) under CUDA's sync debug mode: any
    host synchronisation raises. Logging steps may sync; the others may not."""
    from mermed.train import batch_step

    cfg = tiny_config()
    device = torch.device("cuda")
    state = build_train_state(cfg, device=device)
    crops = MultiCrop.from_config(cfg.crops)
    size, batch = cfg.crops.decode_size, cfg.optim.batch_size_per_worker
    host = {
        "pixels": torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8).pin_memory(),
        "grayscale": torch.zeros(batch, dtype=torch.bool).pin_memory(),
        "valid": torch.tensor([[0, 0, size, size]] * batch, dtype=torch.int32).pin_memory(),
    }
    modalities = ["CT", "CXR"] * (batch // 2)
    norm = {m: {"mean": [0.5] * 3, "std": [0.25] * 3} for m in ("CT", "CXR")}
    batch_step(state, crops, host, modalities, norm, monitors=True)  # warm-up: allocations, cuDNN choices
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            batch_step(state, crops, host, modalities, norm, monitors=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
