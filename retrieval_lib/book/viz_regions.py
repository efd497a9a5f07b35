"""R-MAC's regions, drawn (04_rmac): the squares on the photo, level by level, and their MAC vectors."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from retrieval_lib.book.viz import draw_boxes, fmap_to_image_box, pyplot, to_numpy_image

__all__ = ["show_regions", "show_region_macs", "show_region_levels"]


def show_regions(img, regions, fmap_hw, L_of_region: Sequence[int] | None = None,
                 title: str = "R-MAC regions"):
    """Side by side: the regions on the photo (pixels) and on the feature-map grid (cells).

    ``regions`` is the (R, 4) ``(x, y, w, h)`` tensor of :func:`retrieval_lib.layers.functional.rmac_regions`
    in feature-map cells; ``L_of_region`` colours each region by its scale level.
    """
    plt = pyplot()
    im = to_numpy_image(img)
    H, W = im.shape[:2]
    h, w = fmap_hw
    regions = [tuple(int(v) for v in r) for r in (regions.tolist() if hasattr(regions, "tolist") else regions)]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.4))
    a.imshow(im)
    draw_boxes(a, [fmap_to_image_box(r, (h, w), (H, W)) for r in regions], label_levels=L_of_region)
    a.set_title(f"{len(regions)} regions on the photo ({W}x{H} px)")
    a.set_xlabel("x (px)")
    a.set_ylabel("y (px)")
    b.imshow(np.zeros((h, w)), cmap="Greys", extent=(0, w, h, 0), vmin=0, vmax=1)
    b.set_xticks(range(w + 1), minor=True)
    b.set_yticks(range(h + 1), minor=True)
    b.grid(which="minor", color="0.85", linewidth=0.5)
    draw_boxes(b, regions, label_levels=L_of_region)
    b.set_xlim(0, w)
    b.set_ylim(h, 0)
    b.set_title(f"the same regions on the {w}x{h} feature map")
    b.set_xlabel("x (cells)")
    b.set_ylabel("y (cells)")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def show_region_macs(vectors, labels: Sequence[str], top: int = 48,
                     title: str = "Region MAC vectors and their sum"):
    """Heat strips of descriptor vectors, one row each, on the channels that matter most.

    ``vectors`` is ``(R, C)`` (e.g. L2-normalised region MACs, then their normalised sum
    as the last row); channels are ordered by the last row, largest first, and the
    ``top`` first are shown, so one sees which regions bring which channels into the sum.
    Taught in ``notebooks/04_rmac.ipynb``.
    """
    plt = pyplot()
    V = vectors.detach().cpu().float() if isinstance(vectors, torch.Tensor) else torch.as_tensor(vectors).float()
    if V.ndim != 2 or V.shape[0] != len(labels):
        raise ValueError(f"show_region_macs: vectors must be (R, C) with one label per row; got shape "
                         f"{tuple(V.shape)} and {len(labels)} labels")
    order = torch.argsort(V[-1], descending=True)[:top]
    fig, ax = plt.subplots(figsize=(min(16.0, 2.5 + 0.22 * len(order)), 0.9 + 0.45 * V.shape[0]))
    im = ax.imshow(V[:, order].numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(V.shape[0]))
    ax.set_yticklabels(labels)
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels([str(int(c)) for c in order], rotation=90, fontsize=7)
    ax.set_xlabel(f"channel (the {len(order)} largest of the last row, in that order)")
    ax.set_ylabel("vector")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="value", fraction=0.03, pad=0.01)
    fig.tight_layout()
    return fig


def show_region_levels(img, regions, fmap_hw, levels: Sequence[int], cols: int = 3,
                       title: str = "R-MAC regions, level by level"):
    """One panel per scale level: that level's square regions on the photo, over the cell grid.

    ``regions`` ``(R, 4)`` of ``(x, y, w, h)`` in feature-map cells and ``levels`` ``(R,)``
    (e.g. :func:`retrieval_lib.book.regional.region_levels`). The feature-map cells are drawn as
    a thin white grid on the photo; each square gets its own colour and is inset by a few
    pixels that depend on its index, so overlapping squares that share an edge stay apart,
    and a cross marks its centre. Taught in ``notebooks/04_rmac.ipynb``.
    """
    from matplotlib.patches import Rectangle

    plt = pyplot()
    regions = [tuple(int(v) for v in r) for r in (regions.tolist() if hasattr(regions, "tolist") else regions)]
    levels = [int(v) for v in (levels.tolist() if hasattr(levels, "tolist") else levels)]
    if len(regions) != len(levels) or not regions:
        raise ValueError(f"show_region_levels: give one level per region and at least one region; got "
                         f"{len(regions)} regions and {len(levels)} levels")
    im = to_numpy_image(img)
    H, W = im.shape[:2]
    h, w = fmap_hw
    uniq = sorted(set(levels))
    cols = max(1, min(cols, len(uniq)))
    rows = math.ceil(len(uniq) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, (4.4 * H / W + 0.7) * rows), squeeze=False)
    cmap = plt.get_cmap("tab10")
    inset = 0.006 * max(H, W)
    for ax, level in zip(axes.flat, uniq):
        ax.imshow(im, extent=(0, W, H, 0))
        for c in range(1, w):
            ax.axvline(c * W / w, color="white", linewidth=0.5, alpha=0.7)
        for r in range(1, h):
            ax.axhline(r * H / h, color="white", linewidth=0.5, alpha=0.7)
        mine = [r for r, lv in zip(regions, levels) if lv == level]
        for k, region in enumerate(mine):
            x, y, bw, bh = fmap_to_image_box(region, (h, w), (H, W))
            d = inset * (1 + k % 4)
            color = cmap(k % 10)
            ax.add_patch(Rectangle((x + d, y + d), bw - 2 * d, bh - 2 * d, fill=False, edgecolor=color, linewidth=2))
            ax.plot(x + bw / 2, y + bh / 2, "+", color=color, markersize=9, markeredgewidth=2)
        ax.set_xlim(0, W)
        ax.set_ylim(H, 0)
        ax.set_xlabel("x (px)")
        ax.set_ylabel("y (px)")
        ax.set_title(f"level {level}: {len(mine)} squares of {mine[0][2]}x{mine[0][3]} cells")
    for ax in list(axes.flat)[len(uniq):]:
        ax.axis("off")
    fig.suptitle(f"{title} (feature map {w}x{h} cells, cell grid in white)")
    fig.tight_layout()
    return fig
