"""The plumbing of ``notebooks/08_whitening.ipynb``: training descriptors, the whitenings it
compares, mAP against output dimension and bytes, Mahalanobis distances and image patches.

* :func:`training_descriptors` -- descriptors of the training side of the honest split
  and of augmented views of it (the data every whitening here is learned from);
* :func:`learn_whitenings` -- none / PCA / PCA + shrinkage / partial / ZCA / Lw / Lw +
  shrinkage, with the shrinkage given relative to the mean eigenvalue;
* :func:`evaluate_descriptors`, :func:`sweep_dims`, :func:`sweep_codecs` -- held-out mAP and
  per-query APs (for the paired bootstrap) per output dimension or per codec;
* :func:`mahalanobis_sq` -- ``(x - y)^T C^-1 (x - y)``, the reference for "Euclidean after
  whitening equals Mahalanobis before";
* :func:`image_patches`, :func:`zca_filter_image`, :func:`show_whitened_patches` -- the
  picture of PCA- and ZCA-whitened image patches;
* :func:`show_whitening_2d` -- whitening on a cloud of 2-D points, PCA against ZCA;
* :func:`plot_map_vs_dim`, :func:`plot_map_vs_bytes` -- the two figures of the notebook;
* :func:`matching_pairs` -- Lw's training pairs; the in-domain N-sweep of section 5 lives in
  :mod:`retrieval_lib.book.whitening_indomain`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from retrieval_lib.engine.extract import extract_fmaps, pool_fmaps
from retrieval_lib.data.views import make_views
from retrieval_lib.layers.whitening import covariance_spectrum, learned_whitening, pca_whitening, zca_whitening
from retrieval_lib.search.compare import paired_comparison
from retrieval_lib.search.compress import compressed_pair
from retrieval_lib.search.evaluate import headline, query_aps
from retrieval_lib.search.nearest import rank_database

__all__ = ["training_descriptors", "learn_whitenings", "WHITENING_NAMES", "evaluate_descriptors", "sweep_dims",
           "sweep_codecs", "mahalanobis_sq", "image_patches", "zca_filter_image", "show_whitened_patches",
           "plot_map_vs_dim", "plot_map_vs_bytes", "comparison_rows", "show_whitening_2d", "matching_pairs"]

#: what each whitening of :func:`learn_whitenings` is, for tables and legends
WHITENING_NAMES = {
    "none": "none (raw descriptors)",
    "pca": "PCA whitening",
    "pca_shrink": "PCA whitening + shrinkage",
    "partial": "partial PCA whitening (power α)",
    "zca": "ZCA whitening (+ shrinkage)",
    "lw": "Lw (learned from pairs)",
    "lw_shrink": "Lw + shrinkage",
    "projection": "PCA projection, no whitening (α = 0)",
}


def training_descriptors(model, dataset, poolings: dict, n_views: int, image_size: int, seed: int = 0,
                         device=None, batch_size: int = 8, cache_dir=None, progress: bool = True,
                         views_dir=None):
    """Descriptors of ``dataset`` (the training side) and of ``n_views`` augmented views of each image.

    The views are :func:`~retrieval_lib.engine.views.make_views` files (crops, flips, colour,
    scale; no composites), extracted once through the feature cache. Returns
    ``(descs, views)``: ``{name: (N, D) L2-normalised}`` for every pooling of ``poolings``
    (``{name: pooling}``) and the :class:`~retrieval_lib.engine.views.ViewSet` (labels,
    kinds, source image of each row). ``cache_dir``: the feature cache; ``views_dir``: where
    the views' JPEGs go (default under :func:`~retrieval_lib.data.datasets.cache_root`).
    """
    views = make_views(dataset, n_views=n_views, n_composites=0, seed=seed, max_side=image_size,
                       cache_dir=views_dir, progress=progress)
    maps = extract_fmaps(model, views.images(), image_size=image_size, device=device, batch_size=batch_size,
                         cache_dir=cache_dir, progress=progress)
    return {name: pool_fmaps(maps, pool) for name, pool in poolings.items()}, views


def matching_pairs(labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Every unordered matching pair ``(q, p)``, ``q < p``, of images with the same label (Lw's training pairs)."""
    lab = torch.as_tensor(np.asarray(labels)).long()
    same = torch.triu(lab[:, None] == lab[None, :], diagonal=1)
    q, p = same.nonzero(as_tuple=True)
    if q.numel() == 0:
        raise ValueError("learn_whitenings: no two training images share a label, so Lw has no matching "
                         "pair to learn from; give groups of at least two images (or views)")
    return q, p


def learn_whitenings(X: torch.Tensor, labels, shrinkage: float, power: float) -> dict:
    """Every whitening the notebook compares, learned on training descriptors ``X`` (N, D).

    ``shrinkage`` is relative: PCA/ZCA add ``shrinkage * mean(eigenvalues of C)`` to every
    eigenvalue, Lw adds ``shrinkage * mean(eigenvalues of S)`` to the diagonal of its
    matching-pair covariance ``S``. Returns ``{name: Whitening}`` for

    * ``"projection"``: PCA with ``power = 0`` (rotation and truncation, no whitening), all D dims;
    * ``"pca"``: PCA whitening without shrinkage -- as many dims as the covariance's rank;
    * ``"pca_shrink"``: PCA whitening with shrinkage, all D dims;
    * ``"partial"``: PCA with ``power`` (eigenvalues to ``-power``), no shrinkage, rank dims;
    * ``"zca"``: ZCA whitening with shrinkage (full dimension only);
    * ``"lw"``, ``"lw_shrink"``: Lw from every matching pair of ``labels``, without / with shrinkage.

    The spectrum (:func:`~retrieval_lib.layers.whitening.covariance_spectrum`) is computed once;
    ``out["spectrum"]`` holds it.
    """
    sp = covariance_spectrum(X)
    s = float(shrinkage) * float(sp.eigvals.mean())
    rank = sp.rank
    return {
        "spectrum": sp,
        "projection": pca_whitening(sp, power=0.0),
        "pca": pca_whitening(sp, dim=rank),
        "pca_shrink": pca_whitening(sp, shrinkage=s),
        "partial": pca_whitening(sp, dim=rank, power=power),
        "zca": zca_whitening(sp, shrinkage=s),
        "lw": _lw(X, labels, 0.0),
        "lw_shrink": _lw(X, labels, shrinkage),
    }


def _lw(X: torch.Tensor, labels, shrinkage: float):
    """Lw from every matching pair of ``labels``, ``shrinkage`` relative to ``trace(S) / D``."""
    q, p = matching_pairs(labels)
    if not shrinkage:
        return learned_whitening(X, q, p)
    d = X[q].double() - X[p].double()
    return learned_whitening(X, q, p, shrinkage=float(shrinkage) * float(d.square().sum(1).mean()) / X.shape[1])


def evaluate_descriptors(benchmark, X: torch.Tensor, Q: Optional[torch.Tensor] = None) -> tuple[float, np.ndarray]:
    """``(headline mAP, per-query APs (n_queries,))`` of database ``X`` and queries ``Q`` (None: X)."""
    ranks = rank_database(X if Q is None else Q, X)
    return headline(benchmark.evaluate(ranks), benchmark.headline_key), query_aps(benchmark, ranks)


def sweep_dims(benchmark, X: torch.Tensor, whitening, dims: Sequence[int]) -> dict:
    """Held-out mAP of ``whitening.apply(X, d)`` for each ``d`` of ``dims`` it can give.

    Returns ``{"dims": [...], "mAP": [...], "aps": {d: (n_queries,)}}``; dims above the
    whitening's ``dim_out`` are left out.
    """
    out = {"dims": [], "mAP": [], "aps": {}}
    for d in sorted({int(d) for d in dims}):
        if d > whitening.dim_out:
            continue
        m, aps = evaluate_descriptors(benchmark, whitening.apply(X, dim=d))
        out["dims"].append(d)
        out["mAP"].append(m)
        out["aps"][d] = aps
    return out


def sweep_codecs(benchmark, X_train: torch.Tensor, X: torch.Tensor, codecs: dict) -> dict:
    """Fit each codec on ``X_train``, compress the database ``X`` and search it with uncompressed queries.

    ``codecs``: ``{key: codec}`` (:mod:`retrieval_lib.search.compress`). Returns ``{key:
    {"bytes": bytes per image, "mAP": ..., "aps": (n_queries,), "name": codec.name}}``.
    """
    out = {}
    for key, codec in codecs.items():
        Xc, Qc = compressed_pair(codec.fit(X_train), X)
        m, aps = evaluate_descriptors(benchmark, Xc, Qc)
        out[key] = {"bytes": codec.bytes_per_image, "mAP": m, "aps": aps, "name": codec.name}
    return out


def comparison_rows(aps: dict, ref: str, names: dict, groups=None) -> tuple[list, dict]:
    """Rows ``[name, mAP, Δ vs ref, interval low, high, wins, losses, beyond the noise?]`` and the comparisons.

    ``aps``: ``{key: (n_queries,)}``; each key other than ``ref`` is compared with ``ref`` by
    :func:`~retrieval_lib.search.compare.paired_comparison` (``groups``: one group label per
    query, to resample groups). Returns ``(rows, {key: comparison})``.
    """
    rows, cmps = [], {}
    for key, a in aps.items():
        if key == ref:
            continue
        c = paired_comparison(a, aps[ref], groups=groups)
        cmps[key] = c
        verdict = "identical" if c["identical"] else \
            ("better" if c["delta"] > 0 else "worse") if c["significant"] else "within the noise"
        rows.append([names.get(key, key), float(np.nanmean(a)), c["delta"], c["ci"][0], c["ci"][1], c["wins"],
                     c["losses"], verdict])
    return rows, cmps


def mahalanobis_sq(diff: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Squared Mahalanobis lengths ``d_i^T C^-1 d_i`` of the rows of ``diff`` (n, D), float64.

    Solved with ``torch.linalg.solve`` (no explicit inverse); ``C`` must be invertible
    (add a shrinkage ``s I`` when it is not).
    """
    d = diff.to(torch.float64)
    return (d * torch.linalg.solve(C.to(torch.float64), d.T).T).sum(dim=1)


def image_patches(images: Sequence, size: int = 8, n: int = 4000, seed: int = 0) -> torch.Tensor:
    """``n`` random ``size`` x ``size`` grey patches from PIL ``images``: (n, size*size) float64 in [0, 1]."""
    rng = np.random.default_rng(seed)
    greys = [np.asarray(im.convert("L"), dtype=np.float64) / 255.0 for im in images]
    greys = [g for g in greys if min(g.shape) >= size]
    if not greys:
        raise ValueError(f"image_patches: no image is at least {size} px on each side")
    which = rng.integers(0, len(greys), n)
    out = np.empty((n, size * size))
    for t, k in enumerate(which):
        g = greys[k]
        y, x = rng.integers(0, g.shape[0] - size + 1), rng.integers(0, g.shape[1] - size + 1)
        out[t] = g[y:y + size, x:x + size].ravel()
    return torch.from_numpy(out)


def zca_filter_image(image, whitening, size: int) -> np.ndarray:
    """The grey ``image`` ZCA-whitened patch by patch, keeping each patch's centre pixel.

    Row ``c`` (the centre pixel) of the ZCA matrix is a ``size`` x ``size`` filter, so this
    is one correlation of the image with it, minus ``P[c] . m`` (a constant). Returns (H', W').
    """
    g = torch.from_numpy(np.asarray(image.convert("L"), dtype=np.float64) / 255.0)
    c = (size // 2) * size + size // 2
    k = whitening.P[c].to(torch.float64).reshape(1, 1, size, size)
    out = torch.nn.functional.conv2d(g[None, None], k)[0, 0] - float(whitening.P[c].double() @ whitening.m.double())
    return out.numpy()


def show_whitened_patches(patches: torch.Tensor, pca, zca, size: int, image=None, n_show: int = 6,
                          title: str = "Image patches: raw, ZCA-whitened, PCA-whitened"):
    """Rows: raw patches, ZCA-whitened, PCA-whitened (each patch on its own colour scale); then
    the ZCA filter of the centre pixel, the first PCA directions and, with ``image``, the
    image ZCA-whitened (:func:`zca_filter_image`). Returns the figure."""
    import matplotlib.pyplot as plt

    cols = max(n_show, 5)
    fig, axes = plt.subplots(4, cols, figsize=(1.9 * cols, 8.2))
    Y = {"ZCA-whitened": (patches - zca.m) @ zca.P.T, "PCA-whitened": (patches - pca.m) @ pca.P.T}
    rows = [("raw", patches), ("ZCA-whitened", Y["ZCA-whitened"]), ("PCA-whitened", Y["PCA-whitened"])]
    for r, (name, V) in enumerate(rows):
        for j in range(cols):
            ax = axes[r, j]
            ax.set_xticks([]), ax.set_yticks([])
            if j < n_show:
                ax.imshow(V[j].reshape(size, size).numpy(), cmap="gray")
                if j == 0:
                    ax.set_ylabel(name)
            else:
                ax.axis("off")
    c = (size // 2) * size + size // 2
    panels = [("ZCA filter of the centre pixel", zca.P[c])] + \
        [(f"PCA direction {k + 1}", pca.P[k] / pca.P[k].norm()) for k in range(3)]
    for j, (name, v) in enumerate(panels):
        axes[3, j].imshow(v.reshape(size, size).numpy(), cmap="RdBu_r")
        axes[3, j].set_title(name, fontsize=8)
        axes[3, j].set_xticks([]), axes[3, j].set_yticks([])
    for j in range(len(panels), cols):
        axes[3, j].axis("off")
    if image is not None:
        ax = axes[3, len(panels)]
        ax.axis("on")
        ax.imshow(zca_filter_image(image, zca, size), cmap="gray")
        ax.set_title("a photo, ZCA-whitened", fontsize=8)
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_map_vs_dim(ax, sweeps: dict, baseline: float, names: dict = WHITENING_NAMES, title: str = ""):
    """mAP against output dimension, one line per whitening (a single point for ZCA), the raw
    descriptors as a dashed line. ``sweeps``: ``{key: sweep_dims(...)}``."""
    for key, sw in sweeps.items():
        style = "o" if len(sw["dims"]) == 1 else ".-"
        ax.plot(sw["dims"], sw["mAP"], style, label=names.get(key, key), ms=8 if style == "o" else 6)
    ax.axhline(baseline, color="k", linestyle="--", label=names["none"])
    ax.set(xscale="log", xlabel="output dimension (log scale)", ylabel="held-out mAP", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_map_vs_bytes(ax, results: dict, title: str = "mAP vs bytes per image"):
    """mAP against bytes per image; ``results``: ``{family: [(bytes, mAP, label), ...]}``."""
    for family, pts in results.items():
        pts = sorted(pts)
        ax.plot([b for b, _, _ in pts], [m for _, m, _ in pts], "o-", label=family)
        for b, m, lab in pts:
            ax.annotate(lab, (b, m), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set(xscale="log", xlabel="bytes per image (log scale)", ylabel="held-out mAP", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def show_whitening_2d(n: int = 400, seed: int = 0):
    """A correlated 2-D Gaussian cloud, PCA-whitened and ZCA-whitened (same colours = same points).

    Returns ``(fig, clouds)`` with ``clouds = {"raw", "pca", "zca": (n, 2) float64}``, the
    whitened ones before L2 normalisation (identity covariance).
    """
    import matplotlib.pyplot as plt

    g = torch.Generator().manual_seed(seed)
    A = torch.tensor([[2.0, 0.0], [1.2, 0.5]], dtype=torch.float64)  # stretch and shear
    Xr = torch.randn(n, 2, generator=g, dtype=torch.float64) @ A.T + torch.tensor([3.0, 1.0], dtype=torch.float64)
    clouds = {"raw": Xr}
    for name, make in (("pca", pca_whitening), ("zca", zca_whitening)):
        W = make(Xr)
        clouds[name] = (Xr - W.m) @ W.P.T
    colour = torch.atan2(*(Xr - Xr.mean(0)).T.flip(0)).numpy()  # angle of each raw point around the mean
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    titles = {"raw": "raw: correlated, unequal variances", "pca": "PCA-whitened: rotated onto the eigenvectors",
              "zca": "ZCA-whitened: closest to the raw cloud"}
    for ax, (name, Y) in zip(axes, clouds.items()):
        ax.scatter(Y[:, 0].numpy(), Y[:, 1].numpy(), c=colour, cmap="hsv", s=8)
        ax.set(title=titles[name], xlabel="coordinate 1", ylabel="coordinate 2", aspect="equal")
        ax.grid(alpha=0.3)
    fig.suptitle("Whitening 2-D points: both results have identity covariance; colour = angle of the raw point")
    fig.tight_layout()
    return fig, clouds
