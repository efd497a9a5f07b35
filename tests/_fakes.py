"""One stand-in for a notebook session, shared by the session, sweep and region tests,
and the plain-loop references they check against.

``tiny_book`` builds a real :class:`retrieval_lib.book.session.Book` over real benchmarks
(a :class:`GroupDataset`, or a :class:`RevisitedDataset` stand-in tree with separate,
box-cropped queries) of small JPEGs written to a temporary folder. Only the backbone is
a stand-in: :class:`TinyBackbone`, a fixed seeded strided convolution and ReLU, so the
feature maps are fixed by the pixels and computed in milliseconds. Every path of the
session runs for real: re-pooling the kept maps (scale ``"smoke"``) and one backbone pass
per scale (scale ``"full"``, where maps are not kept).
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from retrieval_lib.book.config import scale_config
from retrieval_lib.book.session import Book
from retrieval_lib.data.datasets import CUB200, GroupDataset, RevisitedDataset

#: image sizes (width, height) used in turn, so that maps of two shapes occur
SHAPES = ((64, 48), (48, 64), (56, 56))


class TinyBackbone(nn.Module):
    """``features``: (B, 3, H, W) -> (B, C, ceil(H / 8), ceil(W / 8)), a seeded 8x8 stride-8 conv + ReLU."""

    name = "tiny"
    mean = (0.5, 0.5, 0.5)
    std = (0.25, 0.25, 0.25)

    def __init__(self, channels: int = 8, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(3, channels, kernel_size=8, stride=8, padding=0)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.05)
            self.conv.bias.copy_(torch.randn(channels, generator=g) * 0.1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        pad_h, pad_w = -x.shape[-2] % 8, -x.shape[-1] % 8
        return torch.relu(self.conv(nn.functional.pad(x, (0, pad_w, 0, pad_h))))


def _photo(rng: np.random.Generator, colour, size) -> Image.Image:
    """Noise plus a coloured block at a random place: the block is the 'object'."""
    w, h = size
    a = rng.integers(0, 120, size=(h, w, 3)).astype(np.uint8)
    bw, bh = w // 3, h // 3
    x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
    a[y0:y0 + bh, x0:x0 + bw] = colour
    return Image.fromarray(a)


def write_groups(root: Path, n_groups: int = 5, per_group: int = 3, seed: int = 0) -> tuple[list, list]:
    """JPEGs of ``n_groups`` groups under ``root``; returns (paths, group names)."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(60, 256, size=(n_groups, 3))
    paths, groups = [], []
    root.mkdir(parents=True, exist_ok=True)
    for g in range(n_groups):
        for k in range(per_group):
            p = root / f"g{g}_{k}.jpg"
            _photo(rng, colours[g], SHAPES[(g + k) % len(SHAPES)]).save(p, quality=95)
            paths.append(str(p))
            groups.append(f"group{g}")
    return paths, groups


def group_benchmark(root: Path, n_groups: int = 5, per_group: int = 3, seed: int = 0) -> GroupDataset:
    """A real GroupDataset (every image queries the others) over :func:`write_groups`."""
    paths, groups = write_groups(root / "groups", n_groups, per_group, seed)
    return GroupDataset(paths, groups, name="tiny-groups")


def revisited_benchmark(root: Path, seed: int = 1) -> RevisitedDataset:
    """A real RevisitedDataset ('roxford5k' layout) of 12 database images and 3 queries.

    Query ``q`` is a crop (its box) of a fresh photo of group ``q``; the other images of
    that group are its easy (2) and hard (1) positives; one image of the next group is junk.
    """
    rng = np.random.default_rng(seed)
    colours = rng.integers(60, 256, size=(4, 3))
    jpg = root / "roxford5k" / "jpg"
    jpg.mkdir(parents=True, exist_ok=True)
    imlist = []
    for i in range(12):
        g = i // 3
        name = f"db_{i:02d}"
        _photo(rng, colours[g], SHAPES[i % len(SHAPES)]).save(jpg / f"{name}.jpg", quality=95)
        imlist.append(name)
    qimlist, gnd = [], []
    for q in range(3):
        name = f"q_{q}"
        _photo(rng, colours[q], (80, 72)).save(jpg / f"{name}.jpg", quality=95)
        qimlist.append(name)
        gnd.append({"bbx": [4.0, 6.0, 70.0, 66.0], "easy": [3 * q, 3 * q + 1], "hard": [3 * q + 2],
                    "junk": [3 * q + 3]})
    with open(root / "roxford5k" / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, f)
    return RevisitedDataset("roxford5k", root)


def cub_benchmark(root: Path, classes=(101, 102, 103, 104, 105, 106), per_class: int = 3,
                  seed: int = 4) -> CUB200:
    """A real CUB200 (test split, every image queries the others, Recall@K) in the CUB layout."""
    rng = np.random.default_rng(seed)
    base = root / "CUB_200_2011"
    images, labels = [], []
    for k, c in enumerate(classes):
        colour = rng.integers(60, 256, size=3)
        (base / "images" / f"{c:03d}.Bird").mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            rel = f"{c:03d}.Bird/bird_{j}.jpg"
            _photo(rng, colour, SHAPES[(k + j) % len(SHAPES)]).save(base / "images" / rel, quality=95)
            n = len(images) + 1
            images.append(f"{n} {rel}")
            labels.append(f"{n} {c}")
    (base / "images.txt").write_text("\n".join(images) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    return CUB200(root)


def tiny_book(root: Path, benchmark, scale: str = "smoke", image_size: int = 48, scales=(1.0,)) -> Book:
    """A real session over ``benchmark`` with :class:`TinyBackbone`; ``scale="full"`` keeps no maps."""
    cfg = scale_config(scale, image_size=image_size, scales=tuple(scales), batch_size=4, max_images=None)
    return Book(cfg=cfg, device=torch.device("cpu"), benchmark=benchmark, model=TinyBackbone().eval(),
                cache_dir=Path(root) / "cache", progress=False)


# ------------------------------------------------------------------ plain-loop references
def ap_loop(ranked, positives, junk) -> float:
    """Revisited-protocol AP of one ranked list (trapezoid rule), as a plain loop."""
    if not positives:
        return float("nan")
    pos_ranks, r = [], 0
    for idx in ranked:
        if idx in junk:
            continue
        if idx in positives:
            pos_ranks.append(r)
        r += 1
    ap = 0.0
    for j, rj in enumerate(pos_ranks):
        prec_before = 1.0 if rj == 0 else j / rj
        ap += 0.5 * (prec_before + (j + 1) / (rj + 1))
    return ap / len(positives)


def ranks_loop(Q, X) -> np.ndarray:
    """Database indices by decreasing inner product, one query at a time (stable on ties)."""
    Q, X = np.asarray(Q, dtype=np.float64), np.asarray(X, dtype=np.float64)
    return np.array([sorted(range(len(X)), key=lambda i: -float(q @ X[i])) for q in Q])


def group_map_loop(X, labels) -> float:
    """mAP of a group set by plain loops: every image queries all, itself junk, singletons left out."""
    ranks = ranks_loop(X, X)
    aps = [ap_loop(ranks[q].tolist(), {i for i in range(len(labels)) if labels[i] == labels[q] and i != q}, {q})
           for q in range(len(labels))]
    return float(np.nanmean(aps))


def recall1_loop(X, labels) -> float:
    """Recall@1 by plain loops: is the nearest other image of the query's class?"""
    ranks = ranks_loop(X, X)
    return float(np.mean([labels[next(i for i in ranks[q] if i != q)] == labels[q] for q in range(len(labels))]))
