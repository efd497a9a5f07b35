"""The one small interface every benchmark of the book has (:class:`Benchmark`); the
benchmarks themselves are in ``groups`` (your photos, real171), ``offline`` (the offline
default), ``revisited`` (Oxford/Paris) and ``cub`` (CUB-200-2011).

A :class:`Benchmark` has a ``name``, a ``database`` (:class:`~retrieval_lib.data.images.ImageList`),
``queries`` (an ``ImageList``, or ``None`` when every database image queries all the
others), ``evaluate(ranks) -> {metric: float}`` (fractions, except the N-S score in
0..4), ``headline_key`` (the metric a plot or table leads with), ``relevance(q, i)``
(is database image ``i`` right for query ``q``: ``True``, ``False`` or ``None`` for junk),
``summary()`` (one line of text) and ``subset(max_images)`` (a smaller benchmark of the
same kind, for the ``smoke`` scale). ``ranks`` is ``(n_queries, n_db)``, database
indices best first.
"""
from __future__ import annotations

import operator
from typing import Optional

import numpy as np

from retrieval_lib.data.images import ImageList

__all__ = ["Benchmark", "check_ranks"]


def check_ranks(ranks, n_queries: int, n_db: int) -> np.ndarray:
    """``ranks`` as an int array of shape (n_queries, <= n_db), with a clear error otherwise."""
    if hasattr(ranks, "detach"):
        ranks = ranks.detach().cpu().numpy()
    R = np.asarray(ranks)
    if R.ndim != 2 or R.shape[0] != n_queries or not 0 < R.shape[1] <= n_db:
        raise ValueError(f"ranks has shape {R.shape}; this benchmark needs (n_queries, n_ranked) = "
                         f"({n_queries}, up to {n_db}): one row per query, database indices best "
                         "first (e.g. search.rank_database(Q, X))")
    return R


def _index(v) -> Optional[int]:
    """``v`` as a Python int when it is one integer (int, numpy or 0-d tensor), else None."""
    if isinstance(v, (bool, np.bool_)):
        return None
    try:
        return operator.index(v)
    except TypeError:
        return None


class Benchmark:
    """Base of every benchmark: ``name``, ``database``, ``queries`` and ``evaluate(ranks)``.

    ``queries is None`` means every database image is a query against all the others
    (its own index is then junk: ignored by ``evaluate``); ``ranks`` has one row per query.

    What is right for a query is answered in one place, :meth:`ground_truth` (built
    once per benchmark): :meth:`relevance` for one image, :meth:`relevance_row` for a
    whole ranked row, :meth:`top_results` for the first results of a ranking, and
    :func:`retrieval_lib.search.evaluate.query_aps` for per-query AP all read it.

    Attributes every benchmark has (``None`` where it does not apply):
        labels: (N,) int64 group or class of each database image (group sets, CUB).
        subsets: (N,) subset name of each database image (manifests with subsets).
        headline_key: the metric of :meth:`evaluate` that a plot or table leads with:
            ``"mAP"`` (group sets), ``"mAP/medium"`` (revisited Oxford/Paris), ``"R@1"`` (CUB).
    """

    name: str
    database: ImageList
    queries: Optional[ImageList] = None
    labels: Optional[np.ndarray] = None
    subsets: Optional[np.ndarray] = None
    headline_key: str = "mAP"

    @property
    def n_queries(self) -> int:
        return len(self.database) if self.queries is None else len(self.queries)

    def evaluate(self, ranks) -> dict:
        """``{metric name: float}`` for ``ranks`` (n_queries, n_db), database indices best first."""
        raise NotImplementedError

    def subset(self, max_images: int) -> "Benchmark":
        """A smaller benchmark of the same kind with at most ``max_images`` database images."""
        raise NotImplementedError

    def summary(self) -> str:
        """One line: what the benchmark holds."""
        q = "each image queries all the others" if self.queries is None else f"{len(self.queries)} queries"
        return f"{self.name}: {len(self.database)} database images; {q}"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.summary()}>"

    # -- what is right for a query
    def _build_ground_truth(self) -> list:
        raise NotImplementedError

    def ground_truth(self) -> list:
        """Per query ``{"ok": int64 array, "junk": int64 array}`` of database indices.

        The format of :func:`~retrieval_lib.metrics.compute_map`, for the protocol of
        :attr:`headline_key`: group sets and CUB -- ``ok`` the other images of the query's
        group, ``junk`` the query itself; revisited Oxford/Paris -- the Medium protocol
        (``ok`` easy + hard, ``junk`` junk). Built on first use and kept.
        """
        gt = self.__dict__.get("_ground_truth")
        if gt is None:
            gt = self._build_ground_truth()
            self._ground_truth = gt
        return gt

    def _query(self, q) -> int:
        n = self.n_queries
        k = _index(q)
        if k is None or not 0 <= k < n:
            raise IndexError(f"query {q!r} is not one of this benchmark's {n} queries (0..{n - 1})")
        return k

    def relevance_row(self, q: int, indices) -> np.ndarray:
        """Relevance of database images ``indices`` to query ``q``, vectorised: int8 ``(len(indices),)``.

        ``1`` relevant, ``0`` not relevant, ``-1`` junk (neither: ignored by the metrics).
        ``indices`` is any 1-D integer sequence, e.g. a row of ``ranks``.
        """
        q = self._query(q)
        idx = np.asarray(indices.detach().cpu() if hasattr(indices, "detach") else indices)
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise ValueError(f"indices must be a 1-D sequence of database indices, got shape {idx.shape} "
                             f"and dtype {idx.dtype}")
        n = len(self.database)
        bad = idx[(idx < 0) | (idx >= n)]
        if bad.size:
            raise IndexError(f"indices must be database indices in 0..{n - 1}; got {bad[:5].tolist()}"
                             f"{' ...' if bad.size > 5 else ''}")
        g = self.ground_truth()[q]
        out = np.zeros(idx.shape, dtype=np.int8)
        out[np.isin(idx, g["ok"])] = 1
        out[np.isin(idx, g["junk"])] = -1
        return out

    def relevance(self, q: int, i: int) -> Optional[bool]:
        """Is database image ``i`` right for query ``q``? ``True``, ``False``, or ``None`` for junk.

        Junk is what the protocol ignores: the query itself when every database image is a
        query, the ``junk`` list of revisited Oxford/Paris. Raises ``IndexError`` for a
        query or image outside the benchmark.
        """
        k = _index(i)
        if k is None:
            raise IndexError(f"i must be one database index, got {i!r}; for many use relevance_row")
        code = int(self.relevance_row(q, [k])[0])
        return None if code < 0 else bool(code)

    def top_results(self, ranks, q: int, k: int = 5) -> tuple:
        """Query ``q``'s first ``k`` results and whether each is right: ``(indices, relevance)``.

        ``ranks`` is ``(n_queries, n_db)``; ``relevance`` holds ``True``/``False``/``None``
        (junk) as in :meth:`relevance`. When every database image is a query, the query
        itself (junk, normally ranked first) is skipped, so the ``k`` results are others.
        """
        q = self._query(q)
        R = check_ranks(ranks, self.n_queries, len(self.database))
        row = R[q]
        if self.queries is None:
            row = row[row != q]
        row = row[: max(0, int(k))]
        return row.tolist(), [None if c < 0 else bool(c) for c in self.relevance_row(q, row).tolist()]
