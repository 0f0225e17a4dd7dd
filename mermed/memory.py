"""The MerMED memory: a non-differentiable FIFO of L2-normalised teacher embeddings.

All state lives in buffers so that it is saved with the training state (queues elsewhere were silently dropped
from checkpoints, lightly #993), and the write pointer advances by exactly the number of rows written, so no slot
is ever skipped when a batch does not divide the size (seen in mugs).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every worker in rank order (the same result on every rank); ``x`` itself when
    not distributed. Workers may hold different row counts."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    world = dist.get_world_size()
    count = torch.tensor([x.shape[0]], device=x.device, dtype=torch.int64)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    longest = max(sizes)
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])


class MemoryQueue(nn.Module):
    """FIFO of ``size`` rows of width ``dim``, split into ``n_blocks`` equal blocks for block-wise similarity.

    Rows fill ``bank[0:filled]`` first; once full, the oldest rows are overwritten from ``ptr`` on.
    """

    bank: torch.Tensor
    ptr: torch.Tensor
    filled: torch.Tensor

    def __init__(self, size: int = 65536, dim: int = 256, n_blocks: int = 4):
        super().__init__()
        if size < 0 or dim < 1 or n_blocks < 1 or size % n_blocks:
            raise ValueError(f"invalid memory: size={size}, dim={dim}, n_blocks={n_blocks} (n_blocks must divide size)")
        self.size, self.dim, self.n_blocks = size, dim, n_blocks
        self.register_buffer("bank", torch.zeros(size, dim))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.int64))
        self.register_buffer("filled", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def enqueue(self, x: torch.Tensor) -> int:
        """Append the rows of ``x`` (gathered from every worker first), normalised; returns rows written."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"enqueue expects (N, {self.dim}) embeddings, got {tuple(x.shape)}")
        if self.size == 0:  # the ablation: every rank skips the gather alike
            return 0
        x = all_gather_rows(x.detach())
        if x.shape[0] == 0:
            return 0
        x = F.normalize(x[-self.size :].to(self.bank.dtype), dim=-1)  # more rows than slots: the newest win
        n = x.shape[0]
        ptr = int(self.ptr)
        first = min(n, self.size - ptr)
        self.bank[ptr : ptr + first] = x[:first]
        self.bank[: n - first] = x[first:]  # wrap-around; empty when it fits before the end
        self.ptr.fill_((ptr + n) % self.size)
        self.filled.fill_(min(int(self.filled) + n, self.size))
        return n

    def blocks(self) -> Iterator[torch.Tensor]:
        """Views of the filled part of each block (blocks not yet written are skipped)."""
        filled = int(self.filled)
        if self.size == 0:
            return
        block = self.size // self.n_blocks
        for start in range(0, filled, block):
            yield self.bank[start : min(start + block, filled)]

    @property
    def fill_fraction(self) -> float:
        return int(self.filled) / self.size if self.size else 0.0

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, n_blocks={self.n_blocks}"


__all__ = ["MemoryQueue", "all_gather_rows"]
