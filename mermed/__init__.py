"""MerMED: a multimodal medical imaging foundation model (MerMED-FM) trained with Ray."""

__version__ = "0.1.0"
