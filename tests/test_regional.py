"""retrieval_lib.book.regional against plain references: grid sizes, region levels and counts,
mAP against L on a real session over tiny benchmarks (tests/_fakes.py), and DBA + alpha-QE
against loops."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

import retrieval_lib.layers.functional as F
from _fakes import cub_benchmark, group_benchmark, group_map_loop, recall1_loop, revisited_benchmark, tiny_book
from retrieval_lib.book.regional import aspect_crop, fmap_size, map_vs_L, region_count_table, region_levels
from retrieval_lib.data.images import resize_longer_side
from retrieval_lib.layers.pooling import RMAC
from retrieval_lib.search.rerank import exclude_self, expand


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
    # the crop is resized exactly as the network input is (same filter, same rounding)
    got = aspect_crop(img, 4 / 3 + 0.1, long_side=97)
    want = resize_longer_side(aspect_crop(img, 4 / 3 + 0.1), 97)
    assert got.size == want.size and np.array_equal(np.asarray(got), np.asarray(want))


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
# map_vs_L on a real session over tiny benchmarks
# ----------------------------------------------------------------------------------------
def _rmac_by_hand(maps, L, include_global=True):
    return torch.stack([F.l2n(F.rmac(m[None], L=L, include_global=include_global))[0] for m in maps])


def test_map_vs_L_equals_pooling_and_scoring_each_L_by_hand(tmp_path):
    bench = group_benchmark(tmp_path)
    book = tiny_book(tmp_path, bench)
    got = map_vs_L(book, Ls=(1, 2, 3))
    assert list(got) == [1, 2, 3]
    maps = book.fmaps()
    for L in (1, 2, 3):
        assert got[L] == pytest.approx(group_map_loop(_rmac_by_hand(maps, L), bench.labels), abs=1e-12)
    no_global = map_vs_L(book, Ls=(2,), include_global=False)
    assert no_global[2] == pytest.approx(group_map_loop(_rmac_by_hand(maps, 2, False), bench.labels), abs=1e-12)
    assert no_global[2] != got[2]


def test_map_vs_L_same_with_and_without_kept_maps(tmp_path):
    bench = group_benchmark(tmp_path)
    kept = map_vs_L(tiny_book(tmp_path / "a", bench, scale="smoke"), Ls=(1, 2))
    direct = map_vs_L(tiny_book(tmp_path / "b", bench, scale="full"), Ls=(1, 2))
    assert kept == pytest.approx(direct, abs=1e-9)


def test_map_vs_L_reports_each_benchmark_headline(tmp_path):
    """Default key: the benchmark's headline -- Medium mAP on revisited, R@1 on CUB (was "mAP": KeyError)."""
    rev = revisited_benchmark(tmp_path / "rev")
    book = tiny_book(tmp_path / "rev", rev)
    got = map_vs_L(book, Ls=(1, 2))
    for L in (1, 2):
        X = _rmac_by_hand(book.fmaps(), L)
        Q = _rmac_by_hand(book.fmaps("queries"), L)
        assert got[L] == rev.evaluate(torch.argsort(Q @ X.T, dim=1, descending=True).numpy())["mAP/medium"]
    cub = cub_benchmark(tmp_path / "cub")
    book = tiny_book(tmp_path / "cub", cub)
    got = map_vs_L(book, Ls=(1, 2))
    assert got[2] == pytest.approx(recall1_loop(_rmac_by_hand(book.fmaps(), 2), cub.labels), abs=1e-12)


def test_map_vs_L_other_key_scales_and_errors(tmp_path):
    bench = group_benchmark(tmp_path)
    book = tiny_book(tmp_path, bench, scales=(1.0, 0.5))
    one = map_vs_L(book, Ls=(2,), key="R@1", scales=[1])
    X = _rmac_by_hand(book.fmaps(), 2)
    assert one[2] == pytest.approx(bench.evaluate(torch.argsort(X @ X.T, dim=1, descending=True).numpy())["R@1"])
    two = map_vs_L(book, Ls=(2,))  # the book's two scales
    X2 = book.describe(RMAC(L=2), scales=(1.0, 0.5))
    assert two[2] == pytest.approx(group_map_loop(X2, bench.labels), abs=1e-12)
    with pytest.raises(KeyError, match="R@100"):
        map_vs_L(book, Ls=(1,), key="R@100")
    with pytest.raises(ValueError):
        map_vs_L(book, Ls=())


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


@pytest.mark.parametrize("n_qe,n_dba,alpha", [(2, 0, 3.0), (3, 1, 3.0), (1, 0, 0.0), (4, 0, 1.5)])
def test_expand_self_queries_match_loops(n_qe, n_dba, alpha):
    X = _unit(15, 8, 0)
    Xa, Qa = expand(X, n_qe=n_qe, n_dba=n_dba, alpha=alpha)
    torch.testing.assert_close(Xa, X)
    torch.testing.assert_close(Qa, _loop_qe(X, X, n_qe, alpha, skip_self=True))


@pytest.mark.parametrize("n_qe,n_dba", [(0, 3), (3, 4), (1, 2)])
def test_expand_refuses_dba_when_the_queries_are_the_database(n_qe, n_dba):
    """DBA over a database that holds the query mixes the query into its positives (optimistic):
    expand refuses and names expanded_ranks, which leaves each query out (tests/test_rerank.py)."""
    with pytest.raises(ValueError, match="expanded_ranks"):
        expand(_unit(15, 8, 0), n_qe=n_qe, n_dba=n_dba)


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

    from retrieval_lib.book.viz_regions import show_region_macs

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

    from retrieval_lib.book.viz_regions import show_region_levels

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
