"""retrieval_lib.book.regional against plain references: grid sizes, region levels and counts,
sweeps over L on a fake book, and DBA + alpha-QE against loops."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import retrieval_lib.layers.functional as F
from retrieval_lib.search.evaluate import map_by_labels
from retrieval_lib.engine.extract import pool_fmaps
from retrieval_lib.search.rerank import exclude_self, expand
from retrieval_lib.book.regional import (
    aspect_crop,
    describe,
    fmap_size,
    map_vs_L,
    region_count_table,
    region_levels,
)


# ----------------------------------------------------------------------------------------
# fmap_size and aspect_crop
# ----------------------------------------------------------------------------------------
def test_fmap_size_is_ceil_division():
    for H in range(1, 130, 7):
        for W in (1, 31, 32, 33, 64, 65, 100):
            assert fmap_size((H, W)) == (math.ceil(H / 32), math.ceil(W / 32))
    assert fmap_size((224, 168)) == (7, 6)
    assert fmap_size((384, 512)) == (12, 16)
    assert fmap_size((10, 9), stride=4) == (3, 3)


@pytest.mark.parametrize("args", [((0, 5),), ((5,),), ((5, 5), 0), ((5.5, 5),), ((True, 5),)])
def test_fmap_size_rejects_bad_input(args):
    with pytest.raises(ValueError):
        fmap_size(*args)


def _gradient_image(w, h):
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[..., 0] = (np.arange(w)[None, :] % 256)
    arr[..., 1] = (np.arange(h)[:, None] % 256)
    return Image.fromarray(arr), arr


def test_aspect_crop_takes_the_centred_box():
    img, arr = _gradient_image(400, 300)
    sq = aspect_crop(img, 1.0)
    assert sq.size == (300, 300)
    assert np.array_equal(np.asarray(sq), arr[:, 50:350])
    wide = aspect_crop(img, 2.0)
    assert wide.size == (400, 200)
    assert np.array_equal(np.asarray(wide), arr[50:250, :])
    same = aspect_crop(img, 4 / 3)
    assert same.size == (400, 300)


def test_aspect_crop_resizes_the_long_side():
    img, _ = _gradient_image(400, 300)
    assert aspect_crop(img, 2.0, long_side=100).size == (100, 50)
    assert aspect_crop(img, 0.5, long_side=100).size == (50, 100)


@pytest.mark.parametrize("aspect", [0, -1.0, float("nan"), float("inf"), "4:3"])
def test_aspect_crop_rejects_bad_aspect(aspect):
    img, _ = _gradient_image(40, 30)
    with pytest.raises(ValueError):
        aspect_crop(img, aspect)


def test_aspect_crop_rejects_bad_long_side():
    img, _ = _gradient_image(40, 30)
    with pytest.raises(ValueError):
        aspect_crop(img, 1.0, long_side=0)


# ----------------------------------------------------------------------------------------
# region levels and counts
# ----------------------------------------------------------------------------------------
def test_region_levels_4_to_3_by_hand():
    # 24 x 32 at L = 3: 2 regions of side 24, 3 x 2 of side 16, 4 x 3 of side 12
    assert region_levels(24, 32, 3).tolist() == [1] * 2 + [2] * 6 + [3] * 12


def test_region_levels_match_region_sides():
    # reference: on maps whose short side is >= 12, the square side floor(2 w / (l + 1))
    # is different at every level l = 1..4, so the side of a region names its level
    for H, W in [(12, 12), (12, 16), (16, 12), (13, 29), (24, 32), (40, 17), (20, 60)]:
        w = min(H, W)
        side_to_level = {(2 * w) // (l + 1): l for l in range(1, 5)}
        assert len(side_to_level) == 4
        regions = F.rmac_regions(H, W, 4)
        expected = [side_to_level[int(r[2])] for r in regions]
        assert region_levels(H, W, 4).tolist() == expected, (H, W)


def test_region_levels_skip_empty_levels():
    # a 1 x 1 map has one region at level 1; levels 2, 3 have side 0 and are skipped
    assert F.rmac_regions(1, 1, 3).shape[0] == 1
    assert region_levels(1, 1, 3).tolist() == [1]


def test_region_levels_rejects_bad_L():
    with pytest.raises(ValueError):
        region_levels(10, 10, 0)


def test_region_count_table_by_hand():
    header, rows = region_count_table([(4, 3), (1, 1), 0.75, (3, 4)], Ls=(1, 2, 3, 4), long_side=32)
    assert header == ["aspect (w:h)", "H", "W", "L=1", "L=2", "L=3", "L=4"]
    # 4:3 -> 24 x 32: one extra region along the long side at every level:
    # 2, 2 + 3*2, 8 + 4*3, 20 + 5*4
    assert rows[0] == ["4:3", 24, 32, 2, 8, 20, 40]
    # square: 1, 1 + 4, 5 + 9, 14 + 16
    assert rows[1] == ["1:1", 32, 32, 1, 5, 14, 30]
    assert rows[2][1:] == [32, 24, 2, 8, 20, 40]  # width / height = 0.75 is 3:4
    assert rows[3][1:] == rows[2][1:]


def test_region_count_table_matches_rmac_regions():
    _, rows = region_count_table([(16, 9), (2, 1), (3, 2)], Ls=(1, 3), long_side=16)
    for label, H, W, n1, n3 in rows:
        assert max(H, W) == 16
        assert (n1, n3) == (len(F.rmac_regions(H, W, 1)), len(F.rmac_regions(H, W, 3)))
    assert rows[1][1:3] == [8, 16]


@pytest.mark.parametrize("kwargs", [
    dict(aspects=[]),
    dict(aspects=[(4, 0)]),
    dict(aspects=[(4, 3, 1)]),
    dict(aspects=[-2.0]),
    dict(aspects=[(4, 3)], Ls=()),
    dict(aspects=[(4, 3)], Ls=(0,)),
    dict(aspects=[(4, 3)], long_side=0),
])
def test_region_count_table_rejects_bad_input(kwargs):
    with pytest.raises(ValueError):
        region_count_table(**kwargs)


# ----------------------------------------------------------------------------------------
# describe and map_vs_L on a small fake book
# ----------------------------------------------------------------------------------------
class FakeBook:
    """The parts of retrieval_lib.book.Book that describe/map_vs_L use, over fixed maps."""

    def __init__(self, fmaps, labels, keeps_fmaps=True, scales=(1.0,), query_fmaps=None):
        self.cfg = SimpleNamespace(scales=scales)
        self.keeps_fmaps = keeps_fmaps
        self.benchmark = SimpleNamespace(queries=None if query_fmaps is None else "some queries")
        self._maps = {"database": fmaps, "queries": query_fmaps}
        self.labels = np.asarray(labels)
        self.calls = []

    def descriptors(self, pooling, which="database", scales=None):
        self.calls.append((which, tuple(scales), isinstance(pooling, dict)))
        if isinstance(pooling, dict):
            return {k: pool_fmaps(self._maps[which], p) for k, p in pooling.items()}
        return pool_fmaps(self._maps[which], pooling)

    def evaluate(self, X, Q=None):
        Q = X if Q is None else Q
        ranks = torch.argsort(Q @ X.T, dim=1, descending=True).numpy()
        return {"mAP": float(map_by_labels(ranks, self.labels)["mAP"]), "n_db": float(len(X))}


def _fmaps(n, C=6, H=9, W=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(C, H, W, generator=g, dtype=torch.float64) for _ in range(n)]


def _labels(n):
    return np.arange(n) // 3  # groups of three


def test_map_vs_L_equals_pooling_and_evaluating_each_L():
    maps, labels = _fmaps(12), _labels(12)
    book = FakeBook(maps, labels)
    got = map_vs_L(book, Ls=(1, 2, 3))
    x = torch.stack(maps)
    for L in (1, 2, 3):
        ref = book.evaluate(F.rmac(x, L=L))["mAP"]
        assert got[L] == pytest.approx(ref, abs=1e-12)
    assert list(got) == [1, 2, 3]
    no_global = map_vs_L(book, Ls=(2,), include_global=False)
    assert no_global[2] == pytest.approx(book.evaluate(F.rmac(x, L=2, include_global=False))["mAP"], abs=1e-12)


def test_map_vs_L_other_key_and_missing_key():
    book = FakeBook(_fmaps(6), _labels(6), scales=(1.0, 0.5))
    assert map_vs_L(book, Ls=(1,), key="n_db", scales=[1]) == {1: 6.0}
    assert book.calls == [("database", (1.0,), False)]  # one scale asked: the cached maps
    map_vs_L(book, Ls=(1, 2), key="n_db")  # the book's two scales: one pass for both L
    assert book.calls[1:] == [("database", (1.0, 0.5), True)]
    with pytest.raises(KeyError, match="n_db"):
        map_vs_L(book, Ls=(1,), key="R@100")
    with pytest.raises(ValueError):
        map_vs_L(book, Ls=())


def test_describe_reads_cached_maps_per_pooling_at_one_scale():
    maps = _fmaps(5)
    book = FakeBook(maps, _labels(5))
    out = describe(book, {"mac": "mac", "r": F.rmac})
    assert set(out) == {"mac", "r"}
    X, Q = out["mac"]
    assert Q is None
    torch.testing.assert_close(X, F.l2n(torch.stack(maps).amax(dim=(-2, -1))))
    assert book.calls == [("database", (1.0,), False)] * 2


def test_describe_one_pass_for_several_scales_and_queries():
    maps, qmaps = _fmaps(5), _fmaps(2, seed=1)
    book = FakeBook(maps, _labels(5), query_fmaps=qmaps)
    out = describe(book, {"mac": "mac", "gem": "gem"}, scales=(1, 0.5))
    assert book.calls == [("database", (1.0, 0.5), True), ("queries", (1.0, 0.5), True)]
    X, Q = out["gem"]
    assert X.shape == (5, 6) and Q.shape == (2, 6)
    # a book that keeps no maps (full scale) always takes the one-pass path
    book = FakeBook(maps, _labels(5), keeps_fmaps=False)
    describe(book, {"mac": "mac"})
    assert book.calls == [("database", (1.0,), True)]
    with pytest.raises(ValueError):
        describe(book, {})


# ----------------------------------------------------------------------------------------
# exclude_self
# ----------------------------------------------------------------------------------------
def _loop_exclude_self(R):
    out = []
    for q, row in enumerate(R.tolist()):
        out.append([j for j in row if j != q] if q in row else row[:-1])
    return np.array(out)


def test_exclude_self_matches_loop():
    rng = np.random.default_rng(0)
    for k in (2, 3, 7, 10):
        R = np.stack([rng.permutation(10)[:k] for _ in range(10)])
        assert np.array_equal(exclude_self(R), _loop_exclude_self(R))
        assert exclude_self(torch.from_numpy(R)).dtype == np.int64
    R = np.array([[0, 1, 2], [0, 2, 1], [2, 0, 1]])  # row 2: self first; row 1: self last
    assert exclude_self(R).tolist() == [[1, 2], [0, 2], [0, 1]]


@pytest.mark.parametrize("R", [np.arange(4), np.zeros((3, 1), dtype=int), np.zeros((2, 3))])
def test_exclude_self_rejects_bad_ranks(R):
    with pytest.raises((ValueError, TypeError)):
        exclude_self(R)


# ----------------------------------------------------------------------------------------
# expand: DBA then alpha-QE against loops
# ----------------------------------------------------------------------------------------
def _unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)


EPS = 1e-6  # l2n's eps: x / (||x|| + eps), as the library normalises


def _loop_dba(X, n, alpha):
    out = []
    for x in X:
        sims = [float(x @ y) for y in X]
        order = sorted(range(len(X)), key=lambda j: -sims[j])[:n]
        v = sum(max(sims[j], 0.0) ** alpha * X[j] for j in order)
        out.append(v / (v.norm() + EPS))
    return torch.stack(out)


def _loop_qe(Q, X, n, alpha, skip_self):
    out = []
    for q_idx, q in enumerate(Q):
        sims = [float(q @ y) for y in X]
        order = [j for j in sorted(range(len(X)), key=lambda j: -sims[j]) if not (skip_self and j == q_idx)]
        v = q.clone()
        for j in order[:n]:
            v = v + max(sims[j], 0.0) ** alpha * X[j]
        out.append(v / (v.norm() + EPS))
    return torch.stack(out)


@pytest.mark.parametrize("n_qe,n_dba,alpha", [(2, 0, 3.0), (0, 3, 3.0), (3, 4, 3.0), (1, 2, 0.0), (4, 2, 1.5)])
def test_expand_self_queries_match_loops(n_qe, n_dba, alpha):
    X = _unit(15, 8, 0)
    Xa, Qa = expand(X, n_qe=n_qe, n_dba=n_dba, alpha=alpha)
    Xref = _loop_dba(X, n_dba, alpha) if n_dba >= 2 else X
    torch.testing.assert_close(Xa, Xref)
    Qref = _loop_qe(X, Xref, n_qe, alpha, skip_self=True) if n_qe else X
    torch.testing.assert_close(Qa, Qref)


def test_expand_separate_queries_match_loops():
    X, Q = _unit(15, 8, 0), _unit(4, 8, 1)
    Xa, Qa = expand(X, Q, n_qe=3, n_dba=2, alpha=3.0)
    Xref = _loop_dba(X, 2, 3.0)
    torch.testing.assert_close(Xa, Xref)
    torch.testing.assert_close(Qa, _loop_qe(Q, Xref, 3, 3.0, skip_self=False))


def test_expand_identity_settings():
    X = _unit(6, 4, 2)
    Xa, Qa = expand(X, n_qe=0, n_dba=1)
    assert Xa is X and Qa is X


@pytest.mark.parametrize("kwargs", [dict(n_dba=7), dict(n_qe=6), dict(n_qe=-1), dict(alpha=-1.0),
                                    dict(alpha=float("nan")), dict(n_qe=1.5)])
def test_expand_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        expand(_unit(6, 4, 2), **kwargs)


# ----------------------------------------------------------------------------------------
# the picture of region MACs
# ----------------------------------------------------------------------------------------
def test_show_region_macs_orders_channels_by_the_last_row():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from retrieval_lib.book.viz import show_region_macs

    V = torch.tensor([[0.0, 1.0, 0.0, 0.2], [0.5, 0.0, 0.5, 0.1], [0.1, 0.6, 0.3, 0.0]])
    fig = show_region_macs(V, ["a", "b", "sum"], top=3)
    shown = fig.axes[0].images[0].get_array()
    assert np.allclose(shown, V[:, [1, 2, 0]].numpy())
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["1", "2", "0"]
    plt.close(fig)
    with pytest.raises(ValueError):
        show_region_macs(V, ["a", "b"])


def test_show_region_levels_draws_each_level_in_its_panel():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from retrieval_lib.book.viz import show_region_levels

    img, _ = _gradient_image(320, 240)
    regions = F.rmac_regions(24, 32, 3)
    fig = show_region_levels(img, regions, (24, 32), region_levels(24, 32, 3), cols=2)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 3  # levels 1, 2, 3 on a 2 x 2 grid; the fourth panel is off
    counts = [sum(isinstance(p, Rectangle) for p in ax.patches) for ax in panels]
    assert counts == [2, 6, 12]
    assert panels[2].get_title() == "level 3: 12 squares of 12x12 cells"
    plt.close(fig)
    with pytest.raises(ValueError):
        show_region_levels(img, regions, (24, 32), [1, 2])
