"""retrieval_lib.book.sweeps: sweeps over p and image size, per-query AP, spatial weights.

The sweeps run on a small stand-in for a notebook's ``book``: synthetic feature maps of a
real :class:`GroupDataset` (whose files are never opened), so each check is exact and fast.
"""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from retrieval_lib.layers import functional
from retrieval_lib.data.datasets import GroupDataset
from retrieval_lib.search.evaluate import compute_map, evaluate_revisited, map_by_labels
from retrieval_lib.engine.extract import pool_fmaps
from retrieval_lib.search.nearest import rank_database
from retrieval_lib.book.sweeps import (GeM64, compare_aps, describe_many, evaluate_many, fmaps_of,
                                  gem_contributions, gem_poolings, headline, map_on_subset,
                                  pair_similarity_vs_p, query_aps, self_similarity, spoc_weights,
                                  sweep_image_size, sweep_p, top_results)


# ------------------------------------------------------------------------- a tiny book
def _fmaps(n, labels, size, seed=0, C=12):
    """Group-specific peaks on noise; the map size grows with the input size."""
    g = torch.Generator().manual_seed(seed + size)
    h = max(2, size // 12)
    protos = torch.rand(int(labels.max()) + 1, C, generator=g) * 5
    out = []
    for k in range(n):
        shape = (C, h, h + 1) if k % 3 else (C, h + 1, h)
        x = torch.rand(shape, generator=g) * 2
        x.view(C, -1)[:, 0] += protos[labels[k]]  # the object, at one spot
        out.append(x)
    return out


class TinyBook:
    """What the sweeps use of a Book: cfg, benchmark, fmaps, descriptors, evaluate."""

    def __init__(self, keeps=True, sizes=(32, 40, 48)):
        self.labels = np.repeat(np.arange(5), 3)
        self.benchmark = GroupDataset([f"img{k}.jpg" for k in range(15)], self.labels.tolist())
        self.cfg = SimpleNamespace(scales=(1.0,), image_size=40, batch_size=4)
        self.keeps_fmaps = keeps
        self.device = torch.device("cpu")
        self.model = None
        self.progress = False
        self._f = {s: _fmaps(15, self.labels, s) for s in sizes}
        self.fmap_calls = []

    def fmaps(self, which="database", image_size=None):
        self.fmap_calls.append((which, image_size))
        return self._f[image_size or self.cfg.image_size]

    def _images(self, which):
        return self.benchmark.database

    def evaluate(self, X, Q=None):
        return self.benchmark.evaluate(rank_database(X if Q is None else Q, X))


# ------------------------------------------------------------------------- headline
def test_headline_picks_map_then_medium():
    assert headline({"mAP": 0.5, "mAP/medium": 0.1}) == 0.5
    assert headline({"mAP/easy": 0.9, "mAP/medium": 0.4}) == 0.4
    with pytest.raises(KeyError, match="headline"):
        headline({"R@1": 1.0})


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
def test_gem64_matches_gem_and_survives_large_p():
    x = torch.rand(2, 5, 3, 3, generator=torch.Generator().manual_seed(0)) * 6
    assert torch.allclose(GeM64(3.0)(x), functional.gem(x, 3.0), rtol=1e-5)
    assert GeM64(3.0)(x).dtype == torch.float32
    x[:, :, 0, 0] = 6.0
    assert not torch.isfinite(functional.gem(x, 60.0)).all()  # float32 overflows at 6^60 ...
    big = GeM64(60.0)(x)
    assert torch.isfinite(big).all()  # ... float64 does not, and it is close to the max
    assert torch.allclose(big, x.amax((2, 3)), rtol=0.05)
    assert repr(GeM64(2.0)) == "GeM64(p=2, eps=1e-06)"
    with pytest.raises(ValueError, match="positive"):
        GeM64(0.0)


def test_gem_poolings_keys_and_errors():
    pools = gem_poolings([1, 2.5, 8])
    assert list(pools) == [1.0, 2.5, 8.0] and pools[2.5].p == 2.5
    with pytest.raises(ValueError, match="at least one"):
        gem_poolings([])


# ------------------------------------------------------------------------- many poolings
def test_describe_and_evaluate_many_repool_cached_maps():
    book = TinyBook()
    pools = {"mac": "mac", "spoc": "spoc"}
    X = describe_many(book, pools)
    f = book._f[40]
    assert torch.allclose(X["mac"], pool_fmaps(f, "mac")) and torch.allclose(X["spoc"], pool_fmaps(f, "spoc"))
    m = evaluate_many(book, pools)
    ranks = rank_database(X["spoc"], X["spoc"])
    assert m["spoc"]["mAP"] == pytest.approx(map_by_labels(ranks, book.labels)["mAP"])
    m2, X2, Q2 = evaluate_many(book, pools, image_size=48, return_descriptors=True)
    assert Q2 is X2 and ("database", 48) in book.fmap_calls
    with pytest.raises(ValueError, match="empty"):
        describe_many(book, {})


def test_describe_many_runs_the_backbone_once_when_maps_are_not_kept(monkeypatch):
    import retrieval_lib.engine.extract as extract

    calls = []

    def fake_extract(model, images, pooling, scales, image_size, device, batch_size, progress):
        calls.append((dict(pooling), scales, image_size))
        return {k: torch.zeros(len(images), 3) for k in pooling}

    monkeypatch.setattr(extract, "extract_descriptors", fake_extract)
    book = TinyBook(keeps=False)
    out = describe_many(book, {"a": "mac", "b": "spoc"}, image_size=40)
    assert len(calls) == 1 and set(calls[0][0]) == {"a", "b"} and calls[0][2] == 40
    assert set(out) == {"a", "b"} and book.fmap_calls == []


def test_sweep_p_matches_direct_gem_and_spoc():
    book = TinyBook()
    res = sweep_p(book, [1.0, 3.0, 30.0])
    assert list(res["p"]) == [1.0, 3.0, 30.0] and len(res["metrics"]) == 3
    f = book._f[40]
    spoc = book.evaluate(pool_fmaps(f, "spoc"))["mAP"]
    gem3 = book.evaluate(pool_fmaps(f, lambda x: functional.gem(x.double(), 3.0).float()))["mAP"]
    assert res["mAP"][0] == pytest.approx(spoc, abs=1e-12)  # p = 1 is SPoC
    assert res["mAP"][1] == pytest.approx(gem3, abs=1e-12)
    assert res["mAP"][0] != res["mAP"][2]  # the sweep does change the descriptor


def test_sweep_image_size_per_size_values():
    book = TinyBook()
    res = sweep_image_size(book, [32, 48], {"mac": "mac", "spoc": "spoc"}, progress=False)
    assert list(res["size"]) == [32, 48]
    for label in ("mac", "spoc"):
        for k, s in enumerate([32, 48]):
            X = pool_fmaps(book._f[s], label)
            assert res["mAP"][label][k] == pytest.approx(book.evaluate(X)["mAP"], abs=1e-12)
            assert torch.allclose(res["X"][label][s], X)
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
def test_query_aps_group_set_by_hand_and_mean():
    bench = GroupDataset(["a", "b", "c", "d"], [0, 0, 1, 1])
    ranks = np.array([[0, 2, 1, 3],   # query 0: positive 1 at rank 1 after junk 0 and wrong 2
                      [1, 0, 2, 3],   # query 1: its positive first
                      [2, 3, 0, 1],
                      [3, 0, 1, 2]])  # query 3: positive 2 last
    aps = query_aps(bench, ranks)
    # trapezoid AP (revisited protocol), junk removed: query 0 has its positive at
    # position 1 -> 1/2 (0/1 + 1/2) = 0.25; query 3 at position 2 -> 1/2 (0/2 + 1/3) = 1/6
    assert aps == pytest.approx([0.25, 1.0, 1.0, 1 / 6])
    assert np.nanmean(aps) == pytest.approx(bench.evaluate(ranks)["mAP"])


def test_query_aps_revisited_medium_protocol():
    gnd = [{"easy": [0], "hard": [3], "junk": [1]}, {"easy": [], "hard": [2], "junk": []},
           {"easy": [], "hard": [], "junk": [0]}]
    bench = SimpleNamespace(queries=["q0", "q1", "q2"], gnd=gnd)
    ranks = np.array([[1, 0, 2, 3], [0, 1, 2, 3], [3, 2, 1, 0]])
    aps = query_aps(bench, ranks)
    want = compute_map(ranks, [{"ok": [0, 3], "junk": [1]}, {"ok": [2], "junk": []}, {"ok": [], "junk": [0]}])[1]
    assert np.allclose(aps, want, equal_nan=True) and np.isnan(aps[2])
    assert np.nanmean(aps) == pytest.approx(evaluate_revisited(ranks, gnd)["medium"]["mAP"])


def test_query_aps_needs_a_ground_truth():
    with pytest.raises(TypeError, match="neither group labels"):
        query_aps(SimpleNamespace(queries=None), np.zeros((1, 1), dtype=np.int64))


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


# ------------------------------------------------------------------------- fmaps_of
def test_fmaps_of_cached_and_extracted(monkeypatch):
    book = TinyBook()
    got = fmaps_of(book, [4, 0])
    assert got[0] is book._f[40][4] and got[1] is book._f[40][0]
    with pytest.raises(IndexError, match="outside"):
        fmaps_of(book, [15])

    import retrieval_lib.engine.extract as extract

    seen = {}

    def fake_extract_fmaps(model, images, image_size, device, batch_size, progress):
        seen["paths"] = list(images.paths)
        seen["size"] = image_size
        return ["m"] * len(images)

    monkeypatch.setattr(extract, "extract_fmaps", fake_extract_fmaps)
    book = TinyBook(keeps=False)
    assert fmaps_of(book, [2, 7]) == ["m", "m"]
    assert [p.split("/")[-1] for p in seen["paths"]] == ["img2.jpg", "img7.jpg"] and seen["size"] == 40
    assert book.fmap_calls == []  # no pass over the whole set


# ------------------------------------------------------------------------- small helpers
def test_top_results_group_set_skips_the_query():
    bench = GroupDataset(["a", "b", "c", "d"], [0, 0, 1, 1])
    ranks = np.array([[0, 2, 1, 3], [1, 0, 2, 3], [2, 3, 0, 1], [3, 0, 1, 2]])
    assert top_results(bench, ranks, 0, k=2) == ([2, 1], [False, True])
    assert top_results(bench, ranks, 3, k=5) == ([0, 1, 2], [False, False, True])


def test_top_results_revisited_marks_junk_as_none():
    bench = SimpleNamespace(queries=["q"], gnd=[{"easy": [2], "hard": [0], "junk": [1]}])
    assert top_results(bench, np.array([[1, 2, 3, 0]]), 0, k=4) == ([1, 2, 3, 0], [None, True, False, True])
    with pytest.raises(TypeError, match="neither group labels"):
        top_results(SimpleNamespace(queries=None), np.zeros((1, 1), dtype=np.int64), 0)


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
