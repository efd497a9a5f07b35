"""Where a similarity comes from: a global descriptor's score split into the parts that sum to it.

* :func:`rmac_contributions` -- the R-MAC similarity ``s = q^T f_R-MAC(x)`` as a sum over the
  regions of ``x``: what each region of the result brings to the score.

The split is exact, not an approximation: the R-MAC vector is a normalised sum of unit
vectors, ``f = v / (||v|| + eps)`` with ``v = sum_r u_r`` and ``u_r = l2n(mac_r(x))``, so

    s = q^T f = sum_r  q^T u_r / (||v|| + eps)

and region ``r`` contributes ``c_r = q^T u_r / (||v|| + eps)``. The ``c_r`` add up to ``s``
to floating-point rounding. A contribution can be negative only when ``q`` has negative
components (it never does after a ReLU backbone).

Shapes: a query descriptor ``q`` ``(C,)``, a feature map ``(C, h, w)``. Taught in
``notebooks/04_rmac.ipynb`` (the regions) and used by ``notebooks/10_explorer.ipynb`` (why a
result matched).
"""
from __future__ import annotations

import torch

from retrieval_lib.layers.checks import check_eps, check_int
from retrieval_lib.layers.functional import l2n, mac, region_mac, rmac_regions

__all__ = ["rmac_contributions"]


def rmac_contributions(q: torch.Tensor, fmap: torch.Tensor, L: int = 3, include_global: bool = True,
                       eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Each region's part of the R-MAC similarity ``q^T rmac(fmap)``; the parts sum to it.

    ``c_r = q^T l2n(mac_r(x)) / (||sum_r' l2n(mac_r'(x))|| + eps)`` for the regions of
    :func:`~retrieval_lib.layers.functional.rmac_regions` ``(h, w, L)`` and, with
    ``include_global``, the whole map as one more region (last), exactly as
    :func:`~retrieval_lib.layers.functional.rmac` builds the vector. So
    ``c.sum() == q @ rmac(fmap[None], L, eps, include_global)[0]`` up to rounding.

    Args:
        q: ``(C,)`` the other image's descriptor (normally its R-MAC vector, the same ``L``).
        fmap: ``(C, h, w)`` the feature map whose regions are scored.
        L, include_global, eps: as in :func:`~retrieval_lib.layers.functional.rmac`.

    Returns:
        ``(contributions, regions)``: ``(R,)`` in ``fmap``'s dtype and ``(R, 4)`` int64 boxes
        ``(x, y, w, h)`` in cells (the whole map ``(0, 0, w, h)`` last when ``include_global``).

    Raises:
        ValueError: ``fmap`` is not ``(C, h, w)``, ``q`` is not ``(C,)``, or a bad ``L`` / ``eps``.
    """
    if not isinstance(fmap, torch.Tensor) or fmap.dim() != 3:
        raise ValueError(f"rmac_contributions: fmap must be one feature map (C, h, w), got "
                         f"{getattr(fmap, 'shape', type(fmap).__name__)}")
    if not isinstance(q, torch.Tensor) or q.shape != fmap.shape[:1]:
        raise ValueError(f"rmac_contributions: q must be a descriptor of the map's {fmap.shape[0]} channels, "
                         f"got {getattr(q, 'shape', type(q).__name__)}; pass the other image's R-MAC vector")
    L = check_int(L, "L", "rmac_contributions")
    check_eps(eps, "rmac_contributions")
    h, w = fmap.shape[-2:]
    regions = rmac_regions(h, w, L)  # (R, 4)
    u = l2n(region_mac(fmap[None], regions)[0], eps)  # (R, C) unit region MACs
    if include_global:
        u = torch.cat([u, l2n(mac(fmap[None]), eps)])  # (R + 1, C)
        regions = torch.cat([regions, torch.tensor([[0, 0, w, h]], dtype=regions.dtype)])
    v = u.sum(dim=0)  # (C,) the sum before the last normalisation
    c = (u @ q.to(u.dtype)) / (torch.linalg.vector_norm(v) + eps)  # (R,)
    return c, regions
