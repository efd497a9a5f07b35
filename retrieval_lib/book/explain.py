"""Where a MAC descriptor looks: arg-max locations, receptive fields, implicit correspondences.

A MAC descriptor keeps, per channel ``k``, only the largest activation of the feature map,
``f_k = max_p X_k(p)``. Each component therefore comes from one cell of the map, and
through the network from one patch of the photo. This module finds those cells and
patches:

* :func:`argmax_locations` -- the cell ``(row, col)`` holding each channel's maximum;
* :func:`conv_chain` and :func:`receptive_field` -- the *theoretical* receptive field of a
  feature-map cell (every input pixel that can influence it), computed layer by layer
  from kernel sizes, strides, dilations and the actual (TensorFlow "SAME" or fixed)
  paddings, and :func:`cell_boxes` to draw it;
* :func:`input_gradients` and :func:`mass_box` -- the *effective* receptive field
  (Luo, Li, Urtasun & Zemel, "Understanding the Effective Receptive Field in Deep
  Convolutional Neural Networks", NeurIPS 2016): the input pixels that actually move a
  given activation, measured by back-propagation, and the box holding most of that
  gradient mass;
* :func:`top_channels` and :func:`implicit_correspondences` -- the channels that
  contribute most to the similarity ``x^T y = sum_k x_k y_k`` of two MAC descriptors, and
  the pair of cells (one per image) their maxima come from: the implicit patch
  correspondences drawn in Figure 2 of Radenović, Tolias & Chum, "Fine-tuning CNN Image
  Retrieval with No Human Annotation", TPAMI 2018;
* :func:`clipped_channels`, :func:`count_clipped` and :func:`rank_channels` -- a clipping
  last activation (EfficientNet-Lite's ReLU6) sets every response above 6 to exactly 6,
  so on a real photo dozens of MAC components are equal; these count them and rank
  channels with the ties broken by the map before the activation
  (:func:`fmap_of` with ``pre_activation=True``), instead of by channel index.

For EfficientNet-Lite0 (the book's default backbone) the theoretical receptive field of
a cell of the last map is 851 x 851 px with a stride of 32 px between cells, so at the
``cpu`` input size (512 px) every cell can see the whole image; the effective field is
far smaller, which is why the notebook draws both.

Conventions: feature maps ``(C, h, w)`` or ``(B, C, h, w)``; cell locations are
``(row, col)`` integer pairs; boxes are ``(x, y, w, h)`` in pixels of the network input
(the image as the network sees it, e.g. ``book.image(i)``), pixel ``p`` covering
``[p, p + 1)``. Taught in ``notebooks/01_mac.ipynb``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import torch
from torch import nn

from retrieval_lib.layers.functional import l2n, mac
from retrieval_lib.models.backbones import RELU6_CLIP, tf_same_padding

__all__ = [
    "argmax_locations",
    "clipped_channels",
    "count_clipped",
    "rank_channels",
    "ConvSpec",
    "conv_chain",
    "ReceptiveField",
    "receptive_field",
    "cell_centers",
    "cell_boxes",
    "fmap_of",
    "input_gradients",
    "mass_box",
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
# theoretical receptive field
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConvSpec:
    """One layer on the path from the image to the feature map, along one axis.

    ``padding`` is ``"same"`` for TensorFlow "SAME" padding (computed from the input
    size; strided layers pad less before than after) or a fixed number of pixels padded
    on both sides (PyTorch convention).
    """

    kernel: int
    stride: int = 1
    dilation: int = 1
    padding: Union[int, str] = 0

    def pad_before(self, n: int) -> int:
        """Pixels of padding before position 0 for an input of length ``n``
        (:func:`~retrieval_lib.models.backbones.tf_same_padding` for ``"same"``)."""
        if self.padding == "same":
            return tf_same_padding(n, self.kernel, self.stride, self.dilation)[0]
        return int(self.padding)

    def out_size(self, n: int) -> int:
        """Output length for an input of length ``n`` (floor mode)."""
        if self.padding == "same":
            return -(-n // self.stride)
        return (n + 2 * int(self.padding) - self.dilation * (self.kernel - 1) - 1) // self.stride + 1


def _pair_value(v, what: str, module: nn.Module) -> int:
    if isinstance(v, (tuple, list)):
        if len(set(v)) != 1:
            raise ValueError(f"conv_chain: {type(module).__name__} has a non-square {what} {tuple(v)}; "
                             "only square kernels, strides and paddings are supported")
        v = v[0]
    return int(v)


def _spec(module: nn.Module) -> ConvSpec:
    """A ConvSpec for a Conv2d / Conv2dSame / MaxPool2d module."""
    from retrieval_lib.models.backbones import Conv2dSame

    if isinstance(module, Conv2dSame):
        return ConvSpec(_pair_value(module.kernel_size, "kernel", module),
                        _pair_value(module.stride, "stride", module),
                        _pair_value(module.dilation, "dilation", module), "same")
    if isinstance(module, (nn.Conv2d, nn.MaxPool2d)):
        if getattr(module, "ceil_mode", False):
            raise ValueError("conv_chain: MaxPool2d with ceil_mode=True is not supported")
        pad = module.padding
        if isinstance(pad, str):
            if pad != "same":
                raise ValueError(f"conv_chain: unsupported padding {pad!r}")
            pad = "same"
        else:
            pad = _pair_value(pad, "padding", module)
        return ConvSpec(_pair_value(module.kernel_size, "kernel", module),
                        _pair_value(module.stride, "stride", module),
                        _pair_value(module.dilation, "dilation", module), pad)
    raise TypeError(f"conv_chain: cannot describe a {type(module).__name__} layer")


def conv_chain(model: nn.Module) -> list[ConvSpec]:
    """The layers on the longest path from the image to ``model.features``' output.

    Knows the backbones of :mod:`retrieval_lib.models.backbones`:

    * EfficientNet-Lite: stem 3x3/2, then per MBConv block the 1x1 expansion (if any),
      the kxk depthwise convolution and the 1x1 projection, then the 1x1 head, all with
      TensorFlow "SAME" padding;
    * ResNet: ``conv1`` 7x7/2, the 3x3/2 max-pool, then per bottleneck ``conv1``, ``conv2``
      (which carries the stride), ``conv3``.

    Residual shortcuts are left out: an identity or strided 1x1 shortcut sees a subset
    of what the main path sees (same centre, same stride), so the longest path alone
    gives the receptive field. For any other network, write the list of
    :class:`ConvSpec` by hand. Taught in ``notebooks/01_mac.ipynb``.
    """
    from retrieval_lib.models.backbones import EfficientNetLite, ResNetBackbone

    if isinstance(model, EfficientNetLite):
        mods = [model._conv_stem]
        for b in model._blocks:
            if b.has_expand:
                mods.append(b._expand_conv)
            mods += [b._depthwise_conv, b._project_conv]
        mods.append(model._conv_head)
        return [_spec(m) for m in mods]
    if isinstance(model, ResNetBackbone):
        mods = [model.conv1, model.maxpool]
        for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
            for block in layer:
                mods += [getattr(block, n) for n in ("conv1", "conv2", "conv3") if hasattr(block, n)]
        return [_spec(m) for m in mods]
    raise TypeError(
        f"conv_chain knows EfficientNetLite and ResNetBackbone, not {type(model).__name__}; "
        "for another network pass the list of ConvSpec along its deepest path to receptive_field"
    )


@dataclass(frozen=True)
class ReceptiveField:
    """Theoretical receptive field of the cells of a feature map, along one axis.

    Cell ``i`` sees input pixels ``start + i * stride`` to ``start + i * stride + size - 1``
    (``start`` is negative when the field reaches into the padding). ``n_cells`` is the
    map's length and ``input_size`` the input's.
    """

    size: int
    stride: int
    start: int
    n_cells: int
    input_size: int

    def span(self, i, clip: bool = True):
        """``(first pixel, one past the last pixel)`` seen by cell(s) ``i``, clipped to the image."""
        lo = self.start + np.asarray(i) * self.stride
        hi = lo + self.size
        if clip:
            lo, hi = np.clip(lo, 0, self.input_size), np.clip(hi, 0, self.input_size)
        return lo, hi

    def center(self, i):
        """Centre of cell(s) ``i``'s field in continuous pixel coordinates (pixel p is [p, p+1))."""
        return self.start + np.asarray(i, dtype=float) * self.stride + self.size / 2.0


def receptive_field(chain: Sequence[ConvSpec], input_size: int) -> ReceptiveField:
    """Theoretical receptive field of a chain of layers for an input of ``input_size`` px.

    Layer by layer (one axis; kernel ``k``, stride ``s``, dilation ``d``, padding before
    ``p`` for that layer's input length): with ``J`` the distance in input pixels between
    neighbouring cells, ``R`` the field size and ``a`` the first pixel of cell 0's field,

        a <- a - p * J,      R <- R + (k - 1) * d * J,      J <- J * s,

    starting from ``a = 0, R = 1, J = 1`` (Araujo, Norris & Sim, "Computing Receptive
    Fields of Convolutional Neural Networks", Distill 2019). TensorFlow "SAME" padding is
    recomputed from each layer's input length, so the result depends on ``input_size``.
    Taught in ``notebooks/01_mac.ipynb``.
    """
    if isinstance(input_size, bool) or not isinstance(input_size, (int, np.integer)) or input_size < 1:
        raise ValueError(f"receptive_field: input_size must be a positive number of pixels, got {input_size!r}")
    chain = list(chain)
    if not chain:
        raise ValueError("receptive_field: the chain of layers is empty")
    a, R, J, n = 0, 1, 1, int(input_size)
    for spec in chain:
        if not isinstance(spec, ConvSpec):
            raise TypeError(f"receptive_field: expected ConvSpec layers, got {type(spec).__name__}")
        a -= spec.pad_before(n) * J
        R += (spec.kernel - 1) * spec.dilation * J
        J *= spec.stride
        n = spec.out_size(n)
        if n < 1:
            raise ValueError(f"receptive_field: an input of {input_size} px leaves no cells after a "
                             f"layer with kernel {spec.kernel}; use a larger input")
    return ReceptiveField(size=R, stride=J, start=a, n_cells=n, input_size=int(input_size))


def _as_locs(locs) -> np.ndarray:
    L = locs.detach().cpu().numpy() if isinstance(locs, torch.Tensor) else np.asarray(locs)
    if L.ndim != 2 or L.shape[1] != 2:
        raise ValueError(f"cell locations must be (K, 2) (row, col) pairs, got shape {L.shape}")
    return L


def cell_centers(locs, rf_y: ReceptiveField, rf_x: ReceptiveField) -> np.ndarray:
    """Pixel centres ``(x, y)`` of the receptive fields of cells ``locs`` (K, 2) (row, col): (K, 2)."""
    L = _as_locs(locs)
    return np.stack([rf_x.center(L[:, 1]), rf_y.center(L[:, 0])], axis=1)


def cell_boxes(locs, rf_y: ReceptiveField, rf_x: ReceptiveField, clip: bool = True) -> np.ndarray:
    """Theoretical receptive-field boxes ``(x, y, w, h)`` in input pixels of cells ``locs``.

    ``locs`` is (K, 2) ``(row, col)`` (e.g. from :func:`argmax_locations`); the result is
    (K, 4) float, clipped to the image unless ``clip=False``. Taught in
    ``notebooks/01_mac.ipynb``.
    """
    L = _as_locs(locs)
    if len(L) and ((L[:, 0] >= rf_y.n_cells).any() or (L[:, 1] >= rf_x.n_cells).any() or (L < 0).any()):
        raise ValueError(f"cell locations must lie in the {rf_y.n_cells}x{rf_x.n_cells} map these "
                         "receptive fields describe")
    y0, y1 = rf_y.span(L[:, 0], clip)
    x0, x1 = rf_x.span(L[:, 1], clip)
    return np.stack([x0, y0, x1 - x0, y1 - y0], axis=1).astype(float)


# ----------------------------------------------------------------------------------------
# effective receptive field
# ----------------------------------------------------------------------------------------
def _as_input(image, model) -> torch.Tensor:
    """PIL image / uint8 (H, W, 3) array / float (3, H, W) tensor in [0, 1] -> normalised (3, H, W)."""
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
    x = _as_input(image, model)[None]
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


GRADIENT_PIXELS = 4 * 512 * 512
"""Input pixels per backward pass of :func:`input_gradients` when ``batch_size`` is ``None``: four copies
of a 512 x 512 image. At 1024 px a backward through ResNet-101 needs about 2 GB per 1024 x 768 copy
(measured on the CPU: +8.3 GB for four), so the batch is sized by memory, not by count."""


def input_gradients(model: nn.Module, image, cells, batch_size: int | None = None,
                    pre_activation: bool = True) -> torch.Tensor:
    """Gradient magnitude of chosen feature-map activations with respect to the input pixels.

    For each requested cell ``(channel, row, col)`` the map ``|d X_channel(row, col) / d I|``,
    summed over the three colour channels, shape ``(K, H, W)``: the effective receptive
    field of that activation (Luo et al., NeurIPS 2016). The ``K`` cells are computed in
    batches of copies of the image, one copy per cell, so one backward pass serves a whole
    batch; the copies do not interact because the model must be in eval mode.

    With ``pre_activation=True`` and a backbone that has ``preactivation`` (EfficientNet-
    Lite) the gradient is taken just before the head's last activation: activations
    clipped at 6 by ReLU6 (common at the strongest cells, exactly where MAC looks) would
    otherwise have zero gradient. Other backbones use ``features``. Parameters get no
    gradient.

    Args:
        model: a backbone with ``features`` and ``normalize``, in eval mode.
        image: the image as the network sees it: PIL image, uint8 (H, W, 3) array or float
            (3, H, W) tensor in [0, 1] (not normalised; this function normalises).
        cells: (K, 3) integers ``(channel, row, col)``.
        batch_size: copies of the image per backward pass (memory grows with it); ``None``: as many
            as fit in :data:`GRADIENT_PIXELS` input pixels, at least one (4 at 512 x 512, 1 at 1024 x 768).

    Returns:
        ``(K, H, W)`` float tensor on the model's device, non-negative.
    Taught in ``notebooks/01_mac.ipynb``.
    """
    if model.training:
        raise ValueError("input_gradients: put the model in eval mode (model.eval()); in training "
                         "mode BatchNorm mixes the copies of the image")
    cells_t = torch.as_tensor(np.asarray(cells.cpu() if isinstance(cells, torch.Tensor) else cells),
                              dtype=torch.long)
    if cells_t.dim() != 2 or cells_t.shape[1] != 3:
        raise ValueError(f"input_gradients: cells must be (K, 3) (channel, row, col), got shape {tuple(cells_t.shape)}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"input_gradients: batch_size must be >= 1, got {batch_size}")
    x0 = _as_input(image, model)  # (3, H, W)
    if batch_size is None:
        batch_size = max(1, GRADIENT_PIXELS // (x0.shape[1] * x0.shape[2]))
    pre = getattr(model, "preactivation", None) if pre_activation else None
    run = pre if callable(pre) else model.features
    grads = []
    for a in range(0, len(cells_t), batch_size):
        c = cells_t[a:a + batch_size].to(x0.device)
        x = x0.unsqueeze(0).repeat(len(c), 1, 1, 1).requires_grad_(True)  # (b, 3, H, W)
        with torch.enable_grad():
            fmap = run(x)  # (b, C, h, w)
            C, h, w = fmap.shape[1:]
            if (c[:, 0] >= C).any() or (c[:, 1] >= h).any() or (c[:, 2] >= w).any() or (c < 0).any():
                raise ValueError(f"input_gradients: a cell lies outside the ({C}, {h}, {w}) feature map")
            sel = fmap[torch.arange(len(c), device=x.device), c[:, 0], c[:, 1], c[:, 2]]  # (b,)
            (g,) = torch.autograd.grad(sel.sum(), x)
        grads.append(g.abs().sum(dim=1).detach())  # (b, H, W)
    return torch.cat(grads)


def mass_box(heat, mass: float = 0.9) -> tuple[float, float, float, float]:
    """The box ``(x, y, w, h)`` spanning the central ``mass`` of a non-negative map's marginals.

    Along each axis, with ``F`` the cumulative sum of the map's marginal divided by its
    total, the box runs from the first index with ``F >= (1 - mass) / 2`` to the first
    index with ``F >= (1 + mass) / 2`` (both included), so each marginal keeps at least
    ``mass`` of its total inside. Used to summarise an effective receptive field
    (:func:`input_gradients`) as a box. Taught in ``notebooks/01_mac.ipynb``.
    """
    H = heat.detach().cpu().double().numpy() if isinstance(heat, torch.Tensor) else np.asarray(heat, float)
    if H.ndim != 2:
        raise ValueError(f"mass_box: expected a 2-D map (H, W), got shape {H.shape}")
    if not 0 < mass <= 1:
        raise ValueError(f"mass_box: mass must be in (0, 1], got {mass!r}")
    if (H < 0).any() or not np.isfinite(H).all():
        raise ValueError("mass_box: the map must be finite and non-negative (e.g. a gradient magnitude)")
    total = H.sum()
    if total <= 0:
        raise ValueError("mass_box: the map is all zeros; there is no mass to enclose")

    def span(marginal):
        F = np.cumsum(marginal) / total
        lo = int(np.searchsorted(F, (1 - mass) / 2 - 1e-12, side="left"))
        hi = int(np.searchsorted(F, (1 + mass) / 2 - 1e-12, side="left"))
        hi = min(hi, len(F) - 1)
        return lo, hi

    y0, y1 = span(H.sum(axis=1))
    x0, x1 = span(H.sum(axis=0))
    return float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1)


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
