"""wGeM's pieces for notebook 05: its derivatives by hand (layers.grads), mask mass in a box and
composites (data.composites), a mask selection (data.splits.take), validated training (engine.validation)."""
import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval_lib.data.composites import (box_area_share, cell_coverage, localisation_composites, mask_mass_in_box,
                                           object_composites)
from retrieval_lib.data.datasets import GroupDataset
from retrieval_lib.data.splits import split_groups, take
from retrieval_lib.engine.extract import pool_fmaps
from retrieval_lib.engine.mining import TupleMiner
from retrieval_lib.engine.objectives import TupleLoss
from retrieval_lib.engine.sources import MapSource
from retrieval_lib.engine.validation import train_with_validation
from retrieval_lib.book.sweeps import map_on_subset
from retrieval_lib.layers.functional import wgem
from retrieval_lib.layers.grads import gem_grads, wgem_backward, wgem_grads
from retrieval_lib.layers.pooling import GeM, WGeM


def _fmap(B=2, C=5, H=4, W=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, C, H, W, generator=g, dtype=torch.float64) * 3
    x[0, 0, 0, 0] = 0.0  # below eps: the clamp passes no gradient there
    return x


# ------------------------------------------------------------------ derivatives
@pytest.mark.parametrize("p", [1.0, 2.5, 7.0])
def test_wgem_grads_equal_autograd(p):
    x = _fmap().requires_grad_(True)
    logits = torch.randn(2, 1, 4, 3, dtype=torch.float64)
    w = torch.softmax(logits.flatten(2), -1).view_as(logits).requires_grad_(True)
    pt = torch.tensor([p], dtype=torch.float64, requires_grad=True)
    y = wgem(x, w, pt)  # (B, C)
    g = torch.randn_like(y)
    gx, gw, gp = torch.autograd.grad((g * y).sum(), (x, w, pt))
    dydx, dydw, dydp = wgem_grads(x.detach(), w.detach(), p)
    assert torch.allclose(gx, g[..., None, None] * dydx, rtol=0, atol=1e-12)
    assert torch.allclose(gw, (g[..., None, None] * dydw).sum(1, keepdim=True), rtol=0, atol=1e-12)
    assert torch.allclose(gp, (g * dydp).sum().reshape(1), rtol=0, atol=1e-12)
    assert dydx[0, 0, 0, 0] == 0


def test_uniform_weights_give_gems_derivatives():
    x = _fmap()
    uniform = torch.full((1, 1, 4, 3), 1 / 12, dtype=torch.float64)
    dydx, _, dydp = wgem_grads(x, uniform, 3.0)
    dfdx, dfdp = gem_grads(x, 3.0)
    assert torch.allclose(dydx, dfdx, rtol=0, atol=1e-13) and torch.allclose(dydp, dfdp, rtol=0, atol=1e-13)


def test_the_mask_gradient_vanishes_as_one_over_p():
    # one channel, values 1 and 2 on a uniform 2-cell mask: dy/dw at the max -> y * 2 / p
    x = torch.tensor([[[[1.0, 2.0]]]], dtype=torch.float64)
    w = torch.full((1, 1, 1, 2), 0.5, dtype=torch.float64)
    scaled = []
    for p in (10.0, 100.0, 400.0):
        _, dydw, _ = wgem_grads(x, w, p)
        y = float(wgem(x, w, p))
        # by hand: (1/p) 2^p y^(1-p) with y = (0.5 + 0.5 * 2^p)^(1/p)
        yh = (0.5 + 0.5 * 2.0**p) ** (1 / p)
        assert float(dydw[0, 0, 0, 1]) == pytest.approx(2.0**p * yh ** (1 - p) / p, rel=1e-12)
        scaled.append(p * float(dydw[0, 0, 0, 1]) / y)
    assert scaled[-1] == pytest.approx(2.0, rel=1e-3)  # p * dy/dw_max -> y / w_max = 2 y
    assert abs(scaled[0] - 2) > abs(scaled[-1] - 2)


def test_wgem_backward_matches_autograd_through_both_paths():
    torch.manual_seed(0)
    x = _fmap(C=6).requires_grad_(True)
    layer = WGeM(6, p=2.5).double()
    with torch.no_grad():
        layer.conv.weight.normal_(0, 0.3)
        layer.conv.bias.fill_(0.2)
    y = layer(x)
    g = torch.randn_like(y)
    gx, gp, gW, gb = torch.autograd.grad((g * y).sum(), (x, layer.p, layer.conv.weight, layer.conv.bias))
    by_hand = wgem_backward(layer, x.detach(), g)
    assert torch.allclose(by_hand["x"], gx, rtol=0, atol=1e-11)
    assert torch.allclose(by_hand["p"].reshape(1), gp, rtol=0, atol=1e-11)
    assert torch.allclose(by_hand["conv_weight"], gW, rtol=0, atol=1e-11)
    assert torch.allclose(by_hand["conv_bias"], gb, rtol=0, atol=1e-11)
    assert by_hand["x_mask"].abs().max() > 1e-3  # the mask path is really there
    # without the mask path the gradient is wrong
    assert not torch.allclose(by_hand["x_pool"], gx, atol=1e-6)
    with pytest.raises(ValueError, match="g must have shape"):
        wgem_backward(layer, x.detach(), g[:, :3])


def test_wgem_grads_errors():
    x = _fmap()
    with pytest.raises(ValueError, match="weights must have shape"):
        wgem_grads(x, torch.ones(2, 1, 3, 3), 3.0)
    with pytest.raises(ValueError, match="p must be a positive"):
        wgem_grads(x, torch.ones(2, 1, 4, 3) / 12, 0.0)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        wgem_grads(x[0], torch.ones(1, 1, 4, 3), 3.0)


# ------------------------------------------------------------------ mask mass in a box
def test_mask_mass_in_box_hand_worked():
    # a 64 x 32 px image, a 2 x 4 map: 16 px tiles. Box x 8..40, y 0..16 covers half of tile (0, 0),
    # all of (0, 1), half of (0, 2).
    cov = cell_coverage((2, 4), (8, 0, 40, 16), (64, 32))
    assert np.array_equal(cov, [[0.5, 1.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]])
    mask = np.array([[0.1, 0.2, 0.3, 0.1], [0.1, 0.1, 0.05, 0.05]])
    assert mask_mass_in_box(mask, (8, 0, 40, 16), (64, 32)) == pytest.approx(0.05 + 0.2 + 0.15, abs=1e-15)
    assert mask_mass_in_box(torch.tensor(mask)[None, None], (8, 0, 40, 16), (64, 32)) == pytest.approx(0.4)
    # a uniform mask puts the box's area share inside the box: 32 * 16 / (64 * 32)
    assert mask_mass_in_box(np.full((2, 4), 1 / 8), (8, 0, 40, 16), (64, 32)) == pytest.approx(0.25, abs=1e-15)
    assert box_area_share((8, 0, 40, 16), (64, 32)) == 0.25
    assert mask_mass_in_box(mask, (0, 0, 64, 32), (64, 32)) == pytest.approx(1.0)


def test_uniform_mass_equals_area_share_on_uneven_tiles():
    rng = np.random.default_rng(0)
    for _ in range(20):
        W, H = rng.integers(40, 500, 2)
        h, w = int(np.ceil(H / 32)), int(np.ceil(W / 32))
        x0, x1 = np.sort(rng.uniform(0, W, 2))
        y0, y1 = np.sort(rng.uniform(0, H, 2))
        box = (x0, y0, x1, y1)
        assert mask_mass_in_box(np.full((h, w), 1 / (h * w)), box, (W, H)) == pytest.approx(
            box_area_share(box, (W, H)), abs=1e-12)


def test_mask_mass_errors():
    with pytest.raises(ValueError, match="box"):
        cell_coverage((2, 2), (10, 0, 5, 4), (20, 20))
    with pytest.raises(ValueError, match="box"):
        box_area_share((0, 0, 30, 4), (20, 20))
    with pytest.raises(ValueError, match="image_size"):
        box_area_share((0, 0, 1, 1), (0, 20))
    with pytest.raises(ValueError, match=r"\(h, w\)"):
        mask_mass_in_box(np.ones(4), (0, 0, 1, 1), (2, 2))


# ------------------------------------------------------------------ composites and subsets
def _groups(folder, groups=3, per=2, seed=0):
    rng = np.random.default_rng(seed)
    for g in range(groups):
        (folder / f"g{g}").mkdir(parents=True)
        for k in range(per):
            arr = rng.integers(60, 256, (60, 90, 3), dtype=np.uint8)
            Image.fromarray(arr).save(folder / f"g{g}" / f"{k}.png")
    return GroupDataset.from_folder(folder)


def _backgrounds(folder, n=4):
    folder.mkdir(parents=True)
    out = []
    for i in range(n):
        Image.fromarray(np.zeros((80, 120, 3), dtype=np.uint8)).save(folder / f"bg{i}.png")
        out.append(folder / f"bg{i}.png")
    return out


def test_object_composites_record_boxes_and_groups(tmp_path):
    objects = _groups(tmp_path / "obj")
    bgs = _backgrounds(tmp_path / "bg")
    cs = object_composites(objects, bgs, per_object=2, seed=1, max_side=100, cache_dir=tmp_path / "c", progress=False)
    assert len(cs) == 12 and cs.labels.tolist() == np.repeat(objects.labels, 2).tolist()
    assert cs.objects.tolist() == np.repeat(np.arange(6), 2).tolist()
    assert all(a != b for a, b in cs.backgrounds.reshape(-1, 2))  # two different backgrounds per object image
    for path, box, size in zip(cs.paths, cs.boxes, cs.sizes):
        with Image.open(path) as im:
            assert tuple(im.size) == tuple(size)
            arr = np.asarray(im.convert("RGB")).astype(int)
        x0, y0, x1, y1 = box.astype(int)
        inside = arr[y0:y1, x0:x1].max(axis=2)
        outside = arr.max(axis=2).copy()
        outside[y0:y1, x0:x1] = 0
        assert inside.mean() > 40 and outside.mean() < 10  # the object sits in its box on a black background
    shares = cs.box_shares()
    assert np.all((shares > 0) & (shares < 1))
    stamp = {p: Path(p).stat().st_mtime_ns for p in cs.paths}
    again = object_composites(objects, bgs, per_object=2, seed=1, max_side=100, cache_dir=tmp_path / "c",
                              progress=False)
    assert again.paths == cs.paths and {p: Path(p).stat().st_mtime_ns for p in again.paths} == stamp
    assert np.array_equal(again.boxes, cs.boxes)
    other = object_composites(objects, bgs, per_object=2, seed=2, max_side=100, cache_dir=tmp_path / "c",
                              progress=False)
    assert other.folder != cs.folder
    assert "12 composites of 6 object images in 3 groups" in cs.summary()


def test_object_composites_errors(tmp_path):
    objects = _groups(tmp_path / "obj", groups=2, per=1)
    bgs = _backgrounds(tmp_path / "bg", n=2)
    with pytest.raises(ValueError, match="per_object"):
        object_composites(objects, bgs, per_object=3, cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="max_side"):
        object_composites(objects, bgs, max_side=10, cache_dir=tmp_path / "c")


def test_localisation_composites_share_no_object_and_no_background(tmp_path):
    objects = _groups(tmp_path / "obj", groups=4, per=2)
    bgs = _backgrounds(tmp_path / "bg", n=6)
    paths = list(objects.database.paths) + [str(b) for b in bgs]
    groups = [objects.group_names[l] for l in objects.labels] + [f"scene{i}" for i in range(6)]
    ds = GroupDataset(paths, groups, subsets=["ukbench56"] * 8 + ["landmarks23"] * 6)
    train, held = localisation_composites(ds, held_frac=0.25, n_backgrounds=2, per_object=2, seed=0, max_side=100,
                                          cache_dir=tmp_path / "c", progress=False)

    def names(cs):
        return {cs.group_names[lab] for lab in cs.labels}

    # the UKBench images are the objects, one group of four held out; the scenes are backgrounds
    assert names(train) | names(held) == {"g0", "g1", "g2", "g3"} and not names(train) & names(held)
    assert len(names(held)) == 1 and len(train) == 3 * 2 * 2 and len(held) == 1 * 2 * 2
    assert len(train.background_files) == len(held.background_files) == 2
    assert not set(train.background_files) & set(held.background_files)
    assert set(train.background_files) | set(held.background_files) <= {str(b) for b in bgs}
    # at most half of the backgrounds per pool
    capped, _ = localisation_composites(ds, n_backgrounds=10, per_object=1, max_side=100, cache_dir=tmp_path / "c",
                                        progress=False)
    assert len(capped.background_files) == 3
    with pytest.raises(ValueError, match="n_backgrounds"):
        localisation_composites(ds, n_backgrounds=0, cache_dir=tmp_path / "c", progress=False)


def test_localisation_composites_without_an_objects_subset_use_half_the_groups(tmp_path):
    ds = _groups(tmp_path / "obj", groups=6, per=2)
    is_object = split_groups(ds.labels, 0.5, 0)
    train, held = localisation_composites(ds, held_frac=0.34, per_object=1, seed=0, max_side=100,
                                          cache_dir=tmp_path / "c", progress=False)
    obj_groups = {ds.group_names[lab] for lab in ds.labels[is_object]}
    assert {train.group_names[lab] for lab in train.labels} | {held.group_names[lab] for lab in held.labels} == obj_groups
    assert len(train) + len(held) == int(is_object.sum())
    bg_files = set(train.background_files) | set(held.background_files)
    assert bg_files <= {str(p) for p, o in zip(ds.database.paths, is_object) if not o}


def test_take_keeps_groups_and_subsets(tmp_path):
    ds = _groups(tmp_path / "obj", groups=3, per=2)
    part = take(ds, ds.labels != 1, "part")
    assert part.group_names == ["g0", "g2"] and part.labels.tolist() == [0, 0, 1, 1]
    assert list(part.database.paths) == [p for p, l in zip(ds.database.paths, ds.labels) if l != 1]
    with pytest.raises(ValueError, match="selects no image"):
        take(ds, np.zeros(6, bool))
    with pytest.raises(ValueError, match="bool mask"):
        take(ds, [True, False])


# ------------------------------------------------------------------ validated training
def _maps(n_groups=4, per=3, C=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    maps, labels = [], []
    for k in range(n_groups):
        base = torch.rand(C, 3, 4, generator=g)
        for _ in range(per):
            maps.append((base + 0.5 * torch.rand(C, 3, 4, generator=g)).float())
            labels.append(k)
    return maps, np.array(labels)


def test_train_with_validation_keeps_the_best_epoch():
    maps, labels = _maps()
    val_maps, val_labels = _maps(n_groups=3, seed=1)
    layer = WGeM(6, p=3.0)
    miner = TupleMiner(labels, n_neg=2, n_queries=8, pool_size=12, batch_size=4)
    layer, rec = train_with_validation(layer, MapSource(maps, labels), miner, TupleLoss("contrastive", 0.7),
                                       val_maps, val_labels, epochs=4, lr=0.05, p_lr_mult=10.0, seed=0)
    assert rec["epoch"] == [0, 1, 2, 3, 4] and len(rec["val_mAP"]) == len(rec["p"]) == len(rec["loss"]) == 5
    assert rec["steps_per_epoch"] == 2 and len(rec["history"]["loss"]) == 8
    best = rec["kept_epoch"]
    assert rec["val_mAP"][best] == max(rec["val_mAP"]) and rec["val_mAP"].index(max(rec["val_mAP"])) == best
    # the returned head is the best epoch's: its validation mAP and p are the recorded ones
    X = pool_fmaps(val_maps, layer)
    assert map_on_subset(X, val_labels, np.ones(len(val_labels), bool)) == pytest.approx(rec["val_mAP"][best], abs=1e-12)
    assert float(layer.p.detach()) == pytest.approx(rec["p"][best], abs=1e-12)
    assert np.isnan(rec["loss"][0]) and all(np.isfinite(rec["loss"][1:]))
    assert np.mean(rec["history"]["loss"][:2]) == pytest.approx(rec["loss"][1])
    # every epoch's head is kept: the kept one is the returned head, and each gives its recorded validation mAP
    assert len(rec["states"]) == 5
    assert all(torch.equal(rec["states"][best][k], v) for k, v in layer.state_dict().items())
    for e, state in enumerate(rec["states"]):
        head = WGeM(6, p=3.0)
        head.load_state_dict(state)
        got = map_on_subset(pool_fmaps(val_maps, head), val_labels, np.ones(len(val_labels), bool))
        assert got == pytest.approx(rec["val_mAP"][e], abs=1e-12)
    assert not torch.equal(rec["states"][0]["conv.weight"], rec["states"][-1]["conv.weight"])  # the mask moved


def test_train_with_validation_keeps_the_untrained_head_when_nothing_beats_it():
    maps, labels = _maps()
    # two validation groups that any pooling separates perfectly: mAP 1 before training already
    val_maps = [torch.zeros(6, 3, 4) for _ in range(4)]
    for i, m in enumerate(val_maps):
        m[0 if i < 2 else 1] = 1.0 + 0.1 * i
    val_labels = np.array([0, 0, 1, 1])
    layer = GeM(p=3.0)
    start = copy.deepcopy(layer.state_dict())
    miner = TupleMiner(labels, n_neg=2, n_queries=8, pool_size=12, batch_size=4)
    layer, rec = train_with_validation(layer, MapSource(maps, labels), miner, TupleLoss("contrastive", 0.7),
                                       val_maps, val_labels, epochs=2, lr=0.1, seed=0)
    assert rec["val_mAP"][0] == 1.0 and rec["kept_epoch"] == 0
    assert rec["p"][-1] != rec["p"][0]  # training did move p ...
    assert torch.equal(layer.p, start["p"])  # ... but the untrained head is the one kept


def test_train_with_validation_keep_last_and_measure():
    maps, labels = _maps()
    val_maps, val_labels = _maps(n_groups=3, seed=1)
    layer = WGeM(6, p=3.0)
    miner = TupleMiner(labels, n_neg=2, n_queries=8, pool_size=12, batch_size=4)
    seen = []

    def measure(pool):
        seen.append(pool.conv.weight.detach().clone())
        return {"conv_norm": pool.conv.weight.norm()}

    layer, rec = train_with_validation(layer, MapSource(maps, labels), miner, TupleLoss("contrastive", 0.7),
                                       val_maps, val_labels, epochs=3, lr=0.05, keep="last", measure=measure)
    assert rec["kept_epoch"] == 3 and rec["conv_norm"][0] == 0.0 and len(rec["conv_norm"]) == 4
    assert torch.equal(layer.conv.weight.detach(), seen[-1])  # the last epoch's head is the one returned
    assert rec["conv_norm"][-1] == pytest.approx(float(seen[-1].norm()))


def test_train_with_validation_errors():
    maps, labels = _maps()
    miner = TupleMiner(labels, n_neg=2, n_queries=8, pool_size=12, batch_size=4)
    args = (MapSource(maps, labels), miner, TupleLoss())
    with pytest.raises(ValueError, match="one group label per map"):
        train_with_validation(GeM(), *args, maps[:3], [0, 0], epochs=1, lr=0.1)
    with pytest.raises(ValueError, match="no validation group has two images"):
        train_with_validation(GeM(), *args, maps[:3], [0, 1, 2], epochs=1, lr=0.1)
    with pytest.raises(ValueError, match="keep must be"):
        train_with_validation(GeM(), *args, maps[:3], [0, 0, 1], epochs=1, lr=0.1, keep="first")
