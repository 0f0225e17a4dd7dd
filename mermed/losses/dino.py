"""The two terms of the MerMED-FM objective: DINO self-distillation and memory alignment.

Both compute in fp32 with autocast off: softmaxes over 65,536 prototypes or memory rows lose too much in bf16.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mermed.memory import MemoryQueue


def _pair_mask(n_global: int, n_views: int, device: torch.device) -> torch.Tensor:
    """(G, V) bool: teacher view g is compared with student view v unless they are the same view."""
    g = torch.arange(n_global, device=device)[:, None]
    v = torch.arange(n_views, device=device)[None, :]
    return g != v


def _split(rows: int, n_views: int, what: str) -> int:
    if rows % n_views:
        raise ValueError(f"{what} has {rows} rows, not a multiple of its {n_views} views")
    return rows // n_views


class DINOLoss(nn.Module):
    """Cross-entropy between the centred, sharpened teacher and the student over all pairs of different views.

    The centre (an EMA of the teacher's mean logits over the global batch) is a buffer, so it is checkpointed.
    """

    center: torch.Tensor

    def __init__(
        self,
        out_dim: int,
        n_global: int = 2,
        n_views: int = 12,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
    ):
        super().__init__()
        if n_views < n_global or n_global < 1 or not _pair_mask(n_global, n_views, torch.device("cpu")).any():
            raise ValueError(f"need at least one pair of different views (n_global={n_global}, n_views={n_views})")
        self.n_global, self.n_views = n_global, n_views
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def teacher_probs(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """softmax((t - center) / temp) in fp32, without gradient."""
        with torch.no_grad():
            return F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)

    def forward(
        self, student_logits_per_view: torch.Tensor, teacher_logits_global_views: torch.Tensor, teacher_temp: float
    ) -> torch.Tensor:
        """``student_logits_per_view``: (n_views*B, K) in view order; ``teacher_logits_global_views``:
        (n_global*B, K). Updates the centre after computing the loss, as DINO does."""
        batch = _split(student_logits_per_view.shape[0], self.n_views, "student_logits_per_view")
        if teacher_logits_global_views.shape[0] != self.n_global * batch:
            raise ValueError(
                f"teacher logits have {teacher_logits_global_views.shape[0]} rows, expected {self.n_global}x{batch}"
            )
        with torch.autocast(student_logits_per_view.device.type, enabled=False):
            q = self.teacher_probs(teacher_logits_global_views, teacher_temp)
            log_p = F.log_softmax(student_logits_per_view.float() / self.student_temp, dim=-1)
            # For each (g, v), sum_b sum_k q[g,b,k] * log_p[v,b,k] is one dot product over the flattened (b, k):
            # a single (G, B*K) @ (B*K, V) matmul instead of G*V elementwise passes.
            cross = q.reshape(self.n_global, -1) @ log_p.reshape(self.n_views, -1).T  # (G, V)
            mask = _pair_mask(self.n_global, self.n_views, cross.device)
            loss = -cross[mask].mean() / batch
        self.update_center(teacher_logits_global_views)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        batch_center = teacher_logits.float().sum(dim=0, keepdim=True)
        count = teacher_logits.shape[0]
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            count *= dist.get_world_size()
        m = self.center_momentum
        self.center.copy_(self.center * m + batch_center / count * (1 - m))


def _block_logsumexp(x: torch.Tensor, block: torch.Tensor, temp: float) -> torch.Tensor:
    return torch.logsumexp(x @ block.T / temp, dim=-1)


class MemoryAlignmentLoss(nn.Module):
    """Aligns each student view with the teacher's view of the memory.

    For teacher global view g and student view v != g, the target is softmax(t_g . M / tau_t) over all filled
    memory rows M and the prediction log_softmax(s_v . M / tau_s); the loss is their cross-entropy averaged over
    pairs and samples. The softmaxes run over the WHOLE memory but are computed block by block so that no
    (rows x 65,536) matrix is kept for backward:

    * teacher side (no grad): an online softmax over blocks (running max, running sum, as in flash attention)
      yields w_g = sum_n q_n M_n, the teacher-weighted mean memory row;
    * since sum_n q_n = 1, CE = logsumexp_n(s_v . M_n / tau_s) - s_v . w_g / tau_s; the logsumexp is combined
      from per-block logsumexps, each under activation checkpointing, so backward holds one block at a time.
    """

    def __init__(self, student_temp: float = 0.1, teacher_temp: float = 0.05, n_global: int = 2):
        super().__init__()
        self.student_temp, self.teacher_temp, self.n_global = student_temp, teacher_temp, n_global

    @torch.no_grad()
    def teacher_targets(self, teacher_emb: torch.Tensor, blocks: list[torch.Tensor]) -> torch.Tensor:
        """(rows, D): sum over memory rows of softmax(t . M / tau_t) * M, one block at a time."""
        t = teacher_emb.float()
        run_max = t.new_full((t.shape[0], 1), float("-inf"))
        run_sum = t.new_zeros((t.shape[0], 1))
        acc = t.new_zeros(t.shape)
        for block in blocks:
            logits = t @ block.T / self.teacher_temp
            new_max = torch.maximum(run_max, logits.amax(dim=-1, keepdim=True))
            rescale = torch.exp(run_max - new_max)  # 0 on the first block (exp(-inf))
            p = torch.exp(logits - new_max)
            run_sum = run_sum * rescale + p.sum(dim=-1, keepdim=True)
            acc = acc * rescale + p @ block
            run_max = new_max
        return acc / run_sum

    def forward(self, student_emb: torch.Tensor, teacher_emb: torch.Tensor, memory: MemoryQueue) -> torch.Tensor:
        """``student_emb``: (n_views*B, D) normalised, view order; ``teacher_emb``: (n_global*B, D).
        Zero while the memory is empty (and always for the size-0 ablation)."""
        blocks = [b.float() for b in memory.blocks()]
        if not blocks:
            return student_emb.new_zeros((), dtype=torch.float32)
        batch = _split(teacher_emb.shape[0], self.n_global, "teacher_emb")
        n_views = _split(student_emb.shape[0], batch, "student_emb")
        with torch.autocast(student_emb.device.type, enabled=False):
            s = student_emb.float()
            w = self.teacher_targets(teacher_emb.detach(), blocks)
            parts = [
                checkpoint(_block_logsumexp, s, b, self.student_temp, use_reentrant=False, preserve_rng_state=False)
                for b in blocks
            ]
            lse = torch.logsumexp(torch.stack(parts), dim=0).view(1, n_views, batch)
            cross = torch.einsum("vbd,gbd->gvb", s.view(n_views, batch, -1), w.view(self.n_global, batch, -1))
            ce = lse - cross / self.student_temp  # (G, V, B)
            return ce[_pair_mask(self.n_global, n_views, ce.device)].mean()


__all__ = ["DINOLoss", "MemoryAlignmentLoss"]
