"""Losses for learning descriptors. Shapes: descriptors ``(N, D)``, normally L2-normalised.

* :func:`contrastive_loss` -- Radenović, Tolias & Chum, TPAMI 2018 (taught in ``03_gem``).
"""
from __future__ import annotations

import math

import torch

__all__ = ["contrastive_loss"]


def contrastive_loss(x1: torch.Tensor, x2: torch.Tensor, label: torch.Tensor, margin: float = 0.7,
                     reduction: str = "mean") -> torch.Tensor:
    """Contrastive loss of a batch of descriptor pairs.

    For pair ``n`` with distance ``d_n = ||x1_n - x2_n||_2`` and ``label_n`` 1 (matching)
    or 0 (non-matching)::

        L_n = 1/2 * label_n * d_n^2 + 1/2 * (1 - label_n) * max(0, margin - d_n)^2

    Matching pairs are pulled together; non-matching pairs are pushed until they are at
    least ``margin`` apart, and cost nothing beyond it. Shapes ``x1, x2 (N, D)`` (normally
    L2-normalised, so ``0 <= d <= 2``), ``label (N,)``; returns a scalar, the mean
    (``reduction="mean"``) or the sum (``"sum"``, as cirtorch does) of ``L_n``. cirtorch's
    default margin is 0.7 (its README trains ResNet-101 GeM with 0.85).

    Source: Radenović, Tolias & Chum, "Fine-tuning CNN image retrieval with no human
    annotation", TPAMI 2018 (contrastive loss). Taught in ``notebooks/03_gem.ipynb``.
    """
    if not (isinstance(x1, torch.Tensor) and isinstance(x2, torch.Tensor)):
        raise TypeError("contrastive_loss: x1 and x2 must be tensors of shape (N, D)")
    if x1.dim() != 2 or x1.shape != x2.shape:
        raise ValueError(f"contrastive_loss: x1 and x2 must both be (N, D) of the same shape, got "
                         f"{tuple(x1.shape)} and {tuple(x2.shape)}")
    label = torch.as_tensor(label, device=x1.device)
    if label.shape != (x1.shape[0],):
        raise ValueError(f"contrastive_loss: label must have shape ({x1.shape[0]},), one per pair, got "
                         f"{tuple(label.shape)}")
    if label.numel() and not bool(((label == 0) | (label == 1)).all()):
        raise ValueError("contrastive_loss: label must hold 1 (matching pair) or 0 (non-matching pair)")
    if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin > 0):
        raise ValueError(f"contrastive_loss: margin must be a positive number (e.g. 0.7), got {margin!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"contrastive_loss: reduction must be 'mean' or 'sum', got {reduction!r}")
    y = label.to(x1.dtype)
    sq = (x1 - x2).pow(2).sum(dim=-1)  # (N,) squared distances
    d = sq.clamp(min=1e-24).sqrt()  # the clamp keeps the gradient finite for identical vectors
    loss = 0.5 * y * sq + 0.5 * (1.0 - y) * (margin - d).clamp(min=0).pow(2)
    return loss.mean() if reduction == "mean" else loss.sum()
