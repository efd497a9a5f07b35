"""Pictures for the notebooks: activations over the photo, result grids, masks; the helpers every figure shares.

Every function draws on matplotlib axes it creates (or is given) and returns the figure,
with a title and labelled axes, so a notebook cell is one call. Where MAC looks (01) is drawn
by :mod:`retrieval_lib.book.viz_mac`, R-MAC's regions (04) by :mod:`retrieval_lib.book.viz_regions`.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from .widget_check import check_controls

__all__ = ["pyplot", "to_numpy_image", "overlay", "draw_heat", "show_fmap_grid", "show_ranked", "fmap_to_image_box",
           "draw_boxes", "show_ap_trapezoids", "show_images", "show_two_rankings", "show_gem_view", "live_figure"]


def pyplot():
    """matplotlib's pyplot, imported on first use: only figures need it, and it is slow to load."""
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
    return draw_heat(ax, im, heat, (0, W, H, 0), alpha, cmap, title)


def draw_heat(ax, im, heat, heat_extent, alpha, cmap, title):
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
    plt = pyplot()
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
    plt = pyplot()
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

    cmap = pyplot().get_cmap("tab10")
    for i, (x, y, w, h) in enumerate(boxes):
        c = colors[i] if colors is not None else cmap((label_levels[i] if label_levels is not None else i) % 10)
        ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor=c, linewidth=linewidth))


def show_ap_trapezoids(ranks_of_positives, n_pos: int, title: str = "Average precision as an area"):
    """The precision-recall curve of one query and the trapezoids whose area is its AP (00_pipeline).

    ``ranks_of_positives`` are the 0-based ranks ``r_j`` of the retrieved positives (junk
    already removed), ``n_pos`` the number of positives. Trapezoid ``j`` spans recall
    ``j/n_pos .. (j+1)/n_pos`` with precision ``j/r_j`` (1 when ``r_j = 0``) on its left and
    ``(j+1)/(r_j+1)`` on its right, as in the revisited Oxford/Paris ``compute_map``; the
    dots are the precision at each hit, whose mean is the "textbook" AP.
    """
    from matplotlib.patches import Polygon

    plt = pyplot()
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
    plt = pyplot()
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
    plt = pyplot()
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


def show_gem_view(images: Sequence, maps: Sequence, titles: Sequence[str], ps, curves: dict, p: float,
                  title: str = "Where GeM looks, and what it does to similarity"):
    """One panel per image with its GeM contribution map over it, then similarity curves.

    ``maps[k]`` is an ``(h, w)`` map (e.g. :func:`retrieval_lib.book.sweeps.gem_contributions`)
    drawn over ``images[k]``; the last panel plots ``curves`` (``{label: (n,) values}``)
    against ``ps`` on a log axis, with a vertical line at the current ``p``. Used by the
    ``p`` slider of ``03_gem``.
    """
    plt = pyplot()
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
            pyplot().show()

    for w in controls.values():
        w.observe(redraw, names="value")
    check_controls(draw, controls)  # only when RETRIEVAL_WIDGET_CHECK names a file (headless test runs)
    return VBox([*controls.values(), out])
