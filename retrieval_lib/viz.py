"""Pictures for the notebooks: activations over the photo, result grids, region grids, masks.

Every function draws on matplotlib axes it creates (or is given) and returns the figure,
with a title and labelled axes, so a notebook cell is one call.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

__all__ = [
    "to_numpy_image",
    "show_fmap_grid",
    "overlay",
    "show_ranked",
    "draw_boxes",
    "show_regions",
    "fmap_to_image_box",
]


def _plt():
    import matplotlib.pyplot as plt

    return plt


def to_numpy_image(img) -> np.ndarray:
    """PIL image, uint8/float array (H, W, 3) or tensor (3, H, W) -> float array (H, W, 3) in [0, 1]."""
    if isinstance(img, torch.Tensor):
        arr = img.detach().cpu().float()
        if arr.ndim == 3 and arr.shape[0] in (1, 3):
            arr = arr.permute(1, 2, 0)
        arr = arr.numpy()
    else:
        arr = np.asarray(img)
    arr = arr.astype(np.float32)
    if arr.max() > 1.0:
        arr = arr / 255.0
    return np.clip(arr, 0.0, 1.0)


def overlay(ax, img, heat, alpha: float = 0.5, cmap: str = "jet", title: str | None = None):
    """Draw ``img`` and, stretched over it, the 2-D map ``heat`` (h, w) (any scale).

    The map is shown at its own resolution (nearest), so each cell of the feature map is
    one visible block over the image — what the network actually sees.
    """
    im = to_numpy_image(img)
    heat = heat.detach().cpu().float().numpy() if isinstance(heat, torch.Tensor) else np.asarray(heat, float)
    H, W = im.shape[:2]
    ax.imshow(im, extent=(0, W, H, 0))
    h = ax.imshow(heat, cmap=cmap, alpha=alpha, extent=(0, W, H, 0), interpolation="nearest")
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    ax.set_xlabel("x (px)")
    ax.set_ylabel("y (px)")
    if title:
        ax.set_title(title)
    return h


def show_fmap_grid(img, fmap, channels: Sequence[int] | None = None, n: int = 12, cols: int = 4,
                   title: str = "Channel activations over the photo"):
    """Grid of single-channel activations of ``fmap`` (C, h, w) overlaid on ``img``.

    By default the ``n`` channels with the largest maximum response are shown.
    """
    plt = _plt()
    fmap = fmap.detach().cpu().float()
    if fmap.ndim == 4:
        fmap = fmap[0]
    if channels is None:
        channels = fmap.flatten(1).amax(1).topk(min(n, fmap.shape[0])).indices.tolist()
    rows = math.ceil(len(channels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, c in zip(axes.flat, channels):
        overlay(ax, img, fmap[c], title=f"channel {c} (max {fmap[c].max():.2f})")
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(channels):]:
        ax.axis("off")
    fig.suptitle(f"{title}: feature map {tuple(fmap.shape)} (C, h, w)")
    fig.tight_layout()
    return fig


def show_ranked(query, results: Sequence, correct: Sequence[bool | None] | None = None,
                scores: Sequence[float] | None = None, title: str = "Query and its top results"):
    """The query, then its ranked results; green frame = correct, red = wrong, grey = junk/None."""
    plt = _plt()
    k = len(results)
    fig, axes = plt.subplots(1, k + 1, figsize=(2.4 * (k + 1), 2.8))
    axes[0].imshow(to_numpy_image(query))
    axes[0].set_title("query")
    for i, ax in enumerate(axes[1:]):
        ax.imshow(to_numpy_image(results[i]))
        ok = None if correct is None else correct[i]
        color = {True: "tab:green", False: "tab:red", None: "0.6"}[ok if ok in (True, False) else None]
        for side in ax.spines.values():
            side.set_edgecolor(color)
            side.set_linewidth(5)
        label = f"#{i + 1}"
        if scores is not None:
            label += f"  s={scores[i]:.3f}"
        ax.set_title(label, color=color)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].set_xlabel("query image")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def fmap_to_image_box(region, fmap_hw, image_hw):
    """Map a feature-map box (x, y, w, h) in cells to image pixels (x, y, w, h)."""
    x, y, w, h = (float(v) for v in region)
    sy, sx = image_hw[0] / fmap_hw[0], image_hw[1] / fmap_hw[1]
    return x * sx, y * sy, w * sx, h * sy


def draw_boxes(ax, boxes, colors=None, linewidth: float = 2.0, label_levels: Sequence[int] | None = None):
    """Draw (x, y, w, h) rectangles on ``ax`` (image or feature-map coordinates)."""
    from matplotlib.patches import Rectangle

    cmap = _plt().get_cmap("tab10")
    for i, (x, y, w, h) in enumerate(boxes):
        c = colors[i] if colors is not None else cmap((label_levels[i] if label_levels is not None else i) % 10)
        ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor=c, linewidth=linewidth))


def show_regions(img, regions, fmap_hw, L_of_region: Sequence[int] | None = None,
                 title: str = "R-MAC regions"):
    """Side by side: the regions on the photo (pixels) and on the feature-map grid (cells).

    ``regions`` is the (R, 4) ``(x, y, w, h)`` tensor of :func:`retrieval_lib.functional.rmac_regions`
    in feature-map cells; ``L_of_region`` colours each region by its scale level.
    """
    plt = _plt()
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
