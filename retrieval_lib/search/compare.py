"""Is descriptor A better than descriptor B on this data, or is the gap noise?

Two descriptors evaluated on the same queries give paired per-query APs. The mean of
their differences is the mAP gap; resampling the *queries* with replacement (a paired
bootstrap) shows how much that gap would move with another draw of queries of the same
kind, and the counts of queries won, lost and tied show whether a gap comes from many
small moves or a few large ones.

* :func:`paired_comparison` -- the gap, its bootstrap interval (over queries, or over groups
  when queries share groups), wins / losses / ties, a sign test.
* :func:`sign_test`, :func:`holm` -- the exact sign test; Holm's adjustment for several
  comparisons at once.
* :func:`mean_ap_excluding` -- mAP over the queries outside some subsets (e.g. without
  UKBench56, which every descriptor solves and which dilutes every gap).

Used by every "X vs. Y" section of the notebooks (first in ``02_spoc``).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["paired_comparison", "sign_test", "holm", "mean_ap_excluding"]


def _aps(a, name: str) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of per-query APs, got shape {arr.shape}")
    return arr


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test: the probability, if wins and losses were equally likely, of a split
    at least as uneven as ``wins`` : ``losses`` (ties left out). ``1.0`` when nothing moved.

    ``p = min(1, 2 * P(X <= min(wins, losses)))`` with ``X ~ Binomial(wins + losses, 1/2)``;
    e.g. 3 wins and no loss give ``2 / 8 = 0.25``: three queries cannot show much on their own.
    """
    n, k = int(wins) + int(losses), min(int(wins), int(losses))
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return float(min(1.0, 2.0 * tail))


def holm(pvalues: Sequence[float]) -> list:
    """Holm's step-down adjustment of ``m`` p-values (several comparisons at once): the adjusted
    ``p_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))`` in the sorted order, returned in the input order."""
    p = np.asarray(pvalues, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    m = len(p)
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def paired_comparison(ap_a, ap_b, n_boot: int = 2000, level: float = 0.95, seed: int = 0,
                      tol: float = 1e-9, groups=None) -> dict:
    """Paired comparison of two per-query AP vectors ``(n_queries,)``.

    Queries where either AP is NaN (no positive) are left out. With ``d_q = ap_a[q] - ap_b[q]``
    over the ``n`` kept queries:

    * ``"delta"``: ``mean_q d_q`` (= mAP(A) - mAP(B) on those queries);
    * ``"ci"``: ``(lo, hi)``, the percentile interval at ``level`` of the mean of ``d`` over
      ``n_boot`` resamples (seeded, reproducible): of the ``n`` queries with replacement, or --
      with ``groups`` (one label per query) -- of the groups with replacement, each drawn group
      bringing all its kept queries (a cluster bootstrap: the queries of one group are not
      independent, e.g. the two mirror queries of an image pair, so resampling them one by one
      gives too narrow an interval);
    * ``"wins"`` / ``"losses"`` / ``"ties"``: counts of ``d_q > tol``, ``< -tol``, ``|d_q| <= tol``;
    * ``"n"``: ``n``; ``"n_groups"``: the groups resampled (``None`` without ``groups``);
      ``"resampled"``: ``"queries"`` or ``"groups"``;
    * ``"identical"``: every ``|d_q| <= tol`` (no difference to test);
    * ``"sign_p"``: :func:`sign_test` of wins against losses;
    * ``"significant"``: the interval excludes 0 by more than ``tol`` (an endpoint that is 0
      up to rounding, such as ``-4.6e-18``, counts as 0).

    Raises ``ValueError`` for vectors of different shapes, fewer than 2 shared queries (or
    groups), ``groups`` of another length, or a ``level`` outside (0, 1).
    """
    a, b = _aps(ap_a, "ap_a"), _aps(ap_b, "ap_b")
    if a.shape != b.shape:
        raise ValueError(f"ap_a and ap_b must hold the same queries, got {a.shape} and {b.shape}")
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"level must lie in (0, 1), e.g. 0.95; got {level!r}")
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot!r}")
    keep = np.isfinite(a) & np.isfinite(b)
    d = (a - b)[keep]
    if d.size < 2:
        raise ValueError(f"need at least 2 queries with a finite AP in both vectors, got {d.size}")
    rng = np.random.default_rng(seed)
    n_groups = None
    if groups is None:
        idx = rng.integers(0, d.size, size=(int(n_boot), d.size))  # (n_boot, n) resampled queries
        means = d[idx].mean(axis=1)
    else:
        g = np.asarray(groups)
        if g.shape != a.shape:
            raise ValueError(f"groups must hold one label per query, got {g.shape} for {a.shape} queries")
        _, gid = np.unique(g[keep], return_inverse=True)
        n_groups = int(gid.max()) + 1
        if n_groups < 2:
            raise ValueError("need at least 2 groups to resample groups; pass groups=None to resample queries")
        sums = np.bincount(gid, weights=d, minlength=n_groups)       # (G,) sum of d per group
        counts = np.bincount(gid, minlength=n_groups).astype(float)  # (G,) kept queries per group
        idx = rng.integers(0, n_groups, size=(int(n_boot), n_groups))  # (n_boot, G) resampled groups
        means = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    wins, losses = int((d > tol).sum()), int((d < -tol).sum())
    return {
        "delta": float(d.mean()),
        "ci": (float(lo), float(hi)),
        "level": float(level),
        "wins": wins,
        "losses": losses,
        "ties": int((np.abs(d) <= tol).sum()),
        "n": int(d.size),
        "n_groups": n_groups,
        "resampled": "queries" if groups is None else "groups",
        "identical": bool(wins == 0 and losses == 0),
        "sign_p": sign_test(wins, losses),
        "significant": bool(lo > tol or hi < -tol),
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
