"""Pretraining objectives: the published MerMED memory objective and the DINO ablation (``loss.objective``)."""

from mermed.losses.dino import DINOLoss, MemoryAlignmentLoss
from mermed.losses.koleo import KoLeoLoss
from mermed.losses.mermed import MerMEDLoss

__all__ = ["DINOLoss", "KoLeoLoss", "MemoryAlignmentLoss", "MerMEDLoss"]
