"""retrieval_lib.book.sweeps: sweeps over p and image size, spatial weights, pairs and subsets;
and the per-query helpers they lean on (search.evaluate: compare_aps, headline).

The sweeps run on a real session over tiny real benchmarks with a fixed stand-in backbone
(tests/_fakes.py); every metric is checked against pooling each map by hand, ranking
with a loop and scoring with a plain AP (or Recall@1) loop.
"""
import math

import numpy as np
import pytest
import torch

from _fakes import cub_benchmark, group_benchmark, group_map_loop, recall1_loop, revisited_benchmark, tiny_book
from retrieval_lib.book.sweeps import (evaluate_many, gem_contributions, gem_poolings, map_on_subset,
                                       pair_similarity_vs_p, self_similarity, spoc_weights, sweep_image_size,
                                       sweep_p)
from retrieval_lib.data.datasets import GroupDataset
from retrieval_lib.layers import functional
from retrieval_lib.layers.pooling import GeM
from retrieval_lib.search.evaluate import HEADLINE_KEYS, compare_aps, headline
from retrieval_lib.search.nearest import rank_database


def _by_hand(maps, fn):
    """Pool every map on its own and L2-normalise: the plain reference."""
    return torch.stack([functional.l2n(fn(m[None]))[0] for m in maps])


# ------------------------------------------------------------------------- headline
def test_headline_picks_the_benchmark_key_or_the_first_known_one():
    assert headline({"mAP": 0.5, "mAP/medium": 0.1}) == 0.5
    assert headline({"mAP/easy": 0.9, "mAP/medium": 0.4}) == 0.4
    assert headline({"R@1": 0.7, "R@2": 0.8}) == 0.7  # class-level sets such as CUB
    assert headline({"mAP": 0.5, "R@1": 0.25}, key="R@1") == 0.25
    assert HEADLINE_KEYS == ("mAP", "mAP/medium", "R@1")
    with pytest.raises(KeyError, match="no 'mAP/hard' in the metrics"):
        headline({"mAP": 0.5}, key="mAP/hard")
    with pytest.raises(KeyError, match="headline"):
        headline({"N-S": 3.0})


# ------------------------------------------------------------------------- spatial weights
@pytest.mark.parametrize("H, W", [(5, 7), (6, 6), (1, 4), (12, 16)])
def test_spoc_weights_equal_the_gaussian_prior_by_hand(H, W):
    sigma = min(H, W) / 6.0
    ref = [[math.exp(-((i + 0.5 - H / 2) ** 2 + (j + 0.5 - W / 2) ** 2) / (2 * sigma**2)) for j in range(W)]
           for i in range(H)]
    ref = torch.tensor(ref, dtype=torch.float64)
    ref /= ref.sum()
    got = spoc_weights(H, W)
    assert got.shape == (H, W)
    assert torch.allclose(got, ref, atol=1e-15)
    assert torch.allclose(spoc_weights(H, W, center_prior=False), torch.full((H, W), 1.0 / (H * W),
                                                                               dtype=torch.float64))


def test_spoc_weights_rejects_empty_maps():
    with pytest.raises(ValueError, match="H must be an integer"):
        spoc_weights(0, 3)


def _contrib_loop(fmap, p, eps=1e-6):
    C, h, w = fmap.shape
    out = torch.zeros(h, w, dtype=torch.float64)
    for k in range(C):
        vals = [max(float(v), eps) ** p for v in fmap[k].flatten()]
        s = sum(vals)
        out += torch.tensor(vals, dtype=torch.float64).reshape(h, w) / s
    return out / C


@pytest.mark.parametrize("p", [1.0, 3.0, 10.0])
def test_gem_contributions_match_a_plain_loop(p):
    fmap = torch.rand(4, 3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 6
    fmap[0, 0, 0] = 0.0
    got = gem_contributions(fmap, p)
    assert torch.allclose(got, _contrib_loop(fmap, p), atol=1e-12)
    assert got.sum().item() == pytest.approx(1.0)
    batched = gem_contributions(torch.stack([fmap, fmap * 2]), p)
    assert batched.shape == (2, 3, 5)
    assert torch.allclose(batched[0], got) and torch.allclose(batched[1], got)  # scale-free


def test_gem_contributions_go_to_the_argmax_for_large_p():
    fmap = torch.rand(6, 4, 4, generator=torch.Generator().manual_seed(1)) * 6
    got = gem_contributions(fmap, 500.0)  # 6^500 would overflow: the softmax form does not
    assert torch.isfinite(got).all()
    onehot = torch.zeros(6, 16)
    onehot[torch.arange(6), fmap.reshape(6, -1).argmax(1)] = 1
    assert torch.allclose(got, onehot.mean(0).reshape(4, 4), atol=1e-4)


def test_gem_contributions_errors():
    with pytest.raises(ValueError, match="positive"):
        gem_contributions(torch.rand(2, 3, 3), -1.0)
    with pytest.raises(ValueError, match="4-D"):
        gem_contributions(torch.rand(3, 3), 2.0)


# ------------------------------------------------------------------------- GeM in float64
def test_gem_poolings_match_gem_and_survive_large_p():
    x = torch.rand(2, 5, 3, 3, generator=torch.Generator().manual_seed(0)) * 6
    pools = gem_poolings([3.0, 60.0])
    assert list(pools) == [3.0, 60.0]
    assert torch.allclose(pools[3.0](x), functional.gem(x, 3.0), rtol=1e-5)
    assert pools[3.0](x).dtype == torch.float32
    x[:, :, 0, 0] = 6.0
    assert not torch.isfinite(functional.gem(x, 60.0)).all()  # float32 overflows at 6^60 ...
    big = pools[60.0](x)
    assert torch.isfinite(big).all()  # ... float64 does not, and it is close to the max
    assert torch.allclose(big, x.amax((2, 3)), rtol=0.05)
    with pytest.raises(ValueError, match="at least one"):
        gem_poolings([])


# ------------------------------------------------------------------------- many poolings
def test_evaluate_many_equals_a_plain_reference(tmp_path):
    bench = group_benchmark(tmp_path)
    book = tiny_book(tmp_path, bench)
    pools = {"mac": "mac", "spoc": "spoc"}
    metrics, X, Q = evaluate_many(book, pools, return_descriptors=True)
    assert Q == {"mac": None, "spoc": None}  # every image is a query: Q=None, as everywhere
    for label, fn in (("mac", functional.mac), ("spoc", functional.spoc)):
        ref = _by_hand(book.fmaps(), fn)
        torch.testing.assert_close(X[label], ref)
        assert metrics[label]["mAP"] == pytest.approx(group_map_loop(ref, bench.labels), abs=1e-12)
    assert metrics["mac"]["mAP"] != metrics["spoc"]["mAP"]
    with pytest.raises(ValueError, match="empty"):
        evaluate_many(book, {})


def test_evaluate_many_is_the_same_with_and_without_kept_maps(tmp_path):
    bench = group_benchmark(tmp_path)
    pools = {"mac": "mac", "gem3": GeM(p=3.0, learn_p=False)}
    kept = evaluate_many(tiny_book(tmp_path / "a", bench, scale="smoke"), pools)
    direct = evaluate_many(tiny_book(tmp_path / "b", bench, scale="full"), pools)
    for label in pools:
        assert kept[label] == pytest.approx(direct[label], abs=1e-9)


def test_evaluate_many_with_separate_queries(tmp_path):
    bench = revisited_benchmark(tmp_path)
    book = tiny_book(tmp_path, bench)
    metrics, X, Q = evaluate_many(book, {"mac": "mac"}, return_descriptors=True)
    assert Q["mac"].shape == (3, 8)
    assert metrics["mac"] == bench.evaluate(rank_database(Q["mac"], X["mac"]))


def test_sweep_p_matches_direct_gem_and_spoc(tmp_path):
    bench = group_benchmark(tmp_path)
    book = tiny_book(tmp_path, bench)
    res = sweep_p(book, [1.0, 3.0, 30.0])
    assert list(res["p"]) == [1.0, 3.0, 30.0] and len(res["metrics"]) == 3
    maps = book.fmaps()
    assert res["mAP"][0] == pytest.approx(group_map_loop(_by_hand(maps, functional.spoc), bench.labels),
                                          abs=1e-9)  # p = 1 is SPoC
    gem3 = _by_hand(maps, lambda x: functional.gem(x.double(), 3.0).float())
    assert res["mAP"][1] == pytest.approx(group_map_loop(gem3, bench.labels), abs=1e-9)
    assert len(set(res["mAP"].tolist())) > 1  # the sweep does change the descriptor


def test_sweeps_plot_recall_at_1_on_cub(tmp_path):
    """CUB reports Recall@K only: the sweeps plot its headline, R@1 (they raised KeyError)."""
    bench = cub_benchmark(tmp_path)
    assert bench.headline_key == "R@1"
    book = tiny_book(tmp_path, bench)
    res = sweep_p(book, [1.0, 8.0])
    maps = book.fmaps()
    for k, p in enumerate([1.0, 8.0]):
        X = _by_hand(maps, lambda x: functional.gem(x.double(), p).float())
        assert res["mAP"][k] == pytest.approx(recall1_loop(X, bench.labels), abs=1e-12)
    sizes = sweep_image_size(book, [40, 48], {"mac": "mac"})
    assert sizes["mAP"]["mac"][1] == pytest.approx(recall1_loop(book.describe("mac"), bench.labels), abs=1e-12)


def test_sweep_image_size_per_size_values(tmp_path):
    bench = group_benchmark(tmp_path)
    book = tiny_book(tmp_path, bench)
    res = sweep_image_size(book, [32, 48], {"mac": "mac", "spoc": "spoc"})
    assert list(res["size"]) == [32, 48]
    for label, fn in (("mac", functional.mac), ("spoc", functional.spoc)):
        for k, s in enumerate([32, 48]):
            X = _by_hand(book.fmaps(image_size=s), fn)
            assert res["mAP"][label][k] == pytest.approx(group_map_loop(X, bench.labels), abs=1e-12)
            torch.testing.assert_close(res["X"][label][s], X)
    assert not torch.allclose(res["X"]["mac"][32], res["X"]["mac"][48])  # the size does matter
    with pytest.raises(ValueError, match="at least 32"):
        sweep_image_size(book, [8], {"mac": "mac"})
    with pytest.raises(ValueError, match="empty"):
        sweep_image_size(book, [32], {})


def test_self_similarity():
    X = functional.l2n(torch.randn(5, 4, generator=torch.Generator().manual_seed(0)))
    Y = functional.l2n(X + 0.1)
    got = self_similarity(X, Y)
    assert torch.allclose(got, torch.tensor([float(X[k] @ Y[k]) for k in range(5)]))
    assert torch.allclose(self_similarity(X, X), torch.ones(5))
    with pytest.raises(ValueError, match="same shape"):
        self_similarity(X, Y[:3])


# ------------------------------------------------------------------------- per query
def test_compare_aps_orders_wins_and_losses():
    a = [0.9, 0.5, np.nan, 0.2, 0.7, 0.4]
    b = [0.1, 0.5, 0.3, 0.6, 0.6, 0.9]
    res = compare_aps(a, b)
    assert list(res["wins"]) == [0, 4]  # +0.8, +0.1
    assert list(res["losses"]) == [5, 3]  # -0.5, -0.4
    assert list(res["ties"]) == [1]
    assert np.isnan(res["delta"][2]) and res["delta"][0] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="equal length"):
        compare_aps([0.1, 0.2], [0.1])


# ------------------------------------------------------------------------- pairs and subsets
def test_pair_similarity_vs_p_by_hand():
    a = torch.rand(5, 3, 4, generator=torch.Generator().manual_seed(0)) * 6
    b = torch.rand(5, 4, 3, generator=torch.Generator().manual_seed(1)) * 6
    got = pair_similarity_vs_p(a, b, [1.0, 4.0])
    for k, p in enumerate([1.0, 4.0]):
        da = [(sum(float(v) ** p for v in a[c].flatten()) / 12) ** (1 / p) for c in range(5)]
        db = [(sum(float(v) ** p for v in b[c].flatten()) / 12) ** (1 / p) for c in range(5)]
        cos = sum(u * v for u, v in zip(da, db)) / math.sqrt(sum(u * u for u in da) * sum(v * v for v in db))
        assert got[k] == pytest.approx(cos, abs=1e-5)  # l2n adds eps=1e-6 to the norm
    assert pair_similarity_vs_p(a, a, [2.0])[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same C"):
        pair_similarity_vs_p(a, b[:3], [2.0])


def test_map_on_subset_equals_a_separate_benchmark():
    X = functional.l2n(torch.randn(9, 4, generator=torch.Generator().manual_seed(3)))
    labels = np.array([0, 0, 1, 1, 1, 2, 2, 3, 3])
    mask = np.array([1, 1, 0, 0, 0, 1, 1, 1, 1], bool)
    sub = GroupDataset(["x"] * 6, labels[mask].tolist())
    want = sub.evaluate(rank_database(X[mask], X[mask]))["mAP"]
    assert map_on_subset(X, labels, mask) == pytest.approx(want, abs=1e-12)
    assert map_on_subset(X, labels, np.ones(9, bool)) != pytest.approx(want)  # the mask matters here
    with pytest.raises(ValueError, match="selects no image"):
        map_on_subset(X, labels, np.zeros(9, bool))
    with pytest.raises(ValueError, match="shape"):
        map_on_subset(X, labels[:3], mask)


# ------------------------------------------------------------------------- figures
def test_figures_draw_and_reject_empty_input():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from retrieval_lib.book.viz import show_gem_view, show_images, show_two_rankings

    img = np.zeros((20, 30, 3), np.uint8)
    fig = show_images([img, img, img], ["a", "b", "c"], title="t", cols=2, colors=["tab:green", None, "r"])
    assert len(fig.axes) == 4 and fig.axes[0].get_title() == "a"
    fig2 = show_two_rankings(img, [("MAC", [img, img], [True, False], [0.9, 0.5]), ("SPoC", [img], [None], None)])
    assert fig2.axes[1].get_title() == "#1 s=0.900"
    fig3 = show_gem_view([img], [np.ones((2, 3))], ["q"], [1, 2, 4], {"match": [0.1, 0.2, 0.3]}, 2.0)
    assert fig3.axes[1].get_xscale() == "log"
    plt.close("all")
    with pytest.raises(ValueError, match="no images"):
        show_images([])
    with pytest.raises(ValueError, match="at least one"):
        show_two_rankings(img, [])
    with pytest.raises(ValueError, match="as many maps"):
        show_gem_view([img], [], ["q"], [1], {}, 1.0)
