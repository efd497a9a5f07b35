"""Objects pasted onto clutter, with the pasted boxes recorded, and how much of a mask lies in a box.

For the in-domain tasks of ``notebooks/05_wgem.ipynb`` (where does wGeM's learned mask look?) and
``notebooks/06_darac.ipynb`` (which regions does DARAC weigh?):

* :func:`object_task` -- the in-domain object task: hundreds of objects (disjoint crops of
  photos, each crop its own group) pasted at 10-20 % of the area of a few shared backgrounds,
  split into training, validation and held-out :class:`CompositeSet` (an :class:`ObjectTask`)
  that share no object photo and no background;
* :func:`cell_coverage`, :func:`mask_mass_in_box`, :func:`box_area_share` -- how much of a
  feature-map mask lies inside an image box, each map cell standing for one tile of the image.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from retrieval_lib.data.datasets import cache_root
from retrieval_lib.data.images import ImageList, load_image, resize_longer_side
from retrieval_lib.files import build_once, files_fingerprint

__all__ = ["cell_coverage", "mask_mass_in_box", "box_area_share", "CompositeSet", "ObjectTask", "object_task",
           "OBJECT_TASK_VERSION"]

OBJECT_TASK_VERSION = 1


def _check_box(box, image_size, fn: str):
    W, H = (float(v) for v in image_size)
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (W > 0 and H > 0):
        raise ValueError(f"{fn}: image_size must be (width, height) in px, both positive, got {tuple(image_size)}")
    if not (0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H):
        raise ValueError(f"{fn}: box {tuple(box)} must be (x0, y0, x1, y1) with 0 <= x0 < x1 <= width and "
                         f"0 <= y0 < y1 <= height of the image {W:g} x {H:g}")
    return W, H, x0, y0, x1, y1


def cell_coverage(map_hw, box, image_size) -> np.ndarray:
    """The share of each feature-map cell's tile that lies inside ``box``: ``(h, w)`` in [0, 1].

    Cell ``(r, c)`` of an ``h x w`` map stands for the tile ``[c W/w, (c+1) W/w) x
    [r H/h, (r+1) H/h)`` of the ``W x H`` image: the backbone's stride (32 px), up to the
    rounding up of the map size. ``box`` is ``(x0, y0, x1, y1)`` in the image's pixels,
    ``image_size`` is ``(W, H)``; any resize of the image scales both alike.
    """
    h, w = (int(v) for v in map_hw)
    W, H, x0, y0, x1, y1 = _check_box(box, image_size, "cell_coverage")
    xs, ys = np.linspace(0.0, W, w + 1), np.linspace(0.0, H, h + 1)
    fx = np.clip(np.minimum(xs[1:], x1) - np.maximum(xs[:-1], x0), 0, None) / np.diff(xs)  # (w,)
    fy = np.clip(np.minimum(ys[1:], y1) - np.maximum(ys[:-1], y0), 0, None) / np.diff(ys)  # (h,)
    return np.outer(fy, fx)


def mask_mass_in_box(mask, box, image_size) -> float:
    """``Σ_i ω_i · coverage_i``: the share of a spatial mask's mass that falls inside ``box``.

    ``mask``: ``(h, w)`` (or ``(1, 1, h, w)``) non-negative weights summing to 1 (wGeM's Ω);
    ``box``, ``image_size``: as in :func:`cell_coverage`, whose tile fractions weigh cells
    that the box's edge cuts. A uniform mask gives exactly :func:`box_area_share`.
    """
    m = mask.detach().cpu().double().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask, float)
    m = m.reshape(m.shape[-2:]) if m.ndim == 4 and m.shape[:2] == (1, 1) else m
    if m.ndim != 2:
        raise ValueError(f"mask_mass_in_box: mask must be (h, w) or (1, 1, h, w), got shape {m.shape}")
    return float((m * cell_coverage(m.shape, box, image_size)).sum())


def box_area_share(box, image_size) -> float:
    """The box's area over the image's: what a uniform mask puts inside it."""
    W, H, x0, y0, x1, y1 = _check_box(box, image_size, "box_area_share")
    return (x1 - x0) * (y1 - y0) / (W * H)


@dataclasses.dataclass
class CompositeSet:
    """Objects pasted onto backgrounds (one entry per composite image).

    Attributes:
        paths: the JPEG files.
        labels: (N,) int64, the pasted object's group (the objects' GroupDataset labels).
        boxes: (N, 4) float64, the pasted box ``(x0, y0, x1, y1)`` in the file's pixels.
        sizes: (N, 2) int64, each file's ``(width, height)``.
        objects: (N,) int64, index of the pasted image in the objects' dataset.
        backgrounds: (N,) int64, index of the background in ``background_files``.
        background_files: the background images given, as paths.
        group_names: ``group_names[label]``, as in the objects' dataset.
        folder: where the files are.
    """

    paths: list
    labels: np.ndarray
    boxes: np.ndarray
    sizes: np.ndarray
    objects: np.ndarray
    backgrounds: np.ndarray
    background_files: list
    group_names: list
    folder: Path

    def __len__(self) -> int:
        return len(self.paths)

    def images(self):
        """An :class:`~retrieval_lib.data.images.ImageList` of the composites, for extraction."""
        return ImageList(self.paths, name="composites")

    def box_shares(self) -> np.ndarray:
        """(N,) each box's share of its image's area (:func:`box_area_share`)."""
        return np.array([box_area_share(b, s) for b, s in zip(self.boxes, self.sizes)])

    def summary(self) -> str:
        return (f"{len(self)} composites of {len(np.unique(self.objects))} object images in "
                f"{len(np.unique(self.labels))} groups on {len(np.unique(self.backgrounds))} backgrounds")


@dataclasses.dataclass
class ObjectTask:
    """The in-domain object task of :func:`object_task`: three :class:`CompositeSet` sharing no
    object photo and no background. In each set ``labels`` number its objects (crops) from 0,
    ``objects`` is the index of the cropped photo in the source data set and ``group_names``
    reads ``<source group>/<photo>#<crop>``."""

    train: CompositeSet
    val: CompositeSet
    held: CompositeSet

    def summary(self) -> str:
        return "\n".join(f"{name}: {len(cs)} composites of {len(np.unique(cs.labels))} objects (crops of "
                         f"{len(np.unique(cs.objects))} photos) on {len(np.unique(cs.backgrounds))} backgrounds"
                         for name, cs in (("train", self.train), ("val", self.val), ("held", self.held)))


def _positive_int(value, name: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"object_task: {name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _grid(size, k: int):
    """``(rows, cols)`` with ``rows * cols = k`` whose cells of an image of ``size`` are closest to square."""
    W, H = size
    return min(((r, k // r) for r in range(1, k + 1) if k % r == 0),
               key=lambda rc: abs(np.log((W / rc[1]) / (H / rc[0]))))


def _crops(size, k: int, rng: np.random.Generator) -> list:
    """``k`` disjoint crops ``(x0, y0, x1, y1)`` of an image of ``size``: each 80-100 % of the sides of its
    cell in the grid of :func:`_grid`, at a random place inside the cell."""
    W, H = size
    rows, cols = _grid(size, k)
    out = []
    for r in range(rows):
        for c in range(cols):
            cx0, cx1, cy0, cy1 = W * c / cols, W * (c + 1) / cols, H * r / rows, H * (r + 1) / rows
            w, h = (cx1 - cx0) * rng.uniform(0.8, 1.0), (cy1 - cy0) * rng.uniform(0.8, 1.0)
            x0, y0 = cx0 + rng.uniform(0, cx1 - cx0 - w), cy0 + rng.uniform(0, cy1 - cy0 - h)
            out.append(tuple(int(round(v)) for v in (x0, y0, x0 + w, y0 + h)))
    return out


def _paste_size(aspect: float, bg_size, area, rng: np.random.Generator):
    """``(w, h)`` of a piece of ``aspect`` (w / h) covering a share drawn in ``area`` of the background."""
    W, H = bg_size
    lo, hi = area
    h = np.sqrt(rng.uniform(lo, hi) * W * H / aspect)
    w, h = max(1, min(W, int(round(aspect * h)))), max(1, min(H, int(round(h))))
    for _ in range(W + H):  # rounding or the edges of the background may push the share out of ``area``
        share = w * h / (W * H)
        if share > hi:
            w, h = (w - 1, h) if w / h > aspect else (w, h - 1)
        elif share < lo and (w < W or h < H):
            w, h = (w + 1, h) if (w / h < aspect and w < W) or h == H else (w, h + 1)
        else:
            break
    if not lo <= w * h / (W * H) <= hi:
        raise ValueError(f"object_task: a piece of aspect {aspect:.2f} cannot cover {lo:g}-{hi:g} of a {W} x {H} "
                         "background; widen `area` or use less elongated photos")
    return w, h


def _place(piece_size, bg_size, placement, rng: np.random.Generator):
    """Top-left corner of the piece: random, or centred at ``placement`` (fractions of the background's
    sides) within +-5 % of the sides, clipped inside."""
    (w, h), (W, H) = piece_size, bg_size
    if placement is None:
        return int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1))
    cx = (placement[0] + rng.uniform(-0.05, 0.05)) * W
    cy = (placement[1] + rng.uniform(-0.05, 0.05)) * H
    return int(np.clip(round(cx - w / 2), 0, W - w)), int(np.clip(round(cy - h / 2), 0, H - h))


def _check_task_args(area, placement, per_object, n_bg) -> None:
    if not (isinstance(area, (tuple, list)) and len(area) == 2 and all(isinstance(a, (int, float)) for a in area)
            and 0 < area[0] <= area[1] <= 0.5):
        raise ValueError(f"object_task: area must be (low, high) shares of the background's area with "
                         f"0 < low <= high <= 0.5, e.g. (0.10, 0.20); got {area!r}")
    if placement is not None and not (isinstance(placement, (tuple, list)) and len(placement) == 2 and
                                      all(isinstance(f, (int, float)) and 0 <= f <= 1 for f in placement)):
        raise ValueError(f"object_task: placement must be None (a random place) or (fx, fy), the piece's centre as "
                         f"fractions 0..1 of the background's width and height; got {placement!r}")
    if per_object > n_bg:
        raise ValueError(f"object_task: per_object={per_object} backgrounds per object need pools of at least that "
                         f"many backgrounds, got n_backgrounds={n_bg}")


def object_task(dataset, n_held_groups: int = 30, n_val_groups: Optional[int] = None,
                n_train_groups: Optional[int] = None, crops_per_image: int = 2, per_object: int = 3,
                area=(0.10, 0.20), placement=None, n_backgrounds: Optional[int] = None,
                photos_per_group: Optional[int] = 1, seed: int = 0, max_side: int = 512, cache_dir=None,
                progress: bool = True) -> ObjectTask:
    """The in-domain object task of ``notebooks/05_wgem.ipynb``: which object is pasted here?

    * ``dataset``'s groups are shuffled (seed ``seed``). The first groups give the backgrounds,
      dealt group by group into three pools (held out, validation, training) of
      ``n_backgrounds`` photos each (default ``max(per_object, 8)``); the other groups give the
      object photos, at most ``photos_per_group`` of each (``None``: all; one by default, so no
      two object photos show the same thing). A group's photos all land on one side.
    * Each object photo gives ``crops_per_image`` disjoint crops (a grid of near-square cells,
      80-100 % of each cell's sides); **each crop is an object, its own group**. The first
      ``n_held_groups`` crops are held out, the next ``n_val_groups`` (default: as many) are
      the validation objects, the rest train (at most ``n_train_groups``; ``None``: all).
    * Every object is pasted on ``per_object`` different backgrounds of its side's pool,
      scaled to cover a share of the background's area drawn in ``area`` and flipped at
      random (so two matches are not pixel copies), at a random place (``placement=None``)
      or centred at ``placement = (fx, fy)`` (fractions of the width and height, +-5 %
      jitter, clipped inside). Backgrounds have their longer side at ``max_side``. A small pool
      makes non-matching composites share backgrounds: only the object tells them apart.

    Files go to ``<cache_dir>/object_task_v1/<fingerprint>/`` (default
    :func:`~retrieval_lib.data.datasets.cache_root`), keyed on the files and every parameter
    and built once (:func:`~retrieval_lib.files.build_once`). Raises ``ValueError`` for a bad
    argument or a data set too small for the sides asked for.
    """
    n_held = _positive_int(n_held_groups, "n_held_groups")
    n_val = n_held if n_val_groups is None else _positive_int(n_val_groups, "n_val_groups")
    n_train = np.inf if n_train_groups is None else _positive_int(n_train_groups, "n_train_groups", 2)
    k = _positive_int(crops_per_image, "crops_per_image")
    per_object = _positive_int(per_object, "per_object")
    n_bg = max(per_object, 8) if n_backgrounds is None else _positive_int(n_backgrounds, "n_backgrounds")
    per_group = None if photos_per_group is None else _positive_int(photos_per_group, "photos_per_group")
    max_side = _positive_int(max_side, "max_side", 64)
    _check_task_args(area, placement, per_object, n_bg)
    area = (float(area[0]), float(area[1]))
    placement = None if placement is None else (float(placement[0]), float(placement[1]))
    paths = [os.fspath(p) for p in dataset.database.paths]
    labels = np.asarray(dataset.labels)
    rng = np.random.default_rng(seed)
    groups = rng.permutation(np.unique(labels)).tolist()
    members = {g: rng.permutation(np.flatnonzero(labels == g)).tolist() for g in groups}
    pools = [[], [], []]  # held, val, train backgrounds: indices into ``paths``
    while groups and len(pools[2]) < n_bg:
        pool = next(p for p in pools if len(p) < n_bg)
        pool.extend(members[groups.pop(0)])
    pools = [p[:n_bg] for p in pools]
    plan, counts, quota, side = [], [0, 0, 0], (n_held, n_val, n_train), 0  # plan: (side, photo, crop)
    for g in groups:  # every photo of a group on one side; crops past a side's quota are left out
        side += int(side < 2 and counts[side] >= quota[side])
        for i in members[g][:per_group]:
            for c in range(k):
                if counts[side] < quota[side]:
                    plan.append((side, i, c))
                    counts[side] += 1
    if len(pools[2]) < n_bg or counts[0] < n_held or counts[1] < n_val or counts[2] < 2:
        raise ValueError(f"object_task: {len(paths)} photos in {len(np.unique(labels))} groups cannot give 3 pools of "
                         f"{n_bg} backgrounds and {n_held} held-out, {n_val} validation and at least 2 training "
                         f"objects from {k} crops per photo (got {counts[0]}, {counts[1]}, {counts[2]}); ask for fewer "
                         "objects or backgrounds, or more crops per photo")
    params = {"v": OBJECT_TASK_VERSION, "n_held": n_held, "n_val": n_val, "n_train": counts[2], "k": k,
              "per_object": per_object, "area": area, "placement": placement, "n_bg": n_bg, "per_group": per_group,
              "seed": seed, "max_side": max_side}
    final = (Path(cache_dir).expanduser() if cache_dir is not None else cache_root()) / \
        f"object_task_v{OBJECT_TASK_VERSION}" / files_fingerprint(paths, params)

    def build(tmp: Path) -> dict:
        rows, bar = [], tqdm(total=len(plan) * per_object, desc="object task", unit="img", disable=not progress)
        for i in dict.fromkeys(i for _, i, _ in plan):
            img = load_image(paths[i])
            prng = np.random.default_rng([seed, i])
            boxes = _crops(img.size, k, prng)
            for obj, (side, _, c) in ((n, t) for n, t in enumerate(plan) if t[1] == i):
                crop = img.crop(boxes[c])
                for j, b in enumerate(prng.choice(len(pools[side]), size=per_object, replace=False).tolist()):
                    bg = resize_longer_side(load_image(paths[pools[side][b]]), max_side).copy()
                    w, h = _paste_size(crop.size[0] / crop.size[1], bg.size, area, prng)
                    piece = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if prng.random() < 0.5 else crop
                    x, y = _place((w, h), bg.size, placement, prng)
                    bg.paste(piece.resize((w, h), Image.Resampling.BICUBIC), (x, y))
                    f = f"object_{i:05d}_{c}_{j}.jpg"
                    bg.save(tmp / f, quality=90)
                    rows.append([side, f, obj, i, b, [x, y, x + w, y + h], list(bg.size),
                                 f"{dataset.group_names[labels[i]]}/{Path(paths[i]).stem}#{c}"])
                    bar.update(1)
        bar.close()
        return {"params": params, "rows": rows}

    index = build_once(final, "object_task.json", build, prefix=".object-task-")
    rows = json.loads(index.read_text())["rows"]
    sets = []
    for side in range(3):
        rs = [r for r in rows if r[0] == side]
        objs = sorted({r[2] for r in rs})
        names = {r[2]: r[7] for r in rs}
        sets.append(CompositeSet(paths=[str(final / r[1]) for r in rs],
                                 labels=np.array([objs.index(r[2]) for r in rs], dtype=np.int64),
                                 boxes=np.array([r[5] for r in rs], dtype=np.float64).reshape(-1, 4),
                                 sizes=np.array([r[6] for r in rs], dtype=np.int64).reshape(-1, 2),
                                 objects=np.array([r[3] for r in rs], dtype=np.int64),
                                 backgrounds=np.array([r[4] for r in rs], dtype=np.int64),
                                 background_files=[paths[i] for i in pools[side]],
                                 group_names=[names[o] for o in objs], folder=final))
    return ObjectTask(train=sets[2], val=sets[1], held=sets[0])
