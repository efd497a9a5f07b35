"""Is descriptor A better than descriptor B on this data, or is the gap noise?

Two descriptors evaluated on the same queries give paired per-query APs. The mean of
their differences is the mAP gap; resampling the *queries* with replacement (a paired
bootstrap) shows how much that gap would move with another draw of queries of the same
kind, and the counts of queries won, lost and tied show whether a gap comes from many
small moves or a few large ones.

* :func:`paired_comparison` -- the gap, its bootstrap interval, wins / losses / ties.
* :func:`mean_ap_excluding` -- mAP over the queries outside some subsets (e.g. without
  UKBench56, which every descriptor solves and which dilutes every gap).

Used by every "X vs. Y" section of the notebooks (first in ``02_spoc``).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["paired_comparison", "mean_ap_excluding"]


def _aps(a, name: str) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of per-query APs, got shape {arr.shape}")
    return arr


def paired_comparison(ap_a, ap_b, n_boot: int = 2000, level: float = 0.95, seed: int = 0,
                      tol: float = 1e-9) -> dict:
    """Paired comparison of two per-query AP vectors ``(n_queries,)``.

    Queries where either AP is NaN (no positive) are left out. With ``d_q = ap_a[q] - ap_b[q]``
    over the ``n`` kept queries:

    * ``"delta"``: ``mean_q d_q`` (= mAP(A) - mAP(B) on those queries);
    * ``"ci"``: ``(lo, hi)``, the percentile interval at ``level`` of the mean of ``d`` over
      ``n_boot`` resamples of the ``n`` queries with replacement (seeded, reproducible);
    * ``"wins"`` / ``"losses"`` / ``"ties"``: counts of ``d_q > tol``, ``< -tol``, ``|d_q| <= tol``;
    * ``"n"``: ``n``; ``"significant"``: whether the interval excludes 0.

    Raises ``ValueError`` for vectors of different shapes, fewer than 2 shared queries, or a
    ``level`` outside (0, 1).
    """
    a, b = _aps(ap_a, "ap_a"), _aps(ap_b, "ap_b")
    if a.shape != b.shape:
        raise ValueError(f"ap_a and ap_b must hold the same queries, got {a.shape} and {b.shape}")
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"level must lie in (0, 1), e.g. 0.95; got {level!r}")
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot!r}")
    d = (a - b)[np.isfinite(a) & np.isfinite(b)]
    if d.size < 2:
        raise ValueError(f"need at least 2 queries with a finite AP in both vectors, got {d.size}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.size, size=(int(n_boot), d.size))  # (n_boot, n) resampled queries
    means = d[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {
        "delta": float(d.mean()),
        "ci": (float(lo), float(hi)),
        "level": float(level),
        "wins": int((d > tol).sum()),
        "losses": int((d < -tol).sum()),
        "ties": int((np.abs(d) <= tol).sum()),
        "n": int(d.size),
        "significant": bool(lo > 0 or hi < 0),
    }


def mean_ap_excluding(aps, subsets, exclude: Sequence[str] = ("ukbench56",)) -> float:
    """mAP over the queries whose subset is not in ``exclude`` (NaN APs left out).

    ``aps`` ``(n_queries,)`` per-query APs, ``subsets`` ``(n_queries,)`` the subset name of
    each query (a group set's ``benchmark.subsets`` when every image is a query). Returns
    NaN when no query is left. Raises ``ValueError`` for mismatched lengths.
    """
    a = _aps(aps, "aps")
    s = np.asarray(subsets)
    if s.shape != a.shape:
        raise ValueError(f"aps and subsets must have one entry per query, got {a.shape} and {s.shape}")
    keep = ~np.isin(s, list(exclude)) & np.isfinite(a)
    return float(a[keep].mean()) if keep.any() else float("nan")
