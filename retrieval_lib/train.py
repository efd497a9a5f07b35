"""A tiny training toolkit: the contrastive loss, GeM's closed-form gradients, pair mining,
and a loop that fits pooling parameters (e.g. GeM's ``p``) on cached feature maps.

The backbone stays frozen: only the pooling layer learns, on feature maps computed once.
That is enough to watch GeM's exponent move away from its initial value on a laptop; the
papers fine-tune the whole network (Radenović et al. learn ``p`` jointly with ResNet-101
on SfM-120k, TPAMI 2018). Taught in ``notebooks/03_gem.ipynb``.

Functions:

* :func:`contrastive_loss` -- the contrastive loss of Radenović, Tolias & Chum.
* :func:`gem_grads` -- the closed-form derivatives of GeM w.r.t. the map and ``p``.
* :func:`split_groups`, :func:`mine_pairs` -- training pairs from group labels.
* :func:`pool_images`, :func:`fit_pooling` -- pool maps of any sizes with gradients, and
  the optimisation loop.
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import functional

__all__ = [
    "contrastive_loss",
    "gem_grads",
    "split_groups",
    "mine_pairs",
    "pool_images",
    "fit_pooling",
]


# ----------------------------------------------------------------------------------------
# the loss
# ----------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------
# GeM's gradients in closed form
# ----------------------------------------------------------------------------------------
def gem_grads(x: torch.Tensor, p: Union[float, torch.Tensor], eps: float = 1e-6):
    """Closed-form derivatives of GeM ``f_k = (1/N sum_i x_ik^p_k)^(1/p_k)`` (``N = H W``).

    With ``x`` clamped to ``>= eps`` as in :func:`functional.gem` and ``M_k = 1/N sum_i x_ik^p``::

        d f_k / d x_ik = 1/N * f_k^(1 - p) * x_ik^(p - 1)      (0 where x_ik <= eps: the clamp)
        d f_k / d p_k  = f_k * ( -log(M_k) / p^2 + sum_i x_ik^p log x_ik / (p sum_i x_ik^p) )

    Shapes: ``x (B, C, H, W)``, ``p`` a float or a tensor ``(1,)``/``(C,)``; returns
    ``(dfdx (B, C, H, W), dfdp (B, C))`` where ``dfdp[b, k]`` is the derivative of
    ``f[b, k]`` w.r.t. its own exponent (for one shared ``p`` the gradient of a loss sums
    over ``b`` and ``k``). Use float64 to compare with autograd to ~1e-12.

    Source: GeM, Radenović, Tolias & Chum, TPAMI 2018 (they give both derivatives to
    make ``p`` learnable by back-propagation). Taught in ``notebooks/03_gem.ipynb``.
    """
    functional._check_fmap(x, "gem_grads")
    functional._check_eps(eps, "gem_grads")
    functional._check_p(p, x.shape[1], "gem_grads")
    if isinstance(p, torch.Tensor):
        p = p.detach().to(dtype=x.dtype, device=x.device).reshape(-1)  # (1,) or (C,)
    else:
        p = torch.full((1,), float(p), dtype=x.dtype, device=x.device)
    N = x.shape[-2] * x.shape[-1]
    pc = p.reshape(1, -1, 1, 1)  # broadcast over (B, C, H, W)
    xc = x.clamp(min=eps)
    xp = xc.pow(pc)  # (B, C, H, W)
    S = xp.sum(dim=(-2, -1))  # (B, C)
    M = S / N
    pk = p.reshape(1, -1)  # (1, 1) or (1, C)
    f = M.pow(1.0 / pk)  # (B, C)
    dfdx = f.pow(1.0 - pk)[..., None, None] * xc.pow(pc - 1.0) / N
    dfdx = torch.where(x > eps, dfdx, torch.zeros_like(dfdx))  # the clamp passes no gradient
    dfdp = f * (-M.log() / pk**2 + (xp * xc.log()).sum(dim=(-2, -1)) / (pk * S))
    return dfdx, dfdp


# ----------------------------------------------------------------------------------------
# training pairs
# ----------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------
# pooling with gradients, and the loop
# ----------------------------------------------------------------------------------------
def pool_images(fmaps: Sequence[torch.Tensor], pooling, indices) -> torch.Tensor:
    """L2-normalised descriptors ``(len(indices), D)`` of some maps, keeping gradients.

    ``fmaps`` is a list of ``(C, h, w)`` maps of any sizes; maps of equal size are pooled
    in one batch (no Python loop over images), and gradients flow into ``pooling``'s
    parameters (e.g. GeM's ``p``). Maps move to the device of ``pooling``'s parameters.
    """
    idx = [int(i) for i in (indices.tolist() if hasattr(indices, "tolist") else indices)]
    if not idx:
        raise ValueError("pool_images: no indices given")
    params = list(pooling.parameters()) if isinstance(pooling, nn.Module) else []
    device = params[0].device if params else fmaps[idx[0]].device
    groups: dict = {}
    for pos, i in enumerate(idx):
        groups.setdefault(tuple(fmaps[i].shape), []).append(pos)
    parts, order = [], []
    for positions in groups.values():
        x = torch.stack([fmaps[idx[q]] for q in positions]).to(device)  # (b, C, h, w)
        parts.append(functional.l2n(pooling(x)))  # (b, D)
        order += positions
    out = torch.cat(parts)  # rows in `order`
    inverse = torch.empty(len(order), dtype=torch.int64, device=out.device)
    inverse[torch.tensor(order, device=out.device)] = torch.arange(len(order), device=out.device)
    return out[inverse]


def fit_pooling(fmaps: Sequence[torch.Tensor], pooling: nn.Module, i, j, y, steps: int = 20,
                lr: float = 0.1, margin: float = 0.7, progress: bool = True) -> dict:
    """Fit a pooling layer's parameters with Adam on the contrastive loss of given pairs.

    Every step pools the maps of all images in the pairs (:func:`pool_images`), computes
    :func:`contrastive_loss` (mean) of the pairs ``(i[n], j[n])`` with labels ``y[n]`` and
    takes one Adam step of size ``lr``. The backbone is not involved: ``fmaps`` are fixed.

    Returns ``{"loss": [...], "params": [...]}`` with ``steps + 1`` entries each: the loss and
    a copy of the parameters (a dict name -> tensor) before every step and after the last.
    Raises ``ValueError`` when the layer has no trainable parameter.
    """
    params = [q for q in pooling.parameters() if q.requires_grad]
    if not params:
        raise ValueError("fit_pooling: the pooling layer has no trainable parameter (e.g. build "
                         "GeM(learn_p=True))")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"fit_pooling: steps must be an integer >= 0, got {steps!r}")
    i = torch.as_tensor(i).reshape(-1)
    j = torch.as_tensor(j).reshape(-1)
    y = torch.as_tensor(y).reshape(-1)
    if not (i.shape == j.shape == y.shape) or i.numel() == 0:
        raise ValueError("fit_pooling: i, j and y must be non-empty and of equal length (one per pair)")
    uniq, inv = torch.unique(torch.cat([i, j]), return_inverse=True)
    pi, pj = inv[: i.numel()], inv[i.numel():]
    opt = torch.optim.Adam(params, lr=lr)
    history = {"loss": [], "params": []}

    def snapshot():
        return {name: q.detach().clone() for name, q in pooling.named_parameters()}

    def loss_now():
        D = pool_images(fmaps, pooling, uniq)
        return contrastive_loss(D[pi.to(D.device)], D[pj.to(D.device)], y.to(D.device), margin)

    for _ in tqdm(range(steps), desc="fit pooling", unit="step", disable=not progress):
        opt.zero_grad()
        loss = loss_now()
        history["loss"].append(float(loss.detach()))
        history["params"].append(snapshot())
        loss.backward()
        opt.step()
    with torch.no_grad():
        history["loss"].append(float(loss_now()))
    history["params"].append(snapshot())
    return history
