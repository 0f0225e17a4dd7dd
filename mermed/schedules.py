"""Per-iteration schedules (learning rate, weight decay, teacher momentum, teacher temperature), as DINO."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mermed.config import PretrainConfig


def cosine_schedule(
    base: float, final: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0
) -> np.ndarray:
    """Linear warm-up from ``warmup_start`` to ``base``, then a half cosine from ``base`` to ``final``.

    Same values as DINO's ``cosine_scheduler`` with ``epochs * niter_per_ep = total_steps``.
    """
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"need 0 <= warmup_steps ({warmup_steps}) <= total_steps ({total_steps}) and total >= 1")
    warmup = np.linspace(warmup_start, base, warmup_steps)
    i = np.arange(total_steps - warmup_steps)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * i / max(len(i), 1)))
    return np.concatenate((warmup, cosine))


def teacher_temp_schedule(start: float, final: float, total_steps: int, warmup_steps: int) -> np.ndarray:
    """Linear rise over ``warmup_steps``, then flat: a high temperature early destabilises training (DINO)."""
    return np.concatenate((np.linspace(start, final, warmup_steps), np.full(total_steps - warmup_steps, final)))


@dataclass(frozen=True)
class Schedules:
    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray

    @classmethod
    def from_config(cls, cfg: PretrainConfig, *, world_size: int = 1, total_steps: int | None = None) -> Schedules:
        """``world_size`` workers of ``cfg.optim.batch_size_per_worker`` each; the lr follows the linear
        scaling rule base_lr * global_batch / 256."""
        steps = cfg.run.steps if total_steps is None else total_steps
        o, loss = cfg.optim, cfg.loss
        peak_lr = o.base_lr * o.batch_size_per_worker * world_size / 256
        return cls(
            lr=cosine_schedule(peak_lr, o.min_lr, steps, warmup_steps=min(o.warmup_steps, steps)),
            wd=cosine_schedule(o.weight_decay, o.weight_decay_end, steps),
            momentum=cosine_schedule(o.momentum_teacher, 1.0, steps),
            teacher_temp=teacher_temp_schedule(
                loss.teacher_temp, loss.final_teacher_temp, steps, min(loss.warmup_teacher_temp_steps, steps)
            ),
        )

    @property
    def total_steps(self) -> int:
        return len(self.lr)

    def at(self, step: int) -> dict[str, float]:
        if not 0 <= step < self.total_steps:
            raise IndexError(f"step {step} is outside the schedule of {self.total_steps} steps")
        return {
            "lr": float(self.lr[step]),
            "wd": float(self.wd[step]),
            "momentum": float(self.momentum[step]),
            "teacher_temp": float(self.teacher_temp[step]),
        }


__all__ = ["Schedules", "cosine_schedule", "teacher_temp_schedule"]
