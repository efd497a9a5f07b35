"""Nearest-neighbour search by inner product (re-ranking lives in :mod:`retrieval_lib.search.rerank`).

Descriptors are ``(N, D)`` rows, L2-normalised, so the inner product ``Q @ X.T`` is the
cosine similarity. :func:`knn` is exact and runs on any torch device in bounded memory
by scanning the database in blocks; optional faiss backends give the same API.

Taught in ``notebooks/00_pipeline.ipynb``.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Optional, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from retrieval_lib.layers.checks import as_descriptors

__all__ = ["knn", "rank_database", "BACKENDS"]

ArrayLike = Union[torch.Tensor, np.ndarray]

BACKENDS = ("torch", "faiss-flat", "faiss-ivfpq")

# Score block held at once: (query rows) x (database rows) <= 2**25 elements (128 MB in float32).
_BLOCK_ELEMS = 1 << 25
_MAX_QUERY_CHUNK = 4096


def descriptor_pair(Q: ArrayLike, X: ArrayLike, fn: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and database as tensors: each a non-empty finite (N, D) matrix, the two alike.

    ``fn`` names the calling function in the error messages."""
    Qt = as_descriptors(Q, "Q", fn)
    Xt = Qt if X is Q else as_descriptors(X, "X", fn)
    if Qt.shape[1] != Xt.shape[1]:
        raise ValueError(f"{fn}: Q has {Qt.shape[1]} dims but X has {Xt.shape[1]}; descriptors must "
                         "come from the same model (and the same whitening)")
    if Qt.device != Xt.device:
        raise ValueError(f"{fn}: Q is on {Qt.device} but X is on {Xt.device}; move both to one device")
    if Qt.dtype != Xt.dtype:
        raise TypeError(f"{fn}: Q is {Qt.dtype} but X is {Xt.dtype}; cast one so both match")
    return Qt, Xt


def _check_k(k: int, n_db: int, fn: str) -> int:
    k = int(k)
    if k < 1:
        raise ValueError(f"{fn}: k must be >= 1, got {k}")
    if k > n_db:
        raise ValueError(f"{fn}: k={k} is larger than the database ({n_db} descriptors); pass "
                         f"k<={n_db} (or use rank_database(Q, X, k=None) for a full ranking)")
    return k


@torch.no_grad()
def _knn_torch(Q: torch.Tensor, X: torch.Tensor, k: int, chunk_size: Optional[int],
               progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    n_q, n_db = Q.shape[0], X.shape[0]
    q_chunk = max(1, min(n_q, _MAX_QUERY_CHUNK))
    if chunk_size is None:
        chunk_size = max(k, _BLOCK_ELEMS // q_chunk)
    chunk_size = int(chunk_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 database rows, got {chunk_size}")
    scores = torch.empty((n_q, k), dtype=Q.dtype, device=Q.device)
    idx = torch.empty((n_q, k), dtype=torch.long, device=Q.device)
    starts = range(0, n_db, chunk_size)
    if progress:
        starts = tqdm(starts, desc="knn", unit="block")
    best_s: list[Optional[torch.Tensor]] = [None] * math.ceil(n_q / q_chunk)
    best_i: list[Optional[torch.Tensor]] = [None] * len(best_s)
    for a in starts:
        Xc = X[a:a + chunk_size]  # (c, D)
        kc = min(k, Xc.shape[0])
        for t, qa in enumerate(range(0, n_q, q_chunk)):
            S = Q[qa:qa + q_chunk] @ Xc.T  # (q, c)
            s, i = torch.topk(S, kc, dim=1)  # (q, kc), best first
            i += a
            if best_s[t] is not None:  # merge with the running top-k
                s = torch.cat([best_s[t], s], dim=1)
                i = torch.cat([best_i[t], i], dim=1)
                s, j = torch.topk(s, min(k, s.shape[1]), dim=1)
                i = torch.gather(i, 1, j)
            best_s[t], best_i[t] = s, i
    for t, qa in enumerate(range(0, n_q, q_chunk)):
        scores[qa:qa + q_chunk] = best_s[t]
        idx[qa:qa + q_chunk] = best_i[t]
    return scores, idx


def _faiss():
    try:
        import faiss
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the faiss backends need the faiss package: `pip install faiss-cpu` (or use "
            "backend='torch', which is exact and needs nothing else)"
        ) from err
    return faiss


def _default_m(d: int) -> int:
    """Largest divisor of ``d`` that is at most ``min(64, d // 2)`` (PQ sub-quantisers)."""
    for m in range(max(1, min(64, d // 2)), 0, -1):
        if d % m == 0:
            return m
    return 1


def _knn_faiss(Q: torch.Tensor, X: torch.Tensor, k: int, backend: str, nlist: Optional[int],
               m: Optional[int], nprobe: Optional[int], nbits: int) -> tuple[torch.Tensor, torch.Tensor]:
    faiss = _faiss()
    Qn = np.ascontiguousarray(Q.detach().cpu().to(torch.float32).numpy())
    Xn = np.ascontiguousarray(X.detach().cpu().to(torch.float32).numpy())
    n_db, d = Xn.shape
    if backend == "faiss-flat":
        index = faiss.IndexFlatIP(d)
    else:
        if nlist is None:
            nlist = max(1, min(int(4 * math.sqrt(n_db)), n_db // 39))
        if m is None:
            m = _default_m(d)
        if nprobe is None:
            nprobe = max(1, nlist // 8)
        nlist, m, nprobe = int(nlist), int(m), int(nprobe)
        if d % m != 0:
            raise ValueError(f"m={m} sub-quantisers must divide the dimension D={d}")
        if n_db < max(nlist, 2 ** nbits):
            raise ValueError(
                f"IVF-PQ trains {nlist} lists and 2**{nbits}={2 ** nbits} codewords on the "
                f"database but it has only {n_db} vectors; lower nlist/nbits or use "
                "backend='torch' or 'faiss-flat'"
            )
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFPQ(quantizer, d, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT)
        per_centroid = index.cp.min_points_per_centroid  # faiss advises 39
        if n_db < per_centroid * max(nlist, 2 ** nbits):
            warnings.warn(
                f"IVF-PQ trains {nlist} lists and {2 ** nbits} codewords per sub-quantiser on "
                f"only {n_db} vectors (faiss advises >= {per_centroid} per centroid); expect "
                "lower recall, or lower nlist/nbits",
                UserWarning, stacklevel=3,
            )
            # said once above, instead of faiss printing it for every sub-quantiser
            index.cp.min_points_per_centroid = index.pq.cp.min_points_per_centroid = 1
        index.train(Xn)
        index.nprobe = min(nprobe, nlist)
    index.add(Xn)
    D, I = index.search(Qn, k)
    D = np.where(I < 0, -np.inf, D)  # faiss pads with -1 when a probe found < k items
    scores = torch.from_numpy(D).to(device=Q.device, dtype=Q.dtype)
    return scores, torch.from_numpy(I.astype(np.int64)).to(Q.device)


def knn(Q: ArrayLike, X: ArrayLike, k: int, chunk_size: Optional[int] = None,
        backend: str = "torch", *, nlist: Optional[int] = None, m: Optional[int] = None,
        nprobe: Optional[int] = None, nbits: int = 8, progress: bool = False
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` database items for each query by inner product ``s = Q @ X.T``.

    ``backend="torch"`` is exact. It scans the database in blocks of ``chunk_size`` rows
    (and the queries in blocks of up to 4096), keeps each block's ``torch.topk`` and merges
    it into a running top-k, so the extra memory is one score block (about 128 MB by
    default) however large ``X`` is; it runs on ``Q``'s device. ``"faiss-flat"`` is exact
    too (faiss ``IndexFlatIP``, CPU); ``"faiss-ivfpq"`` is approximate: an inverted file
    with ``nlist`` lists (``nprobe`` probed) and product-quantised codes of ``m`` bytes of
    ``nbits`` bits, trained on ``X`` (Jegou, Douze & Schmid, "Product quantization for
    nearest neighbor search", TPAMI 2011). Taught in ``notebooks/00_pipeline.ipynb``.

    Args:
        Q: (n_q, D) queries; X: (n_db, D) database (tensors, or numpy arrays).
        k: neighbours per query, ``1 <= k <= n_db`` (larger ``k`` raises ``ValueError``).
        chunk_size: database rows per block (torch backend); default fills the block budget.
        backend: one of :data:`BACKENDS`.
        nlist, m, nprobe, nbits: IVF-PQ settings; defaults ``nlist = min(4 sqrt(n_db), n_db/39)``,
            ``m`` = largest divisor of D up to 64 (and D/2), ``nprobe = nlist/8``, ``nbits = 8``.
        progress: show a progress bar over database blocks (torch backend).

    Warns:
        UserWarning: IVF-PQ trained on fewer than 39 vectors per centroid (faiss's advice).

    Returns:
        ``(scores, idx)``, both (n_q, k) tensors on ``Q``'s device, best first; scores in
        ``Q``'s dtype (no gradient), idx int64. IVF-PQ scores are approximate and, when
        the probed lists hold fewer than ``k`` items, padded with idx ``-1`` and score
        ``-inf``.

    Raises:
        ValueError: ``Q`` or ``X`` empty, not 2-D, or holding NaN/inf (they would rank
            arbitrarily); ``k`` out of range; an unknown backend.
    """
    Qt, Xt = descriptor_pair(Q, X, "knn")
    return knn_checked(Qt, Xt, k, chunk_size, backend, nlist=nlist, m=m, nprobe=nprobe, nbits=nbits,
                progress=progress, fn="knn")


def knn_checked(Qt: torch.Tensor, Xt: torch.Tensor, k: int, chunk_size: Optional[int] = None,
         backend: str = "torch", *, nlist: Optional[int] = None, m: Optional[int] = None,
         nprobe: Optional[int] = None, nbits: int = 8, progress: bool = False, fn: str = "knn"
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`knn` on descriptors already checked by :func:`descriptor_pair` (used by the search
    functions that check their inputs once and search several times)."""
    k = _check_k(k, Xt.shape[0], fn)
    if backend == "torch":
        return _knn_torch(Qt, Xt, k, chunk_size, progress)
    if backend in ("faiss-flat", "faiss-ivfpq"):
        return _knn_faiss(Qt, Xt, k, backend, nlist, m, nprobe, int(nbits))
    raise ValueError(f"{fn}: unknown backend {backend!r}; choose one of {BACKENDS}")


def rank_database(Q: ArrayLike, X: ArrayLike, k: Optional[int] = None,
                  chunk_size: Optional[int] = None, backend: str = "torch", **kwargs: Any
                  ) -> np.ndarray:
    """Ranks for evaluation: database indices best first, as a numpy int64 array.

    With ``k=None`` every database item is ranked (full sort of ``Q @ X.T``, done for
    blocks of queries so memory stays bounded; equal scores keep database order). With an
    integer ``k`` this is :func:`knn`'s ``idx``. Taught in ``notebooks/00_pipeline.ipynb``.

    Args:
        Q: (n_q, D) queries. X: (n_db, D) database.
        k: keep the top ``k`` (``None``: all ``n_db``).
        chunk_size, backend, kwargs: passed to :func:`knn`.

    Returns:
        (n_q, k or n_db) int64 numpy array.

    Raises:
        ValueError: as :func:`knn` (empty, non-finite or mismatched descriptors, bad ``k``).
    """
    Qt, Xt = descriptor_pair(Q, X, "rank_database")
    n_q, n_db = Qt.shape[0], Xt.shape[0]
    if k is None and backend == "torch":
        out = np.empty((n_q, n_db), dtype=np.int64)
        q_chunk = max(1, _BLOCK_ELEMS // (2 * max(n_db, 1)))
        for a in range(0, n_q, q_chunk):
            S = Qt[a:a + q_chunk] @ Xt.T  # (q, n_db)
            out[a:a + q_chunk] = torch.sort(S, dim=1, descending=True, stable=True).indices.cpu().numpy()
        return out
    k = n_db if k is None else k
    _, idx = knn_checked(Qt, Xt, k, chunk_size=chunk_size, backend=backend, fn="rank_database", **kwargs)
    return idx.cpu().numpy().astype(np.int64, copy=False)
