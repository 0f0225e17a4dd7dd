"""One MerMED-FM training step and the training state around it, without Ray.

Ray Train (pipelines/pretrain.py) builds a ``TrainState`` per worker, wraps ``state.student`` in DDP, and calls
``train_step`` in its loop; everything here also runs in a plain process on CPU.

Checkpoints are ``state.safetensors`` (every tensor, flat) + ``meta.json`` (the rest): no pickle, so a checkpoint
can be inspected and loaded without executing anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mermed.config import PretrainConfig
from mermed.losses import DINOLoss, MemoryAlignmentLoss
from mermed.memory import MemoryQueue
from mermed.models import DINOHead, MultiCropEncoder, build_backbone, check_state_dict, embed_dim_of
from mermed.schedules import Schedules

STATE_FORMAT = "mermed-train-state/1"
STATE_FILE = "state.safetensors"
META_FILE = "meta.json"
_DEVICE_FLAGS = ("fused", "foreach", "capturable", "differentiable")


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (EMA and checkpoints must see the plain parameter names)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where asked for, or on CUDA with bf16 support under ``auto``; None means fp32."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def build_encoder(cfg: PretrainConfig, drop_path: float) -> MultiCropEncoder:
    m = cfg.model
    backbone = build_backbone(m.name, cfg.crops.global_size, drop_path_rate=drop_path)
    head = DINOHead(embed_dim_of(backbone), m.out_dim, hidden=m.hidden, bottleneck=m.bottleneck)
    return MultiCropEncoder(backbone, head)


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """DINO's groups: weight decay on weight matrices only, none on biases and norm scales. Group 0 decays."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "name": "decay"}, {"params": no_decay, "name": "no_decay", "weight_decay": 0.0}]


@dataclass
class TrainState:
    """Everything one worker needs to take a step and to resume exactly."""

    config: PretrainConfig
    student: nn.Module  # MultiCropEncoder, possibly wrapped in DDP
    teacher: MultiCropEncoder
    dino_loss: DINOLoss
    memory_loss: MemoryAlignmentLoss
    memory: MemoryQueue
    optimizer: torch.optim.Optimizer
    schedules: Schedules
    device: torch.device
    amp_dtype: torch.dtype | None
    step: int = 0

    def _sections(self) -> tuple[tuple[str, nn.Module], ...]:
        """The modules saved as ``<prefix>/<their state_dict key>`` tensors."""
        return (
            ("student", unwrap(self.student)),
            ("teacher", self.teacher),
            ("dino_loss", self.dino_loss),
            ("memory", self.memory),
        )

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(flat tensors for safetensors, JSON-able metadata) of the whole state, RNGs of this process included."""
        tensors: dict[str, torch.Tensor] = {}
        for prefix, module in self._sections():
            tensors.update({f"{prefix}/{k}": v for k, v in module.state_dict().items()})
        opt = self.optimizer.state_dict()
        opt_scalars: dict[str, dict[str, Any]] = {}
        for idx, entry in opt["state"].items():
            for key, value in entry.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optimizer/{idx}/{key}"] = value
                else:
                    opt_scalars.setdefault(str(idx), {})[key] = value
        rng_tensors, rng_meta = _rng_state(self.device)
        tensors.update(rng_tensors)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        meta = {
            "format": STATE_FORMAT,
            "step": self.step,
            "model": self.config.model.model_dump(),
            "memory": {"size": self.memory.size, "dim": self.memory.dim},
            "optimizer": {"param_groups": opt["param_groups"], "scalars": opt_scalars},
            "rng": rng_meta,
        }
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore from ``state_dict()`` output; checks the architecture before touching anything."""
        if meta.get("format") != STATE_FORMAT:
            raise ValueError(f"not a MerMED training state (format {meta.get('format')!r}, expected {STATE_FORMAT})")
        theirs = meta.get("model", {})
        differ = [
            f"model.{k}: checkpoint {theirs.get(k)!r}, config {v!r}"
            for k, v in self.config.model.model_dump().items()
            if k != "drop_path" and theirs.get(k) != v
        ]
        if differ:
            raise ValueError("checkpoint is of another architecture: " + "; ".join(differ))
        sections = {}
        for prefix, module in self._sections():
            part = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + "/")}
            check_state_dict(module, {k: v.shape for k, v in part.items()}, f"checkpoint section {prefix!r}")
            sections[prefix] = (module, part)
        for module, part in sections.values():
            module.load_state_dict(part, strict=True)

        opt_state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer/"):
                _, idx, name = key.split("/", 2)
                opt_state.setdefault(int(idx), {})[name] = value
        for idx, values in meta["optimizer"]["scalars"].items():
            opt_state.setdefault(int(idx), {}).update(values)
        groups = []
        for saved, current in zip(meta["optimizer"]["param_groups"], self.optimizer.param_groups, strict=True):
            group = {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in saved.items()}
            # Implementation flags follow this process's device (a CUDA checkpoint may resume on CPU).
            group.update({k: current[k] for k in _DEVICE_FLAGS if k in current})
            groups.append(group)
        self.optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
        _set_rng_state(tensors, meta["rng"], self.device)
        self.step = int(meta["step"])


def build_train_state(
    cfg: PretrainConfig,
    *,
    device: str | torch.device = "cpu",
    world_size: int = 1,
    total_steps: int | None = None,
) -> TrainState:
    """Student, teacher (same initial weights, no drop-path, frozen), losses, memory, AdamW and schedules.

    Weights are initialised from ``cfg.run.seed`` so that every worker builds the same model.
    """
    device = torch.device(device)
    torch.manual_seed(cfg.run.seed)
    student = build_encoder(cfg, cfg.model.drop_path).to(device)
    teacher = build_encoder(cfg, 0.0).to(device)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    n_views = cfg.crops.n_global + cfg.crops.n_local
    lc = cfg.loss
    return TrainState(
        config=cfg,
        student=student,
        teacher=teacher,
        dino_loss=DINOLoss(cfg.model.out_dim, cfg.crops.n_global, n_views, lc.student_temp, lc.center_momentum).to(
            device
        ),
        memory_loss=MemoryAlignmentLoss(lc.memory_student_temp, lc.memory_teacher_temp, cfg.crops.n_global),
        memory=MemoryQueue(cfg.memory.size, cfg.model.bottleneck, cfg.memory.n_blocks).to(device),
        optimizer=torch.optim.AdamW(param_groups(student), lr=0.0, fused=device.type == "cuda"),
        schedules=Schedules.from_config(cfg, world_size=world_size, total_steps=total_steps),
        device=device,
        amp_dtype=autocast_dtype(cfg.run.precision, device),
    )


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, in a few fused multi-tensor kernels."""
    t_params = list(teacher.parameters())
    s_params = [p.detach() for p in unwrap(student).parameters()]
    if len(t_params) != len(s_params):
        raise ValueError(f"teacher has {len(t_params)} parameters, student {len(s_params)}")
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1 - momentum)


@torch.no_grad()
def clip_gradients(params: Sequence[nn.Parameter], clip: float) -> None:
    """DINO's clipping: each parameter's gradient norm separately to at most ``clip``."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norms = torch.stack(torch._foreach_norm(grads))
    scale = (clip / (norms + 1e-6)).clamp_(max=1.0)
    torch._foreach_mul_(grads, list(scale.unbind()))


def train_step(state: TrainState, views: Sequence[torch.Tensor]) -> dict[str, float]:
    """One optimisation step on a batch of augmented views (global views first), on ``state.device``.

    Returns the step's metrics, including two collapse monitors: ``teacher_entropy`` (stuck at ln K means a
    uniform teacher) and ``embedding_std`` (per-dimension std of the student's normalised global-view
    embeddings across the batch, averaged over dimensions; near 0 means dimensional collapse, about
    1/sqrt(dim) is a well-spread batch).
    """
    cfg = state.config
    n_global = cfg.crops.n_global
    if len(views) != state.dino_loss.n_views:
        raise ValueError(f"train_step expects {state.dino_loss.n_views} views, got {len(views)}")
    sched = state.schedules.at(state.step)
    for group in state.optimizer.param_groups:
        group["lr"] = sched["lr"]
        if group["name"] == "decay":
            group["weight_decay"] = sched["wd"]

    amp = (
        torch.autocast(state.device.type, dtype=state.amp_dtype)
        if state.amp_dtype is not None
        else contextlib.nullcontext()
    )
    with amp:
        with torch.no_grad():
            t_logits, t_emb = state.teacher(views[:n_global])
        s_logits, s_emb = state.student(views)
    with torch.no_grad():
        q = state.dino_loss.teacher_probs(t_logits, sched["teacher_temp"])
        teacher_entropy = torch.special.entr(q).sum(dim=-1).mean()
        embedding_std = s_emb[: t_emb.shape[0]].float().std(dim=0).mean()
    dino = state.dino_loss(s_logits, t_logits, sched["teacher_temp"])
    if cfg.loss.memory_weight > 0:
        memory = state.memory_loss(s_emb, t_emb, state.memory)
    else:
        memory = torch.zeros((), device=state.device)
    loss = dino + cfg.loss.memory_weight * memory
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss at step {state.step}")

    student = unwrap(state.student)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for p in student.parameters() if p.requires_grad]
    if cfg.optim.clip_grad > 0:
        clip_gradients(params, cfg.optim.clip_grad)
    if state.step < cfg.optim.freeze_last_layer_steps:
        # DINO keeps the prototypes fixed for the first steps; training them early tends to collapse.
        for p in student.head.last_layer.parameters():
            p.grad = None
    state.optimizer.step()
    ema_update(state.teacher, student, sched["momentum"])
    state.memory.enqueue(t_emb.float())
    state.step += 1

    values = torch.stack([loss.detach(), dino.detach(), memory.detach(), teacher_entropy, embedding_std]).tolist()
    return {
        "loss": values[0],
        "dino_loss": values[1],
        "memory_loss": values[2],
        "teacher_entropy": values[3],
        "embedding_std": values[4],
        "memory_fill": state.memory.fill_fraction,
        **sched,
    }


# --------------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(state: TrainState, directory: str | Path) -> Path:
    """Write ``state.safetensors`` + ``meta.json`` into ``directory``.

    Both files are written into a sibling temporary directory that then replaces ``directory``, so a crash
    leaves either the previous checkpoint or the new one, never a mix or a truncated file.
    """
    directory = Path(directory)
    tensors, meta = state.state_dict()
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / STATE_FILE), metadata={"format": STATE_FORMAT})
    (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
    for name in (STATE_FILE, META_FILE):
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def load_checkpoint(state: TrainState, directory: str | Path) -> None:
    """Restore ``state`` in place from a ``save_checkpoint`` directory."""
    directory = Path(directory)
    for name in (STATE_FILE, META_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"checkpoint is missing {name}")
    meta = json.loads((directory / META_FILE).read_text())
    state.load_state_dict(load_file(str(directory / STATE_FILE)), meta)


def _rng_state(device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """RNG states as uint8 tensors (the bulky parts) and JSON scalars (positions, cached Gaussians)."""
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_ints, py_gauss = random.getstate()
    tensors = {
        "rng/torch": torch.get_rng_state(),
        "rng/numpy": torch.from_numpy(np.asarray(np_keys, dtype=np.uint32).view(np.uint8).copy()),
        "rng/python": torch.from_numpy(np.asarray(py_ints, dtype=np.uint32).view(np.uint8).copy()),
    }
    if device.type == "cuda":
        tensors["rng/cuda"] = torch.cuda.get_rng_state(device)
    meta = {"numpy": [int(np_pos), int(np_has_gauss), float(np_gauss)], "python": [py_version, py_gauss]}
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    if device.type == "cuda" and "rng/cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng/cuda"], device)
    np_pos, np_has_gauss, np_gauss = meta["numpy"]
    np_keys = tensors["rng/numpy"].numpy().view(np.uint32)
    np.random.set_state(("MT19937", np_keys, np_pos, np_has_gauss, np_gauss))
    py_version, py_gauss = meta["python"]
    py_ints = tuple(int(i) for i in tensors["rng/python"].numpy().view(np.uint32))
    random.setstate((py_version, py_ints, py_gauss))


__all__ = [
    "TrainState",
    "autocast_dtype",
    "build_encoder",
    "build_train_state",
    "clip_gradients",
    "ema_update",
    "load_checkpoint",
    "param_groups",
    "save_checkpoint",
    "train_step",
    "unwrap",
]
