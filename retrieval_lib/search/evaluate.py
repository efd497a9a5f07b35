"""Evaluation: the metrics of :mod:`retrieval_lib.metrics` (re-exported here under the names
the notebooks use), Recall@K straight from descriptors, and per-query AP of a benchmark.

The metrics themselves (mAP, mP@k, the revisited protocol, Recall@K from ranks, the N-S
score) live one floor down in :mod:`retrieval_lib.metrics`, so that data sets can score
rankings without importing the search. Taught in ``notebooks/00_pipeline.ipynb``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from retrieval_lib.metrics import (HEADLINE_KEYS, ArrayLike, as_labels, check_kappas, compare_aps, compute_map,
                                   evaluate_revisited, gnd_from_labels, headline, map_by_labels, ns_score,
                                   recall_from_ranks, revisited_protocol)
from retrieval_lib.search.nearest import descriptor_pair, knn_checked

__all__ = [
    "compute_map",
    "evaluate_revisited",
    "gnd_from_labels",
    "map_by_labels",
    "recall_from_ranks",
    "recall_at_k",
    "ns_score",
    "revisited_protocol",
    "query_aps",
    "compare_aps",
    "HEADLINE_KEYS",
    "headline",
]


def recall_at_k(Q: ArrayLike, X: ArrayLike, q_labels: ArrayLike, x_labels: Optional[ArrayLike] = None,
                ks: Sequence[int] = (1, 2, 4, 8), exclude_self: Optional[bool] = None,
                chunk_size: Optional[int] = None) -> dict[int, float]:
    """Recall@K straight from descriptors: exact top-K by inner product, then :func:`recall_from_ranks`.

    Args:
        Q: (n_q, D) query descriptors.
        X: (n_db, D) database descriptors.
        q_labels: (n_q,) query labels.
        x_labels: (n_db,) database labels; ``None`` means the same as ``q_labels``.
        ks: K values.
        exclude_self: drop each query's own index; default ``Q is X`` (each image queries
            the rest of its own set, as in CUB/Cars/SOP).
        chunk_size: database rows per block of the search (see ``search.nearest``).

    Returns:
        ``{K: recall}`` fractions. Taught in ``notebooks/00_pipeline.ipynb``.

    Raises:
        ValueError: ``Q`` or ``X`` empty, not 2-D or holding NaN/inf; labels whose
            length is not the number of descriptors; no ``ks``.
    """
    if exclude_self is None:
        exclude_self = Q is X
    Qt, Xt = descriptor_pair(Q, X, "recall_at_k")
    qlab = as_labels(q_labels, "q_labels")
    xlab = qlab if x_labels is None else as_labels(x_labels, "x_labels")
    if exclude_self and len(qlab) != len(xlab):
        raise ValueError("exclude_self=True means query i is database image i, but q_labels "
                         f"({len(qlab)}) and x_labels ({len(xlab)}) differ in length")
    if len(qlab) != Qt.shape[0]:
        raise ValueError(f"recall_at_k: q_labels has {len(qlab)} entries but Q has {Qt.shape[0]} "
                         "rows; give one label per query")
    if len(xlab) != Xt.shape[0]:
        which = "x_labels" if x_labels is not None else "x_labels=None (the queries' labels)"
        raise ValueError(f"recall_at_k: {which} has {len(xlab)} entries but X has {Xt.shape[0]} "
                         "rows; give one label per database image")
    kk = check_kappas(ks, "ks")
    if not kk:
        raise ValueError("recall_at_k: ks is empty; give at least one K, e.g. ks=(1, 2, 4, 8)")
    k = min(max(kk) + int(exclude_self), Xt.shape[0])
    _, idx = knn_checked(Qt, Xt, k, chunk_size=chunk_size, fn="recall_at_k")
    return recall_from_ranks(idx, xlab, qlab, kk, exclude_self=exclude_self)


def query_aps(benchmark, ranks: ArrayLike) -> np.ndarray:
    """Average precision of every query: ``(n_queries,)`` float64, NaN where it has no positive.

    ``benchmark`` is a :class:`retrieval_lib.data.datasets.Benchmark`; its
    ``ground_truth()`` says what is right (group sets and CUB: the query's group, the
    query itself junk; revisited Oxford/Paris: the Medium protocol), scored with
    :func:`compute_map`. For group sets and revisited Oxford/Paris the mean over the
    non-NaN entries is the benchmark's headline mAP (``"mAP"``, ``"mAP/medium"``); CUB's
    headline is R@1, not AP. Taught in ``notebooks/02_spoc.ipynb``.
    """
    return compute_map(ranks, benchmark.ground_truth(), kappas=(1,))[1]
