"""The in-domain study of ``notebooks/08_whitening.ipynb`` (section 5): how many training vectors whitening needs.

The evaluated groups are dealt into folds of whole groups (:func:`group_folds`); each fold's queries
search their own fold (:func:`fold_aps`), described by a whitening learned on vectors of the other
folds only -- global descriptors and GeM vectors of R-MAC regions (:func:`region_vectors`) -- from
the first N of them (:func:`indomain_sweep`), at ``min(out_dim, rank)`` dims (:func:`fit_whitening`,
on :func:`thin_spectrum`), each N compared with the raw descriptors by a group bootstrap;
:func:`plot_indomain_sweep` draws it.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from retrieval_lib.book.whitening_study import matching_pairs
from retrieval_lib.layers.functional import gem, l2n, rmac_regions
from retrieval_lib.layers.whitening import (Spectrum, Whitening, covariance_spectrum, learned_whitening,
                                            pca_whitening)
from retrieval_lib.search.compare import paired_comparison
from retrieval_lib.search.evaluate import compute_map, gnd_from_labels
from retrieval_lib.search.nearest import rank_database
from retrieval_lib.search.verdict import signed

__all__ = ["region_vectors", "group_folds", "fold_aps", "thin_spectrum", "fit_whitening", "indomain_sweep",
           "where_it_helps", "plot_indomain_sweep"]


def region_vectors(fmaps: Sequence, p: float = 3.0, L: int = 3) -> tuple[torch.Tensor, np.ndarray]:
    """GeM vectors of the R-MAC regions of every map: ``(R, C)`` L2-normalised, and ``(R,)`` the map each is from.

    Region ``(x, y, s, s)`` of ``rmac_regions(h, w, L)`` gives ``l2n(gem(map[:, y:y+s, x:x+s], p))``: unlabelled
    samples of the descriptor space, ~20 per image at ``L = 3`` (Tolias et al., ICLR 2016, whiten on regions).
    Rows go map by map, by region size (one pooling call each); ``None`` maps are skipped.
    """
    vecs, owner = [], []
    for i, f in enumerate(fmaps):
        if f is None:
            continue
        by_size: dict = {}
        for x, y, w, h in rmac_regions(f.shape[-2], f.shape[-1], L).tolist():
            by_size.setdefault((w, h), []).append((x, y))
        for (w, h), corners in by_size.items():
            crops = torch.stack([f[:, y:y + h, x:x + w] for x, y in corners]).float()  # (r, C, h, w)
            vecs.append(l2n(gem(crops, p)))
            owner += [i] * len(corners)
    return torch.cat(vecs), np.asarray(owner, dtype=np.int64)


def group_folds(labels, n_folds: int = 2, seed: int = 0, strata=None) -> np.ndarray:
    """Fold ``0..n_folds-1`` of every image ``(n,)``: whole groups dealt to folds, so no group straddles two.

    Per stratum (``strata``: one label per image, e.g. its subset) the groups are shuffled (seeded) and
    dealt in turn, so each fold holds its share of every stratum. ``ValueError``: fewer groups than folds.
    """
    lab = np.asarray(labels)
    st = np.zeros(len(lab), dtype=np.int64) if strata is None else np.asarray(strata)
    groups = list(dict.fromkeys(lab.tolist()))
    if len(groups) < n_folds:
        raise ValueError(f"group_folds: {len(groups)} groups cannot fill {n_folds} folds; give more groups")
    rng = np.random.default_rng(seed)
    fold_of, turn = {}, 0
    for s in dict.fromkeys(st.tolist()):
        mine = [g for g in groups if st[lab == g][0] == s]
        for g in rng.permutation(len(mine)):
            fold_of[mine[g]] = turn % n_folds
            turn += 1
    return np.array([fold_of[g] for g in lab.tolist()], dtype=np.int64)


def fold_aps(X_by_fold: dict, labels, fold) -> np.ndarray:
    """Per-query AP ``(n,)`` when each image queries only the other images of its own fold (NaN: no positive).

    ``X_by_fold``: ``{f: (n_f, D') descriptors of the images with fold == f, in index order}``.
    """
    lab, fold = np.asarray(labels), np.asarray(fold)
    out = np.full(len(lab), np.nan)
    for f, Xf in X_by_fold.items():
        idx = np.flatnonzero(fold == f)
        out[idx] = compute_map(rank_database(Xf, Xf), gnd_from_labels(lab[idx]), kappas=(1,))[1]
    return out


def thin_spectrum(V: torch.Tensor) -> Spectrum:
    """The :class:`~retrieval_lib.layers.whitening.Spectrum` of ``V`` (N, D), for ``N <= D`` from the N x N Gram matrix.

    With ``Vc = V - m`` and ``Vc Vc^T = W diag(g) W^T``, ``C = Vc^T Vc / N`` has eigenvalues ``g / N``
    (zeros up to ``D``) and eigenvectors ``Vc^T w / sqrt(g)``: a cost of ``N^3 + N^2 D`` instead of
    ``D^3``. Only the first ``rank`` eigenvectors are kept (enough for
    :func:`~retrieval_lib.layers.whitening.pca_whitening` at ``dim <= rank``). ``N > D``:
    :func:`~retrieval_lib.layers.whitening.covariance_spectrum`.
    """
    N, D = V.shape
    if N > D:
        return covariance_spectrum(V)
    V64 = V.to(torch.float64)
    m = V64.mean(0)
    Vc = V64 - m
    g, W = torch.linalg.eigh(Vc @ Vc.T)                            # ascending, (N,), (N, N)
    g, W = g.flip(0).clamp_min(0), W.flip(1)
    lam = torch.zeros(D, dtype=torch.float64)
    lam[:N] = g / N
    sp = Spectrum(m=m, eigvals=lam, eigvecs=torch.zeros(D, 0, dtype=torch.float64), n=int(N), dtype=V.dtype,
                  device=V.device)
    r = sp.rank
    sp.eigvecs = Vc.T @ W[:, :r] / g[:r].sqrt()                     # (D, rank), orthonormal columns
    return sp


def fit_whitening(method: str, V: torch.Tensor, labels, out_dim: int, shrinkage: float) -> tuple:
    """``(whitening, dim, rank)`` learned on ``V`` (N, D) with ``dim = min(out_dim, rank)``, never past the rank.

    ``method``: ``"pca"`` (no shrinkage), ``"pca_shrink"`` (``shrinkage`` x mean eigenvalue added) or
    ``"lw_shrink"`` (Lw from the matching pairs of ``labels``, shrinkage as in :func:`~retrieval_lib.book.whitening_study.learn_whitenings`,
    solved in the span of the centred ``V``: its top ``rank`` directions are those of Lw in all D
    dims, since no training vector or pair difference leaves that span). Built on :func:`thin_spectrum`.
    """
    sp = thin_spectrum(V)
    dim = min(int(out_dim), sp.rank)
    if method == "pca":
        return pca_whitening(sp, dim=dim), dim, sp.rank
    if method == "pca_shrink":
        return pca_whitening(sp, dim=dim, shrinkage=float(shrinkage) * float(sp.eigvals.mean())), dim, sp.rank
    if method != "lw_shrink":
        raise ValueError(f"fit_whitening: unknown method {method!r}; use 'pca', 'pca_shrink' or 'lw_shrink'")
    B = sp.eigvecs[:, :sp.rank]                                     # (D, rank) basis of the span
    q, p = matching_pairs(labels)
    s = float(shrinkage) * float((V[q].double() - V[p].double()).square().sum(1).mean()) / V.shape[1]
    Wz = learned_whitening((V.double() - sp.m) @ B, q, p, shrinkage=s)  # Lw on the coordinates in the span
    W = Whitening(m=sp.m + B @ Wz.m, P=Wz.P @ B.T, kind="lw", eigvals=Wz.eigvals, extra=dict(Wz.extra))
    return W, dim, sp.rank


def indomain_sweep(X: torch.Tensor, labels, fold, pools: dict, runs: Sequence, Ns: Sequence[int], out_dim: int,
                   shrinkage: float, seed: int = 0, groups=None) -> dict:
    """Whitening learned in-domain from N training vectors, against the raw descriptors, for each N.

    Cross-fitting over ``fold`` (:func:`group_folds`): the queries of fold ``f`` search their own
    fold (:func:`fold_aps`), described by a whitening learned on vectors of the *other* folds only.
    ``pools``: ``{name: (V (M, D), owner (M,) index of the image of X each row comes from)}``;
    ``runs``: ``[(pool, method), ...]`` (:func:`fit_whitening`). Per fold, one seeded permutation of
    the pool's usable rows (for Lw: of their groups, whole groups in turn, so samples hold pairs), its
    first N used (nested samples); each ``N`` of ``Ns`` up to the smallest fold's count, then that
    count (all vectors) last; an N whose Lw sample has no matching pair is skipped. Returns ``{"raw": (n,) APs, "rows":
    [{"pool", "method", "N", "rank", "dim" (lowest over folds), "aps" (n,), "cmp"}]}``, ``cmp`` the
    :func:`~retrieval_lib.search.compare.paired_comparison` with raw (``groups``: one label per query).
    """
    lab, fold = np.asarray(labels), np.asarray(fold)
    folds = sorted(set(fold.tolist()))
    raw = fold_aps({f: X[fold == f] for f in folds}, lab, fold)
    rows = []
    for pool, method in runs:
        V, owner = pools[pool]
        use = {f: _sample_order(np.flatnonzero(fold[owner] != f), lab[owner], method == "lw_shrink", seed)
               for f in folds}
        n_max = min(len(u) for u in use.values())
        for N in sorted({int(n) for n in Ns if 2 <= n < n_max} | {n_max}):
            if method == "lw_shrink" and any(len(set(lab[owner[u[:N]]].tolist())) == N for u in use.values()):
                continue                                            # no matching pair among the first N
            Xw, ranks, dims = {}, [], []
            for f in folds:
                rows_f = use[f][:N]
                W, d, r = fit_whitening(method, V[rows_f], lab[owner[rows_f]], out_dim, shrinkage)
                Xw[f] = W.apply(X[fold == f].to(W.P.dtype), dim=d)
                ranks.append(r), dims.append(d)
            aps = fold_aps(Xw, lab, fold)
            rows.append({"pool": pool, "method": method, "N": N, "rank": min(ranks), "dim": min(dims), "aps": aps,
                         "cmp": paired_comparison(aps, raw, groups=groups)})
    return {"raw": raw, "rows": rows}


def _sample_order(rows: np.ndarray, labels: np.ndarray, by_group: bool, seed: int) -> np.ndarray:
    """``rows`` in a seeded random order; with ``by_group`` their groups are shuffled and taken whole."""
    rng = np.random.default_rng(seed)
    if not by_group:
        return rng.permutation(rows)
    turn = {g: k for k, g in enumerate(rng.permutation(np.unique(labels[rows])).tolist())}
    return rows[np.argsort([turn[g] for g in labels[rows].tolist()], kind="stable")]


def where_it_helps(res: dict, names: dict) -> str:
    """One sentence per ``(pool, method)`` of :func:`indomain_sweep`: the smallest N whose interval is above 0
    (with its rank and dims), the Ns below raw beyond the noise, and the gap at the smallest and largest N."""
    out = []
    for key in dict.fromkeys((r["pool"], r["method"]) for r in res["rows"]):
        rs = [r for r in res["rows"] if (r["pool"], r["method"]) == key]
        win = next((r for r in rs if r["cmp"]["significant"] and r["cmp"]["delta"] > 0), None)
        below = [str(r["N"]) for r in rs if r["cmp"]["significant"] and r["cmp"]["delta"] < 0]
        out.append(f"{names.get(key, key)}: " + (
            f"beats the raw descriptors from N = {win['N']} vectors (rank {win['rank']}, {win['dim']} dims, "
            f"{signed(win['cmp']['delta'])})" if win else "beats the raw descriptors at no N of the sweep")
            + (f"; below them beyond the noise at N = {', '.join(below)}" if below else "")
            + f" (the gap goes from {signed(rs[0]['cmp']['delta'])} at N = {rs[0]['N']} to "
            f"{signed(rs[-1]['cmp']['delta'])} at N = {rs[-1]['N']}).")
    return " ".join(out)


def plot_indomain_sweep(axes, res: dict, names: dict, D: int, title: str = ""):
    """Left: mAP against N per (pool, method), raw dashed; right: the gap to raw with its interval."""
    raw = float(np.nanmean(res["raw"]))
    for key in dict.fromkeys((r["pool"], r["method"]) for r in res["rows"]):
        rs = [r for r in res["rows"] if (r["pool"], r["method"]) == key]
        Ns = [r["N"] for r in rs]
        label = names.get(key, f"{key[1]} on {key[0]}")
        line, = axes[0].plot(Ns, [float(np.nanmean(r["aps"])) for r in rs], "o-", label=label)
        lo, hi = (np.array([r["cmp"]["ci"][k] for r in rs]) for k in (0, 1))
        dl = np.array([r["cmp"]["delta"] for r in rs])
        axes[1].errorbar(Ns, dl, yerr=[dl - lo, hi - dl], fmt="o-", capsize=3, color=line.get_color(), label=label)
    axes[0].axhline(raw, color="k", linestyle="--", label=f"raw descriptors ({raw:.3f})")
    axes[1].axhline(0, color="k", linestyle="--")
    for ax, ylab in zip(axes, ("in-domain held-out mAP", "mAP minus raw (95 % group-bootstrap interval)")):
        ax.axvline(D, color="gray", linestyle=":", label=f"N = D = {D}")
        ax.set(xscale="log", xlabel="training vectors N (log scale)", ylabel=ylab, title=title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
