"""Retrieval metrics on ranks and ground truth: mAP and mP@k (the revisited Oxford/Paris
protocol), Recall@K, the N-S score, per-query AP comparisons and the headline number.

The ground floor of the library beside ``layers`` (numpy and torch only): data sets describe
their ground truth and score rankings with these functions; ``search`` makes the rankings
(``search.evaluate`` re-exports every name here and adds :func:`~retrieval_lib.search.evaluate.recall_at_k`,
which searches descriptors first).

Conventions: ``ranks`` is an integer array ``(n_queries, n_ranked)`` whose row ``q`` lists
database indices best first (``n_ranked`` may be smaller than the database when only a
top-k was retrieved). Note the revisited protocol's own code stores ranks transposed,
``(n_db, n_queries)``; here they are ``(n_queries, n_db)`` like everything else in the
library. All scores are fractions in [0, 1] (the N-S score is in [0, 4]).

Taught in ``notebooks/00_pipeline.ipynb``.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

__all__ = [
    "compute_map",
    "evaluate_revisited",
    "gnd_from_labels",
    "map_by_labels",
    "recall_from_ranks",
    "ns_score",
    "revisited_protocol",
    "compare_aps",
    "HEADLINE_KEYS",
    "headline",
]

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence]

# Entries of the (queries x database) marks table built per chunk of queries: 2**20 keeps the
# table (1 MB) and the gather's index temporaries (8 MB) in cache, whatever the number of queries.
_CHUNK_ELEMS = 1 << 20


def _to_numpy(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _as_ranks(ranks: ArrayLike) -> np.ndarray:
    R = _to_numpy(ranks)
    if R.ndim != 2:
        raise ValueError(
            f"ranks must be 2-D (n_queries, n_db) with database indices best first, got shape "
            f"{R.shape}; for a single query use ranks[None]"
        )
    if R.size and not np.issubdtype(R.dtype, np.integer):
        raise TypeError(f"ranks must hold integer database indices, got dtype {R.dtype}")
    R = R.astype(np.int64, copy=False)
    if R.size and R.min() < 0:
        raise ValueError(
            "ranks contains negative indices (e.g. -1 padding from an approximate index that "
            "found fewer than k results); drop or replace them before evaluating"
        )
    return R


def check_kappas(kappas: Sequence[int], name: str = "kappas") -> list[int]:
    """``kappas`` (the k of P@k or Recall@K) as a list of ints, each at least 1."""
    ks = [int(k) for k in kappas]
    if any(k < 1 for k in ks):
        raise ValueError(f"{name} must be positive integers, got {list(kappas)}")
    return ks


def _flatten_gnd(gnd: Sequence[dict], key: str, required: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query id per entry, database index per entry, count per query) for ``gnd[q][key]``."""
    lists = []
    for q, g in enumerate(gnd):
        if not isinstance(g, dict):
            raise TypeError(f"gnd[{q}] must be a dict with 'ok' and 'junk' index lists, got "
                            f"{type(g).__name__}")
        if key in g:
            lists.append(np.asarray(_to_numpy(g[key]), dtype=np.int64).reshape(-1))
        elif required:
            raise KeyError(f"gnd[{q}] has no {key!r} list; each entry needs 'ok' (and optionally "
                           "'junk') database indices")
        else:
            lists.append(np.empty(0, np.int64))
    counts = np.fromiter((len(a) for a in lists), dtype=np.int64, count=len(lists))
    idx = np.concatenate(lists) if lists else np.empty(0, np.int64)
    qid = np.repeat(np.arange(len(lists), dtype=np.int64), counts)
    if idx.size and idx.min() < 0:
        raise ValueError(f"gnd {key!r} lists contain negative database indices")
    return qid, idx, counts


def _marked_positions(R: np.ndarray, ok_q: np.ndarray, ok_i: np.ndarray, jk_q: np.ndarray,
                      jk_i: np.ndarray, n_db: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every ranked item that is a positive or junk: (query, position, code), sorted by (query, position).

    ``code`` has bit 1 set for a positive and bit 2 for junk. Per chunk of queries a small
    (queries x database) uint8 table is marked from the ground truth, gathered through
    ``ranks`` and scanned for non-zeros; ``ok_q``/``jk_q`` must be sorted. Chunks are
    kept small (about 1M table entries) so the gathers stay in cache.
    """
    n_q, K = R.shape
    chunk = max(1, _CHUNK_ELEMS // max(n_db, K, 1))
    starts = np.arange(0, n_q + chunk, chunk)
    ok_b, jk_b = np.searchsorted(ok_q, starts), np.searchsorted(jk_q, starts)
    qs, ps, codes = [], [], []
    for c, a in enumerate(range(0, n_q, chunk)):
        b = min(a + chunk, n_q)
        table = np.zeros((b - a) * n_db, dtype=np.uint8)  # (c, n_db), flattened
        table[(ok_q[ok_b[c]:ok_b[c + 1]] - a) * n_db + ok_i[ok_b[c]:ok_b[c + 1]]] = 1
        jflat = (jk_q[jk_b[c]:jk_b[c + 1]] - a) * n_db + jk_i[jk_b[c]:jk_b[c + 1]]
        table[jflat] = table[jflat] | 2
        marks = table[R[a:b] + (np.arange(b - a) * n_db)[:, None]]  # (c, K): code of each ranked item
        nz = np.flatnonzero(marks != 0)  # row-major: by query, then position
        qs.append(nz // K + a)
        ps.append(nz % K)
        codes.append(marks.ravel()[nz])
    if not qs:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.uint8)
    return np.concatenate(qs), np.concatenate(ps), np.concatenate(codes)


def compute_map(ranks: ArrayLike, gnd: Sequence[dict], kappas: Sequence[int] = (1, 5, 10)
                ) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """Mean average precision and mean precision@k with junk images, as in revisited Oxford/Paris.

    For query ``q`` with ``n_pos = len(gnd[q]["ok"])`` positives, let ``r_0 < r_1 < ...`` be
    the 0-based positions in ``ranks[q]`` of the positives that were retrieved, each
    reduced by the number of ``gnd[q]["junk"]`` images ranked above it (junk images are
    ignored: neither right nor wrong). AP is the trapezoid-rule area under the
    precision-recall curve (Radenovic et al., "Revisiting Oxford and Paris: large-scale
    image retrieval benchmarking", CVPR 2018, evaluation code ``compute_map``):

        AP = (1 / n_pos) * sum_j 1/2 * ( j / r_j  +  (j + 1) / (r_j + 1) ),  j / r_j := 1 if r_j = 0

    where ``j`` is the number of positives ranked before the j-th one. Positives missing
    from a truncated ``ranks`` row are never retrieved and add 0. Precision@k uses
    ``k_q = min(max_j r_j + 1, k)`` (so a query with only 2 positives, both on top, has
    P@5 = 1):  ``P@k = #{j : r_j < k_q} / k_q``; it is 0 when no positive was retrieved.
    Queries with an empty ``ok`` list get NaN and are left out of both means.

    Vectorised over queries: per chunk of queries a (queries x database) table marking
    positives and junk is gathered through ``ranks``; its non-zero entries, already in
    (query, position) order, give ``j`` and the junk counts by cumulative sums.

    Args:
        ranks: (n_q, n_ranked) integer database indices, best first (tensor or array); a
            row should not repeat an index (a repeat would count at both positions).
        gnd: length-``n_q`` list of dicts with ``"ok"`` and optional ``"junk"`` index lists.
        kappas: the k values for mP@k.

    Returns:
        ``(mAP, aps, mpk, pks)``: mAP ``float``; ``aps`` (n_q,) float64 with NaN for queries
        without positives; ``mpk`` (len(kappas),) mean precision at each k; ``pks``
        (n_q, len(kappas)). mAP and mpk are NaN if no query has positives.
    """
    R = _as_ranks(ranks)
    n_q, K = R.shape
    if len(gnd) != n_q:
        raise ValueError(
            f"gnd has {len(gnd)} entries but ranks has {n_q} query rows; they must match "
            "one-to-one (ranks is (n_queries, n_db), not transposed)"
        )
    ks = check_kappas(kappas)
    ok_q, ok_i, n_pos = _flatten_gnd(gnd, "ok", required=True)
    jk_q, jk_i, _ = _flatten_gnd(gnd, "junk", required=False)
    n_db = int(max(R.max(initial=-1), ok_i.max(initial=-1), jk_i.max(initial=-1))) + 1

    q, p, code = _marked_positions(R, ok_q, ok_i, jk_q, jk_i, n_db)
    is_junk = (code & 2) > 0
    seen_junk = np.cumsum(is_junk) - is_junk  # junk strictly before, counted from the start
    junk_before = seen_junk - seen_junk[np.searchsorted(q, q, side="left")]  # ... within the query
    is_pos = (code & 1) > 0
    qs, r = q[is_pos], p[is_pos] - junk_before[is_pos]  # junk-adjusted 0-based rank
    j = np.arange(qs.size) - np.searchsorted(qs, qs, side="left")  # positives ranked before

    prec0 = np.where(r == 0, 1.0, j / np.maximum(r, 1))
    prec1 = (j + 1) / (r + 1)
    n_pos_safe = np.maximum(n_pos, 1)
    aps = np.bincount(qs, weights=(prec0 + prec1) / (2.0 * n_pos_safe[qs]), minlength=n_q)
    aps = aps.astype(np.float64, copy=False)  # bincount of nothing is int

    pks = np.zeros((n_q, len(ks)))
    if qs.size:
        max_r = np.full(n_q, -1, dtype=np.int64)
        np.maximum.at(max_r, qs, r)
        for c, k in enumerate(ks):
            kq = np.minimum(max_r + 1, k)  # (n_q,), 0 for queries with nothing retrieved
            hits = np.bincount(qs, weights=(r < kq[qs]).astype(np.float64), minlength=n_q)
            pks[:, c] = np.divide(hits, kq, out=np.zeros(n_q), where=kq > 0)

    empty = n_pos == 0
    aps[empty] = np.nan
    pks[empty] = np.nan
    if empty.all():
        return float("nan"), aps, np.full(len(ks), np.nan), pks
    return float(aps[~empty].mean()), aps, pks[~empty].mean(axis=0), pks


def evaluate_revisited(ranks: ArrayLike, gnd: Sequence[dict], kappas: Sequence[int] = (1, 5, 10)
                       ) -> dict[str, dict]:
    """Easy / Medium / Hard mAP and mP@k of the revisited Oxford and Paris benchmarks.

    ``gnd[q]`` holds the raw ``"easy"``, ``"hard"`` and ``"junk"`` lists of query ``q``
    (as in ``gnd_roxford5k.pkl``). The three protocols of :func:`revisited_protocol`
    (Radenovic et al., CVPR 2018), each scored with :func:`compute_map`. Taught in ``notebooks/00_pipeline.ipynb``.

    Args:
        ranks: (n_q, n_ranked) database indices, best first.
        gnd: length-``n_q`` list of dicts with ``"easy"``, ``"hard"``, ``"junk"``.
        kappas: k values for mP@k.

    Returns:
        ``{"easy": {"mAP": float, "mP@k": {k: float}}, "medium": {...}, "hard": {...}}``,
        fractions.
    """
    ks = check_kappas(kappas)
    out = {}
    for name in _PROTOCOLS:
        m, _, mpk, _ = compute_map(ranks, revisited_protocol(gnd, name), ks)
        out[name] = {"mAP": m, "mP@k": {k: float(v) for k, v in zip(ks, mpk)}}
    return out


def as_labels(labels: Any, name: str) -> np.ndarray:
    """``labels`` (tensor, array or list) as a 1-D numpy array, one label per image."""
    lab = _to_numpy(labels)
    if lab.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one label per image), got shape {lab.shape}")
    return lab


def gnd_from_labels(labels: ArrayLike, query_labels: Optional[ArrayLike] = None) -> list[dict]:
    """Ground truth for a group-labelled set (Holidays/UKBench/CUB style).

    If ``query_labels`` is ``None`` every database image is a query: ``ok`` are the *other*
    images with its label and ``junk`` is ``[itself]`` (so ranking itself first is not
    counted). Otherwise query ``q`` has ``ok`` = all database images labelled
    ``query_labels[q]`` and no junk. Taught in ``notebooks/00_pipeline.ipynb``.

    Args:
        labels: (n_db,) label of each database image (ints or strings).
        query_labels: optional (n_q,) labels of separate queries.

    Returns:
        List of ``{"ok": int64 array, "junk": int64 array}``, one per query.
    """
    lab = as_labels(labels, "labels")
    uniq, codes = np.unique(lab, return_inverse=True)
    order = np.argsort(codes, kind="stable")
    groups = np.split(order.astype(np.int64), np.cumsum(np.bincount(codes, minlength=len(uniq)))[:-1])
    if query_labels is None:
        return [{"ok": groups[c][groups[c] != i], "junk": np.array([i], dtype=np.int64)}
                for i, c in enumerate(codes)]
    qlab = as_labels(query_labels, "query_labels")
    pos = np.searchsorted(uniq, qlab)
    pos = np.minimum(pos, len(uniq) - 1)
    known = uniq[pos] == qlab
    empty = np.empty(0, np.int64)
    return [{"ok": groups[p] if kn else empty, "junk": empty} for p, kn in zip(pos, known)]


def map_by_labels(ranks: ArrayLike, labels: ArrayLike, query_labels: Optional[ArrayLike] = None,
                  kappas: Sequence[int] = (1, 5, 10)) -> dict[str, Any]:
    """mAP / mP@k of a group-labelled set, ground truth from :func:`gnd_from_labels`.

    With ``query_labels=None`` each image queries all the others (itself is junk), as for
    INRIA Holidays. Taught in ``notebooks/00_pipeline.ipynb``.

    Returns:
        ``{"mAP": float, "mP@k": {k: float}, "aps": (n_q,) array}``.
    """
    R = _as_ranks(ranks)
    gnd = gnd_from_labels(labels, query_labels)
    if len(gnd) != R.shape[0]:
        raise ValueError(
            f"{len(gnd)} query labels but ranks has {R.shape[0]} rows; with query_labels=None "
            "every database image must be a query, in database order"
        )
    ks = check_kappas(kappas)
    m, aps, mpk, _ = compute_map(R, gnd, ks)
    return {"mAP": m, "mP@k": {k: float(v) for k, v in zip(ks, mpk)}, "aps": aps}


def recall_from_ranks(ranks: ArrayLike, labels: ArrayLike, query_labels: Optional[ArrayLike] = None,
                      ks: Sequence[int] = (1, 2, 4, 8), exclude_self: Optional[bool] = None
                      ) -> dict[int, float]:
    """Recall@K of class-level retrieval (CUB-200, Cars196, SOP protocol).

    Recall@K = fraction of queries with at least one database image of their label among
    the top K results. Oh Song et al., "Deep metric learning via lifted structured
    feature embedding", CVPR 2016. With ``exclude_self`` (default: ``query_labels is
    None``, i.e. query ``i`` is database image ``i``) the query's own index is dropped
    from its row first and later results move up. Taught in ``notebooks/00_pipeline.ipynb``.

    Args:
        ranks: (n_q, n_ranked) database indices, best first.
        labels: (n_db,) database labels.
        query_labels: (n_q,) query labels; ``None`` means ``labels[:n_q]`` (queries are the
            database).
        ks: the K values; each must be at most ``n_ranked`` (minus 1 when excluding self).
        exclude_self: drop index ``q`` from row ``q``.

    Returns:
        ``{K: recall}`` with recalls as fractions.
    """
    R = _as_ranks(ranks)
    n_q, K = R.shape
    lab = as_labels(labels, "labels")
    if exclude_self is None:
        exclude_self = query_labels is None
    if query_labels is None:
        if len(lab) < n_q:
            raise ValueError(f"ranks has {n_q} query rows but only {len(lab)} labels; pass "
                             "query_labels when queries are not the database")
        qlab = lab[:n_q]
    else:
        qlab = as_labels(query_labels, "query_labels")
        if len(qlab) != n_q:
            raise ValueError(f"query_labels has {len(qlab)} entries but ranks has {n_q} rows")
    kk = check_kappas(ks, "ks")
    usable = K - int(exclude_self)
    if max(kk) > usable:
        raise ValueError(
            f"Recall@{max(kk)} needs {max(kk) + int(exclude_self)} ranked results per query "
            f"but ranks has {K} columns; retrieve more (k >= max(ks){' + 1' if exclude_self else ''})"
        )
    if R.size and R.max() >= len(lab):
        raise ValueError(f"ranks holds index {R.max()} but there are only {len(lab)} labels")
    hit = lab[R] == qlab[:, None]  # (n_q, K)
    if exclude_self:
        is_self = R == np.arange(n_q)[:, None]
        hit &= ~is_self
        self_pos = np.where(is_self.any(1), is_self.argmax(1), K)
    else:
        self_pos = np.full(n_q, K)
    first = np.where(hit.any(1), hit.argmax(1), K)  # (n_q,) first correct result
    first = first - (self_pos < first)
    return {k: float((first < k).mean()) for k in kk}


def ns_score(ranks: ArrayLike, labels: ArrayLike) -> float:
    """UKBench N-S score: mean number of same-object images among the top 4 (0..4).

    Every image is a query and is *not* removed from its own results, so a perfect system
    scores 4 (itself plus the 3 other views of the object). Equals 4 x mean precision@4.
    Nister & Stewenius, "Scalable recognition with a vocabulary tree", CVPR 2006.
    Taught in ``notebooks/00_pipeline.ipynb``.

    Args:
        ranks: (n_q, n_ranked >= 4) database indices best first; query ``q`` is image ``q``.
        labels: (n_db,) object id of each image.
    """
    R = _as_ranks(ranks)
    lab = as_labels(labels, "labels")
    n_q, K = R.shape
    if K < 4:
        raise ValueError(f"the N-S score needs the top 4 results, ranks has {K} columns")
    if n_q > len(lab):
        raise ValueError(f"ranks has {n_q} rows but only {len(lab)} labels; every query must be "
                         "a database image (query q = image q)")
    if R[:, :4].max(initial=0) >= len(lab):
        raise ValueError(f"ranks holds index {R[:, :4].max()} but there are only {len(lab)} labels")
    return float((lab[R[:, :4]] == lab[:n_q, None]).sum(1).mean())


# ----------------------------------------------------------------------------------------
# protocols, per-query AP and the headline number
# ----------------------------------------------------------------------------------------
_PROTOCOLS = ("easy", "medium", "hard")


def revisited_protocol(gnd: Sequence[dict], protocol: str = "medium") -> list[dict]:
    """The ``{"ok", "junk"}`` ground truth of one revisited protocol, for :func:`compute_map`.

    ``gnd[q]`` holds the raw ``"easy"``, ``"hard"`` and ``"junk"`` lists of query ``q``
    (as in ``gnd_roxford5k.pkl``). The protocols (Radenovic et al., CVPR 2018) are

        Easy:   ok = easy,         junk = junk + hard
        Medium: ok = easy + hard,  junk = junk
        Hard:   ok = hard,         junk = junk + easy

    Medium is the usual headline. Raises ``ValueError`` for another protocol name and
    ``KeyError`` for an entry without the three lists. Taught in ``notebooks/00_pipeline.ipynb``.
    """
    if protocol not in _PROTOCOLS:
        raise ValueError(f"unknown revisited protocol {protocol!r}; choose one of {_PROTOCOLS}")
    out = []
    for q, g in enumerate(gnd):
        missing = {"easy", "hard", "junk"} - set(g)
        if missing:
            raise KeyError(f"gnd[{q}] lacks {sorted(missing)}; revisited ground truth needs "
                           "'easy', 'hard' and 'junk' lists (use compute_map for 'ok'/'junk')")
        easy, hard, junk = (np.asarray(_to_numpy(g[k]), dtype=np.int64).reshape(-1)
                            for k in ("easy", "hard", "junk"))
        if protocol == "easy":
            out.append({"ok": easy, "junk": np.concatenate([junk, hard])})
        elif protocol == "medium":
            out.append({"ok": np.concatenate([easy, hard]), "junk": junk})
        else:
            out.append({"ok": hard, "junk": np.concatenate([junk, easy])})
    return out


def compare_aps(ap_a: ArrayLike, ap_b: ArrayLike, tol: float = 1e-9) -> dict:
    """Which queries descriptor A wins or loses against descriptor B, by per-query AP.

    ``ap_a``, ``ap_b``: ``(n,)`` per-query APs (e.g. from :func:`~retrieval_lib.search.evaluate.query_aps`); queries
    where either is NaN are left out. Returns

    * ``"delta"``: ``(n,)`` ``ap_a - ap_b`` (NaN where left out);
    * ``"wins"``: indices with ``delta > tol``, biggest win first;
    * ``"losses"``: indices with ``delta < -tol``, biggest loss first;
    * ``"ties"``: indices with ``|delta| <= tol``, in index order.

    Taught in ``notebooks/02_spoc.ipynb`` (SPoC against MAC).
    """
    a = np.asarray(_to_numpy(ap_a), dtype=np.float64)
    b = np.asarray(_to_numpy(ap_b), dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"compare_aps: ap_a and ap_b must be 1-D of equal length, got {a.shape} and {b.shape}")
    delta = a - b
    idx = np.flatnonzero(np.isfinite(delta))
    d = delta[idx]
    wins = idx[d > tol]
    losses = idx[d < -tol]
    return {
        "delta": delta,
        "wins": wins[np.argsort(-delta[wins], kind="stable")],
        "losses": losses[np.argsort(delta[losses], kind="stable")],
        "ties": idx[np.abs(d) <= tol],
    }


#: Metric keys :func:`headline` tries in order when no key is given: group sets report
#: ``"mAP"``, revisited Oxford/Paris ``"mAP/medium"``, class-level sets such as CUB ``"R@1"``.
HEADLINE_KEYS = ("mAP", "mAP/medium", "R@1")


def headline(metrics: dict, key: Optional[str] = None) -> float:
    """The one number a plot or table shows from a metrics dict, as a float.

    ``key`` (e.g. ``benchmark.headline_key``) picks it; without one the first of
    :data:`HEADLINE_KEYS` present in ``metrics`` is used. Raises ``KeyError`` naming the
    available metrics when the key (or every default key) is missing.
    """
    keys = (key,) if key is not None else HEADLINE_KEYS
    for k in keys:
        if k in metrics:
            return float(metrics[k])
    raise KeyError(f"headline: no {' or '.join(map(repr, keys))} in the metrics {sorted(metrics)}; "
                   "pass key= one of them (e.g. benchmark.headline_key)")
