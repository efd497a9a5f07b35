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
    return _draw_heat(ax, im, heat, (0, W, H, 0), alpha, cmap, title)


def _draw_heat(ax, im, heat, heat_extent, alpha, cmap, title):
    """The photo, a (h, w) map over it at ``heat_extent`` (nearest), axes in image pixels."""
    H, W = im.shape[:2]
    ax.imshow(im, extent=(0, W, H, 0))
    h = ax.imshow(heat, cmap=cmap, alpha=alpha, extent=heat_extent, interpolation="nearest")
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

    ``regions`` is the (R, 4) ``(x, y, w, h)`` tensor of :func:`retrieval_lib.layers.functional.rmac_regions`
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


def show_region_macs(vectors, labels: Sequence[str], top: int = 48,
                     title: str = "Region MAC vectors and their sum"):
    """Heat strips of descriptor vectors, one row each, on the channels that matter most.

    ``vectors`` is ``(R, C)`` (e.g. L2-normalised region MACs, then their normalised sum
    as the last row); channels are ordered by the last row, largest first, and the
    ``top`` first are shown, so one sees which regions bring which channels into the sum.
    Taught in ``notebooks/04_rmac.ipynb``.
    """
    plt = _plt()
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

    plt = _plt()
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


__all__ += ["show_region_macs", "show_region_levels"]


# ---------------------------------------------------------------- where MAC looks (01_mac)
def _point_colors(n: int):
    cmap = _plt().get_cmap("tab10")
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
    (:func:`retrieval_lib.book.explain.receptive_field`): cell ``(r, c)`` becomes a
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
    return _draw_heat(ax, im, heat, (x0, x1, y1, y0), alpha, cmap, title)


def show_argmax(img, centers, boxes=None, labels: Sequence[str] | None = None, count_map=None,
                rf=None, title: str = "Where the MAC maxima sit"):
    """Arg-max locations of channels drawn on the photo (01_mac).

    ``centers`` (K, 2) pixel ``(x, y)`` of each channel's maximum (e.g. the receptive-field
    centres from :func:`retrieval_lib.book.explain.cell_centers`), ``boxes`` optional (K, 4)
    ``(x, y, w, h)`` around them, ``labels`` one string per point. With ``count_map``
    (h, w), a first panel shows how many channels have their maximum in each cell, drawn
    with :func:`overlay_cells` when ``rf = (rf_y, rf_x)`` is given (else stretched).
    """
    plt = _plt()
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

    plt = _plt()
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

    plt = _plt()
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


__all__ += ["overlay_cells", "show_argmax", "show_receptive_field", "show_correspondences"]


def show_ap_trapezoids(ranks_of_positives, n_pos: int, title: str = "Average precision as an area"):
    """The precision-recall curve of one query and the trapezoids whose area is its AP (00_pipeline).

    ``ranks_of_positives`` are the 0-based ranks ``r_j`` of the retrieved positives (junk
    already removed), ``n_pos`` the number of positives. Trapezoid ``j`` spans recall
    ``j/n_pos .. (j+1)/n_pos`` with precision ``j/r_j`` (1 when ``r_j = 0``) on its left and
    ``(j+1)/(r_j+1)`` on its right, as in the revisited Oxford/Paris ``compute_map``; the
    dots are the precision at each hit, whose mean is the "textbook" AP.
    """
    from matplotlib.patches import Polygon

    plt = _plt()
    r = np.asarray(ranks_of_positives, float)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    total = 0.0
    for j, rj in enumerate(r):
        p0 = 1.0 if rj == 0 else j / rj
        p1 = (j + 1) / (rj + 1)
        x0, x1 = j / n_pos, (j + 1) / n_pos
        total += 0.5 * (p0 + p1) * (x1 - x0)
        ax.add_patch(Polygon([(x0, 0), (x0, p0), (x1, p1), (x1, 0)], closed=True, alpha=0.35,
                             facecolor="tab:blue", edgecolor="tab:blue"))
        ax.plot([x0, x1], [p0, p1], "-", color="tab:blue")
        ax.plot(x1, p1, "o", color="tab:red", zorder=3)
        ax.annotate(f"r={int(rj)}", (x1, p1), xytext=(3, 5), textcoords="offset points", fontsize=8)
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(f"{title}: shaded area = {total:.4f}")
    fig.tight_layout()
    return fig


__all__ += ["show_ap_trapezoids"]


def _frame(ax, color, width: float = 5):
    for side in ax.spines.values():
        side.set_edgecolor(color)
        side.set_linewidth(width)


def show_images(images: Sequence, titles: Sequence[str] | None = None, title: str = "Images",
                cols: int | None = None, colors: Sequence | None = None, size: float = 2.4):
    """A grid of images with a title each (and an optional coloured frame each).

    ``images`` are PIL images, arrays or tensors (see :func:`to_numpy_image`); ``cols``
    defaults to all in one row. Returns the figure. Used by ``02_spoc`` (the queries SPoC
    wins and loses against MAC).
    """
    plt = _plt()
    n = len(images)
    if n == 0:
        raise ValueError("show_images: no images to show")
    cols = n if cols is None else max(1, min(int(cols), n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, (size + 0.5) * rows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k >= n:
            ax.axis("off")
            continue
        ax.imshow(to_numpy_image(images[k]))
        ax.set_xticks([])
        ax.set_yticks([])
        if titles is not None:
            ax.set_title(titles[k], fontsize=9)
        if colors is not None and colors[k] is not None:
            _frame(ax, colors[k])
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def show_two_rankings(query, rows: Sequence[tuple], title: str = "One query, two descriptors"):
    """The query, then one row of ranked results per descriptor, frames marking right/wrong.

    ``rows`` is a list of ``(label, results, correct, scores)``: ``results`` a list of images,
    ``correct`` booleans (green / red frame, ``None`` grey), ``scores`` similarities or
    ``None``. The first column holds the query in every row. Used by ``02_spoc``.
    """
    plt = _plt()
    if not rows:
        raise ValueError("show_two_rankings: give at least one (label, results, correct, scores) row")
    k = max(len(r[1]) for r in rows)
    fig, axes = plt.subplots(len(rows), k + 1, figsize=(2.2 * (k + 1), 2.5 * len(rows)), squeeze=False)
    for r, (label, results, correct, scores) in enumerate(rows):
        axes[r, 0].imshow(to_numpy_image(query))
        axes[r, 0].set_title("query", fontsize=9)
        axes[r, 0].set_ylabel(label, fontsize=10)
        for c in range(k):
            ax = axes[r, c + 1]
            if c >= len(results):
                ax.axis("off")
                continue
            ax.imshow(to_numpy_image(results[c]))
            ok = None if correct is None else correct[c]
            color = {True: "tab:green", False: "tab:red"}.get(ok, "0.6")
            _frame(ax, color)
            text = f"#{c + 1}" + (f" s={scores[c]:.3f}" if scores is not None else "")
            ax.set_title(text, fontsize=9, color=color)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title)
    fig.tight_layout()
    return fig


__all__ += ["show_images", "show_two_rankings"]


def show_gem_view(images: Sequence, maps: Sequence, titles: Sequence[str], ps, curves: dict, p: float,
                  title: str = "Where GeM looks, and what it does to similarity"):
    """One panel per image with its GeM contribution map over it, then similarity curves.

    ``maps[k]`` is an ``(h, w)`` map (e.g. :func:`retrieval_lib.book.sweeps.gem_contributions`)
    drawn over ``images[k]``; the last panel plots ``curves`` (``{label: (n,) values}``)
    against ``ps`` on a log axis, with a vertical line at the current ``p``. Used by the
    ``p`` slider of ``03_gem``.
    """
    plt = _plt()
    n = len(images)
    if n == 0 or len(maps) != n or len(titles) != n:
        raise ValueError("show_gem_view: give as many maps and titles as images (at least one)")
    fig, axes = plt.subplots(1, n + 1, figsize=(3.4 * (n + 1), 3.3))
    for ax, img, heat, t in zip(axes, images, maps, titles):
        overlay(ax, img, heat, alpha=0.55, title=t)
    ax = axes[-1]
    for label, values in curves.items():
        ax.plot(ps, values, marker=".", label=label)
    ax.axvline(p, color="k", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("GeM exponent p (log scale)")
    ax.set_ylabel("cosine similarity to the query")
    ax.set_title(f"similarity vs p (now p = {p:.2f})")
    ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


__all__ += ["show_gem_view"]


def live_figure(draw, **controls):
    """Widgets that redraw ``draw(**values)`` below them whenever one of them changes.

    ``controls`` maps ``draw``'s keyword arguments to ipywidgets (``IntSlider``, ...).
    Each must carry a ``description`` that says what it changes: the parameter's name
    and its unit or meaning, e.g. ``IntSlider(..., description="L (levels)")`` or
    ``"p (GeM exponent)"``; it is shown in full (not cut to the default label width).
    Unlike ``ipywidgets.interactive``, ``draw`` is *not* called when the widgets are built:
    the notebook calls it once itself, so the static figure is an ordinary cell output
    (what papermill, nbconvert and GitHub show) and a headless run never renders a figure
    inside an output widget, on which papermill can wait until its timeout. Returns the
    ``VBox`` to ``display``.

    Raises:
        ValueError: no control, or a control without a description.
    """
    from ipywidgets import Output, VBox

    if not controls:
        raise ValueError("live_figure: give at least one control, e.g. live_figure(draw, k=IntSlider(...))")
    for name, w in controls.items():
        if not str(getattr(w, "description", "") or "").strip():
            raise ValueError(f"live_figure: the control for {name!r} ({type(w).__name__}) has no description; say "
                             f"what it changes with the parameter's name and unit, e.g. "
                             f"{type(w).__name__}(..., description=\"{name} (unit)\")")
        if hasattr(w, "style") and hasattr(w.style, "description_width"):
            w.style.description_width = "initial"  # the whole description, not the first ~12 characters
    out = Output()

    def redraw(_change=None):
        with out:
            out.clear_output(wait=True)
            draw(**{name: w.value for name, w in controls.items()})
            _plt().show()

    for w in controls.values():
        w.observe(redraw, names="value")
    return VBox([*controls.values(), out])


__all__ += ["live_figure"]
