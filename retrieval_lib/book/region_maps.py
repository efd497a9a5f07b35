"""R-MAC regions drawn on the feature map itself, level by level, as filled squares.

:func:`show_region_map` is the feature-map counterpart of
:func:`retrieval_lib.book.viz_regions.show_region_levels` (which draws the squares on the photo):
one panel per scale level, the real map underneath (by default each cell's mean
activation over the channels), each square of that level filled with its own translucent
colour, outlined, and marked at its centre. Where squares overlap, their fills add up, so
the overlap that R-MAC's grid is built around can be seen.

Shapes: ``fmap`` ``(C, h, w)``; ``regions`` ``(R, 4)`` of ``(x, y, w, h)`` in cells (from
:func:`retrieval_lib.layers.functional.rmac_regions`); ``levels`` ``(R,)``.
Taught in ``notebooks/04_rmac.ipynb``.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

__all__ = ["cell_activation", "show_region_map"]


def cell_activation(fmap: torch.Tensor) -> np.ndarray:
    """Mean activation over the channels of each cell: ``(C, h, w) -> (h, w)`` float array.

    Raises ``ValueError`` for anything but a ``(C, h, w)`` tensor.
    """
    if not isinstance(fmap, torch.Tensor) or fmap.dim() != 3:
        raise ValueError(f"cell_activation: expected a feature map tensor (C, h, w), got "
                         f"{getattr(fmap, 'shape', type(fmap).__name__)}; pass book.fmap(i), not a batch")
    return fmap.detach().float().mean(dim=0).cpu().numpy()


def _as_list(values, name: str) -> list:
    return [tuple(int(v) for v in r) if name == "regions" else int(r)
            for r in (values.tolist() if hasattr(values, "tolist") else values)]


def show_region_map(fmap: torch.Tensor, regions, levels: Sequence[int], labels: Sequence[str] | None = None,
                    cols: int = 3, alpha: float = 0.25, title: str = "R-MAC regions on the feature map"):
    """One panel per level: that level's squares, filled, over the real feature map (in cells).

    Args:
        fmap: ``(C, h, w)`` feature map; the panels show :func:`cell_activation` (in
            grey, one shared scale with a colour bar, so the coloured squares stand out).
        regions: ``(R, 4)`` ``(x, y, w, h)`` in cells, each inside the ``h x w`` map.
        levels: ``(R,)`` scale level of each region (panels in increasing level order).
        labels: optional text per region, written at its centre (e.g. its index).
        cols: panels per row. alpha: opacity of each square's fill.
        title: the figure's title (the map size is appended).

    Returns the figure. Raises ``ValueError`` for a map that is not ``(C, h, w)``, a number
    of levels (or labels) different from the number of regions, no region, or a region
    outside the map.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    heat = cell_activation(fmap)
    h, w = heat.shape
    regions, levels = _as_list(regions, "regions"), _as_list(levels, "levels")
    if not regions or len(levels) != len(regions) or (labels is not None and len(labels) != len(regions)):
        raise ValueError(f"show_region_map: give at least one region and one level (and label) per region; got "
                         f"{len(regions)} regions, {len(levels)} levels"
                         + ("" if labels is None else f", {len(labels)} labels"))
    outside = [r for r in regions if r[0] < 0 or r[1] < 0 or r[2] < 1 or r[3] < 1 or r[0] + r[2] > w or r[1] + r[3] > h]
    if outside:
        raise ValueError(f"show_region_map: regions {outside[:3]} do not fit the {w}x{h} map (x, y, w, h in cells); "
                         "were they computed for another map size?")
    uniq = sorted(set(levels))
    cols = max(1, min(int(cols), len(uniq)))
    rows = math.ceil(len(uniq) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols + 0.8, (4.4 * h / w + 0.8) * rows), squeeze=False)
    cmap = plt.get_cmap("tab10")
    vmin, vmax = float(heat.min()), float(heat.max())
    for ax, level in zip(axes.flat, uniq):
        im = ax.imshow(heat, cmap="gray", extent=(0, w, h, 0), vmin=vmin, vmax=vmax, interpolation="nearest")
        mine = [k for k, lv in enumerate(levels) if lv == level]
        for n, k in enumerate(mine):
            x, y, bw, bh = regions[k]
            color = cmap(n % 10)
            ax.add_patch(Rectangle((x, y), bw, bh, facecolor=color, edgecolor=color, alpha=alpha, linewidth=0))
            d = 0.06 * (1 + n % 4)  # inset outlines a little so shared edges stay apart
            ax.add_patch(Rectangle((x + d, y + d), bw - 2 * d, bh - 2 * d, fill=False, edgecolor=color, linewidth=2))
            ax.plot(x + bw / 2, y + bh / 2, "+", color=color, markersize=9, markeredgewidth=2)
            if labels is not None:
                ax.text(x + bw / 2, y + bh / 2, f" {labels[k]}", color="white", fontsize=8, va="bottom")
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.set_xlabel("x (cells)")
        ax.set_ylabel("y (cells)")
        bw, bh = regions[mine[0]][2:]
        ax.set_title(f"level {level}: {len(mine)} square{'s' if len(mine) > 1 else ''} of {bw}x{bh} cells")
    for ax in list(axes.flat)[len(uniq):]:
        ax.axis("off")
    fig.suptitle(f"{title} ({w}x{h} cells)")
    fig.tight_layout()
    fig.colorbar(im, ax=list(axes.flat), label="mean activation over the channels", fraction=0.025, pad=0.02)
    return fig
