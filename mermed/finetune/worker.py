"""One fine-tuning run as a Ray Train worker loop: every epoch trains on the train shard (augmented on the
device), scores the validation shard, keeps the best epoch's weights and checkpoints; the test (and external) rows
are read once, at the end, by the best epoch's model. A restarted worker resumes from the last checkpoint."""

from __future__ import annotations

import json
import logging
import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mermed.augment import crop_boxes, crop_resize
from mermed.finetune.config import FinetuneConfig
from mermed.finetune.data import ATTRIBUTE_PREFIX
from mermed.finetune.model import build_classifier, cls_attention
from mermed.metrics import auroc
from mermed.normalize import modality_mean_std
from mermed.optim import param_groups
from mermed.schedules import cosine_schedule

log = logging.getLogger("mermed.finetune")

PREDICTIONS = "predictions.npz"  # in the final checkpoint: test (and external) scores, targets, groups, keys
STATE = "state.json"
EVAL_SETS = ("test", "external")


@dataclass(frozen=True)
class RunSpec:
    """What one run fine-tunes: the task, the encoder, the label subset and the hyperparameters Tune chose."""

    task: str
    kind: str  # binary | multiclass | multilabel
    n_outputs: int
    encoder: str
    model_name: str
    img_size: int
    normalization: dict
    fraction: float
    seed: int
    train_rows: int
    base_lr: float
    layer_decay: float
    attributes: tuple[str, ...] = ()  # row attributes the predictions carry (subgroup metrics)


def n_outputs(kind: str, classes: list[str]) -> int:
    """Head width: one logit for a binary task, one per class (label) otherwise."""
    return 1 if kind == "binary" else len(classes)


def probabilities(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Scores for ``mermed.metrics``: binary (N,) of the positive class, multiclass (N, K), multilabel (N, L)."""
    if kind == "multiclass":
        return logits.float().softmax(dim=1)
    probs = logits.float().sigmoid()
    return probs[:, 0] if kind == "binary" else probs


def loss_fn(logits: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "multiclass":
        return F.cross_entropy(logits.float(), target)
    if kind == "binary":
        return F.binary_cross_entropy_with_logits(logits.float()[:, 0], target.float())
    return F.binary_cross_entropy_with_logits(logits.float(), target)


class _Inputs:
    """Batches of decoded rows to normalised device tensors, with the training augmentation."""

    def __init__(self, spec: RunSpec, cfg: FinetuneConfig, device: torch.device) -> None:
        self.spec, self.cfg, self.device = spec, cfg, device

    def tensor(self, batch: dict[str, np.ndarray], generator: torch.Generator | None) -> torch.Tensor:
        pixels = torch.from_numpy(batch["pixels"]).to(self.device, non_blocking=True)
        x = pixels.permute(0, 3, 1, 2).float() / 255
        if generator is not None:  # the light train-time recipe: random resized crop of the valid box, flip
            valid = torch.from_numpy(batch["valid"]).to(self.device).float()
            boxes = crop_boxes(valid, self.cfg.train.crop_scale, generator)
            flip = torch.rand(len(x), generator=generator, device=generator.device).to(self.device) < 0.5
            x = crop_resize(x, boxes, flip & self.cfg.train.hflip, self.spec.img_size, valid=valid)
        mean, std = modality_mean_std(self.spec.normalization, [str(m) for m in batch["modality"]], self.device)
        return (x - mean[:, :, None, None]) / std[:, :, None, None]

    def target(self, batch: dict[str, np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(batch["target"]).to(self.device)


def _predict(
    model, shard, inputs: _Inputs, spec: RunSpec, cfg: FinetuneConfig, amp, attention: dict | None = None
) -> dict[str, np.ndarray]:
    """Scores of every row of an evaluation set (not split: the first worker reads it whole, with the unwrapped
    model, while the others wait at the next report), sorted by row key so that runs line up. With ``attention``
    (a dict to fill), the first ``cfg.attention_maps`` images and their last-block CLS attention are kept too."""
    model.eval()
    texts = ("group", "key", *(f"{ATTRIBUTE_PREFIX}{a}" for a in spec.attributes))
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("scores", "target", *texts)}
    with torch.inference_mode(), torch.autocast(inputs.device.type, amp, enabled=amp is not None):
        for batch in shard.iter_batches(batch_size=max(64, cfg.train.batch_size), batch_format="numpy"):
            x = inputs.tensor(batch, None)
            out["scores"].append(probabilities(model(x), spec.kind).cpu().numpy())
            if attention is not None and not attention and cfg.attention_maps:
                n = cfg.attention_maps
                attention["attention_pixels"] = batch["pixels"][:n]
                attention["attention_maps"] = cls_attention(model, x[:n]).float().cpu().numpy()
            for k in ("target", *texts):
                out[k].append(np.asarray(batch[k]))
    width = () if spec.kind == "binary" else (spec.n_outputs,)
    empty = {"scores": np.zeros((0, *width), np.float32), "target": np.zeros((0, *width))}
    local = {k: np.concatenate(v) if v else empty.get(k, np.zeros(0, str)) for k, v in out.items()}
    order = np.argsort(local["key"].astype(str), kind="stable")
    return {k: (v.astype(str) if k in texts else v)[order] for k, v in local.items()}


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}


def _save(directory: Path, model, optimizer, best: dict[str, torch.Tensor] | None, state: dict) -> None:
    """A checkpoint: the current weights and optimizer (to resume), the best epoch's weights, the counters."""
    save_file(_cpu_state(getattr(model, "module", model)), directory / "model.safetensors")
    if best is not None:
        save_file(best, directory / "best.safetensors")
    torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    (directory / STATE).write_text(json.dumps(state))


def finetune_worker(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``; ``config`` holds the job's FinetuneConfig, the RunSpec and the
    encoder's weights (an object ref)."""
    import ray
    import ray.train
    import ray.train.torch

    from mermed.train import autocast_dtype

    cfg = FinetuneConfig.model_validate(config["finetune"])
    spec = RunSpec(**{**config["spec"], "attributes": tuple(config["spec"]["attributes"])})
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(cfg.torch_threads)
    torch.manual_seed(spec.seed)  # the head's initialisation; DDP broadcasts rank 0's weights
    weights = ray.get(config["weights"][0])
    model = build_classifier(spec.model_name, spec.img_size, weights, spec.n_outputs, cfg.train.drop_path)
    model = ray.train.torch.prepare_model(model)
    inner = getattr(model, "module", model)
    batch_size = cfg.train.batch_size
    lr = spec.base_lr * batch_size * world / 256
    groups = param_groups(inner, spec.layer_decay)
    for g in groups:
        g.setdefault("weight_decay", cfg.train.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.train.weight_decay)
    per_epoch = max(1, math.ceil(spec.train_rows // world / batch_size))
    total = cfg.train.epochs * per_epoch
    lrs = cosine_schedule(lr, cfg.train.min_lr, total, cfg.train.warmup_epochs * per_epoch)
    amp = autocast_dtype(cfg.train.precision, device)
    inputs = _Inputs(spec, cfg, device)
    state = {"epoch": 0, "step": 0, "best_val_auroc": -1.0, "best_epoch": 0}
    best: dict[str, torch.Tensor] | None = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            inner.load_state_dict(load_file(Path(d) / "model.safetensors"))
            optimizer.load_state_dict(torch.load(Path(d) / "optimizer.pt", weights_only=True))
            state = json.loads((Path(d) / STATE).read_text())
            best = load_file(Path(d) / "best.safetensors") if (Path(d) / "best.safetensors").exists() else None
        log.info("run %s resumed after epoch %d", spec.task, state["epoch"])

    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")  # train split
    generator = torch.Generator(device=device)
    while state["epoch"] < cfg.train.epochs:
        epoch = state["epoch"]
        generator.manual_seed(spec.seed * 100_003 + epoch * 1009 + rank)
        model.train()
        losses = []
        batches = train_shard.iter_batches(
            batch_size=batch_size,
            batch_format="numpy",
            local_shuffle_buffer_size=4 * batch_size,
            local_shuffle_seed=spec.seed * 1009 + epoch,
        )
        for batch in batches:
            for g in optimizer.param_groups:
                g["lr"] = float(lrs[min(state["step"], total - 1)]) * g.get("lr_scale", 1.0)
            with torch.autocast(device.type, amp, enabled=amp is not None):
                loss = loss_fn(model(inputs.tensor(batch, generator)), inputs.target(batch), spec.kind)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.train.clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad)
            optimizer.step()
            losses.append(loss.detach())
            state["step"] += 1
        state["epoch"] = epoch + 1
        val_auroc = math.nan  # the first worker's is the one reported, checkpointed and kept
        if rank == 0:
            val = _predict(inner, val_shard, inputs, spec, cfg, amp)
            val_auroc = auroc(val["target"], val["scores"], spec.kind)  # type: ignore[arg-type]
        if val_auroc > state["best_val_auroc"]:
            state["best_val_auroc"], state["best_epoch"] = val_auroc, epoch + 1
            best = _cpu_state(inner)
        metrics = {
            "epoch": epoch + 1,
            "train_loss": float(torch.stack(losses).mean()) if losses else float("nan"),
            "val_auroc": val_auroc,
            "best_val_auroc": state["best_val_auroc"],
            "lr": float(lrs[min(state["step"], total) - 1]),
        }
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                _save(Path(tmp), model, optimizer, best, state)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)

    # Scored once: the best validation epoch's weights on the test rows (and the external set).
    if best is not None:
        inner.load_state_dict(best)
    results: dict[str, np.ndarray] = {}
    attention: dict[str, np.ndarray] = {}
    for name in (n for n in EVAL_SETS if n in config["datasets"] and rank == 0):
        shard = ray.train.get_dataset_shard(name)
        scored = _predict(inner, shard, inputs, spec, cfg, amp, attention if name == "test" else None)
        results |= {f"{name}_{k}": v for k, v in scored.items()}
    with tempfile.TemporaryDirectory() as tmp:
        if rank == 0:  # the weights too: a worker restarted from this checkpoint only scores again
            _save(Path(tmp), model, optimizer, best, state)
            np.savez(Path(tmp) / PREDICTIONS, **results, **attention)
            (Path(tmp) / "spec.json").write_text(json.dumps(asdict(spec) | {"state": state}))
        # "scored", not "done": Tune reserves that key for its own end-of-trial flag.
        final = {**state, "val_auroc": state["best_val_auroc"], "train_rows": spec.train_rows, "scored": 1}
        ray.train.report(final, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)


__all__ = ["EVAL_SETS", "PREDICTIONS", "RunSpec", "finetune_worker", "loss_fn", "n_outputs", "probabilities"]
