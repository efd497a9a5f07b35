"""data.composites and data.splits.take: mask mass in a box against hand-worked tiles, objects pasted
on clutter with their boxes, the localisation split sharing no object and no background."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval_lib.data.composites import ObjectTask, box_area_share, cell_coverage, mask_mass_in_box, object_task
from retrieval_lib.data.datasets import GroupDataset
from retrieval_lib.data.splits import take



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


# ------------------------------------------------------------------ subsets
def _groups(folder, groups=3, per=2, seed=0):
    rng = np.random.default_rng(seed)
    for g in range(groups):
        (folder / f"g{g}").mkdir(parents=True)
        for k in range(per):
            arr = rng.integers(60, 256, (60, 90, 3), dtype=np.uint8)
            Image.fromarray(arr).save(folder / f"g{g}" / f"{k}.png")
    return GroupDataset.from_folder(folder)


def test_take_keeps_groups_and_subsets(tmp_path):
    ds = _groups(tmp_path / "obj", groups=3, per=2)
    part = take(ds, ds.labels != 1, "part")
    assert part.group_names == ["g0", "g2"] and part.labels.tolist() == [0, 0, 1, 1]
    assert list(part.database.paths) == [p for p, l in zip(ds.database.paths, ds.labels) if l != 1]
    with pytest.raises(ValueError, match="selects no image"):
        take(ds, np.zeros(6, bool))
    with pytest.raises(ValueError, match="bool mask"):
        take(ds, [True, False])


# ------------------------------------------------------------------ the object task
def _flat_photos(folder, groups=14, per=2):
    """``groups`` groups of ``per`` photos, each photo one flat grey level (10, 18, 26, ...) and its own size."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, names = [], []
    for g in range(groups):
        for k in range(per):
            i = g * per + k
            if not (folder / f"p{i:02d}.png").exists():
                Image.fromarray(np.full((60 + i, 90 + 2 * i, 3), 10 + 8 * i, np.uint8)).save(folder / f"p{i:02d}.png")
            paths.append(folder / f"p{i:02d}.png")
            names.append(f"g{g}")
    return GroupDataset(paths, names)


def _grey(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("L")).astype(float)


def _task(tmp_path, **kw):
    ds = _flat_photos(tmp_path / "photos")
    args = dict(n_held_groups=4, n_val_groups=3, crops_per_image=2, per_object=2, n_backgrounds=3, max_side=96,
                cache_dir=tmp_path / "c", progress=False)
    return ds, object_task(ds, **{**args, **kw})


def test_object_task_sides_share_no_photo_group_or_background(tmp_path):
    ds, task = _task(tmp_path)
    assert isinstance(task, ObjectTask)
    sides = (task.train, task.val, task.held)
    n_objects = [len(np.unique(cs.labels)) for cs in sides]
    assert n_objects[1:] == [3, 4] and n_objects[0] >= 2
    for cs in sides:
        assert np.array_equal(np.unique(cs.labels), np.arange(len(np.unique(cs.labels))))  # labels 0..n-1
        assert np.all(np.bincount(cs.labels) == 2)  # per_object composites per object
        for lab in np.unique(cs.labels):  # on different backgrounds, from one photo
            assert len(set(cs.backgrounds[cs.labels == lab])) == 2 and len(set(cs.objects[cs.labels == lab])) == 1
        assert len(cs.background_files) == 3
    photos = [set(cs.objects.tolist()) for cs in sides]
    source_groups = [{ds.labels[i] for i in p} for p in photos]
    bgs = [set(cs.background_files) for cs in sides]
    every_path = [str(p) for p in ds.database.paths]
    for a in range(3):
        for b in range(a + 1, 3):
            assert not photos[a] & photos[b] and not source_groups[a] & source_groups[b] and not bgs[a] & bgs[b]
    assert not {every_path[i] for p in photos for i in p} & set().union(*bgs)  # objects are not backgrounds
    # two crops of one photo are two objects (groups); one photo per source group by default
    assert all(len({ds.labels[i] for i in cs.objects}) == len(set(cs.objects.tolist())) for cs in sides)
    names = task.held.group_names
    assert len(set(names)) == 4 and all("#" in n for n in names)
    assert "held: 8 composites of 4 objects" in task.summary()


def test_object_task_pastes_each_crop_in_its_box_at_the_asked_area(tmp_path):
    ds, task = _task(tmp_path, area=(0.10, 0.20))
    every_path = [str(p) for p in ds.database.paths]
    level = {i: 10 + 8 * i for i in range(len(every_path))}
    for cs in (task.train, task.val, task.held):
        shares = cs.box_shares()
        assert np.all((shares >= 0.10) & (shares <= 0.20))
        for path, box, size, obj, bg in zip(cs.paths, cs.boxes, cs.sizes, cs.objects, cs.backgrounds):
            grey = _grey(path)
            assert grey.shape == (size[1], size[0]) and max(size) == 96  # the background at max_side
            x0, y0, x1, y1 = box.astype(int)
            inside = grey[y0 + 2:y1 - 2, x0 + 2:x1 - 2]  # JPEG blurs the edges a little
            outside = np.delete(grey, np.s_[max(0, y0 - 2):y1 + 2], axis=0)
            assert abs(np.median(inside) - level[obj]) <= 3  # the pasted photo's grey level fills the box
            bg_level = level[every_path.index(cs.background_files[bg])]
            if outside.size:
                assert abs(np.median(outside) - bg_level) <= 3  # and the background's the rest


def test_object_task_placement_puts_the_centre_where_asked(tmp_path):
    _, task = _task(tmp_path, placement=(0.5, 0.5))
    for cs in (task.train, task.held):
        cx = (cs.boxes[:, 0] + cs.boxes[:, 2]) / 2 / cs.sizes[:, 0]
        cy = (cs.boxes[:, 1] + cs.boxes[:, 3]) / 2 / cs.sizes[:, 1]
        assert np.all(np.abs(cx - 0.5) <= 0.05 + 1 / 48) and np.all(np.abs(cy - 0.5) <= 0.05 + 1 / 48)
    # a corner: the centre asked for at the bottom-left is clipped so the piece stays inside
    _, corner = _task(tmp_path, placement=(0.0, 1.0))
    cs = corner.held
    assert np.all(cs.boxes[:, 0] == 0) and np.all(cs.boxes[:, 3] == cs.sizes[:, 1])
    _, free = _task(tmp_path)  # placement=None: anywhere inside
    b, s = free.train.boxes, free.train.sizes
    assert np.all((b[:, 0] >= 0) & (b[:, 1] >= 0) & (b[:, 2] <= s[:, 0]) & (b[:, 3] <= s[:, 1]))
    assert len(set(np.round(b[:, 0] / s[:, 0], 2))) > 3


def test_object_task_is_deterministic_and_cached(tmp_path):
    _, a = _task(tmp_path, seed=3)
    stamp = {p: Path(p).stat().st_mtime_ns for p in a.held.paths}
    _, again = _task(tmp_path, seed=3)
    assert again.held.paths == a.held.paths and {p: Path(p).stat().st_mtime_ns for p in a.held.paths} == stamp
    _, fresh = _task(tmp_path, seed=3, cache_dir=tmp_path / "other")
    for x, y in zip((a.train, a.val, a.held), (fresh.train, fresh.val, fresh.held)):
        assert np.array_equal(x.boxes, y.boxes) and np.array_equal(x.objects, y.objects)
        assert x.background_files == y.background_files and x.group_names == y.group_names
        assert all(np.array_equal(_grey(p), _grey(q)) for p, q in zip(x.paths, y.paths))
    _, other = _task(tmp_path, seed=4)
    assert other.held.folder != a.held.folder and not np.array_equal(other.held.boxes, a.held.boxes)


def test_object_task_crops_are_disjoint_and_more_photos_per_group_give_more_objects(tmp_path):
    _, one = _task(tmp_path, crops_per_image=4)
    _, all_photos = _task(tmp_path, crops_per_image=4, photos_per_group=None)
    assert len(np.unique(all_photos.train.labels)) > len(np.unique(one.train.labels))
    _, capped = _task(tmp_path, crops_per_image=4, n_train_groups=5)
    assert len(np.unique(capped.train.labels)) == 5 and capped.held.group_names == one.held.group_names
    # the four crops of a photo: names #0..#3, from the same photo
    names = one.train.group_names
    photo = {n.split("#")[0] for n in names}
    assert all(sum(n.startswith(p + "#") for n in names) <= 4 for p in photo)


def test_object_task_errors(tmp_path):
    ds = _flat_photos(tmp_path / "photos", groups=6)
    base = dict(n_held_groups=2, n_val_groups=2, n_backgrounds=1, per_object=1, max_side=96,
                cache_dir=tmp_path / "c", progress=False)
    for bad, match in ((dict(area=(0.2, 0.1)), "area"), (dict(area=(0.0, 0.1)), "area"), (dict(area=0.1), "area"),
                       (dict(placement=(0.5, 1.5)), "placement"), (dict(placement=0.5), "placement"),
                       (dict(per_object=2), "per_object"), (dict(crops_per_image=0), "crops_per_image"),
                       (dict(n_held_groups=True), "n_held_groups"),
                       (dict(n_train_groups=1), "n_train_groups"), (dict(n_backgrounds=0), "n_backgrounds"),
                       (dict(max_side=10), "max_side"), (dict(photos_per_group=0), "photos_per_group"),
                       (dict(n_held_groups=40), "cannot give")):
        with pytest.raises(ValueError, match=match):
            object_task(ds, **{**base, **bad})
    assert not (tmp_path / "c").exists()  # refused before anything is written
