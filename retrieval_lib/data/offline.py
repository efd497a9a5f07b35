"""The offline default: a small instance-retrieval benchmark generated from the photos that
scikit-image bundles (:func:`offline_default`), and :func:`default_benchmark`, which picks
real171 when the data root holds it and the offline default otherwise.
"""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from retrieval_lib.data.groups import GroupDataset, real171
from retrieval_lib.data.images import resize_longer_side
from retrieval_lib.data.roots import cache_root, data_root
from retrieval_lib.files import build_once

__all__ = ["offline_default", "default_benchmark", "OFFLINE_VERSION"]

OFFLINE_VERSION = 2  # 2: images resized with data.images.resize_longer_side (bicubic)
# colour photos that ship inside scikit-image (no download needed)
_OFFLINE_SOURCES = ("chelsea", "coffee", "astronaut", "rocket", "stereo_motorcycle",
                    "hubble_deep_field", "retina")
# greyscale photos and textures, tinted, as single-image distractor groups
_OFFLINE_DISTRACTORS = ("camera", "coins", "moon", "clock", "brick", "grass", "gravel", "text")


def _skimage_photo(name: str) -> np.ndarray:
    import skimage.data

    img = getattr(skimage.data, name)()
    if isinstance(img, tuple):  # stereo_motorcycle: (left, right, disparity)
        img = img[0]
    return img


def _homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """3×3 matrix mapping the 4 points ``src`` (4, 2) onto ``dst`` (skimage ProjectiveTransform)."""
    from skimage.transform import ProjectiveTransform

    if hasattr(ProjectiveTransform, "from_estimate"):
        return ProjectiveTransform.from_estimate(src, dst).params
    t = ProjectiveTransform()
    t.estimate(src, dst)
    return t.params


def _view(base, rng: np.random.Generator):
    """One query view of PIL image ``base``: perspective crop, scale, colour change, occlusion."""
    W, H = base.size
    sx, sy = rng.uniform(0.55, 0.9, size=2)
    cw, ch = sx * W, sy * H
    x0, y0 = rng.uniform(0, W - cw), rng.uniform(0, H - ch)
    quad = np.array([[x0, y0], [x0 + cw, y0], [x0 + cw, y0 + ch], [x0, y0 + ch]])
    quad += rng.uniform(-0.12, 0.12, size=(4, 2)) * [cw, ch]       # perspective
    angle = np.deg2rad(rng.uniform(-12, 12))                         # in-plane rotation
    c = quad.mean(0)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    quad = (quad - c) @ rot.T + c
    long = int(rng.integers(320, 481))                               # scale
    size = (long, max(32, round(long * ch / cw))) if cw >= ch else (max(32, round(long * cw / ch)), long)
    out = np.array([[0, 0], [size[0], 0], [size[0], size[1]], [0, size[1]]], dtype=float)
    M = _homography(out, quad)  # output pixel -> base pixel, what PIL's PERSPECTIVE wants
    coeffs = tuple((M / M[2, 2]).ravel()[:8])
    fill = tuple(int(v) for v in rng.integers(0, 256, 3))
    img = base.transform(size, Image.PERSPECTIVE, coeffs, resample=Image.BICUBIC, fillcolor=fill)
    gains, gamma = rng.uniform(0.75, 1.25, 3), rng.uniform(0.7, 1.4)  # colour and exposure
    ramp = (np.arange(256) / 255.0) ** gamma
    lut = np.concatenate([np.clip(np.rint(255 * ramp * g), 0, 255) for g in gains]).astype(int)
    img = img.point(lut.tolist())
    if rng.random() < 0.5:                                           # partial occlusion
        area = rng.uniform(0.08, 0.2) * size[0] * size[1]
        aspect = rng.uniform(0.5, 2.0)
        w = int(min(size[0] - 1, np.sqrt(area * aspect)))
        h = int(min(size[1] - 1, area / max(w, 1)))
        ox, oy = int(rng.integers(0, size[0] - w)), int(rng.integers(0, size[1] - h))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        ImageDraw.Draw(img).rectangle([ox, oy, ox + w, oy + h], fill=colour)
    return img


def _build_offline(folder: Path, n_views: int, n_distractors: int, seed: int) -> dict:
    """Write the images of the offline default into ``folder``; return its manifest."""
    subset = "skimage_views"
    (folder / subset).mkdir(parents=True)
    rng = np.random.default_rng(seed)
    items = []
    for name in _OFFLINE_SOURCES:
        photo = resize_longer_side(Image.fromarray(_skimage_photo(name)).convert("RGB"), 720)
        W, H = photo.size
        # two instances per photo: its two halves across the long side (same style, other content)
        halves = ((0, 0, W // 2, H), (W // 2, 0, W, H)) if W >= H else ((0, 0, W, H // 2), (0, H // 2, W, H))
        for part, box in zip("ab", halves):
            base = photo.crop(box)
            group = f"{name}_{part}"
            views = [resize_longer_side(base, 448)] + [_view(base, rng) for _ in range(n_views)]
            for k, img in enumerate(views):
                file = f"{group}_{k}.jpg"
                img.save(folder / subset / file, quality=90)
                items.append([file, group])
    for name in _OFFLINE_DISTRACTORS[:n_distractors]:
        grey = _skimage_photo(name).astype(np.float64)
        h, w = grey.shape
        ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        tint = rng.uniform(0.5, 1.0, 3)
        rgb = np.clip(grey[y:y + ch, x:x + cw, None] * tint, 0, 255).astype(np.uint8)
        file = f"distractor_{name}.jpg"
        resize_longer_side(Image.fromarray(rgb), int(rng.integers(320, 481))).save(folder / subset / file, quality=90)
        items.append([file, f"distractor_{name}"])
    manifest = {
        "format": "one folder per subset; items list [file, group]; images of one group show "
                  "the same object or place",
        "generator": {"function": "retrieval_lib.data.datasets.offline_default", "version": OFFLINE_VERSION,
                      "seed": seed, "n_views": n_views, "n_distractors": n_distractors},
        "subsets": {subset: {
            "items": items,
            "source": "photos bundled with scikit-image (skimage.data: " + ", ".join(_OFFLINE_SOURCES)
                      + "); each photo is split into two halves, each half a group of the half "
                      "itself and synthetic views (perspective crop, scale, colour, occlusion); "
                      "distractors are tinted crops of "
                      + ", ".join(_OFFLINE_DISTRACTORS[:n_distractors]),
            "license": "see the skimage.data documentation of each image (public domain, CC0 "
                       "or CC-BY)",
        }},
    }
    return manifest


def offline_default(cache_dir=None, n_views: int = 3, n_distractors: int = 4, seed: int = 0,
                    **kw) -> GroupDataset:
    """A small instance-retrieval benchmark generated from scikit-image's bundled photos.

    Works on any machine without downloads. Each of 7 colour photos (chelsea, coffee,
    astronaut, rocket, stereo_motorcycle, hubble_deep_field, retina), resized to 720 px,
    is split at the middle of its long side; each half is an instance (group), so
    every group has a look-alike with other content (the hard negatives). A group holds
    the half itself (448 px long side) and ``n_views`` synthetic query views: a random
    perspective crop (55–90 % of each side, corners moved up to 12 %, rotated up to 12°),
    scaled to 320–480 px, with per-channel gain and gamma changes and, half of the time,
    a solid rectangle hiding 8–20 % of it. ``n_distractors`` (≤ 8) tinted crops of
    scikit-image's greyscale photos are single-image distractor groups. With the defaults:
    14 × 4 + 4 = 60 images, labels known by construction. Off-the-shelf EfficientNet-Lite0
    descriptors score an mAP of about 0.7–0.8 on it, so poolings can still be told apart.

    The JPEGs and a ``manifest.json`` (the format of real171) are written to
    ``<cache_dir>/offline_default_v2/seed<seed>-views<n_views>-distractors<n>/``
    (``cache_dir`` defaults to :func:`cache_root`) by building a temporary folder and
    renaming it, and reused when present. The same seed gives the same pixels.
    It is a teaching and smoke-test default: its numbers are not comparable to any paper.
    """
    if not 0 <= n_distractors <= len(_OFFLINE_DISTRACTORS):
        raise ValueError(f"n_distractors must be in 0..{len(_OFFLINE_DISTRACTORS)}, got {n_distractors}")
    if n_views < 1:
        raise ValueError(f"n_views must be at least 1, got {n_views}")
    parent = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    parent = parent / f"offline_default_v{OFFLINE_VERSION}"
    final = parent / f"seed{seed}-views{n_views}-distractors{n_distractors}"
    name = "offline_default"
    if (final / "manifest.json").is_file():
        try:
            return GroupDataset.from_manifest(final / "manifest.json", name=name, **kw)
        except (FileNotFoundError, ValueError):  # damaged by hand: build it again
            shutil.rmtree(final)
    build_once(final, "manifest.json", lambda tmp: _build_offline(tmp, n_views, n_distractors, seed),
               prefix=".offline_default-", indent=1)
    return GroupDataset.from_manifest(final / "manifest.json", name=name, **kw)


def default_benchmark(root=None) -> GroupDataset:
    """:func:`real171` when the data root (``root``, else ``RETRIEVAL_DATA``) holds it, else
    :func:`offline_default`. A data root given but without real171 falls back with a warning."""
    r = Path(root).expanduser() if root is not None else data_root()
    if r is not None:
        if (r / "real171" / "manifest.json").is_file():
            return real171(r)
        warnings.warn(f"no real171/manifest.json under the data root '{r}'; using the offline "
                      "default benchmark (synthetic views of scikit-image photos)", stacklevel=2)
    return offline_default()
