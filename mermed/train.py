"""One MerMED-FM training step and the training state around it, without Ray.

Ray Train (pipelines/pretrain.py) builds a ``TrainState`` per worker, wraps ``state.student`` in DDP, and calls
``train_step`` in its loop; everything here also runs in a plain process on CPU.

Checkpoints are ``state.safetensors`` (every tensor, flat) + ``meta.json`` (the rest): no pickle, so a checkpoint
can be inspected and loaded without executing anything.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ingest.schema import KNOWN_MODALITIES
from mermed.augment import MultiCrop
from mermed.config import PretrainConfig
from mermed.losses import DINOLoss, KoLeoLoss, MemoryAlignmentLoss, MerMEDLoss
from mermed.memory import MemoryQueue
from mermed.models import MultiCropEncoder, ProjectionHead, build_backbone, check_state_dict, embed_dim_of
from mermed.normalize import Normalization, modality_mean_std
from mermed.optim import param_groups
from mermed.schedules import Schedules
from mermed.weights import load_backbone_weights

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
    """Backbone + projection head; the head ends in DINO's prototypes only for the ``dino`` objective."""
    m = cfg.model
    backbone = build_backbone(m.name, cfg.crops.global_size, drop_path_rate=drop_path)
    head = ProjectionHead(
        embed_dim_of(backbone),
        bottleneck=m.bottleneck,
        hidden=m.hidden,
        batch_norm=m.head_batch_norm,
        prototypes=m.out_dim if cfg.loss.objective == "dino" else 0,
    )
    return MultiCropEncoder(backbone, head)


def modality_ids(modalities: Sequence[str], device: torch.device | str = "cpu") -> torch.Tensor:
    """Stable integer ids for the memory's modality column: the index in ingest's vocabulary, or past it for a
    modality outside it (by name, so every worker and every resumed run agrees)."""
    known = {m: i for i, m in enumerate(KNOWN_MODALITIES)}
    ids = [
        known.get(m, len(known) + int.from_bytes(m.encode()[:4].ljust(4, b"\0"), "little") % 1000) for m in modalities
    ]
    return torch.tensor(ids, dtype=torch.int64, device=device)


@dataclass
class TrainState:
    """Everything one worker needs to take a step and to resume exactly."""

    config: PretrainConfig
    student: nn.Module  # MultiCropEncoder, possibly wrapped in DDP
    teacher: MultiCropEncoder
    objective: MerMEDLoss | DINOLoss  # loss.objective
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
            ("objective", self.objective),
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
    """Student, teacher (same initial weights, no drop-path, frozen), objective, memory, AdamW and schedules.

    Weights are initialised from ``cfg.run.seed`` so that every worker builds the same model; ``model.init`` is
    applied separately (``init_from_weights``), only when a run starts rather than resumes.
    """
    device = torch.device(device)
    torch.manual_seed(cfg.run.seed)
    student = build_encoder(cfg, cfg.model.drop_path).to(device)
    teacher = build_encoder(cfg, 0.0).to(device)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    if cfg.run.compile:
        for encoder in (student, teacher):
            encoder.backbone.compile(dynamic=False)
    n_views = cfg.crops.n_global + cfg.crops.n_local
    lc = cfg.loss
    if lc.objective == "mermed":
        objective: MerMEDLoss | DINOLoss = MerMEDLoss(
            cfg.crops.n_global, n_views, lc.student_temp, block_size=cfg.memory.size // cfg.memory.n_blocks
        )
        memory_init = "random"
    else:
        objective = DINOLoss(cfg.model.out_dim, cfg.crops.n_global, n_views, lc.student_temp, lc.center_momentum)
        memory_init = "empty"
    memory = MemoryQueue(
        cfg.memory.size,
        cfg.model.bottleneck,
        cfg.memory.n_blocks,
        init=memory_init,
        generator=torch.Generator().manual_seed(cfg.run.seed),
    )
    groups = param_groups(student, layer_decay=cfg.optim.layer_decay)
    return TrainState(
        config=cfg,
        student=student,
        teacher=teacher,
        objective=objective.to(device),
        memory=memory.to(device),
        optimizer=torch.optim.AdamW(groups, lr=0.0, fused=device.type == "cuda"),
        schedules=Schedules.from_config(cfg, world_size=world_size, total_steps=total_steps),
        device=device,
        amp_dtype=autocast_dtype(cfg.run.precision, device),
    )


def init_from_weights(state: TrainState, path: str) -> None:
    """Continual pretraining: load backbone weights from ``path`` into student and teacher (before step 0)."""
    student = unwrap(state.student)
    report = load_backbone_weights(student.backbone, path)
    state.teacher.backbone.load_state_dict(student.backbone.state_dict())
    detail = f", dropped {len(report.dropped)} head keys" if report.dropped else ""
    if report.pos_embed_from:
        detail += f", position embeddings {report.pos_embed_from} -> {report.pos_embed_to}"
    logging.getLogger("mermed.train").info("initialised from %s: %d tensors%s", path, report.loaded, detail)


def step_generator(device: torch.device, seed: int, rank: int, step: int) -> torch.Generator:
    """The generator of a step's random draws (crops, memory partition): it depends only on (seed, rank, step), so
    a resumed run draws what an uninterrupted one would."""
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + rank) * 1_000_003 + step)
    return gen


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


def _set_schedule(state: TrainState, sched: dict[str, float]) -> None:
    """The step's lr on every group (times its layer-wise scale) and its weight decay on the decaying groups."""
    for group in state.optimizer.param_groups:
        group["lr"] = sched["lr"] * group.get("lr_scale", 1.0)
        if group.get("apply_weight_decay"):
            group["weight_decay"] = sched["wd"]


def _objective(
    state: TrainState,
    outputs: tuple,
    ids: torch.Tensor,
    teacher_temp: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """The configured objective: MerMED's block-wise memory cross-entropy, or DINO plus memory alignment."""
    cfg = state.config
    s_logits, s_emb, t_logits, t_emb = outputs
    if cfg.loss.objective == "mermed":
        return state.objective(s_emb, t_emb, ids, state.memory, teacher_temp, generator=generator)
    loss = state.objective(s_logits, t_logits, teacher_temp)
    if cfg.loss.memory_weight > 0:
        align = MemoryAlignmentLoss(cfg.loss.memory_student_temp, cfg.loss.memory_teacher_temp, cfg.crops.n_global)
        loss = loss + cfg.loss.memory_weight * align(s_emb, t_emb, state.memory)
    return loss


@torch.no_grad()
def _monitors(state: TrainState, outputs: tuple, ids: torch.Tensor, teacher_temp: float) -> dict[str, torch.Tensor]:
    """Collapse monitors: the teacher's entropy against its ceiling (a uniform teacher sits at the ceiling), and
    ``embedding_std``, the per-dimension spread of the student's global-view embeddings (near 0 means
    dimensional collapse; about 1/sqrt(dim) is a well-spread batch)."""
    s_logits, s_emb, t_logits, t_emb = outputs
    if state.config.loss.objective == "mermed":
        # Its own partition, so that how often a run logs never changes the training draws.
        gen = torch.Generator(device=state.memory.bank.device).manual_seed(state.step)
        entropy, ceiling = state.objective.teacher_entropy(t_emb, ids, state.memory, teacher_temp, generator=gen)
        entropy, ceiling = entropy.mean(), ceiling.mean()
    else:
        q = state.objective.teacher_probs(t_logits, teacher_temp)
        entropy = torch.special.entr(q).sum(dim=-1).mean()
        ceiling = torch.tensor(math.log(q.shape[-1]), device=q.device)
    return {
        "teacher_entropy": entropy,
        "teacher_entropy_ceiling": ceiling,
        "embedding_std": s_emb[: t_emb.shape[0]].float().std(dim=0).mean(),
    }


def train_step(
    state: TrainState,
    views: Sequence[torch.Tensor],
    modalities: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    monitors: bool = True,
) -> dict[str, float]:
    """One optimisation step on a batch of augmented views (global views first), on ``state.device``.

    ``modalities``: (B,) ids (``modality_ids``) of the batch's images, for the memory's masking and its column
    of modalities. ``generator`` draws the step's memory partition. Only with ``monitors`` does the step read
    anything back from the device (loss terms, collapse monitors, memory fill, and the finiteness check), so
    the other steps queue their work without waiting for it.
    """
    cfg = state.config
    n_global = cfg.crops.n_global
    if len(views) != state.objective.n_views:
        raise ValueError(f"train_step expects {state.objective.n_views} views, got {len(views)}")
    batch = views[0].shape[0]
    ids = modalities.to(state.device)
    sched = state.schedules.at(state.step)
    _set_schedule(state, sched)
    amp = (
        torch.autocast(state.device.type, dtype=state.amp_dtype)
        if state.amp_dtype is not None
        else contextlib.nullcontext()
    )
    with amp:
        with torch.no_grad():
            t_logits, t_emb = state.teacher(views[:n_global])
        s_logits, s_emb = state.student(views)
    outputs = (s_logits, s_emb, t_logits, t_emb)
    objective = _objective(state, outputs, ids, sched["teacher_temp"], generator)
    koleo = torch.zeros((), device=state.device)
    if cfg.loss.koleo_weight > 0:
        koleo = KoLeoLoss()(s_emb[: n_global * batch].float(), n_groups=n_global)
    loss = objective + cfg.loss.koleo_weight * koleo
    watched = _monitors(state, outputs, ids, sched["teacher_temp"]) if monitors else {}

    student = unwrap(state.student)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for p in student.parameters() if p.requires_grad]
    if cfg.optim.clip_grad > 0:
        clip_gradients(params, cfg.optim.clip_grad)
    if student.head.last_layer is not None and state.step < cfg.optim.freeze_last_layer_steps:
        # DINO keeps the prototypes fixed for the first steps; training them early tends to collapse.
        for p in student.head.last_layer.parameters():
            p.grad = None
    state.optimizer.step()
    ema_update(state.teacher, student, sched["momentum"])
    if cfg.loss.objective == "mermed":  # the published memory takes the second global view, with modalities
        second = min(1, n_global - 1)
        state.memory.enqueue(t_emb[second * batch : (second + 1) * batch].float(), ids)
    else:
        state.memory.enqueue(t_emb.float(), ids.repeat(n_global))
    state.step += 1
    if not monitors:
        return dict(sched)

    names = ["loss", "objective_loss", "koleo_loss", *watched]
    values = torch.stack([loss.detach(), objective.detach(), koleo.detach(), *watched.values()]).tolist()
    metrics = dict(zip(names, values, strict=True))
    if not math.isfinite(metrics["loss"]):
        raise FloatingPointError(f"non-finite loss at step {state.step - 1}")
    fill = state.memory.modality_counts()
    metrics["memory_fill"] = state.memory.fill_fraction
    names_by_id = dict(enumerate(KNOWN_MODALITIES))
    for mid, count in fill.items():
        if mid >= 0:
            metrics[f"memory_share_{names_by_id.get(mid, mid)}"] = count / max(state.memory.size, 1)
    return {**metrics, **sched}


def batch_step(
    state: TrainState,
    crops: MultiCrop,
    batch: Mapping[str, torch.Tensor],
    modalities: Sequence[str],
    normalization: Normalization,
    *,
    rank: int = 0,
    world_size: int = 1,
    monitors: bool = True,
) -> dict[str, float]:
    """A decoded balanced batch to one training step, as every loop runs it (the Ray Train worker, the benches):
    the batch's ``pixels`` (B, H, W, 3) uint8, ``grayscale`` and ``valid`` go to the device, become views
    normalised by each row's modality, and step the state. The crops' draws depend on (seed, rank, step), the
    memory partition's on (seed, step) alone: the same on every rank."""
    device, seed = state.device, state.config.run.seed
    images = batch["pixels"].to(device, non_blocking=True).permute(0, 3, 1, 2)
    grayscale = batch["grayscale"].to(device, non_blocking=True)
    valid = batch["valid"].to(device, non_blocking=True) if "valid" in batch else None
    mean, std = modality_mean_std(normalization, modalities, device)
    views = crops(
        images, grayscale, generator=step_generator(device, seed, rank, state.step), valid=valid, mean=mean, std=std
    )
    return train_step(
        state,
        views,
        modality_ids(modalities, device),
        generator=step_generator(device, seed, world_size, state.step),
        monitors=monitors,
    )


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
    "batch_step",
    "autocast_dtype",
    "build_encoder",
    "build_train_state",
    "clip_gradients",
    "ema_update",
    "load_checkpoint",
    "init_from_weights",
    "modality_ids",
    "save_checkpoint",
    "step_generator",
    "train_step",
    "unwrap",
]
