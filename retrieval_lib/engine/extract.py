"""Batched feature-map and descriptor extraction, with an on-disk cache.

The pipeline (taught in ``notebooks/00_pipeline.ipynb``)::

    image file --decode/resize (DataLoader workers)--> uint8 (3, h, w)
               --normalise, backbone.features (device)--> fmap (B, C, H, W)
               --pooling--> (B, D) --L2--> descriptor

Images are resized so that their longer side equals ``image_size`` (bicubic, up or
down) and normalised with the backbone's own ``mean``/``std``. Images of equal size
are batched together; images of different sizes never share a batch, so there is no
padding and no padding artefact in the pooled descriptors.

The on-disk cache (:mod:`retrieval_lib.engine.cache`) keys an entry on what decides its
content: the image files, the image size and scale, and the backbone and pooling themselves
-- their class, their settings and a hash of their parameters and buffers
(:func:`~retrieval_lib.engine.fingerprint.module_fingerprint`), never their ``repr``. A plain
function whose state cannot be read (a lambda, a closure) is not cached at all, with a warning.
"""
from __future__ import annotations

import math
import os
import time
import warnings
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from retrieval_lib.data.images import ImageList
from retrieval_lib.data.images import resize_longer_side  # noqa: F401  (its old home: notebook 08 imports it here)
from retrieval_lib.engine.batching import ResizedImages, collate_by_size, default_workers, size_batches
from retrieval_lib.engine.cache import ExtractionCache, cache_key, load_entry, save_entry
from retrieval_lib.engine.fingerprint import Unkeyable, fingerprint_or_reason, module_fingerprint
from retrieval_lib.engine.fold import fold_batchnorm, foldable
from retrieval_lib.layers.functional import l2n, multiscale_mean
from retrieval_lib.layers.pooling import make_pooling

__all__ = [
    "extract_fmaps",
    "extract_descriptors",
    "pool_fmaps",
    "multiscale_power",
    "cache_key",
    "module_fingerprint",
    "Unkeyable",
]


def _plan(model, device, amp: bool | None, fold_bn: bool | None, channels_last: bool | None) -> dict:
    """How the forward runs: ``{"amp", "fold_bn", "channels_last", "numerics"}``.

    Defaults: on CUDA, AMP and channels_last; elsewhere float32 with the BatchNorms folded
    into the convolutions (:func:`retrieval_lib.engine.fold.fold_batchnorm`, where the
    backbone's layout is known and it is in eval mode) and channels_last on top of the
    folding (together 1.7x faster on a 2-core CPU; channels_last alone gains nothing there).

    ``numerics`` is part of every cache key: float16/bfloat16 maps differ from float32 ones
    by ~1e-3 and folded or channels_last maps by float32 rounding (~1e-5), so no run hands
    its maps to a run that computes them differently.
    """
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    cuda = dev.type == "cuda"
    use_amp = cuda if amp is None else bool(amp)
    can_fold = foldable(model) and not model.training and not use_amp
    if fold_bn is None:
        fold = can_fold and not cuda
    elif fold_bn and not can_fold:
        why = ("it is in training mode; call .eval() first" if model.training else
               "the forward runs under AMP" if use_amp else "its layout is not one fold_batchnorm knows")
        raise ValueError(f"fold_bn=True: can't fold the BatchNorms of this {type(model).__name__} ({why}); "
                         "leave fold_bn=None for the default")
    else:
        fold = bool(fold_bn)
    cl = (cuda or fold) if channels_last is None else bool(channels_last)
    numerics = (f"amp-{dev.type}" if use_amp else "fp32") + ("-bnfold" if fold else "") + ("-cl" if cl else "")
    return {"amp": use_amp, "fold_bn": fold, "channels_last": cl, "numerics": numerics}


# --------------------------------------------------------------------------- the core loop
def _iterate_fmaps(model, images, image_size, scale, device, batch_size, num_workers, plan: dict,
                   progress, desc, skipped: list):
    """Yield (indices, fmap (b, C, h, w) float32 on ``device``) for every readable image.

    ``plan``: from :func:`_plan`; ``model`` is already folded when it says so (the callers
    fold once, not once per scale). Indices of images the image list could not read are
    appended to ``skipped``.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    is_cuda = device.type == "cuda"
    amp, channels_last = plan["amp"], plan["channels_last"]
    workers = default_workers(device) if num_workers is None else int(num_workers)
    mean = torch.tensor(model.mean, device=device, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(model.std, device=device, dtype=torch.float32).view(1, 3, 1, 1)
    loader = DataLoader(
        ResizedImages(images, image_size),
        batch_sampler=size_batches(images, image_size, batch_size),
        collate_fn=collate_by_size,
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


def _as_images(images, fn: str):
    """``images`` as an indexable list of images: a list of file paths becomes an :class:`ImageList`
    (what a user types first); an image list, a dataset or a list of PIL images is used as it is."""
    if isinstance(images, (str, os.PathLike)):
        raise TypeError(f"{fn}: images must be a list of images, got one path {str(images)!r}; pass "
                        f"[{str(images)!r}] or ImageList([...])")
    if isinstance(images, (list, tuple)):
        paths = [isinstance(x, (str, os.PathLike)) for x in images]
        if paths and all(paths):
            return ImageList([str(x) for x in images])
        if any(paths):
            raise TypeError(f"{fn}: the image list mixes file paths and other items; give all paths "
                            "(or an ImageList) or all PIL images")
    return images


def _check_images(images, fn: str) -> int:
    n = len(images)
    if n == 0:
        raise ValueError(f"{fn}: no images given (the image list is empty); pass a list with at "
                         "least one image, e.g. ImageList(paths) with at least one path")
    return n


def _none_readable(n: int, fn: str) -> ValueError:
    return ValueError(f"{fn}: none of the {n} images could be read (every one was skipped, see the "
                      "warning above for their indices); check that the files exist and are images")


def extract_fmaps(model, images, image_size: int = 512, scale: float = 1.0, device=None,
                  batch_size: int = 8, num_workers: int | None = None, amp: bool | None = None,
                  channels_last: bool | None = None, cache_dir: str | os.PathLike | None = None,
                  progress: bool = True, fold_bn: bool | None = None) -> list[torch.Tensor]:
    """Backbone feature maps of every image: a list of N float32 CPU tensors ``(C, h, w)``.

    Args:
        model: a backbone from :mod:`retrieval_lib.models.backbones` (``.features``, ``.mean``,
            ``.std``, ``.name``).
        images: an indexable image list (``ImageList``), or a plain list of file paths (made an
            ``ImageList``) or of PIL images; items are PIL images, or None
            for a file skipped with ``on_error="skip"`` (its entry is then ``None``).
        image_size: longer side of the network input, px.
        scale: extra resize factor applied to the network input (multi-scale extraction).
        device: where to run; default the model's device. AMP and channels_last are on by
            default on CUDA; elsewhere float32 with ``fold_bn`` and channels_last.
        fold_bn: fold each BatchNorm into its convolution for the forward (a copy; the
            model is untouched). Default: on the CPU for an eval-mode EfficientNet-Lite or
            ResNet (1.3x faster, maps equal to float32 rounding), off on CUDA.
        cache_dir: when given, the maps are stored there keyed by (image files, model, image
            size, scale) and re-used; the model is keyed on its class, settings and weights
            (:func:`module_fingerprint`). A stale or corrupt file is rebuilt.

    Raises:
        ValueError: the image list is empty, or none of its images could be read.

    Taught in ``notebooks/00_pipeline.ipynb`` and used by every later notebook.
    """
    images = _as_images(images, "extract_fmaps")
    n = _check_images(images, "extract_fmaps")
    plan = _plan(model, device, amp, fold_bn, channels_last)
    cache = ExtractionCache(cache_dir, images, model, "extract_fmaps", plan)
    path = key = None
    if cache.dir is not None:
        key = cache.key(image_size, scale, "fmaps")
        path = cache.path(key)
        cached = load_entry(path, key, n)
        if cached is not None:
            return cached
    out: list = [None] * n
    skipped: list[int] = []
    run = fold_batchnorm(model) if plan["fold_bn"] else model  # a folded copy; the caller's model is untouched
    it = _iterate_fmaps(run, images, image_size, scale, device, batch_size, num_workers, plan,
                        progress, f"fmaps {getattr(model, 'name', '')}", skipped)
    for idx, fmap in it:
        fmap = fmap.cpu()
        for j, i in enumerate(idx):
            out[i] = fmap[j].clone()
    if len(skipped) == n:
        raise _none_readable(n, "extract_fmaps")
    if path is not None and not skipped:
        save_entry(path, key, n, out)
    return out


def multiscale_power(pooling):
    """The exponent with which ``pooling``'s descriptors are averaged over scales.

    Each pooling declares it as its ``multiscale_p`` attribute (timm style): GeM and WGeM
    their own p (a ``(C,)`` tensor for per-channel p), MAC, SPoC and R-MAC 1. A pooling
    without the attribute (a function, a module of your own) gets 1, the plain mean.
    See :func:`retrieval_lib.layers.functional.multiscale_mean`.
    """
    return getattr(pooling, "multiscale_p", 1.0)


def _as_pooling(pooling) -> Callable:
    if isinstance(pooling, str):
        return make_pooling(pooling)
    if not callable(pooling):
        raise TypeError(f"pooling must be a name, an nn.Module or a function, got {type(pooling).__name__}")
    return pooling


def pool_fmaps(fmaps: Sequence[torch.Tensor | None], pooling, normalize: bool = True,
               device=None) -> torch.Tensor:
    """Pool a list of feature maps ``(C, h, w)`` into descriptors ``(N, D)``.

    Maps of equal size are pooled in one batch. ``None`` entries (skipped images) give
    zero rows. Descriptors are L2-normalised unless ``normalize=False``.
    Raises ``ValueError`` for an empty list or one with only ``None`` entries.
    """
    pooling = _as_pooling(pooling)
    n = len(fmaps)
    if n == 0:
        raise ValueError("pool_fmaps: no feature maps given (the list is empty); pass the "
                         "output of extract_fmaps for at least one image")
    groups: dict = {}
    for i, f in enumerate(fmaps):
        if f is not None:
            groups.setdefault(tuple(f.shape), []).append(i)
    if not groups:
        raise ValueError("pool_fmaps: no feature maps to pool (every entry is None: none of the "
                         "images could be read)")
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


def _pooling_tags(poolings: dict, cache: ExtractionCache) -> dict:
    """``{label: cache tag}`` of every pooling whose state can be keyed; warn about the others."""
    tags = {}
    if cache.dir is None:
        return tags
    for label, pool in poolings.items():
        fp, reason = fingerprint_or_reason(pool)
        if fp is None:
            name = "pooling" if label == "_" else f"pooling {label!r}"
            warnings.warn(
                f"extract_descriptors: {name} is not cached: {reason}. To cache it, pass a "
                "pooling module (e.g. GeM(p=3.0)), a name ('gem') or a function of "
                "retrieval_lib.layers.functional", UserWarning, stacklevel=3)
        else:
            tags[label] = "desc-" + fp[:16]
    return tags


def extract_descriptors(model, images, pooling, scales: Iterable[float] = (1,), image_size: int = 512,
                        device=None, batch_size: int = 8, num_workers: int | None = None,
                        amp: bool | None = None, channels_last: bool | None = None,
                        cache_dir: str | os.PathLike | None = None, progress: bool = True,
                        return_info: bool = False, fold_bn: bool | None = None):
    """Global descriptors ``(N, D)``, L2-normalised, on CPU, float32.

    ``pooling`` is a name (``"gem"``), a module or function ``(B, C, H, W) -> (B, D)``, or
    a dict ``{label: pooling}``; with a dict the backbone runs once per scale for all of
    them and the result is a dict ``{label: (N, D)}``.

    Multi-scale as in cirtorch (Radenović et al., TPAMI 2018): for scales s (e.g. 1, 1/√2,
    1/2) the network input is resized by s, and the descriptor is
    ``l2n((mean_s f_s^msp)^(1/msp))`` (:func:`retrieval_lib.layers.functional.multiscale_mean`)
    where f_s is the L2-normalised descriptor at scale s and ``msp`` is the exponent the
    pooling declares as its ``multiscale_p`` (GeM's and WGeM's p, else 1; see
    :func:`multiscale_power`).

    Rows of images that could not be read (``on_error="skip"``) are zero; with
    ``return_info=True`` the function returns ``(X, info)`` where ``info`` has
    ``skipped`` (indices), ``seconds``, ``extracted`` (image forwards run: images times the
    scales that were not cached; 0 when everything came from the cache) and ``images_per_s``
    (images per second of the call, ``None`` when nothing was extracted: a cache read is not
    a throughput).

    With ``cache_dir``, descriptors are cached per (image files, model, image size, scale,
    pooling); model and pooling are keyed on their class, settings and weights
    (:func:`module_fingerprint`), so a trained head never reads an untrained head's entry.
    A pooling whose state cannot be read (a lambda or other plain function) is computed
    but not cached, with a warning. A stale or corrupt cache file is rebuilt.

    Raises:
        ValueError: the image list is empty ("no images given"), none of its images could
            be read, the pooling dict is empty, or a scale is not positive.

    Taught in ``notebooks/00_pipeline.ipynb``; multi-scale in ``04_rmac``.
    """
    single = not isinstance(pooling, dict)
    poolings = {"_": _as_pooling(pooling)} if single else {k: _as_pooling(v) for k, v in pooling.items()}
    if not poolings:
        raise ValueError("extract_descriptors: the pooling dict is empty; give {label: pooling}")
    scales = tuple(float(s) for s in scales)
    if not scales or any(not (math.isfinite(s) and s > 0) for s in scales):
        raise ValueError(f"extract_descriptors: scales must be positive numbers, got {scales}")
    images = _as_images(images, "extract_descriptors")
    n = _check_images(images, "extract_descriptors")
    plan = _plan(model, device, amp, fold_bn, channels_last)
    cache = ExtractionCache(cache_dir, images, model, "extract_descriptors", plan)
    tags = _pooling_tags(poolings, cache)
    t0 = time.perf_counter()
    per_label: dict = {label: [] for label in poolings}  # label -> one (N, D) per scale
    run = None  # the model as the forward runs it (folded copy on the CPU), made once
    skipped: list[int] = []
    extracted = 0  # image forwards run (images x scales not read from the cache)
    for s in scales:
        per_scale: dict = {}
        keys = {label: cache.key(image_size, s, tag) for label, tag in tags.items()}
        for label, key in keys.items():
            cached = load_entry(cache.path(key), key, n)
            if cached is not None:
                per_scale[label] = cached
        todo = [label for label in poolings if label not in per_scale]
        if todo:
            skipped = []
            extracted += n
            if run is None:  # folded once, on the first scale that is not cached
                run = fold_batchnorm(model) if plan["fold_bn"] else model
            it = _iterate_fmaps(run, images, image_size, s, device, batch_size, num_workers, plan,
                                progress, f"descriptors x{s:.3g}", skipped)
            for idx, fmap in it:
                for label in todo:
                    d = l2n(poolings[label](fmap).float()).cpu()  # (b, C, h, w) -> (b, D)
                    if label not in per_scale:
                        per_scale[label] = torch.zeros(n, d.shape[1])
                    per_scale[label][idx] = d
            if len(skipped) == n:
                raise _none_readable(n, "extract_descriptors")
            if not skipped:
                for label in todo:
                    if label in keys:
                        save_entry(cache.path(keys[label]), keys[label], n, per_scale[label])
        for label, X in per_scale.items():
            per_label[label].append(X)
    out = {label: Xs[0] if len(Xs) == 1 else multiscale_mean(Xs, multiscale_power(poolings[label]))
           for label, Xs in per_label.items()}
    result = out["_"] if single else out
    seconds = time.perf_counter() - t0
    if return_info:
        speed = None if not extracted else (n / seconds if seconds > 0 else math.inf)
        return result, {"skipped": skipped, "seconds": seconds, "extracted": extracted, "images_per_s": speed}
    return result
