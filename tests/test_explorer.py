"""The explorer of notebooks/10_explorer.ipynb: its pure computations against hand-worked cases and plain
loops, its input checks (every bad input a message), and its page driven in the kernel (no browser:
``tests/test_browser_explorer.py`` drives it in Chromium).

The backbone is :class:`_fakes.TinyBackbone` (a seeded strided convolution), so maps take milliseconds.
"""
import io
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from _fakes import TinyBackbone, write_groups
from retrieval_lib.book.explorer import (MAX_PIXELS, Collection, Explorer, ExplorerInputError, collection_from_folder,
                                         huge_png, measure_redraws, read_photo, show_rows, try_bad_inputs)
from retrieval_lib.book.sweeps import gem_contributions
from retrieval_lib.data.images import load_image, resize_longer_side
from retrieval_lib.errors import UsageError
from retrieval_lib.layers.contributions import rmac_contributions
from retrieval_lib.layers.functional import gem, l2n, mac, rmac, spoc
from retrieval_lib.search.topk import compare_rows, top_k_rows


# ---------------------------------------------------------------- R-MAC's score, region by region
def test_rmac_contributions_hand_worked():
    # 2 x 3 map, L = 1: two 2x2 squares (columns 0-1 and 1-2) and the whole map.
    # channel 0 peaks (3) in column 0, channel 1 (4) in column 2:
    # u_A = (1, 0), u_B = (0, 1), u_whole = (3, 4) / 5; v = (1.6, 1.8), |v| = sqrt(5.8)
    f = torch.zeros(2, 2, 3, dtype=torch.float64)
    f[0, 0, 0], f[1, 0, 2] = 3.0, 4.0
    c, regions = rmac_contributions(torch.tensor([1.0, 0.0], dtype=torch.float64), f, L=1, eps=1e-12)
    assert regions.tolist() == [[0, 0, 2, 2], [1, 0, 2, 2], [0, 0, 3, 2]]
    assert c.tolist() == pytest.approx([1 / math.sqrt(5.8), 0.0, 0.6 / math.sqrt(5.8)], abs=1e-12)
    assert float(c.sum()) == pytest.approx(1.6 / math.sqrt(5.8), abs=1e-12)


@pytest.mark.parametrize("L,include_global", [(1, True), (3, True), (3, False), (5, True)])
def test_rmac_contributions_sum_to_the_score(L, include_global):
    g = torch.Generator().manual_seed(L)
    fq, fx = torch.rand(16, 7, 11, generator=g, dtype=torch.float64), torch.rand(16, 9, 6, generator=g, dtype=torch.float64)
    q = rmac(fq[None], L=L, include_global=include_global)[0]
    c, regions = rmac_contributions(q, fx, L=L, include_global=include_global)
    score = float(q @ rmac(fx[None], L=L, include_global=include_global)[0])
    assert float(c.sum()) == pytest.approx(score, abs=1e-12)
    # each part by the plain formula: q . l2n(region MAC) / |sum of the unit region MACs|
    units = [l2n(fx[:, y:y + h, x:x + w].amax(dim=(1, 2))) for x, y, w, h in regions.tolist()]
    v = torch.stack(units).sum(0)
    assert c.tolist() == pytest.approx([float(q @ u / (v.norm() + 1e-6)) for u in units], abs=1e-12)


def test_rmac_contributions_refuses_bad_shapes():
    with pytest.raises(ValueError, match=r"one feature map \(C, h, w\)"):
        rmac_contributions(torch.ones(4), torch.ones(1, 4, 3, 3))
    with pytest.raises(ValueError, match="descriptor of the map's 4 channels"):
        rmac_contributions(torch.ones(5), torch.ones(4, 3, 3))


# ---------------------------------------------------------------- GeM's share map
def test_gem_share_map_hand_worked():
    x = torch.tensor([[[1.0, 3.0]]])  # one channel, two cells
    assert gem_contributions(x, 1.0)[0].tolist() == pytest.approx([0.25, 0.75])  # SPoC: by activation
    assert gem_contributions(x, 2.0)[0].tolist() == pytest.approx([0.1, 0.9])  # 1 / (1 + 9), 9 / (1 + 9)
    two = torch.tensor([[[1.0, 3.0]], [[2.0, 2.0]]])  # the mean over channels of each channel's shares
    assert gem_contributions(two, 1.0)[0].tolist() == pytest.approx([(0.25 + 0.5) / 2, (0.75 + 0.5) / 2])


# ---------------------------------------------------------------- top-k rows and their comparison
def test_top_k_rows_equal_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    X = {"a": l2n(torch.rand(12, 5, generator=g)), "b": l2n(torch.rand(12, 3, generator=g))}
    for exclude in (None, 4):
        rows = top_k_rows({m: X[m][4] for m in X}, X, k=5, exclude=exclude)
        for row, m in zip(rows, X):
            scores = [(float(X[m][i] @ X[m][4]), i) for i in range(12) if i != exclude]
            best = sorted(scores, key=lambda t: -t[0])[:5]
            assert row.label == m and list(row.indices) == [i for _, i in best]
            assert list(row.scores) == pytest.approx([s for s, _ in best])
    assert len(top_k_rows({"a": X["a"][0]}, {"a": X["a"][:3]}, k=10, exclude=0)[0].indices) == 2  # k cut to what is left


def test_top_k_rows_errors():
    X = {"a": torch.eye(3)}
    with pytest.raises(ValueError, match="no collection descriptors"):
        top_k_rows({"b": torch.ones(3)}, X, 1)
    with pytest.raises(ValueError, match="outside the collection"):
        top_k_rows({"a": torch.ones(3)}, X, 1, exclude=3)
    with pytest.raises(ValueError, match="nothing to rank"):
        top_k_rows({"a": torch.ones(3)}, {"a": torch.eye(3)[:1]}, 1, exclude=0)
    with pytest.raises(ValueError, match="same N images"):
        top_k_rows({"a": torch.ones(3), "b": torch.ones(3)}, {"a": torch.eye(3), "b": torch.eye(3)[:2]}, 1)
    with pytest.raises(ValueError, match="k must be"):
        top_k_rows({"a": torch.ones(3)}, X, 0)


def test_compare_rows_hand_worked():
    c = compare_rows([1, 2, 3], [3, 1, 0])
    assert c.rank_in_b == (1, None, 0) and c.rank_in_a == (2, 0, None)
    assert c.only_a == (2,) and c.only_b == (0,) and c.shared == 2 and not c.same_order
    assert compare_rows([5, 6], [5, 6]).same_order
    with pytest.raises(ValueError, match="twice"):
        compare_rows([1, 1], [2, 3])


# ---------------------------------------------------------------- photos and folders
def _jpeg(size=(80, 60), colour=(200, 40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_read_photo_takes_a_photo_and_shrinks_it():
    im = read_photo(_jpeg((2400, 1200)), "big.jpg", max_side=512)
    assert im.mode == "RGB" and max(im.size) == 512
    rgba = io.BytesIO()
    Image.new("RGBA", (40, 40), (0, 0, 0, 0)).save(rgba, format="PNG")
    assert read_photo(rgba.getvalue(), "clear.png").mode == "RGB"


@pytest.mark.parametrize("content,name,message", [
    (b"", "empty.jpg", "'empty.jpg' is empty"),
    (b"my holiday notes", "notes.txt", "'notes.txt' is not an image"),
    (_jpeg()[:300], "cut.jpg", "'cut.jpg' could not be read as an image.*corrupt or truncated"),
    (huge_png(10_000, 9_000), "huge.png", r"'huge.png' is 10000x9000 px \(90 megapixels\).*downscale it"),
    (huge_png(30_000, 30_000), "bomb.png", "'bomb.png' is too large a photo.*downscale it"),
    (_jpeg((340, 20)), "strip.jpg", "more elongated than 16:1"),
])
def test_read_photo_refuses_with_a_message(content, name, message):
    with pytest.raises(ExplorerInputError, match=message):
        read_photo(content, name)
    assert issubclass(ExplorerInputError, UsageError)  # an expected failure, exit code 2 on the command line


def test_read_photo_refuses_too_many_bytes(monkeypatch):
    import retrieval_lib.book.explorer_inputs as explorer_inputs

    monkeypatch.setattr(explorer_inputs, "MAX_UPLOAD_BYTES", 100)
    with pytest.raises(ExplorerInputError, match="'a.jpg' is 0 MB, more than the explorer accepts"):
        read_photo(_jpeg(), "a.jpg")
    assert MAX_PIXELS == 80_000_000


def test_collection_from_a_grouped_and_a_flat_folder(tmp_path):
    write_groups(tmp_path / "grouped" / "cats", n_groups=1, per_group=2, seed=1)
    write_groups(tmp_path / "grouped" / "dogs", n_groups=1, per_group=2, seed=2)
    col = collection_from_folder(tmp_path / "grouped")
    assert len(col) == 4 and col.group_names == ["cats", "dogs"] and col.labels.tolist() == [0, 0, 1, 1]
    write_groups(tmp_path / "flat", n_groups=2, per_group=2)
    flat = collection_from_folder(tmp_path / "flat")
    assert len(flat) == 4 and flat.labels is None and not flat.notes
    shutil.copytree(tmp_path / "grouped" / "cats", tmp_path / "flat" / "cats")  # photos and sub-folders: no groups
    mixed = collection_from_folder(tmp_path / "flat")
    assert len(mixed) == 6 and mixed.labels is None and "not used as groups" in mixed.notes[0]


def test_collection_from_folder_bad_input(tmp_path):
    with pytest.raises(ExplorerInputError, match="no folder"):
        collection_from_folder(tmp_path / "nowhere")
    with pytest.raises(ExplorerInputError, match="no folder"):
        collection_from_folder("  ")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no photos here")
    with pytest.raises(ExplorerInputError, match="no photos in"):
        collection_from_folder(tmp_path / "empty")
    paths, _ = write_groups(tmp_path / "one", n_groups=1, per_group=1)
    with pytest.raises(ExplorerInputError, match=r"only one photo \(g0_0.jpg\).*at least two"):
        collection_from_folder(tmp_path / "one")
    shutil.copy(paths[0], tmp_path / "one" / "copy.jpg")  # two files, one photo
    with pytest.raises(ExplorerInputError, match="only one photo.*1 duplicate file kept once: g0_0.jpg \\(= copy.jpg\\)"):
        collection_from_folder(tmp_path / "one")
    write_groups(tmp_path / "some", n_groups=1, per_group=3)
    (tmp_path / "some" / "broken.jpg").write_bytes(_jpeg()[:200])
    shutil.copy(tmp_path / "some" / "g0_0.jpg", tmp_path / "some" / "g0_0 (copy).jpg")
    col = collection_from_folder(tmp_path / "some")
    assert len(col) == 3
    assert any("could not be read" in n and "broken.jpg" in n for n in col.notes)
    assert any("1 duplicate file kept once" in n for n in col.notes)


# ---------------------------------------------------------------- the explorer, without a browser
@pytest.fixture
def explorer(tmp_path):
    paths, groups = write_groups(tmp_path / "photos", n_groups=4, per_group=3)
    col = Collection("tiny", paths, np.array([int(g[-1]) for g in groups]), [f"group{g}" for g in range(4)])
    ex = Explorer(TinyBackbone(), image_size=64, sources={"tiny": lambda: col}, cache_dir=tmp_path / "cache",
                  upload_dir=tmp_path / "uploads", progress=False, k=4)
    ex.use_collection("tiny")
    return ex


def _reference(ex, method, fmap):
    x = fmap[None].double()
    d = {"MAC": mac(x), "SPoC": spoc(x), "GeM": gem(x, ex.p), "R-MAC": rmac(x, L=ex.L)}[method]
    return l2n(d.float())[0]


def test_rows_equal_plain_pooling_and_search(explorer):
    ex = explorer
    for p, L, q in ((3.0, 3, 0), (1.0, 2, 5), (8.0, 1, 11)):
        ex.p, ex.L = p, L
        ex.set_query(q)
        for row, m in zip(ex.rows(), ex.methods()):
            X = torch.stack([_reference(ex, m, ex.fmap(i)) for i in range(len(ex.collection))])
            s = [(float(X[i] @ X[q]), i) for i in range(len(X)) if i != q]
            best = sorted(s, key=lambda t: -t[0])[:ex.k]
            assert list(row.indices) == [i for _, i in best], (m, p, L)
            assert list(row.scores) == pytest.approx([v for v, _ in best], abs=1e-5)
    assert [r.label for r in ex.rows()] == ["MAC", "SPoC", "GeM (p=8.00)", "R-MAC (L=1)"]
    assert ex.correct(ex.rows()[0].indices[0]) in (True, False)


def test_redraws_never_run_the_backbone(explorer):
    ex = explorer

    class Refuses(torch.nn.Module):
        def features(self, x):
            raise AssertionError("the backbone ran during a redraw")

    ex.model = Refuses()
    for p in (1.0, 2.0, 16.0):
        ex.p = p
        ex.rows()
    ex.L = 4
    ex.set_query(3)
    for m in ("MAC", "SPoC", "GeM", "R-MAC"):
        fig, text = ex.why(m, 0)
        assert fig.axes and text


def test_why_rmac_says_the_sum_equals_the_score(explorer):
    ex = explorer
    row = ex.rows(["R-MAC"])[0]
    _, text = ex.why("R-MAC", 1)
    assert f"= the score {row.scores[1]:.4f}" in text
    c, _ = rmac_contributions(ex.query_descriptor("R-MAC"), ex.fmap(row.indices[1]), L=ex.L)
    assert f"sum to {float(c.sum()):.4f}" in text
    with pytest.raises(ExplorerInputError, match="no result #99"):
        ex.why("MAC", 98)


def test_an_upload_is_a_query_against_any_collection(explorer):
    ex = explorer
    content = open(ex.collection.paths[2], "rb").read()
    q = ex.add_upload("mine.jpg", content)
    assert q.index is None and len(ex.uploads) == 1
    rows = ex.rows()
    assert all(len(r.indices) == ex.k for r in rows)
    assert rows[0].indices[0] == 2  # the same photo, stored as PNG: its own MAC is the nearest
    ex.add_upload("mine again.jpg", content)
    assert len(ex.uploads) == 1 and "'mine again.jpg' is the same file as 'mine', uploaded before" in ex.messages[-1][1]
    with pytest.raises(ExplorerInputError, match="upload at least two"):
        ex.uploads_collection()
    ex.add_upload("other.jpg", open(ex.collection.paths[7], "rb").read())
    assert len(ex.use_collection(ex.uploads_collection())) == 2
    with pytest.raises(ExplorerInputError, match="no photo #5"):
        ex.set_query(5)
    with pytest.raises(ExplorerInputError, match="no collection called 'nope'"):
        ex.use_collection("nope")


def test_the_page_clicks_slides_explains_and_compares(explorer):
    ex = explorer
    ex.app()
    page = ex.page
    assert len(page.thumb_buttons) == len(ex.collection)
    page.thumb_buttons[4].click()
    assert ex.query.index == 4 and "click thumbnail: redrawn in" in page.readout.value
    page.p.value = 4.0
    assert "GeM (p=4.00)" in page.slots[2][1].value
    page.k.value = 2
    assert page.slots[0][2][2][0].layout.display == "none" and page.slots[0][2][1][0].value
    page.slots[3][2][0][2].click()  # "why" under R-MAC's first result
    assert page.why_img.value[:3] == b"\xff\xd8\xff" and "sum to" in page.why_text.value  # a JPEG
    page.view.value = "compare two"
    assert "share" in page.why_text.value and page.slots[2][0].layout.display == "none"
    assert [w for w, _ in ex.timings][-5:] == ["click thumbnail", "p slider", "k slider", "why overlay", "view"]
    assert not any(kind == "error" for kind, _ in ex.messages)
    page = ex.page
    times = measure_redraws(ex, repeats=1)
    assert ex.page is page and page.root.comm is not None  # its own page was closed, not this one
    assert set(times) == {"click_thumbnail", "p_slider", "L_slider", "k_slider", "compare", "why_mac", "why_gem",
                          "why_rmac"} and all(v > 0 for v in times.values())


def test_the_page_says_every_bad_input(explorer, tmp_path):
    ex = explorer
    said = try_bad_inputs(ex, tmp_path / "bad")
    assert [case for case, _, _ in said] == ["folder that does not exist", "empty folder", "folder of one photo",
                                            "duplicate files", "not an image", "unreadable photo", "huge photo"]
    assert [kind for _, kind, _ in said] == ["error"] * 3 + ["info"] + ["error"] * 3  # each shown in the page
    assert all(text for _, _, text in said)
    assert ex.collection_label == "tiny" and ex.page is None  # back on its collection; its page closed
    ex.app()
    ex.page.thumb_buttons[1].click()  # and a page still answers
    assert ex.query.index == 1 and "explorer-error" not in ex.page.message.value


def test_a_failing_redraw_is_a_message_not_a_traceback(explorer, monkeypatch):
    ex = explorer
    ex.app()
    monkeypatch.setattr(ex, "rows", lambda methods=None: 1 / 0)
    ex.page.thumb_buttons[2].click()
    kind, text = ex.messages[-1]
    assert kind == "error" and text == "click thumbnail failed: ZeroDivisionError: division by zero"


def test_static_figure_of_the_rows(explorer):
    fig = show_rows(explorer)
    assert len(fig.axes) == 4 * (explorer.k + 1) and "top 4 per descriptor" in fig._suptitle.get_text()


def test_a_clone_tries_things_without_touching_the_page_on_screen(explorer, tmp_path):
    ex = explorer
    ex.app()
    shown = (ex.page.message.value, ex.page.readout.value, ex.query.index, ex.collection_label)
    probe = ex.clone()
    assert probe.fmap(0) is ex.fmap(0)  # the maps are shared, not copied
    try_bad_inputs(probe, tmp_path / "bad")
    measure_redraws(probe, repeats=1)
    probe.add_upload("mine.jpg", open(ex.collection.paths[1], "rb").read())
    assert (ex.page.message.value, ex.page.readout.value, ex.query.index, ex.collection_label) == shown
    assert ex.uploads == [] and ex.p == 3.0 and ex.timings[-1][0] == "page"


def test_the_fast_gem_and_rmac_equal_the_pooling_modules(explorer):
    """GeM summed over the cells above eps only, R-MAC from the kept region MACs of L = 5: the same descriptors."""
    from retrieval_lib.layers.pooling import RMAC, GeM

    ex = explorer
    maps = [ex.fmap(i) for i in range(len(ex.collection))]
    assert sum(int((f == 0).sum()) for f in maps) > 0  # the shortcut has zeros to skip
    for p in (1.0, 2.5, 8.0, 16.0):
        ex.p = p
        want = torch.cat([l2n(GeM(p=p, learn_p=False, dtype=torch.float64)(f[None].double()).float()) for f in maps])
        assert torch.allclose(ex.descriptors("GeM"), want, atol=1e-5), p
    for L in range(1, 6):
        ex.L = L
        want = torch.cat([l2n(RMAC(L=L)(f[None])) for f in maps])
        assert torch.allclose(ex.descriptors("R-MAC"), want, atol=1e-6), L


def test_a_learned_head_is_one_more_row(explorer):
    from retrieval_lib.layers.pooling import GeM

    ex = explorer
    ex.heads = {"GeM p=2 (a stand-in head)": GeM(p=2.0, learn_p=False)}
    rows = ex.rows()
    assert [r.label for r in rows][-1] == "GeM p=2 (a stand-in head)" and len(rows) == 5
    X = torch.cat([l2n(GeM(p=2.0, learn_p=False)(ex.fmap(i)[None])) for i in range(len(ex.collection))])
    s = X @ X[ex.query.index]
    s[ex.query.index] = -1
    assert list(rows[-1].indices) == torch.argsort(s, descending=True)[:ex.k].tolist()
    with pytest.raises(ExplorerInputError, match="no explanation is drawn for 'GeM p=2"):
        ex.why("GeM p=2 (a stand-in head)", 0)
    ex.app()
    assert ex.page.slots[4][2][0][2].layout.display == "none"  # no "why" button under a head's results


def test_why_a_wgem_or_darac_head_matched(explorer):
    from retrieval_lib.layers.aggregation import DARAC
    from retrieval_lib.layers.pooling import GeM, WGeM

    ex = explorer
    ex.heads = {"wGeM (05)": WGeM(8, p=3.0), "DARAC (06)": DARAC(4, seed=0), "GeM p=2": GeM(p=2.0, learn_p=False)}
    assert [ex.explains(m) for m in ex.methods()] == [True] * 6 + [False]
    fig, text = ex.why("wGeM (05)", 0)
    n_cells = ex.query.fmap.shape[-1] * ex.query.fmap.shape[-2]
    assert f"(a uniform mask would give {5 / n_cells:.0%})" in text and len(fig.axes) == 4  # untrained: uniform
    assert f"the query and {5 / n_cells:.0%} on the result" in text
    fig, text = ex.why("DARAC (06)", 0)
    assert "region slots are weighted from 1.00 to 1.00 (untrained: all 1)" in text


def test_a_released_network_is_one_more_row(explorer, tmp_path):
    """A whole network (here a tiny checkpoint in cirtorch's layout, loaded as a released one) ranks with its own
    backbone: each photo resized to the explorer's input size and normalised with the network's mean/std."""
    from retrieval_lib.models.released import load_network
    from test_released import _cirtorch_ckpt

    _cirtorch_ckpt(tmp_path / "net.pth", whitening=True, lw=False)
    net = load_network(tmp_path / "net.pth")
    ex = explorer
    ex.networks = {"released (stand-in)": net}
    rows = ex.rows()
    assert [r.label for r in rows][-1] == "released (stand-in)" and len(rows) == 5
    mean, std = torch.tensor(net.mean).view(1, 3, 1, 1), torch.tensor(net.std).view(1, 3, 1, 1)
    X = []
    for path in ex.collection.paths:  # the plain reference, one photo at a time
        im = resize_longer_side(load_image(path), ex.image_size)
        x = torch.tensor(np.asarray(im, dtype=np.float32)).permute(2, 0, 1)[None] / 255
        with torch.no_grad():
            X.append(l2n(net((x - mean) / std)))
    X = torch.cat(X)
    torch.testing.assert_close(ex.descriptors("released (stand-in)"), X)
    s = X @ X[ex.query.index]
    s[ex.query.index] = -1
    assert list(rows[-1].indices) == torch.argsort(s, descending=True)[:ex.k].tolist()
    assert not ex.explains("released (stand-in)")
    assert "released (stand-in)" in ex.clone().methods()
