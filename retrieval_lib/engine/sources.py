"""Where a trainer's inputs come from: cached feature maps, decoded images, or random crops.

A *source* has ``len``, ``labels`` (or ``None``), ``load(indices) -> list of tensors`` and
``config()`` (recorded in every checkpoint). The :class:`~retrieval_lib.engine.trainer.Trainer`
loads each batch's distinct images through it:

* :class:`MapSource` -- reduced mode: feature maps extracted once by a frozen backbone;
* :class:`ImageSource` -- full mode: images resized by their longer side (bicubic, as in
  extraction) and normalised;
* :class:`CropSource` -- CGD's full path: a square resize, then a random crop and flip.

Taught in ``notebooks/05_wgem.ipynb`` (maps, images) and ``notebooks/07_cgd.ipynb`` (crops).
"""
from __future__ import annotations

import concurrent.futures
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from retrieval_lib.data.images import resize_longer_side, to_tensor

__all__ = ["MapSource", "ImageSource", "CropSource", "square_tensor"]


class MapSource:
    """Reduced-mode inputs: feature maps computed once, a list of ``(C, h, w)`` tensors.

    ``labels`` (optional, ``(N,)``) are kept for the miner. ``load(indices)`` returns the maps.
    """

    kind = "maps"

    def __init__(self, fmaps: Sequence[torch.Tensor], labels=None):
        if len(fmaps) == 0 or any(f is None for f in fmaps):
            raise ValueError("MapSource: every image needs a feature map (no empty list, no None: "
                             "drop unreadable images before training)")
        self.fmaps = list(fmaps)
        self.labels = None if labels is None else np.asarray(labels)
        if self.labels is not None and len(self.labels) != len(self.fmaps):
            raise ValueError(f"MapSource: {len(self.labels)} labels for {len(self.fmaps)} maps")

    def __len__(self) -> int:
        return len(self.fmaps)

    def load(self, indices) -> list:
        return [self.fmaps[i] for i in torch.as_tensor(indices).tolist()]

    def config(self) -> dict:
        return {"kind": self.kind, "n": len(self), "channels": int(self.fmaps[0].shape[0])}


class ImageSource:
    """Full-mode inputs: images decoded, resized (longer side ``image_size``, bicubic, as in
    extraction), scaled to ``[0, 1]`` and normalised with ``mean``/``std`` (the backbone's).

    ``load(indices)`` decodes with ``workers`` threads; returns ``(3, h, w)`` float tensors.
    """

    kind = "images"

    def __init__(self, images, image_size: int, mean, std, labels=None, workers: int = 4):
        self.images = images
        self.image_size = int(image_size)
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self.labels = None if labels is None else np.asarray(labels)
        self.workers = max(1, int(workers))

    def __len__(self) -> int:
        return len(self.images)

    def _one(self, i: int) -> torch.Tensor:
        img = self.images[i]
        if img is None:
            raise ValueError(f"ImageSource: image {i} could not be read; drop it from the training set")
        return to_tensor(resize_longer_side(img, self.image_size), self.mean, self.std)

    def load(self, indices) -> list:
        idx = torch.as_tensor(indices).tolist()
        if self.workers == 1 or len(idx) == 1:
            return [self._one(i) for i in idx]
        with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(self._one, idx))

    def config(self) -> dict:
        return {"kind": self.kind, "n": len(self), "image_size": self.image_size}


def square_tensor(img, size: int, mean, std) -> torch.Tensor:
    """PIL image -> ``(3, size, size)`` float tensor: a square bilinear resize (CGD's input),
    scaled to ``[0, 1]`` and normalised with ``mean``/``std``."""
    return to_tensor(img.convert("RGB").resize((size, size), Image.BILINEAR), mean, std)


class CropSource:
    """Full-path training inputs: each image resized to ``train_size`` x ``train_size``, then a random
    ``crop`` x ``crop`` window, flipped left-right half of the time, normalised with ``mean``/``std``.

    The crops come from a generator seeded with ``seed``; a resumed run draws new ones.
    ``load(indices)`` returns ``(3, crop, crop)`` tensors. ``labels``: the classes.
    """

    kind = "crops"

    def __init__(self, images, labels, mean, std, train_size: int = 252, crop: int = 224, seed: int = 0):
        if crop > train_size:
            raise ValueError(f"CropSource: crop={crop} is larger than train_size={train_size}")
        self.images, self.labels = images, np.asarray(labels)
        if len(self.labels) != len(images):
            raise ValueError(f"CropSource: {len(self.labels)} labels for {len(images)} images")
        self.mean, self.std = tuple(mean), tuple(std)
        self.train_size, self.crop = int(train_size), int(crop)
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.images)

    def load(self, indices) -> list:
        out = []
        for i in torch.as_tensor(indices).tolist():
            img = self.images[i]
            if img is None:
                raise ValueError(f"CropSource: image {i} could not be read; drop it from the training set")
            x = square_tensor(img, self.train_size, self.mean, self.std)
            top, left = (int(v) for v in self.rng.integers(0, self.train_size - self.crop + 1, size=2))
            x = x[:, top:top + self.crop, left:left + self.crop]
            out.append(x.flip(-1) if self.rng.random() < 0.5 else x)
        return out

    def config(self) -> dict:
        return {"kind": self.kind, "n": len(self), "train_size": self.train_size, "crop": self.crop}
