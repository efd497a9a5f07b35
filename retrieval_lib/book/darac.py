"""Learned regional aggregation in the book: what ``notebooks/06_darac.ipynb`` needs around the heads.

The heads live in :mod:`retrieval_lib.layers.aggregation` (:class:`~retrieval_lib.layers.aggregation.DARAC`,
:class:`~retrieval_lib.layers.aggregation.TrainableRMAC`), the rank losses in
:mod:`retrieval_lib.layers.losses` (``smooth_ap_loss``, ``nra_like_loss``), trained as
:class:`~retrieval_lib.engine.objectives.RankLoss`. Here:

* :func:`fixed_poolings` -- global / regional x average / max / average+max, the six
  off-the-shelf poolings of DARAC's input-size study, each a DARAC with fixed vector weights;
* :func:`layout_checks` -- on real maps: untrained DARAC = the plain sum of its 42 vectors,
  max-only DARAC = R-MAC with the whole map (on the maps whose R-MAC grid is DARAC's
  layout, e.g. 4:3 to 16:9), and which shapes the maps have;
* figures: :func:`show_region_weights` (weights drawn on the region grid),
  :func:`show_contributions` (what each of the 42 vectors adds), :func:`show_size_study`,
  :func:`show_heldout`.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from retrieval_lib.layers.aggregation import DARAC, N_DARAC_REGIONS, darac_regions, darac_slots, darac_vectors
from retrieval_lib.layers.functional import l2n, rmac, rmac_regions

__all__ = ["fixed_poolings", "grid_class", "layout_checks", "mean_contributions", "show_region_weights",
           "show_contributions", "show_size_study", "show_heldout", "SIZE_STUDY"]

#: the six poolings of the input-size study: (regions, pooling) -> label
SIZE_STUDY = {("global", "avg"): "global average", ("global", "max"): "global max",
              ("global", "avg+max"): "global average+max", ("regional", "avg"): "regional average",
              ("regional", "max"): "regional max (R-MAC + whole map)",
              ("regional", "avg+max"): "regional average+max (untrained DARAC)"}


def _vector_weights(regions: str, pooling: str) -> torch.Tensor:
    slot = torch.ones(N_DARAC_REGIONS) if regions == "regional" else torch.eye(N_DARAC_REGIONS)[0]
    avg = slot if pooling in ("avg", "avg+max") else torch.zeros(N_DARAC_REGIONS)
    mx = slot if pooling in ("max", "avg+max") else torch.zeros(N_DARAC_REGIONS)
    return torch.cat([avg, mx])  # (42,)


def fixed_poolings() -> dict:
    """The six off-the-shelf poolings of the input-size study, ``{label: module}``.

    Each is ``l2n(sum_j w_j V_j)`` over DARAC's 42 vectors (:meth:`DARAC.set_vector_weights`):
    *global* uses only the whole-map slot, *regional* all 21 slots; *average*, *max* and
    *average+max* the average vectors, the max vectors or both. So global average is
    SPoC, global max is MAC, regional max is R-MAC with the whole map (where R-MAC's grid is the layout),
    global average+max is ``l2n(l2n(avg) + l2n(max))``, and regional average+max is the
    untrained DARAC. Exact on non-negative maps.
    """
    return {label: DARAC(kernels=1).set_vector_weights(_vector_weights(*key)).eval()
            for key, label in SIZE_STUDY.items()}


def grid_class(h: int, w: int) -> str:
    """How R-MAC's grid of an ``h x w`` map relates to DARAC's layout (:func:`darac_regions`).

    ``"R-MAC's grid"``: R-MAC gives 20 regions at ``L = 3`` and they are DARAC's slots 1-20
    (every map neither square nor longer than 1.8 : 1, e.g. all of 4:3 to 16:9);
    ``"square"``; ``"other"`` (longer than 1.8 : 1, or a short side under 4 cells).
    """
    if rmac_regions(h, w, 3).shape[0] == 20:
        return "R-MAC's grid"
    return "square" if h == w else "other"


@torch.no_grad()
def layout_checks(fmaps: Sequence[torch.Tensor], kernels: int = 16) -> dict:
    """On real maps ``(C, h, w)``, in float64: how exactly DARAC's two special cases hold.

    Returns ``{"plain_sum_max_abs_err"`` (untrained DARAC vs ``l2n`` of the plain sum of the
    42 vectors, every map), ``"rmac_max_abs_err"`` (DARAC with weight 1 on the max vectors
    and 0 on the average ones vs ``rmac(L=3, include_global=True)``, on the maps whose
    R-MAC grid is DARAC's layout; NaN when there is none), ``"rmac_gap_other_shapes"`` (the
    same gap on the other maps, where the grids differ; NaN when there is none),
    ``"shapes"`` ({:func:`grid_class`: count})}.
    """
    untrained = DARAC(kernels=kernels).double()
    max_only = DARAC(kernels=kernels).double().set_vector_weights([0.0] * 21 + [1.0] * 21)
    plain, inside, outside, shapes, groups = [], [], [], {}, {}
    for f in fmaps:
        groups.setdefault(tuple(f.shape), []).append(f)
    for shape, maps in groups.items():  # one batch per map size
        x = torch.stack(maps).double()  # (b, C, h, w)
        s = darac_vectors(x).sum(dim=1)
        plain.append(float((untrained(x) - l2n(s, eps=0.0)).abs().max()))
        cls = grid_class(*shape[-2:])
        shapes[cls] = shapes.get(cls, 0) + len(maps)
        gap = float((max_only(x) - rmac(x, L=3, include_global=True)).abs().max())
        (inside if cls == "R-MAC's grid" else outside).append(gap)
    return {"plain_sum_max_abs_err": max(plain), "rmac_max_abs_err": max(inside) if inside else float("nan"),
            "rmac_gap_other_shapes": max(outside) if outside else float("nan"), "shapes": shapes}


@torch.no_grad()
def mean_contributions(layer: DARAC, fmaps: Sequence[torch.Tensor]) -> np.ndarray:
    """The mean over maps of :meth:`DARAC.contributions`: ``(43,)`` (42 vectors, then the biases)."""
    layer = layer.eval()
    rows = [layer.contributions(f[None].to(layer.weight.device))[0].cpu() for f in fmaps]
    return torch.stack(rows).mean(dim=0).double().numpy()


# --------------------------------------------------------------------------- figures
def show_region_weights(weights, hw=(12, 16), title: str = "Weight of each region slot",
                        row_names=("average", "max"), cmap: str = "viridis"):
    """The 42 weights on DARAC's region grid: 2 rows (average, max vectors) x 5 panels.

    Panels 1-4: the whole-map slot and levels 1-3, each slot drawn as one tile at its place
    in the landscape layout (level ``l``: ``l`` rows x ``l + 1`` columns of squares), coloured
    and labelled with its weight. Panel 5: on an ``h x w`` map, each cell's mean weight over
    the squares of levels 1-3 that cover it (1 everywhere for weights of 1, as untrained):
    where on the image the weight lands. One colour scale for all panels. ``weights``:
    ``(42,)`` (21 average, then 21 max, slot order of :func:`darac_regions`). Returns the figure.
    """
    import matplotlib.pyplot as plt

    w = np.asarray(weights, dtype=float).reshape(-1)
    if w.shape != (2 * N_DARAC_REGIONS,):
        raise ValueError(f"show_region_weights: give 42 weights (21 average, 21 max), got {w.shape}")
    h_, w_ = (int(v) for v in hw)
    regions = darac_regions(h_, w_).tolist()
    per_cell = []
    for row in range(2):
        acc, cover = np.zeros((h_, w_)), np.zeros((h_, w_))
        for k in range(1, N_DARAC_REGIONS):
            x0, y0, bw, bh = regions[k]
            acc[y0:y0 + bh, x0:x0 + bw] += w[row * N_DARAC_REGIONS + k]
            cover[y0:y0 + bh, x0:x0 + bw] += 1
        per_cell.append(acc / np.maximum(cover, 1))
    lo, hi = min(w.min(), min(m.min() for m in per_cell)), max(w.max(), max(m.max() for m in per_cell))
    mid, half = (lo + hi) / 2, max((hi - lo) / 2, 0.05)  # at least +-0.05: equal weights show as one colour
    norm = plt.Normalize(mid - half, mid + half)
    fig, axes = plt.subplots(2, 5, figsize=(19, 7.6), squeeze=False, layout="constrained",  # no overlapping labels
                             gridspec_kw={"width_ratios": [1, 2, 3, 4, 4]})
    first = {0: 0, 1: 1, 2: 3, 3: 9}  # first slot of each level
    for row, name in enumerate(row_names):
        for level in range(4):
            ax = axes[row, level]
            rows_, cols_ = (1, 1) if level == 0 else (level, level + 1)
            tile = w[row * N_DARAC_REGIONS + first[level]: row * N_DARAC_REGIONS + first[level] + rows_ * cols_]
            tile = tile.reshape(rows_, cols_)
            ax.imshow(tile, cmap=cmap, norm=norm)
            for (r, c), v in np.ndenumerate(tile):
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=9, color="white" if norm(v) < 0.5 else "black")
            ax.set_xticks(range(cols_))
            ax.set_yticks(range(rows_))
            ax.set_xlabel("long side")
            if level == 0:
                ax.set_ylabel(f"{name} vectors\nshort side")
            ax.set_title("whole map" if level == 0 else f"level {level}", fontsize=10)
        ax = axes[row, 4]
        im = ax.imshow(per_cell[row], cmap=cmap, norm=norm, extent=(0, w_, h_, 0))
        ax.set(xlabel="x (cells)", ylabel="y (cells)")
        ax.set_title("mean weight of the squares over each cell", fontsize=10)
    fig.colorbar(im, ax=axes, fraction=0.02, label="weight")
    fig.suptitle(f"{title} (the slots of a {h_}x{w_}-cell map, landscape layout)")
    return fig


def show_contributions(shares: Mapping[str, np.ndarray], title: str = "What each of the 42 vectors adds"):
    """Bars of :func:`mean_contributions` per slot, one group of bars per layer, average and max side by side.

    ``shares``: ``{label: (43,)}``. Returns the figure (two panels: average vectors, max vectors;
    the biases' share is given in the legend).
    """
    import matplotlib.pyplot as plt

    names = darac_slots()
    x = np.arange(N_DARAC_REGIONS)
    width = 0.8 / max(1, len(shares))
    fig, axes = plt.subplots(2, 1, figsize=(15, 7), sharex=True)
    for k, (label, s) in enumerate(shares.items()):
        s = np.asarray(s, dtype=float)
        for row, ax in enumerate(axes):
            ax.bar(x + (k - (len(shares) - 1) / 2) * width, s[row * N_DARAC_REGIONS:(row + 1) * N_DARAC_REGIONS],
                   width, label=f"{label} (biases: {s[42]:+.3f})" if row == 0 else label)
    for ax, kind in zip(axes, ("average", "max")):
        ax.axhline(1 / 42, color="gray", linestyle="--", linewidth=1)
        ax.set_ylabel(f"share of the descriptor\n({kind} vectors)")
        ax.set_title(f"{kind} vectors of the 21 region slots (dashed: 1/42, an equal share)", fontsize=10)
    axes[0].legend(fontsize=8)
    axes[1].set_xticks(x)
    axes[1].set_xticklabels(names, rotation=60, fontsize=8)
    axes[1].set_xlabel("region slot (level, row, column in the landscape layout)")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def show_size_study(sizes, curves: Mapping[str, Sequence[float]], title: str, ylabel: str = "mAP"):
    """mAP against the input size (longer side, px), one line per pooling: global dashed, regional solid."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.6))
    colors = {"average": "tab:blue", "max": "tab:red", "average+max": "tab:green"}
    for label, values in curves.items():
        kind = "average+max" if "average+max" in label else "average" if "average" in label else "max"
        ax.plot(list(sizes), list(values), "--o" if label.startswith("global") else "-s", color=colors[kind],
                label=label)
    ax.set(xlabel="input size (longer side, px)", ylabel=ylabel, title=title)
    ax.set_xticks(list(sizes))
    ax.legend(fontsize=8)
    return fig


def show_heldout(names: Sequence[str], maps: Sequence[float], intervals: Sequence[tuple], baseline: str,
                 title: str):
    """Held-out mAP per head (bars) with the paired 95 % interval of each head minus ``baseline``
    drawn around the baseline's level (a bar whose whisker clears the dashed line differs beyond the noise)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.4))
    base = maps[list(names).index(baseline)]
    pos = np.arange(len(names))
    ax.bar(pos, maps, color=["tab:gray" if n == baseline else "tab:blue" for n in names])
    for p, m, (lo, hi) in zip(pos, maps, intervals):
        if lo is not None:
            ax.errorbar(p, base + (lo + hi) / 2, yerr=[[(hi - lo) / 2]], fmt="none", ecolor="black", capsize=5)
        ax.text(p, m + 0.005, f"{m:.3f}", ha="center", va="bottom", fontsize=9)
    ax.axhline(base, color="gray", linestyle="--", linewidth=1)
    ax.set_xticks(pos)
    ax.set_xticklabels(names, rotation=20, ha="right", fontsize=9)
    ax.set(ylabel="held-out mAP", title=title)
    ax.set_ylim(0, min(1.0, max(maps) * 1.2 + 0.02))
    fig.tight_layout()
    return fig
