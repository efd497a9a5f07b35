"""The receptive field of a feature-map cell: the patch of the photo it can see, and the one it looks at.

* :func:`conv_chain` and :func:`receptive_field` -- the *theoretical* receptive field of a
  feature-map cell (every input pixel that can influence it), computed layer by layer
  from kernel sizes, strides, dilations and the actual (TensorFlow "SAME" or fixed)
  paddings, and :func:`cell_boxes` to draw it. The layers come from the backbone's own
  declaration, ``conv_path()`` (:class:`~retrieval_lib.models.base.Backbone`);
* :func:`input_gradients` and :func:`mass_box` -- the *effective* receptive field
  (Luo, Li, Urtasun & Zemel, "Understanding the Effective Receptive Field in Deep
  Convolutional Neural Networks", NeurIPS 2016): the input pixels that actually move a
  given activation, measured by back-propagation, and the box holding most of that
  gradient mass.

For EfficientNet-Lite0 (the book's default backbone) the theoretical receptive field of
a cell of the last map is 851 x 851 px with a stride of 32 px between cells, so at the
``cpu`` input size (512 px) every cell can see the whole image; the effective field is
far smaller, which is why the notebook draws both.

Conventions: cell locations are ``(row, col)`` integer pairs; boxes are ``(x, y, w, h)`` in
pixels of the network input (the image as the network sees it, e.g. ``book.image(i)``),
pixel ``p`` covering ``[p, p + 1)``. Which cells to look at comes from
:mod:`retrieval_lib.book.explain` (where a MAC descriptor looks). Taught in
``notebooks/01_mac.ipynb``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import torch
from torch import nn

from retrieval_lib.book.explain import model_input
from retrieval_lib.models.effnet_lite import Conv2dSame, tf_same_padding

__all__ = [
    "ConvSpec",
    "conv_chain",
    "ReceptiveField",
    "receptive_field",
    "cell_centers",
    "cell_boxes",
    "GRADIENT_PIXELS",
    "input_gradients",
    "mass_box",
]


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
    """The layers on the longest path from the image to ``model.features``' output, as :class:`ConvSpec`.

    The backbone lists them itself (``model.conv_path()``, see
    :class:`~retrieval_lib.models.base.Backbone`):

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
    path = getattr(model, "conv_path", None)
    try:
        mods = path() if callable(path) else None
    except NotImplementedError:
        mods = None
    if mods is None:
        raise TypeError(
            f"conv_chain needs a backbone that lists its conv_path() (EfficientNetLite, ResNetBackbone), "
            f"not {type(model).__name__}; for another network pass the list of ConvSpec along its deepest "
            "path to receptive_field"
        )
    return [_spec(m) for m in mods]


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
    x0 = model_input(image, model)  # (3, H, W)
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
