"""One query against several descriptors of the same collection: a top-k row each, and how two rows differ.

* :func:`top_k_rows` -- for every descriptor (MAC, SPoC, GeM, R-MAC, a learned head, ...) the
  ``k`` collection images most similar to the query, with their scores ``s = q^T x``, the
  query itself left out when it belongs to the collection;
* :func:`compare_rows` -- where two such rows agree and where they differ: the images only
  one of them retrieves, and for every image the rank it has in the other row.

Descriptors are ``(N, D)`` rows, L2-normalised, the query ``(D,)``; similarity is the inner
product, as everywhere in the library. Used by ``notebooks/10_explorer.ipynb``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch

from retrieval_lib.layers.checks import check_int

__all__ = ["TopK", "top_k_rows", "RowComparison", "compare_rows"]


@dataclass(frozen=True)
class TopK:
    """One descriptor's answer to a query: collection ``indices`` best first and their ``scores``."""

    label: str
    indices: tuple
    scores: tuple


def top_k_rows(queries: Mapping[str, torch.Tensor], collections: Mapping[str, torch.Tensor], k: int,
               exclude: Optional[int] = None) -> list[TopK]:
    """The top-``k`` of one query under each descriptor: one :class:`TopK` per label, in ``queries``' order.

    ``queries[label]`` is the query's ``(D,)`` descriptor and ``collections[label]`` the
    collection's ``(N, D)`` descriptors under that label (``D`` may differ between labels, ``N``
    may not). ``exclude``: the query's own index in the collection, left out of every row
    (so a collection image never finds itself first). ``k`` is cut to the images left.

    Raises:
        ValueError: a label without collection descriptors, collections of different sizes,
            ``k < 1``, ``exclude`` outside the collection, or nothing left to rank.
    """
    k = check_int(k, "k", "top_k_rows")
    missing = [label for label in queries if label not in collections]
    if missing:
        raise ValueError(f"top_k_rows: no collection descriptors for {missing}; give one (N, D) matrix per label")
    sizes = {label: int(collections[label].shape[0]) for label in queries}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"top_k_rows: every label must describe the same N images, got sizes {sizes}")
    n = next(iter(sizes.values()), 0)
    if exclude is not None and not 0 <= int(exclude) < n:
        raise ValueError(f"top_k_rows: exclude={exclude} is outside the collection of {n} images")
    left = n - (exclude is not None)
    if left < 1:
        raise ValueError("top_k_rows: nothing to rank; the collection holds no image besides the query")
    k = min(k, left)
    rows = []
    for label, q in queries.items():
        X = collections[label]
        if q.shape != X.shape[1:]:
            raise ValueError(f"top_k_rows: the query's {label} descriptor has shape {tuple(q.shape)}, the "
                             f"collection's are {tuple(X.shape[1:])}")
        s = X @ q.to(X.dtype)  # (N,) similarities
        if exclude is not None:
            s = s.clone()
            s[int(exclude)] = -math.inf
        scores, idx = torch.topk(s, k)  # best first
        rows.append(TopK(label, tuple(int(i) for i in idx), tuple(float(v) for v in scores)))
    return rows


@dataclass(frozen=True)
class RowComparison:
    """How two top-k rows ``a`` and ``b`` differ (see :func:`compare_rows`).

    ``rank_in_b[i]`` is the 0-based position in ``b`` of ``a``'s ``i``-th image (``None``: not in
    ``b``'s row), and ``rank_in_a`` the other way round; ``only_a`` / ``only_b`` the images one
    row has and the other lacks; ``shared`` how many both have; ``same_order`` whether the two
    rows are identical.
    """

    rank_in_b: tuple
    rank_in_a: tuple
    only_a: tuple
    only_b: tuple
    shared: int
    same_order: bool


def compare_rows(a: Sequence[int], b: Sequence[int]) -> RowComparison:
    """Where two rankings of the same query differ: images only one has, and each image's rank in the other.

    ``a`` and ``b`` are collection indices best first (e.g. :attr:`TopK.indices`), each
    without repeats. Raises ``ValueError`` for a row that repeats an image.
    """
    a, b = [int(i) for i in a], [int(i) for i in b]
    for name, row in (("a", a), ("b", b)):
        if len(set(row)) != len(row):
            raise ValueError(f"compare_rows: row {name} lists an image twice: {row}")
    pos_a, pos_b = {i: r for r, i in enumerate(a)}, {i: r for r, i in enumerate(b)}
    return RowComparison(rank_in_b=tuple(pos_b.get(i) for i in a), rank_in_a=tuple(pos_a.get(i) for i in b),
                         only_a=tuple(i for i in a if i not in pos_b), only_b=tuple(i for i in b if i not in pos_a),
                         shared=len(set(a) & set(b)), same_order=a == b)
