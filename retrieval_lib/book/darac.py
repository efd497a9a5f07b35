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
* :func:`frozen_vectors` -- each map's vectors computed once, for training a head on frozen maps;
* :func:`slot_coverage` -- where pasted objects lie, per region slot (beside the learned weights);
* :func:`choose_by_validation` -- the loss that validates best, ties said to be ties;
  :func:`paired_rows` -- the comparisons a section tabulates;
  :func:`training_diagnosis` / :func:`not_beaten_note` -- the measured reasons a trained head did not beat
  its start; :func:`rank_correlation` -- do learned slot weights follow the objects' coverage?
* figures: :func:`show_region_weights` (weights drawn on the region grid),
  :func:`show_contributions` (what each of the 42 vectors adds), :func:`show_size_study`,
  :func:`show_heldout`.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from retrieval_lib.layers.aggregation import (DARAC, N_DARAC_REGIONS, TrainableRMAC, darac_regions, darac_slots,
                                              darac_vectors)
from retrieval_lib.layers.functional import l2n, rmac, rmac_regions
from retrieval_lib.search.compare import paired_comparison
from retrieval_lib.search.verdict import signed

__all__ = ["fixed_poolings", "frozen_vectors", "grid_class", "layout_checks", "mean_contributions", "slot_coverage", "choose_by_validation",
           "paired_rows", "training_diagnosis", "not_beaten_note", "rank_correlation", "show_region_weights", "show_contributions", "show_size_study", "show_heldout",
           "SIZE_STUDY"]

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
def frozen_vectors(layer, fmaps: Sequence[torch.Tensor]) -> list:
    """The vectors ``layer`` pools, computed once per map: a list of ``(R, C)`` tensors, one per ``(C, h, w)`` map.

    :class:`DARAC`: its 42 vectors (:meth:`DARAC.vectors`); :class:`TrainableRMAC`: its region
    vectors (:meth:`TrainableRMAC.region_vectors`, ``R`` depends on the map's shape). Neither
    depends on the layer's parameters, so with a frozen backbone a head can train and be
    measured on these (the layer takes them in place of the maps, the same descriptors) without
    pooling every map again at every step. Maps of one shape are computed in one batch.
    """
    if isinstance(layer, DARAC):
        fn = layer.vectors
    elif isinstance(layer, TrainableRMAC):
        fn = layer.region_vectors
    else:
        raise TypeError(f"frozen_vectors: give a DARAC or a TrainableRMAC layer, got {type(layer).__name__}")
    groups: dict = {}
    for i, f in enumerate(fmaps):
        groups.setdefault(tuple(f.shape), []).append(i)
    out = [None] * len(fmaps)
    for idx in groups.values():
        V = fn(torch.stack([fmaps[i] for i in idx]))  # (b, R, C)
        for k, i in enumerate(idx):
            out[i] = V[k]
    return out


@torch.no_grad()
def mean_contributions(layer: DARAC, fmaps: Sequence[torch.Tensor]) -> np.ndarray:
    """The mean over maps of :meth:`DARAC.contributions`: ``(43,)`` (42 vectors, then the biases)."""
    layer = layer.eval()
    rows = [layer.contributions(f[None].to(layer.weight.device))[0].cpu() for f in fmaps]
    return torch.stack(rows).mean(dim=0).double().numpy()


def slot_coverage(boxes, sizes, long_side: int = 16) -> np.ndarray:
    """How much of each of DARAC's 21 region slots the pasted object covers, mean over images: ``(21,)``.

    ``boxes`` ``(N, 4)``: ``(x0, y0, x1, y1)`` in each image's pixels; ``sizes`` ``(N, 2)``:
    ``(width, height)``. Each image is read as its feature map would be: a portrait image
    transposed (as :func:`darac_regions` reads portrait maps), its slots those of a map of
    ``long_side`` cells by ``max(1, round(long_side * short / long))``, in fractions of the
    image. Slot ``k``'s value is the share of its area inside the box (1: the slot holds only
    the object, 0: only background), averaged over the images. Taught in ``06_darac``.
    """
    B = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    S = np.asarray(sizes, dtype=np.float64).reshape(-1, 2)
    if len(B) != len(S) or len(B) == 0:
        raise ValueError(f"slot_coverage: give one (width, height) per box and at least one box, got {len(B)} "
                         f"boxes and {len(S)} sizes")
    if not bool((S > 0).all()):
        raise ValueError("slot_coverage: every image size must be positive")
    out = np.zeros(N_DARAC_REGIONS)
    for (x0, y0, x1, y1), (W, H) in zip(B, S):
        if H > W:  # portrait: read transposed, as the layout does
            x0, y0, x1, y1, W, H = y0, x0, y1, x1, H, W
        h = max(1, int(round(long_side * H / W)))
        r = darac_regions(h, long_side).numpy().astype(np.float64)  # (21, 4) (x, y, w, h) in cells
        sx0, sy0 = r[:, 0] / long_side, r[:, 1] / h
        sx1, sy1 = (r[:, 0] + r[:, 2]) / long_side, (r[:, 1] + r[:, 3]) / h
        ix = np.clip(np.minimum(sx1, x1 / W) - np.maximum(sx0, x0 / W), 0, None)
        iy = np.clip(np.minimum(sy1, y1 / H) - np.maximum(sy0, y0 / H), 0, None)
        out += ix * iy / ((sx1 - sx0) * (sy1 - sy0))
    return out / len(B)


def choose_by_validation(val: Mapping[str, float], default: str, tol: float = 1e-12) -> tuple:
    """The key of ``val`` (``{name: validation mAP}``) that validates best, and one sentence why.

    Ties (within ``tol`` of the best) are said to be ties: then ``default`` is kept when it
    is among them (else the first tied name), and the sentence says that validation did not
    choose. Returns ``(name, sentence)``.
    """
    if not val:
        raise ValueError("choose_by_validation: no validation mAP given")
    if default not in val:
        raise ValueError(f"choose_by_validation: the default {default!r} is not one of {sorted(val)}")
    best = max(val.values())
    tied = [k for k, v in val.items() if v >= best - tol]
    listing = ", ".join(f"{k} {v:.4f}" for k, v in val.items())
    if len(tied) == 1:
        return tied[0], f"{tied[0]} validates best (validation mAP at each kept epoch: {listing})"
    kept = default if default in tied else tied[0]
    return kept, (f"{', '.join(tied)} tie on validation ({listing}): validation does not choose between them, so "
                  f"{kept} is kept{' (the default)' if kept == default else ''}")


def paired_rows(aps: Mapping, pairs: Sequence[tuple], names: Mapping, groups=None, seed: int = 0) -> tuple:
    """A table of paired comparisons: ``(header, rows, {(a, b): comparison})``.

    For each ``(a, b)`` in ``pairs`` (keys of ``aps``, ``{key: (n_queries,) APs}``), head ``a``
    minus head ``b`` by :func:`~retrieval_lib.search.compare.paired_comparison` (``groups``:
    one group label per query, to resample groups); a row gives both names (``names[key]``),
    ``a``'s mAP, the difference, its 95 % interval, wins and losses, and whether the interval
    excludes 0 ("identical" when every query ties). For the comparisons a section tabulates
    rather than writes out.
    """
    header = ["head", "minus", "mAP", "difference", "95 % interval", "wins", "losses", "beyond the noise?"]
    rows, cmps = [], {}
    for a, b in pairs:
        c = paired_comparison(aps[a], aps[b], seed=seed, groups=groups)
        cmps[(a, b)] = c
        beyond = "identical" if c["identical"] else "yes" if c["significant"] else "no"
        rows.append([names[a], names[b], float(np.nanmean(aps[a])), signed(c["delta"]),
                     f"{signed(c['ci'][0])} … {signed(c['ci'][1])}", c["wins"], c["losses"], beyond])
    return header, rows, cmps


def training_diagnosis(record: Mapping, cmp: Mapping, moved: float, moved_what: str, small: float = 0.01) -> list:
    """Why a trained head did not beat its untrained start on held-out data, from the run's own numbers.

    ``record``: :func:`~retrieval_lib.engine.validation.train_with_validation`'s record;
    ``cmp``: the held-out :func:`~retrieval_lib.search.compare.paired_comparison` of the
    trained head minus its start; ``moved``: how far training moved the head (e.g. the
    largest change of a DARAC weight, or :meth:`TrainableRMAC.relative_change`), named by
    ``moved_what``. Returns the sentences that apply, in this order: validation saturated
    before training, or flat at every epoch; no trained epoch kept; the head barely moved
    (``moved < small``); identical held-out rankings; validation improved but the held-out
    objects did not; a gain within the noise.
    """
    val = list(record["val_mAP"])
    kept = int(record["kept_epoch"])
    out = []
    if record.get("saturated"):
        out.append(f"validation was saturated before training (mAP {val[0]:.3f}), so it could not choose an epoch")
    elif max(val) - min(val) <= 1e-12:
        out.append(f"the validation mAP never changed ({val[0]:.4f} at every epoch): validation could not tell the "
                   "heads apart")
    if kept == 0:
        out.append(f"no trained epoch validated as well as the untrained head (validation mAP {val[0]:.4f} at "
                   f"epoch 0, at most {max(val[1:], default=float('nan')):.4f} after), so the untrained head was kept")
    if moved < small:
        out.append(f"training barely moved the head ({moved_what} {moved:.2g})")
    if cmp.get("identical"):
        out.append(f"the trained and the untrained head rank every one of the {cmp['n']} held-out queries alike")
    if kept > 0 and val[kept] > val[0] and cmp["delta"] <= 0:
        out.append(f"validation improved ({val[0]:.3f} -> {val[kept]:.3f}) but the held-out objects did not "
                   f"({signed(cmp['delta'])}): what helped the validation objects did not carry over")
    if cmp["delta"] > 0 and not cmp["significant"]:
        n = cmp.get("n_groups") or cmp["n"]
        out.append(f"the gain {signed(cmp['delta'])} is within the noise of {n} "
                   f"{'groups' if cmp.get('n_groups') else 'queries'} (interval {signed(cmp['ci'][0])} … "
                   f"{signed(cmp['ci'][1])})")
    return out


def not_beaten_note(label: str, record: Mapping, cmp: Mapping, moved: float, moved_what: str) -> str:
    """Markdown: empty when the trained head beat its start beyond the noise (``cmp``: trained minus
    start), else a sentence naming the measured causes (:func:`training_diagnosis`)."""
    if cmp["significant"] and cmp["delta"] > 0:
        return ""
    causes = training_diagnosis(record, cmp, moved, moved_what) or [
        "none of the listed causes applies: the head moved and validation chose a trained epoch, but the "
        "held-out difference is not a gain"]
    return f"**{label} did not beat its start on the held-out data.** Measured causes: " + "; ".join(causes) + "."


def rank_correlation(a, b) -> float:
    """Spearman's rank correlation of two equal-length vectors (Pearson's correlation of their ranks; ties
    get distinct ranks in order of position). NaN when either vector is constant."""
    a, b = np.asarray(a, dtype=np.float64).reshape(-1), np.asarray(b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape or a.size < 2:
        raise ValueError(f"rank_correlation: give two vectors of the same length >= 2, got {a.shape} and {b.shape}")
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    ra, rb = np.argsort(np.argsort(a, kind="stable")), np.argsort(np.argsort(b, kind="stable"))
    return float(np.corrcoef(ra, rb)[0, 1])


# --------------------------------------------------------------------------- figures
def show_region_weights(weights, hw=(12, 16), title: str = "Weight of each region slot",
                        row_names=("average", "max"), cmap: str = "viridis", label: str = "weight"):
    """Values of DARAC's region slots drawn on its grid: one row per 21 values x 5 panels.

    Panels 1-4: the whole-map slot and levels 1-3, each slot drawn as one tile at its place
    in the landscape layout (level ``l``: ``l`` rows x ``l + 1`` columns of squares), coloured
    and labelled with its value. Panel 5: on an ``h x w`` map, each cell's mean value over
    the squares of levels 1-3 that cover it (1 everywhere for weights of 1, as untrained):
    where on the image the weight lands. One colour scale for all panels. ``weights``:
    ``(21 k,)`` for the ``k`` ``row_names``, slot order of :func:`darac_regions` -- DARAC's
    42 vector weights (21 average, then 21 max; the default rows), or one row of 21 values
    per slot such as :func:`slot_coverage`. ``label`` names the colour bar. Returns the figure.
    """
    import matplotlib.pyplot as plt

    w = np.asarray(weights, dtype=float).reshape(-1)
    row_names = tuple(row_names)
    if w.shape != (len(row_names) * N_DARAC_REGIONS,):
        raise ValueError(f"show_region_weights: give {len(row_names) * N_DARAC_REGIONS} values, 21 per row "
                         f"({', '.join(row_names)}), got {w.shape}")
    h_, w_ = (int(v) for v in hw)
    regions = darac_regions(h_, w_).tolist()
    per_cell = []
    for row in range(len(row_names)):
        acc, cover = np.zeros((h_, w_)), np.zeros((h_, w_))
        for k in range(1, N_DARAC_REGIONS):
            x0, y0, bw, bh = regions[k]
            acc[y0:y0 + bh, x0:x0 + bw] += w[row * N_DARAC_REGIONS + k]
            cover[y0:y0 + bh, x0:x0 + bw] += 1
        per_cell.append(acc / np.maximum(cover, 1))
    lo, hi = min(w.min(), min(m.min() for m in per_cell)), max(w.max(), max(m.max() for m in per_cell))
    mid, half = (lo + hi) / 2, max((hi - lo) / 2, 0.05)  # at least +-0.05: equal weights show as one colour
    norm = plt.Normalize(mid - half, mid + half)
    fig, axes = plt.subplots(len(row_names), 5, figsize=(19, 3.8 * len(row_names)), squeeze=False,
                             layout="constrained",  # no overlapping labels
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
                ax.set_ylabel(f"{name}{' vectors' if name in ('average', 'max') else ''}\nshort side")
            ax.set_title("whole map" if level == 0 else f"level {level}", fontsize=10)
        ax = axes[row, 4]
        im = ax.imshow(per_cell[row], cmap=cmap, norm=norm, extent=(0, w_, h_, 0))
        ax.set(xlabel="x (cells)", ylabel="y (cells)")
        ax.set_title(f"mean {label} of the squares over each cell", fontsize=10)
    fig.colorbar(im, ax=axes, fraction=0.02, label=label)
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
                 title: str, ylabel: str = "held-out mAP"):
    """Held-out mAP per head (bars) with the paired 95 % interval of each head minus ``baseline``
    drawn around the baseline's level (a bar whose whisker clears the dashed line differs beyond the noise).

    Each bar's value is written inside the bar, so it never meets a whisker, and the axis
    leaves room above the highest bar or whisker for the title."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.6))
    base = maps[list(names).index(baseline)]
    pos = np.arange(len(names))
    ax.bar(pos, maps, color=["tab:gray" if n == baseline else "tab:blue" for n in names])
    tops = list(maps)
    for p, m, (lo, hi) in zip(pos, maps, intervals):
        if lo is not None:
            ax.errorbar(p, base + (lo + hi) / 2, yerr=[[(hi - lo) / 2]], fmt="none", ecolor="black", capsize=5)
            tops.append(base + hi)
        ax.text(p, m / 2, f"{m:.3f}", ha="center", va="center", fontsize=9, color="white", fontweight="bold")
    ax.axhline(base, color="gray", linestyle="--", linewidth=1)
    ax.set_xticks(pos)
    ax.set_xticklabels(names, rotation=20, ha="right", fontsize=9)
    ax.set(ylabel=ylabel, title=title)
    top = max(tops)
    ax.set_ylim(0, top + 0.12 * max(top, 0.1))
    fig.tight_layout()
    return fig
