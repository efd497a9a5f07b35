"""Pooling layers: thin ``nn.Module`` wrappers around :mod:`retrieval_lib.layers.functional`.

Every module maps a feature map ``(B, C, H, W)`` to a descriptor ``(B, C)``.
Convention: modules return the pooled descriptor WITHOUT L2 normalisation (normalise
with :func:`retrieval_lib.layers.functional.l2n`), except :class:`RMAC`, whose output is
L2-normalised by definition (a normalised sum of normalised regional vectors).

``POOLING`` maps names to classes and :func:`make_pooling` builds one by name, so a
notebook parameter such as ``POOLING_NAME = "gem"`` picks the layer.

Every module declares ``multiscale_p``, the exponent with which its descriptors of several
input scales are averaged (:func:`retrieval_lib.layers.functional.multiscale_mean`): GeM's
and WGeM's own p, 1 for the others. A pooling of your own can declare it too; without it
the extraction uses 1. GeM and WGeM take ``dtype`` to compute the power mean in another
precision (``torch.float64`` keeps ``x^p`` finite for large p) and return the input's dtype.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from retrieval_lib.layers import checks, functional

__all__ = ["MAC", "SPoC", "GeM", "RMAC", "WGeM", "POOLING", "make_pooling", "MASK_INPUTS"]

#: what WGeM's mask convolution may see: the raw map, or each cell L2-normalised
MASK_INPUTS = ("raw", "l2")


def _check_p_init(p: float, p_min: float, cls: str) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not (math.isfinite(p) and p > 0):
        raise ValueError(f"{cls}: the initial p must be a positive finite number, got {p!r}")
    if not (isinstance(p_min, (int, float)) and math.isfinite(p_min) and p_min > 0):
        raise ValueError(f"{cls}: p_min must be a positive number, got {p_min!r}")
    if p < p_min:
        raise ValueError(
            f"{cls}: the initial p={p} is below p_min={p_min}; the forward pass clamps p to "
            f"at least p_min, so lower p_min (e.g. p_min={p}) or raise p"
        )


def _clamp_p(p: torch.Tensor, p_min: float) -> torch.Tensor:
    """``max(p, p_min)``, with the gradient passing where ``p >= p_min`` (``clamp`` blocks it
    at ``p == p_min``, which would freeze a layer that starts at ``p = p_min``)."""
    return torch.where(p < p_min, torch.full_like(p, p_min), p)


def _register_p(module: nn.Module, init: torch.Tensor, learn_p: bool) -> None:
    """``module.p``: a learnable ``nn.Parameter`` or, when fixed, a buffer (moves with ``.to``)."""
    if learn_p:
        module.p = nn.Parameter(init)
    else:
        module.register_buffer("p", init)


def _check_dtype(dtype, cls: str):
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"{cls}: dtype must be None (compute in the input's dtype) or a floating "
                         f"point torch.dtype such as torch.float64, got {dtype!r}")
    return dtype


def _shared_or_per_channel(p: torch.Tensor):
    """A p tensor as the multi-scale exponent: a float when shared, a ``(C,)`` tensor per channel."""
    p = p.detach()
    return float(p.reshape(-1)[0]) if p.numel() == 1 else p.clone()


def _p_repr(p: torch.Tensor) -> str:
    p = p.detach()
    if p.numel() == 1:
        return f"p={p.item():.4f}"
    return f"p=per-channel({p.numel()}, mean={p.mean().item():.4f})"


class MAC(nn.Module):
    """MAC pooling layer, ``(B, C, H, W) -> (B, C)``, not normalised; see :func:`functional.mac`.

    Taught in ``notebooks/01_mac.ipynb``.
    """

    #: exponent of the mean over input scales (:func:`functional.multiscale_mean`)
    multiscale_p = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.mac(x)


class SPoC(nn.Module):
    """SPoC pooling layer, ``(B, C, H, W) -> (B, C)``, not normalised; see :func:`functional.spoc`.

    ``center_prior=True`` uses the Gaussian centre weighting of Babenko & Lempitsky
    (ICCV 2015). Taught in ``notebooks/02_spoc.ipynb``.
    """

    #: exponent of the mean over input scales (:func:`functional.multiscale_mean`)
    multiscale_p = 1.0

    def __init__(self, center_prior: bool = False):
        super().__init__()
        self.center_prior = bool(center_prior)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.spoc(x, center_prior=self.center_prior)

    def extra_repr(self) -> str:
        return f"center_prior={self.center_prior}"


class GeM(nn.Module):
    """GeM pooling layer with a fixed or learnable exponent; see :func:`functional.gem`.

    ``(B, C, H, W) -> (B, C)``, not normalised.

    * ``learn_p=True`` makes ``p`` an ``nn.Parameter`` (as in Radenović et al., TPAMI 2018,
      where it is learned with the network); ``learn_p=False`` keeps it as a buffer.
    * ``per_channel=True`` learns one exponent per channel (``in_channels`` required), else one
      exponent is shared: ``self.p`` has shape ``(in_channels,)`` or ``(1,)``.
    * Positivity: the forward pass uses ``max(p, p_min)`` (default ``p_min=1``, the
      average-pooling end of GeM). The stored parameter is not changed; while it sits
      strictly below ``p_min`` it acts as ``p_min`` and gets no gradient from the pooling
      (at ``p == p_min`` the gradient passes, so a layer started at ``p_min`` can learn).
    * ``dtype``: keep ``p`` and compute the power mean in this dtype, then cast the result
      back to the input's. ``torch.float64`` is for large p: float32 ``x^p`` overflows past
      ~3e38 (``x = 6``, the ReLU6 ceiling of EfficientNet-Lite, at ``p > 49``), float64
      holds ``6^p`` up to ``p ~ 396``. ``None``: compute in the input's dtype.
    * ``multiscale_p``: the current ``max(p, p_min)``, a float (a ``(C,)`` tensor per
      channel): descriptors of several scales are averaged with GeM's own exponent.

    ``extra_repr`` reads e.g. ``p=3.0000, eps=1e-06, learnable``.
    Taught in ``notebooks/03_gem.ipynb``.
    """

    def __init__(
        self,
        p: float = 3.0,
        eps: float = 1e-6,
        learn_p: bool = True,
        per_channel: bool = False,
        in_channels: int | None = None,
        p_min: float = 1.0,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        _check_p_init(p, p_min, "GeM")
        checks.check_eps(eps, "GeM")
        dtype = _check_dtype(dtype, "GeM")
        if per_channel:
            if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
                raise ValueError(
                    "GeM: per_channel=True needs the number of channels, e.g. "
                    f"GeM(per_channel=True, in_channels=1280); got in_channels={in_channels!r}"
                )
            init = torch.full((in_channels,), float(p), dtype=dtype)
        else:
            init = torch.full((1,), float(p), dtype=dtype)
        _register_p(self, init, learn_p)
        self.eps = eps
        self.p_min = float(p_min)
        self.learn_p = bool(learn_p)
        self.per_channel = bool(per_channel)
        self.dtype = dtype

    @property
    def multiscale_p(self):
        """Exponent of the mean over input scales: GeM's own p (see :func:`functional.multiscale_mean`)."""
        return _shared_or_per_channel(_clamp_p(self.p, self.p_min))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        checks.check_fmap(x, "GeM")
        if self.per_channel and x.shape[1] != self.p.shape[0]:
            raise ValueError(
                f"GeM: this layer has {self.p.shape[0]} per-channel exponents but the feature "
                f"map has {x.shape[1]} channels (shape {tuple(x.shape)}); build it with "
                f"in_channels={x.shape[1]}"
            )
        xc = x if self.dtype is None else x.to(self.dtype)
        out = functional.power_mean(xc, _clamp_p(self.p, self.p_min), self.eps)  # (B, C)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        mode = "learnable" if self.learn_p else "fixed"
        dtype = "" if self.dtype is None else f", dtype={self.dtype}"
        return f"{_p_repr(self.p)}, eps={self.eps:.0e}, {mode}{dtype}"


class RMAC(nn.Module):
    """R-MAC pooling layer, ``(B, C, H, W) -> (B, C)``, L2-normalised; see :func:`functional.rmac`.

    ``L`` scale levels of regions from :func:`functional.rmac_regions`;
    ``include_global=True`` adds the whole-map MAC as in cirtorch.
    Taught in ``notebooks/04_rmac.ipynb``.
    """

    #: exponent of the mean over input scales (:func:`functional.multiscale_mean`)
    multiscale_p = 1.0

    def __init__(self, L: int = 3, include_global: bool = True, eps: float = 1e-6):
        super().__init__()
        self.L = checks.check_int(L, "L", "RMAC")
        checks.check_eps(eps, "RMAC")
        self.include_global = bool(include_global)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.rmac(x, L=self.L, eps=self.eps, include_global=self.include_global)

    def extra_repr(self) -> str:
        return f"L={self.L}, include_global={self.include_global}, eps={self.eps:.0e}"


class WGeM(nn.Module):
    """Weighted GeM with a learned spatial attention mask; see :func:`functional.wgem`.

    ``(B, C, H, W) -> (B, C)``, not normalised. The weights are a spatial softmax over
    ``H x W`` of a 3x3 convolution ``C -> 1`` (padding 1) of the feature map:
    ``w = softmax_{H x W}(conv3x3(x))``, shape ``(B, 1, H, W)``, summing to 1 per image;
    :meth:`attention` returns them so notebooks can draw the masks. The convolution
    starts at zero, so an untrained layer gives uniform weights and equals :class:`GeM`.
    ``p`` is shared by all channels, learnable when ``learn_p`` and clamped to at least
    ``p_min`` in the forward pass, as in :class:`GeM`; ``dtype`` and ``multiscale_p`` (the
    current p) as in :class:`GeM`.

    ``mask_input`` is what the convolution sees: ``"raw"`` (default, the paper's) the map
    itself, ``"l2"`` each cell's ``C``-vector L2-normalised, ``x_i / (||x_i|| + eps)``. A raw
    3x3 window of a backbone's activations sums to hundreds, so one Adam step of an ordinary
    learning rate moves the logits by far more than 1 and only a tiny rate keeps the mask
    usable; normalised cells bound that move by the rate times ``9 sqrt(C)`` and make the
    logit depend on what a cell shows, not how strongly it fires. The pooled values still
    come from the raw map; untrained, either input gives the uniform mask (GeM).

    Source: Wu et al., ICIP 2018 (weighted generalized mean pooling, Eq. 2).
    Taught in ``notebooks/05_wgem.ipynb``.
    """

    def __init__(
        self,
        in_channels: int,
        p: float = 3.0,
        eps: float = 1e-6,
        learn_p: bool = True,
        p_min: float = 1.0,
        dtype: torch.dtype | None = None,
        mask_input: str = "raw",
    ):
        super().__init__()
        if mask_input not in MASK_INPUTS:
            raise ValueError(f"WGeM: mask_input must be one of {', '.join(repr(m) for m in MASK_INPUTS)} (what the "
                             f"mask's convolution sees), got {mask_input!r}")
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(
                "WGeM: in_channels must be the number of feature-map channels (a positive "
                f"integer, e.g. 1280 for EfficientNet-Lite0), got {in_channels!r}"
            )
        _check_p_init(p, p_min, "WGeM")
        checks.check_eps(eps, "WGeM")
        dtype = _check_dtype(dtype, "WGeM")
        self.in_channels = in_channels
        self.conv = nn.Conv2d(in_channels, 1, kernel_size=3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        init = torch.full((1,), float(p), dtype=dtype)
        _register_p(self, init, learn_p)
        self.eps = eps
        self.p_min = float(p_min)
        self.learn_p = bool(learn_p)
        self.dtype = dtype
        self.mask_input = mask_input

    @property
    def multiscale_p(self) -> float:
        """Exponent of the mean over input scales: WGeM's own p, as for :class:`GeM`."""
        return _shared_or_per_channel(_clamp_p(self.p, self.p_min))

    def _check(self, x: torch.Tensor) -> None:
        checks.check_fmap(x, "WGeM", self.in_channels)

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        if self.mask_input == "l2":  # each cell's C-vector to unit length: (B, C, H, W)
            x = x / (torch.linalg.vector_norm(x, ord=2, dim=1, keepdim=True) + self.eps)
        logits = self.conv(x)  # (B, 1, H, W)
        return torch.softmax(logits.flatten(2), dim=-1).view_as(logits)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The spatial weights ``(B, 1, H, W)``, non-negative, summing to 1 over ``H x W``."""
        self._check(x)
        return self._attention(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        p = _clamp_p(self.p, self.p_min)
        weights = self._attention(x)  # (B, 1, H, W)
        xc = x if self.dtype is None else x.to(self.dtype)
        return functional.power_mean(xc, p, self.eps, weights).to(x.dtype)  # (B, C)

    def extra_repr(self) -> str:
        mode = "learnable" if self.learn_p else "fixed"
        dtype = "" if self.dtype is None else f", dtype={self.dtype}"
        mask = "" if self.mask_input == "raw" else f", mask_input={self.mask_input}"
        return f"in_channels={self.in_channels}, {_p_repr(self.p)}, eps={self.eps:.0e}, {mode}{dtype}{mask}"


POOLING = {"mac": MAC, "spoc": SPoC, "gem": GeM, "rmac": RMAC, "wgem": WGeM}


def make_pooling(name: str, **kwargs) -> nn.Module:
    """Build a pooling layer by name (case-insensitive): ``make_pooling("gem", p=3.0)``.

    Valid names are the keys of ``POOLING``: mac, spoc, gem, rmac, wgem. Keyword arguments go
    to the class (``WGeM`` needs ``in_channels``). Raises ``ValueError`` listing the valid
    names for an unknown one.
    """
    key = name.lower() if isinstance(name, str) else None
    if key not in POOLING:
        raise ValueError(
            f"unknown pooling {name!r}; valid names are {', '.join(sorted(POOLING))}"
        )
    return POOLING[key](**kwargs)
