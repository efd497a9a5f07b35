"""retrieval_lib.data.views: augmented views and composites, seeded, cached as files."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval_lib.data.datasets import GroupDataset
from retrieval_lib.data.views import augment, composite, make_views
from retrieval_lib.files import build_once, files_fingerprint


def _groups(folder, groups=3, per=2):
    rng = np.random.default_rng(0)
    for g in range(groups):
        (folder / f"g{g}").mkdir(parents=True)
        for k in range(per):
            Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)).save(folder / f"g{g}" / f"{k}.png")
    return GroupDataset.from_folder(folder)


def test_views_and_composites_keep_their_source_group(tmp_path):
    ds = _groups(tmp_path / "imgs")
    vs = make_views(ds, n_views=2, n_composites=1, seed=0, max_side=96, cache_dir=tmp_path / "cache", progress=False)
    n = len(ds.labels)
    assert len(vs) == n * 4
    assert vs.kind.tolist() == ["original"] * n + (["view"] * 2 + ["composite"]) * n
    assert vs.paths[:n] == list(ds.database.paths)  # originals are used in place
    assert (vs.labels == ds.labels[vs.source]).all()  # every image keeps its source's group
    for p, kind in zip(vs.paths[n:], vs.kind[n:]):
        with Image.open(p) as im:
            assert 48 <= max(im.size) <= 96  # 50-100 % of max_side
    assert "6 originals, 12 views, 6 composites" in vs.summary()


def test_make_views_is_seeded_and_reuses_its_folder(tmp_path):
    ds = _groups(tmp_path / "imgs")
    a = make_views(ds, n_views=1, n_composites=1, seed=3, max_side=96, cache_dir=tmp_path / "c", progress=False)
    stamp = {p: Path(p).stat().st_mtime_ns for p in a.paths[6:]}
    b = make_views(ds, n_views=1, n_composites=1, seed=3, max_side=96, cache_dir=tmp_path / "c", progress=False)
    assert b.paths == a.paths and {p: Path(p).stat().st_mtime_ns for p in b.paths[6:]} == stamp  # not rebuilt
    other = make_views(ds, n_views=1, n_composites=1, seed=4, max_side=96, cache_dir=tmp_path / "c2",
                       progress=False)
    assert other.folder.name != a.folder.name  # the seed is part of the fingerprint
    same_seed_elsewhere = make_views(ds, n_views=1, n_composites=1, seed=3, max_side=96, cache_dir=tmp_path / "c3",
                                     progress=False)
    for p, q, r in zip(a.paths[6:], same_seed_elsewhere.paths[6:], other.paths[6:]):
        assert open(p, "rb").read() == open(q, "rb").read()  # the same seed gives the same pixels
    assert any(open(p, "rb").read() != open(r, "rb").read() for p, r in zip(a.paths[6:], other.paths[6:]))


def test_no_views_returns_the_originals(tmp_path):
    ds = _groups(tmp_path / "imgs")
    vs = make_views(ds, n_views=0, n_composites=0, cache_dir=tmp_path / "c")
    assert vs.paths == list(ds.database.paths) and vs.folder is None


def test_augment_and_composite_shapes():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (80, 120, 3), dtype=np.uint8))
    out = augment(img, np.random.default_rng(1), max_side=128)
    assert out.mode == "RGB" and 64 <= max(out.size) <= 128
    bg = Image.fromarray(np.zeros((100, 100, 3), dtype=np.uint8))
    comp = np.asarray(composite(img, bg, np.random.default_rng(2), max_side=100))
    pasted = comp.any(axis=2)
    assert 0.1 < pasted.mean() < 0.6  # a piece of the foreground sits on the black background


@pytest.mark.parametrize("kw, match", [(dict(n_views=-1), "n_views"), (dict(n_composites=1.5), "n_composites"),
                                       (dict(max_side=32), "max_side")])
def test_make_views_errors(tmp_path, kw, match):
    ds = _groups(tmp_path / "imgs", groups=2, per=1)
    with pytest.raises(ValueError, match=match):
        make_views(ds, cache_dir=tmp_path / "c", **kw)


def test_composite_returns_the_box_it_pasted():
    rng = np.random.default_rng(0)
    fg = Image.fromarray(rng.integers(50, 256, (80, 120, 3), dtype=np.uint8))  # no black pixel
    bg = Image.fromarray(np.zeros((100, 150, 3), dtype=np.uint8))
    for seed in range(5):
        out, (x0, y0, x1, y1) = composite(fg, bg, np.random.default_rng(seed), max_side=150, return_box=True)
        pasted = np.asarray(out).any(axis=2)  # (H, W) where the foreground landed
        ys, xs = np.nonzero(pasted)
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)
        assert pasted[y0:y1, x0:x1].all() and pasted.sum() == (x1 - x0) * (y1 - y0)
        # the same draw without the box gives the same pixels
        same = composite(fg, bg, np.random.default_rng(seed), max_side=150)
        assert np.array_equal(np.asarray(same), np.asarray(out))


def test_view_set_records_the_box_of_each_composite(tmp_path):
    ds = _groups(tmp_path / "imgs")
    vs = make_views(ds, n_views=1, n_composites=1, seed=0, max_side=96, cache_dir=tmp_path / "cache", progress=False)
    assert vs.boxes.shape == (len(vs), 4)
    is_comp = vs.kind == "composite"
    assert np.isnan(vs.boxes[~is_comp]).all() and np.isfinite(vs.boxes[is_comp]).all()
    for path, box, src in zip(np.array(vs.paths)[is_comp], vs.boxes[is_comp], vs.source[is_comp]):
        # the recorded box is the one composite() draws from the same seed
        rng = np.random.default_rng([0, int(src), 1000])
        others = np.flatnonzero(ds.labels != ds.labels[src])
        j = int(others[rng.integers(len(others))])
        _, want = composite(ds.database[int(src)], ds.database[j], rng, 96, return_box=True)
        assert tuple(box) == want
        with Image.open(path) as im:
            W, H = im.size
        assert 0 <= box[0] < box[2] <= W and 0 <= box[1] < box[3] <= H
    again = make_views(ds, n_views=1, n_composites=1, seed=0, max_side=96, cache_dir=tmp_path / "cache",
                       progress=False)  # read back from views.json
    assert np.array_equal(again.boxes, vs.boxes, equal_nan=True)


def test_build_once_builds_a_folder_once_and_rebuilds_an_unfinished_one(tmp_path):
    calls = []

    def build(tmp):
        calls.append(tmp)
        (tmp / "a.txt").write_text("made")
        return {"rows": ["a.txt"]}

    final = tmp_path / "cache" / "abc"
    index = build_once(final, "index.json", build)
    assert index == final / "index.json" and (final / "a.txt").read_text() == "made" and len(calls) == 1
    assert build_once(final, "index.json", build) == index and len(calls) == 1  # reused, not rebuilt
    index.unlink()  # a folder without its index: an interrupted build
    build_once(final, "index.json", build)
    assert len(calls) == 2 and index.is_file()
    assert sorted(p.name for p in final.parent.iterdir()) == ["abc"]  # no temporary folder left


def test_files_fingerprint_follows_the_files_and_the_settings(tmp_path):
    f = tmp_path / "x.jpg"
    f.write_bytes(b"1")
    a = files_fingerprint([f], {"seed": 0})
    assert a == files_fingerprint([f], {"seed": 0}) and len(a) == 16
    assert a != files_fingerprint([f], {"seed": 1})
    f.write_bytes(b"12")  # another size
    assert a != files_fingerprint([f], {"seed": 0})
