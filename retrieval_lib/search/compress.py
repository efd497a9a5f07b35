"""Compressed descriptors: fewer bytes per image, and what the ranking loses.

A *codec* is learned on training descriptors and turns database descriptors ``(N, D)``
into codes and back:

* :class:`Float32Codec` -- the descriptors as they are, ``4 D`` bytes (the reference);
* :class:`Float16Codec` -- half precision, ``2 D`` bytes;
* :class:`PCACodec` -- the mean removed and projected on the ``dim`` leading principal
  directions (no whitening: :func:`~retrieval_lib.layers.whitening.pca_whitening` with
  ``power=0``), ``4 dim`` bytes (``2 dim`` with ``half=True``);
* :class:`PQCodec` -- product quantisation (Jegou, Douze & Schmid, "Product quantization
  for nearest neighbor search", TPAMI 2011): the vector is cut into ``m`` sub-vectors of
  ``D / m`` dims, each replaced by the index of its nearest of ``2**nbits`` centroids
  learned by k-means on that sub-space, ``m nbits / 8`` bytes. The k-means runs in faiss
  (the optional ``[faiss]`` extra); encoding, decoding and search on the codes are plain
  torch, checked against faiss and a loop in the tests.

Gordo et al. ("End-to-end learning of deep visual representations for image retrieval",
IJCV 2017) found product quantisation the best way to compress their R-MAC descriptors.

Search is *asymmetric* (ADC): the query stays uncompressed (for PCA it is projected the
same way) and is compared with the decoded database codes; :meth:`PQCodec.scores` does it
on the codes with one lookup table per query. :func:`compressed_pair` gives both sides,
L2-normalised, ready for ``rank_database``. Every codec has ``fit``, ``encode``,
``decode``, ``query`` and ``bytes_per_image``. Taught in ``notebooks/08_whitening.ipynb``.
"""
from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch

from retrieval_lib.layers.checks import as_descriptors, check_int
from retrieval_lib.layers.functional import l2n
from retrieval_lib.layers.whitening import pca_whitening

__all__ = ["Float32Codec", "Float16Codec", "PCACodec", "PQCodec", "compressed_pair", "faiss_available"]

ArrayLike = Union[torch.Tensor, np.ndarray]


def faiss_available() -> bool:
    """Whether faiss can be imported (it is needed only to train :class:`PQCodec`)."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _faiss():
    try:
        import faiss
    except ImportError as err:
        raise ImportError(
            "PQCodec trains its sub-space k-means with faiss, which is not installed: "
            "`pip install faiss-cpu` (the library's [faiss] extra). Float16Codec and PCACodec "
            "need nothing else") from err
    return faiss


def _float(X: ArrayLike, fn: str) -> torch.Tensor:
    """Descriptors as a float32 tensor (N, D) on their device."""
    return as_descriptors(X, "X", fn).to(torch.float32)


class _Codec:
    """What every codec shares: ``query`` is the identity, ``dim_in`` is checked."""

    name = "codec"
    dim_in: Optional[int] = None

    def fit(self, X: ArrayLike) -> "_Codec":
        """Learn from training descriptors (N, D); returns ``self``."""
        self.dim_in = int(_float(X, f"{type(self).__name__}.fit").shape[1])
        return self

    def _checked(self, X: ArrayLike, what: str) -> torch.Tensor:
        fn = f"{type(self).__name__}.{what}"
        if self.dim_in is None:
            raise RuntimeError(f"{fn}: the codec is not trained; call fit(X_train) first")
        Xt = _float(X, fn)
        if Xt.shape[1] != self.dim_in:
            raise ValueError(f"{fn}: X has {Xt.shape[1]} dims but the codec was fitted on "
                             f"{self.dim_in}; use descriptors of the same model")
        return Xt

    def query(self, Q: ArrayLike) -> torch.Tensor:
        """The queries in the space the decoded codes live in (N_q, D'): here unchanged."""
        return self._checked(Q, "query")

    @property
    def bytes_per_image(self) -> float:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, {self.bytes_per_image:g} bytes per image)"


class Float32Codec(_Codec):
    """No compression: the float32 descriptors, ``4 D`` bytes per image (the reference)."""

    name = "float32"

    def encode(self, X: ArrayLike) -> torch.Tensor:
        return self._checked(X, "encode").clone()

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.to(torch.float32)

    @property
    def bytes_per_image(self) -> float:
        return 4.0 * self.dim_in


class Float16Codec(_Codec):
    """Half precision: each float rounded to the nearest float16, ``2 D`` bytes per image.

    Relative rounding error at most ``2**-11`` per entry (for values in float16's normal range).
    """

    name = "float16"

    def encode(self, X: ArrayLike) -> torch.Tensor:
        return self._checked(X, "encode").to(torch.float16)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.to(torch.float32)

    @property
    def bytes_per_image(self) -> float:
        return 2.0 * self.dim_in


class PCACodec(_Codec):
    """PCA to ``dim`` dimensions without whitening: ``code = U[:, :dim]^T (x - m)``.

    ``U``, ``m`` are learned by :meth:`fit` on training descriptors (PCA with ``power=0``
    in :func:`~retrieval_lib.layers.whitening.pca_whitening`); ``dim`` may exceed neither
    ``D`` nor, for a meaningful projection, the number of training descriptors minus one.
    ``half=True`` stores the ``dim`` numbers in float16. Bytes per image ``4 dim`` (``2 dim``).
    The decoded codes and :meth:`query` live in the ``dim``-dimensional space.
    """

    def __init__(self, dim: int, half: bool = False):
        self.dim = check_int(dim, "dim", "PCACodec")
        self.half = bool(half)
        self.name = f"pca{self.dim}" + ("_fp16" if half else "")
        self.whitening = None

    def fit(self, X: ArrayLike) -> "PCACodec":
        Xt = _float(X, "PCACodec.fit")
        if self.dim > Xt.shape[1]:
            raise ValueError(f"PCACodec: dim={self.dim} exceeds the descriptors' {Xt.shape[1]} dims")
        self.whitening = pca_whitening(Xt, dim=self.dim, power=0.0)
        self.dim_in = int(Xt.shape[1])
        return self

    def query(self, Q: ArrayLike) -> torch.Tensor:
        Qt = self._checked(Q, "query")
        W = self.whitening
        return (Qt - W.m.to(Qt)) @ W.P.to(Qt).T  # (N, D) -> (N, dim)

    def encode(self, X: ArrayLike) -> torch.Tensor:
        Y = self.query(X)
        return Y.to(torch.float16) if self.half else Y

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.to(torch.float32)

    @property
    def bytes_per_image(self) -> float:
        return (2.0 if self.half else 4.0) * self.dim


class PQCodec(_Codec):
    """Product quantisation with ``m`` sub-quantisers of ``2**nbits`` centroids each.

    ``x = [x_1 .. x_m]`` (sub-vectors of ``D / m`` dims); ``code_j = argmin_k ||x_j - c_jk||^2``;
    the decoded vector is ``[c_{1,code_1} .. c_{m,code_m}]``. Bytes per image ``m nbits / 8``
    (codes packed; here they are held as int64 ``(N, m)`` for clarity). The centroids
    ``(m, 2**nbits, D / m)`` are learned with faiss's ``ProductQuantizer`` (k-means per
    sub-space, seeded by ``seed``); everything else is torch.

    Raises (in :meth:`fit`): ``ValueError`` when ``D`` is not a multiple of ``m`` or there
    are fewer training descriptors than ``2**nbits`` centroids (lower ``nbits``);
    ``ImportError`` naming the package when faiss is absent.
    """

    def __init__(self, m: int, nbits: int = 8, seed: int = 0):
        self.m, self.nbits = check_int(m, "m", "PQCodec"), check_int(nbits, "nbits", "PQCodec", maximum=16)
        self.seed = int(seed)
        self.name = f"pq{self.m}x{self.nbits}"
        self.centroids: Optional[torch.Tensor] = None

    @property
    def ksub(self) -> int:
        """Centroids per sub-space, ``2**nbits``."""
        return 1 << self.nbits

    def fit(self, X: ArrayLike) -> "PQCodec":
        Xt = _float(X, "PQCodec.fit")
        n, d = Xt.shape
        if d % self.m:
            raise ValueError(f"PQCodec: D={d} is not a multiple of m={self.m}; choose m among the "
                             f"divisors of {d}")
        if n < self.ksub:
            raise ValueError(f"PQCodec: {n} training descriptors cannot place 2**nbits = {self.ksub} "
                             f"centroids per sub-space; lower nbits to at most {int(np.log2(n))} or "
                             "train on more descriptors")
        faiss = _faiss()
        pq = faiss.ProductQuantizer(d, self.m, self.nbits)
        pq.cp.seed = self.seed
        pq.cp.min_points_per_centroid = 1  # faiss only warns below it; few points per centroid is the caller's choice
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)  # small k-means: OpenMP threads only stall when other processes share the cores
        try:
            pq.train(np.ascontiguousarray(Xt.detach().cpu().numpy()))
        finally:
            faiss.omp_set_num_threads(threads)
        cents = faiss.vector_to_array(pq.centroids).reshape(self.m, self.ksub, d // self.m)
        self.centroids = torch.from_numpy(cents.copy()).to(Xt.device)  # (m, ksub, dsub)
        self.dim_in = d
        return self

    def _split(self, X: torch.Tensor) -> torch.Tensor:
        return X.reshape(X.shape[0], self.m, -1)  # (N, D) -> (N, m, dsub)

    def encode(self, X: ArrayLike) -> torch.Tensor:
        """(N, D) -> (N, m) int64 codes: the nearest centroid of each sub-vector."""
        Xs = self._split(self._checked(X, "encode"))  # (N, m, dsub)
        C = self.centroids.to(Xs.device)  # (m, ksub, dsub)
        d2 = (Xs.square().sum(-1, keepdim=True)  # (N, m, 1)
              - 2 * torch.einsum("nmd,mkd->nmk", Xs, C)  # (N, m, ksub)
              + C.square().sum(-1)[None])  # (1, m, ksub)
        return d2.argmin(dim=-1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(N, m) codes -> (N, D) reconstructions (the chosen centroids, concatenated)."""
        if self.centroids is None:
            raise RuntimeError("PQCodec.decode: the codec is not trained; call fit(X_train) first")
        codes = torch.as_tensor(codes).long()
        if codes.dim() != 2 or codes.shape[1] != self.m:
            raise ValueError(f"PQCodec.decode: codes must have shape (N, {self.m}), got {tuple(codes.shape)}")
        C = self.centroids.to(codes.device)
        parts = C[torch.arange(self.m, device=codes.device)[None, :], codes]  # (N, m, dsub)
        return parts.reshape(codes.shape[0], -1)

    def scores(self, Q: ArrayLike, codes: torch.Tensor) -> torch.Tensor:
        """Asymmetric inner products ``Q @ decode(codes).T`` (N_q, N) computed on the codes.

        One lookup table per query, ``T[q, j, k] = Q_j . c_jk`` (m x 2**nbits numbers),
        then ``s[q, n] = sum_j T[q, j, code[n, j]]``: no database vector is decoded.
        """
        Qs = self._split(self._checked(Q, "scores"))  # (Nq, m, dsub)
        T = torch.einsum("qmd,mkd->qmk", Qs, self.centroids.to(Qs.device))  # (Nq, m, ksub)
        codes = torch.as_tensor(codes, device=Qs.device).long()  # (N, m)
        idx = torch.arange(self.m, device=Qs.device)
        return T[:, idx[None, :], codes].sum(dim=-1)  # (Nq, N, m) -> (Nq, N)

    @property
    def bytes_per_image(self) -> float:
        return self.m * self.nbits / 8.0


def compressed_pair(codec, X: ArrayLike, Q: Optional[ArrayLike] = None,
                    normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The database through the codec and the queries as the search sees them (ADC).

    Returns ``(Xc, Qc)``: ``Xc = decode(encode(X))`` (N, D') and ``Qc = query(Q)`` (N_q, D'),
    the queries uncompressed (``Q=None``: the database descriptors themselves, as when every
    image queries the others). Both L2-normalised with ``normalize`` (the usual re-normalisation
    after decompression), float32. ``codec`` must be fitted.
    """
    Xc = codec.decode(codec.encode(X))
    Qc = codec.query(X if Q is None else Q)
    if normalize:
        Xc, Qc = l2n(Xc), l2n(Qc)
    return Xc, Qc
