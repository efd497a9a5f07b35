"""wGeM in the book: the figures of ``notebooks/05_wgem.ipynb`` around the learned mask.

The notebook's pieces live in the library: the layer in :mod:`retrieval_lib.layers.pooling`
(:class:`~retrieval_lib.layers.pooling.WGeM`), its closed-form derivatives in
:mod:`retrieval_lib.layers.grads`, the composites and the mask-in-a-box measures in
:mod:`retrieval_lib.data.composites`, and the validated training run in
:mod:`retrieval_lib.engine.validation`. Here, the two figures that show where the mask looks:

* :func:`show_mask_pair` -- a matching pair with the mask before and after training;
* :func:`show_composite_masks` -- composites with the pasted box and the mask before/after.
"""
from __future__ import annotations

from typing import Sequence

from retrieval_lib.book.viz import overlay

__all__ = ["show_mask_pair", "show_composite_masks"]


def _masked_overlay(ax, img, mask, vmax: float, title: str):
    handle = overlay(ax, img, mask, alpha=0.55, cmap="magma", title=title)
    handle.set_clim(0.0, vmax)
    return handle


def show_mask_pair(images: Sequence, before: Sequence, after: Sequence, titles: Sequence[str], title: str):
    """One matching pair, each image with wGeM's mask before and after training: 1 x 4 panels.

    ``images``: the two PIL images as the network sees them; ``before``, ``after``: their
    masks ``(h, w)``. All four panels share one colour scale (0 to the largest weight shown),
    so the uniform mask before training reads as the flat level ``1 / (h w)``. Returns the figure.
    """
    import matplotlib.pyplot as plt

    vmax = max(float(m.max()) for m in list(before) + list(after))
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.9))
    panels = [(0, before[0], "before"), (0, after[0], "after"), (1, before[1], "before"), (1, after[1], "after")]
    for ax, (k, mask, when), t in zip(axes, panels, titles):
        handle = _masked_overlay(ax, images[k], mask, vmax, t)
    fig.colorbar(handle, ax=axes, fraction=0.015, label="mask weight ω")
    fig.suptitle(title)
    return fig


def show_composite_masks(images: Sequence, boxes: Sequence, before: Sequence, after: Sequence,
                         titles_before: Sequence[str], titles_after: Sequence[str], title: str):
    """Composites with the pasted box (green) and wGeM's mask before (top row) and after
    training (bottom row), one colour scale per column. ``boxes`` ``(x0, y0, x1, y1)`` in the
    pixels of ``images``. Returns the figure."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(3.6 * n, 6.4), squeeze=False)
    for c in range(n):
        vmax = max(float(before[c].max()), float(after[c].max()))
        for r, (mask, t) in enumerate(((before[c], titles_before[c]), (after[c], titles_after[c]))):
            ax = axes[r, c]
            _masked_overlay(ax, images[c], mask, vmax, t)
            x0, y0, x1, y1 = boxes[c]
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="lime", linewidth=2))
            ax.title.set_fontsize(9)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
