"""The MerMED memory: a non-differentiable FIFO of L2-normalised teacher embeddings and their modality ids.

All state lives in buffers so that it is saved with the training state (queues elsewhere were silently dropped
from checkpoints, lightly #993), and the write pointer advances by exactly the number of rows written, so no slot
is ever skipped when a batch does not divide the size (seen in mugs).

Two starts: ``"random"`` is the published memory (random unit vectors of unknown modality, -1, so it is full from
the first step and the modality mask switches on once every random row has been replaced); ``"empty"`` starts
from zeros and grows, which the DINO ablation's ``MemoryAlignmentLoss`` relies on (``filled`` / ``blocks()``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

UNKNOWN_MODALITY = -1
MemoryInit = Literal["random", "empty"]


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
    """FIFO of ``size`` rows of width ``dim`` with one modality id per row, split into ``n_blocks`` equal blocks
    for the ablation's block-wise similarity.

    With ``init="empty"`` rows fill ``bank[0:filled]`` first; once full (and from the start with ``"random"``),
    the oldest rows are overwritten from ``ptr`` on. ``ptr`` and ``filled`` are buffers for checkpoints, mirrored by
    host integers that the queue reads, so that a training step never waits for the device to learn them.
    """

    bank: torch.Tensor
    modality: torch.Tensor
    ptr: torch.Tensor
    filled: torch.Tensor

    def __init__(
        self,
        size: int = 65536,
        dim: int = 256,
        n_blocks: int = 4,
        init: MemoryInit = "empty",
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if size < 0 or dim < 1 or n_blocks < 1 or size % n_blocks:
            raise ValueError(f"invalid memory: size={size}, dim={dim}, n_blocks={n_blocks} (n_blocks must divide size)")
        if init not in ("random", "empty"):
            raise ValueError(f"memory init must be 'random' or 'empty', got {init!r}")
        self.size, self.dim, self.n_blocks, self.init = size, dim, n_blocks, init
        if init == "random":
            bank = F.normalize(torch.randn(size, dim, generator=generator), dim=-1)
        else:
            bank = torch.zeros(size, dim)
        self.register_buffer("bank", bank)
        self.register_buffer("modality", torch.full((size,), UNKNOWN_MODALITY, dtype=torch.int64))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.int64))
        self.register_buffer("filled", torch.tensor(size if init == "random" else 0, dtype=torch.int64))
        self._ptr, self._filled = 0, size if init == "random" else 0
        self.register_load_state_dict_post_hook(lambda module, _keys: module._read_positions())

    def _read_positions(self) -> None:
        """Host copies of ``ptr`` and ``filled`` after a checkpoint was loaded (one sync, at load time)."""
        self._ptr, self._filled = int(self.ptr), int(self.filled)

    @torch.no_grad()
    def enqueue(self, x: torch.Tensor, modality_ids: torch.Tensor | None = None) -> int:
        """Append the rows of ``x`` (normalised) and their modality ids (unknown when None), both gathered from
        every worker first; returns rows written. Every rank gathers the ids, None or not, so that all ranks run
        the same collectives."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"enqueue expects (N, {self.dim}) embeddings, got {tuple(x.shape)}")
        if modality_ids is None:
            modality_ids = torch.full((x.shape[0],), UNKNOWN_MODALITY, dtype=torch.int64, device=x.device)
        elif modality_ids.shape != (x.shape[0],):
            raise ValueError(f"enqueue expects ({x.shape[0]},) modality ids, got {tuple(modality_ids.shape)}")
        if self.size == 0:  # the ablation: every rank skips the gather alike
            return 0
        x = all_gather_rows(x.detach())
        ids = all_gather_rows(modality_ids.detach().to(device=x.device, dtype=torch.int64))
        if x.shape[0] == 0:
            return 0
        x = F.normalize(x[-self.size :].to(self.bank.dtype), dim=-1)  # more rows than slots: the newest win
        ids = ids[-self.size :]
        n = x.shape[0]
        ptr = self._ptr
        first = min(n, self.size - ptr)
        self.bank[ptr : ptr + first] = x[:first]
        self.bank[: n - first] = x[first:]  # wrap-around; empty when it fits before the end
        self.modality[ptr : ptr + first] = ids[:first]
        self.modality[: n - first] = ids[first:]
        self._ptr, self._filled = (ptr + n) % self.size, min(self._filled + n, self.size)
        self.ptr.fill_(self._ptr)
        self.filled.fill_(self._filled)
        return n

    def blocks(self) -> Iterator[torch.Tensor]:
        """Views of the filled part of each block (blocks not yet written are skipped)."""
        filled = self._filled
        if self.size == 0:
            return
        block = self.size // self.n_blocks
        for start in range(0, filled, block):
            yield self.bank[start : min(start + block, filled)]

    def modality_counts(self) -> dict[int, int]:
        """Filled slots per modality id (-1: unknown, e.g. the random start), for logging."""
        values, counts = torch.unique(self.modality[: self._filled], return_counts=True)
        return dict(zip(values.tolist(), counts.tolist(), strict=True))

    @property
    def fill_fraction(self) -> float:
        return self._filled / self.size if self.size else 0.0

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, n_blocks={self.n_blocks}, init={self.init}"


__all__ = ["UNKNOWN_MODALITY", "MemoryInit", "MemoryQueue", "all_gather_rows"]
