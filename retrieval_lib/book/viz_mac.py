"""Where a MAC descriptor looks, drawn (01_mac): arg-max cells, receptive fields, implicit correspondences.

The pictures of :mod:`retrieval_lib.book.explain` and :mod:`retrieval_lib.book.receptive_fields`:
a map drawn cell by cell where the network puts it (:func:`overlay_cells`), the arg-max locations
of channels (:func:`show_argmax`), a cell's theoretical and effective receptive fields
(:func:`show_receptive_field`) and the cells two photos match through (:func:`show_correspondences`).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from retrieval_lib.book.viz import draw_boxes, draw_heat, overlay, pyplot, to_numpy_image

__all__ = ["overlay_cells", "show_argmax", "show_receptive_field", "show_correspondences"]


# ---------------------------------------------------------------- where MAC looks (01_mac)
def _point_colors(n: int):
    cmap = pyplot().get_cmap("tab10")
    return [cmap(i % 10) for i in range(n)]


def _image_axes(ax, im, title):
    H, W = im.shape[:2]
    ax.imshow(im, extent=(0, W, H, 0))
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    ax.set_xlabel("x (px)")
    ax.set_ylabel("y (px)")
    ax.set_title(title)


def overlay_cells(ax, img, heat, rf_y, rf_x, alpha: float = 0.5, cmap: str = "jet", title: str | None = None):
    """Like :func:`overlay`, but each cell of ``heat`` (h, w) is drawn where the network puts it.

    ``rf_y`` / ``rf_x`` are the receptive fields of the map's rows and columns
    (:func:`retrieval_lib.book.receptive_fields.receptive_field`): cell ``(r, c)`` becomes a
    stride x stride block centred on its receptive field. With TensorFlow "SAME" padding
    (EfficientNet-Lite) or an input size that is not a multiple of the stride, this
    differs from stretching the map over the image by up to half a cell (01_mac).
    """
    im = to_numpy_image(img)
    heat = heat.detach().cpu().float().numpy() if isinstance(heat, torch.Tensor) else np.asarray(heat, float)
    H, W = im.shape[:2]
    h, w = heat.shape
    x0, x1 = rf_x.center(0) - rf_x.stride / 2, rf_x.center(w - 1) + rf_x.stride / 2
    y0, y1 = rf_y.center(0) - rf_y.stride / 2, rf_y.center(h - 1) + rf_y.stride / 2
    return draw_heat(ax, im, heat, (x0, x1, y1, y0), alpha, cmap, title)


def show_argmax(img, centers, boxes=None, labels: Sequence[str] | None = None, count_map=None,
                rf=None, title: str = "Where the MAC maxima sit"):
    """Arg-max locations of channels drawn on the photo (01_mac).

    ``centers`` (K, 2) pixel ``(x, y)`` of each channel's maximum (e.g. the receptive-field
    centres from :func:`retrieval_lib.book.receptive_fields.cell_centers`), ``boxes`` optional (K, 4)
    ``(x, y, w, h)`` around them, ``labels`` one string per point. With ``count_map``
    (h, w), a first panel shows how many channels have their maximum in each cell, drawn
    with :func:`overlay_cells` when ``rf = (rf_y, rf_x)`` is given (else stretched).
    """
    plt = pyplot()
    im = to_numpy_image(img)
    centers = np.asarray(centers, float).reshape(-1, 2)
    n_panels = 2 if count_map is not None else 1
    fig, axes = plt.subplots(1, n_panels, figsize=(6.2 * n_panels, 4.6), squeeze=False)
    axes = axes[0]
    if count_map is not None:
        counts = np.asarray(count_map.cpu() if isinstance(count_map, torch.Tensor) else count_map, float)
        kw = dict(alpha=0.55, cmap="viridis", title=f"channels whose maximum is in each cell (total {int(counts.sum())})")
        h = overlay_cells(axes[0], img, counts, *rf, **kw) if rf is not None else overlay(axes[0], img, counts, **kw)
        fig.colorbar(h, ax=axes[0], fraction=0.035, pad=0.02, label="number of channels")
    ax = axes[-1]
    _image_axes(ax, im, f"arg-max of {len(centers)} channels")
    colors = _point_colors(len(centers))
    if boxes is not None:
        draw_boxes(ax, np.asarray(boxes, float).reshape(-1, 4), colors=colors, linewidth=1.5)
    for i, (x, y) in enumerate(centers):
        ax.plot(x, y, "o", ms=9, mec="white", mew=1.5, color=colors[i])
        if labels is not None:
            ax.annotate(labels[i], (x, y), xytext=(5, -7), textcoords="offset points", color="white",
                        fontsize=8, bbox=dict(boxstyle="round,pad=0.15", fc=colors[i], ec="none", alpha=0.85))
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def show_receptive_field(img, heat, center, theory_box, boxes: dict | None = None,
                         title: str = "Receptive field of one feature-map cell"):
    """The gradient map of one activation over the photo with its receptive-field boxes (01_mac).

    ``heat`` (H, W) is the input-gradient magnitude (the effective receptive field),
    ``center`` the pixel ``(x, y)`` of the cell, ``theory_box`` its theoretical receptive
    field ``(x, y, w, h)`` (clipped to the image), ``boxes`` more ``{label: box}`` to draw
    (e.g. boxes holding 50 % and 90 % of the gradient mass).
    """
    from matplotlib.patches import Rectangle

    plt = pyplot()
    heat = heat.detach().cpu().float().numpy() if isinstance(heat, torch.Tensor) else np.asarray(heat, float)
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    h = overlay(ax, img, np.sqrt(heat / max(heat.max(), 1e-12)), alpha=0.6, cmap="magma",
                title=title)
    fig.colorbar(h, ax=ax, fraction=0.035, pad=0.02, label="sqrt of |gradient| (normalised)")
    x, y, w, hh = theory_box
    ax.add_patch(Rectangle((x, y), w, hh, fill=False, edgecolor="white", linestyle="--", linewidth=2.5,
                           label=f"theoretical field, clipped ({w:.0f}x{hh:.0f} px)"))
    for (label, box), c in zip((boxes or {}).items(), ("cyan", "lime", "yellow", "orange")):
        bx, by, bw, bh = box
        ax.add_patch(Rectangle((bx, by), bw, bh, fill=False, edgecolor=c, linewidth=2,
                               label=f"{label} ({bw:.0f}x{bh:.0f} px)"))
    ax.plot(*center, "P", ms=12, color="white", mec="black", label="the cell's centre")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize=8, framealpha=0.9)
    fig.tight_layout()
    return fig


def show_correspondences(img_a, img_b, centers_a, centers_b, boxes_a=None, boxes_b=None,
                         labels: Sequence[str] | None = None, names: Sequence[str] = ("A", "B"),
                         title: str = "Implicit correspondences of the top MAC channels"):
    """Two photos side by side, a line from each channel's maximum in one to its maximum in the other.

    ``centers_a`` / ``centers_b`` (K, 2) pixel ``(x, y)``; optional (K, 4) boxes around
    them; ``labels`` one string per pair (e.g. channel and share of the similarity);
    ``names`` the two panels' image names. As in Figure 2 of Radenović, Tolias & Chum,
    TPAMI 2018 (01_mac).
    """
    from matplotlib.patches import ConnectionPatch

    plt = pyplot()
    ia, ib = to_numpy_image(img_a), to_numpy_image(img_b)
    ca, cb = np.asarray(centers_a, float).reshape(-1, 2), np.asarray(centers_b, float).reshape(-1, 2)
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.8))
    _image_axes(a, ia, f"image {names[0]}")
    _image_axes(b, ib, f"image {names[1]}")
    colors = _point_colors(len(ca))
    for ax, boxes in ((a, boxes_a), (b, boxes_b)):
        if boxes is not None:
            draw_boxes(ax, np.asarray(boxes, float).reshape(-1, 4), colors=colors, linewidth=1.5)
    for i in range(len(ca)):
        a.plot(*ca[i], "o", ms=9, mec="white", mew=1.5, color=colors[i],
               label=None if labels is None else labels[i])
        b.plot(*cb[i], "o", ms=9, mec="white", mew=1.5, color=colors[i])
        fig.add_artist(ConnectionPatch(xyA=tuple(ca[i]), coordsA=a.transData, xyB=tuple(cb[i]),
                                       coordsB=b.transData, color=colors[i], linewidth=1.8, alpha=0.9))
    if labels is not None:
        a.legend(loc="lower left", fontsize=8, framealpha=0.85)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
