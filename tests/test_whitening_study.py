"""book.whitening_study: Mahalanobis = Euclidean after whitening, the whitenings compared, the sweeps, patches."""
import numpy as np
import pytest
import torch
from PIL import Image

from retrieval_lib.book.whitening_study import (comparison_rows, evaluate_descriptors, image_patches,
                                                learn_whitenings, mahalanobis_sq, show_whitening_2d, sweep_codecs,
                                                sweep_dims, training_descriptors, zca_filter_image)
from retrieval_lib.engine.extract import extract_fmaps, pool_fmaps
from retrieval_lib.layers.functional import l2n
from retrieval_lib.layers.whitening import pca_whitening, zca_whitening
from retrieval_lib.search.compress import Float16Codec, Float32Codec, PCACodec

from _fakes import TinyBackbone, group_benchmark, group_map_loop


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
