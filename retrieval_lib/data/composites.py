"""Objects pasted onto clutter, with the pasted boxes recorded, and how much of a mask lies in a box.

For the localisation experiment of ``notebooks/05_wgem.ipynb`` (where does wGeM's learned mask
look?):

* :func:`object_composites` -- every image of a set of objects pasted onto several
  backgrounds (:func:`~retrieval_lib.data.views.composite`), written once as files with the
  pasted boxes recorded (a :class:`CompositeSet`); :func:`localisation_composites` -- the
  training and held-out composites, sharing no object and no background;
* :func:`cell_coverage`, :func:`mask_mass_in_box`, :func:`box_area_share` -- how much of a
  feature-map mask lies inside an image box, each map cell standing for one tile of the image.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from retrieval_lib.data.datasets import cache_root
from retrieval_lib.data.images import ImageList, load_image
from retrieval_lib.data.splits import split_groups, take
from retrieval_lib.data.views import composite
from retrieval_lib.files import build_once, files_fingerprint

__all__ = ["cell_coverage", "mask_mass_in_box", "box_area_share", "CompositeSet", "object_composites",
           "localisation_composites", "COMPOSITES_VERSION"]

COMPOSITES_VERSION = 1


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


def object_composites(objects, backgrounds: Sequence, per_object: int = 2, seed: int = 0, max_side: int = 512,
                      cache_dir=None, progress: bool = True) -> CompositeSet:
    """Every image of ``objects`` (a GroupDataset) pasted onto ``per_object`` different backgrounds.

    ``backgrounds``: image paths (clutter). For object image ``i`` the backgrounds are drawn
    without replacement with the generator seeded ``[seed, i]``, and each composite is
    :func:`~retrieval_lib.data.views.composite` (a crop of the object, scaled to 40-70 %
    of the background's short side, pasted at a random place) with its box recorded. Two
    composites of one group match; composites of other groups do not, even on the same
    background. Files go to ``<cache_dir>/wgem_composites_v1/<fingerprint>/`` (default
    :func:`~retrieval_lib.data.datasets.cache_root`), keyed on the source files and every
    parameter, built once under a temporary name and reused (:func:`~retrieval_lib.files.build_once`).
    """
    bgs = [os.fspath(b) for b in backgrounds]
    if isinstance(per_object, bool) or not isinstance(per_object, int) or not 1 <= per_object <= len(bgs):
        raise ValueError(f"object_composites: per_object must be an integer from 1 to the number of "
                         f"backgrounds ({len(bgs)}), got {per_object!r}")
    if isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 64:
        raise ValueError(f"object_composites: max_side must be an integer >= 64 px, got {max_side!r}")
    paths = [os.fspath(p) for p in objects.database.paths]
    labels = np.asarray(objects.labels, dtype=np.int64)
    params = {"v": COMPOSITES_VERSION, "per_object": per_object, "seed": seed, "max_side": max_side,
              "n_objects": len(paths)}
    parent = (Path(cache_dir).expanduser() if cache_dir is not None else cache_root()) / \
        f"wgem_composites_v{COMPOSITES_VERSION}"
    final = parent / files_fingerprint(paths + bgs, params)

    def build(tmp: Path) -> dict:
        rows = []
        for i in tqdm(range(len(paths)), desc="composites", unit="img", disable=not progress):
            img = load_image(paths[i])
            rng = np.random.default_rng([seed, i])
            for k, b in enumerate(rng.choice(len(bgs), size=per_object, replace=False).tolist()):
                out, box = composite(img, load_image(bgs[b]), rng, max_side, return_box=True)
                f = f"composite_{i:06d}_{k}.jpg"
                out.save(tmp / f, quality=90)
                rows.append([f, int(labels[i]), i, b, list(box), list(out.size)])
        return {"params": params, "rows": rows}

    index = build_once(final, "composites.json", build, prefix=".composites-")
    rows = json.loads(index.read_text())["rows"]
    return CompositeSet(paths=[str(final / r[0]) for r in rows],
                        labels=np.array([r[1] for r in rows], dtype=np.int64),
                        boxes=np.array([r[4] for r in rows], dtype=np.float64).reshape(-1, 4),
                        sizes=np.array([r[5] for r in rows], dtype=np.int64).reshape(-1, 2),
                        objects=np.array([r[2] for r in rows], dtype=np.int64),
                        backgrounds=np.array([r[3] for r in rows], dtype=np.int64), background_files=bgs,
                        group_names=list(objects.group_names), folder=final)


def localisation_composites(dataset, held_frac: float = 0.3, n_backgrounds: Optional[int] = None,
                            per_object: int = 2, object_subsets: Sequence[str] = ("ukbench56",), seed: int = 0,
                            max_side: int = 512, cache_dir=None, progress: bool = True):
    """Training and held-out composites for the localisation experiment, from ``dataset``'s images.

    * Objects and clutter: when ``dataset`` has subsets named in ``object_subsets``
      (UKBench: one object per group, photographed close up), their images are the objects
      and every other image is a background; otherwise half of the groups
      (:func:`~retrieval_lib.data.splits.split_groups`) are objects and the images of the
      rest backgrounds.
    * The object groups are split (``held_frac`` of them held out) and the backgrounds are
      shuffled and dealt into two disjoint pools of at most ``n_backgrounds`` each (and at
      most half of them each; default: half each), so no held-out composite shares an
      object or a background with a training one. A small pool makes non-matching
      composites share backgrounds: hard negatives that only the object tells apart.

    Returns ``(train, held)``, two :class:`CompositeSet` (:func:`object_composites` with
    ``per_object`` backgrounds per object image).
    """
    subsets = dataset.subsets if dataset.subsets is not None else np.full(len(dataset.labels), "")
    is_object = np.isin(subsets, list(object_subsets))
    if not is_object.any() or is_object.all():
        is_object = split_groups(dataset.labels, 0.5, seed)
    objects = take(dataset, is_object, "objects")
    backgrounds = [dataset.database.paths[i] for i in np.flatnonzero(~is_object)]
    order = np.random.default_rng(seed).permutation(len(backgrounds))
    n_bg = len(backgrounds) // 2
    if n_backgrounds is not None:
        if isinstance(n_backgrounds, bool) or not isinstance(n_backgrounds, (int, np.integer)) or n_backgrounds < 1:
            raise ValueError(f"localisation_composites: n_backgrounds must be a positive integer or None, "
                             f"got {n_backgrounds!r}")
        n_bg = min(n_bg, int(n_backgrounds))
    if n_bg < 1:
        raise ValueError(f"localisation_composites: {len(backgrounds)} background image(s) cannot make two "
                         "disjoint pools; the data set needs at least two images outside the objects")
    held = ~split_groups(objects.labels, 1.0 - held_frac, seed)
    out = []
    for side, pool in ((~held, order[:n_bg]), (held, order[n_bg:2 * n_bg])):
        out.append(object_composites(take(objects, side), [backgrounds[i] for i in pool], per_object=per_object,
                                     seed=seed, max_side=max_side, cache_dir=cache_dir, progress=progress))
    return tuple(out)
