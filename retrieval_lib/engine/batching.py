"""Feeding extraction: images decoded and resized in DataLoader workers, batched by size.

Images are resized so that their longer side equals ``image_size`` (bicubic) and sent as
``uint8`` tensors; images of equal size are batched together and images of different sizes
never share a batch, so there is no padding and no padding artefact in the pooled
descriptors. Sizes are read from the file headers (:func:`probe_size`) to plan the batches
before anything is decoded. Used by :mod:`retrieval_lib.engine.extract`.
"""
from __future__ import annotations

import os

import torch
from PIL import Image
from torch.utils.data import Dataset

from retrieval_lib.data.images import resize_longer_side, to_tensor

__all__ = ["ResizedImages", "collate_by_size", "probe_size", "size_batches", "default_workers"]


class ResizedImages(Dataset):
    """Wraps an image list: item i -> (i, uint8 (3, h, w)) or (i, None) when skipped."""

    def __init__(self, images, image_size: int):
        self.images = images
        self.image_size = int(image_size)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = self.images[i]
        if img is None:  # the image list skipped an unreadable file (on_error="skip")
            return i, None
        return i, to_tensor(resize_longer_side(img, self.image_size))  # uint8 (3, h, w)


def collate_by_size(items):
    """Group a list of (index, tensor) by spatial size -> list of (indices, (b, 3, h, w))."""
    groups: dict[tuple, list] = {}
    skipped = []
    for i, t in items:
        if t is None:
            skipped.append(i)
            continue
        groups.setdefault(tuple(t.shape), []).append((i, t))
    batches = [([i for i, _ in g], torch.stack([t for _, t in g])) for g in groups.values()]
    return batches, skipped


def probe_size(images, i: int, image_size: int):
    """The (h, w) image i will have after resizing, read from the file header only.

    Returns None when it cannot be told cheaply (then the image gets a batch of its own
    size group at collate time anyway).
    """
    paths = getattr(images, "paths", None)
    if paths is None:
        return None
    boxes = getattr(images, "boxes", None)
    try:
        with Image.open(paths[i]) as im:
            w, h = im.size
            orientation = im.getexif().get(274, 1)
        if orientation in (5, 6, 7, 8):
            w, h = h, w
        if boxes is not None and boxes[i] is not None:
            x0, y0, x1, y1 = boxes[i]
            w, h = x1 - x0, y1 - y0
        s = image_size / max(w, h)
        return (max(1, round(h * s)), max(1, round(w * s)))
    except Exception:
        return None


def size_batches(images, image_size: int, batch_size: int) -> list[list[int]]:
    """Indices grouped by expected output size, in chunks of ``batch_size``."""
    n = len(images)
    if batch_size <= 1:
        return [[i] for i in range(n)]
    by_size: dict = {}
    for i in range(n):
        key = probe_size(images, i, image_size)
        by_size.setdefault(key if key is not None else ("unknown", i), []).append(i)
    batches = []
    for idx in by_size.values():
        batches += [idx[k:k + batch_size] for k in range(0, len(idx), batch_size)]
    return batches


def default_workers(device: torch.device) -> int:
    """DataLoader workers used when ``num_workers`` is None.

    On CUDA the forward leaves the CPU free: up to 4 workers, one core kept for the main
    process. On CPU the forward already keeps ``torch.get_num_threads()`` cores busy; a
    decoding worker beside it competes for them and the intra-op threads stall waiting
    for each other (on 2 cores: +50 % CPU time and 0.7x the images/s of decoding in the
    main process, see ``benchmarks/extraction.py``). So on CPU only the cores the forward
    leaves idle get workers: none with torch's default thread count on most machines.
    """
    cores = os.cpu_count() or 1
    if device.type == "cpu":
        return max(0, min(4, cores - torch.get_num_threads()))
    return max(0, min(4, cores - 1))
