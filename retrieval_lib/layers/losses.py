"""Losses for learning descriptors. Shapes: descriptors ``(N, D)``, normally L2-normalised.

Each loss returns the mean over its pairs, triplets or anchors (a scalar tensor).

* :func:`contrastive_loss` -- Radenović, Tolias & Chum, TPAMI 2018; Wu et al., ICIP 2018 Eq. 1
  (taught in ``03_gem`` and ``05_wgem``).
* :func:`triplet_loss` -- a margin between the positive and the negative distance of each triplet.
* :func:`batch_hard_triplet_loss` -- Hermans, Beyer & Leibe 2017: per anchor the farthest
  positive and the nearest negative of the batch.
* :func:`smoothed_cross_entropy` -- softmax cross-entropy with label smoothing and a
  temperature, CGD's auxiliary classification loss (Jun et al. 2019).
* :func:`smooth_ap_loss` -- Smooth-AP (Brown, Xie, Kalogeiton & Zisserman, ECCV 2020): one
  minus a sigmoid-smoothed average precision per anchor (taught in ``06_darac``).
* :func:`nra_like_loss` -- a rank-approximation loss after the description of Schall et al.'s
  NRA (MMSP 2019), whose exact equations are not at hand: hence "NRA-like" (``06_darac``).
"""
from __future__ import annotations

import math

import torch

__all__ = ["contrastive_loss", "triplet_loss", "batch_hard_triplet_loss", "smoothed_cross_entropy", "smooth_ap_loss",
           "nra_like_loss"]


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
    annotation", TPAMI 2018 (contrastive loss); the same loss is Eq. 1 of Wu et al.,
    "Deep image retrieval with weighted generalized mean pooling", ICIP 2018. Taught in
    ``notebooks/03_gem.ipynb``.
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


def _check_margin(margin, who: str, allow_zero: bool = False) -> None:
    ok = isinstance(margin, (int, float)) and not isinstance(margin, bool) and math.isfinite(margin)
    if not (ok and (margin >= 0 if allow_zero else margin > 0)):
        need = "a number >= 0" if allow_zero else "a positive number"
        raise ValueError(f"{who}: margin must be {need} (e.g. 0.1), got {margin!r}")


def _distance(a: torch.Tensor, b: torch.Tensor, squared: bool) -> torch.Tensor:
    """Row-wise Euclidean distance ``||a_n - b_n||`` (or its square), ``(N, D) -> (N,)``."""
    sq = (a - b).pow(2).sum(dim=-1)
    return sq if squared else sq.clamp(min=1e-24).sqrt()  # clamp: finite gradient at distance 0


def triplet_loss(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                 margin: float = 0.1, squared: bool = False) -> torch.Tensor:
    """Triplet margin loss, the mean over triplets ``(anchor_n, positive_n, negative_n)``::

        L_n = max(0, d(a_n, p_n) - d(a_n, n_n) + margin),   d(x, y) = ||x - y||_2

    Zero once every negative is at least ``margin`` farther from its anchor than the
    positive. ``squared=True`` uses ``d^2`` instead, as cirtorch's ``TripletLoss`` and
    FaceNet (Schroff et al., CVPR 2015) do; the default (plain distances) is the
    convention of :func:`batch_hard_triplet_loss`, so the two agree on a batch whose
    hardest pairs are the given ones. Shapes ``(N, D)`` each; returns a scalar.
    Taught in ``notebooks/05_wgem.ipynb``.
    """
    for name, t in (("anchor", anchor), ("positive", positive), ("negative", negative)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"triplet_loss: {name} must be a tensor of shape (N, D)")
    if anchor.dim() != 2 or anchor.shape != positive.shape or anchor.shape != negative.shape:
        raise ValueError(f"triplet_loss: anchor, positive and negative must all be (N, D) of the same "
                         f"shape, got {tuple(anchor.shape)}, {tuple(positive.shape)} and "
                         f"{tuple(negative.shape)}")
    if anchor.shape[0] == 0:
        raise ValueError("triplet_loss: no triplets (N = 0); pass at least one row")
    _check_margin(margin, "triplet_loss", allow_zero=True)
    d_pos = _distance(anchor, positive, squared)  # (N,)
    d_neg = _distance(anchor, negative, squared)  # (N,)
    return (d_pos - d_neg + margin).clamp(min=0).mean()


def _pairwise_distance(x: torch.Tensor) -> torch.Tensor:
    """``(N, D) -> (N, N)`` Euclidean distances, from the Gram matrix (no ``(N, N, D)`` tensor)."""
    sq = x.pow(2).sum(dim=1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)).clamp(min=0)
    d2 = d2 * (1 - torch.eye(x.shape[0], dtype=x.dtype, device=x.device))  # exact zeros on the diagonal
    return d2.clamp(min=1e-24).sqrt()


def batch_hard_triplet_loss(embeddings: torch.Tensor, labels, margin: float = 0.1) -> torch.Tensor:
    """Batch-hard triplet loss (Hermans, Beyer & Leibe, "In defense of the triplet loss
    for person re-identification", arXiv 2017), the mean over anchors.

    For every anchor ``a`` of the batch, with ``d`` the (non-squared) Euclidean distance::

        L_a = max(0, max_{p: y_p = y_a, p != a} d(a, p) - min_{n: y_n != y_a} d(a, n) + margin)

    the farthest positive against the nearest negative in the batch. Anchors without a
    positive or without a negative in the batch are left out of the mean. Shapes
    ``embeddings (N, D)``, ``labels (N,)`` (integers); returns a scalar. Batches for it
    come from :class:`~retrieval_lib.engine.mining.PKMiner` (P classes x K images).

    Raises ``ValueError`` when no anchor has both a positive and a negative (e.g. a batch
    of one class, or of singletons): build batches of at least 2 classes x 2 images.
    Taught in ``notebooks/05_wgem.ipynb``.
    """
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2:
        raise ValueError("batch_hard_triplet_loss: embeddings must be a (N, D) tensor")
    n = embeddings.shape[0]
    labels = torch.as_tensor(labels, device=embeddings.device)
    if labels.shape != (n,):
        raise ValueError(f"batch_hard_triplet_loss: labels must have shape ({n},), one per row of "
                         f"embeddings, got {tuple(labels.shape)}")
    _check_margin(margin, "batch_hard_triplet_loss", allow_zero=True)
    D = _pairwise_distance(embeddings)  # (N, N)
    same = labels[:, None] == labels[None, :]
    pos = same & ~torch.eye(n, dtype=torch.bool, device=D.device)
    valid = pos.any(dim=1) & (~same).any(dim=1)  # (N,) anchors with a positive and a negative
    if not bool(valid.any()):
        raise ValueError("batch_hard_triplet_loss: no anchor has both a positive and a negative in "
                         "the batch; build batches of at least 2 classes with 2 images each "
                         "(e.g. PKMiner(P=4, K=2))")
    hardest_pos = D.masked_fill(~pos, float("-inf")).amax(dim=1)  # (N,)
    hardest_neg = D.masked_fill(same, float("inf")).amin(dim=1)  # (N,)
    loss = (hardest_pos - hardest_neg + margin).clamp(min=0)
    return loss[valid].mean()


def smoothed_cross_entropy(logits: torch.Tensor, target, smoothing: float = 0.1,
                           temperature: float = 0.5) -> torch.Tensor:
    """Softmax cross-entropy with label smoothing and temperature, the mean over samples.

    With ``K`` classes, ``z = logits / temperature`` and the smoothed target
    ``q_k = (1 - smoothing) [k = y] + smoothing / K``::

        L_n = - sum_k q_k log softmax(z_n)_k

    Temperature scaling (``temperature < 1`` sharpens the softmax) and label smoothing are
    the two changes CGD makes to its auxiliary classification loss (Jun, Ko, Kim, Kim &
    Kim, "Combination of multiple global descriptors for image retrieval", arXiv 2019,
    which sets ``smoothing=0.1, temperature=0.5``, the defaults here). ``smoothing=0,
    temperature=1`` is the plain cross-entropy. Shapes ``logits (N, K)``, ``target (N,)``
    class indices in ``0..K-1``; returns a scalar.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError("smoothed_cross_entropy: logits must be a (N, K) tensor, one row of class "
                         "scores per sample")
    n, k = logits.shape
    if n == 0:
        raise ValueError("smoothed_cross_entropy: no samples (N = 0)")
    target = torch.as_tensor(target, device=logits.device)
    if target.shape != (n,) or target.dtype.is_floating_point or target.dtype == torch.bool:
        raise ValueError(f"smoothed_cross_entropy: target must be ({n},) integer class indices, got "
                         f"shape {tuple(target.shape)} and dtype {target.dtype}")
    if bool(((target < 0) | (target >= k)).any()):
        raise ValueError(f"smoothed_cross_entropy: target holds class indices outside 0..{k - 1} "
                         f"(min {int(target.min())}, max {int(target.max())}); the logits have {k} "
                         "columns, one per class")
    if not (isinstance(smoothing, (int, float)) and 0 <= smoothing < 1):
        raise ValueError(f"smoothed_cross_entropy: smoothing must be in [0, 1), got {smoothing!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"smoothed_cross_entropy: temperature must be a positive number, got "
                         f"{temperature!r}")
    logp = torch.log_softmax(logits / temperature, dim=1)  # (N, K)
    nll = -logp.gather(1, target.long()[:, None]).squeeze(1)  # (N,)
    uniform = -logp.mean(dim=1)  # (N,): cross-entropy against the uniform distribution
    return ((1.0 - smoothing) * nll + smoothing * uniform).mean()


def _rank_batch(embeddings, labels, who: str, min_rows: int):
    """Validate a labelled batch for the rank losses; return ``(sims (N, N), same (N, N), labels)``."""
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2 or not embeddings.is_floating_point():
        raise ValueError(f"{who}: embeddings must be a floating point (N, D) tensor, one descriptor per row")
    n = embeddings.shape[0]
    labels = torch.as_tensor(labels, device=embeddings.device)
    if labels.shape != (n,):
        raise ValueError(f"{who}: labels must have shape ({n},), one per row of embeddings, got "
                         f"{tuple(labels.shape)}")
    if n < min_rows:
        raise ValueError(f"{who}: a batch of {n} descriptors is too small; give at least {min_rows} "
                         "(e.g. PKMiner(P=4, K=4) batches)")
    sims = embeddings @ embeddings.T  # (N, N) cosine similarities of L2-normalised rows
    same = labels[:, None] == labels[None, :]
    return sims, same


def _check_temperature(tau, who: str, name: str = "tau") -> None:
    if isinstance(tau, bool) or not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"{who}: {name} must be a positive number (e.g. 0.01), got {tau!r}")


def smooth_ap_loss(embeddings: torch.Tensor, labels, tau: float = 0.01) -> torch.Tensor:
    """Smooth-AP loss (Brown, Xie, Kalogeiton & Zisserman, "Smooth-AP: smoothing the path
    towards large-scale image retrieval", ECCV 2020), the mean over anchors of ``1 - AP~``.

    Every row ``q`` of the batch is an anchor; its positives ``P_q`` are the other rows with
    its label, ``Omega_q`` all rows but ``q``; ``s_i = <x_q, x_i>`` (cosine for L2-normalised
    rows) and ``sigma_tau(d) = 1 / (1 + exp(-d / tau))``. The rank of each positive ``i``
    among the positives and among all, with the indicator ``[s_j > s_i]`` replaced by
    ``sigma_tau(s_j - s_i)``::

        R(i, P)     = 1 + sum_{j in P_q, j != i}     sigma_tau(s_j - s_i)
        R(i, Omega) = 1 + sum_{j in Omega_q, j != i} sigma_tau(s_j - s_i)
        AP~_q = 1/|P_q| sum_{i in P_q} R(i, P) / R(i, Omega),      L = mean_q (1 - AP~_q)

    As ``tau -> 0`` ``AP~`` tends to the exact AP of the anchor's ranking of the batch
    (ties aside). ``tau = 0.01`` is the paper's. Anchors without a positive are left out.
    Shapes ``embeddings (N, D)``, ``labels (N,)``; returns a scalar. Raises ``ValueError``
    for a batch with no anchor that has a positive, or a non-positive ``tau``.
    Taught in ``notebooks/06_darac.ipynb``.
    """
    who = "smooth_ap_loss"
    _check_temperature(tau, who)
    sims, same = _rank_batch(embeddings, labels, who, min_rows=2)
    n = sims.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=sims.device)
    pos = same & ~eye  # (N, N): pos[q, i]
    valid = pos.any(dim=1)
    if not bool(valid.any()):
        raise ValueError(f"{who}: no anchor has a positive (another row with its label) in the batch; build "
                         "batches with at least 2 images per class (e.g. PKMiner(P=4, K=4))")
    # sg[q, i, j] = sigma((s_qj - s_qi) / tau), counted only for j != q and j != i
    sg = torch.sigmoid((sims[:, None, :] - sims[:, :, None]) / tau)  # (N, N, N)
    others = ~eye[:, None, :] & ~eye[None, :, :]  # (N, N, N): j != q and j != i
    sg = sg * others.to(sg.dtype)
    r_all = 1.0 + sg.sum(dim=2)  # (N, N): R(i, Omega_q)
    r_pos = 1.0 + (sg * pos[:, None, :].to(sg.dtype)).sum(dim=2)  # (N, N): R(i, P_q)
    ratio = (r_pos / r_all) * pos.to(sg.dtype)
    ap = ratio.sum(dim=1)[valid] / pos.sum(dim=1)[valid].to(sg.dtype)
    return (1.0 - ap).mean()


def nra_like_loss(embeddings: torch.Tensor, labels, tau: float = 0.05, gamma: float = 4.0) -> torch.Tensor:
    """An **NRA-like** rank loss, the mean over anchors: approximate ranks -> a nonlinear
    transfer to similarities -> positives contracted, negatives dispersed.

    NRA (Schall, Barthel, Hezel & Jung, "Deep metric learning using similarities from
    nonlinear rank approximations", MMSP 2019) is described as: batch similarities become
    normalised approximate ranks, a nonlinear transfer function maps them to similarities,
    and a loss contracts positives and disperses negatives. Its exact equations are not at
    hand, so this is our loss after that description, not the paper's. For anchor ``q``
    with ``s_j = <x_q, x_j>``, over the ``N - 1`` other rows ``j``:

        r_j   = 1/(N - 2) sum_{k != q, j} sigma_tau(s_k - s_j)     (normalised approximate rank, 0 = first)
        rho_j = (1 - r_j)^gamma                                   (transfer: steep near the top ranks)
        L_q   = mean_{i in P_q} (1 - rho_i)^2 + mean_{j in N_q} rho_j^2
        L     = mean over anchors with a positive and a negative of L_q

    ``sigma_tau(d) = 1 / (1 + exp(-d / tau))``; ``P_q`` the rows with the anchor's label,
    ``N_q`` the others. ``gamma > 1`` makes a move near the top of the ranking count more
    than one near the bottom. Shapes ``embeddings (N, D)``, ``labels (N,)``, ``N >= 3``;
    returns a scalar. Raises ``ValueError`` for a batch where no anchor has both a positive
    and a negative, or non-positive ``tau``/``gamma``. Taught in ``notebooks/06_darac.ipynb``.
    """
    who = "nra_like_loss"
    _check_temperature(tau, who)
    _check_temperature(gamma, who, "gamma")
    sims, same = _rank_batch(embeddings, labels, who, min_rows=3)
    n = sims.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=sims.device)
    pos, neg = same & ~eye, ~same
    valid = pos.any(dim=1) & neg.any(dim=1)
    if not bool(valid.any()):
        raise ValueError(f"{who}: no anchor has both a positive and a negative in the batch; build batches of "
                         "at least 2 classes with 2 images each (e.g. PKMiner(P=4, K=4))")
    sg = torch.sigmoid((sims[:, None, :] - sims[:, :, None]) / tau)  # (N, N, N): [q, j, k]
    others = ~eye[:, None, :] & ~eye[None, :, :]  # k != q and k != j
    r = (sg * others.to(sg.dtype)).sum(dim=2) / (n - 2)  # (N, N): r[q, j]
    rho = (1.0 - r).clamp(min=0).pow(gamma)
    posf, negf = pos.to(rho.dtype), neg.to(rho.dtype)
    l_pos = ((1.0 - rho).pow(2) * posf).sum(dim=1) / posf.sum(dim=1).clamp(min=1)
    l_neg = (rho.pow(2) * negf).sum(dim=1) / negf.sum(dim=1).clamp(min=1)
    return (l_pos + l_neg)[valid].mean()
