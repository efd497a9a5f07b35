"""Closed-form derivatives of the learnable poolings, to check autograd against the papers' formulas.

* :func:`gem_grads` -- GeM's ``∂f/∂x`` and ``∂f/∂p`` (Radenović, Tolias & Chum, TPAMI 2018),
  taught in ``notebooks/03_gem.ipynb``;
* :func:`wgem_grads` -- wGeM's ``∂y/∂x`` (through the power mean), ``∂y/∂ω`` and ``∂y/∂p``
  (Wu et al., ICIP 2018), and :func:`wgem_backward`, which chains them through the softmax
  and the 3x3 convolution of a :class:`~retrieval_lib.layers.pooling.WGeM` layer, so ``∂L/∂x``
  has both paths; taught in ``notebooks/05_wgem.ipynb``.

The functions themselves are in :mod:`retrieval_lib.layers.functional`.
"""
from __future__ import annotations

import math
from typing import Union

import torch
import torch.nn.functional as F

from retrieval_lib.layers.checks import check_eps, check_fmap, check_p

__all__ = ["gem_grads", "wgem_grads", "wgem_backward"]


def gem_grads(x: torch.Tensor, p: Union[float, torch.Tensor], eps: float = 1e-6):
    """Closed-form derivatives of GeM ``f_k = (1/N sum_i x_ik^p_k)^(1/p_k)`` (``N = H W``).

    With ``x`` clamped to ``>= eps`` as in :func:`~retrieval_lib.layers.functional.gem` and ``M_k = 1/N sum_i x_ik^p``::

        d f_k / d x_ik = 1/N * f_k^(1 - p) * x_ik^(p - 1)      (0 where x_ik <= eps: the clamp)
        d f_k / d p_k  = f_k * ( -log(M_k) / p^2 + sum_i x_ik^p log x_ik / (p sum_i x_ik^p) )

    Shapes: ``x (B, C, H, W)``, ``p`` a float or a tensor ``(1,)``/``(C,)``; returns
    ``(dfdx (B, C, H, W), dfdp (B, C))`` where ``dfdp[b, k]`` is the derivative of
    ``f[b, k]`` w.r.t. its own exponent (for one shared ``p`` the gradient of a loss sums
    over ``b`` and ``k``). Use float64 to compare with autograd to ~1e-12.

    Source: GeM, Radenović, Tolias & Chum, TPAMI 2018 (they give both derivatives to
    make ``p`` learnable by back-propagation). Taught in ``notebooks/03_gem.ipynb``.
    """
    check_fmap(x, "gem_grads")
    check_eps(eps, "gem_grads")
    check_p(p, x.shape[1], "gem_grads")
    if isinstance(p, torch.Tensor):
        p = p.detach().to(dtype=x.dtype, device=x.device).reshape(-1)  # (1,) or (C,)
    else:
        p = torch.full((1,), float(p), dtype=x.dtype, device=x.device)
    N = x.shape[-2] * x.shape[-1]
    pc = p.reshape(1, -1, 1, 1)  # broadcast over (B, C, H, W)
    xc = x.clamp(min=eps)
    xp = xc.pow(pc)  # (B, C, H, W)
    S = xp.sum(dim=(-2, -1))  # (B, C)
    M = S / N
    pk = p.reshape(1, -1)  # (1, 1) or (1, C)
    f = M.pow(1.0 / pk)  # (B, C)
    dfdx = f.pow(1.0 - pk)[..., None, None] * xc.pow(pc - 1.0) / N
    dfdx = torch.where(x > eps, dfdx, torch.zeros_like(dfdx))  # the clamp passes no gradient
    dfdp = f * (-M.log() / pk**2 + (xp * xc.log()).sum(dim=(-2, -1)) / (pk * S))
    return dfdx, dfdp


def wgem_grads(x: torch.Tensor, weights: torch.Tensor, p, eps: float = 1e-6):
    """Closed-form partial derivatives of wGeM ``y_k = (Σ_i ω_i x_ik^p)^(1/p)``.

    With ``x`` clamped to ``>= eps`` as in :func:`~retrieval_lib.layers.functional.wgem`
    and ``S_k = Σ_i ω_i x_ik^p`` (so ``y_k = S_k^(1/p)``)::

        ∂y_k/∂x_ik = ω_i x_ik^(p-1) y_k^(1-p)                       (the pooling path; 0 where x_ik <= eps)
        ∂y_k/∂ω_i  = (1/p) x_ik^p y_k^(1-p)
        ∂y_k/∂p    = y_k ( -log S_k / p^2 + Σ_i ω_i x_ik^p log x_ik / (p S_k) )

    Shapes: ``x (B, C, H, W)``, ``weights (B|1, 1, H, W)`` (summing to 1 over ``H x W``), ``p``
    a float or a one-element tensor. Returns ``(dydx (B, C, H, W), dydw (B, C, H, W), dydp (B, C))``;
    ``dydw[b, k, i]`` is ``∂y_bk/∂ω_bi``. ``∂y/∂x`` here is the pooling path only:
    :func:`wgem_backward` adds the path through the mask. Use float64 to compare with
    autograd. Source: the derivatives of wGeM (Wu et al., ICIP 2018, Eqs. 3-5 as the book
    numbers them). Taught in ``notebooks/05_wgem.ipynb``.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError("wgem_grads: x must be a feature map tensor of shape (B, C, H, W)")
    B, _, H, W = x.shape
    if not isinstance(weights, torch.Tensor) or weights.dim() != 4 or weights.shape[1] != 1 \
            or tuple(weights.shape[-2:]) != (H, W) or weights.shape[0] not in (1, B):
        raise ValueError(f"wgem_grads: weights must have shape ({B}, 1, {H}, {W}) (or (1, 1, {H}, {W})) to "
                         f"match x {tuple(x.shape)}, got {tuple(getattr(weights, 'shape', ()))}")
    p = float(p.detach().reshape(-1)[0]) if isinstance(p, torch.Tensor) else float(p)
    if not (math.isfinite(p) and p > 0):
        raise ValueError(f"wgem_grads: p must be a positive finite number, got {p!r}")
    w = weights.to(dtype=x.dtype)
    xc = x.clamp(min=eps)
    xp = xc.pow(p)  # (B, C, H, W)
    S = (w * xp).sum(dim=(-2, -1))  # (B, C)
    y = S.pow(1.0 / p)  # (B, C)
    y1p = y.pow(1.0 - p)[..., None, None]  # (B, C, 1, 1)
    dydx = w * xc.pow(p - 1.0) * y1p
    dydx = torch.where(x > eps, dydx, torch.zeros_like(dydx))  # the clamp passes no gradient
    dydw = xp * y1p / p
    dydp = y * (-S.log() / p**2 + (w * xp * xc.log()).sum(dim=(-2, -1)) / (p * S))
    return dydx, dydw, dydp


def wgem_backward(layer, x: torch.Tensor, g: torch.Tensor) -> dict:
    """Gradients of ``L = Σ_bk g_bk y_bk`` for a :class:`~retrieval_lib.layers.pooling.WGeM` layer,
    from the closed forms of :func:`wgem_grads` chained by hand.

    ``ω = softmax(z)``, ``z = conv3x3(x)``: ``∂L/∂ω_i = Σ_k g_k ∂y_k/∂ω_i``; the softmax gives
    ``∂L/∂z_i = ω_i (∂L/∂ω_i - Σ_j ω_j ∂L/∂ω_j)``; the convolution sends ``∂L/∂z`` back to ``x``
    by the transposed convolution with the same kernel. So ``∂L/∂x`` has two paths: through
    the power mean (``"x_pool"``) and through the mask (``"x_mask"``).

    Shapes: ``x (B, C, H, W)``, ``g (B, C)``. Returns a dict of tensors: ``"x"`` (the sum of
    both paths), ``"x_pool"``, ``"x_mask"`` ``(B, C, H, W)``; ``"omega"`` ``(B, 1, H, W)``;
    ``"p"`` (a 0-d tensor); ``"conv_weight"`` ``(1, C, 3, 3)``, ``"conv_bias"`` ``(1,)``.
    Taught in ``notebooks/05_wgem.ipynb``.
    """
    if getattr(layer, "mask_input", "raw") != "raw":
        raise ValueError(f"wgem_backward: the closed forms chain the mask's convolution on the raw map; this layer's "
                         f"mask_input is {layer.mask_input!r} (use autograd for it)")
    if g.shape != x.shape[:2]:
        raise ValueError(f"wgem_backward: g must have shape {tuple(x.shape[:2])} (one weight per pooled value), "
                         f"got {tuple(g.shape)}")
    with torch.no_grad():
        conv = layer.conv
        z = conv(x)  # (B, 1, H, W)
        omega = torch.softmax(z.flatten(2), dim=-1).view_as(z)
        p = layer.multiscale_p  # max(p, p_min), the exponent the layer pools with
        dydx, dydw, dydp = wgem_grads(x, omega, p, layer.eps)
        gk = g[..., None, None]  # (B, C, 1, 1)
        dLdw = (gk * dydw).sum(dim=1, keepdim=True)  # (B, 1, H, W)
        dLdz = omega * (dLdw - (omega * dLdw).sum(dim=(-2, -1), keepdim=True))
        x_mask = F.conv_transpose2d(dLdz, conv.weight, padding=conv.padding)  # (B, C, H, W)
        x_pool = gk * dydx
        weight = torch.nn.grad.conv2d_weight(x, conv.weight.shape, dLdz, padding=conv.padding)
    return {"x": x_pool + x_mask, "x_pool": x_pool, "x_mask": x_mask, "omega": omega,
            "p": (g * dydp).sum(), "conv_weight": weight, "conv_bias": dLdz.sum().reshape(1)}
