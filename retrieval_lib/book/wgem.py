"""wGeM in the book: its derivatives by hand, where its mask looks, and a validated training run.

wGeM (Wu et al., ICIP 2018) pools a feature map ``x (B, C, H, W)`` with a spatial mask
``Ω = softmax_{H x W}(conv3x3(x))`` (so ``‖Ω‖₁ = 1``) into ``y_k = (Σ_i ω_i x_ik^p)^(1/p)``
(:class:`~retrieval_lib.layers.pooling.WGeM`, :func:`~retrieval_lib.layers.functional.wgem`).
This module holds what ``notebooks/05_wgem.ipynb`` needs around it:

* :func:`wgem_grads` -- the closed-form partial derivatives of ``y`` with respect to
  ``x`` (through the power mean), ``ω`` and ``p``; :func:`wgem_backward` chains them
  through the softmax and the 3x3 convolution, so ``∂L/∂x`` has both paths.
* :func:`cell_coverage`, :func:`mask_mass_in_box`, :func:`box_area_share` -- how much
  of a mask lies inside an image box, each map cell standing for one tile of the image.
* :func:`object_composites` -- objects pasted onto cluttered backgrounds, written once
  as files with the pasted boxes recorded; :func:`localisation_composites` -- the training
  and held-out composites of the localisation experiment, sharing no object and no background.
* :func:`take` -- a GroupDataset's images selected by a mask (a validation split).
* :func:`train_with_validation` -- the engine's :class:`~retrieval_lib.engine.trainer.Trainer`
  with the mAP of held-out training groups measured after every epoch, keeping the
  head of the best epoch (epoch 0, the untrained head, included): early stopping
  decided on the training side only.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["wgem_grads", "wgem_backward", "cell_coverage", "mask_mass_in_box", "box_area_share",
           "CompositeSet", "object_composites", "localisation_composites", "take", "train_with_validation",
           "show_mask_pair", "show_composite_masks", "COMPOSITES_VERSION"]

COMPOSITES_VERSION = 1


# --------------------------------------------------------------------------- derivatives
def wgem_grads(x: torch.Tensor, weights: torch.Tensor, p, eps: float = 1e-6):
    """Closed-form partial derivatives of wGeM ``y_k = (Σ_i ω_i x_ik^p)^(1/p)``.

    With ``x`` clamped to ``>= eps`` as in :func:`~retrieval_lib.layers.functional.wgem`
    and ``S_k = Σ_i ω_i x_ik^p`` (so ``y_k = S_k^(1/p)``)::

        ∂y_k/∂x_ik = ω_i x_ik^(p-1) y_k^(1-p)                       (the pooling path; 0 where x_ik <= eps)
        ∂y_k/∂ω_i  = (1/p) x_ik^p y_k^(1-p)
        ∂y_k/∂p    = y_k ( -log S_k / p^2 + Σ_i ω_i x_ik^p log x_ik / (p S_k) )

    Shapes: ``x (B, C, H, W)``, ``weights (B|1, 1, H, W)`` (summing to 1 over ``H x W``), ``p``
    a float or a one-element tensor. Returns ``(dydx (B, C, H, W), dydw (B, C, H, W), dydp (B, C))``;
    ``dydw[b, k, i]`` is ``∂y_bk/∂ω_bi``. ``∂y/∂x`` here is the pooling path only:
    :func:`wgem_backward` adds the path through the mask. Use float64 to compare with
    autograd. Source: the derivatives of wGeM (Wu et al., ICIP 2018, Eqs. 3-5 as the book
    numbers them). Taught in ``notebooks/05_wgem.ipynb``.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError("wgem_grads: x must be a feature map tensor of shape (B, C, H, W)")
    B, _, H, W = x.shape
    if not isinstance(weights, torch.Tensor) or weights.dim() != 4 or weights.shape[1] != 1 \
            or tuple(weights.shape[-2:]) != (H, W) or weights.shape[0] not in (1, B):
        raise ValueError(f"wgem_grads: weights must have shape ({B}, 1, {H}, {W}) (or (1, 1, {H}, {W})) to "
                         f"match x {tuple(x.shape)}, got {tuple(getattr(weights, 'shape', ()))}")
    p = float(p.detach().reshape(-1)[0]) if isinstance(p, torch.Tensor) else float(p)
    if not (math.isfinite(p) and p > 0):
        raise ValueError(f"wgem_grads: p must be a positive finite number, got {p!r}")
    w = weights.to(dtype=x.dtype)
    xc = x.clamp(min=eps)
    xp = xc.pow(p)  # (B, C, H, W)
    S = (w * xp).sum(dim=(-2, -1))  # (B, C)
    y = S.pow(1.0 / p)  # (B, C)
    y1p = y.pow(1.0 - p)[..., None, None]  # (B, C, 1, 1)
    dydx = w * xc.pow(p - 1.0) * y1p
    dydx = torch.where(x > eps, dydx, torch.zeros_like(dydx))  # the clamp passes no gradient
    dydw = xp * y1p / p
    dydp = y * (-S.log() / p**2 + (w * xp * xc.log()).sum(dim=(-2, -1)) / (p * S))
    return dydx, dydw, dydp


def wgem_backward(layer, x: torch.Tensor, g: torch.Tensor) -> dict:
    """Gradients of ``L = Σ_bk g_bk y_bk`` for a :class:`~retrieval_lib.layers.pooling.WGeM` layer,
    from the closed forms of :func:`wgem_grads` chained by hand.

    ``ω = softmax(z)``, ``z = conv3x3(x)``: ``∂L/∂ω_i = Σ_k g_k ∂y_k/∂ω_i``; the softmax gives
    ``∂L/∂z_i = ω_i (∂L/∂ω_i - Σ_j ω_j ∂L/∂ω_j)``; the convolution sends ``∂L/∂z`` back to ``x``
    by the transposed convolution with the same kernel. So ``∂L/∂x`` has two paths: through
    the power mean (``"x_pool"``) and through the mask (``"x_mask"``).

    Shapes: ``x (B, C, H, W)``, ``g (B, C)``. Returns a dict of tensors: ``"x"`` (the sum of
    both paths), ``"x_pool"``, ``"x_mask"`` ``(B, C, H, W)``; ``"omega"`` ``(B, 1, H, W)``;
    ``"p"`` (a 0-d tensor); ``"conv_weight"`` ``(1, C, 3, 3)``, ``"conv_bias"`` ``(1,)``.
    Taught in ``notebooks/05_wgem.ipynb``.
    """
    from retrieval_lib.layers.pooling import _clamp_p

    if g.shape != x.shape[:2]:
        raise ValueError(f"wgem_backward: g must have shape {tuple(x.shape[:2])} (one weight per pooled value), "
                         f"got {tuple(g.shape)}")
    with torch.no_grad():
        conv = layer.conv
        z = conv(x)  # (B, 1, H, W)
        omega = torch.softmax(z.flatten(2), dim=-1).view_as(z)
        p = _clamp_p(layer.p, layer.p_min)
        dydx, dydw, dydp = wgem_grads(x, omega, p, layer.eps)
        gk = g[..., None, None]  # (B, C, 1, 1)
        dLdw = (gk * dydw).sum(dim=1, keepdim=True)  # (B, 1, H, W)
        dLdz = omega * (dLdw - (omega * dLdw).sum(dim=(-2, -1), keepdim=True))
        x_mask = F.conv_transpose2d(dLdz, conv.weight, padding=conv.padding)  # (B, C, H, W)
        x_pool = gk * dydx
        weight = torch.nn.grad.conv2d_weight(x, conv.weight.shape, dLdz, padding=conv.padding)
    return {"x": x_pool + x_mask, "x_pool": x_pool, "x_mask": x_mask, "omega": omega,
            "p": (g * dydp).sum(), "conv_weight": weight, "conv_bias": dLdz.sum().reshape(1)}


# --------------------------------------------------------------------------- masks and boxes
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


# --------------------------------------------------------------------------- composites
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
        from retrieval_lib.data.images import ImageList

        return ImageList(self.paths, name="composites")

    def box_shares(self) -> np.ndarray:
        """(N,) each box's share of its image's area (:func:`box_area_share`)."""
        return np.array([box_area_share(b, s) for b, s in zip(self.boxes, self.sizes)])

    def summary(self) -> str:
        return (f"{len(self)} composites of {len(np.unique(self.objects))} object images in "
                f"{len(np.unique(self.labels))} groups on {len(np.unique(self.backgrounds))} backgrounds")


def _fingerprint(paths, params: dict) -> str:
    h = hashlib.sha1(json.dumps(params, sort_keys=True).encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def object_composites(objects, backgrounds: Sequence, per_object: int = 2, seed: int = 0, max_side: int = 512,
                      cache_dir=None, progress: bool = True) -> CompositeSet:
    """Every image of ``objects`` (a GroupDataset) pasted onto ``per_object`` different backgrounds.

    ``backgrounds``: image paths (clutter). For object image ``i`` the backgrounds are drawn
    without replacement with the generator seeded ``[seed, i]``, and each composite is
    :func:`~retrieval_lib.engine.views.composite` (a crop of the object, scaled to 40-70 %
    of the background's short side, pasted at a random place) with its box recorded. Two
    composites of one group match; composites of other groups do not, even on the same
    background. Files go to ``<cache_dir>/wgem_composites_v1/<fingerprint>/`` (default
    :func:`~retrieval_lib.data.datasets.cache_root`), keyed on the source files and every
    parameter, built once under a temporary name and reused.
    """
    from tqdm.auto import tqdm

    from retrieval_lib.data.datasets import cache_root
    from retrieval_lib.data.images import load_image
    from retrieval_lib.engine.views import composite

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
    final = parent / _fingerprint(paths + bgs, params)
    index = final / "composites.json"
    if not index.is_file():
        if final.exists():
            shutil.rmtree(final)  # no index: an incomplete folder
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".composites-", dir=parent))
        try:
            rows = []
            for i in tqdm(range(len(paths)), desc="composites", unit="img", disable=not progress):
                img = load_image(paths[i])
                rng = np.random.default_rng([seed, i])
                for k, b in enumerate(rng.choice(len(bgs), size=per_object, replace=False).tolist()):
                    out, box = composite(img, load_image(bgs[b]), rng, max_side, return_box=True)
                    f = f"composite_{i:06d}_{k}.jpg"
                    out.save(tmp / f, quality=90)
                    rows.append([f, int(labels[i]), i, b, list(box), list(out.size)])
            (tmp / "composites.json").write_text(json.dumps({"params": params, "rows": rows}))
            try:
                os.rename(tmp, final)
            except OSError:
                if not index.is_file():  # not a concurrent build that won
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
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
      (:func:`~retrieval_lib.engine.mining.split_groups`) are objects and the images of the
      rest backgrounds.
    * The object groups are split (``held_frac`` of them held out) and the backgrounds are
      shuffled and dealt into two disjoint pools of at most ``n_backgrounds`` each (and at
      most half of them each; default: half each), so no held-out composite shares an
      object or a background with a training one. A small pool makes non-matching
      composites share backgrounds: hard negatives that only the object tells apart.

    Returns ``(train, held)``, two :class:`CompositeSet` (:func:`object_composites` with
    ``per_object`` backgrounds per object image).
    """
    from retrieval_lib.engine.mining import split_groups

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


# --------------------------------------------------------------------------- data sets
def take(dataset, keep, name: Optional[str] = None):
    """The images of a GroupDataset where ``keep`` ``(N,)`` is True, as a new GroupDataset
    (group names and subsets kept). Raises ``ValueError`` when ``keep`` selects nothing."""
    from retrieval_lib.data.datasets import GroupDataset

    keep = np.asarray(keep, dtype=bool)
    if keep.shape != (len(dataset.labels),):
        raise ValueError(f"take: keep must be a ({len(dataset.labels)},) bool mask, one per image, "
                         f"got shape {keep.shape}")
    idx = np.flatnonzero(keep)
    if idx.size == 0:
        raise ValueError("take: the mask selects no image")
    groups = [dataset.group_names[dataset.labels[i]] for i in idx]
    subsets = None if dataset.subsets is None else dataset.subsets[idx].tolist()
    return GroupDataset([dataset.database.paths[i] for i in idx], groups, subsets=subsets,
                        name=name or f"{dataset.name}-{idx.size}", **dataset._opts)


# --------------------------------------------------------------------------- training
def _p_value(pooling) -> float:
    """The exponent the layer pools with (``max(p, p_min)``), NaN for a layer without one."""
    p = getattr(pooling, "multiscale_p", None)
    return float("nan") if p is None else float(p.reshape(-1)[0]) if isinstance(p, torch.Tensor) else float(p)


def train_with_validation(pooling, source, miner, objective, val_fmaps, val_labels, epochs: int,
                          lr: float, p_lr_mult: float = 10.0, weight_decay: float = 0.0,
                          optimizer: str = "adam", seed: int = 0, device=None, keep: str = "best",
                          measure=None, progress: bool = False):
    """Train ``pooling`` (a head on frozen feature maps) and keep the epoch that validates best.

    The engine's :class:`~retrieval_lib.engine.trainer.Trainer` trains
    ``RetrievalNet(pooling)`` on ``source`` (a :class:`~retrieval_lib.engine.trainer.MapSource`)
    with ``miner``'s batches and ``objective``. Before training and after every epoch the
    mAP of ``val_fmaps`` (maps of training-side groups left out of ``source``, ``val_labels``
    their groups; every image queries the others) is measured with the current head. With
    ``keep="best"`` the head of the best epoch is loaded back into ``pooling``; a tie keeps
    the earlier epoch, so when no epoch beats the untrained head, epoch 0 is kept. With
    ``keep="last"`` the head of the last epoch stays (a fixed number of epochs; the
    validation mAP is then only recorded). ``measure(pooling) -> {name: float}``, when given,
    is recorded at the same moments (e.g. where a mask looks).

    Returns ``(pooling, record)``: ``record`` holds per epoch (0 = before training)
    ``"epoch"``, ``"val_mAP"``, ``"p"`` (the exponent in use, ``max(p, p_min)``), ``"loss"``
    (mean training loss of the epoch; NaN at 0), ``"states"`` (the head's state dict on the CPU,
    so a figure can show the head of any epoch) and each name of ``measure``, plus
    ``"kept_epoch"``, ``"steps_per_epoch"`` and ``"history"`` (the trainer's per-step loss
    and rate).
    """
    from retrieval_lib.book.sweeps import map_on_subset
    from retrieval_lib.engine.extract import pool_fmaps
    from retrieval_lib.engine.trainer import RetrievalNet, Trainer

    if keep not in ("best", "last"):
        raise ValueError(f"train_with_validation: keep must be 'best' or 'last', got {keep!r}")
    lab = np.asarray(val_labels)
    if len(val_fmaps) != len(lab) or len(lab) == 0:
        raise ValueError(f"train_with_validation: {len(val_fmaps)} validation maps for {len(lab)} labels; "
                         "give one group label per map (and at least one map)")
    if np.bincount(lab).max() < 2:
        raise ValueError("train_with_validation: no validation group has two images, so no validation query "
                         "has a match; hold out whole groups of at least two images")
    net = RetrievalNet(pooling)
    every = np.ones(len(lab), dtype=bool)

    def validate() -> float:
        was = pooling.training
        pooling.eval()
        X = pool_fmaps(val_fmaps, pooling, device=next(pooling.parameters()).device)
        pooling.train(was)
        return map_on_subset(X.cpu(), lab, every)

    def note(epoch: int, loss: float) -> float:
        v = validate()
        record["epoch"].append(epoch)
        record["val_mAP"].append(v)
        record["p"].append(_p_value(pooling))
        record["loss"].append(loss)
        if measure is not None:
            with torch.no_grad():
                for name, value in measure(pooling).items():
                    record.setdefault(name, []).append(float(value))
        record["states"].append({k: t.detach().cpu().clone() for k, t in pooling.state_dict().items()})
        return v

    per_epoch = miner.batches_per_epoch()
    record = {"epoch": [], "val_mAP": [], "p": [], "loss": [], "states": [], "steps_per_epoch": per_epoch}
    best = {"mAP": note(0, float("nan")), "epoch": 0, "state": copy.deepcopy(pooling.state_dict())}

    def on_step(trainer, step, loss):
        if step % per_epoch:
            return
        epoch = step // per_epoch
        v = note(epoch, float(np.mean(trainer.history["loss"][-per_epoch:])))
        if v > best["mAP"] or keep == "last":
            best.update(mAP=v, epoch=epoch, state=copy.deepcopy(pooling.state_dict()))

    trainer = Trainer(net, objective, miner, source, optimizer=optimizer, lr=lr, weight_decay=weight_decay,
                      p_lr_mult=p_lr_mult, epochs=epochs, device=device, seed=seed, on_step=on_step,
                      progress=progress)
    record["history"] = trainer.fit(resume=False)
    pooling.load_state_dict(best["state"])
    pooling.to("cpu")
    record["kept_epoch"] = best["epoch"]
    return pooling, record


# --------------------------------------------------------------------------- figures
def _masked_overlay(ax, img, mask, vmax: float, title: str):
    from retrieval_lib.book.viz import overlay

    handle = overlay(ax, img, mask, alpha=0.55, cmap="magma", title=title)
    handle.set_clim(0.0, vmax)
    return handle


def show_mask_pair(images: Sequence, before: Sequence, after: Sequence, titles: Sequence[str], title: str):
    """One matching pair, each image with wGeM's mask before and after training: 1 x 4 panels.

    ``images``: the two PIL images as the network sees them; ``before``, ``after``: their
    masks ``(h, w)``. All four panels share one colour scale (0 to the largest weight shown),
    so the uniform mask before training reads as the flat level ``1 / (h w)``. Returns the figure.
    """
    import matplotlib.pyplot as plt

    vmax = max(float(m.max()) for m in list(before) + list(after))
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.9))
    panels = [(0, before[0], "before"), (0, after[0], "after"), (1, before[1], "before"), (1, after[1], "after")]
    for ax, (k, mask, when), t in zip(axes, panels, titles):
        handle = _masked_overlay(ax, images[k], mask, vmax, t)
    fig.colorbar(handle, ax=axes, fraction=0.015, label="mask weight ω")
    fig.suptitle(title)
    return fig


def show_composite_masks(images: Sequence, boxes: Sequence, before: Sequence, after: Sequence,
                         titles_before: Sequence[str], titles_after: Sequence[str], title: str):
    """Composites with the pasted box (green) and wGeM's mask before (top row) and after
    training (bottom row), one colour scale per column. ``boxes`` ``(x0, y0, x1, y1)`` in the
    pixels of ``images``. Returns the figure."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(3.6 * n, 6.4), squeeze=False)
    for c in range(n):
        vmax = max(float(before[c].max()), float(after[c].max()))
        for r, (mask, t) in enumerate(((before[c], titles_before[c]), (after[c], titles_after[c]))):
            ax = axes[r, c]
            _masked_overlay(ax, images[c], mask, vmax, t)
            x0, y0, x1, y1 = boxes[c]
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="lime", linewidth=2))
            ax.title.set_fontsize(9)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
