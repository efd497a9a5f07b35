"""book.whitening_study and whitening_indomain: Mahalanobis = Euclidean after whitening, the whitenings compared,
the sweeps, patches, and the in-domain N-sweep."""
import numpy as np
import pytest
import torch
from PIL import Image

from retrieval_lib.book.whitening_indomain import (fit_whitening, fold_aps, group_folds, indomain_sweep,
                                                   plot_indomain_sweep, region_vectors, thin_spectrum,
                                                   where_it_helps)
from retrieval_lib.book.whitening_study import (comparison_rows, evaluate_descriptors, image_patches, learn_whitenings,
                                                mahalanobis_sq, show_whitening_2d, sweep_codecs, sweep_dims,
                                                training_descriptors, zca_filter_image)
from retrieval_lib.engine.extract import extract_fmaps, pool_fmaps
from retrieval_lib.layers.functional import gem, l2n, rmac_regions
from retrieval_lib.layers.whitening import covariance_spectrum, pca_whitening, zca_whitening
from retrieval_lib.search.compare import paired_comparison
from retrieval_lib.search.compress import Float16Codec, Float32Codec, PCACodec

from _fakes import TinyBackbone, ap_loop, group_benchmark, group_map_loop, ranks_loop


def _grouped(n_groups, per_group, d, seed, spread=0.4):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_groups, d, generator=g, dtype=torch.float64)
    labels = np.repeat(np.arange(n_groups), per_group)
    X = centres[labels] + spread * torch.randn(len(labels), d, generator=g, dtype=torch.float64)
    return l2n(X), labels


def test_mahalanobis_by_loop_equals_euclidean_after_whitening():
    X, _ = _grouped(6, 5, 12, 0)  # 30 samples, 12 dims
    Y, _ = _grouped(4, 2, 12, 1)
    s = 1e-3
    W = pca_whitening(X, shrinkage=s)
    Xc = X - X.mean(0)
    C = Xc.T @ Xc / len(X) + s * torch.eye(12, dtype=torch.float64)
    diff = Y[:4] - Y[4:]
    Cinv = np.linalg.inv(C.numpy())
    loop = np.array([float(d @ Cinv @ d) for d in diff.numpy()])
    np.testing.assert_allclose(mahalanobis_sq(diff, C).numpy(), loop, rtol=1e-10)
    eucl = ((diff @ W.P.T) ** 2).sum(1)  # the mean cancels in a difference
    np.testing.assert_allclose(eucl.numpy(), loop, rtol=1e-8)
    # ZCA too (a rotation of PCA), and not the plain Euclidean distance
    Wz = zca_whitening(X, shrinkage=s)
    np.testing.assert_allclose(((diff @ Wz.P.T) ** 2).sum(1).numpy(), loop, rtol=1e-8)
    assert not np.allclose((diff ** 2).sum(1).numpy(), loop, rtol=1e-2)


def test_learn_whitenings_gives_each_method_with_its_dimensions():
    X, labels = _grouped(5, 4, 30, 2)  # 20 samples < 30 dims: rank 19
    ws = learn_whitenings(X, labels, shrinkage=0.1, power=0.25)
    sp = ws["spectrum"]
    assert sp.rank == 19
    assert ws["pca"].dim_out == 19 and ws["partial"].dim_out == 19
    assert ws["pca_shrink"].dim_out == 30 and ws["zca"].dim_out == 30 and ws["projection"].dim_out == 30
    s = 0.1 * float(sp.eigvals.mean())
    assert ws["pca_shrink"].extra == {"shrinkage": pytest.approx(s), "power": 0.5}
    assert ws["partial"].extra == {"shrinkage": 0.0, "power": 0.25}
    assert ws["projection"].extra["power"] == 0.0
    # Lw learned from the 5 * (4 choose 2) = 30 unordered matching pairs; with shrinkage no Cholesky regularisation
    assert ws["lw"].extra["n_pairs"] == 30 and ws["lw_shrink"].extra["n_pairs"] == 30
    assert ws["lw"].extra["cholesky_alpha"] > 0 and ws["lw_shrink"].extra["cholesky_alpha"] == 0.0
    with pytest.raises(ValueError, match="no two training images share a label"):
        learn_whitenings(X, np.arange(20), 0.1, 0.25)


def test_evaluate_and_sweeps_match_a_loop(tmp_path):
    bench = group_benchmark(tmp_path, n_groups=4, per_group=3)
    X, _ = _grouped(4, 3, 10, 3, spread=1.0)
    m, aps = evaluate_descriptors(bench, X)
    assert m == pytest.approx(group_map_loop(X.numpy(), bench.labels), abs=1e-12)
    assert aps.shape == (12,) and np.nanmean(aps) == pytest.approx(m, abs=1e-12)
    Xtr, lab = _grouped(6, 4, 10, 4)
    W = pca_whitening(Xtr, dim=8)
    sw = sweep_dims(bench, X, W, [2, 4, 8, 9])
    assert sw["dims"] == [2, 4, 8]  # 9 > the 8 dims learned
    for d, md in zip(sw["dims"], sw["mAP"]):
        assert md == pytest.approx(group_map_loop(W.apply(X, dim=d).numpy(), bench.labels), abs=1e-12)
    res = sweep_codecs(bench, Xtr.float(), X.float(), {"fp32": Float32Codec(), "fp16": Float16Codec(),
                                                       "pca4": PCACodec(4)})
    assert res["fp32"]["bytes"] == 40 and res["fp16"]["bytes"] == 20 and res["pca4"]["bytes"] == 16
    assert res["fp32"]["mAP"] == pytest.approx(group_map_loop(X.numpy(), bench.labels), abs=1e-6)
    rows, cmps = comparison_rows({k: v["aps"] for k, v in res.items()}, "fp32", {"fp16": "half"})
    assert [r[0] for r in rows] == ["half", "pca4"] and set(cmps) == {"fp16", "pca4"}
    assert rows[0][2] == pytest.approx(res["fp16"]["mAP"] - res["fp32"]["mAP"], abs=1e-12)


def test_training_descriptors_add_views_to_the_originals(tmp_path, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_CACHE", str(tmp_path / "cache"))
    ds = group_benchmark(tmp_path, n_groups=3, per_group=2)
    model = TinyBackbone().eval()
    descs, views = training_descriptors(model, ds, {"gem": "gem", "mac": "mac"}, n_views=2, image_size=64,
                                        progress=False)
    assert descs["gem"].shape == (6 * 3, 8) and len(views) == 18
    assert (views.kind == "original").sum() == 6 and (views.kind == "view").sum() == 12
    np.testing.assert_array_equal(views.labels[:6], ds.labels)
    own = pool_fmaps(extract_fmaps(model, ds.database, image_size=64, progress=False), "gem")
    torch.testing.assert_close(descs["gem"][:6], own)


def test_patches_and_the_zca_filtered_image():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (20, 24, 3)).astype(np.uint8))
    P = image_patches([img], size=4, n=50, seed=1)
    assert P.shape == (50, 16) and float(P.min()) >= 0 and float(P.max()) <= 1
    grey = np.asarray(img.convert("L"), dtype=np.float64) / 255
    assert any(np.allclose(P[0].numpy(), grey[y:y + 4, x:x + 4].ravel()) for y in range(17) for x in range(21))
    W = zca_whitening(image_patches([img], size=4, n=400, seed=2), shrinkage=1e-3)
    Z = zca_filter_image(img, W, 4)
    assert Z.shape == (17, 21)
    # pixel (y, x) of the output is the centre row of P applied to the patch at (y, x), mean removed
    c = 2 * 4 + 2
    y, x = 5, 7
    ref = float(W.P[c] @ (torch.from_numpy(grey[y:y + 4, x:x + 4].ravel()) - W.m))
    assert Z[y, x] == pytest.approx(ref, abs=1e-10)
    with pytest.raises(ValueError, match="at least 40 px"):
        image_patches([img], size=40)


def test_2d_picture_whitens_both_ways_and_zca_moves_least():
    import matplotlib
    matplotlib.use("Agg")
    fig, clouds = show_whitening_2d(300, seed=3)
    assert len(fig.axes) == 3 and all(ax.get_title() for ax in fig.axes)
    for name in ("pca", "zca"):
        Y = clouds[name]
        Yc = Y - Y.mean(0)
        torch.testing.assert_close(Yc.T @ Yc / 300, torch.eye(2, dtype=torch.float64), atol=1e-10, rtol=0)
    # ZCA is the whitening closest to the (centred) input; PCA is a rotation of it
    Xc = clouds["raw"] - clouds["raw"].mean(0)
    assert float((clouds["zca"] - Xc).square().sum()) < float((clouds["pca"] - Xc).square().sum())


# ------------------------------------------------------------------ the in-domain N-sweep
def test_region_vectors_match_a_loop_over_regions():
    g = torch.Generator().manual_seed(5)
    maps = [torch.rand(6, 7, 9, generator=g), None, torch.rand(6, 8, 8, generator=g)]
    V, owner = region_vectors(maps, p=3.0, L=3)
    ref = {i: [l2n(gem(m[None, :, y:y + h, x:x + w], 3.0))[0] for x, y, w, h in rmac_regions(7 if i == 0 else 8,
                                                                                            9 if i == 0 else 8, 3).tolist()]
           for i, m in enumerate(maps) if m is not None}
    assert V.shape == (len(ref[0]) + len(ref[2]), 6) and owner.tolist() == [0] * len(ref[0]) + [2] * len(ref[2])
    for i, vs in ref.items():  # the same set of vectors per map (rows are grouped by region size)
        got = V[owner == i]
        for v in vs:
            assert float((got - v).abs().max(dim=1).values.min()) < 1e-6


def test_group_folds_keep_groups_whole_and_share_every_stratum():
    labels = np.repeat(np.arange(10), 2)                     # 10 groups of 2
    strata = np.array(["a"] * 12 + ["b"] * 8)                # 6 groups in a, 4 in b
    fold = group_folds(labels, 2, seed=1, strata=strata)
    for g in range(10):
        assert len(set(fold[labels == g])) == 1             # no group straddles two folds
    for s in ("a", "b"):
        counts = np.bincount(fold[strata == s], minlength=2)  # images: 2 per group
        assert counts[0] == counts[1]                        # 3 + 3 groups of a, 2 + 2 of b
    np.testing.assert_array_equal(fold, group_folds(labels, 2, seed=1, strata=strata))
    with pytest.raises(ValueError, match="cannot fill 3 folds"):
        group_folds([0, 0, 1, 1], 3)


def test_fold_aps_search_only_the_own_fold():
    X, labels = _grouped(4, 3, 6, 7, spread=1.5)
    fold = np.array([0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1])
    aps = fold_aps({f: X[fold == f] for f in (0, 1)}, labels, fold)
    for f in (0, 1):
        idx = np.flatnonzero(fold == f)
        ranks = ranks_loop(X[idx].numpy(), X[idx].numpy())
        for k, q in enumerate(idx):
            pos = {j for j in range(len(idx)) if labels[idx[j]] == labels[q] and j != k}
            assert aps[q] == pytest.approx(ap_loop(ranks[k].tolist(), pos, {k}), abs=1e-12)


def test_thin_spectrum_is_the_covariance_spectrum_where_it_is_kept():
    V, _ = _grouped(4, 3, 20, 8)                              # 12 vectors in 20 dims
    thin, full = thin_spectrum(V), covariance_spectrum(V)
    assert thin.rank == full.rank == 11 and thin.eigvecs.shape == (20, 11)
    torch.testing.assert_close(thin.eigvecs.T @ thin.eigvecs, torch.eye(11, dtype=torch.float64), atol=1e-10, rtol=0)
    W30, _ = _grouped(6, 5, 20, 9)                            # N = 30 > D = 20: the D x D route
    torch.testing.assert_close(thin_spectrum(W30).eigvals, covariance_spectrum(W30).eigvals)
    torch.testing.assert_close(thin.eigvals, full.eigvals, atol=1e-12, rtol=0)
    for s in (0.0, 0.05):
        a, b = (pca_whitening(sp, dim=11, shrinkage=s) for sp in (thin, full))
        torch.testing.assert_close(a.P.abs(), b.P.abs(), atol=1e-8, rtol=0)   # the same rows up to sign


def test_fit_whitening_stops_at_the_rank_and_matches_an_eigendecomposition():
    V, labels = _grouped(4, 3, 20, 8)                         # 12 vectors in 20 dims: rank 11
    W, d, r = fit_whitening("pca_shrink", V, labels, out_dim=16, shrinkage=0.1)
    assert (d, r) == (11, 11) and W.dim_out == 11            # never past the rank
    Vc = (V - V.mean(0)).numpy()
    lam, U = np.linalg.eigh(Vc.T @ Vc / len(V))
    lam, U = lam[::-1], U[:, ::-1]
    ref = (U[:, :11] / np.sqrt(lam[:11] + 0.1 * lam.clip(0).mean())).T
    np.testing.assert_allclose(np.abs(W.P.numpy()), np.abs(ref), atol=1e-8)  # up to the sign of each direction
    assert fit_whitening("pca", V, labels, 4, 0.1)[1] == 4
    # Lw solved in the span of the training vectors = Lw in all 20 dims, on its first rank outputs (up to sign)
    Wl, dl, _ = fit_whitening("lw_shrink", V, labels, 16, 0.1)
    full = learn_whitenings(V, labels, 0.1, 0.25)["lw_shrink"]
    Y, _ = _grouped(3, 2, 20, 11)
    a, b = ((Y - w.m) @ w.P[:dl].T for w in (Wl, full))
    torch.testing.assert_close(a.abs(), b.abs(), atol=1e-7, rtol=1e-7)
    with pytest.raises(ValueError, match="unknown method"):
        fit_whitening("zca", V, labels, 4, 0.1)


def test_indomain_sweep_matches_a_plain_cross_fit():
    X, labels = _grouped(6, 2, 10, 9, spread=0.8)
    fold = group_folds(labels, 2, seed=0)
    V = torch.cat([X, l2n(X + 0.3 * torch.randn(X.shape, generator=torch.Generator().manual_seed(1),
                                                 dtype=torch.float64))])
    owner = np.concatenate([np.arange(12), np.arange(12)])    # two vectors per image
    res = indomain_sweep(X, labels, fold, {"both": (V, owner)}, [("both", "pca_shrink")], Ns=(3, 5, 100),
                         out_dim=4, shrinkage=0.1, seed=2, groups=labels)
    assert [r["N"] for r in res["rows"]] == [3, 5, 12]       # 12: every vector of the other fold (6 images x 2)
    for row in res["rows"]:
        aps = np.full(12, np.nan)
        for f in (0, 1):
            usable = np.random.default_rng(2).permutation(np.flatnonzero(fold[owner] != f))[:row["N"]]
            assert not np.isin(owner[usable], np.flatnonzero(fold == f)).any()   # never its own fold's images
            Vf = V[usable].numpy()
            Vc = Vf - Vf.mean(0)
            lam, U = np.linalg.eigh(Vc.T @ Vc / len(Vf))
            lam, U = lam[::-1], U[:, ::-1]
            d = row["dim"]
            P = (U[:, :d] / np.sqrt(lam[:d] + 0.1 * lam.clip(0).mean())).T
            idx = np.flatnonzero(fold == f)
            Y = (X[idx].numpy() - Vf.mean(0)) @ P.T
            Y /= np.linalg.norm(Y, axis=1, keepdims=True)
            ranks = ranks_loop(Y, Y)
            for k, q in enumerate(idx):
                pos = {j for j in range(len(idx)) if labels[idx[j]] == labels[q] and j != k}
                aps[q] = ap_loop(ranks[k].tolist(), pos, {k})
        np.testing.assert_allclose(row["aps"], aps, atol=1e-9)
        assert row["cmp"] == paired_comparison(row["aps"], res["raw"], groups=labels)
    assert res["rows"][0]["dim"] == 2                         # N = 3 vectors: rank 2 < out_dim 4
    # Lw samples whole groups in turn, so even N = 2 holds a matching pair (two vectors of one image's group)
    lw = indomain_sweep(X, labels, fold, {"g": (X, np.arange(12))}, [("g", "lw_shrink")], Ns=(2, 4), out_dim=4,
                        shrinkage=0.1, seed=2)
    assert [r["N"] for r in lw["rows"]] == [2, 4, 6] and all(np.isfinite(r["aps"]).all() for r in lw["rows"])
    text = where_it_helps(res, {("both", "pca_shrink"): "PCA"})
    first = next((r for r in res["rows"] if r["cmp"]["significant"] and r["cmp"]["delta"] > 0), None)
    assert text.startswith("PCA: ") and (f"from N = {first['N']} vectors" in text if first else "at no N" in text)
    assert f"at N = {res['rows'][-1]['N']})." in text
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2)
    plot_indomain_sweep(axes, res, {}, D=10, title="t")
    assert len(axes[0].lines) >= 2 and axes[1].get_ylabel()
    plt.close(fig)
