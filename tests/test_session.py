"""retrieval_lib.book.session.Book: the one descriptor path of the notebooks.

A real session over tiny real benchmarks with a fixed stand-in backbone (tests/_fakes.py).
The checks are behavioural: both ways of computing descriptors (re-pooling the kept maps,
one backbone pass) give the same numbers, the self-query rule is the same everywhere, and
descriptors equal pooling each map by hand.
"""
import numpy as np
import pytest
import torch

from _fakes import group_benchmark, revisited_benchmark, tiny_book
from retrieval_lib.layers import functional
from retrieval_lib.layers.pooling import GeM, RMAC


@pytest.fixture
def groups(tmp_path):
    return group_benchmark(tmp_path)


def _by_hand(maps, fn):
    """Pool every map on its own and L2-normalise: the plain reference."""
    return torch.stack([functional.l2n(fn(m[None]))[0] for m in maps])


def test_describe_equals_pooling_each_map_by_hand(tmp_path, groups):
    book = tiny_book(tmp_path, groups)
    maps = book.fmaps()
    assert len(maps) == 15 and len({tuple(m.shape) for m in maps}) == 3  # three map shapes
    torch.testing.assert_close(book.describe("mac"), _by_hand(maps, functional.mac))
    many = book.describe({"mac": "mac", "gem": GeM(p=3.0, learn_p=False), "rmac": RMAC(L=2)})
    assert set(many) == {"mac", "gem", "rmac"}
    torch.testing.assert_close(many["mac"], _by_hand(maps, functional.mac))
    torch.testing.assert_close(many["gem"], _by_hand(maps, lambda x: functional.gem(x, 3.0)))
    torch.testing.assert_close(many["rmac"], _by_hand(maps, lambda x: functional.rmac(x, L=2)))


def test_kept_maps_and_one_backbone_pass_give_the_same_descriptors(tmp_path, groups):
    """smoke/cpu re-pool kept maps; full runs the backbone for all poolings: same numbers."""
    kept = tiny_book(tmp_path / "a", groups, scale="smoke")
    direct = tiny_book(tmp_path / "b", groups, scale="full")
    assert kept.keeps_fmaps and not direct.keeps_fmaps
    pools = {"mac": "mac", "spoc": "spoc", "rmac": RMAC(L=2)}
    a, b = kept.describe(pools), direct.describe(pools)
    for label in pools:
        torch.testing.assert_close(a[label], b[label], rtol=1e-5, atol=1e-6)
    assert direct._fmaps == {}  # the full-scale session kept no maps


def test_several_scales_average_descriptors_of_rescaled_inputs(tmp_path, groups):
    """At two scales the descriptor is l2n(mean over scales of the per-scale descriptors)."""
    book = tiny_book(tmp_path, groups)
    two = book.describe("mac", scales=(1.0, 0.5))
    per_scale = [_by_hand(book.fmaps(scale=s), functional.mac) for s in (1.0, 0.5)]
    torch.testing.assert_close(two, functional.l2n((per_scale[0] + per_scale[1]) / 2), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(two, per_scale[0])


def test_self_queries_are_the_database_everywhere(tmp_path, groups):
    book = tiny_book(tmp_path, groups)
    assert book.images("queries") is groups.database
    assert book.fmaps("queries") is book.fmaps("database")  # one extraction, not two
    assert book.describe("mac", "queries") is None
    assert book.describe({"a": "mac", "b": "spoc"}, "queries") == {"a": None, "b": None}
    X = book.describe("spoc")
    # Q=None and Q=X rank the same and score the same: the query itself is junk
    np.testing.assert_array_equal(book.rank(X), book.rank(X, X))
    assert book.evaluate(X) == book.evaluate(X, X)
    # ... and ranking itself first or last does not change a score
    ranks = book.rank(X)
    assert (ranks[:, 0] == np.arange(15)).all()
    moved = np.stack([np.r_[r[1:], r[:1]] for r in ranks])
    assert groups.evaluate(moved)["mAP"] == pytest.approx(book.evaluate(X)["mAP"], abs=1e-12)


def test_separate_queries_are_cropped_and_needed(tmp_path):
    bench = revisited_benchmark(tmp_path)
    book = tiny_book(tmp_path, bench)
    Q = book.describe("gem", "queries")
    X = book.describe("gem")
    assert Q.shape == (3, 8) and X.shape == (12, 8)
    # the query image is its box, as the protocol asks: 66 x 60 px, longer side -> 48
    assert book.image(0, "queries").size == (48, 44)
    torch.testing.assert_close(Q, _by_hand(book.fmaps("queries"), functional.gem))
    m = book.evaluate(X, Q)
    assert m["mAP/medium"] == bench.evaluate(book.rank(X, Q))["mAP/medium"]
    with pytest.raises(ValueError, match="3 separate queries: pass their descriptors"):
        book.evaluate(X)


def test_fmaps_of_some_images_at_any_scale(tmp_path, groups):
    kept = tiny_book(tmp_path / "a", groups, scale="smoke")
    direct = tiny_book(tmp_path / "b", groups, scale="full")
    every = kept.fmaps()
    for book in (kept, direct):
        got = book.fmaps(indices=[7, 2])
        torch.testing.assert_close(got[0], every[7])
        torch.testing.assert_close(got[1], every[2])
        torch.testing.assert_close(book.fmap(4), every[4])
    assert direct._fmaps == {}  # only the listed images went through the backbone
    assert kept.fmaps(indices=np.array([3]))[0] is every[3]
    with pytest.raises(IndexError, match=r"indices \[15\] are outside the 15 database images"):
        kept.fmap(15)
    with pytest.raises(IndexError, match="outside"):
        direct.fmaps(indices=[-1])


def test_fmaps_at_another_input_size(tmp_path, groups):
    book = tiny_book(tmp_path, groups)
    small = book.fmaps(image_size=32)
    assert {tuple(m.shape[-2:]) for m in small} == {(3, 4), (4, 3), (4, 4)}
    torch.testing.assert_close(book.describe("mac", image_size=32), _by_hand(small, functional.mac))


def test_describe_and_which_errors(tmp_path, groups):
    book = tiny_book(tmp_path, groups)
    with pytest.raises(ValueError, match="which must be 'database' or 'queries'"):
        book.describe("mac", "query")
    with pytest.raises(ValueError, match="which must be"):
        book.images("train")
    with pytest.raises(ValueError, match="dict of poolings is empty"):
        book.describe({})
