"""Re-ranking after a first search: alpha query expansion, database-side augmentation.

* :func:`alpha_qe` -- each query becomes a weighted sum of itself and its top neighbours.
* :func:`dba` -- each database vector becomes a weighted sum of its neighbours.
* :func:`exclude_self` -- drop a query from its own ranking (queries = database images).
* :func:`expand` -- DBA on the database, then alpha-QE of the queries, in one call.
* :func:`expanded_ranks` -- the ranks after both; when the queries are the database images,
  each query is left out of the database it is searched in (its own DBA included).

Shapes: descriptors ``(N, D)`` L2-normalised, ``ranks`` ``(n_q, k)`` best first.
Taught in ``notebooks/04_rmac.ipynb``.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from retrieval_lib.layers.checks import as_descriptors, check_int
from retrieval_lib.layers.functional import l2n
from retrieval_lib.search.nearest import ArrayLike, descriptor_pair, knn_checked, rank_database

__all__ = ["alpha_qe", "dba", "exclude_self", "expand", "expanded_ranks"]


def _weighted_sum(base: Optional[torch.Tensor], X: torch.Tensor, idx: torch.Tensor,
                  sims: torch.Tensor, alpha: float) -> torch.Tensor:
    """``base + sum_j max(sims[:, j], 0)**alpha * X[idx[:, j]]``, one neighbour rank at a time."""
    out = torch.zeros((idx.shape[0], X.shape[1]), dtype=X.dtype, device=X.device) if base is None \
        else base.clone()
    for j in range(idx.shape[1]):  # loop over the n neighbour ranks, not over queries
        w = sims[:, j:j + 1].clamp_min(0).pow(alpha)  # (n_q, 1)
        out += w * X[idx[:, j]]  # (n_q, D)
    return out


def alpha_qe(Q: ArrayLike, X: ArrayLike, ranks: ArrayLike, n: int = 2, alpha: float = 3.0) -> ArrayLike:
    """alpha-weighted query expansion (alpha-QE).

    With ``x_1..x_n`` the top-``n`` database descriptors of query ``q`` (from ``ranks``),

        q' = l2n( q + sum_{j=1..n} max(q . x_j, 0)^alpha  x_j ),

    i.e. the query itself has weight 1 (its self-similarity 1 to the power alpha) and
    neighbours with negative similarity get weight 0 (``alpha = 0`` gives plain average
    query expansion with all weights 1). Radenovic, Tolias & Chum, "Fine-tuning CNN image
    retrieval with no human annotation", TPAMI 2018, Sec. 5.1. Re-search with ``q'``
    afterwards. Taught in ``notebooks/04_rmac.ipynb``.

    Args:
        Q: (n_q, D) L2-normalised queries. X: (n_db, D) database.
        ranks: (n_q, >= n) database indices best first (tensor or numpy).
        n: number of neighbours added (``0`` returns ``l2n(Q)``).
        alpha: similarity exponent.

    Returns:
        (n_q, D) expanded queries, same type/dtype/device as ``Q``.

    Raises:
        ValueError: ``Q`` or ``X`` empty or holding NaN/inf; ``ranks`` of the wrong shape
            or pointing outside ``X``; ``n`` larger than the columns of ``ranks``.
    """
    is_np = isinstance(Q, np.ndarray)
    Qt, Xt = descriptor_pair(Q, X, "alpha_qe")
    R = ranks.detach() if isinstance(ranks, torch.Tensor) else torch.from_numpy(np.array(ranks))
    if R.ndim != 2 or R.shape[0] != Qt.shape[0]:
        raise ValueError(f"alpha_qe: ranks must be (n_q={Qt.shape[0]}, n_ranked), got shape "
                         f"{tuple(R.shape)}; pass the ranks of these queries, e.g. rank_database(Q, X, k=n)")
    n = check_int(n, "n", "alpha_qe", minimum=0)
    if n > R.shape[1]:
        raise ValueError(f"alpha_qe: n={n} neighbours requested but ranks has {R.shape[1]} columns; "
                         f"rank at least {n} database items per query")
    idx = R[:, :n].to(device=Qt.device, dtype=torch.long)  # (n_q, n)
    if n and (int(idx.min()) < 0 or int(idx.max()) >= Xt.shape[0]):
        raise ValueError(f"alpha_qe: ranks holds database indices outside 0..{Xt.shape[0] - 1} "
                         "(X has that many rows); were they computed against another X?")
    sims = torch.einsum("qd,qnd->qn", Qt, Xt[idx]) if n else idx.to(Qt.dtype)
    out = l2n(_weighted_sum(Qt, Xt, idx, sims, float(alpha)))
    return out.numpy() if is_np else out


def dba(X: ArrayLike, n: int = 2, alpha: float = 3.0, chunk_size: Optional[int] = None,
        progress: bool = False) -> ArrayLike:
    """Database-side augmentation (alpha-DBA): each database vector becomes a weighted sum of its neighbours.

    With ``x_1..x_n`` the top-``n`` neighbours of ``x`` in ``X`` *including ``x`` itself*
    (normally ``x_1 = x``),

        x' = l2n( sum_{j=1..n} max(x . x_j, 0)^alpha  x_j ),

    so ``n = 1`` leaves ``X`` unchanged. Arandjelovic & Zisserman, "Three things everyone
    should know to improve object retrieval", CVPR 2012; alpha-weighting from Radenovic et
    al., TPAMI 2018. Queries are then searched against ``x'`` (usually after also
    expanding them with :func:`alpha_qe`). Taught in ``notebooks/04_rmac.ipynb``.

    Args:
        X: (n_db, D) L2-normalised database.
        n: neighbours (self included), ``1 <= n <= n_db``.
        alpha: similarity exponent.
        chunk_size, progress: passed to :func:`knn`.

    Returns:
        (n_db, D) augmented database, same type/dtype/device as ``X``.

    Raises:
        ValueError: ``X`` empty or holding NaN/inf; ``n`` outside ``1..n_db``.
    """
    is_np = isinstance(X, np.ndarray)
    Xt = as_descriptors(X, "X", "dba")
    n = check_int(n, "n", "dba")
    if n > Xt.shape[0]:
        raise ValueError(f"dba: n={n} neighbours but X has {Xt.shape[0]} rows; pass n <= {Xt.shape[0]}")
    scores, idx = knn_checked(Xt, Xt, n, chunk_size=chunk_size, progress=progress, fn="dba")  # (n_db, n)
    out = l2n(_weighted_sum(None, Xt, idx, scores, float(alpha)))
    return out.numpy() if is_np else out


def exclude_self(ranks) -> np.ndarray:
    """Drop each query from its own ranking: ``(N, k) -> (N, k - 1)`` int64 numpy array.

    For a set whose queries are its database images (query ``q`` is database image
    ``q``), row ``q`` of ``ranks`` loses the entry ``q``; a row where ``q`` is not among
    the ``k`` ranked loses its last entry instead, so every row keeps ``k - 1`` neighbours
    in order. Use it before :func:`alpha_qe`, which must not count a
    query as its own neighbour. Raises ``ValueError`` for a non-2-D array or ``k < 2``.
    Taught in ``notebooks/04_rmac.ipynb``.
    """
    R = ranks.detach().cpu().numpy() if isinstance(ranks, torch.Tensor) else np.asarray(ranks)
    if R.ndim != 2 or R.shape[1] < 2:
        raise ValueError(f"exclude_self: ranks must be (N, k) with k >= 2, got shape {R.shape}")
    if not np.issubdtype(R.dtype, np.integer):
        raise TypeError(f"exclude_self: ranks must hold integer indices, got dtype {R.dtype}")
    drop = R == np.arange(R.shape[0])[:, None]  # (N, k): the query itself
    drop[~drop.any(axis=1), -1] = True  # rows without it lose their last entry
    return R[~drop].reshape(R.shape[0], R.shape[1] - 1).astype(np.int64, copy=False)


def _expand_settings(n_qe, n_dba, alpha, fn: str) -> tuple:
    n_qe = check_int(n_qe, "n_qe", fn, minimum=0)
    n_dba = check_int(n_dba, "n_dba", fn, minimum=0)
    alpha = float(alpha)
    if not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"{fn}: alpha must be a finite number >= 0, got {alpha!r}")
    return n_qe, n_dba, alpha


def expand(X: torch.Tensor, Q: Optional[torch.Tensor] = None, n_qe: int = 2, n_dba: int = 0,
           alpha: float = 3.0) -> tuple:
    """Database-side augmentation, then alpha query expansion: ``(X', Q')``.

    1. DBA (when ``n_dba >= 2``): ``X' = dba(X, n_dba, alpha)``, each database vector
       replaced by ``l2n(sum_{j<=n_dba} max(x . x_j, 0)^alpha x_j)`` over its ``n_dba``
       nearest database vectors, itself included (``n_dba`` 0 or 1 leaves ``X``).
    2. alpha-QE (when ``n_qe >= 1``): each query's top ``n_qe`` neighbours in ``X'`` give
       ``Q' = l2n(q + sum_j max(q . x'_j, 0)^alpha x'_j)``.

    ``Q=None`` means the queries are the database images themselves (``Q = X``); the query
    is then not counted as its own neighbour (:func:`exclude_self`). Search ``Q'`` against
    ``X'`` afterwards, e.g. ``book.evaluate(X', Q')``. Shapes ``X (N, D)``, ``Q (n_q, D)``;
    both L2-normalised.

    DBA with ``Q=None`` is refused: one augmented database would hold every query's own
    vector inside its neighbours' vectors (a query's positives would be pulled towards the
    query by the query itself), which no real search can do. :func:`expanded_ranks` gives
    the ranks with each query left out of the database it is searched in.

    Source: alpha-QE and alpha-DBA as in Radenović, Tolias & Chum, TPAMI 2018 (DBA:
    Arandjelović & Zisserman, CVPR 2012); used with R-MAC by Gordo et al., IJCV 2017.
    The formulas are :func:`alpha_qe` and
    :func:`dba`. Taught in ``notebooks/04_rmac.ipynb``.

    Raises:
        ValueError: bad ``n_qe``/``n_dba``/``alpha``; more neighbours than the database has;
            ``Q=None`` with ``n_dba >= 2`` (use :func:`expanded_ranks`).
    """
    n_qe, n_dba, alpha = _expand_settings(n_qe, n_dba, alpha, "expand")
    self_query = Q is None
    n_db = as_descriptors(X, "X", "expand").shape[0]
    if self_query:
        if n_dba >= 2:
            raise ValueError(f"expand: n_dba={n_dba} with Q=None (the queries are the database images) would put "
                             "each query's own vector into its neighbours' DBA vectors; use "
                             "expanded_ranks(X, None, n_qe, n_dba, alpha), which leaves each query out of its "
                             "database, or pass separate queries Q")
        Q = X
    else:
        as_descriptors(Q, "Q", "expand")
    if n_dba > n_db:
        raise ValueError(f"expand: n_dba={n_dba} neighbours but the database has {n_db} vectors")
    Xa = dba(X, n=n_dba, alpha=alpha) if n_dba >= 2 else X
    if n_qe == 0:
        return Xa, Q
    k = n_qe + 1 if self_query else n_qe
    if k > n_db:
        raise ValueError(f"expand: n_qe={n_qe} neighbours but the database has only "
                         f"{n_db - int(self_query)} other vectors")
    ranks = rank_database(Q, Xa, k=k)  # (n_q, k)
    if self_query:
        ranks = exclude_self(ranks)
    return Xa, alpha_qe(Q, Xa, ranks, n=n_qe, alpha=alpha)


def expanded_ranks(X: ArrayLike, Q: Optional[ArrayLike] = None, n_qe: int = 2, n_dba: int = 0,
                   alpha: float = 3.0) -> np.ndarray:
    """Ranks after DBA and alpha-QE: ``(n_q, n_db)`` database indices best first, int64 numpy.

    Separate queries (``Q`` given): ``rank_database(Q', X')`` with ``(X', Q') = expand(X, Q,
    n_qe, n_dba, alpha)``.

    ``Q=None``: every database image is a query (real171, Holidays-style sets), and query
    ``q`` is searched as if it were not in the database, as a new photo would be. Its
    database is ``X`` without ``x_q``, augmented without ``x_q``: a database vector ``x_j``
    whose ``n_dba`` nearest neighbours include ``x_q`` is augmented, for this query, with
    its next neighbour instead,

        x'_j(-q) = l2n( sum_{i <= n_dba, i != q} w_ji x_i  +  w_j,n_dba+1 x_(n_dba+1) ),
        w_ji = max(x_j . x_i, 0)^alpha,

    the expansion takes the top ``n_qe`` of ``x_q`` among those vectors, and ``q`` itself is
    ranked last (the benchmark counts it as junk). Only the pairs ``(q, j)`` with ``x_q``
    among ``x_j``'s neighbours differ from plain DBA, at most ``n_db * (n_dba - 1)`` of
    them, so this costs one ``(n_db, n_db)`` score matrix plus one vector per such pair.
    Without DBA it ranks exactly as ``expand(X, None, n_qe)`` then search does.

    Evaluate with ``benchmark.evaluate(ranks)``. Taught in ``notebooks/04_rmac.ipynb``.

    Raises:
        ValueError: ``X`` or ``Q`` empty or holding NaN/inf; bad ``n_qe``/``n_dba``/``alpha``;
            with ``Q=None``, ``n_dba`` or ``n_qe`` above ``n_db - 1`` (the database a query
            sees has one vector less).
    """
    n_qe, n_dba, alpha = _expand_settings(n_qe, n_dba, alpha, "expanded_ranks")
    if Q is not None:
        Xa, Qa = expand(X, Q, n_qe=n_qe, n_dba=n_dba, alpha=alpha)
        return rank_database(Qa, Xa)
    Xt = as_descriptors(X, "X", "expanded_ranks")
    N, D = Xt.shape
    for name, n in (("n_dba", n_dba), ("n_qe", n_qe)):
        if n > N - 1:
            raise ValueError(f"expanded_ranks: {name}={n} neighbours but with the query left out the database "
                             f"has {N - 1} vectors; pass {name} <= {N - 1}")
    empty = torch.empty(0, dtype=torch.long, device=Xt.device)
    q_of, j_of, A = empty, empty, Xt.new_zeros((0, D))  # pairs (query, database item) and their vectors
    Xa = Xt
    if n_dba >= 2:
        s, idx = knn_checked(Xt, Xt, n_dba + 1, fn="expanded_ranks")  # (N, n_dba + 1), best first
        w = s.clamp_min(0).pow(alpha)  # (N, n_dba + 1)
        U = _weighted_sum(None, Xt, idx[:, :n_dba], s[:, :n_dba], alpha)  # (N, D) plain DBA, not normalised
        Xa = l2n(U)
        j_of, p = torch.nonzero(idx[:, :n_dba] != torch.arange(N, device=Xt.device)[:, None], as_tuple=True)
        q_of = idx[j_of, p]  # x_q is a DBA neighbour of x_j: for query q, x_j is augmented without it
        A = l2n(U[j_of] - w[j_of, p, None] * Xt[q_of] + w[j_of, n_dba, None] * Xt[idx[j_of, n_dba]])  # (P, D)
    keys = q_of * N + j_of
    keys, order = keys.sort()
    q_of, j_of, A = q_of[order], j_of[order], A[order]

    def scores(V: torch.Tensor) -> torch.Tensor:
        """(N, D) query vectors -> (N, N) scores against the database each query sees."""
        S = V @ Xa.T
        S[q_of, j_of] = (V[q_of] * A).sum(dim=1)
        S.fill_diagonal_(-math.inf)
        return S

    S = scores(Xt)
    if n_qe >= 1:
        sims, nb = torch.topk(S, n_qe, dim=1)  # (N, n_qe)
        V = Xa[nb]  # (N, n_qe, D) the neighbours as each query sees them
        want = torch.arange(N, device=Xt.device)[:, None] * N + nb  # (N, n_qe) pair keys
        pos = torch.searchsorted(keys, want.reshape(-1)).reshape(want.shape).clamp_max(max(len(keys) - 1, 0))
        hit = keys[pos] == want if len(keys) else torch.zeros_like(want, dtype=torch.bool)
        V[hit] = A[pos[hit]]
        S = scores(l2n(Xt + (sims.clamp_min(0).pow(alpha)[..., None] * V).sum(dim=1)))
    return torch.sort(S, dim=1, descending=True, stable=True).indices.cpu().numpy()
