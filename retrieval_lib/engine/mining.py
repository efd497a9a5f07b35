"""Training pairs from group labels: a split by group and mined hard negatives.

Taught in ``notebooks/03_gem.ipynb``.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["split_groups", "mine_pairs"]


def split_groups(labels, frac: float = 0.5, seed: int = 0) -> np.ndarray:
    """Split images by group: ``(N,)`` bool, True for images of the training groups.

    The groups (distinct labels) are shuffled with ``seed`` and the first
    ``round(frac * n_groups)`` become training groups; every image of a group falls on the
    same side, so no object is seen in training and testing. Raises ``ValueError`` unless
    both sides get at least one group.
    """
    lab = np.asarray(labels)
    if lab.ndim != 1 or lab.size == 0:
        raise ValueError(f"split_groups: labels must be a non-empty 1-D array, got shape {lab.shape}")
    groups = np.unique(lab)
    n_train = int(round(frac * len(groups)))
    if not 0 < n_train < len(groups):
        raise ValueError(f"split_groups: frac={frac} puts {n_train} of {len(groups)} groups in training; "
                         "both sides need at least one group (use 0 < frac < 1 and more groups)")
    rng = np.random.default_rng(seed)
    train_groups = rng.permutation(groups)[:n_train]
    return np.isin(lab, train_groups)


def mine_pairs(X: torch.Tensor, labels, n_neg: int = 5, mask=None):
    """Training pairs from group labels: every matching pair, plus hard non-matching ones.

    * Positives: every pair ``(i, j)``, ``i < j``, of images with the same label.
    * Negatives: for each image that has a positive, its ``n_neg`` most similar images
      (largest ``X @ X.T``) with another label -- the hard negatives of Radenović et al.,
      mined here once from the descriptors ``X`` you pass.

    Only images with ``mask`` True (``(N,)`` bool, default all) take part. Shapes ``X (N, D)``,
    ``labels (N,)``; returns int64 tensors ``(i, j, y)`` on ``X``'s device, positives first
    (``y = 1``), then negatives (``y = 0``). Raises ``ValueError`` when there is no positive pair.
    """
    if not isinstance(X, torch.Tensor) or X.dim() != 2:
        raise ValueError("mine_pairs: X must be a (N, D) tensor of descriptors")
    n = X.shape[0]
    lab = torch.as_tensor(np.asarray(labels), device=X.device)
    if lab.shape != (n,):
        raise ValueError(f"mine_pairs: labels must have shape ({n},), one per row of X, got {tuple(lab.shape)}")
    if isinstance(n_neg, bool) or not isinstance(n_neg, int) or n_neg < 0:
        raise ValueError(f"mine_pairs: n_neg must be an integer >= 0, got {n_neg!r}")
    keep = torch.ones(n, dtype=torch.bool, device=X.device) if mask is None else \
        torch.as_tensor(np.asarray(mask), dtype=torch.bool, device=X.device)
    if keep.shape != (n,):
        raise ValueError(f"mine_pairs: mask must have shape ({n},), got {tuple(keep.shape)}")
    both = keep[:, None] & keep[None, :]
    same = (lab[:, None] == lab[None, :]) & both
    pos = torch.triu(same, diagonal=1).nonzero()  # (P, 2), i < j
    if pos.shape[0] == 0:
        raise ValueError("mine_pairs: no two kept images share a label, so there is no matching pair "
                         "to learn from; keep more images per group")
    i_pos, j_pos = pos[:, 0], pos[:, 1]
    anchors = (same.sum(dim=1) > 1).nonzero().flatten()  # images with a positive (besides themselves)
    parts_i, parts_j = [i_pos], [j_pos]
    k = min(n_neg, n)
    if k > 0 and anchors.numel():
        S = X[anchors] @ X.T  # (A, N)
        valid = both[anchors] & (lab[anchors][:, None] != lab[None, :])
        S = S.masked_fill(~valid, float("-inf"))
        top = S.topk(k, dim=1)
        real = torch.isfinite(top.values)  # fewer than k valid negatives: drop the -inf fill
        parts_i.append(anchors[:, None].expand(-1, k)[real])
        parts_j.append(top.indices[real])
    i = torch.cat(parts_i)
    j = torch.cat(parts_j)
    y = torch.zeros(i.shape[0], dtype=torch.int64, device=X.device)
    y[: i_pos.shape[0]] = 1
    return i, j, y
