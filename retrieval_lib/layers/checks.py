"""Input checks shared by every public entry point of the library.

One place for the questions each entry point asks of its arguments, so that every
function answers bad input with the same kind of message: what was wrong, and what to do.

* :func:`from_numpy` / :func:`as_tensor` -- numpy or torch in, a tensor out (zero-copy).
* :func:`check_int` -- an integer at least ``minimum`` (``True`` is not an integer here).
* :func:`check_descriptors` / :func:`as_descriptors` -- a non-empty, finite, floating point
  ``(N, D)`` matrix of descriptors, one per row.
* :func:`check_not_empty` -- a collection with at least one item.
* :func:`check_fmap`, :func:`check_eps`, :func:`check_p` -- a ``(B, C, H, W)`` feature map,
  a positive ``eps``, a GeM exponent (the pooling functions and modules).

Messages start with the name of the public function (``fn``) and name the argument.
This module is a leaf: it imports nothing from the library.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Union

import numpy as np
import torch

__all__ = ["from_numpy", "as_tensor", "check_int", "check_descriptors", "as_descriptors", "check_not_empty",
           "check_fmap", "check_eps", "check_p"]

ArrayLike = Union[torch.Tensor, np.ndarray]


def _prefix(fn: str | None) -> str:
    return f"{fn}: " if fn else ""


def from_numpy(a: np.ndarray) -> torch.Tensor:
    """Zero-copy tensor view of an array (made contiguous first if it is not).

    Read-only arrays (e.g. ``np.load(..., mmap_mode="r")``) are fine without a warning:
    the library never writes into its inputs.
    """
    a = np.ascontiguousarray(a)
    if a.flags.writeable:
        return torch.from_numpy(a)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writ.*")
        return torch.from_numpy(a)


def as_tensor(A: Any, name: str, fn: str | None = None) -> torch.Tensor:
    """``A`` as a tensor: a tensor is returned as is, a numpy array viewed without a copy.

    Raises ``TypeError`` for anything else (lists included: the caller should say which
    layout it means, e.g. ``torch.tensor(rows)``).
    """
    if isinstance(A, np.ndarray):
        return from_numpy(A)
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"{_prefix(fn)}{name} must be a torch.Tensor or numpy array, got "
                        f"{type(A).__name__}; convert it with torch.as_tensor({name})")
    return A


def check_int(value: Any, name: str, fn: str, minimum: int = 1, maximum: int | None = None) -> int:
    """``int(value)`` when it is an integer ``>= minimum`` (and ``<= maximum``), else ``ValueError``.

    Python and numpy integers count; ``True``/``False`` and floats such as ``2.0`` do not.
    """
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum
            or (maximum is not None and value > maximum)):
        upper = "" if maximum is None else f" and <= {maximum}"
        raise ValueError(f"{fn}: {name} must be an integer >= {minimum}{upper}, got {value!r}")
    return int(value)


def check_not_empty(n: int, name: str, fn: str, what: str = "item") -> None:
    """Raise ``ValueError`` when a collection named ``name`` holds ``n == 0`` items."""
    if n == 0:
        raise ValueError(f"{fn}: {name} is empty (0 {what}s); pass at least one {what}")


def _bad_rows(X: torch.Tensor) -> str:
    rows = (~torch.isfinite(X)).any(dim=1).nonzero().flatten().tolist()
    shown = ", ".join(str(r) for r in rows[:5]) + (", ..." if len(rows) > 5 else "")
    return f"{len(rows)} row(s) hold NaN or inf (rows {shown})"


def check_descriptors(X: torch.Tensor, name: str, fn: str, min_rows: int = 1,
                      finite: bool = True) -> None:
    """Check a descriptor matrix: 2-D ``(N, D)``, ``N >= min_rows``, ``D >= 1``, floating point, finite.

    ``min_rows`` above 1 is for functions that estimate statistics (a covariance needs 2).
    ``finite=False`` skips the scan for NaN/inf (for a caller that has just checked it).
    """
    if X.ndim != 2:
        raise ValueError(f"{fn}: {name} must be 2-D (N, D) with one descriptor per row, got shape "
                         f"{tuple(X.shape)}; for a single descriptor use {name}[None]")
    if X.shape[0] < min_rows:
        need = "at least one descriptor" if min_rows == 1 else f"at least {min_rows} rows"
        raise ValueError(f"{fn}: {name} has {X.shape[0]} descriptor(s) (shape {tuple(X.shape)}); "
                         f"pass {need}")
    if X.shape[1] == 0:
        raise ValueError(f"{fn}: {name} has descriptors of dimension 0 (shape {tuple(X.shape)}); "
                         "pass descriptors with at least one dimension")
    if not X.is_floating_point():
        raise TypeError(f"{fn}: {name} must hold floating point descriptors, got dtype {X.dtype}; "
                        f"convert with {name}.float()")
    if finite and X.device.type != "meta" and not bool(torch.isfinite(X).all()):
        raise ValueError(
            f"{fn}: {name} contains NaN or inf values: {_bad_rows(X)}; recompute or drop those "
            "descriptors (NaN often comes from GeM with a large p overflowing float32: pool "
            "in float64, e.g. GeM(p, dtype=torch.float64))"
        )


def as_descriptors(A: Any, name: str, fn: str, min_rows: int = 1, finite: bool = True) -> torch.Tensor:
    """:func:`as_tensor` then :func:`check_descriptors`; returns the tensor."""
    X = as_tensor(A, name, fn)
    check_descriptors(X, name, fn, min_rows=min_rows, finite=finite)
    return X


def check_fmap(x: Any, fn: str, channels: int | None = None, channels_arg: str = "in_channels") -> None:
    """Raise a clear error unless ``x`` is a floating point ``(B, C, H, W)`` tensor.

    With ``channels``: also unless ``C == channels``, for a layer built for that many channels
    (the message says to build it with ``<channels_arg>=C``).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"{fn}: expected a torch.Tensor feature map of shape (B, C, H, W), "
            f"got {type(x).__name__}"
        )
    if x.dim() != 4:
        raise ValueError(
            f"{fn}: expected a 4-D feature map (B, C, H, W), got shape {tuple(x.shape)}; "
            "add a batch dimension with x.unsqueeze(0) for a single image"
        )
    if x.shape[-2] < 1 or x.shape[-1] < 1:
        raise ValueError(
            f"{fn}: the feature map has an empty spatial size {tuple(x.shape)}; "
            "H and W must both be at least 1 (is the input image too small for the backbone?)"
        )
    if not x.is_floating_point():
        raise TypeError(
            f"{fn}: expected a floating-point feature map, got dtype {x.dtype}; "
            "convert it with x.float()"
        )
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{fn}: built for {channels} channels but the feature map has {x.shape[1]} "
                         f"(shape {tuple(x.shape)}); build it with {channels_arg}={x.shape[1]}")


def check_eps(eps: Any, fn: str) -> None:
    """Raise ``ValueError`` unless ``eps`` is a positive finite number."""
    if isinstance(eps, bool) or not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"{fn}: eps must be a small positive number such as 1e-6, got {eps!r}")


def check_p(p: Union[float, torch.Tensor], channels: int, fn: str) -> None:
    """Validate a GeM exponent: a positive finite float, or a tensor of shape (), (1,) or (C,)."""
    if isinstance(p, torch.Tensor):
        if p.dim() > 1 or (p.dim() == 1 and p.shape[0] not in (1, channels)):
            raise ValueError(
                f"{fn}: tensor p must have shape (1,) (one exponent shared by all channels) "
                f"or ({channels},) (one per channel), got shape {tuple(p.shape)}"
            )
        if not p.is_floating_point():
            raise TypeError(f"{fn}: tensor p must be floating point, got dtype {p.dtype}")
        if not bool(torch.all(torch.isfinite(p) & (p > 0))):
            raise ValueError(
                f"{fn}: every element of p must be a positive finite number, got "
                f"min {p.detach().min().item():.4g}; GeM needs p > 0 (p=1 is average "
                "pooling, large p approaches max pooling)"
            )
    else:
        if isinstance(p, bool) or not isinstance(p, (int, float)):
            raise TypeError(f"{fn}: p must be a float or a tensor, got {type(p).__name__}")
        if not (math.isfinite(p) and p > 0):
            raise ValueError(
                f"{fn}: p must be a positive finite number, got {p!r}; GeM needs p > 0 "
                "(p=1 is average pooling, large p approaches max pooling)"
            )
