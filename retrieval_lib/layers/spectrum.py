"""The covariance spectrum of descriptors: mean and eigen-decomposition, computed once.

PCA and ZCA whitening (:mod:`retrieval_lib.layers.whitening`) are both read off the
eigen-decomposition of the descriptors' covariance; :func:`covariance_spectrum` computes it
once (float64, eigenvalues descending, eigenvector signs fixed) so that a sweep over output
dimension, shrinkage and power costs one decomposition. The helpers here are also what
learned whitening uses for its own eigen-decomposition. Taught in ``notebooks/08_whitening.ipynb``.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch

from retrieval_lib.layers.checks import as_descriptors

__all__ = ["Spectrum", "covariance_spectrum", "canonical_sign", "one_cpu_thread", "sorted_eigh", "rank_tol"]

ArrayLike = Union[torch.Tensor, np.ndarray]


def canonical_sign(E: torch.Tensor) -> torch.Tensor:
    """Flip each column of ``E`` so that its largest-magnitude entry is positive.

    Eigenvectors are defined up to sign; fixing it makes results repeatable across
    LAPACK builds and devices.
    """
    idx = E.abs().argmax(dim=0, keepdim=True)  # (1, K)
    sign = torch.sign(torch.gather(E, 0, idx))
    sign[sign == 0] = 1
    return E * sign


@contextmanager
def one_cpu_thread(t: torch.Tensor):
    """Run LAPACK on one thread for CPU tensors (the thread count is restored afterwards).

    The symmetric eigensolver gains little from a second thread and stalls when other
    processes share the cores: on a loaded 2-core machine a 1280 x 1280 float64 ``eigh``
    took about 1 s on one thread and 7-24 s on two.
    """
    if t.device.type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def sorted_eigh(C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of a symmetric matrix, eigenvalues descending, columns sign-fixed."""
    with one_cpu_thread(C):
        lam, U = torch.linalg.eigh(C)  # ascending
    lam, U = lam.flip(0), U.flip(1)
    return lam, canonical_sign(U)


def rank_tol(lam: torch.Tensor, n: int) -> float:
    """Eigenvalues at or below this are zero up to round-off (same rule as numpy.matrix_rank)."""
    return float(lam.abs().max()) * max(n, lam.numel()) * torch.finfo(torch.float64).eps


@dataclass(repr=False)
class Spectrum:
    """Mean and eigen-decomposition of the covariance of ``n`` training descriptors (float64).

    Attributes:
        m: (D,) mean.
        eigvals: (D,) eigenvalues of ``C = (1/n) (X - m)^T (X - m)``, descending, clamped at 0.
        eigvecs: (D, D) eigenvectors as columns ``U`` (``C = U diag(eigvals) U^T``), signs fixed.
        n: number of training descriptors.
        dtype, device: those of the descriptors it was computed from (whitenings built from
            it are returned in them).

    Made by :func:`covariance_spectrum`; :func:`pca_whitening` and :func:`zca_whitening`
    accept it in place of the descriptors, so a sweep over ``dim``, ``shrinkage`` and
    ``power`` needs one eigen-decomposition. Taught in ``notebooks/08_whitening.ipynb``.
    """

    m: torch.Tensor
    eigvals: torch.Tensor
    eigvecs: torch.Tensor
    n: int
    dtype: torch.dtype = torch.float64
    device: torch.device = torch.device("cpu")

    @property
    def dim(self) -> int:
        """Descriptor dimension D."""
        return int(self.m.shape[0])

    @property
    def rank(self) -> int:
        """Number of eigenvalues above round-off (at most ``n - 1`` for a centred covariance)."""
        return int((self.eigvals > rank_tol(self.eigvals, self.n)).sum())

    def __repr__(self) -> str:
        return f"Spectrum(n={self.n}, D={self.dim}, rank={self.rank})"


def covariance_spectrum(X: ArrayLike) -> Spectrum:
    """Mean and descending eigen-decomposition of the covariance of descriptors ``X`` (N, D).

    ``C = (1/N) (X - m)^T (X - m) = U diag(lam) U^T``, computed in float64. Pass the result
    to :func:`pca_whitening` / :func:`zca_whitening` to try many settings for the price of
    one decomposition. Raises ``ValueError`` for ``X`` not 2-D, with fewer than 2 rows, or
    holding NaN/inf. Taught in ``notebooks/08_whitening.ipynb``.
    """
    Xt = as_descriptors(X, "X", "covariance_spectrum", min_rows=2)
    X64 = Xt.to(torch.float64)
    m = X64.mean(dim=0)  # (D,)
    Xc = X64 - m  # (N, D)
    C = Xc.T @ Xc / Xc.shape[0]  # (D, D) population covariance
    lam, U = sorted_eigh(C)
    return Spectrum(m=m, eigvals=lam.clamp_min(0), eigvecs=U, n=int(Xt.shape[0]), dtype=Xt.dtype,
                    device=Xt.device)
