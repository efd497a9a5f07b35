"""Global descriptors from CNN feature maps, as pure functions.

Every function here takes a feature map ``x`` of shape ``(B, C, H, W)`` (non-negative in
practice: the output of a ReLU/ReLU6 backbone) and returns descriptors ``(B, C)`` (or
``(B, R, C)`` for per-region descriptors). Nothing is L2-normalised unless the docstring
says so; :func:`l2n` does it. Outputs follow the device and dtype of ``x``. One function,
:func:`multiscale_mean`, works on descriptors instead: it combines those of several input
scales into one.

Thin ``nn.Module`` wrappers live in :mod:`retrieval_lib.layers.pooling`.

Functions, their source and the notebook that teaches them:

* ``l2n`` -- ``00_pipeline``
* ``mac`` -- Tolias, Sicre & Jégou, ICLR 2016; Razavian et al. 2016 -- ``01_mac``
* ``spoc`` -- Babenko & Lempitsky, ICCV 2015 -- ``02_spoc``
* ``gem`` -- Radenović, Tolias & Chum, TPAMI 2018 -- ``03_gem`` (its closed-form gradients:
  :mod:`retrieval_lib.layers.grads`)
* ``rmac_regions``, ``region_mac``, ``rmac`` -- Tolias, Sicre & Jégou, ICLR 2016 -- ``04_rmac``
* ``wgem`` -- Wu et al., ICIP 2018 -- ``05_wgem``
* ``multiscale_mean`` -- Radenović, Tolias & Chum, TPAMI 2018 (cirtorch) -- ``04_rmac``
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import Sequence, Union

import torch

from retrieval_lib.layers.checks import check_eps, check_fmap, check_int, check_p
from retrieval_lib.layers.cells import cell_maxima, cell_plan, region_mac_from_cells

__all__ = [
    "l2n",
    "mac",
    "spoc",
    "gem",
    "power_mean",
    "wgem",
    "multiscale_mean",
    "rmac_regions",
    "rmac_regions_tuple",
    "region_mac",
    "rmac",
]

Regions = Union[torch.Tensor, Sequence[Sequence[int]]]

# R-MAC constants of Tolias et al. (ICLR 2016): wanted overlap of neighbouring regions
# and the candidate numbers of regions along the long side of the map.
_RMAC_OVERLAP = 0.4
_RMAC_STEPS = (2, 3, 4, 5, 6, 7)


# ----------------------------------------------------------------------------------------
# normalisation
# ----------------------------------------------------------------------------------------
def l2n(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """L2-normalise along the last dimension: ``x / (||x||_2 + eps)``.

    Shapes: ``(..., D) -> (..., D)``. ``eps`` keeps an all-zero vector at zero instead of
    producing NaN. Taught in ``notebooks/00_pipeline.ipynb``.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError("l2n: expected a tensor with at least one dimension (..., D)")
    return x / (torch.linalg.vector_norm(x, ord=2, dim=-1, keepdim=True) + eps)


# ----------------------------------------------------------------------------------------
# global pooling
# ----------------------------------------------------------------------------------------
def mac(x: torch.Tensor) -> torch.Tensor:
    """MAC, maximum activations of convolutions: the max of each channel over the map.

    ``f_k = max_{i in H x W} x_ik``; shapes ``(B, C, H, W) -> (B, C)``, not normalised.

    Source: Tolias, Sicre & Jégou, "Particular object retrieval with integral max-pooling
    of CNN activations", ICLR 2016; Razavian et al., "Visual instance retrieval with
    deep convolutional networks", ITE Trans. MTA 2016. Taught in ``notebooks/01_mac.ipynb``.
    """
    check_fmap(x, "mac")
    return x.amax(dim=(-2, -1))


def _center_prior(H: int, W: int, like: torch.Tensor) -> torch.Tensor:
    """Gaussian centre prior of SPoC on an ``H x W`` grid, normalised to sum 1: ``(H, W)``."""
    # Pixel (i, j) is the unit cell whose centre is (i + 0.5, j + 0.5); the map centre is
    # (H / 2, W / 2), so the prior is symmetric. sigma = a third of the distance from the
    # centre to the nearest border = min(H, W) / 6.
    sigma = min(H, W) / 6.0
    ys = torch.arange(H, device=like.device, dtype=like.dtype) + 0.5 - H / 2.0
    xs = torch.arange(W, device=like.device, dtype=like.dtype) + 0.5 - W / 2.0
    d2 = ys[:, None] ** 2 + xs[None, :] ** 2  # (H, W)
    weights = torch.exp(-d2 / (2.0 * sigma**2))
    return weights / weights.sum()


def spoc(x: torch.Tensor, center_prior: bool = False) -> torch.Tensor:
    """SPoC, sum-pooled convolutional features, as a (weighted) mean over the map.

    ``f_k = sum_{i in H x W} a_i x_ik`` with weights ``a`` summing to 1; shapes
    ``(B, C, H, W) -> (B, C)``, not normalised.

    * ``center_prior=False``: ``a_i = 1 / (H W)``, plain average pooling.
    * ``center_prior=True``: the Gaussian centre prior of the paper,
      ``a(y, x) ∝ exp(-((y - H/2)^2 + (x - W/2)^2) / (2 sigma^2))`` with sigma a third of
      the distance from the centre to the nearest border (``sigma = min(H, W) / 6``),
      evaluated at pixel centres ``(i + 0.5, j + 0.5)``.

    The paper sums; we divide by the sum of the weights. The two differ by one
    positive factor per map size, which L2 normalisation removes, and the mean keeps the
    descriptor's scale independent of the image size.

    Source: Babenko & Lempitsky, "Aggregating local deep features for image retrieval",
    ICCV 2015. Taught in ``notebooks/02_spoc.ipynb``.
    """
    check_fmap(x, "spoc")
    if not center_prior:
        return x.mean(dim=(-2, -1))
    weights = _center_prior(x.shape[-2], x.shape[-1], x)  # (H, W)
    return (x * weights).sum(dim=(-2, -1))


def power_mean(x: torch.Tensor, p: Union[float, torch.Tensor], eps: float,
                weights: torch.Tensor | None = None) -> torch.Tensor:
    """The power mean behind GeM and wGeM, on inputs that are already validated.

    ``f_k = ( sum_i w_i max(x_ik, eps)^p_k )^(1/p_k)`` over the ``H x W`` positions ``i``:
    ``(B, C, H, W) -> (B, C)``. ``weights`` ``(B|1, 1, H, W)`` sum to 1 over ``H x W``;
    ``None`` means the plain mean (``w_i = 1 / (H W)``), which is GeM. ``p`` is a float or
    a tensor ``(1,)``/``(C,)``, cast to ``x``'s dtype.
    """
    if isinstance(p, torch.Tensor):
        p = p.to(dtype=x.dtype).reshape(-1)  # (1,) or (C,)
        xp = x.clamp(min=eps).pow(p[:, None, None])  # (B, C, H, W)
    else:
        xp = x.clamp(min=eps).pow(p)
    if weights is None:
        pooled = xp.mean(dim=(-2, -1))  # (B, C)
    else:
        pooled = (xp * weights.to(dtype=x.dtype)).sum(dim=(-2, -1))  # (B, C)
    return pooled.pow(1.0 / p)


def gem(x: torch.Tensor, p: Union[float, torch.Tensor] = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """GeM, generalized-mean pooling: a power mean of each channel over the map.

    ``f_k = ( (1/|X_k|) sum_{x in X_k} x^{p_k} )^{1/p_k}`` with ``x`` clamped to ``>= eps``;
    shapes ``(B, C, H, W) -> (B, C)``, not normalised. ``p = 1`` is average pooling
    (SPoC), ``p -> inf`` tends to max pooling (MAC).

    ``p`` is a positive float, or a tensor of shape ``(1,)`` (shared by all channels) or
    ``(C,)`` (one per channel) that may require grad; a tensor ``p`` is cast to ``x``'s
    dtype. Large ``p`` overflows float32 (``x^p`` past ~3e38): use float64 to study the
    ``p -> inf`` limit. Raises ``ValueError`` when ``p <= 0`` (for a tensor: any element).

    Source: Radenović, Tolias & Chum, "Fine-tuning CNN image retrieval with no human
    annotation", TPAMI 2018. Taught in ``notebooks/03_gem.ipynb``.
    """
    check_fmap(x, "gem")
    check_eps(eps, "gem")
    check_p(p, x.shape[1], "gem")
    return power_mean(x, p, eps)


def _check_weights(weights: torch.Tensor, x: torch.Tensor, fn: str) -> None:
    B, _, H, W = x.shape
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"{fn}: weights must be a tensor of shape ({B}, 1, {H}, {W})")
    if weights.dim() != 4 or weights.shape[1] != 1 or tuple(weights.shape[-2:]) != (H, W) or (
        weights.shape[0] not in (B, 1)
    ):
        raise ValueError(
            f"{fn}: weights must have shape (B, 1, H, W) = ({B}, 1, {H}, {W}) to match the "
            f"feature map {tuple(x.shape)} (or (1, 1, {H}, {W}) to share one mask), got "
            f"{tuple(weights.shape)}; one non-negative weight per spatial position, summing "
            "to 1 over H x W (e.g. a softmax over H*W)"
        )


def wgem(
    x: torch.Tensor,
    weights: torch.Tensor,
    p: Union[float, torch.Tensor] = 3.0,
    eps: float = 1e-6,
) -> torch.Tensor:
    """wGeM, weighted generalized-mean pooling with one spatial weight map per image.

    ``y_k = ( sum_{i in H x W} w_i x_ik^{p_k} )^{1/p_k}`` with ``x`` clamped to ``>= eps``;
    shapes ``x (B, C, H, W)``, ``weights (B, 1, H, W)`` (or ``(1, 1, H, W)``, shared)
    ``-> (B, C)``, not normalised. The weights must be non-negative and sum to 1 over
    ``H x W`` (e.g. a spatial softmax); their values are not checked. With uniform weights
    ``1 / (H W)`` this is exactly :func:`gem`. ``p`` as in :func:`gem`.

    Source: Eq. (2), Wu et al., ICIP 2018 (weighted generalized mean pooling).
    Taught in ``notebooks/05_wgem.ipynb``.
    """
    check_fmap(x, "wgem")
    _check_weights(weights, x, "wgem")
    check_eps(eps, "wgem")
    check_p(p, x.shape[1], "wgem")
    return power_mean(x, p, eps, weights)


# ----------------------------------------------------------------------------------------
# several input scales -> one descriptor
# ----------------------------------------------------------------------------------------
def multiscale_mean(descs: Union[torch.Tensor, Sequence[torch.Tensor]],
                    p: Union[float, torch.Tensor] = 1.0) -> torch.Tensor:
    """Combine descriptors of the same images at several input scales into one, L2-normalised.

    ``f = l2n( ( (1/S) sum_{s=1..S} f_s^p )^(1/p) )``, element-wise, where ``f_s`` are the
    L2-normalised descriptors of the images resized by scale ``s`` (e.g. ``s`` in
    ``{1, 1/sqrt(2), 1/2}``). Shapes: ``S`` tensors ``(N, D)`` (a list, or one ``(S, N, D)``
    tensor) ``-> (N, D)``, in their dtype and on their device.

    ``p`` is the pooling's multi-scale exponent (the ``multiscale_p`` attribute of the
    pooling modules): a GeM pooling's own p -- a float, or a tensor ``(D,)`` for one p
    per channel -- and 1, the plain mean, for MAC, SPoC and R-MAC. With ``p != 1`` every
    entry must be non-negative (as GeM descriptors are).

    Source: Radenović, Tolias & Chum, "Fine-tuning CNN image retrieval with no human
    annotation", TPAMI 2018, whose code (cirtorch, ``extract_ms``) averages multi-scale
    GeM descriptors with the power ``p`` of the GeM layer and 1 otherwise.
    Taught in ``notebooks/04_rmac.ipynb``.
    """
    fn = "multiscale_mean"
    if isinstance(descs, torch.Tensor):
        if descs.dim() != 3:
            raise ValueError(f"{fn}: a tensor of descriptors must be (S, N, D), got shape "
                             f"{tuple(descs.shape)}; stack one (N, D) matrix per scale")
        descs = list(descs)
    else:
        descs = list(descs)
    if not descs:
        raise ValueError(f"{fn}: no descriptors given; pass one (N, D) matrix per scale")
    shape = tuple(descs[0].shape)
    if len(shape) != 2 or any(tuple(f.shape) != shape for f in descs):
        raise ValueError(f"{fn}: every scale must give descriptors of one shape (N, D), got "
                         f"{[tuple(f.shape) for f in descs]}")
    if isinstance(p, torch.Tensor):
        p = p.detach()
        if p.numel() == 1:
            p = float(p.reshape(-1)[0])
        elif p.dim() != 1 or p.shape[0] != shape[1]:
            raise ValueError(f"{fn}: a tensor p must hold one exponent or one per dimension "
                             f"({shape[1]},), got shape {tuple(p.shape)}")
    check_p(p, shape[1], fn)
    if isinstance(p, torch.Tensor):
        p = p.to(device=descs[0].device, dtype=descs[0].dtype)
    elif p == 1:
        return l2n(sum(descs[1:], descs[0].clone()) / len(descs))
    if any(bool((f < 0).any()) for f in descs):
        raise ValueError(f"{fn}: a power mean with p != 1 needs non-negative descriptors, but some "
                         "entries are negative; use p=1 (a plain mean) for descriptors that can be "
                         "negative, e.g. after whitening")
    acc = descs[0].pow(p)
    for f in descs[1:]:
        acc += f.pow(p)  # (N, D), one scale at a time
    return l2n((acc / len(descs)).pow(1.0 / p))


# ----------------------------------------------------------------------------------------
# R-MAC regions
# ----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1024)
def rmac_regions_tuple(H: int, W: int, L: int) -> tuple:
    """The R-MAC regions as a tuple of ``(x, y, w, h)`` tuples (cached per map size)."""
    # The arithmetic is done in float32 like cirtorch's rmac(), so that ties in the choice
    # of the number of regions break the same way it does (see rmac_regions).
    f32 = torch.float32
    w = min(H, W)
    steps = torch.tensor(_RMAC_STEPS, dtype=f32)
    b = (max(H, W) - w) / (steps - 1)
    # Overlap of two neighbouring w x w squares spaced b apart is (w^2 - w b) / w^2.
    err = torch.abs((w * w - w * b) / (w * w) - _RMAC_OVERLAP)
    idx = int(torch.argmin(err))  # first minimum, as MATLAB's min and torch.min do
    extra_w = idx + 1 if H < W else 0  # extra regions along the long side only
    extra_h = idx + 1 if H > W else 0

    def starts(side: int, wl: int, count: int, wl2: int) -> list:
        step = 0.0 if count == 1 else (side - wl) / (count - 1)
        pos = torch.floor(wl2 + torch.arange(count, dtype=f32) * step) - wl2
        return [int(v) for v in pos.tolist()]

    regions = []
    for level in range(1, L + 1):
        wl = (2 * w) // (level + 1)  # side of the square regions of this level
        if wl == 0:
            continue
        wl2 = math.floor(wl / 2 - 1)
        xs = starts(W, wl, level + extra_w, wl2)
        ys = starts(H, wl, level + extra_h, wl2)
        regions.extend((x0, y0, wl, wl) for y0 in ys for x0 in xs)
    return tuple(regions)


def rmac_regions(H: int, W: int, L: int = 3) -> torch.Tensor:
    """The R-MAC regions of an ``H x W`` feature map: int64 tensor ``(R, 4)`` of ``(x, y, w, h)``.

    ``x`` is the column and ``y`` the row of the top-left corner, ``w = h`` the side; the
    region covers ``x[..., y:y+h, x:x+w]``. Order: level by level, and row-major inside a
    level. The rules (Tolias, Sicre & Jégou, ICLR 2016, and their MATLAB code):

    * ``w = min(H, W)``; for ``steps`` in 2..7 candidate regions along the long side, with
      spacing ``b = (max(H, W) - w) / (steps - 1)``, pick
      ``idx = argmin |(w^2 - w b) / w^2 - 0.4|`` (overlap closest to 40%); the long side gets
      ``idx + 1`` extra regions at every level (none when ``H == W``).
    * level ``l = 1..L``: square side ``wl = floor(2 w / (l + 1))``, ``l + extra`` regions
      along the long side and ``l`` along the short side, start positions
      ``floor(wl2 + i b) - wl2`` with ``wl2 = floor(wl / 2 - 1)`` and
      ``b = (side - wl) / (count - 1)`` (0 when count is 1). Levels with ``wl = 0`` are skipped.

    E.g. a 4:3 map (24 x 32) at ``L = 3`` has 2 + 6 + 12 = 20 regions. The arithmetic is done
    in float32 exactly as cirtorch's ``rmac`` does, so the regions match it (checked for all
    sizes up to 96 x 96). Float64 arithmetic, as in MATLAB, can break exact ties in the
    ``argmin`` the other way (e.g. ``H=10, W=18``: 2 and 3 steps both miss 40% by 20 points;
    float32 picks 2 steps, float64 picks 3) and can floor a start differently.
    Cached per ``(H, W, L)``. Taught in ``notebooks/04_rmac.ipynb``.
    """
    H = check_int(H, "H", "rmac_regions")
    W = check_int(W, "W", "rmac_regions")
    L = check_int(L, "L", "rmac_regions")
    return torch.tensor(rmac_regions_tuple(H, W, L), dtype=torch.int64).reshape(-1, 4)


def _regions_tuple(regions: Regions, H: int, W: int, fn: str) -> tuple:
    """Validate regions against an H x W map and return them as a tuple of 4-tuples."""
    if isinstance(regions, torch.Tensor):
        if regions.is_floating_point() or regions.is_complex() or regions.dtype == torch.bool:
            raise TypeError(
                f"{fn}: regions must hold integers (x, y, w, h), got dtype {regions.dtype}; "
                "use rmac_regions(H, W, L) or cast with .long()"
            )
        rows = regions.tolist()
        shape = tuple(regions.shape)
    else:
        rows = [list(r) for r in regions]
        shape = (len(rows), len(rows[0]) if rows else 4)
    if len(shape) != 2 or shape[1] != 4 or any(len(r) != 4 for r in rows):
        raise ValueError(f"{fn}: regions must have shape (R, 4) of (x, y, w, h), got {shape}")
    out = []
    for k, r in enumerate(rows):
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in r):
            raise TypeError(f"{fn}: region {k} = {r} must hold integers (x, y, w, h)")
        x0, y0, w, h = (int(v) for v in r)
        if w < 1 or h < 1 or x0 < 0 or y0 < 0 or x0 + w > W or y0 + h > H:
            raise ValueError(
                f"{fn}: region {k} = (x={x0}, y={y0}, w={w}, h={h}) does not fit in the "
                f"{H} x {W} (H x W) feature map; regions need w, h >= 1, x, y >= 0, "
                f"x + w <= {W} and y + h <= {H} (compute them with rmac_regions({H}, {W}, L))"
            )
        out.append((x0, y0, w, h))
    return tuple(out)


def region_mac(x: torch.Tensor, regions: Regions) -> torch.Tensor:
    """Max of every channel inside every region: ``(B, C, H, W), (R, 4) -> (B, R, C)``.

    ``out[b, r, k] = max_{y <= i < y + h, x <= j < x + w} x[b, k, i, j]`` for region
    ``r = (x, y, w, h)`` (e.g. from :func:`rmac_regions`; any integer regions inside the map
    work). Not normalised: the building block of R-MAC and of learned regional aggregation.

    How it is vectorised: all region borders cut the map into a grid of cells, and every
    region is a block of whole cells. One pass over the map takes the max of every cell
    (a running maximum over the rows of each band of cell rows, then a max over each band
    of columns), and each region's max is the max over its block of cells, gathered with
    index tensors. There is no Python loop over images or regions; the short loops left
    run over map rows, cell columns and the cells a region spans, each op covering the
    whole batch. Nothing of size ``B x R x C x H x W`` is ever built. The cell grid and
    index tensors are cached per ``(H, W, regions, device)``.

    Source: regional MAC of Tolias, Sicre & Jégou, ICLR 2016.
    Taught in ``notebooks/04_rmac.ipynb``.
    """
    check_fmap(x, "region_mac")
    H, W = x.shape[-2:]
    regions = _regions_tuple(regions, H, W, "region_mac")
    if not regions:
        return x.new_zeros(x.shape[0], 0, x.shape[1])
    plan = cell_plan(H, W, regions, x.device)
    return region_mac_from_cells(cell_maxima(x, plan), plan)


def rmac(
    x: torch.Tensor, L: int = 3, eps: float = 1e-6, include_global: bool = True
) -> torch.Tensor:
    """R-MAC, regional maximum activations of convolutions, L2-normalised.

    ``f = l2n( sum_{r in regions} l2n(mac_r(x)) [+ l2n(mac(x))] )``: the MAC of every
    region of :func:`rmac_regions` ``(H, W, L)``, each L2-normalised, summed, and the sum
    L2-normalised. ``include_global=True`` adds the whole-map MAC as one more region, as
    cirtorch does. Shapes ``(B, C, H, W) -> (B, C)``, unit L2 norm.

    The paper also PCA-whitens each regional vector before summing; here whitening is a
    separate step (see the whitening notebooks), as in cirtorch. Batched and vectorised
    (see :func:`region_mac`); the region geometry is cached per ``(H, W, L)``.

    Source: Tolias, Sicre & Jégou, "Particular object retrieval with integral max-pooling
    of CNN activations", ICLR 2016. Taught in ``notebooks/04_rmac.ipynb``.
    """
    check_fmap(x, "rmac")
    L = check_int(L, "L", "rmac")
    check_eps(eps, "rmac")
    H, W = x.shape[-2:]
    regions = rmac_regions_tuple(H, W, L)
    plan = cell_plan(H, W, regions, x.device)
    cells = cell_maxima(x, plan)  # (B, ny, nx, C)
    v = l2n(region_mac_from_cells(cells, plan), eps).sum(dim=1)  # (B, R, C) -> (B, C)
    if include_global:
        v = v + l2n(cells.amax(dim=(1, 2)), eps)  # whole-map MAC from the cell maxima
    return l2n(v, eps)
