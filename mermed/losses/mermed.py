"""The published MerMED-FM objective: student and teacher views scored against the memory, compared block-wise.

Each embedding is scored against every memory row (logits = e . M / temp). The K memory columns are shuffled
by a fresh permutation every step and cut into K / block_size blocks, each its own softmax; the loss is the
cross-entropy of the teacher's block softmaxes against the student's over every pair of different views. Once
the memory holds no row of unknown modality, each row only sees memory rows of its own modality.

Everything runs in fp32 with autocast off: softmaxes over 16k-65k columns lose too much in bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mermed.losses.dino import _pair_mask, _split
from mermed.memory import MemoryQueue

# Masked logits: finite so that a block with no column of the row's modality yields no NaN (its probabilities
# are zeroed explicitly); far enough below any real logit (|e . m| / temp <= 1 / temp) that exp() is exactly 0.
_MASKED = -1e30


class MerMEDLoss(nn.Module):
    """Block-wise cross-entropy between teacher and student memory similarities.

    Masked memory entries contribute nothing; a (row, block) with no entry of the row's modality contributes
    zero but still counts in the mean over blocks and rows (as in the authors' masked cross-entropy).
    """

    def __init__(self, n_global: int = 2, n_views: int = 12, student_temp: float = 0.1, block_size: int = 16384):
        super().__init__()
        if n_views < n_global or n_global < 1 or not _pair_mask(n_global, n_views, torch.device("cpu")).any():
            raise ValueError(f"need at least one pair of different views (n_global={n_global}, n_views={n_views})")
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.n_global, self.n_views, self.student_temp, self.block_size = n_global, n_views, student_temp, block_size

    def _n_blocks(self, memory: MemoryQueue) -> int:
        if memory.init != "random":
            raise ValueError("MerMEDLoss scores every memory slot: it needs the published init='random' memory")
        if memory.size == 0 or memory.size % self.block_size:
            raise ValueError(f"block_size {self.block_size} must divide the memory size {memory.size}")
        return memory.size // self.block_size

    def _partitioned(
        self, memory: MemoryQueue, modality_ids: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The memory rows in a fresh random order, (K, D) fp32, and which of them each sample may see, (B, K).

        Permuting the (K, D) memory rather than the (rows, K) logits keeps the copy small. The check for unknown
        slots stays on the device (no host sync)."""
        perm = torch.randperm(memory.size, generator=generator, device=memory.bank.device)
        bank = memory.bank[perm].float()
        all_known = (memory.modality >= 0).all()
        valid = (modality_ids.to(memory.modality.device)[:, None] == memory.modality[perm][None, :]) | ~all_known
        return bank, valid

    @torch.no_grad()
    def _teacher_probs(
        self, teacher_emb: torch.Tensor, bank: torch.Tensor, valid: torch.Tensor, teacher_temp: float, n_blocks: int
    ) -> torch.Tensor:
        """(G, B, n_blocks, block_size) block softmaxes, exactly 0 on masked entries."""
        batch = valid.shape[0]
        t = (teacher_emb.float() / teacher_temp) @ bank.T
        t = t.view(self.n_global, batch, -1).masked_fill_(~valid, _MASKED)
        q = F.softmax(t.view(self.n_global, batch, n_blocks, self.block_size), dim=-1)
        return q * valid.view(1, batch, n_blocks, self.block_size)

    def _check(self, student_emb: torch.Tensor | None, teacher_emb: torch.Tensor, modality_ids: torch.Tensor) -> int:
        batch = _split(teacher_emb.shape[0], self.n_global, "teacher_emb")
        if student_emb is not None and student_emb.shape[0] != self.n_views * batch:
            raise ValueError(f"student_emb has {student_emb.shape[0]} rows, expected {self.n_views}x{batch}")
        if modality_ids.shape != (batch,):
            raise ValueError(f"modality_ids must be per sample, ({batch},), got {tuple(modality_ids.shape)}")
        return batch

    def forward(
        self,
        student_emb: torch.Tensor,
        teacher_emb: torch.Tensor,
        modality_ids: torch.Tensor,
        memory: MemoryQueue,
        teacher_temp: float,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``student_emb``: (n_views*B, D), ``teacher_emb``: (n_global*B, D), both in view order (view 0's batch
        first); ``modality_ids``: (B,), the same for every view. ``generator`` (on the memory's device) draws the
        partition, so that a resumed run with a restored generator repeats it. The memory is only read: enqueue
        the second global view's teacher embeddings after the step."""
        batch = self._check(student_emb, teacher_emb, modality_ids)
        n_blocks = self._n_blocks(memory)
        with torch.autocast(student_emb.device.type, enabled=False):
            bank, valid = self._partitioned(memory, modality_ids, generator)
            q = self._teacher_probs(teacher_emb.detach(), bank, valid, teacher_temp, n_blocks)
            s = (student_emb.float() / self.student_temp) @ bank.T
            s = s.view(self.n_views, batch, -1).masked_fill_(~valid, _MASKED)
            log_p = F.log_softmax(s.view(self.n_views, batch, n_blocks, self.block_size), dim=-1)
            # sum over (b, block, k) of q[g] * log_p[v] for all (g, v) at once: one (G, B*K) @ (B*K, V) matmul.
            cross = q.reshape(self.n_global, -1) @ log_p.reshape(self.n_views, -1).T
            mask = _pair_mask(self.n_global, self.n_views, cross.device)
            return -cross[mask].mean() / (batch * n_blocks)

    @torch.no_grad()
    def teacher_entropy(
        self,
        teacher_emb: torch.Tensor,
        modality_ids: torch.Tensor,
        memory: MemoryQueue,
        teacher_temp: float,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Collapse monitor: per teacher row, (n_global*B,), the entropy of its block softmaxes and the largest
        entropy they could have, ln(number of columns the row sees in the block), both averaged over blocks.

        A ratio near 1 is a uniform (collapsed-flat) teacher, near 0 a one-hot one. Pass a generator other than
        the training one, so that how often this is logged cannot change the training partitions."""
        batch = self._check(None, teacher_emb, modality_ids)
        n_blocks = self._n_blocks(memory)
        with torch.autocast(teacher_emb.device.type, enabled=False):
            bank, valid = self._partitioned(memory, modality_ids, generator)
            q = self._teacher_probs(teacher_emb, bank, valid, teacher_temp, n_blocks)
            entropy = -torch.special.xlogy(q, q).sum(dim=-1).mean(dim=-1)  # (G, B)
            seen = valid.view(batch, n_blocks, self.block_size).sum(dim=-1).float()
            ceiling = torch.where(seen > 0, seen.clamp_min(1).log(), 0.0).mean(dim=-1)  # (B,)
            return entropy.reshape(-1), ceiling.repeat(self.n_global)

    def extra_repr(self) -> str:
        return (
            f"n_global={self.n_global}, n_views={self.n_views}, student_temp={self.student_temp}, "
            f"block_size={self.block_size}"
        )


__all__ = ["MerMEDLoss"]
