"""Descriptor whitening: PCA, ZCA and learned (Lw) whitening.

All three are an affine map followed by L2 normalisation,

    x_hat = l2n(P (x - m)),     m: (D,),  P: (D_out, D),

and differ only in how ``m`` and ``P`` are learned. PCA and ZCA whitening also take a
``power`` alpha: the eigenvalues are raised to ``-alpha`` (``alpha = 1/2`` whitens fully,
``alpha = 0`` only rotates and projects, values between whiten *partially*). Sweeping the
output dimension, shrinkage and power costs one eigen-decomposition: compute
:func:`covariance_spectrum` once and pass it instead of the descriptors. They are held by one small
:class:`Whitening` object that applies itself, truncates its output dimension, turns into
an ``nn.Linear`` and saves/loads through a plain ``state_dict``.

Taught in ``notebooks/08_whitening.ipynb``.

Numerics: statistics are computed in float64 whatever the input dtype; ``m`` and ``P`` are
returned in the input's dtype and on its device. A covariance with an eigenvalue that is
zero (up to round-off) cannot be whitened, because whitening divides by its square root.
That happens whenever there are fewer samples than dimensions (a centred covariance of
``N`` samples has rank at most ``N - 1``) or when descriptors are linearly dependent.
:func:`pca_whitening` and :func:`zca_whitening` then raise a ``ValueError`` unless
``shrinkage > 0`` (every eigenvalue gets ``+ shrinkage``) or, for PCA, ``dim`` keeps only
the non-zero eigen-directions. :func:`learned_whitening` instead regularises its Cholesky
factorisation as in the reference implementation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

from retrieval_lib.layers.checks import as_descriptors
from retrieval_lib.layers.functional import l2n
from retrieval_lib.layers.spectrum import Spectrum, covariance_spectrum, sorted_eigh

__all__ = ["Whitening", "Spectrum", "covariance_spectrum", "pca_whitening", "zca_whitening", "learned_whitening"]

ArrayLike = Union[torch.Tensor, np.ndarray]


@dataclass(repr=False)
class Whitening:
    """An affine whitening ``x_hat = l2n(P (x - m))`` followed by L2 normalisation.

    Attributes:
        m: (D,) mean subtracted first.
        P: (D_out, D) projection; rows are output dimensions ordered by decreasing
            importance, so ``P[:dim]`` is the ``dim``-dimensional whitening.
        kind: ``"pca"``, ``"zca"`` or ``"lw"`` (informative only).
        eigvals: optional (D_out,) eigenvalues behind the rows of ``P`` (descending), kept
            so notebooks can plot the spectrum.
        extra: small dict of settings used to learn it (e.g. ``{"shrinkage": 0.0}``).

    Taught in ``notebooks/08_whitening.ipynb``.
    """

    m: torch.Tensor
    P: torch.Tensor
    kind: str = "pca"
    eigvals: Optional[torch.Tensor] = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.m.ndim != 1 or self.P.ndim != 2 or self.P.shape[1] != self.m.shape[0]:
            raise ValueError(
                f"Whitening needs m of shape (D,) and P of shape (D_out, D); got m "
                f"{tuple(self.m.shape)} and P {tuple(self.P.shape)}"
            )

    @property
    def dim_in(self) -> int:
        """Input dimension D."""
        return int(self.P.shape[1])

    @property
    def dim_out(self) -> int:
        """Largest available output dimension D_out."""
        return int(self.P.shape[0])

    def _rows(self, dim: Optional[int]) -> torch.Tensor:
        if dim is None:
            return self.P
        if not 1 <= int(dim) <= self.dim_out:
            raise ValueError(
                f"dim={dim} is outside 1..{self.dim_out}, the output dimensions this "
                f"{self.kind} whitening was learned with"
            )
        return self.P[: int(dim)]

    def apply(self, X: ArrayLike, dim: Optional[int] = None) -> ArrayLike:
        """Whiten descriptors: ``l2n((X - m) @ P[:dim].T)``.

        Args:
            X: (N, D) descriptors (torch tensor or numpy array).
            dim: keep the first ``dim`` output dimensions (``None``: all ``D_out``).

        Returns:
            (N, dim) L2-normalised descriptors, same type, dtype and device as ``X``.

        Raises:
            ValueError: ``X`` empty, holding NaN/inf, or not of shape ``(N, D)``.
        """
        is_np = isinstance(X, np.ndarray)
        Xt = as_descriptors(X, "X", "Whitening.apply")
        if Xt.shape[1] != self.dim_in:
            raise ValueError(
                f"Whitening.apply: X must have shape (N, {self.dim_in}) to be whitened, got "
                f"{tuple(Xt.shape)}; use descriptors of the model this whitening was learned on"
            )
        P = self._rows(dim).to(device=Xt.device, dtype=Xt.dtype)
        m = self.m.to(device=Xt.device, dtype=Xt.dtype)
        out = l2n((Xt - m) @ P.T)  # (N, D) -> (N, dim)
        return out.numpy() if is_np else out

    __call__ = apply

    def to_linear(self, dim: Optional[int] = None) -> nn.Linear:
        """An ``nn.Linear(D, dim)`` computing ``P[:dim] (x - m)`` (no L2 normalisation).

        Weight ``P[:dim]``, bias ``-P[:dim] @ m``; put an ``l2n`` after it to match
        :meth:`apply`. Useful to append the whitening to a network for fine-tuning.
        """
        P = self._rows(dim)
        lin = nn.Linear(self.dim_in, P.shape[0], bias=True, device=P.device, dtype=P.dtype)
        with torch.no_grad():
            lin.weight.copy_(P)
            lin.bias.copy_(-(P @ self.m))
        return lin

    def to(self, *args: Any, **kwargs: Any) -> "Whitening":
        """A copy with ``m``, ``P`` and ``eigvals`` moved like ``torch.Tensor.to``."""
        return Whitening(
            m=self.m.to(*args, **kwargs),
            P=self.P.to(*args, **kwargs),
            kind=self.kind,
            eigvals=None if self.eigvals is None else self.eigvals.to(*args, **kwargs),
            extra=dict(self.extra),
        )

    def state_dict(self) -> dict:
        """Plain dict of tensors and strings; ``torch.save`` it, restore with :meth:`from_state_dict`."""
        sd = {"m": self.m, "P": self.P, "kind": self.kind, "extra": dict(self.extra)}
        if self.eigvals is not None:
            sd["eigvals"] = self.eigvals
        return sd

    @classmethod
    def from_state_dict(cls, state: dict) -> "Whitening":
        """Rebuild a :class:`Whitening` from :meth:`state_dict` output."""
        missing = {"m", "P"} - set(state)
        if missing:
            raise KeyError(
                f"whitening state is missing {sorted(missing)}; it must come from "
                "Whitening.state_dict()"
            )
        return cls(
            m=state["m"],
            P=state["P"],
            kind=state.get("kind", "pca"),
            eigvals=state.get("eigvals"),
            extra=dict(state.get("extra", {})),
        )

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v:g}" if isinstance(v, float) else f", {k}={v}"
                        for k, v in self.extra.items())
        return (
            f"Whitening(kind={self.kind!r}, dim_in={self.dim_in}, dim_out={self.dim_out}"
            f"{extra}, dtype={self.P.dtype}, device={self.P.device})"
        )


def _spectrum(X: Union[ArrayLike, Spectrum], fn: str) -> Spectrum:
    if isinstance(X, Spectrum):
        return X
    Xt = as_descriptors(X, "X", fn, min_rows=2)
    return covariance_spectrum(Xt)


def _check_settings(shrinkage: float, power: float) -> None:
    if not np.isfinite(shrinkage) or shrinkage < 0:
        raise ValueError(f"shrinkage must be >= 0 and finite, got {shrinkage}")
    if not np.isfinite(power) or power < 0:
        raise ValueError(f"power must be >= 0 and finite (1/2 whitens fully, 0 only projects), "
                         f"got {power}")


def _singular_error(N: int, D: int, rank: int, allow_dim: bool) -> ValueError:
    if N <= D:
        cure = "pass shrinkage>0 or dim<=N-1" if allow_dim else \
            "pass shrinkage>0 (or use pca_whitening with dim<=N-1)"
        return ValueError(
            f"N samples < D dims: {cure} (got N={N} samples for D={D} dims; their centred "
            f"covariance has rank {rank} <= N-1 = {N - 1}, so whitening would divide by ~0)"
        )
    cure = f"pass shrinkage>0 or dim<={rank}" if allow_dim else "pass shrinkage>0"
    return ValueError(
        f"the covariance of the {N}x{D} descriptors is singular (rank {rank} < {D}), so "
        f"whitening would divide by ~0: {cure}"
    )


def pca_whitening(X: Union[ArrayLike, Spectrum], dim: Optional[int] = None, shrinkage: float = 0.0,
                  power: float = 0.5) -> Whitening:
    """Learn PCA whitening (full or partial) from descriptors.

    With ``C = (1/N) (X - m)^T (X - m) = U diag(lam) U^T`` (eigenvalues descending),

        P = diag((lam_1..dim + shrinkage)^(-power)) U[:, :dim]^T,    shape (dim, D),

    so with ``power = 1/2`` and ``shrinkage == 0``, ``P (x - m)`` has identity covariance on
    the training data. ``power`` alpha between 0 and 1/2 is *partial* whitening: the
    directions of large variance are damped by ``lam^-alpha`` only, so they are not blown
    up as much as full whitening does to the small ones; ``power = 0`` is a plain PCA
    projection (rotation + truncation, no rescaling).
    PCA whitening of CNN descriptors: Jegou & Chum, "Negative evidences and co-occurrences
    in image retrieval", ECCV 2012; used on CNN descriptors by Babenko & Lempitsky, ICCV 2015.
    Taught in ``notebooks/08_whitening.ipynb``.

    Args:
        X: (N, D) training descriptors (tensor or numpy array), ideally L2-normalised and
            disjoint from the test database -- or their :func:`covariance_spectrum`.
        dim: output dimension (``None``: ``D``).
        shrinkage: added to every eigenvalue before the power; regularises small
            eigenvalues (same units as the covariance).
        power: the exponent alpha in ``lam^-alpha`` (default 1/2: full whitening).

    Returns:
        :class:`Whitening` with ``m`` (D,), ``P`` (dim, D) in ``X``'s dtype/device.

    Raises:
        ValueError: if a kept eigenvalue is zero (e.g. N samples < D dims), ``power > 0`` and
            ``shrinkage == 0``: pass ``shrinkage>0`` or ``dim<=N-1``.
        ValueError: ``shrinkage`` or ``power`` negative or not finite; ``dim`` outside 1..D.
        ValueError: ``X`` not 2-D, with fewer than 2 rows, or holding NaN/inf.
    """
    _check_settings(shrinkage, power)
    sp = _spectrum(X, "pca_whitening")
    N, D = sp.n, sp.dim
    dim = D if dim is None else int(dim)
    if not 1 <= dim <= D:
        raise ValueError(f"dim={dim} must be between 1 and D={D}")
    rank = sp.rank
    if shrinkage == 0 and power > 0 and dim > rank:
        raise _singular_error(N, D, rank, allow_dim=True)
    lam_k = sp.eigvals[:dim]
    P = (lam_k + shrinkage).pow(-power)[:, None] * sp.eigvecs[:, :dim].T  # (dim, D)
    dev, dtype = sp.device, sp.dtype
    return Whitening(m=sp.m.to(dev, dtype), P=P.to(dev, dtype), kind="pca",
                     eigvals=lam_k.to(dev, dtype), extra={"shrinkage": float(shrinkage), "power": float(power)})


def zca_whitening(X: Union[ArrayLike, Spectrum], shrinkage: float = 0.0, power: float = 0.5) -> Whitening:
    """Learn ZCA ("zero-phase") whitening from descriptors.

    With ``C = U diag(lam) U^T`` as in :func:`pca_whitening`,

        P = U diag((lam + shrinkage)^(-power)) U^T,    shape (D, D).

    It is PCA whitening rotated back to the input axes (``P_zca = U P_pca``), so at full
    dimension it gives the same similarities and rankings; it cannot reduce dimension.
    Of all whitening matrices it changes the data least (Kessy, Lewin & Strimmer, "Optimal
    whitening and decorrelation", The American Statistician 2018). Bell & Sejnowski, "The
    independent components of natural scenes are edge filters", Vision Research 1997.
    Taught in ``notebooks/08_whitening.ipynb``.

    Args:
        X: (N, D) training descriptors, or their :func:`covariance_spectrum`.
        shrinkage: added to every eigenvalue before the power.
        power: the exponent alpha in ``lam^-alpha`` (default 1/2: full whitening).

    Returns:
        :class:`Whitening` with ``m`` (D,), ``P`` (D, D) in ``X``'s dtype/device.

    Raises:
        ValueError: if the covariance is singular (e.g. N samples < D dims), ``power > 0``
            and ``shrinkage == 0``: pass ``shrinkage>0``.
        ValueError: ``shrinkage`` or ``power`` negative or not finite.
        ValueError: ``X`` not 2-D, with fewer than 2 rows, or holding NaN/inf.
    """
    _check_settings(shrinkage, power)
    sp = _spectrum(X, "zca_whitening")
    N, D = sp.n, sp.dim
    rank = sp.rank
    if shrinkage == 0 and power > 0 and rank < D:
        raise _singular_error(N, D, rank, allow_dim=False)
    U = sp.eigvecs
    P = (U * (sp.eigvals + shrinkage).pow(-power)) @ U.T  # (D, D)
    dev, dtype = sp.device, sp.dtype
    return Whitening(m=sp.m.to(dev, dtype), P=P.to(dev, dtype), kind="zca",
                     eigvals=sp.eigvals.to(dev, dtype), extra={"shrinkage": float(shrinkage), "power": float(power)})


def _regularised_cholesky(S: torch.Tensor, max_tries: int = 30) -> tuple[torch.Tensor, float]:
    """Cholesky factor of ``S``, adding ``alpha I`` (1e-10, 1e-9, ...) until it succeeds.

    A factorisation whose smallest pivot ``L_ii^2`` is zero up to round-off counts as failed
    too: for a singular ``S`` LAPACK may "succeed" with pivots of 1e-17 whose inverse is noise.
    """
    tol = float(S.diagonal().abs().max()) * S.shape[0] * torch.finfo(torch.float64).eps
    eye = torch.eye(S.shape[0], dtype=S.dtype, device=S.device)
    alpha = 0.0
    for _ in range(max_tries + 1):
        L, info = torch.linalg.cholesky_ex(S + alpha * eye if alpha else S)
        if int(info) == 0 and float(L.diagonal().square().min()) > tol:
            return L, alpha
        alpha = 1e-10 if alpha == 0 else alpha * 10
    raise ValueError(
        "the covariance of matching-pair differences could not be factorised even with "
        f"alpha={alpha / 10:g} added to its diagonal; check the descriptors and pairs"
    )


def learned_whitening(X: ArrayLike, qidx: ArrayLike, pidx: ArrayLike, shrinkage: float = 0.0) -> Whitening:
    """Learn Radenovic et al.'s learned whitening (Lw) from matching pairs.

    With query/positive index pairs ``(q_i, p_i)``, ``n`` pairs, and ``N`` descriptors:

        m   = mean_i X[q_i]                                       (D,)
        S   = (1/n) sum_i (X[q_i] - X[p_i])^T (X[q_i] - X[p_i])
              + shrinkage I                                        (D, D)
        P1  = L^-1,  where S (+ alpha I) = L L^T (Cholesky)       (D, D)
        C   = (1/N) sum_x (P1 (x - m)) (P1 (x - m))^T = E diag(lam) E^T, lam descending
        P   = E^T P1                                               (D, D)

    Stage one whitens the intra-class (matching-pair) variation: ``P S P^T = I``. Stage
    two rotates so that output dimensions are uncorrelated on the whole set and ordered
    by decreasing variance ``lam``, so ``P[:dim]`` is the dimensionality reduction. Note
    ``C`` is the second moment about the *query* mean ``m`` (as in the reference code).
    If the Cholesky factorisation fails (S singular up to round-off, e.g. fewer pairs than
    dims), ``alpha I`` is added with alpha = 1e-10, 1e-9, ... until it succeeds; the alpha used
    is stored in ``extra["cholesky_alpha"]``.

    Radenovic, Tolias & Chum, "CNN image retrieval learns from BoW: unsupervised
    fine-tuning with hard examples", ECCV 2016, Sec. 4; "Fine-tuning CNN image retrieval
    with no human annotation", TPAMI 2018. Taught in ``notebooks/08_whitening.ipynb``.

    Args:
        X: (N, D) descriptors of the training images.
        qidx: (n,) indices into ``X`` of the query of each matching pair.
        pidx: (n,) indices into ``X`` of the matching (positive) image of each pair.
        shrinkage: added to the diagonal of ``S`` before the factorisation (0: the
            reference method). With fewer pairs than dimensions ``S`` is singular and the
            directions in which no pair differs would otherwise be scaled by ~1/sqrt(alpha).

    Returns:
        :class:`Whitening` (kind ``"lw"``) with ``m`` (D,), ``P`` (D, D), ``eigvals`` ``lam``.

    Raises:
        ValueError: ``X`` not 2-D, with fewer than 2 rows, or holding NaN/inf; no pairs, or
            indices outside ``X``; ``shrinkage`` negative or not finite.
    """
    _check_settings(shrinkage, 0.5)
    Xt = as_descriptors(X, "X", "learned_whitening", min_rows=2)
    N, D = Xt.shape
    qi, pi = (torch.as_tensor(v if isinstance(v, torch.Tensor) else np.asarray(v))
              .reshape(-1).to(device=Xt.device, dtype=torch.long) for v in (qidx, pidx))
    if qi.numel() != pi.numel() or qi.numel() == 0:
        raise ValueError(
            f"qidx and pidx must be non-empty and of equal length (one pair each), got "
            f"{qi.numel()} and {pi.numel()}"
        )
    for name, idx in (("qidx", qi), ("pidx", pi)):
        if int(idx.min()) < 0 or int(idx.max()) >= N:
            raise ValueError(f"{name} has indices outside 0..{N - 1} (X has {N} rows)")
    X64 = Xt.to(torch.float64)
    m = X64[qi].mean(dim=0)  # (D,)
    diff = X64[qi] - X64[pi]  # (n, D)
    S = diff.T @ diff / diff.shape[0]  # (D, D)
    if shrinkage:
        S = S + shrinkage * torch.eye(D, dtype=torch.float64, device=Xt.device)
    L, alpha = _regularised_cholesky(S)
    eye = torch.eye(D, dtype=torch.float64, device=Xt.device)
    P1 = torch.linalg.solve_triangular(L, eye, upper=False)  # L^-1, (D, D)
    Y = (X64 - m) @ P1.T  # (N, D)
    C = Y.T @ Y / N
    lam, E = sorted_eigh(C)
    P = E.T @ P1
    dtype = Xt.dtype
    return Whitening(m=m.to(dtype), P=P.to(dtype), kind="lw", eigvals=lam.clamp_min(0).to(dtype),
                     extra={"cholesky_alpha": alpha, "n_pairs": int(qi.numel()),
                            "shrinkage": float(shrinkage)})
