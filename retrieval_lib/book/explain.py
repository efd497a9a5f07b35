"""Where a MAC descriptor looks: arg-max locations, clipped channels, implicit correspondences.

A MAC descriptor keeps, per channel ``k``, only the largest activation of the feature map,
``f_k = max_p X_k(p)``. Each component therefore comes from one cell of the map, and
through the network from one patch of the photo. This module finds those cells; the
patches they see are in :mod:`retrieval_lib.book.receptive_fields`:

* :func:`argmax_locations` -- the cell ``(row, col)`` holding each channel's maximum;
* :func:`top_channels` and :func:`implicit_correspondences` -- the channels that
  contribute most to the similarity ``x^T y = sum_k x_k y_k`` of two MAC descriptors, and
  the pair of cells (one per image) their maxima come from: the implicit patch
  correspondences drawn in Figure 2 of Radenović, Tolias & Chum, "Fine-tuning CNN Image
  Retrieval with No Human Annotation", TPAMI 2018;
* :func:`clipped_channels`, :func:`count_clipped` and :func:`rank_channels` -- a clipping
  last activation (EfficientNet-Lite's ReLU6) sets every response above 6 to exactly 6,
  so on a real photo dozens of MAC components are equal; these count them and rank
  channels with the ties broken by the map before the activation
  (:func:`fmap_of` with ``pre_activation=True``), instead of by channel index;
* :func:`fmap_of` and :func:`model_input` -- one image (PIL, array or tensor) as the
  network sees it, and its feature map.

Conventions: feature maps ``(C, h, w)`` or ``(B, C, h, w)``; cell locations are
``(row, col)`` integer pairs. Taught in ``notebooks/01_mac.ipynb``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from retrieval_lib.layers.functional import l2n, mac
from retrieval_lib.models.effnet_lite import RELU6_CLIP

__all__ = [
    "argmax_locations",
    "clipped_channels",
    "count_clipped",
    "rank_channels",
    "model_input",
    "fmap_of",
    "top_channels",
    "Correspondences",
    "implicit_correspondences",
]


# ----------------------------------------------------------------------------------------
# arg-max locations
# ----------------------------------------------------------------------------------------
def _check_map(fmap: torch.Tensor, fn: str) -> None:
    if not isinstance(fmap, torch.Tensor):
        raise TypeError(f"{fn}: expected a feature map tensor (C, h, w) or (B, C, h, w), "
                        f"got {type(fmap).__name__}")
    if fmap.dim() not in (3, 4):
        raise ValueError(f"{fn}: expected a feature map of shape (C, h, w) or (B, C, h, w), "
                         f"got shape {tuple(fmap.shape)}")
    if fmap.shape[-1] < 1 or fmap.shape[-2] < 1:
        raise ValueError(f"{fn}: the feature map {tuple(fmap.shape)} has an empty spatial size")


def argmax_locations(fmap: torch.Tensor, tiebreak: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The cell holding each channel's maximum: where every MAC component comes from.

    ``loc[..., k] = argmax_{(r, c)} X_k(r, c)`` and ``value[..., k] = max X_k`` (the MAC
    descriptor before normalisation, Tolias et al., ICLR 2016).

    Ties are common after a clipping activation: EfficientNet-Lite's ReLU6 flattens every
    response above 6, and a channel that is zero everywhere ties in every cell. Without
    ``tiebreak`` the first tied cell in row-major order wins (``torch.argmax``). With
    ``tiebreak`` (same shape, e.g. the map before the last activation from
    :func:`fmap_of` with ``pre_activation=True``) the tied cell where ``tiebreak`` is
    largest wins; since a clipping activation is monotone, the maximum of the map before
    it is always one of the tied maxima after it.

    Shapes: ``(C, h, w) -> (C, 2), (C,)`` or ``(B, C, h, w) -> (B, C, 2), (B, C)``;
    locations are int64 ``(row, col)`` on ``fmap``'s device. Taught in
    ``notebooks/01_mac.ipynb``.
    """
    _check_map(fmap, "argmax_locations")
    w = fmap.shape[-1]
    flat_map = fmap.flatten(-2)  # (..., C, h*w)
    values = flat_map.amax(dim=-1)  # (..., C)
    if tiebreak is None:
        flat = flat_map.argmax(dim=-1)  # the first maximal index on ties
    else:
        if not isinstance(tiebreak, torch.Tensor) or tiebreak.shape != fmap.shape:
            raise ValueError(f"argmax_locations: tiebreak must be a tensor of the map's shape "
                             f"{tuple(fmap.shape)}, got {getattr(tiebreak, 'shape', type(tiebreak).__name__)}")
        tied = flat_map == values.unsqueeze(-1)
        score = torch.where(tied, tiebreak.flatten(-2).to(fmap.dtype), torch.full_like(flat_map, -math.inf))
        flat = score.argmax(dim=-1)
    locs = torch.stack([flat // w, flat % w], dim=-1)  # (..., C, 2)
    return locs, values


# ----------------------------------------------------------------------------------------
# clipped maxima and ties
# ----------------------------------------------------------------------------------------
def _check_clip(clip, fn: str) -> float:
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not math.isfinite(clip):
        raise ValueError(f"{fn}: clip must be the finite value the activation clips at "
                         f"(6.0 for ReLU6), got {clip!r}")
    return float(clip)


def clipped_channels(fmap: torch.Tensor, clip: float = RELU6_CLIP) -> torch.Tensor:
    """Which channels have their maximum at the clip value: ``max_p X_k(p) == clip``.

    After ReLU6 (``clip=6``) such a channel's MAC component is exactly 6 whatever its
    response before the clip, so all of them tie. Shapes ``(C, h, w) -> (C,)`` or
    ``(B, C, h, w) -> (B, C)``, bool. A map from ``last_activation="relu"`` has no clip:
    a channel is then counted only if its maximum happens to equal ``clip``.
    Taught in ``notebooks/01_mac.ipynb`` and ``04_rmac``.
    """
    _check_map(fmap, "clipped_channels")
    clip = _check_clip(clip, "clipped_channels")
    return fmap.flatten(-2).amax(dim=-1) == clip


def count_clipped(fmap: torch.Tensor, clip: float = RELU6_CLIP):
    """How many channels have their maximum at the clip value (see :func:`clipped_channels`).

    ``(C, h, w) -> int``; ``(B, C, h, w) -> (B,)`` int64 tensor, one count per image.
    Taught in ``notebooks/01_mac.ipynb`` and ``04_rmac``.
    """
    counts = clipped_channels(fmap, clip).sum(dim=-1)
    return int(counts) if fmap.dim() == 3 else counts


def _check_k(k, D: int, fn: str) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= D:
        raise ValueError(f"{fn}: k must be an integer between 1 and D={D}, got {k!r}")
    return int(k)


def rank_channels(values: torch.Tensor, k: int | None = None, tiebreak: torch.Tensor | None = None):
    """Channels sorted by decreasing ``values``, ties broken by decreasing ``tiebreak``.

    ``values`` is ``(D,)`` or ``(N, D)`` (e.g. a MAC descriptor, or the terms ``x_d y_d``
    of a similarity). Channels with equal values are ordered by ``tiebreak`` (same shape,
    e.g. the MAC of the map before the activation, ``mac(fmap_of(model, img,
    pre_activation=True)[None])[0]``: since the activation is monotone, among channels
    clipped at 6 the one that responded most strongly comes first); channels still tied
    keep increasing index order. Without ``tiebreak`` ties go by increasing index, never
    by the arbitrary order of ``torch.topk``.

    Returns ``(channels, values)``: int64 ``(..., k)`` indices and the values in that order
    (``k=None``: all ``D``). Taught in ``notebooks/01_mac.ipynb``.
    """
    if not isinstance(values, torch.Tensor) or values.dim() not in (1, 2):
        raise ValueError(f"rank_channels: values must be a tensor (D,) or (N, D), got "
                         f"{getattr(values, 'shape', type(values).__name__)}")
    D = values.shape[-1]
    k = D if k is None else _check_k(k, D, "rank_channels")
    order = torch.arange(D, device=values.device).expand_as(values)
    if tiebreak is not None:
        if not isinstance(tiebreak, torch.Tensor) or tiebreak.shape != values.shape:
            raise ValueError(f"rank_channels: tiebreak must be a tensor of the values' shape "
                             f"{tuple(values.shape)}, got {getattr(tiebreak, 'shape', type(tiebreak).__name__)}")
        # sort by the secondary key first; a stable sort by the primary key keeps that order among ties
        order = tiebreak.to(values.device).sort(dim=-1, descending=True, stable=True).indices
    first = values.gather(-1, order).sort(dim=-1, descending=True, stable=True).indices
    channels = order.gather(-1, first)[..., :k]
    return channels, values.gather(-1, channels)



# ----------------------------------------------------------------------------------------
# one image as the network sees it
# ----------------------------------------------------------------------------------------
def model_input(image, model) -> torch.Tensor:
    """PIL image / uint8 (H, W, 3) array / float (3, H, W) tensor in [0, 1] -> ``(3, H, W)`` normalised with
    the model's mean and std (``model.normalize``), on the model's device."""
    if isinstance(image, torch.Tensor):
        x = image
        if x.dim() != 3 or x.shape[0] != 3:
            raise ValueError(f"an image tensor must be (3, H, W) with values in [0, 1], got {tuple(x.shape)}")
        if not x.is_floating_point():
            x = x.float() / 255.0
    else:
        arr = np.asarray(image)
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"expected an RGB image (H, W, 3), got an array of shape {arr.shape}")
        x = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float()
        if arr.dtype == np.uint8:
            x = x / 255.0
    dev = next(model.parameters()).device
    return model.normalize(x.to(dev))


@torch.no_grad()
def fmap_of(model: nn.Module, image, pre_activation: bool = False) -> torch.Tensor:
    """The feature map ``(C, h, w)`` of one image as the network sees it, float32 on the CPU.

    ``image`` is a PIL image, a uint8 ``(H, W, 3)`` array or a float ``(3, H, W)`` tensor in
    [0, 1] (e.g. ``book.image(i)``, already resized); it is normalised with the model's
    mean and std and run through ``model.features`` on the model's device. With
    ``pre_activation=True`` the map is ``model.preactivation`` (EfficientNet-Lite: the
    head's output before its last ReLU6 / ReLU, unclipped, any sign): the map that breaks
    the ties of clipped maxima (:func:`argmax_locations`, :func:`rank_channels`). For a
    whole image list use :func:`retrieval_lib.engine.extract.extract_fmaps`. Taught in
    ``notebooks/01_mac.ipynb``.
    """
    x = model_input(image, model)[None]
    if not pre_activation:
        return model.features(x)[0].float().cpu()
    return _preactivation_fn(model, "fmap_of")(x)[0].float().cpu()


def _preactivation_fn(model: nn.Module, fn: str):
    """``model.preactivation``, or a clear error for a backbone without one."""
    pre = getattr(model, "preactivation", None)
    if not callable(pre):
        raise ValueError(f"{fn}: pre_activation=True needs a backbone with a preactivation(x) method "
                         f"(EfficientNet-Lite: the map before its last ReLU6); {type(model).__name__} "
                         "has none, use pre_activation=False")
    return pre


# ----------------------------------------------------------------------------------------
# which channels make a similarity, and where they come from
# ----------------------------------------------------------------------------------------
def top_channels(x: torch.Tensor, y: torch.Tensor, k: int = 5, tiebreak: torch.Tensor | None = None):
    """The ``k`` channels contributing most to the similarity ``x^T y = sum_d x_d y_d``.

    Shapes: ``x``, ``y`` ``(D,)`` or ``(N, D)`` (pairs row by row). Returns ``(channels,
    contributions, share)``: int64 ``(..., k)`` indices sorted by decreasing ``x_d y_d``,
    the products themselves, and each product's share of the similarity
    (``x_d y_d / x^T y``). Equal products (every channel clipped at 6 in both images gives
    the same term) are ordered by decreasing ``tiebreak`` (same shape as ``x``; e.g. the
    product of the two images' MACs before the activation, as
    :func:`implicit_correspondences` does), then by channel index (:func:`rank_channels`).
    Taught in ``notebooks/01_mac.ipynb``.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError("top_channels: x and y must be tensors (D,) or (N, D)")
    if x.shape != y.shape or x.dim() not in (1, 2):
        raise ValueError(f"top_channels: x and y must have the same shape (D,) or (N, D), got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    k = _check_k(k, x.shape[-1], "top_channels")
    prod = x * y  # (..., D)
    channels, values = rank_channels(prod, k, tiebreak)
    share = values / prod.sum(dim=-1, keepdim=True)
    return channels, values, share


@dataclass
class Correspondences:
    """Implicit patch correspondences of two MAC descriptors (see :func:`implicit_correspondences`).

    ``channels`` (k,), ``contributions`` (k,) = ``x_c y_c``, ``share`` (k,) of the
    similarity, ``similarity`` (a float, ``x^T y``), ``loc_a`` / ``loc_b`` (k, 2) the
    ``(row, col)`` cells of each channel's maximum in the two maps.
    """

    channels: torch.Tensor
    contributions: torch.Tensor
    share: torch.Tensor
    similarity: float
    loc_a: torch.Tensor
    loc_b: torch.Tensor


def implicit_correspondences(fmap_a: torch.Tensor, fmap_b: torch.Tensor, k: int = 5,
                             tiebreak_a: torch.Tensor | None = None,
                             tiebreak_b: torch.Tensor | None = None) -> Correspondences:
    """Which patches of two images the top channels of their MAC similarity match.

    With ``x = l2n(mac(X_a))`` and ``y = l2n(mac(X_b))``, the similarity is
    ``x^T y = sum_c x_c y_c``; each term pairs the cell of channel ``c``'s maximum in image
    a with the cell of its maximum in image b. The ``k`` largest terms give ``k`` implicit
    correspondences, as in Figure 2 of Radenović, Tolias & Chum, TPAMI 2018.

    Shapes: ``fmap_a`` ``(C, h_a, w_a)``, ``fmap_b`` ``(C, h_b, w_b)`` (sizes may differ);
    ``tiebreak_a`` / ``tiebreak_b`` optional maps of the same shapes, normally the maps
    before the activation (:func:`fmap_of` with ``pre_activation=True``). They break two
    kinds of ties: the cell of a channel's maximum (:func:`argmax_locations`), and the
    order of equal terms ``x_c y_c``, which are ranked by ``relu(max Z_a,c) * relu(max
    Z_b,c)`` with ``Z`` the tie-break maps (a missing one is replaced by its feature map):
    the term the two channels would give without the clip.
    Taught in ``notebooks/01_mac.ipynb``.
    """
    for name, f in (("fmap_a", fmap_a), ("fmap_b", fmap_b)):
        _check_map(f, "implicit_correspondences")
        if f.dim() != 3:
            raise ValueError(f"implicit_correspondences: {name} must be one map (C, h, w), got "
                             f"{tuple(f.shape)}")
    if fmap_a.shape[0] != fmap_b.shape[0]:
        raise ValueError(f"implicit_correspondences: the maps have {fmap_a.shape[0]} and "
                         f"{fmap_b.shape[0]} channels; they must come from the same backbone")
    x = l2n(mac(fmap_a[None]))[0]  # (C,)
    y = l2n(mac(fmap_b[None]))[0]
    term_tiebreak = None
    if tiebreak_a is not None or tiebreak_b is not None:
        for name, t, f in (("tiebreak_a", tiebreak_a, fmap_a), ("tiebreak_b", tiebreak_b, fmap_b)):
            if t is not None and (not isinstance(t, torch.Tensor) or t.shape != f.shape):
                raise ValueError(f"implicit_correspondences: {name} must be a tensor of its map's shape "
                                 f"{tuple(f.shape)}, got {getattr(t, 'shape', type(t).__name__)}")
        za = mac((fmap_a if tiebreak_a is None else tiebreak_a)[None].float())[0]  # (C,)
        zb = mac((fmap_b if tiebreak_b is None else tiebreak_b)[None].float())[0]
        term_tiebreak = za.clamp(min=0) * zb.clamp(min=0)
    channels, values, share = top_channels(x, y, k, tiebreak=term_tiebreak)
    loc_a, _ = argmax_locations(fmap_a, tiebreak_a)
    loc_b, _ = argmax_locations(fmap_b, tiebreak_b)
    return Correspondences(channels=channels, contributions=values, share=share,
                           similarity=float((x * y).sum()), loc_a=loc_a[channels], loc_b=loc_b[channels])
