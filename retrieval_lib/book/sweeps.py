"""Sweeps and comparisons over poolings: mAP against p, against image size, per query.

The notebooks ask the same questions of many descriptors at once ("how does mAP move
when p goes from 1 to 32?", "how does it move with the input size?"). The functions
here answer them through the session's one descriptor path, :meth:`Book.describe
<retrieval_lib.book.session.Book.describe>` (one backbone pass for many poolings, or
none at ``smoke``/``cpu`` scale, where the kept feature maps are re-pooled):

* :func:`evaluate_many` -- the metrics of many poolings of the same images;
* :func:`sweep_p` -- the headline metric of GeM for a list of exponents p (``03_gem``);
* :func:`sweep_image_size` -- the headline metric of several poolings for a list of
  input sizes (``02_spoc``);
* :func:`spoc_weights` and :func:`gem_contributions` -- the spatial weights the two
  poolings give each position of a feature map, for drawing (``02_spoc``, ``03_gem``).

A ``book`` argument is a :class:`retrieval_lib.book.session.Book` (``start(...)``). The
number a sweep plots is the benchmark's ``headline_key`` ("mAP" for group sets,
"mAP/medium" for revisited Oxford/Paris, "R@1" for CUB), read with
:func:`retrieval_lib.search.evaluate.headline`. Per-query AP and wins/losses live in
:mod:`retrieval_lib.search.evaluate` (``query_aps``, ``compare_aps``).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from retrieval_lib.layers import functional
from retrieval_lib.layers.checks import check_fmap, check_int, check_p
from retrieval_lib.layers.pooling import GeM
from retrieval_lib.search.evaluate import headline, map_by_labels
from retrieval_lib.search.nearest import rank_database

__all__ = [
    "spoc_weights",
    "gem_contributions",
    "gem_poolings",
    "evaluate_many",
    "sweep_p",
    "sweep_image_size",
    "self_similarity",
    "pair_similarity_vs_p",
    "map_on_subset",
]

# ----------------------------------------------------------------------------------------
# spatial weights, for drawing
# ----------------------------------------------------------------------------------------
def spoc_weights(H: int, W: int, center_prior: bool = True, dtype=torch.float64) -> torch.Tensor:
    """The weight SPoC gives each position of an ``H x W`` map: ``(H, W)``, summing to 1.

    Read off :func:`retrieval_lib.layers.functional.spoc` itself by pooling a one-hot map (channel
    ``k`` is 1 at position ``k`` and 0 elsewhere), so the picture is exactly what the code
    computes -- the Gaussian centre prior of Babenko & Lempitsky (ICCV 2015) with
    ``center_prior=True``, ``1 / (H W)`` everywhere without. Taught in ``02_spoc``.
    """
    H = check_int(H, "H", "spoc_weights")
    W = check_int(W, "W", "spoc_weights")
    onehot = torch.eye(H * W, dtype=dtype).reshape(1, H * W, H, W)  # channel k = position k
    return functional.spoc(onehot, center_prior=center_prior).reshape(H, W)


def gem_contributions(fmap: torch.Tensor, p: float, eps: float = 1e-6) -> torch.Tensor:
    """Where GeM "looks": the share of each position in the pooled power mean.

    For channel ``k`` the GeM descriptor is ``(mean_i x_ik^p)^(1/p)``; position ``i``
    contributes ``w_ik = x_ik^p / sum_j x_jk^p`` to the sum inside. This returns the
    mean over channels ``(1/C) sum_k w_ik``: shapes ``(C, h, w) -> (h, w)`` or
    ``(B, C, h, w) -> (B, h, w)``; each map sums to 1. ``p = 1`` weighs positions by their
    activation (SPoC); as ``p`` grows the weight of each channel moves onto its arg-max
    (MAC). Computed as a softmax over positions of ``p * log(max(x, eps))`` (the same
    clamp as :func:`functional.gem`), so it does not overflow for any ``p``.

    Source: GeM, Radenović, Tolias & Chum, TPAMI 2018. Taught in ``03_gem``.
    """
    single = fmap.dim() == 3
    x = fmap.unsqueeze(0) if single else fmap
    check_fmap(x, "gem_contributions")
    check_p(p, x.shape[1], "gem_contributions")
    B, C, h, w = x.shape
    logits = float(p) * x.clamp(min=eps).log().reshape(B, C, h * w)
    share = torch.softmax(logits, dim=-1).mean(dim=1).reshape(B, h, w)  # (B, h, w)
    return share[0] if single else share


# ----------------------------------------------------------------------------------------
# many poolings at once
# ----------------------------------------------------------------------------------------
def gem_poolings(ps: Sequence[float], eps: float = 1e-6) -> dict:
    """``{p: GeM}`` for every exponent in ``ps`` (each a positive finite number).

    Each is a fixed-p :class:`retrieval_lib.layers.pooling.GeM` computing in float64
    (``dtype=torch.float64``): float32 ``x^p`` overflows once it passes ~3e38 (``x = 6``,
    the ReLU6 ceiling of EfficientNet-Lite, at ``p > 49``), float64 holds ``6^p`` up to
    ``p ~ 396``. (At large ``p`` the powers of very small activations underflow to 0: a
    channel whose activations are all tiny, e.g. below 1e-3 at ``p = 200``, comes out as 0
    instead of a tiny value.) Descriptors come back in the input's dtype, and over several
    scales they are averaged with the power ``p``, like any GeM. ``p_min = p``, so that
    exponents below 1 are used as given.
    """
    ps = [float(p) for p in ps]
    if not ps:
        raise ValueError("gem_poolings: give at least one exponent p, e.g. [1, 2, 3, 4, 8]")
    return {p: GeM(p=p, eps=eps, learn_p=False, p_min=p, dtype=torch.float64) for p in ps}


def evaluate_many(book, poolings: Mapping, image_size: int | None = None,
                  return_descriptors: bool = False):
    """``{label: metrics}`` of ``book.evaluate`` for many poolings of the same images.

    The descriptors come from ``book.describe`` with the dict of poolings: one backbone
    pass for all of them, or none at ``smoke``/``cpu`` scale. With
    ``return_descriptors=True`` returns ``(metrics, X, Q)``: the dicts of database and
    query descriptors, ``Q[label]`` being ``None`` when the queries are the database
    images (``book.rank(X[label], Q[label])`` works either way).
    """
    if not poolings:
        raise ValueError("evaluate_many: `poolings` is empty; give {label: pooling}")
    X = book.describe(poolings, "database", image_size)
    Q = book.describe(poolings, "queries", image_size)
    metrics = {label: book.evaluate(X[label], Q[label]) for label in poolings}
    return (metrics, X, Q) if return_descriptors else metrics


def sweep_p(book, ps: Sequence[float], eps: float = 1e-6) -> dict:
    """The headline metric of GeM for every exponent in ``ps``; one backbone pass (or none).

    Returns ``{"p": (n,) array, "mAP": (n,) array, "metrics": [dict]}`` in the order of
    ``ps``; ``"mAP"`` holds ``headline(metrics, book.benchmark.headline_key)`` (R@1 on
    CUB). GeM is evaluated in float64 (:func:`gem_poolings`), so large ``p`` is safe.
    Taught in ``03_gem`` (mAP as a function of p).
    """
    pools = gem_poolings(ps, eps)
    metrics = evaluate_many(book, pools)
    ms = [metrics[p] for p in pools]
    key = book.benchmark.headline_key
    return {"p": np.array(list(pools)), "mAP": np.array([headline(m, key) for m in ms]), "metrics": ms}


def sweep_image_size(book, sizes: Sequence[int], poolings: Mapping, progress: bool | None = None) -> dict:
    """The headline metric of several poolings for every input size (longer side, px) in ``sizes``.

    Returns ``{"size": (n,) array, "mAP": {label: (n,) array}, "metrics": {label: [dict]},
    "X": {label: {size: (N, D)}}}``; ``"mAP"`` is the benchmark's ``headline_key`` and
    the database descriptors ``X`` are kept so that a notebook can compare the same image
    described at two sizes (:func:`self_similarity`). Each size costs one backbone pass
    over the images (kept at smoke/cpu scale). Taught in ``02_spoc`` (the sensitivity of
    average pooling to input size). ``progress=None`` follows ``book.progress``.
    """
    sizes = [int(s) for s in sizes]
    if not sizes or min(sizes) < 32:
        raise ValueError(f"sweep_image_size: sizes must be input sizes of at least 32 px, got {sizes}")
    if not poolings:
        raise ValueError("sweep_image_size: `poolings` is empty; give {label: pooling}")
    key = book.benchmark.headline_key
    out = {"size": np.array(sizes), "mAP": {k: [] for k in poolings}, "metrics": {k: [] for k in poolings},
           "X": {k: {} for k in poolings}}
    progress = book.progress if progress is None else progress
    for s in tqdm(sizes, desc="image sizes", unit="size", disable=not progress):
        metrics, X, _ = evaluate_many(book, poolings, image_size=s, return_descriptors=True)
        for label in poolings:
            out["metrics"][label].append(metrics[label])
            out["mAP"][label].append(headline(metrics[label], key))
            out["X"][label][s] = X[label]
    out["mAP"] = {k: np.array(v) for k, v in out["mAP"].items()}
    return out


def self_similarity(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products ``(X * Y).sum(-1)``: ``(N, D), (N, D) -> (N,)``.

    For L2-normalised descriptors of the same N images computed two ways (e.g. at two
    input sizes) this is each image's cosine similarity to itself: 1 means the
    descriptor did not change. Taught in ``02_spoc``.
    """
    if X.shape != Y.shape or X.dim() != 2:
        raise ValueError(f"self_similarity: X and Y must both be (N, D) of the same shape, got "
                         f"{tuple(X.shape)} and {tuple(Y.shape)}")
    return (X * Y).sum(dim=-1)


# ----------------------------------------------------------------------------------------
# pairs and subsets
# ----------------------------------------------------------------------------------------
def pair_similarity_vs_p(fmap_a: torch.Tensor, fmap_b: torch.Tensor, ps: Sequence[float],
                         eps: float = 1e-6) -> np.ndarray:
    """Cosine similarity of the GeM descriptors of two maps, for every ``p`` in ``ps``: ``(n,)``.

    ``fmap_a``, ``fmap_b``: ``(C, h, w)`` (sizes may differ). GeM in float64
    (:func:`gem_poolings`), each descriptor L2-normalised. Taught in ``03_gem`` (how the
    similarity to a matching and to a non-matching image moves with ``p``).
    """
    if fmap_a.dim() != 3 or fmap_b.dim() != 3 or fmap_a.shape[0] != fmap_b.shape[0]:
        raise ValueError(f"pair_similarity_vs_p: expected two (C, h, w) maps with the same C, got "
                         f"{tuple(fmap_a.shape)} and {tuple(fmap_b.shape)}")
    out = []
    for pool in gem_poolings(ps, eps).values():
        a = functional.l2n(pool(fmap_a[None].double()))
        b = functional.l2n(pool(fmap_b[None].double()))
        out.append(float((a * b).sum()))
    return np.array(out)


def map_on_subset(X: torch.Tensor, labels, mask) -> float:
    """mAP of the images with ``mask`` True, each querying only the others of the subset.

    For a held-out evaluation: descriptors ``X (N, D)``, group ``labels (N,)``, ``mask (N,)``
    bool. Same protocol as a group set's ``"mAP"`` (the query itself is junk; a query
    without a positive in the subset is left out). Taught in ``03_gem`` (learnable p).
    """
    m = np.asarray(mask, dtype=bool)
    lab = np.asarray(labels)
    if m.shape != (X.shape[0],) or lab.shape != (X.shape[0],):
        raise ValueError(f"map_on_subset: labels and mask must have shape ({X.shape[0]},), got "
                         f"{lab.shape} and {m.shape}")
    if not m.any():
        raise ValueError("map_on_subset: the mask selects no image")
    idx = torch.as_tensor(np.flatnonzero(m), device=X.device)
    Xs = X[idx]
    return float(map_by_labels(rank_database(Xs, Xs), lab[m], kappas=(1,))["mAP"])
