"""Regional descriptors in practice: the R-MAC region grid and sweeps over its levels.

The R-MAC equations themselves live in :mod:`retrieval_lib.layers.functional`
(``rmac_regions``, ``region_mac``, ``rmac``); this module holds what a notebook needs
around them:

* ``fmap_size``, ``aspect_crop`` -- the feature-map grid an image of a given size and shape gets;
* ``region_levels``, ``region_count_table`` -- which scale level each region belongs to,
  and how many regions each aspect ratio and ``L`` give;
* ``map_vs_L`` -- the headline metric as a function of ``L``, through the session's one
  descriptor path (``book.describe``);

Descriptors are ``(N, D)`` rows, L2-normalised, as everywhere in the library.
Taught in ``notebooks/04_rmac.ipynb``.
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable, Optional, Sequence

import torch

from retrieval_lib.data.images import resize_longer_side
from retrieval_lib.layers.checks import check_int
from retrieval_lib.layers.functional import rmac_regions
from retrieval_lib.layers.pooling import RMAC
from retrieval_lib.search.evaluate import headline

__all__ = [
    "fmap_size",
    "aspect_crop",
    "region_levels",
    "region_count_table",
    "map_vs_L",
]



def _positive_float(value, name: str, fn: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
        math.isfinite(value) and value > 0
    ):
        raise ValueError(f"{fn}: {name} must be a positive finite number, got {value!r}")
    return float(value)


# ----------------------------------------------------------------------------------------
# the grid
# ----------------------------------------------------------------------------------------
def fmap_size(image_hw: Sequence[int], stride: int = 32) -> tuple[int, int]:
    """Feature-map size ``(h, w)`` of an ``H x W`` input: ``(ceil(H / stride), ceil(W / stride))``.

    This is what a backbone of total stride 32 gives with "same" padding at every
    strided layer: EfficientNet-Lite (TF SAME padding) and torchvision's ResNet (each
    stride-2 layer maps ``n`` to ``ceil(n / 2)``). ``notebooks/04_rmac.ipynb`` checks it
    against the real feature maps. Raises ``ValueError`` for a non-positive size or stride.
    """
    if len(image_hw) != 2:
        raise ValueError(f"fmap_size: image_hw must be (H, W), got {tuple(image_hw)!r}")
    H = check_int(image_hw[0], "H", "fmap_size")
    W = check_int(image_hw[1], "W", "fmap_size")
    stride = check_int(stride, "stride", "fmap_size")
    return -(-H // stride), -(-W // stride)


def aspect_crop(img, aspect: float, long_side: Optional[int] = None):
    """Centre crop of a PIL image to ``width / height = aspect``, optionally resized.

    The largest centred box of that shape is kept; with ``long_side`` the crop is then
    resized so that its longer side has ``long_side`` pixels, exactly as the network input
    is (:func:`retrieval_lib.data.images.resize_longer_side`). Used to show how the R-MAC grid follows the image's shape.
    Taught in ``notebooks/04_rmac.ipynb``.
    """
    aspect = _positive_float(aspect, "aspect", "aspect_crop")
    W, H = img.size
    if W / H > aspect:  # too wide: keep the full height
        w, h = max(1, round(H * aspect)), H
    else:  # too tall: keep the full width
        w, h = W, max(1, round(W / aspect))
    x0, y0 = (W - w) // 2, (H - h) // 2
    out = img.crop((x0, y0, x0 + w, y0 + h))
    if long_side is not None:
        out = resize_longer_side(out, check_int(long_side, "long_side", "aspect_crop"))
    return out


def region_levels(H: int, W: int, L: int = 3) -> torch.Tensor:
    """Scale level ``l`` in ``1..L`` of each region of ``rmac_regions(H, W, L)``: int64 ``(R,)``.

    ``rmac_regions`` lists the regions level by level, so the regions of
    ``rmac_regions(H, W, l)`` are the first ones of ``rmac_regions(H, W, L)`` for every
    ``l <= L``; the level of a region is the first ``l`` whose prefix contains it. Used to
    colour regions by level. Taught in ``notebooks/04_rmac.ipynb``.
    """
    L = check_int(L, "L", "region_levels")
    counts = [0] + [rmac_regions(H, W, l).shape[0] for l in range(1, L + 1)]
    per_level = torch.tensor([b - a for a, b in zip(counts[:-1], counts[1:])], dtype=torch.int64)
    return torch.repeat_interleave(torch.arange(1, L + 1, dtype=torch.int64), per_level)


def _aspect_hw(aspect, long_side: int) -> tuple[str, int, int]:
    """``(label, H, W)`` of a map with the given aspect and ``long_side`` cells on its longer side."""
    if isinstance(aspect, (tuple, list)):
        if len(aspect) != 2:
            raise ValueError(f"region_count_table: an aspect must be (width, height) or a number, got {aspect!r}")
        w = _positive_float(aspect[0], "aspect width", "region_count_table")
        h = _positive_float(aspect[1], "aspect height", "region_count_table")
        label = f"{aspect[0]}:{aspect[1]}"
        ratio = w / h
    else:
        ratio = _positive_float(aspect, "aspect", "region_count_table")
        label = f"{ratio:.3g}"
    if ratio >= 1:
        return label, max(1, round(long_side / ratio)), long_side
    return label, long_side, max(1, round(long_side * ratio))


def region_count_table(aspects: Iterable, Ls: Iterable[int] = (1, 2, 3, 4), long_side: int = 32):
    """How many R-MAC regions each image shape gets: ``(header, rows)`` for a table.

    ``aspects`` are ``(width, height)`` pairs such as ``(4, 3)`` or numbers ``width / height``.
    Each becomes a feature map with ``long_side`` cells on its longer side (32 cells: a
    1024 px image through a stride-32 backbone) and the shorter side rounded. A row is
    ``[label, H, W, n(L_1), n(L_2), ...]`` with ``n(L) = len(rmac_regions(H, W, L))``, the
    regions *without* the whole-map region that ``rmac(include_global=True)`` adds. E.g.
    ``(4, 3)`` at 32 cells is a 24 x 32 map with 2, 8, 20 regions at L = 1, 2, 3.
    Pass the result to :func:`retrieval_lib.book.report.markdown_table`.
    Taught in ``notebooks/04_rmac.ipynb``.
    """
    long_side = check_int(long_side, "long_side", "region_count_table")
    Ls = [check_int(L, "L", "region_count_table") for L in Ls]
    if not Ls:
        raise ValueError("region_count_table: give at least one L")
    header = ["aspect (w:h)", "H", "W"] + [f"L={L}" for L in Ls]
    rows = []
    for aspect in aspects:
        label, H, W = _aspect_hw(aspect, long_side)
        rows.append([label, H, W] + [int(rmac_regions(H, W, L).shape[0]) for L in Ls])
    if not rows:
        raise ValueError("region_count_table: give at least one aspect, e.g. [(4, 3)]")
    return header, rows


# ----------------------------------------------------------------------------------------
# mAP against the number of levels
# ----------------------------------------------------------------------------------------
def map_vs_L(book, Ls: Iterable[int] = (1, 2, 3, 4, 5), include_global: bool = True,
             key: Optional[str] = None, scales: Optional[Sequence[float]] = None) -> dict:
    """R-MAC's ``key`` metric for each number of scale levels: ``{L: value}``.

    ``key`` defaults to the benchmark's ``headline_key``. Every ``L`` pools with
    :class:`retrieval_lib.layers.pooling.RMAC` ``(L, include_global)``; the descriptors of all
    of them come from one ``book.describe`` call (one backbone pass, or the kept maps;
    ``scales`` as there, default the book's) and are scored by ``book.evaluate``. Raises
    ``KeyError`` naming the available metrics when ``key`` is not one of them. Taught in
    ``notebooks/04_rmac.ipynb``.
    """
    Ls = [check_int(L, "L", "map_vs_L") for L in Ls]
    if not Ls:
        raise ValueError("map_vs_L: give at least one L")
    key = book.benchmark.headline_key if key is None else key
    pools = {L: RMAC(L=L, include_global=include_global) for L in Ls}
    X = book.describe(pools, "database", scales=scales)
    Q = book.describe(pools, "queries", scales=scales)
    return {L: headline(book.evaluate(X[L], Q[L]), key) for L in Ls}
