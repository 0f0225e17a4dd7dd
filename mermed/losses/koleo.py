"""KoLeo regulariser (Sablayrolles et al., "Spreading vectors for similarity search"; as in DINOv2).

Penalises each embedding's distance to its nearest neighbour in the batch, pushing the batch to spread out
uniformly on the sphere. MerMED applies it to the student's global views (weight 0 in the published run).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KoLeoLoss(nn.Module):
    """-mean log(distance to nearest neighbour) over L2-normalised rows, in fp32 with autocast off.

    ``eps`` both guards the normalisation and sits inside the pairwise distance and the log, so duplicate rows
    give a large but finite loss and gradient. The neighbour is chosen without gradient (largest dot product of
    unit vectors, i.e. smallest distance); the gradient flows through the distance only.
    """

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor, n_groups: int = 1) -> torch.Tensor:
        """``x``: (n_groups*B, D), rows in group order (e.g. one group per global view); neighbours are searched
        within each group and the loss is the mean over groups."""
        if x.ndim != 2 or x.shape[0] % n_groups:
            raise ValueError(f"KoLeo expects (n_groups*B, D) rows with n_groups={n_groups}, got {tuple(x.shape)}")
        batch = x.shape[0] // n_groups
        if batch < 2:
            raise ValueError("KoLeo needs at least two rows per group (a nearest neighbour)")
        with torch.autocast(x.device.type, enabled=False):
            z = F.normalize(x.float(), p=2, dim=-1, eps=self.eps).view(n_groups, batch, -1)
            with torch.no_grad():
                dots = z @ z.transpose(1, 2)
                dots.diagonal(dim1=1, dim2=2).fill_(float("-inf"))
                nearest = dots.argmax(dim=-1)  # (G, B)
            neighbours = torch.take_along_dim(z, nearest[..., None], dim=1)
            distances = F.pairwise_distance(z, neighbours, p=2, eps=self.eps)
            return -torch.log(distances + self.eps).mean()


__all__ = ["KoLeoLoss"]
