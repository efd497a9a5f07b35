"""Batched feature-map and descriptor extraction, with an on-disk cache.

The pipeline (taught in ``notebooks/00_pipeline.ipynb``)::

    image file --decode/resize (DataLoader workers)--> uint8 (3, h, w)
               --normalise, backbone.features (device)--> fmap (B, C, H, W)
               --pooling--> (B, D) --L2--> descriptor

Images are resized so that their longer side equals ``image_size`` (bicubic, up or
down) and normalised with the backbone's own ``mean``/``std``. Images of equal size
are batched together; images of different sizes never share a batch, so there is no
padding and no padding artefact in the pooled descriptors.
"""
from __future__ import annotations

import hashlib
import math
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from retrieval_lib.layers.functional import l2n

__all__ = [
    "resize_longer_side",
    "extract_fmaps",
    "extract_descriptors",
    "pool_fmaps",
    "multiscale_power",
    "cache_key",
]

CACHE_VERSION = 1


# --------------------------------------------------------------------------- preprocessing
def resize_longer_side(img, image_size: int):
    """Resize a PIL image so that its longer side is ``image_size`` px (bicubic, aspect kept).

    The shorter side is rounded and kept at least 1 px. Returns a new PIL image.
    """
    from PIL import Image

    w, h = img.size
    scale = image_size / max(w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    if new == (w, h):
        return img
    return img.resize(new, Image.BICUBIC)


def _to_uint8_tensor(img) -> torch.Tensor:
    """PIL RGB -> uint8 tensor (3, H, W)."""
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image, got an array of shape {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


class _Resized(Dataset):
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
        return i, _to_uint8_tensor(resize_longer_side(img, self.image_size))


def _collate_by_size(items):
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


def _probe_size(images, i: int, image_size: int):
    """The (h, w) image i will have after resizing, read from the file header only.

    Returns None when it cannot be told cheaply (then the image gets a batch of its own
    size group at collate time anyway).
    """
    paths = getattr(images, "paths", None)
    if paths is None:
        return None
    boxes = getattr(images, "boxes", None)
    try:
        from PIL import Image

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


def _size_batches(images, image_size: int, batch_size: int) -> list[list[int]]:
    """Indices grouped by expected output size, in chunks of ``batch_size``."""
    n = len(images)
    if batch_size <= 1:
        return [[i] for i in range(n)]
    by_size: dict = {}
    for i in range(n):
        key = _probe_size(images, i, image_size)
        by_size.setdefault(key if key is not None else ("unknown", i), []).append(i)
    batches = []
    for idx in by_size.values():
        batches += [idx[k:k + batch_size] for k in range(0, len(idx), batch_size)]
    return batches


def _default_workers(device: torch.device) -> int:
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


# --------------------------------------------------------------------------- the cache
def _images_fingerprint(images) -> str:
    """Hash of the image list: paths, boxes, file sizes and modification times."""
    h = hashlib.sha1()
    paths = getattr(images, "paths", None)
    if paths is None:
        raise TypeError("caching needs an image list with a .paths attribute (e.g. ImageList)")
    boxes = getattr(images, "boxes", None)
    for i, p in enumerate(paths):
        h.update(str(p).encode())
        try:
            st = os.stat(p)
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        except OSError:
            h.update(b"missing")
        if boxes is not None and boxes[i] is not None:
            h.update(repr(tuple(float(v) for v in boxes[i])).encode())
    return h.hexdigest()


def cache_key(images, model, image_size: int, scale: float, what: str) -> str:
    """Key of a cache entry: (dataset, model, image size, scale, what is stored)."""
    name = getattr(model, "name", type(model).__name__)
    parts = [f"v{CACHE_VERSION}", what, name, f"s{int(image_size)}", f"x{float(scale):.6f}",
             _images_fingerprint(images)]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:20] + f"_{name}_{int(image_size)}_{what}"


def _cache_load(path: Path, key: str, n: int):
    """Load a cache entry, or None when it is missing, stale or corrupt (it is then rebuilt)."""
    if not path.exists():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if obj.get("key") != key or obj.get("n") != n:
            return None
        return obj["data"]
    except Exception as err:  # corrupt / truncated / foreign file: never trust it
        warnings.warn(f"ignoring unreadable cache file {path} ({err.__class__.__name__}); rebuilding it")
        return None


def _cache_save(path: Path, key: str, n: int, data) -> None:
    """Write atomically: a temporary file in the same folder, then os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save({"key": key, "n": n, "data": data}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# --------------------------------------------------------------------------- the core loop
def _iterate_fmaps(model, images, image_size, scale, device, batch_size, num_workers, amp,
                   channels_last, progress, desc, skipped: list):
    """Yield (indices, fmap (b, C, h, w) float32 on ``device``) for every readable image.

    Indices of images the image list could not read are appended to ``skipped``.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    is_cuda = device.type == "cuda"
    amp = is_cuda if amp is None else bool(amp)
    channels_last = is_cuda if channels_last is None else bool(channels_last)
    workers = _default_workers(device) if num_workers is None else int(num_workers)
    mean = torch.tensor(model.mean, device=device, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(model.std, device=device, dtype=torch.float32).view(1, 3, 1, 1)
    loader = DataLoader(
        _Resized(images, image_size),
        batch_sampler=_size_batches(images, image_size, batch_size),
        collate_fn=_collate_by_size,
        num_workers=workers,
        pin_memory=is_cuda,
        persistent_workers=False,
    )
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    bar = tqdm(total=len(images), desc=desc, unit="img", disable=not progress)
    with torch.inference_mode():
        for batches, skip in loader:
            skipped += skip
            bar.update(len(skip))
            for idx, x in batches:
                x = x.to(device, non_blocking=True).float().div_(255.0)
                if scale != 1:
                    x = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False,
                                      antialias=scale < 1)
                x = (x - mean) / std
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, enabled=amp):
                    fmap = model.features(x)  # (b, 3, h, w) -> (b, C, h', w')
                yield idx, fmap.float()
                bar.update(len(idx))
    bar.close()
    if skipped:
        warnings.warn(f"{len(skipped)} of {len(images)} images could not be read and were skipped "
                      f"(indices {sorted(skipped)[:10]}{'...' if len(skipped) > 10 else ''})")


def extract_fmaps(model, images, image_size: int = 512, scale: float = 1.0, device=None,
                  batch_size: int = 8, num_workers: int | None = None, amp: bool | None = None,
                  channels_last: bool | None = None, cache_dir: str | os.PathLike | None = None,
                  progress: bool = True) -> list[torch.Tensor]:
    """Backbone feature maps of every image: a list of N float32 CPU tensors ``(C, h, w)``.

    Args:
        model: a backbone from :mod:`retrieval_lib.models.backbones` (``.features``, ``.mean``,
            ``.std``, ``.name``).
        images: an indexable image list (``ImageList``); items are PIL images, or None
            for a file skipped with ``on_error="skip"`` (its entry is then ``None``).
        image_size: longer side of the network input, px.
        scale: extra resize factor applied to the network input (multi-scale extraction).
        device: where to run; default the model's device. AMP and channels_last are on by
            default on CUDA and off elsewhere.
        cache_dir: when given, the maps are stored there keyed by (dataset, model, image
            size, scale) and re-used; a stale or corrupt file is rebuilt.

    Taught in ``notebooks/00_pipeline.ipynb`` and used by every later notebook.
    """
    n = len(images)
    path = key = None
    if cache_dir is not None:
        key = cache_key(images, model, image_size, scale, "fmaps")
        path = Path(cache_dir) / f"{key}.pt"
        cached = _cache_load(path, key, n)
        if cached is not None:
            return cached
    out: list = [None] * n
    skipped: list[int] = []
    it = _iterate_fmaps(model, images, image_size, scale, device, batch_size, num_workers, amp,
                        channels_last, progress, f"fmaps {getattr(model, 'name', '')}", skipped)
    for idx, fmap in it:
        fmap = fmap.cpu()
        for j, i in enumerate(idx):
            out[i] = fmap[j].clone()
    if path is not None and not skipped:
        _cache_save(path, key, n, out)
    return out


def multiscale_power(pooling) -> float:
    """Exponent used to average descriptors over scales (cirtorch convention).

    ``p`` for a GeM pooling with one shared p (fixed or learned, its current value);
    1 for every other pooling and for per-channel p.
    """
    if type(pooling).__name__ != "GeM":
        return 1.0
    p = getattr(pooling, "p", None)
    if isinstance(p, torch.Tensor):
        return float(p.detach().reshape(-1)[0]) if p.numel() == 1 else 1.0
    return float(p) if p is not None else 1.0


def _as_pooling(pooling) -> Callable:
    if isinstance(pooling, str):
        from retrieval_lib.layers.pooling import make_pooling

        return make_pooling(pooling)
    if not callable(pooling):
        raise TypeError(f"pooling must be a name, an nn.Module or a function, got {type(pooling).__name__}")
    return pooling


def pool_fmaps(fmaps: Sequence[torch.Tensor | None], pooling, normalize: bool = True,
               device=None) -> torch.Tensor:
    """Pool a list of feature maps ``(C, h, w)`` into descriptors ``(N, D)``.

    Maps of equal size are pooled in one batch. ``None`` entries (skipped images) give
    zero rows. Descriptors are L2-normalised unless ``normalize=False``.
    """
    pooling = _as_pooling(pooling)
    n = len(fmaps)
    groups: dict = {}
    for i, f in enumerate(fmaps):
        if f is not None:
            groups.setdefault(tuple(f.shape), []).append(i)
    if not groups:
        raise ValueError("no feature maps to pool (every entry is None)")
    out = None
    with torch.no_grad():
        for idx in groups.values():
            x = torch.stack([fmaps[i] for i in idx])
            if device is not None:
                x = x.to(device)
            d = pooling(x)  # (b, C, h, w) -> (b, D)
            if normalize:
                d = l2n(d)
            if out is None:
                out = d.new_zeros(n, d.shape[1])
            out[idx] = d
    return out


def extract_descriptors(model, images, pooling, scales: Iterable[float] = (1,), image_size: int = 512,
                        device=None, batch_size: int = 8, num_workers: int | None = None,
                        amp: bool | None = None, channels_last: bool | None = None,
                        cache_dir: str | os.PathLike | None = None, progress: bool = True,
                        return_info: bool = False):
    """Global descriptors ``(N, D)``, L2-normalised, on CPU, float32.

    ``pooling`` is a name (``"gem"``), a module or function ``(B, C, H, W) -> (B, D)``, or
    a dict ``{label: pooling}``; with a dict the backbone runs once per scale for all of
    them and the result is a dict ``{label: (N, D)}``.

    Multi-scale as in cirtorch (Radenović et al., TPAMI 2018): for scales s (e.g. 1, 1/√2,
    1/2) the network input is resized by s, and the descriptor is
    ``l2n((mean_s f_s^msp)^(1/msp))`` where f_s is the L2-normalised descriptor at scale s
    and ``msp`` = p for a GeM pooling with fixed p, else 1 (:func:`multiscale_power`).

    Rows of images that could not be read (``on_error="skip"``) are zero; with
    ``return_info=True`` the function returns ``(X, info)`` where ``info`` has
    ``skipped`` (indices), ``seconds`` and ``images_per_s``.

    With ``cache_dir``, descriptors are cached per (dataset, model, image size, scale,
    pooling); a stale or corrupt cache file is rebuilt.

    Taught in ``notebooks/00_pipeline.ipynb``; multi-scale in ``04_rmac``.
    """
    single = not isinstance(pooling, dict)
    poolings = {"_": _as_pooling(pooling)} if single else {k: _as_pooling(v) for k, v in pooling.items()}
    if not poolings:
        raise ValueError("pooling dict is empty")
    scales = tuple(float(s) for s in scales)
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"scales must be positive numbers, got {scales}")
    n = len(images)
    t0 = time.perf_counter()
    acc: dict = {}
    skipped: list[int] = []
    for s in scales:
        per_scale: dict = {}
        keys: dict = {}
        for label, pool in poolings.items():
            if cache_dir is not None:
                tag = "desc-" + hashlib.sha1(repr(pool).encode()).hexdigest()[:8]
                keys[label] = cache_key(images, model, image_size, s, tag)
                cached = _cache_load(Path(cache_dir) / f"{keys[label]}.pt", keys[label], n)
                if cached is not None:
                    per_scale[label] = cached
        todo = [label for label in poolings if label not in per_scale]
        if todo:
            skipped = []
            it = _iterate_fmaps(model, images, image_size, s, device, batch_size, num_workers, amp,
                                channels_last, progress, f"descriptors x{s:.3g}", skipped)
            for idx, fmap in it:
                for label in todo:
                    d = l2n(poolings[label](fmap).float()).cpu()  # (b, C, h, w) -> (b, D)
                    if label not in per_scale:
                        per_scale[label] = torch.zeros(n, d.shape[1])
                    per_scale[label][idx] = d
            if len(per_scale) < len(poolings):
                raise ValueError("none of the images could be read; nothing to describe")
            if cache_dir is not None and not skipped:
                for label in todo:
                    _cache_save(Path(cache_dir) / f"{keys[label]}.pt", keys[label], n, per_scale[label])
        for label, X in per_scale.items():
            msp = multiscale_power(poolings[label])
            term = X.clamp(min=0).pow(msp) if (msp != 1 and len(scales) > 1) else X
            acc[label] = term if label not in acc else acc[label] + term
    out = {}
    for label, a in acc.items():
        if len(scales) == 1:
            out[label] = a
            continue
        msp = multiscale_power(poolings[label])
        a = a / len(scales)
        out[label] = l2n(a.pow(1.0 / msp) if msp != 1 else a)
    result = out["_"] if single else out
    seconds = time.perf_counter() - t0
    if return_info:
        return result, {"skipped": skipped, "seconds": seconds,
                        "images_per_s": n / seconds if seconds > 0 else math.inf}
    return result
