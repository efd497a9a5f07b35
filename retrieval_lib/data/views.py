"""Augmented views and synthetic composites of training images, written once to disk.

Reduced (CPU) training keeps the backbone frozen: the feature maps of the training images
and of several augmented views of each are extracted once (through the extraction cache
of :func:`retrieval_lib.engine.extract.extract_fmaps`) and only the head learns on them
(:func:`retrieval_lib.engine.recipes.reduced_source`).
The views are files, so the cache can fingerprint them like any other image:

* a *view* of an image: a random crop (35-100 % of its area, aspect 3:4 to 4:3), a
  horizontal flip half of the time, brightness/contrast/saturation changes, and a
  random scale (long side 50-100 % of ``max_side``);
* a *composite*: a crop of an image pasted, smaller, onto an image of another group --
  it keeps the pasted image's label, so the head learns to find an object in clutter;
  the pasted box is recorded (``ViewSet.boxes``), so a notebook can measure where a
  learned attention mask looks.

Everything comes from the training side of :func:`retrieval_lib.engine.mining.honest_split`,
so no evaluated image leaks into training. Generated files are written once under a
fingerprint of their sources and settings (:func:`~retrieval_lib.files.files_fingerprint`,
:func:`~retrieval_lib.files.build_once`, shared with the composites and the offline default). Taught in ``notebooks/05_wgem.ipynb``.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import ImageEnhance, ImageOps
from tqdm.auto import tqdm

from retrieval_lib.data.datasets import cache_root
from retrieval_lib.data.images import ImageList, load_image, resize_longer_side
from retrieval_lib.files import build_once, files_fingerprint

__all__ = ["ViewSet", "make_views", "augment", "composite", "VIEWS_VERSION"]

VIEWS_VERSION = 2  # 2: the rows record the pasted box of each composite
KINDS = ("original", "view", "composite")


def augment(img, rng: np.random.Generator, max_side: int = 512):
    """One augmented view of PIL image ``img``: crop, flip, colour, scale (see the module doc)."""
    W, H = img.size
    area = rng.uniform(0.35, 1.0) * W * H
    aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
    w = int(min(W, max(8, round(np.sqrt(area * aspect)))))
    h = int(min(H, max(8, round(np.sqrt(area / aspect)))))
    x0, y0 = int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1))
    out = img.crop((x0, y0, x0 + w, y0 + h))
    if rng.random() < 0.5:
        out = ImageOps.mirror(out)
    out = ImageEnhance.Brightness(out).enhance(rng.uniform(0.7, 1.3))
    out = ImageEnhance.Contrast(out).enhance(rng.uniform(0.7, 1.3))
    out = ImageEnhance.Color(out).enhance(rng.uniform(0.6, 1.4))
    long = max(64, int(round(rng.uniform(0.5, 1.0) * max_side)))
    return resize_longer_side(out, long)


def composite(fg, bg, rng: np.random.Generator, max_side: int = 512, return_box: bool = False):
    """Paste a crop of PIL image ``fg`` (60-100 % of its area), scaled to 40-70 % of the
    background's short side, at a random place on ``bg`` (long side 70-100 % of ``max_side``).

    Returns the composite, or with ``return_box`` ``(composite, box)``: ``box`` is the pasted
    piece's ``(x0, y0, x1, y1)`` in the composite's pixels (``x1``, ``y1`` exclusive).
    """
    bg = resize_longer_side(bg, max(64, int(round(rng.uniform(0.7, 1.0) * max_side)))).copy()
    W, H = fg.size
    s = np.sqrt(rng.uniform(0.6, 1.0))
    w, h = max(8, int(W * s)), max(8, int(H * s))
    x0, y0 = int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1))
    piece = fg.crop((x0, y0, x0 + w, y0 + h))
    piece = resize_longer_side(piece, max(16, int(round(rng.uniform(0.4, 0.7) * min(bg.size)))))
    px = int(rng.integers(0, bg.size[0] - piece.size[0] + 1))
    py = int(rng.integers(0, bg.size[1] - piece.size[1] + 1))
    bg.paste(piece, (px, py))
    if return_box:
        return bg, (px, py, px + piece.size[0], py + piece.size[1])
    return bg


@dataclasses.dataclass
class ViewSet:
    """Training images with their views and composites.

    Attributes (one entry per image, originals first, in the source data set's order):
        paths: image files (the originals' own paths, then the generated JPEGs).
        labels: (N,) int64 group of each image (a composite takes its pasted image's group).
        source: (N,) int64 index in the source data set of the image it was made from.
        kind: (N,) ``"original"``, ``"view"`` or ``"composite"``.
        boxes: (N, 4) float64, a composite's pasted box ``(x0, y0, x1, y1)`` in its own
            pixels (see :func:`composite`); NaN for originals and views.
        group_names: ``group_names[label]``, as in the source data set.
        folder: where the generated files are (``None`` when there are none).
    """

    paths: list
    labels: np.ndarray
    source: np.ndarray
    kind: np.ndarray
    boxes: np.ndarray
    group_names: list
    folder: Optional[Path] = None

    def __len__(self) -> int:
        return len(self.paths)

    def images(self):
        """An :class:`~retrieval_lib.data.images.ImageList` of every image, for extraction."""
        return ImageList(self.paths, name="training views")

    def summary(self) -> str:
        counts = ", ".join(f"{int((self.kind == k).sum())} {k}s" for k in KINDS)
        return f"{len(self)} training images in {len(np.unique(self.labels))} groups ({counts})"


def _build(folder: Path, paths, labels, n_views, n_composites, seed, max_side, progress) -> list:
    """Write the JPEGs into ``folder``; return the rows ``[file, label, source, kind, box or None]``."""
    rows = []
    n = len(paths)
    for i in tqdm(range(n), desc="augmented views", unit="img", disable=not progress):
        img = load_image(paths[i])
        for k in range(n_views):
            rng = np.random.default_rng([seed, i, k])
            f = f"view_{i:06d}_{k}.jpg"
            augment(img, rng, max_side).save(folder / f, quality=90)
            rows.append([f, int(labels[i]), i, "view", None])
        others = np.flatnonzero(labels != labels[i])
        for k in range(n_composites if len(others) else 0):
            rng = np.random.default_rng([seed, i, 1000 + k])
            j = int(others[rng.integers(len(others))])
            f = f"composite_{i:06d}_{k}.jpg"
            out, box = composite(img, load_image(paths[j]), rng, max_side, return_box=True)
            out.save(folder / f, quality=90)
            rows.append([f, int(labels[i]), i, "composite", list(box)])
    return rows


def make_views(dataset, n_views: int = 4, n_composites: int = 1, seed: int = 0, max_side: int = 512,
               cache_dir=None, progress: bool = True) -> ViewSet:
    """The images of ``dataset`` (a GroupDataset), ``n_views`` augmented views of each and
    ``n_composites`` composites of each (pasted onto a random image of another group).

    The generated JPEGs go to ``<cache_dir>/views_v<VIEWS_VERSION>/<fingerprint>/`` (``cache_dir``
    defaults to :func:`~retrieval_lib.data.datasets.cache_root`); the fingerprint covers the
    source files (path, size, modification time) and every parameter, so a changed image
    or setting gives a new folder, and the same call reuses the folder it built. The
    folder is built under a temporary name and renamed when complete. The same ``seed``
    gives the same pixels. Pass only training images (``honest_split(...).train``).
    """
    for name, v in (("n_views", n_views), ("n_composites", n_composites)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"make_views: {name} must be an integer >= 0, got {v!r}")
    if isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 64:
        raise ValueError(f"make_views: max_side must be an integer >= 64 px, got {max_side!r}")
    paths = [os.fspath(p) for p in dataset.database.paths]
    labels = np.asarray(dataset.labels, dtype=np.int64)
    n = len(paths)
    orig = ViewSet(list(paths), labels.copy(), np.arange(n), np.array(["original"] * n, dtype="<U9"),
                   np.full((n, 4), np.nan), list(dataset.group_names))
    if n_views == 0 and n_composites == 0:
        return orig
    params = {"v": VIEWS_VERSION, "n_views": n_views, "n_composites": n_composites, "seed": seed,
              "max_side": max_side}
    parent = (Path(cache_dir).expanduser() if cache_dir is not None else cache_root()) / f"views_v{VIEWS_VERSION}"
    final = parent / files_fingerprint(paths, params)

    def build(tmp: Path) -> dict:
        return {"params": params, "rows": _build(tmp, paths, labels, n_views, n_composites, seed, max_side, progress)}

    index = build_once(final, "views.json", build, prefix=".views-")
    rows = json.loads(index.read_text())["rows"]
    return ViewSet(
        paths=orig.paths + [str(final / r[0]) for r in rows],
        labels=np.concatenate([orig.labels, np.array([r[1] for r in rows], dtype=np.int64)]),
        source=np.concatenate([orig.source, np.array([r[2] for r in rows], dtype=np.int64)]),
        kind=np.concatenate([orig.kind, np.array([r[3] for r in rows], dtype="<U9")]),
        boxes=np.concatenate([orig.boxes, np.array([[np.nan] * 4 if r[4] is None else r[4] for r in rows],
                                                   dtype=np.float64).reshape(-1, 4)]),
        group_names=orig.group_names, folder=final)
