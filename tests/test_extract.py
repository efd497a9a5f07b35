"""Extraction: batched == one image at a time by hand; multi-scale formula; cache; skips."""
import copy
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import retrieval_lib.engine.extract as extract_mod
from retrieval_lib.models.backbones import efficientnet_lite
from retrieval_lib.engine.extract import (
    extract_descriptors,
    extract_fmaps,
    multiscale_power,
    pool_fmaps,
)
from retrieval_lib.layers.functional import gem, l2n, mac
from retrieval_lib.data.images import ImageList, load_image, resize_longer_side
from retrieval_lib.engine.batching import size_batches
from retrieval_lib.layers.pooling import GeM, MAC, RMAC, WGeM

SIZE = 96  # small inputs keep the real backbone fast


def _no_backbone(*args, **kwargs):
    raise AssertionError("the backbone ran although a valid cache entry existed")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return efficientnet_lite(0).eval()


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """Seven photos-like JPEGs: three share one size, two another, two are unique."""
    folder = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    sizes = [(120, 90), (120, 90), (120, 90), (64, 100), (64, 100), (200, 50), (77, 77)]
    paths = []
    for i, (w, h) in enumerate(sizes):
        # smooth random colour fields, so resizing is meaningful
        small = rng.integers(0, 255, size=(4, 4, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
        p = folder / f"img{i}.jpg"
        img.save(p, quality=95)
        paths.append(str(p))
    return paths


def _by_hand(model, path, pooling, size=SIZE, scale=1.0):
    """The pipeline written out for one image: open, resize, normalise, forward, pool, L2."""
    img = resize_longer_side(load_image(path), size)
    x = torch.from_numpy(np.asarray(img).transpose(2, 0, 1).copy()).float()[None] / 255.0
    if scale != 1.0:
        x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False,
                                            antialias=scale < 1)
    x = (x - torch.tensor(model.mean).view(1, 3, 1, 1)) / torch.tensor(model.std).view(1, 3, 1, 1)
    with torch.no_grad():
        return l2n(pooling(model.features(x)))[0]


def test_resize_longer_side():
    img = Image.new("RGB", (300, 200))
    assert resize_longer_side(img, 150).size == (150, 100)
    assert resize_longer_side(Image.new("RGB", (20, 40)), 100).size == (50, 100)  # upscales too
    assert resize_longer_side(Image.new("RGB", (1000, 1)), 10).size == (10, 1)  # never 0 px


def test_size_batches_group_equal_sizes(image_files):
    batches = size_batches(ImageList(image_files), SIZE, batch_size=2)
    assert sorted(i for b in batches for i in b) == list(range(7))
    assert all(len(b) <= 2 for b in batches)
    assert [0, 1] in batches and [2] in batches and [3, 4] in batches


@pytest.mark.parametrize("batch_size", [1, 4])
def test_descriptors_equal_one_image_by_hand(model, image_files, batch_size):
    images = ImageList(image_files)
    X = extract_descriptors(model, images, GeM(p=3.0, learn_p=False), image_size=SIZE, batch_size=batch_size,
                            num_workers=0, progress=False)
    assert X.shape == (7, model.out_channels) and X.dtype == torch.float32
    for i, p in enumerate(image_files):
        ref = _by_hand(model, p, lambda f: gem(f, 3.0))
        torch.testing.assert_close(X[i], ref, atol=2e-5, rtol=1e-4)


def test_workers_give_the_same_result(model, image_files):
    images = ImageList(image_files)
    a = extract_descriptors(model, images, "mac", image_size=SIZE, num_workers=0, progress=False)
    b = extract_descriptors(model, images, "mac", image_size=SIZE, num_workers=2, progress=False)
    torch.testing.assert_close(a, b)


def test_multiscale_formula(model, image_files):
    images = ImageList(image_files[:3])
    scales = (1.0, 2 ** -0.5)
    pool = GeM(p=3.0, learn_p=False)
    assert multiscale_power(pool) == pytest.approx(3.0)
    assert multiscale_power(MAC()) == 1.0
    X = extract_descriptors(model, images, pool, scales=scales, image_size=SIZE, num_workers=0, progress=False)
    for i, p in enumerate(image_files[:3]):
        per_scale = [_by_hand(model, p, lambda f: gem(f, 3.0), scale=s) for s in scales]
        ref = l2n((sum(d.pow(3) for d in per_scale) / 2).pow(1 / 3))  # (mean_s f_s^p)^(1/p), then L2
        torch.testing.assert_close(X[i], ref, atol=2e-5, rtol=1e-4)
    Xm = extract_descriptors(model, images, MAC(), scales=scales, image_size=SIZE, num_workers=0, progress=False)
    ref = l2n(sum(_by_hand(model, image_files[0], mac, scale=s) for s in scales) / 2)  # msp = 1: plain mean
    torch.testing.assert_close(Xm[0], ref, atol=2e-5, rtol=1e-4)


def test_fmaps_shapes_and_pool_fmaps(model, image_files):
    images = ImageList(image_files)
    fmaps = extract_fmaps(model, images, image_size=SIZE, num_workers=0, progress=False)
    assert len(fmaps) == 7
    for f, p in zip(fmaps, image_files):
        w, h = resize_longer_side(Image.open(p), SIZE).size
        assert f.shape == (model.out_channels, -(-h // 32), -(-w // 32))  # ceil(h/32) x ceil(w/32)
        assert f.min() >= 0
    X = extract_descriptors(model, images, RMAC(L=2), image_size=SIZE, num_workers=0, progress=False)
    torch.testing.assert_close(pool_fmaps(fmaps, RMAC(L=2)), X, atol=1e-6, rtol=1e-5)


def test_dict_of_poolings_runs_backbone_once(model, image_files, monkeypatch):
    images = ImageList(image_files[:4])
    calls = []
    real = model.features
    monkeypatch.setattr(model, "features", lambda x: (calls.append(x.shape[0]), real(x))[1])
    out = extract_descriptors(model, images, {"mac": "mac", "gem": GeM(learn_p=False)}, image_size=SIZE,
                              num_workers=0, progress=False, fold_bn=False)  # the model itself runs
    assert sum(calls) == 4  # every image through the backbone once for both poolings
    monkeypatch.undo()
    torch.testing.assert_close(out["mac"], extract_descriptors(model, images, "mac", image_size=SIZE,
                                                               num_workers=0, progress=False, fold_bn=False))


def test_cache_reused_then_rebuilt_when_stale_or_corrupt(model, image_files, tmp_path, monkeypatch):
    images = ImageList(image_files[:3])
    kw = dict(image_size=SIZE, num_workers=0, progress=False, cache_dir=tmp_path)
    X = extract_descriptors(model, images, "gem", **kw)
    files = list(tmp_path.glob("*.pt"))
    assert len(files) == 1

    monkeypatch.setattr(extract_mod, "_iterate_fmaps", _no_backbone)
    torch.testing.assert_close(extract_descriptors(model, images, "gem", **kw), X)
    monkeypatch.undo()

    files[0].write_bytes(b"not a torch file")  # corrupt: rebuilt with a warning, never trusted
    with pytest.warns(UserWarning, match="rebuilding"):
        torch.testing.assert_close(extract_descriptors(model, images, "gem", **kw), X)

    # a changed image file changes the key: the old entry is not used for it
    img = Image.open(image_files[0]).transpose(Image.FLIP_LEFT_RIGHT)
    new = tmp_path / "changed.jpg"
    img.save(new)
    other = ImageList([str(new)] + image_files[1:3])
    X2 = extract_descriptors(model, other, "gem", **kw)
    assert not torch.allclose(X2[0], X[0])
    torch.testing.assert_close(X2[1:], X[1:])

    fm = extract_fmaps(model, images, image_size=SIZE, num_workers=0, progress=False, cache_dir=tmp_path)
    fm2 = extract_fmaps(model, images, image_size=SIZE, num_workers=0, progress=False, cache_dir=tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(fm, fm2))


def test_unreadable_images_are_skipped_and_counted(model, image_files, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    images = ImageList([image_files[0], str(bad), image_files[1]], on_error="skip")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        X, info = extract_descriptors(model, images, "mac", image_size=SIZE, num_workers=0, progress=False,
                                      return_info=True)
    assert info["skipped"] == [1]
    assert torch.all(X[1] == 0) and X[0].norm() > 0.99
    assert any("skipped" in str(w.message) for w in caught)
    with pytest.raises(Exception, match="broken.jpg"):
        extract_descriptors(model, ImageList([str(bad)]), "mac", image_size=SIZE, num_workers=0, progress=False)


def test_bad_arguments(model, image_files):
    images = ImageList(image_files[:1])
    with pytest.raises(ValueError, match="scales"):
        extract_descriptors(model, images, "mac", scales=(1, 0), image_size=SIZE, progress=False)
    with pytest.raises(TypeError, match="pooling"):
        extract_descriptors(model, images, 3, image_size=SIZE, progress=False)
    with pytest.raises(ValueError, match="every entry is None"):
        pool_fmaps([None, None], "mac")


def test_revisited_end_to_end_with_real_extraction(model, tmp_path, data_root):
    """Stand-in revisited tree (real gnd when present) -> extraction -> evaluate_revisited."""
    from test_datasets import _gnd_doc, _revisited_tree

    from retrieval_lib.data.datasets import RevisitedDataset
    from retrieval_lib.search.evaluate import evaluate_revisited
    from retrieval_lib.search.nearest import rank_database

    doc = _gnd_doc(data_root)
    _revisited_tree(tmp_path, doc)
    d = RevisitedDataset("roxford5k", tmp_path).subset(120)
    kw = dict(image_size=64, num_workers=0, progress=False)
    X = extract_descriptors(model, d.database, "gem", **kw)
    Q = extract_descriptors(model, d.queries, "gem", **kw)
    assert X.shape == (120, 1280) and Q.shape == (len(doc["qimlist"]), 1280)
    # queries go through the network cropped to their box: same as cropping by hand
    crop = load_image(d.queries.paths[0]).crop(tuple(round(v) for v in d.queries.boxes[0]))
    ref = resize_longer_side(crop, 64)
    x = torch.from_numpy(np.asarray(ref).transpose(2, 0, 1).copy()).float()[None] / 255.0
    with torch.no_grad():
        ref = l2n(gem(model.features(model.normalize(x)), 3.0))[0]
    torch.testing.assert_close(Q[0], ref, atol=2e-5, rtol=1e-4)
    ranks = rank_database(Q, X)
    out = d.evaluate(ranks)
    ref = evaluate_revisited(ranks, d.gnd)
    for protocol in ("easy", "medium", "hard"):
        assert out[f"mAP/{protocol}"] == ref[protocol]["mAP"]
        assert 0 <= out[f"mAP/{protocol}"] <= 1


# ------------------------------------------------------------------------- cache keys


@pytest.mark.parametrize("change", ["wgem_conv", "per_channel_p_same_mean", "p_past_4_decimals"])
def test_cache_is_keyed_on_pooling_state_not_its_repr(model, image_files, tmp_path, change):
    """A pooling whose weights change gets new descriptors, not the old cache entry."""
    images = ImageList(image_files[:3])
    kw = dict(image_size=SIZE, num_workers=0, progress=False)
    if change == "wgem_conv":
        pool = WGeM(model.out_channels, learn_p=False)
    elif change == "per_channel_p_same_mean":
        pool = GeM(p=3.0, per_channel=True, in_channels=model.out_channels, learn_p=False)
    else:
        pool = GeM(p=3.0, learn_p=False)
    first = extract_descriptors(model, images, pool, cache_dir=tmp_path, **kw)
    with torch.no_grad():
        if change == "wgem_conv":  # attention conv trained away from zero: repr unchanged
            pool.conv.weight.copy_(torch.randn(pool.conv.weight.shape, generator=torch.Generator().manual_seed(1)))
        elif change == "per_channel_p_same_mean":  # mean p stays 3, the only thing repr showed
            pool.p[::2] = 2.0
            pool.p[1::2] = 4.0
        else:
            pool.p.fill_(3.00004)  # repr shows p=3.0000 either way
    fresh = extract_descriptors(model, images, pool, **kw)  # no cache: the true descriptors
    again = extract_descriptors(model, images, pool, cache_dir=tmp_path, **kw)
    assert not torch.equal(fresh, first)
    torch.testing.assert_close(again, fresh, atol=0, rtol=0)


def test_cache_hit_for_an_equal_pooling_built_anew(model, image_files, tmp_path, monkeypatch):
    images = ImageList(image_files[:2])
    kw = dict(image_size=SIZE, num_workers=0, progress=False, cache_dir=tmp_path)
    X = extract_descriptors(model, images, WGeM(model.out_channels, learn_p=False), **kw)
    monkeypatch.setattr(extract_mod, "_iterate_fmaps", _no_backbone)
    torch.testing.assert_close(extract_descriptors(model, images, WGeM(model.out_channels, learn_p=False), **kw),
                               X, atol=0, rtol=0)
    assert len(list(tmp_path.glob("*.pt"))) == 1


def test_lambda_pooling_never_piles_up_cache_files(model, image_files, tmp_path):
    """A plain function's state cannot be read, so it is not cached (and says so)."""
    images = ImageList(image_files[:2])
    kw = dict(image_size=SIZE, num_workers=0, progress=False, cache_dir=tmp_path)
    pools = [lambda f: gem(f, 3.0), lambda f: gem(f, 3.0)]  # both alive: two addresses, two reprs
    ref = extract_descriptors(model, images, GeM(p=3.0, learn_p=False), image_size=SIZE, num_workers=0,
                              progress=False)
    for pool in pools:
        with pytest.warns(UserWarning, match="not cached"):
            X = extract_descriptors(model, images, pool, **kw)
        torch.testing.assert_close(X, ref, atol=2e-6, rtol=1e-5)
    assert list(tmp_path.iterdir()) == []


def test_library_function_pooling_is_cached_once(model, image_files, tmp_path, monkeypatch):
    images = ImageList(image_files[:2])
    kw = dict(image_size=SIZE, num_workers=0, progress=False, cache_dir=tmp_path)
    X = extract_descriptors(model, images, mac, **kw)
    monkeypatch.setattr(extract_mod, "_iterate_fmaps", _no_backbone)
    torch.testing.assert_close(extract_descriptors(model, images, mac, **kw), X, atol=0, rtol=0)
    assert len(list(tmp_path.glob("*.pt"))) == 1


def test_cache_is_keyed_on_backbone_weights(model, image_files, tmp_path):
    """Two backbones with one name but different weights never share feature maps or descriptors."""
    images = ImageList(image_files[:2])
    kw = dict(image_size=SIZE, num_workers=0, progress=False)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other._bn1.weight.mul_(2.0)  # e.g. a fine-tuned head: same name, same config
    assert other.name == model.name
    fm = extract_fmaps(model, images, cache_dir=tmp_path, **kw)
    fm_other = extract_fmaps(other, images, cache_dir=tmp_path, **kw)
    assert not torch.equal(fm[0], fm_other[0])
    torch.testing.assert_close(fm_other[0], extract_fmaps(other, images, **kw)[0], atol=0, rtol=0)
    X = extract_descriptors(model, images, "gem", cache_dir=tmp_path, **kw)
    X_other = extract_descriptors(other, images, "gem", cache_dir=tmp_path, **kw)
    torch.testing.assert_close(X_other, extract_descriptors(other, images, "gem", **kw), atol=0, rtol=0)
    assert not torch.equal(X, X_other)


class _TinyBackbone(torch.nn.Module):
    """A backbone whose last activation is a setting, not a weight (like ReLU6 vs ReLU)."""

    name = "tiny"
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)
    out_channels = 8

    def __init__(self, activation: str = "relu6"):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=8, padding=1)
        torch.nn.init.normal_(self.conv.weight, std=3.0, generator=torch.Generator().manual_seed(0))
        self.activation = activation

    def features(self, x):
        y = self.conv(x) * 4.0  # large enough that many values pass 6
        return torch.nn.functional.relu6(y) if self.activation == "relu6" else torch.relu(y)


def test_cache_is_keyed_on_backbone_config(image_files, tmp_path):
    images = ImageList(image_files[:2])
    kw = dict(image_size=SIZE, num_workers=0, progress=False)
    a, b = _TinyBackbone("relu6"), _TinyBackbone("relu")
    b.load_state_dict(a.state_dict())  # same weights, only the activation differs
    Xa = extract_descriptors(a, images, "mac", cache_dir=tmp_path, **kw)
    Xb = extract_descriptors(b, images, "mac", cache_dir=tmp_path, **kw)
    torch.testing.assert_close(Xb, extract_descriptors(b, images, "mac", **kw), atol=0, rtol=0)
    assert not torch.equal(Xa, Xb)
    fa = extract_fmaps(a, images, cache_dir=tmp_path, **kw)
    fb = extract_fmaps(b, images, cache_dir=tmp_path, **kw)
    assert fa[0].max() <= 6 and fb[0].max() > 6


# ------------------------------------------------------------------------- multi-scale exponent
def test_multiscale_uniform_wgem_equals_gem(model, image_files):
    """Each pooling declares its exponent: WGeM with uniform weights and p=3 is GeM(p=3) at any scales."""
    images = ImageList(image_files[:3])
    kw = dict(scales=(1.0, 2 ** -0.5), image_size=SIZE, num_workers=0, progress=False)
    wgem = WGeM(model.out_channels, p=3.0, learn_p=False)  # zero conv: uniform weights
    X = extract_descriptors(model, images, {"gem": GeM(p=3.0, learn_p=False), "wgem": wgem}, **kw)
    torch.testing.assert_close(X["wgem"], X["gem"], atol=1e-6, rtol=0)


def test_multiscale_float64_gem_of_the_sweeps_equals_gem(model, image_files):
    """The sweeps' float64 GeM (formerly the GeM64 class) is averaged over scales with its p too."""
    from retrieval_lib.book.sweeps import gem_poolings

    images = ImageList(image_files[:3])
    kw = dict(scales=(1.0, 2 ** -0.5), image_size=SIZE, num_workers=0, progress=False)
    X = extract_descriptors(model, images, {"sweep": gem_poolings([3.0])[3.0], "gem": GeM(p=3.0, learn_p=False)},
                            **kw)
    torch.testing.assert_close(X["sweep"], X["gem"], atol=1e-6, rtol=0)


def test_multiscale_per_channel_gem_uses_each_channels_p(model, image_files):
    images = ImageList(image_files[:2])
    scales = (1.0, 0.5)
    pool = GeM(p=3.0, per_channel=True, in_channels=model.out_channels, learn_p=False)
    with torch.no_grad():
        pool.p[::2] = 2.0
    X = extract_descriptors(model, images, pool, scales=scales, image_size=SIZE, num_workers=0, progress=False)
    per_scale = [extract_descriptors(model, images, pool, scales=(s,), image_size=SIZE, num_workers=0,
                                     progress=False) for s in scales]
    p = pool.p.detach()
    ref = l2n(((per_scale[0].pow(p) + per_scale[1].pow(p)) / 2).pow(1 / p))  # per channel: its own p
    torch.testing.assert_close(X, ref, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------- empty inputs
def test_empty_image_list_is_not_called_unreadable(model, image_files, tmp_path):
    with pytest.raises(ValueError, match="no images given"):
        extract_descriptors(model, ImageList([]), "mac", image_size=SIZE, num_workers=0, progress=False)
    with pytest.raises(ValueError, match="no images given"):
        extract_fmaps(model, ImageList([]), image_size=SIZE, num_workers=0, progress=False)
    with pytest.raises(ValueError, match="no feature maps given"):
        pool_fmaps([], "mac")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with warnings.catch_warnings(record=True) as caught:  # the image list and the extraction both warn
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="none of the 1 images could be read"):
            extract_descriptors(model, ImageList([str(bad)], on_error="skip"), "mac", image_size=SIZE,
                                num_workers=0, progress=False)
    assert any("1 of 1 images could not be read and were skipped" in str(w.message) for w in caught)


def test_cache_is_keyed_on_autocast(image_files, tmp_path):
    """An autocast (AMP) run never gets float32 maps from the cache, nor the reverse."""
    images = ImageList(image_files[:2])
    tiny = _TinyBackbone("relu").eval()
    kw = dict(image_size=SIZE, num_workers=0, progress=False, cache_dir=tmp_path)
    fp32 = extract_fmaps(tiny, images, amp=False, **kw)
    amp = extract_fmaps(tiny, images, amp=True, **kw)  # bfloat16 autocast on the CPU
    assert not torch.equal(fp32[0], amp[0])
    torch.testing.assert_close(amp[0], extract_fmaps(tiny, images, amp=True, image_size=SIZE, num_workers=0,
                                                      progress=False)[0], atol=0, rtol=0)
    assert len(list(tmp_path.glob("*.pt"))) == 2


def test_a_plain_list_of_paths_is_an_image_list(model, image_files):
    # what a user types first: a list of file names (str or Path), not an ImageList
    want = extract_descriptors(model, ImageList(image_files[:2]), "gem", image_size=SIZE, num_workers=0,
                               progress=False)
    got = extract_descriptors(model, [str(image_files[0]), Path(image_files[1])], "gem", image_size=SIZE,
                              num_workers=0, progress=False)
    torch.testing.assert_close(got, want)
    maps = extract_fmaps(model, [str(image_files[0])], image_size=SIZE, num_workers=0, progress=False)
    assert len(maps) == 1 and maps[0].dim() == 3
    with pytest.raises(TypeError, match="got one path"):
        extract_descriptors(model, str(image_files[0]), "gem", image_size=SIZE, progress=False)
    with pytest.raises(TypeError, match="mixes file paths"):
        extract_descriptors(model, [str(image_files[0]), object()], "gem", image_size=SIZE, progress=False)
